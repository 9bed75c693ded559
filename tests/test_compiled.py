"""The compiled path (``compile=``): the same steps as the eager path, to rounding.

Each case steps an eager and a compiled solver from the same controls on the same batches
(float64) and compares the controls, the loss and DDPNOpt's diagnostics after every step.
torch.compile takes ~10-20 s per distinct function and shape on the CPU, so the cases are
few and small; a machine whose torch.compile has no working backend skips them.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from ocnet.bridge import to_problem
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import make_solver
from ocnet.solvers.compiled import Compiled
from tests.devices import DEVICES

DT = torch.float64
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile's CPU backend needs a C++ compiler")


def _graphs() -> int:
    """How many graphs dynamo has compiled in this process (the compiled path ran)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _problem(device: str):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 3)).to(DT)
    return to_problem(net.to(device), "cross_entropy")


def _batches(device: str, n: int = 3):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 4, generator=g, dtype=DT).to(device),
             torch.randint(0, 3, (8,), generator=g).to(device)) for _ in range(n)]


def _twins(name: str, device: str, **options):
    eager_problem = _problem(device)
    compiled_problem = copy.deepcopy(eager_problem)
    eager = make_solver(name, eager_problem, **options)
    compiled = make_solver(name, compiled_problem, compile=True, **options)
    return eager_problem, compiled_problem, eager, compiled


def _assert_same(a, b):
    for ua, ub in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(ua, ub, rtol=1e-12, atol=1e-13)


@needs_compiler
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_compiled_gradient_solver_equals_eager(name, device):
    graphs = _graphs()
    pe, pc, eager, compiled = _twins(name, device, lr=0.05)
    for x, y in _batches(device):
        ie, ic = eager.step(x, y), compiled.step(x, y)
        torch.testing.assert_close(ie.loss, ic.loss, rtol=1e-12, atol=0)
        _assert_same(pe, pc)
    assert isinstance(compiled._update, Compiled) and _graphs() > graphs
    moved = sum(float((u - v).detach().abs().sum()) for u, v in
                zip(pe.parameters(), _problem(device).parameters(), strict=True))
    assert moved > 0


@needs_compiler
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ddpnopt_equals_eager(device):
    # the default (Adam base, gain 1, trust 0.3): compiled base update and stage feedback;
    # a small trust region so that the bound binds at some stages and not at others
    graphs = _graphs()
    pe, pc, eager, compiled = _twins("ddpnopt", device, lr=0.05, trust=0.05)
    rates = []
    for x, y in _batches(device):
        ie, ic = eager.step(x, y), compiled.step(x, y)
        torch.testing.assert_close(ie.loss, ic.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(ie.extra["loss_after_phi"], ic.extra["loss_after_phi"],
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(ie.extra["gains"], ic.extra["gains"], rtol=1e-12, atol=0)
        assert float(ie.extra["cap_rate"]) == float(ic.extra["cap_rate"])
        rates.append(float(ie.extra["cap_rate"]))
        _assert_same(pe, pc)
    assert any(r > 0 for r in rates)  # the bound's branch was exercised
    assert isinstance(compiled._fixed_gain_stage, Compiled) and _graphs() > graphs


def test_compile_option_is_checked():
    problem = _problem("cpu")
    with pytest.raises(ConfigError, match="compile must be False, True or one of"):
        make_solver("adam", problem, compile="fastest")
    with pytest.raises(ConfigError, match="no compiled path"):
        make_solver("ddpnopt", problem, vxx="exact", compile=True)
    with pytest.raises(ConfigError, match="no compiled path"):
        make_solver("ddpnopt", problem, base="kfac", compile=True)
    # False is the eager path itself (no wrapper)
    solver = make_solver("ddpnopt", problem)
    assert solver.compile is None and solver._base_update == solver.curvature.update_with_diagonal
