"""NeuralODE: Euler order, refinement invariance, torchdiffeq evaluation, regulariser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ocnet.bridge import flatten_controls, objective_gradient, objective_hessian
from ocnet.dynamics import TimeMesh
from ocnet.neural_ode.model import LinearField, NeuralODE, make_field
from ocnet.neural_ode.regularizer import DG0Regularizer
from ocnet.ocp.errors import ConfigError, ShapeError
from ocnet.solvers.gradient import GradientSolver

D = torch.float64


def _coarse(seed: int = 0, n: int = 4, T: float = 2.0, kind: str = "activation") -> NeuralODE:  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    field = make_field(kind, 3, "tanh", scale=3.0)
    return NeuralODE(field, TimeMesh.uniform(T, n), in_features=2, out_features=2,
                     generator=g, dtype=D)


def _uniformly(model: NeuralODE, times: int) -> NeuralODE:
    for _ in range(times):
        model = model.refine(list(range(len(model.mesh))))
    return model


def _slope(h: list[float], e: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(e), 1)[0])


def test_explicit_euler_is_first_order_against_torchdiffeq():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    base = _coarse()
    hs, errs = [], []
    for k in range(1, 7):  # N = 8 .. 256, theta(t) fixed
        model = _uniformly(base, k)
        ref = model.integrate(x, "dopri5", rtol=1e-10, atol=1e-12, return_states=True)[-1]
        err = torch.linalg.vector_norm(model.states(x)[-1] - ref)
        hs.append(model.mesh.lengths[0])
        errs.append(float(err))
    slope = _slope(hs, errs)
    assert abs(slope - 1.0) <= 0.15, (slope, errs)
    # the reference is the ODE, not another Euler net: a fine rk4 agrees with dopri5
    rk4 = base.integrate(x, "rk4", options={"step_size": 1e-3})
    assert torch.allclose(rk4, base.integrate(x, "dopri5", rtol=1e-10, atol=1e-12), atol=1e-9)


def test_refinement_keeps_theta_exactly_and_changes_output_by_h_squared():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=D)
    base = _coarse()
    ts = torch.linspace(0, base.mesh.T, 997).tolist()
    hs, changes = [], []
    for k in range(1, 7):
        model = _uniformly(base, k)
        target = next(m for m, t in enumerate(model.mesh.nodes) if t >= 0.3 * model.mesh.T)
        finer = model.refine([target])
        assert len(finer.mesh) == len(model.mesh) + 1
        for a, b in zip(model.theta(ts), finer.theta(ts), strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        for a, b in zip(model.head_controls, finer.head_controls, strict=True):
            assert torch.equal(a, b)
        hs.append(model.mesh.lengths[target])
        changes.append(float(torch.linalg.vector_norm(finer(x) - model(x))))
    slope = _slope(hs, changes)
    assert abs(slope - 2.0) <= 0.15, (slope, changes)


def test_integrate_agrees_with_euler_on_a_fine_mesh_and_linear_exact_solution():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D)  # noqa: N806
    B = torch.tensor([[0.0], [1.0]], dtype=D)  # noqa: N806
    c = torch.tensor([0.7], dtype=D)
    model = NeuralODE(LinearField(A, B), TimeMesh.uniform(1.0, 2), lift="none", head="none",
                      controls=[(c,), (c,)])
    x = torch.tensor([[1.0, 0.0]], dtype=D)
    # x' = Ax + B c with rotation A: x(t) = R(t)(x0 - x*) + x*, x* = -A^{-1} B c
    xs = -torch.linalg.solve(A, B @ c)
    rot = torch.tensor([[math.cos(1.0), math.sin(1.0)], [-math.sin(1.0), math.cos(1.0)]], dtype=D)
    exact = (x[0] - xs) @ rot.T + xs
    assert torch.allclose(model.integrate(x)[0], exact, atol=1e-8)


def test_costate_gradients_with_jump_coupling_equal_autograd_and_objective_is_exact():
    g = torch.Generator().manual_seed(3)
    reg = DG0Regularizer(0.3, alpha=1.0, beta=2.0)
    model = NeuralODE(make_field("antisymmetric", 4), TimeMesh([0.3, 0.5, 0.2, 0.4]),
                      in_features=2, out_features=3, lift="dense", reg=reg, weight_decay=0.01,
                      generator=g, dtype=D)
    p = model.problem()
    x = torch.randn(10, 2, generator=g, dtype=D)
    y = torch.randint(0, 3, (10,), generator=g)
    J, grads, _ = p.value_and_gradients(x, y)  # noqa: N806
    assert torch.allclose(J, p.objective(x, y), atol=1e-13)
    assert torch.allclose(flatten_controls(grads), objective_gradient(p, x, y), atol=1e-12)
    # R_h in closed form by hand
    h = model.mesh.lengths
    th = model.controls
    r = sum(0.15 * h[m] * sum((u * u).sum() for u in th[m]) for m in range(4))
    r += sum(0.6 / (h[m] + h[m + 1]) * sum(((a - b) ** 2).sum()
             for a, b in zip(th[m + 1], th[m], strict=True)) for m in range(3))
    assert torch.allclose(reg.value(th, model.mesh), r, atol=1e-13)


def test_jump_coupling_hessian_is_exact_through_objective():
    g = torch.Generator().manual_seed(4)
    A = torch.tensor([[-0.2, 1.0], [-1.0, -0.2]], dtype=D)  # noqa: N806
    B = torch.tensor([[0.0], [1.0]], dtype=D)  # noqa: N806
    reg = DG0Regularizer(0.5, alpha=1.0, beta=1.0)
    model = NeuralODE(LinearField(A, B), TimeMesh.uniform(1.0, 3), lift="none", head="none",
                      reg=reg, controls=[(torch.randn(1, generator=g, dtype=D),)
                                         for _ in range(3)])
    x = torch.randn(4, 2, generator=g, dtype=D)
    y = torch.randn(4, 2, generator=g, dtype=D)
    hess = objective_hessian(model.problem("mse"), x, y)
    plain = NeuralODE(LinearField(A, B), model.mesh, lift="none", head="none",
                      reg=DG0Regularizer(0.5, alpha=1.0, beta=0.0), controls=model.controls)
    hess0 = objective_hessian(plain.problem("mse"), x, y)
    # the coupling's Hessian is the jump Laplacian 2 w (tridiagonal), w = lam beta/(2h) = 0.75
    w = 0.5 / (2 / 3)
    lap = 2 * torch.tensor([[w, -w, 0], [-w, 2 * w, -w], [0, -w, w]], dtype=D)
    assert torch.allclose(hess - hess0, lap, atol=1e-12)


def test_regulariser_converges_to_the_continuous_integral():
    # theta(t) = (sin t, cos 2t): int_0^2 |theta|^2 + |theta'|^2 in closed form
    def exact(T: float) -> float:  # noqa: N803
        s2 = T / 2 - math.sin(2 * T) / 4
        c2 = T / 2 + math.sin(4 * T) / 8
        c1 = T / 2 + math.sin(2 * T) / 4
        s4 = T / 2 - math.sin(4 * T) / 8
        return s2 + c2 + c1 + 4 * s4

    reg = DG0Regularizer(2.0)  # lam/2 = 1
    errs, hs = [], []
    for n in (16, 32, 64, 128):
        mesh = TimeMesh.uniform(2.0, n)
        mids = [t + h / 2 for t, h in zip(mesh.nodes, mesh.lengths, strict=False)]
        th = [(torch.tensor([math.sin(t), math.cos(2 * t)], dtype=D),) for t in mids]
        errs.append(abs(float(reg.value(th, mesh)) - exact(2.0)))
        hs.append(mesh.lengths[0])
    assert errs[-1] < 1e-2 * exact(2.0)
    assert _slope(hs, errs) > 0.9  # consistent: the error goes to zero at least like h


def test_problem_trains_with_a_generic_solver():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    model = NeuralODE(make_field("activation", 4), TimeMesh.uniform(1.0, 4), in_features=2,
                      out_features=2, generator=g, dtype=D, reg=DG0Regularizer(1e-3))
    x = torch.randn(64, 2, generator=g, dtype=D)
    y = (x[:, 0] * x[:, 1] > 0).long()
    p = model.problem("cross_entropy")
    solver = GradientSolver(p, "adam", lr=0.05)
    first = float(solver.step(x, y).loss)
    for _ in range(100):
        last = float(solver.step(x, y).loss)
    assert last < 0.8 * first
    assert torch.equal(model.controls[0][0], p.stages[1].controls[0])  # live tensors


def test_errors_name_cause_and_fix():
    f = make_field("activation", 2)
    with pytest.raises(ShapeError, match="widen the field"):
        NeuralODE(f, TimeMesh.uniform(1.0, 2), in_features=3, out_features=2)
    with pytest.raises(ConfigError, match="out_features"):
        NeuralODE(f, TimeMesh.uniform(1.0, 2))
    with pytest.raises(ConfigError, match="valid lifts"):
        NeuralODE(f, TimeMesh.uniform(1.0, 2), lift="conv", out_features=2)
    with pytest.raises(ConfigError, match="valid fields"):
        make_field("spiral", 2)
    with pytest.raises(ConfigError, match="lam must be >= 0"):
        DG0Regularizer(-1.0)
