"""Vanilla DDP: exact on LQR (against a Riccati recursion), fast path = dense reference,
NaN steps rejected."""

from __future__ import annotations

import pytest
import torch
from ddp_reference import reference_backward
from torch import nn

from ocnet.bridge import to_problem
from ocnet.dynamics import (
    ActivationField,
    Conv2d,
    Dense,
    Flatten,
    LinearQuadratic,
    Residual,
    TimeMesh,
    euler_stages,
)
from ocnet.models import build_model
from ocnet.ocp import FunctionStage, Problem
from ocnet.solvers.base import make_solver
from ocnet.solvers.ddp import DDP

DT = torch.float64


def _random_lq(seed: int, n: int = 4, m: int = 2, T: int = 12):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    As, Bs, Qs, Rs, Ss, stages = [], [], [], [], [], []
    for _ in range(T):
        A = torch.randn(n, n, generator=g, dtype=DT)  # noqa: N806
        A = 0.9 * A / torch.linalg.eigvals(A).abs().max()  # noqa: N806  (stable: rho = 0.9)
        B = torch.randn(n, m, generator=g, dtype=DT)  # noqa: N806
        M = torch.randn(n, n, generator=g, dtype=DT)  # noqa: N806
        Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)  # noqa: N806
        N = torch.randn(m, m, generator=g, dtype=DT)  # noqa: N806
        R = N @ N.T / m + 0.5 * torch.eye(m, dtype=DT)  # noqa: N806
        S = 0.05 * torch.randn(n, m, generator=g, dtype=DT)  # noqa: N806
        u = torch.randn(m, generator=g, dtype=DT)  # arbitrary initial controls
        As.append(A), Bs.append(B), Qs.append(Q), Rs.append(R), Ss.append(S)
        stages.append(LinearQuadratic(A, B, u, Q, R, S))
    M = torch.randn(n, n, generator=g, dtype=DT)  # noqa: N806
    QT = M @ M.T / n + torch.eye(n, dtype=DT)  # noqa: N806

    def terminal(x, y):
        return 0.5 * ((x @ QT) * x).sum(-1).mean()

    x0 = torch.randn(1, n, generator=g, dtype=DT)
    return Problem(stages, terminal), (As, Bs, Qs, Rs, Ss, QT), x0


def _riccati(As, Bs, Qs, Rs, Ss, QT, x0):  # noqa: N803
    """Finite-horizon LQR: optimal controls from x0 and the optimal cost x0' P_0 x0 / 2."""
    P = QT  # noqa: N806
    gains = []
    for A, B, Q, R, S in reversed(list(zip(As, Bs, Qs, Rs, Ss, strict=True))):  # noqa: N806
        Quu = R + B.T @ P @ B  # noqa: N806
        Qux = S.T + B.T @ P @ A  # noqa: N806
        K = -torch.linalg.solve(Quu, Qux)  # noqa: N806
        P = Q + A.T @ P @ A + Qux.T @ K  # noqa: N806
        P = 0.5 * (P + P.T)  # noqa: N806
        gains.append(K)
    gains.reverse()
    x = x0[0]
    us = []
    for A, B, K in zip(As, Bs, gains, strict=True):  # noqa: N806
        u = K @ x
        us.append(u)
        x = A @ x + B @ u
    return us, 0.5 * x0[0] @ P @ x0[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_one_ddp_iteration_solves_lqr(seed):
    problem, mats, x0 = _random_lq(seed)
    assert problem.T >= 10
    u_opt, j_opt = _riccati(*mats, x0)
    j_start = problem.objective(x0).detach()
    solver = DDP(problem, mu=0.0, eps_v=0.0)
    info = solver.step(x0)
    assert bool(info.accepted)
    for stage, u in zip(problem.stages, u_opt, strict=True):
        torch.testing.assert_close(stage.controls[0], u, rtol=0, atol=1e-8)
    j = problem.objective(x0).detach()
    assert abs(float(j) - float(j_opt)) < 1e-8
    assert float(j_start) > float(j_opt) + 1e-3  # the initial controls were not optimal


def _mlp_problem(seed: int, wd: float = 1e-3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 3)).to(DT)
    problem = to_problem(net, "cross_entropy", weight_decay=wd)
    g = torch.Generator().manual_seed(seed + 10)
    x0 = torch.randn(3, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3,), generator=g)
    return problem, x0, y


def _resnet_problem(seed: int):
    torch.manual_seed(seed)
    net = build_model("resnet", 3, 2, width=4, depth=2, h=0.5).to(DT)
    problem = to_problem(net, "cross_entropy", weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed + 20)
    x0 = torch.randn(3, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (3,), generator=g)
    return problem, x0, y


