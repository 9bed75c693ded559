"""DWR: effectivity against an exact solution, Doerfler marking, the refinement loop, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from ocnet.bridge import flatten_controls, objective_gradient, objective_hessian, unflatten_controls
from ocnet.dynamics import TimeMesh
from ocnet.neural_ode.model import LinearField, NeuralODE, make_field
from ocnet.neural_ode.regularizer import DG0Regularizer
from ocnet.ocp.errors import ConfigError
from ocnet.solvers.dwr import DWR, doerfler, indicators

D = torch.float64
A = torch.tensor([[-0.5, 3.0], [-3.0, -0.5]], dtype=D)
B = torch.tensor([[0.0], [1.0]], dtype=D)
LAM, T = 0.05, 1.0


def _lq_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 2, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)


def _lq_exact(x0: torch.Tensor, y: torch.Tensor) -> float:
    """min 1/2 mean|x_i(T) - y_i|^2 + lam/2 int |theta|^2, x' = Ax + B theta (shared theta).

    theta* = -B^T z / lam, z(t) = e^{A^T (T-t)} g, g = (I + W/lam)^{-1} (e^{AT} mean x0 - mean y),
    W the controllability Gramian (Van Loan's block exponential)."""
    a, b = A.numpy(), B.numpy()
    big = sl.expm(np.block([[-a, b @ b.T], [np.zeros((2, 2)), a.T]]) * T)
    W = big[2:, 2:].T @ big[:2, 2:]  # noqa: N806
    eat = sl.expm(a * T)
    g = np.linalg.solve(np.eye(2) + W / LAM, eat @ x0.numpy().mean(0) - y.numpy().mean(0))
    xT = x0.numpy() @ eat.T - (W @ g / LAM)[None]  # noqa: N806
    return float(0.5 * ((xT - y.numpy()) ** 2).sum(1).mean() + 0.5 * g @ W @ g / LAM)


def newton(problem, x, y):
    """The discrete problem is quadratic in theta: one Newton step is its exact minimiser."""
    H = objective_hessian(problem, x, y)  # noqa: N806
    g = objective_gradient(problem, x, y)
    v = flatten_controls(problem.controls) - torch.linalg.solve(H, g)
    problem.set_controls(unflatten_controls(v, problem.controls))


def _lq_effectivities(n0: int, estimator: str, levels: int, uniform: bool = False):
    x0, y = _lq_data()
    exact = _lq_exact(x0, y)
    model = NeuralODE(LinearField(A, B), TimeMesh.uniform(T, n0), lift="none", head="none",
                      reg=DG0Regularizer(LAM, 1.0, 0.0))
    dwr = DWR(model, "mse", inner=newton, max_layers=10_000, max_levels=levels,
              estimator=estimator,
              strategy="uniform" if uniform else "doerfler")
    hist = dwr.run(x0, y)
    return [lev.estimate / (exact - lev.objective) for lev in hist], hist, dwr


def test_lq_exact_solution_is_the_limit_of_the_discrete_optima():
    _, hist, _ = _lq_effectivities(8, "primal", 3, uniform=True)
    x0, y = _lq_data()
    errs = [abs(_lq_exact(x0, y) - lev.objective) for lev in hist]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 0.9), rates  # first order towards the closed-form optimum


def test_effectivity_full_estimator_adaptive():
    eff, hist, _ = _lq_effectivities(8, "full", 5)
    assert len(hist) >= 6  # >= 5 refinements
    assert all(0.8 <= e <= 1.25 for e in eff), eff
    assert abs(eff[-1] - 1) < abs(eff[0] - 1)


def test_effectivity_primal_estimator_adaptive():
    eff, hist, _ = _lq_effectivities(16, "primal", 5)
    assert len(hist) >= 6
    assert all(0.5 <= e <= 2.0 for e in eff), eff
    assert abs(eff[-1] - 1) < 0.25


def test_primal_indicators_estimate_euler_error_of_a_nonlinear_net():
    # fixed controls: J(ODE) - J(Euler) against a tight torchdiffeq solve
    g = torch.Generator().manual_seed(1)
    base = NeuralODE(make_field("activation", 3, "tanh", scale=3.0), TimeMesh.uniform(2.0, 4),
                     in_features=2, out_features=3, generator=g, dtype=D)
    x = torch.randn(32, 2, generator=g, dtype=D)
    y = torch.randint(0, 3, (32,), generator=g)
    effs = []
    model = base
    for _ in range(5):
        model = model.refine(list(range(len(model.mesh))))
        p = model.problem("cross_entropy")
        true = float(p.terminal(model.integrate(x, rtol=1e-10, atol=1e-12), y) - p.objective(x, y))
        effs.append(float(indicators(model, p, x, y).sum()) / true)
    assert all(0.8 <= e <= 1.25 for e in effs), effs
    assert abs(effs[-1] - 1) < 0.05, effs


