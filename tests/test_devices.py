"""Every registered solver on every device, with hidden host synchronisations made fatal.

For each solver of ``ocnet.solvers.solver_names()`` and each device of ``DEVICES`` (cuda
is reported as skipped when absent): a small tanh MLP (``to_problem``, cross-entropy,
weight decay) is placed on the device in float32 and float64, one warm-up step is taken
(lazy optimizer state, caches), then three steps run inside ``no_host_sync`` -- on CUDA
``torch.cuda.set_sync_debug_mode("error")``, on the CPU the emulation that makes
``.item()``, ``.cpu()``, ``.numpy()``, ``.tolist()``, ``bool()``, ``float()`` and ``int()``
of a tensor raise. Checked: the controls are the same tensor objects, still on the device
and in the dtype; ``StepInfo`` holds tensors on the device; the objective decreased (for
basic MSA, which may diverge by design, each layer's Hamiltonian did not decrease instead).

Exceptions, each a host decision that is part of the algorithm (see ``docs/device_audit.md``):

- ``ipopt`` is a host solver by design (CasADi/IPOPT on float64 NumPy); its device and
  dtype round trip is tested in ``tests/test_ipopt.py``.
- ``ddp``: the Levenberg-Marquardt accept/reject retry loop reads ``bool(J_new < J)`` on
  the host once per trial (``ocnet/solvers/ddp.py``); it runs without the guard.
- ``torch.optim.Adam`` (``--solver adam``) reads the same CPU step counter with ``.item()``
  inside ``torch.optim``; that one read is let through (``_host_step_counters``).
- E-MSA's ``torch-lbfgs`` inner solver and the port-Hamiltonian ``ode`` integrator use
  host-side line searches / adaptive step control (torch.optim.LBFGS, torchdiffeq): they
  run without the guard and only their placement is checked.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import pytest
import torch
import torch.optim.adam as torch_adam
from devices import DEVICES, HostSyncError, no_host_sync
from torch import nn

from ocnet.bridge import place, to_device, to_problem
from ocnet.dynamics import AntisymmetricField, TimeMesh
from ocnet.neural_ode.model import NeuralODE
from ocnet.solvers import DCEM, NOVAS, UnrolledGD, make_solver, solver_names, solver_records
from ocnet.solvers.dwr import full_indicators, indicators

for _module in ("ocnet.solvers.ddp", "ocnet.solvers.ddpnopt"):  # registered when importable
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)

#: solvers that solve on the host by design (CasADi/IPOPT; tested in test_ipopt.py)
HOST_SOLVERS = {r.name for r in solver_records() if not r.on_device}
#: solvers whose step contains an inherent host decision: run without the guard
UNGUARDED = {r.name for r in solver_records() if r.host_sync} - HOST_SOLVERS
#: solvers whose only host read is torch.optim's CPU step counter (no device sync)
SOLVERS = sorted((set(solver_names()) | {"ddp", "ddpnopt"}) - HOST_SOLVERS)
DTYPES = [torch.float32, torch.float64]

_ITEM = torch.Tensor.item  # the real method, saved before any guard replaces it


@contextlib.contextmanager
def _host_step_counters() -> Iterator[None]:
    """Let ``torch.optim.Adam`` read its step counter (a CPU tensor unless capturable)."""
    original = torch_adam._get_value

    def get_value(x: object) -> object:
        if isinstance(x, torch.Tensor):
            assert x.device.type == "cpu" and x.numel() == 1, "only host step counters"
            return _ITEM(x)
        return x

    torch_adam._get_value = get_value
    try:
        yield
    finally:
        torch_adam._get_value = original


def _guard(device: str, *, emulate: bool = True, guarded: bool = True
           ) -> contextlib.AbstractContextManager:
    if not guarded:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(_host_step_counters())
    stack.enter_context(no_host_sync(device, emulate_on_cpu=emulate))
    return stack


def _mlp_problem(device: str, dtype: torch.dtype):  # noqa: ANN202
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))
    problem = place(to_problem(net, "cross_entropy", 1e-3), device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g)
    y = (x @ torch.randn(3, 3, generator=g)).argmax(1)
    x, y = to_device(x, y, device=device, dtype=dtype)
    return problem, x, y


def _check_placement(problem, tensors, device: str, dtype: torch.dtype) -> None:  # noqa: ANN001
    assert [id(u) for u in problem.parameters()] == [id(u) for u in tensors]
    for u in problem.parameters():
        assert u.device.type == device and u.dtype == dtype
        assert bool(torch.isfinite(u).all())


def _check_info(info, device: str, dtype: torch.dtype) -> None:  # noqa: ANN001
    assert isinstance(info.loss, torch.Tensor) and info.loss.dim() == 0
    assert info.loss.device.type == device and info.loss.dtype == dtype
    assert bool(torch.isfinite(info.loss))
    if info.grad_norm is not None:
        assert info.grad_norm.device.type == device and bool(torch.isfinite(info.grad_norm))
    if isinstance(info.accepted, torch.Tensor):
        assert info.accepted.device.type == device or info.accepted.device.type == "cpu"
    assert info.seconds > 0


def _run(name: str, device: str, dtype: torch.dtype, *, emulate: bool = True,
         guarded: bool = True, **options: object) -> tuple[float, float, list]:
    problem, x, y = _mlp_problem(device, dtype)
    tensors = problem.parameters()
    with torch.no_grad():
        j0 = float(problem.objective(x, y).detach())
    solver = make_solver(name, problem, **options)
    # the device path of the finiteness guard (on a CPU problem it reads its flag on the
    # host, which costs nothing there); checking a batch's values reads it on the host
    solver.guard, solver.check_inputs = "device", False
    infos = [solver.step(x, y)]  # warm-up outside the guard (lazy state, caches)
    with _guard(device, emulate=emulate, guarded=guarded):
        for _ in range(3):
            infos.append(solver.step(x, y))
    _check_placement(problem, tensors, device, dtype)
    for info in infos:
        _check_info(info, device, dtype)
    with torch.no_grad():
        j = float(problem.objective(x, y).detach())
    return j0, j, infos


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SOLVERS)
def test_solver_steps_stay_on_the_device(name: str, device: str, dtype: torch.dtype) -> None:
    if name in ("ddp", "ddpnopt"):
        pytest.importorskip(f"ocnet.solvers.{name}")
    guarded = name not in UNGUARDED
    j0, j, infos = _run(name, device, dtype, guarded=guarded)
    if name == "msa":  # basic MSA may diverge; its guarantee is per-layer ascent of H
        for info in infos:
            assert bool((info.extra["htilde_after"] >= info.extra["htilde_before"]).all())
    else:
        assert j < j0, f"{name}: objective {j0:.6g} -> {j:.6g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adam", "kfac"])
def test_ddpnopt_bases_without_host_reads(device: str, base: str) -> None:
    pytest.importorskip("ocnet.solvers.ddpnopt")
    j0, j, _ = _run("ddpnopt", device, torch.float64, base=base)
    assert j < j0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inner", ["gd", "adam", "lbfgs"])
def test_emsa_inner_solvers_without_host_reads(device: str, inner: str) -> None:
    j0, j, infos = _run("emsa", device, torch.float64, inner=inner, rho=1.0, inner_iters=4,
                        lr=0.05 if inner == "adam" else None)
    assert j < j0
    for info in infos:
        assert bool((info.extra["htilde_after"] >= info.extra["htilde_before"]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options", [
    ("emsa", {"inner": "torch-lbfgs", "inner_iters": 4}),  # torch.optim.LBFGS line search
    ("phb", {"integrator": "ode"}),                         # torchdiffeq step control
])
def test_host_side_variants_keep_the_placement(device: str, name: str, options: dict) -> None:
    j0, j, _ = _run(name, device, torch.float64, guarded=False, **options)
    assert j < j0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sgd", "emsa", "phb-goal"])
def test_neural_ode_problem_on_the_device(device: str, name: str) -> None:
    """Euler stages of an antisymmetric field (zero-pad lift, dense head), and DWR's
    indicators on the trained mesh, without host reads."""
    g = torch.Generator().manual_seed(0)
    model = NeuralODE(AntisymmetricField(4), TimeMesh.uniform(1.0, 3), in_features=2,
                      out_features=3, generator=g, dtype=torch.float64, device=device)
    problem = model.problem("cross_entropy")
    x = torch.randn(20, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (20,), generator=g).to(device)
    tensors = problem.parameters()
    with torch.no_grad():
        j0 = float(problem.objective(x, y).detach())
    solver = make_solver(name, problem)
    solver.guard, solver.check_inputs = "device", False  # as in _run
    solver.step(x, y)
    with _guard(device):
        for _ in range(3):
            info = solver.step(x, y)
        eta = indicators(model, problem, x, y)
    _check_placement(problem, tensors, device, torch.float64)
    _check_info(info, device, torch.float64)
    assert eta.device.type == device and eta.shape == (3,)
    with torch.no_grad():
        assert float(problem.objective(x, y).detach()) < j0


@pytest.mark.parametrize("device", DEVICES)
def test_dwr_full_indicators_on_the_device(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    model = NeuralODE(AntisymmetricField(4), TimeMesh.uniform(1.0, 2), in_features=2,
                      out_features=3, generator=g, dtype=torch.float64, device=device)
    fine = model.refine([0, 1])
    x = torch.randn(10, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (10,), generator=g).to(device)
    problem, fine_problem = model.problem("cross_entropy"), fine.problem("cross_entropy")
    with _guard(device):
        eta = full_indicators(model, problem, fine, fine_problem, x, y)
    assert eta.device.type == device and bool(torch.isfinite(eta).all())


class _Energy(nn.Module):
    """E(x, Y) = |Y - x W|^2 + 0.1 sum cos(3 Y): non-convex, argmin near x W."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return ((Y - (x @ self.w)[:, None, :]) ** 2).sum(-1) + 0.1 * torch.cos(3 * Y).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_cls,options", [
    # fused=False: the CPU emulation of the guard checks the path a GPU runs (the fused
    # kernel is a CPU-only path; tests/test_novas_fused.py)
    (NOVAS, {"tol": 1e-4, "sigma0": 1.0, "kappa": 20.0, "fused": False}),
    (NOVAS, {"differentiate": "all", "shape": "soft_ce", "sigma0": 1.0, "fused": False}),
    (DCEM, {"tol": 1e-4}),
    (UnrolledGD, {}),
], ids=["novas", "novas-all-soft_ce", "dcem", "unrolled_gd"])
def test_argmin_layers_forward_backward_on_the_device(
        device: str, dtype: torch.dtype, layer_cls: type, options: dict) -> None:
    layer = layer_cls(_Energy(), 2, **options).to(device=device, dtype=dtype)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    kw = {} if layer_cls is UnrolledGD else {
        "generator": torch.Generator(device=device).manual_seed(5)}
    with _guard(device):
        out = layer(x, **kw)
        loss = (out ** 2).sum()
        loss.backward()
    assert out.device.type == device and out.dtype == dtype and out.shape == (6, 2)
    grad = layer.energy.w.grad
    assert grad is not None and grad.device.type == device and grad.dtype == dtype
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    with torch.no_grad():  # the search lowered the energy from its start mu0 = 0, per element
        e_out = layer.energy(x, out.detach()[:, None, :])[:, 0]
        e_start = layer.energy(x, torch.zeros_like(out)[:, None, :])[:, 0]
    assert bool((e_out < e_start).all()), (e_out, e_start)