def _residual_stage_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    stages = [Residual.create(3, h=0.3, generator=g, dtype=DT) for _ in range(2)]
    stages.append(Dense.create(3, 2, "identity", generator=g, dtype=DT))
    problem = Problem(stages, lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    x0 = torch.randn(2, 3, generator=g, dtype=DT)
    y = torch.randn(2, 2, generator=g, dtype=DT)
    return problem, x0, y


def _conv_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    stages = [Conv2d.create(1, 2, 3, "tanh", padding=1, generator=g, dtype=DT), Flatten(),
              Dense.create(18, 2, "identity", generator=g, dtype=DT)]
    problem = Problem(stages, torch.nn.CrossEntropyLoss())
    x0 = torch.randn(2, 1, 3, 3, generator=g, dtype=DT)
    return problem, x0, torch.tensor([0, 1])


def _euler_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    stages = euler_stages(ActivationField(3), TimeMesh.uniform(1.0, 3), generator=g, dtype=DT)
    problem = Problem(stages, lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    x0 = torch.randn(2, 3, generator=g, dtype=DT)
    return problem, x0, torch.randn(2, 3, generator=g, dtype=DT)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("make", [_mlp_problem, _resnet_problem, _residual_stage_problem,
                                  _conv_problem, _euler_problem])
def test_fast_path_equals_dense_reference(make, second_order):
    problem, x0, y = make(3)
    # mu keeps (Q_uu + mu I) well conditioned: with second-order terms Q_uu is indefinite.
    mu = 0.1
    solver = DDP(problem, mu=mu, eps_v=1e-4, second_order=second_order)
    xs = problem.rollout(x0).xs
    fast = solver.backward_pass(xs, y, mu=mu)
    ref = reference_backward(problem, x0, y, mu=mu, eps_v=1e-4, second_order=second_order)
    assert len(fast) == len(ref) == problem.T
    for t, (a, b) in enumerate(zip(fast, ref, strict=True)):
        for name, va in a.as_dict().items():
            vb = getattr(b, name)
            assert va.shape == vb.shape, (t, name)
            err = float((va - vb).abs().max()) if va.numel() else 0.0
            assert err < 1e-9, f"stage {t} {name}: {err:.2e}"
    # the quantities are not trivially zero
    assert float(fast[-1].Q_uu.abs().max()) > 1e-3 and float(fast[0].K.abs().max()) > 1e-6


def test_ddp_decreases_loss_on_mlp_and_registers():
    problem, x0, y = _mlp_problem(5)
    solver = make_solver("ddp", problem, mu=1e-3)
    j0 = float(problem.objective(x0, y).detach())
    for _ in range(5):
        info = solver.step(x0, y)
        assert torch.isfinite(info.loss)
    assert float(problem.objective(x0, y).detach()) < 0.5 * j0


def _log_problem(target: float):
    u = torch.ones(1, dtype=DT)
    stage = FunctionStage(lambda x, u: x + torch.log(u[0]), [u])
    return Problem([stage], lambda x, y: 0.5 * ((x - target) ** 2).mean())


def test_nan_step_is_rejected_and_retried():
    problem = _log_problem(-10.0)
    x0 = torch.zeros(1, 1, dtype=DT)
    solver = DDP(problem, mu=0.0)
    xs = problem.rollout(x0).xs
    q = solver.backward_pass(xs, None, mu=0.0)
    _, j_try = solver.forward_pass(x0, None, xs, q)
    assert not torch.isfinite(j_try)  # the plain Gauss-Newton step produces a NaN
    info = solver.step(x0)
    assert bool(info.accepted) and info.extra["tries"] > 1
    assert torch.isfinite(problem.stages[0].controls[0]).all()
    assert float(problem.objective(x0).detach()) < 50.0  # J(u=1) = 50

    problem = _log_problem(-10.0)
    solver = DDP(problem, mu=0.0, max_tries=2)
    info = solver.step(x0)
    assert not bool(info.accepted)
    assert float(problem.stages[0].controls[0]) == 1.0  # untouched


def test_singular_q_uu_is_retried_not_raised():
    """Without weight decay a layer's Gauss-Newton Q_uu has rank <= B n_out < m: singular."""
    problem, x0, y = _mlp_problem(6, wd=0.0)
    solver = DDP(problem, mu=0.0)
    j0 = float(problem.objective(x0, y).detach())
    info = solver.step(x0, y)
    assert bool(info.accepted) and info.extra["tries"] > 1 and solver.mu >= solver.mu_min
    assert float(problem.objective(x0, y).detach()) < j0
