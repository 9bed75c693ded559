"""The finiteness guard of ``Solver.step``: a non-finite step changes nothing.

For every registered solver and both decision paths (the host read of a CPU problem and
the device-side ``torch.where``), a step on a batch holding NaN leaves the controls and the
solver's state bit-for-bit as they were and reports ``accepted`` False with a reason; the
next finite step is exactly the step an untouched twin takes. With ``check_inputs`` the
same batch raises ``DataError`` naming the bad sample, and nothing changes either.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ocnet.bridge import to_problem
from ocnet.ocp import DataError
from ocnet.solvers import make_solver, solver_names
from ocnet.solvers.registry import solver_entry

D = torch.float64
SOLVERS = [n for n in solver_names() if not solver_entry(n).reference]
OPTIONS = {"ddpnopt-kfac": ("ddpnopt", {"base": "kfac"})}


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return to_problem(net, "cross_entropy", weight_decay=1e-3)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g)


def _snapshot(solver) -> list[torch.Tensor]:
    """Every tensor of the controls and of the solver's checkpointed state."""
    out = [u.detach().clone() for u in solver.problem.parameters()]

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v.detach().clone())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, list | tuple):
            for w in v:
                walk(w)

    walk(solver.state_dict())
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("name", SOLVERS + list(OPTIONS))
def test_a_nan_batch_is_rejected_and_changes_nothing(name, path):
    solver_name, opts = OPTIONS.get(name, (name, {}))
    solver = make_solver(solver_name, _problem(), **opts)
    if path == "device" and solver.host_state():
        pytest.skip("host-side state (DDP's mu) is restored on the host path only")
    solver.guard, solver.check_inputs = path, False
    for s in range(2):  # some state first (moments, factors, friction)
        solver.step(*_batch(s))
    twin = copy.deepcopy(solver)
    before = _snapshot(solver)
    x, y = _batch(5)
    x[3, 1] = float("nan")
    info = solver.step(x, y)
    assert not bool(info.accepted) and "not finite" in info.reason
    assert _same(_snapshot(solver), before), "a rejected step changed the controls or state"
    info = solver.step(*_batch(6))
    twin.step(*_batch(6))
    assert bool(info.accepted)
    assert _same(_snapshot(solver), _snapshot(twin)), "the next step differs from a twin's"


@pytest.mark.parametrize("name", ["adam", "ddpnopt", "emsa"])
def test_check_inputs_names_the_bad_sample_and_changes_nothing(name):
    solver = make_solver(name, _problem())
    solver.step(*_batch(0))
    before = _snapshot(solver)
    x, y = _batch(1)
    x[5, 0] = float("inf")
    with pytest.raises(DataError, match=r"1 NaN/inf entries of x_0 in 1 of 8 samples "
                                        r"\(first bad sample: 5\)"):
        solver.step(x, y)
    assert _same(_snapshot(solver), before)
    with pytest.raises(DataError, match="the batch is empty"):
        solver.step(x[:0], y[:0])


def test_a_finite_step_is_not_touched_by_the_guard():
    a = make_solver("adam", _problem())
    b = copy.deepcopy(a)
    b.guard = b.check_inputs = False
    for s in range(5):
        ia, ib = a.step(*_batch(s)), b.step(*_batch(s))
        assert bool(ia.accepted) and torch.equal(ia.loss, ib.loss)
    assert _same(_snapshot(a), _snapshot(b))