def test_the_guard_catches_a_host_read() -> None:
    """The CPU emulation (with Adam's step counter let through) still fails on a sync."""
    problem, x, y = _mlp_problem("cpu", torch.float64)
    solver = make_solver("sgd", problem)
    with pytest.raises(HostSyncError), _guard("cpu"):
        info = solver.step(x, y)
        float(info.loss)


@pytest.mark.parametrize("where", ["emsa-torch-lbfgs", "phb-ode", "novas-check_every",
                                   "neural_ode-integrate"])
def test_the_documented_host_decisions_are_real(where: str) -> None:
    """The host reads docs/device_audit.md keeps are there (update the audit if one goes)."""
    problem, x, y = _mlp_problem("cpu", torch.float64)
    if where == "emsa-torch-lbfgs":
        solver = make_solver("emsa", problem, inner="torch-lbfgs", inner_iters=2)
        run = lambda: solver.step(x, y)  # noqa: E731
    elif where == "phb-ode":
        solver = make_solver("phb", problem, integrator="ode")
        run = lambda: solver.step(x, y)  # noqa: E731
    elif where == "novas-check_every":
        layer = NOVAS(_Energy(), 2, tol=1e-4, check_every=2, fused=False).double()
        run = lambda: layer(x[:, :2])  # noqa: E731
    else:
        model = NeuralODE(AntisymmetricField(4), TimeMesh.uniform(1.0, 2), in_features=3,
                          out_features=3, dtype=torch.float64)
        run = lambda: model.integrate(x, "rk4", options={"step_size": 0.25})  # noqa: E731
    with pytest.raises(HostSyncError), _guard("cpu"):
        run()