def test_doerfler_is_the_smallest_set_reaching_the_fraction():
    rng = np.random.default_rng(0)
    for _ in range(30):
        eta = rng.standard_normal(7) * rng.exponential(1, 7)
        for theta in (0.3, 0.5, 0.9):
            chosen = doerfler(eta.tolist(), theta)
            goal = theta * np.abs(eta).sum()
            assert np.abs(eta[chosen]).sum() >= goal - 1e-12
            smallest = min(k for k in range(1, 8) for s in itertools.combinations(range(7), k)
                           if np.abs(eta[list(s)]).sum() >= goal - 1e-12)
            assert len(chosen) == smallest
    with pytest.raises(ConfigError, match="theta"):
        doerfler([1.0], 0.0)


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 2, generator=g, dtype=D)
    y = (x.norm(dim=1) > 1.1).long()
    model = NeuralODE(make_field("activation", 3), TimeMesh.uniform(3.0, 3), in_features=2,
                      out_features=2, generator=g, dtype=D, reg=DG0Regularizer(1e-3))
    return model, x, y


def test_refinement_loop_bisects_marked_intervals_and_respects_the_budget():
    model, x, y = _toy()
    dwr = DWR(model, inner="adam", lr=0.05, steps=20, max_layers=10, max_levels=10)
    hist = dwr.run(x, y, x, y)
    assert hist[-1].n_layers <= 10 and hist[-1].n_layers == 10
    for a, b, mod in zip(hist[:-1], hist[1:], dwr.models[:-1], strict=True):
        assert a.marked and b.n_layers == a.n_layers + len(a.marked)
        assert b.nodes == pytest.approx(mod.mesh.refine(a.marked)[0].nodes)
        assert len(a.eta) == a.n_layers and a.test_accuracy is not None
    # carried-over controls: refining the trained level-0 model reproduces theta(t) exactly
    ref = dwr.models[0].refine(hist[0].marked)
    ts = torch.linspace(0, 3.0, 301).tolist()
    for u, v in zip(dwr.models[0].theta(ts), ref.theta(ts), strict=True):
        assert torch.equal(u[0], v[0])


def test_uniform_mode_doubles_and_tolerance_stops():
    model, x, y = _toy(1)
    hist = DWR(model, inner="adam", lr=0.05, steps=5, strategy="uniform", max_layers=24,
               max_levels=5).run(x, y)
    assert [h.n_layers for h in hist] == [3, 6, 12, 24]
    model, x, y = _toy(1)
    adaptive = DWR(model, inner="adam", lr=0.05, steps=5, max_levels=3).run(x, y)
    model, x, y = _toy(1)
    rand = DWR(model, inner="adam", lr=0.05, steps=5, max_levels=3, strategy="random").run(x, y)
    assert [h.n_layers for h in rand][:2] == [h.n_layers for h in adaptive][:2]
    model, x, y = _toy(1)
    hist = DWR(model, inner="adam", lr=0.05, steps=5, tol=1e9, max_levels=5).run(x, y)
    assert len(hist) == 1
    with pytest.raises(ConfigError, match="max_layers"):
        DWR(model, max_layers=2)


