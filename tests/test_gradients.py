"""Costate gradients against independent references, in float64, on every device.

For each problem, ``Problem.gradients`` (the discrete Pontryagin sweep, dJ/du_t = -dH_t/du)
is compared with

* ``ocnet.bridge.objective_gradient`` (autograd through ``Problem.objective``),
* a plain rollout written here from ``stage.f``/``stage.cost``/``terminal_cost`` only, whose
  ``J.backward()`` also gives dJ/dx_t on the intermediate states (``retain_grad``),
* for networks converted by ``to_problem``: ``loss.backward()`` on the ``nn.Module`` itself,

all to 1e-10 relative (normwise, per stage and overall). The costates are checked against
the sign convention ``p_t = -dJ/dx_t`` and the Hamiltonian against ``dH_t/du = -dJ/du_t``.
A central finite-difference check closes the loop without autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import no_host_sync
from torch import Tensor, nn

from ocnet.bridge import flatten_controls, objective_gradient, place, to_problem
from ocnet.dynamics import (
    ActivationField,
    AntisymmetricField,
    Conv2d,
    Dense,
    Flatten,
    LinearQuadratic,
    Residual,
    TimeMesh,
    ZeroPad,
    euler_stages,
)
from ocnet.models import build_model
from ocnet.ocp import Problem

DT = torch.float64
TOL = 1e-10


@dataclass
class Case:
    problem: Problem
    x0: Tensor
    y: Tensor | None
    module: nn.Module | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    weight_decay: float = 0.0


def _labels(n: int, k: int) -> Tensor:
    return torch.randint(0, k, (n,))


def _module_case(module: nn.Module, x0: Tensor, y: Tensor, device: str, wd: float = 0.0) -> Case:
    problem = to_problem(module, "cross_entropy", weight_decay=wd)
    place(problem, device=device, dtype=DT)  # float32 module -> float64 on the device
    return Case(problem, x0.to(device, DT), y.to(device), module, nn.CrossEntropyLoss(), wd)


def _stage_case(stages: list, terminal: Callable, x0: Tensor, y: Tensor | None,
                device: str) -> Case:
    problem = place(Problem(stages, terminal), device=device, dtype=DT)
    return Case(problem, x0.to(device, DT), None if y is None else y.to(device))


def mlp(device: str, wd: float = 0.0) -> Case:
    module = nn.Sequential(
        nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(),
        nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3),
    )
    return _module_case(module, torch.randn(16, 5), _labels(16, 3), device, wd)


def resnet_model(device: str) -> Case:
    module = build_model("resnet", 3, 3, width=6, depth=4, h=0.5)  # PadFeatures lift
    return _module_case(module, torch.randn(16, 3), _labels(16, 3), device, 1e-3)


def resnet_stages(device: str) -> Case:
    g = torch.Generator().manual_seed(1)
    stages = [Dense.create(3, 6, "tanh", generator=g, dtype=DT)]
    stages += [Residual.create(6, h=0.3, activation_name=a, generator=g, dtype=DT)
               for a in ("tanh", "relu", "tanh", "softplus")]
    stages.append(Dense.create(6, 3, "identity", generator=g, dtype=DT))
    return _stage_case(stages, F.cross_entropy, torch.randn(16, 3), _labels(16, 3), device)


def cnn_model(device: str) -> Case:
    # ocnet.models' cnn takes flat digits rows (B, 64) and unflattens them to (B, 1, 8, 8).
    module = build_model("cnn", 64, 10, image_shape=(1, 8, 8), width=3)
    return _module_case(module, torch.randn(8, 64), _labels(8, 10), device)


def cnn_sequential(device: str) -> Case:
    module = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )
    return _module_case(module, torch.randn(8, 1, 8, 8), _labels(8, 10), device, 1e-2)


def cnn_stages(device: str) -> Case:
    g = torch.Generator().manual_seed(2)
    stages = [
        Conv2d.create(1, 3, 3, "tanh", generator=g, dtype=DT),
        Conv2d.create(3, 4, 3, "relu", stride=2, generator=g, dtype=DT),
        Flatten(),
        Dense.create(4 * 4 * 4, 10, "identity", generator=g, dtype=DT),
    ]
    return _stage_case(stages, F.cross_entropy, torch.randn(8, 1, 8, 8), _labels(8, 10), device)


def _rate(x: Tensor, u: tuple[Tensor, ...]) -> Tensor:
    """A state- and control-dependent running cost rate."""
    return 0.5 * (x * x).sum(-1).mean() + 1e-2 * sum((v * v).sum() for v in u)


def neural_ode(device: str) -> Case:
    g = torch.Generator().manual_seed(3)
    mesh_a = TimeMesh.from_nodes([0.0, 0.1, 0.35, 0.4, 0.9, 1.0])  # uneven intervals
    mesh_b = TimeMesh([0.05, 0.3, 0.15], t0=1.0)
    stages = [ZeroPad(2, 4)]
    stages += euler_stages(ActivationField(4, "tanh"), mesh_a, generator=g, dtype=DT,
                           running_cost=_rate)
    stages += euler_stages(AntisymmetricField(4, "tanh", gamma=0.1, scale=2.0), mesh_b,
                           generator=g, dtype=DT, running_cost=_rate)
    stages.append(Dense.create(4, 2, "identity", generator=g, dtype=DT))
    return _stage_case(stages, F.cross_entropy, torch.randn(16, 2), _labels(16, 2), device)


def _spd(n: int) -> Tensor:
    a = torch.randn(n, n, dtype=DT)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=DT)


def lq(device: str, T: int = 6) -> Case:  # noqa: N803
    n, m = 3, 2
    A = torch.eye(n, dtype=DT) + 0.3 * torch.randn(n, n, dtype=DT)  # noqa: N806
    B = torch.randn(n, m, dtype=DT)  # noqa: N806
    Q, R, P = _spd(n), _spd(m), _spd(n)  # noqa: N806
    S = 0.2 * torch.randn(n, m, dtype=DT)  # noqa: N806
    stages = [LinearQuadratic(A, B, torch.randn(m, dtype=DT), Q, R, S) for _ in range(T)]
    P = P.to(device)  # noqa: N806

    def terminal(x: Tensor, y: Tensor) -> Tensor:
        d = x - y
        return 0.5 * ((d @ P) * d).sum(-1).mean()

    return _stage_case(stages, terminal, torch.randn(10, n), torch.randn(10, n), device)


CASES: dict[str, Callable[[str], Case]] = {
    "mlp tanh+relu": mlp,
    "mlp tanh+relu, weight decay": lambda d: mlp(d, wd=1e-2),
    "resnet (models)": resnet_model,
    "resnet (Residual stages)": resnet_stages,
    "cnn (models, digits rows)": cnn_model,
    "cnn (Sequential, B x 1 x 8 x 8)": cnn_sequential,
    "cnn (Conv2d/Flatten/Dense stages)": cnn_stages,
    "neural ODE (uneven mesh, running cost)": neural_ode,
    "linear-quadratic (Q, R, S, terminal P)": lq,
}
MODULE_CASES = [k for k in CASES if "stages" not in k and "ODE" not in k and "linear" not in k]


# ---------------------------------------------------------------------------- references
def plain_rollout(problem: Problem, x0: Tensor, y: Tensor | None
                  ) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, ...]]]:
    """J by a loop over ``stage.f``/``stage.cost`` (no Problem method), then ``J.backward()``.

    Returns J, the states x_0..x_T (their ``.grad`` is dJ/dx_t) and leaf copies of the
    controls (their ``.grad`` is dJ/du_t).
    """
    us = [tuple(v.detach().clone().requires_grad_(True) for v in s.controls)
          for s in problem.stages]
    x = x0.detach().clone().requires_grad_(True)
    xs, total = [x], 0.0
    for stage, u in zip(problem.stages, us, strict=True):
        c = stage.cost(x, u)
        if c is not None:
            total = total + c
        x = stage.f(x, u)
        x.retain_grad()
        xs.append(x)
    J = problem.terminal_cost(x, y) + total  # noqa: N806
    J.backward()
    return J.detach(), xs, us


def module_backward(case: Case) -> tuple[Tensor, dict[int, Tensor]]:
    """loss.backward() on the nn.Module itself: the gradient of every trainable parameter."""
    module = case.module
    module.zero_grad(set_to_none=True)
    loss = case.loss(module(case.x0), case.y)
    params = [p for p in module.parameters() if p.requires_grad]
    if case.weight_decay:
        loss = loss + 0.5 * case.weight_decay * sum((p * p).sum() for p in params)
    loss.backward()
    return loss.detach(), {id(p): p.grad.detach().clone() for p in params}


def rel(a: Tensor, b: Tensor) -> float:
    """Normwise relative error of ``a`` against the reference ``b``."""
    scale = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    return float(diff / scale) if scale > 0 else float(diff)


def per_stage_max_rel(got: list[tuple[Tensor, ...]], ref: list[tuple[Tensor, ...]]) -> float:
    errs = [rel(a, b) for ga, gb in zip(got, ref, strict=True)
            for a, b in zip(ga, gb, strict=True)]
    return max(errs) if errs else 0.0


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_autograd(name, device, record_error):
    case = CASES[name](device)
    problem, x0, y = case.problem, case.x0, case.y
    assert problem.dtype == DT and problem.device.type == device
    J, grads, _ = problem.value_and_gradients(x0, y)
    assert all(g.device.type == device and g.dtype == DT for gs in grads for g in gs)
    flat = flatten_controls(grads)

    # 1. autograd through Problem.objective (ocnet.bridge.objective_gradient)
    e_bridge = rel(flat, objective_gradient(problem, x0, y))
    # 2. plain rollout + J.backward(), independent of every Problem method
    J_plain, _, us = plain_rollout(problem, x0, y)  # noqa: N806
    e_plain = per_stage_max_rel(grads, [tuple(v.grad for v in u) for u in us])
    e_J = rel(J, J_plain)
    record_error(f"{name}: vs objective_gradient", e_bridge)
    record_error(f"{name}: vs plain backward (per stage)", e_plain)
    assert e_bridge < TOL, e_bridge
    assert e_plain < TOL, e_plain
    assert e_J < 1e-13

    # 3. loss.backward() on the module itself (the controls are its parameters)
    if case.module is not None:
        loss, by_param = module_backward(case)
        ref = [tuple(by_param[id(u)] for u in s.controls) for s in problem.stages]
        assert sum(len(r) for r in ref) == len(by_param)  # every trainable parameter is a control
        e_mod = per_stage_max_rel(grads, ref)
        record_error(f"{name}: vs module loss.backward() (per stage)", e_mod)
        assert e_mod < TOL, e_mod
        assert rel(J, loss) < 1e-13


@pytest.mark.parametrize("name", list(CASES))
def test_sweep_does_not_sync_with_the_host(name, device):
    """value_and_gradients never reads a tensor on the host (CPU: emulated; CUDA: real)."""
    case = CASES[name](device)
    case.problem.value_and_gradients(case.x0, case.y)  # warm-up
    with no_host_sync(device, emulate_on_cpu=True):
        J, grads, traj = case.problem.value_and_gradients(case.x0, case.y, keep_costates=True)  # noqa: N806
        case.problem.costates(case.problem.rollout(case.x0), case.y)
    assert torch.isfinite(J)


@pytest.mark.parametrize("name", list(CASES))
def test_costates_are_minus_dJ_dx(name, device, record_error):
    """Sign convention: p_t = -dJ/dx_t for t = 0..T (p_T = -dPhi/dx_T)."""
    case = CASES[name](device)
    problem, x0, y = case.problem, case.x0, case.y
    traj = problem.costates(problem.rollout(x0), y)
    J_plain, xs, _ = plain_rollout(problem, x0, y)  # noqa: N806
    assert len(traj.ps) == problem.T + 1
    errs = [rel(p, -x.grad) for p, x in zip(traj.ps, xs, strict=True)]
    record_error(f"{name}: costates p_t vs -dJ/dx_t", max(errs))
    assert max(errs) < TOL, errs
    assert rel(traj.objective, J_plain) < 1e-13

    # costates(rollout(x0), y) equals value_and_gradients(..., keep_costates=True)
    J, _, traj2 = problem.value_and_gradients(x0, y, keep_costates=True)  # noqa: N806
    assert len(traj2.ps) == problem.T + 1
    for p, q in zip(traj.ps, traj2.ps, strict=True):
        assert rel(q, p) < 1e-13
    for a, b in zip(traj.xs, traj2.xs, strict=True):
        assert torch.equal(a, b)
    assert rel(J, traj.objective) < 1e-13
    # without keep_costates no costates are returned
    assert problem.value_and_gradients(x0, y)[2].ps is None


@pytest.mark.parametrize("name", list(CASES))
def test_hamiltonian_consistency(name, device, record_error):
    """dH_t/du (x_t, p_{t+1}, u_t) = -dJ/du_t and dH_t/dx = p_t, with autograd on H only."""
    case = CASES[name](device)
    problem, x0, y = case.problem, case.x0, case.y
    traj = problem.costates(problem.rollout(x0), y)
    _, _, us = plain_rollout(problem, x0, y)
    errs_u, errs_x = [], []
    for t, stage in enumerate(problem.stages):
        x = traj.xs[t].detach().clone().requires_grad_(True)
        u = tuple(v.detach().clone().requires_grad_(True) for v in stage.controls)
        H = problem.hamiltonian(t, x, traj.ps[t + 1], u)  # noqa: N806
        assert H.dim() == 0
        dH = torch.autograd.grad(H, (x, *u))  # noqa: N806
        errs_x.append(rel(dH[0], traj.ps[t]))
        errs_u += [rel(a, -v.grad) for a, v in zip(dH[1:], us[t], strict=True)]
    record_error(f"{name}: dH/du vs -dJ/du", max(errs_u))
    assert max(errs_u) < TOL, errs_u
    assert max(errs_x) < TOL, errs_x


def _finite_differences(problem: Problem, x0: Tensor, y: Tensor | None, eps: float) -> Tensor:
    """Central differences of J in every scalar control (no autograd)."""
    out = []
    with torch.no_grad():
        for u in problem.parameters():
            flat = u.view(-1)
            for i in range(flat.numel()):
                old = flat[i].clone()
                flat[i] = old + eps
                jp = problem.objective(x0, y)
                flat[i] = old - eps
                jm = problem.objective(x0, y)
                flat[i] = old
                out.append((jp - jm) / (2 * eps))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["lq", "mlp"])
def test_gradients_match_finite_differences(name, device, record_error):
    if name == "lq":
        case = lq(device, T=4)
    else:
        module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(),
                               nn.Linear(4, 2))
        case = _module_case(module, torch.randn(6, 3), _labels(6, 2), device, wd=1e-2)
    problem, x0, y = case.problem, case.x0, case.y
    before = flatten_controls(problem.controls).clone()
    fd = _finite_differences(problem, x0, y, eps=1e-6)
    assert torch.equal(flatten_controls(problem.controls), before)  # controls restored
    g = flatten_controls(problem.gradients(x0, y))
    err = rel(g, fd)
    record_error(f"finite differences ({name})", err)
    assert err < 1e-7, err