def test_adapt_command_writes_history_and_plots(tmp_path):
    from click.testing import CliRunner

    from ocnet.adapt import adapt

    res = CliRunner().invoke(adapt, ["--data", "donut", "--n-train", "100", "--n-test", "100",
                                     "--steps", "5", "--max-layers", "8", "--n0", "2",
                                     "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["adaptive"][0]["n_layers"] == 2 and hist["uniform"][-1]["n_layers"] == 8
    for name in ("mesh.png", "accuracy.png", "trajectories.png"):
        assert (tmp_path / name).stat().st_size > 1000


# ---------------------------------------------------------------- SensLI sensitivity arm
def _split_multipliers_by_autograd(model, loss, x, y):
    """mu_m = (g_{m,1} - g_{m,2}) / 2 on the everywhere-bisected mesh, by plain autograd
    through Problem.objective (independent of the costate sweep)."""
    fine = model.refine(list(range(len(model.mesh))))
    p = fine.problem(loss)
    flat = [u for c in fine.controls for u in c]
    for u in flat:
        u.requires_grad_(True)
    g = torch.autograd.grad(p.objective(x, y), flat)
    k = len(fine.controls[0])
    per = [g[i * k:(i + 1) * k] for i in range(len(fine.controls))]
    for u in flat:
        u.requires_grad_(False)
    return fine, p, [tuple(0.5 * (a - b) for a, b in zip(per[2 * m], per[2 * m + 1], strict=True))
                     for m in range(len(model.mesh))]


def test_sensitivity_is_the_split_multiplier_in_closed_form():
    # x' = Ax + B theta, Phi = 1/2 mean_i |x_i(T) - y_i|^2, lam alpha term (cancels in mu):
    # on the bisected mesh g_{m,k} = h/2 B^T sum_i z_i(node after child k), so
    # mu_m = h^2/8 B^T A^T sum_i z_i(t_{m+1}),  z at the fine nodes by the Euler adjoint.
    from ocnet.solvers.dwr import sensitivities

    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(6, 2, generator=g, dtype=D), torch.randn(6, 2, generator=g, dtype=D)
    lengths = [0.3, 0.1, 0.25, 0.35]
    ctrl = [(torch.randn(1, generator=g, dtype=D),) for _ in lengths]
    model = NeuralODE(LinearField(A, B), TimeMesh(lengths), lift="none", head="none",
                      reg=DG0Regularizer(LAM, 1.0, 0.0), controls=ctrl)

    def loss(out, target):
        return 0.5 * ((out - target) ** 2).sum(1).mean()

    s = sensitivities(model, loss, x0, y)
    a, b = A.numpy(), B.numpy()
    hs = [h / 2 for h in lengths for _ in range(2)]
    us = [float(c[0]) for c in ctrl for _ in range(2)]
    xs = [x0.numpy()]
    for h, u in zip(hs, us, strict=True):
        xs.append(xs[-1] @ (np.eye(2) + h * a).T + h * u * b.T)
    z = [(xs[-1] - y.numpy()) / len(x0)]  # dPhi/dx_T per sample
    for h in reversed(hs):
        z.append(z[-1] @ (np.eye(2) + h * a))
    z = z[::-1]  # z[k] at fine node k
    want = [float(np.sum((h ** 2 / 8 * b.T @ a.T @ z[2 * m + 2].sum(0)) ** 2))
            for m, h in enumerate(lengths)]
    assert s.tolist() == pytest.approx(want, rel=1e-10, abs=1e-16)
    assert min(want) > 0 and len(set(np.argsort(want))) == 4


def test_sensitivity_agrees_with_autograd_and_finite_differences_of_the_split():
    from ocnet.solvers.dwr import sensitivities

    g = torch.Generator().manual_seed(5)
    model = NeuralODE(make_field("activation", 3, "tanh", scale=2.0), TimeMesh([0.4, 0.8, 0.3,
                      0.5]), in_features=2, out_features=3, generator=g, dtype=D,
                      reg=DG0Regularizer(1e-2))  # beta > 0: the jump coupling is in J
    x = torch.randn(40, 2, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    s = sensitivities(model, "cross_entropy", x, y)
    fine, p, mus = _split_multipliers_by_autograd(model, "cross_entropy", x, y)
    assert s.tolist() == pytest.approx([float(sum(v.pow(2).sum() for v in mu)) for mu in mus],
                                       rel=1e-9)
    eps = 1e-5
    for m, mu in enumerate(mus):
        norm = float(sum(v.pow(2).sum() for v in mu)) ** 0.5
        d = [v / norm for v in mu]

        def j_split(e, m=m, d=d):
            ctrl = [tuple(u.clone() for u in c) for c in fine.controls]
            ctrl[2 * m] = tuple(u - e * v for u, v in zip(ctrl[2 * m], d, strict=True))
            ctrl[2 * m + 1] = tuple(u + e * v for u, v in zip(ctrl[2 * m + 1], d, strict=True))
            return float(fine.with_mesh(fine.mesh, ctrl).problem("cross_entropy").objective(x, y))

        slope = (j_split(eps) - j_split(-eps)) / (2 * eps)  # dJ/d delta along d = -2 |mu|
        assert slope == pytest.approx(-2 * norm, rel=1e-6, abs=1e-10), m


def test_sensitivity_strategy_marks_as_many_as_doerfler_at_the_largest_sensitivities():
    model, x, y = _toy(2)
    dwr = DWR(model, inner="adam", lr=0.05, steps=10, strategy="sensitivity", max_layers=9,
              max_levels=4)
    hist = dwr.run(x, y)
    assert len(hist) >= 3 and hist[-1].n_layers <= 9
    for lev in hist[:-1]:
        k = len(doerfler(lev.eta, 0.5))
        room = 9 - lev.n_layers
        top = sorted(np.argsort(-np.array(lev.sensitivity), kind="stable")[:min(k, room)].tolist())
        assert lev.marked == top and len(lev.sensitivity) == lev.n_layers
    model, x, y = _toy(2)  # same level-0 training: the same eta, so the same count as adaptive
    ad = DWR(model, inner="adam", lr=0.05, steps=10, max_layers=9, max_levels=1).run(x, y)
    assert len(ad[0].marked) == len(hist[0].marked)
    with pytest.raises(ConfigError, match="sensitivity"):
        DWR(model, strategy="sensitive")
    with pytest.raises(ConfigError, match="scores"):
        DWR(model, strategy="sensitivity").mark(torch.ones(len(model.mesh)))


def test_adapt_runs_the_sensitivity_arm_and_rejects_unknown_arms():
    from ocnet.adapt import run_adapt

    res = run_adapt("donut", n0=2, max_layers=4, steps=3, n_train=60, n_test=60,
                    arms=("adaptive", "sensitivity"))
    assert res["sensitivity"].history[0].sensitivity
    assert res["sensitivity"].history[-1].n_layers <= 4
    with pytest.raises(ConfigError, match="sensitivity"):
        run_adapt("donut", n0=2, max_layers=4, steps=1, n_train=30, n_test=30, arms=("sensli",))
