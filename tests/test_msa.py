"""MSA / E-MSA: the inner maximisation against closed forms, monotonicity of every layer's
augmented Hamiltonian (checked against an independent evaluation), the Pontryagin
condition at a fixed point, and the solver plumbing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ocnet.bridge import to_problem
from ocnet.dynamics import ActivationField, LinearQuadratic, TimeMesh, euler_stages
from ocnet.models import ResidualBlock
from ocnet.ocp import ConfigError, FunctionStage, Problem
from ocnet.solvers.base import make_solver, solver_names
from ocnet.solvers.msa import EMSA, MSA, AdaptiveRho, ConstantRho, GeometricRho

DT = torch.float64


# ---------------------------------------------------------------------------- problems
def _spd(k: int, eps: float, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(k, k, generator=g, dtype=DT)
    return m @ m.T / k + eps * torch.eye(k, dtype=DT)


def lq_problem(seed: int = 0, T: int = 3, n: int = 3, m: int = 2, B: int = 6,  # noqa: N803
               r_eps: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    stages = []
    for _ in range(T):
        A = torch.eye(n, dtype=DT) + 0.3 * torch.randn(n, n, generator=g, dtype=DT)  # noqa: N806
        Bm = torch.randn(n, m, generator=g, dtype=DT)  # noqa: N806
        u = 0.3 * torch.randn(m, generator=g, dtype=DT)
        S = 0.2 * torch.randn(n, m, generator=g, dtype=DT)  # noqa: N806
        stages.append(LinearQuadratic(A, Bm, u, _spd(n, 0.1, g), _spd(m, r_eps, g), S))
    prob = Problem(stages, lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    x0 = torch.randn(B, n, generator=g, dtype=DT)
    y = torch.randn(B, n, generator=g, dtype=DT)
    return prob, x0, y


def tanh_problem(seed: int = 0, weight_decay: float = 1e-2, B: int = 12):  # noqa: N803
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), ResidualBlock(3, 0.5, "tanh"),
                        ResidualBlock(3, 0.5, "tanh"), nn.Linear(3, 1)).to(DT)
    prob = to_problem(net, "mse", weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 2, generator=g, dtype=DT)
    return prob, x, torch.sin(2 * x[:, :1]) * x[:, 1:]


# ---------------------------------------------------------------------------- reference Htilde
def reference_htilde(prob: Problem, x0, y, controls, rho: float, scaling: str = "mean"):
    """Htilde_t at ``controls`` (per stage), with x, p from the *current* controls of ``prob``.

    Independent of the solver: states from ``Problem.rollout``, costates from
    ``Problem.costates``, H from ``Problem.hamiltonian``, dH/dx by autograd.
    """
    traj = prob.costates(prob.rollout(x0), y)
    B = x0.shape[0]  # noqa: N806
    wx, wp = (rho / (2 * B), rho * B / 2) if scaling == "mean" else (rho / 2, rho / 2)
    out = []
    for t in range(prob.T):
        x = traj.xs[t].detach().requires_grad_(True)
        u = tuple(controls[t])
        with torch.enable_grad():
            h = prob.hamiltonian(t, x, traj.ps[t + 1], u)
            (dhdx,) = torch.autograd.grad(h, x)
        fx = prob.stages[t].f(traj.xs[t], u)
        pen_x = ((traj.xs[t + 1] - fx) ** 2).sum()
        pen_p = ((traj.ps[t] - dhdx) ** 2).sum()
        out.append(float((h - wx * pen_x - wp * pen_p).detach()))
    return out


def lq_argmax(prob: Problem, x0, y, rho: float, scaling: str = "mean"):
    """The closed-form maximiser of each LQ stage's Htilde (a quadratic in u).

    With e_i = x_{t+1}^i - A x_t^i and r_i = p_t^i - A'p_{t+1}^i + Q x_t^i / B:
        Htilde(u) = u'(B'sum p' - S'mean x) - u'Ru/2 - wx sum|e_i - Bu|^2
                    - wp sum|r_i + S u/B|^2
    so  (R + 2 wx B n_B'n_B + 2 wp S'S / B) u = B'sum p' - S'mean x + 2wx B'sum e
                                                 - 2 wp S' sum r / B.
    """
    traj = prob.costates(prob.rollout(x0), y)
    nb = x0.shape[0]
    wx, wp = (rho / (2 * nb), rho * nb / 2) if scaling == "mean" else (rho / 2, rho / 2)
    sols = []
    for t, st in enumerate(prob.stages):
        A, Bm, Q, R, S = st.A, st.B, st.Q, st.R, st.S  # noqa: N806
        x, x1, p, p1 = traj.xs[t], traj.xs[t + 1], traj.ps[t], traj.ps[t + 1]
        e = x1 - x @ A.T
        r = p - p1 @ A + x @ Q / nb  # Q symmetric
        M = R + 2 * wx * nb * Bm.T @ Bm + 2 * wp * S.T @ S / nb  # noqa: N806
        b = (Bm.T @ p1.sum(0) - S.T @ x.mean(0) + 2 * wx * Bm.T @ e.sum(0)
             - 2 * wp * S.T @ r.sum(0) / nb)
        sols.append(torch.linalg.solve(M, b))
    return sols


# ---------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("rho,scaling", [(0.0, "mean"), (2.0, "mean"), (0.5, "reference")])
@pytest.mark.parametrize("inner", ["lbfgs", "torch-lbfgs"])
def test_inner_maximisation_reaches_closed_form_argmax(rho, scaling, inner):
    prob, x0, y = lq_problem(seed=1)
    expected = lq_argmax(prob, x0, y, rho, scaling)
    if rho == 0:
        solver = MSA(prob, inner=inner, inner_iters=40)
    else:
        solver = EMSA(prob, rho=rho, scaling=scaling, inner=inner, inner_iters=40)
    solver.step(x0, y)
    for t, st in enumerate(prob.stages):
        err = float((st.controls[0] - expected[t]).abs().max())
        assert err < 1e-8, f"stage {t}: |u - u*| = {err:.2e}"


def test_closed_form_on_function_stage_with_two_controls():
    """A FunctionStage (linear dynamics in two control tensors, quadratic cost in u)."""
    g = torch.Generator().manual_seed(3)
    n, nb, rho = 2, 5, 1.5
    A = torch.randn(n, n, generator=g, dtype=DT)  # noqa: N806
    c = torch.tensor([0.7, -0.2], dtype=DT)
    stage = FunctionStage(lambda x, u: x @ A.T + u[0] * c + u[1],
                          [torch.zeros(1, dtype=DT), torch.zeros(n, dtype=DT)],
                          cost=lambda x, u: 0.5 * (u[0] ** 2).sum() + 0.25 * (u[1] ** 2).sum())
    prob = Problem([stage], lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    x0 = torch.randn(nb, n, generator=g, dtype=DT)
    y = torch.randn(nb, n, generator=g, dtype=DT)
    # closed form: f = xA' + Bu with B = [c, I] on v = (u0, u1); dH/dx = A'p does not
    # depend on u, so only the state penalty (weight rho/(2B)) adds curvature.
    traj = prob.costates(prob.rollout(x0), y)
    Bm = torch.cat([c[:, None], torch.eye(n, dtype=DT)], 1)  # noqa: N806
    R = torch.diag(torch.tensor([1.0, 0.5, 0.5], dtype=DT))  # noqa: N806
    e = traj.xs[1] - x0 @ A.T
    M = R + rho * Bm.T @ Bm  # noqa: N806  (2 * rho/(2B) * B)
    b = Bm.T @ traj.ps[1].sum(0) + rho / nb * Bm.T @ e.sum(0)
    v = torch.linalg.solve(M, b)
    EMSA(prob, rho=rho, inner_iters=30).step(x0, y)
    got = torch.cat([stage.controls[0], stage.controls[1]])
    assert float((got - v).abs().max()) < 1e-8


# ---------------------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("inner,lr", [("lbfgs", None), ("gd", None), ("adam", 0.05),
                                      ("adam", 2.0), ("torch-lbfgs", None)])
def test_each_layers_augmented_hamiltonian_does_not_decrease(inner, lr):
    prob, x, y = tanh_problem(seed=2)
    solver = EMSA(prob, rho=3.0, inner=inner, inner_iters=6, lr=lr)
    increased, kept = 0, 0
    for _ in range(3):
        before_u = [tuple(u.detach().clone() for u in s.controls) for s in prob.stages]
        ref_before = reference_htilde(prob, x, y, before_u, 3.0)
        snapshot = [tuple(u.clone() for u in s.controls) for s in prob.stages]
        info = solver.step(x, y)
        after_u = [tuple(u.detach().clone() for u in s.controls) for s in prob.stages]
        prob.set_controls(snapshot)  # evaluate Htilde_after at the frozen x, p of this step
        ref_after = reference_htilde(prob, x, y, after_u, 3.0)
        prob.set_controls(after_u)
        hb, ha = info.extra["htilde_before"], info.extra["htilde_after"]
        for k in range(prob.T):
            assert abs(float(hb[k]) - ref_before[k]) < 1e-10 * max(1.0, abs(ref_before[k]))
            assert abs(float(ha[k]) - ref_after[k]) < 1e-9 * max(1.0, abs(ref_after[k]))
            assert ref_after[k] >= ref_before[k] - 1e-12, f"layer {k} decreased"
            increased += ref_after[k] > ref_before[k] + 1e-9
            kept += bool(torch.equal(torch.cat([u.reshape(-1) for u in before_u[k]]),
                                     torch.cat([u.reshape(-1) for u in after_u[k]])))
    if lr == 2.0:  # Adam overshoots: the per-layer safeguard must have kept some layers
        assert kept > 0
    else:
        assert increased >= prob.T  # the solver did move


def test_start_point_needs_no_evaluation():
    """At u_t the penalties vanish: evaluate(z0) equals (-H_t, dJ/du) from the costate sweep."""
    prob, x, y = tanh_problem(seed=4)
    solver = EMSA(prob, rho=2.0, weight_decay=1e-3)
    J, grads, traj = prob.value_and_gradients(x, y, keep_costates=True)  # noqa: N806
    from ocnet.solvers.msa import _Frozen
    lay = solver.layout
    fr = _Frozen([traj.xs[t].detach().requires_grad_(True) for t in lay.stages],
                 [traj.xs[t + 1] for t in lay.stages], [traj.ps[t] for t in lay.stages],
                 [traj.ps[t + 1] for t in lay.stages], 2.0, x.shape[0])
    z0 = lay.flatten(prob.controls)
    phi, g = solver.evaluate(z0, fr)
    # autograd reference of dJ/du (+ the solver's extra weight decay)
    params = prob.parameters()
    with torch.enable_grad():
        obj = prob.objective(x, y) + 0.5e-3 * sum((u * u).sum() for u in params)
        ref = torch.autograd.grad(obj, params)
    assert torch.allclose(g, torch.cat([r.reshape(-1) for r in ref]), atol=1e-12, rtol=1e-10)
    h = [prob.hamiltonian(t, traj.xs[t], traj.ps[t + 1]) for t in range(prob.T)]
    wd = torch.stack([0.5e-3 * sum((u * u).sum() for u in s.controls) for s in prob.stages])
    assert torch.allclose(phi, -torch.stack(h) + wd, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------- Pontryagin
def _run_to_fixed_point(solver, x, y, max_steps: int, tol: float = 1e-10) -> float:
    change = math.inf
    for _ in range(max_steps):
        change = float(solver.step(x, y).extra["control_change"])
        if change < tol:
            break
    return change


def _check_pontryagin(prob, x, y):
    g = prob.gradients(x, y)
    leaves = [tuple(u.detach().clone().requires_grad_(True) for u in s.controls)
              for s in prob.stages]
    with torch.enable_grad():
        ref = torch.autograd.grad(prob.objective(x, y, leaves), [u for us in leaves for u in us])
    assert max(float(t.abs().max()) for gs in g for t in gs) < 1e-6
    assert max(float(t.abs().max()) for t in ref) < 1e-6


def test_fixed_point_satisfies_pontryagin_lq():
    prob, x0, y = lq_problem(seed=5, T=2, n=2, m=2, B=4, r_eps=0.05)
    solver = EMSA(prob, rho=3.0, inner_iters=10)
    change = _run_to_fixed_point(solver, x0, y, max_steps=300)
    assert change < 1e-10, f"no fixed point: last control change {change:.2e}"
    _check_pontryagin(prob, x0, y)


def test_fixed_point_satisfies_pontryagin_tanh_network():
    """E-MSA iterated until it no longer moves the controls (|du| < 1e-8): dJ/du ~ 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    prob = to_problem(net, "mse", weight_decay=0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, generator=g, dtype=DT)
    y = torch.sin(2 * x[:, :1]) * x[:, 1:]
    g0 = max(float(t.abs().max()) for gs in prob.gradients(x, y) for t in gs)
    solver = EMSA(prob, rho=2.0, inner_iters=5)
    change = _run_to_fixed_point(solver, x, y, max_steps=800, tol=1e-8)
    assert change < 1e-8, f"no fixed point: last control change {change:.2e}"
    assert g0 > 1e-2
    _check_pontryagin(prob, x, y)


def test_basic_msa_diverges_where_emsa_converges():
    """The teaching example in miniature: small R makes argmax H overshoot."""
    prob, x0, y = lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)
    start = [tuple(u.clone() for u in s.controls) for s in prob.stages]
    msa = MSA(prob, inner_iters=10)
    j0 = float(prob.objective(x0, y).detach())
    for _ in range(5):
        msa.step(x0, y)
    assert not float(prob.objective(x0, y).detach()) < 100 * j0
    prob.set_controls(start)
    emsa = EMSA(prob, rho=10.0, inner_iters=10)
    for _ in range(20):
        emsa.step(x0, y)
    assert float(prob.objective(x0, y).detach()) < j0


# ---------------------------------------------------------------------------- problems
def test_trains_a_neural_ode_mesh():
    g = torch.Generator().manual_seed(7)
    field = ActivationField(2, "tanh")
    stages = euler_stages(field, TimeMesh.uniform(1.0, 4), generator=g, dtype=DT)
    prob = Problem(stages, lambda x, y: ((x - y) ** 2).sum(-1).mean())
    x = torch.randn(16, 2, generator=g, dtype=DT)
    y = torch.tanh(x @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT))
    solver = make_solver("emsa", prob, lr=1.0, rho=5.0, inner_iters=5)
    losses = [float(solver.step(x, y).loss) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


def test_trains_a_to_problem_network_in_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    prob = to_problem(net, "cross_entropy", weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    solver = make_solver("emsa", prob, rho=5.0, inner="adam", lr=0.05, inner_iters=5)
    losses = [float(solver.step(x, y).loss) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]
    assert all(u.dtype == torch.float32 for u in prob.parameters())


# ---------------------------------------------------------------------------- plumbing
def test_registry_options_and_errors():
    assert {"msa", "emsa"} <= set(solver_names())
    prob, _, _ = lq_problem()
    s = make_solver("emsa", prob, lr=0.5, rho=2.0, inner="adam", inner_iters=3)
    assert isinstance(s, EMSA) and s.lr == 0.5 and s.inner == "adam" and s.rho() == 2.0
    m = make_solver("msa", prob)
    assert isinstance(m, MSA) and m.rho() == 0.0
    with pytest.raises(ConfigError, match="adam, gd, lbfgs, torch-lbfgs"):
        EMSA(prob, inner="newton")
    with pytest.raises(ConfigError, match="rho"):
        EMSA(prob, rho=-1.0)
    with pytest.raises(ConfigError, match="does not take"):
        make_solver("msa", prob, rho=1.0)
    with pytest.raises(ConfigError, match="mean, reference"):
        EMSA(prob, scaling="sum")


def test_rho_schedule_is_used():
    prob, x0, y = lq_problem()
    sched = GeometricRho(4.0, 0.5, every=2, rho_min=1.5)
    assert [sched(k) for k in range(6)] == [4.0, 4.0, 2.0, 2.0, 1.5, 1.5]
    assert ConstantRho(2.0)(7) == 2.0
    s = EMSA(prob, rho=sched, inner_iters=2)
    rhos = [s.step(x0, y).extra["rho"] for _ in range(4)]
    assert rhos == [4.0, 4.0, 2.0, 2.0]
    s2 = EMSA(prob, rho=8.0, rho_decay=0.5, inner_iters=1)
    assert [s2.step(x0, y).extra["rho"] for _ in range(3)] == [8.0, 4.0, 2.0]


def test_state_dict_round_trip():
    prob, x0, y = lq_problem()
    s = EMSA(prob, rho=GeometricRho(4.0, 0.5), inner_iters=2)
    for _ in range(3):
        s.step(x0, y)
    s2 = EMSA(prob, rho=GeometricRho(4.0, 0.5), inner_iters=2)
    s2.load_state_dict(s.state_dict())
    assert s2.steps == 3 and s2.rho() == s.rho() == 0.5


# ---------------------------------------------------------------------------- inner budget
def test_iteration_budget_counts_accepted_steps_not_evaluations():
    """One layer, gradient ascent with a step too large to be accepted at once: k accepted
    steps take more than k evaluations, and stop exactly where the evaluation budget of
    that many evaluations stops (the same trials, counted differently)."""
    k = 3
    prob, x0, y = lq_problem(seed=2, T=1)
    ref, _, _ = lq_problem(seed=2, T=1)
    by_steps = EMSA(prob, rho=1.0, inner="gd", lr=50.0, inner_iters=k,
                    inner_budget="iterations")
    info = by_steps.step(x0, y)
    used = info.extra["evaluations"]
    assert info.extra["inner_steps"].tolist() == [k]
    assert used > k, "every trial was accepted: the case cannot tell the two budgets apart"
    by_evals = EMSA(ref, rho=1.0, inner="gd", lr=50.0, inner_iters=used)
    by_evals.step(x0, y)
    for a, b in zip(prob.controls, ref.controls, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


def test_iteration_budget_per_layer_bounds_and_cap():
    prob, x, y = tanh_problem(seed=3)
    s = EMSA(prob, rho=0.5, inner_iters=4, inner_budget="iterations", inner_max_evals=9)
    for _ in range(3):
        info = s.step(x, y)
        steps = info.extra["inner_steps"]
        assert steps.shape == (s.layout.L,) and int(steps.max()) <= 4
        assert 4 <= info.extra["evaluations"] <= 9
    assert "inner_steps" not in EMSA(prob, rho=0.5).step(x, y).extra


def test_iteration_budget_leaves_a_stationary_layer_alone():
    """scipy's gradient stop: at a fixed point (|dJ/du| < 1e-5 in every layer) the
    iteration budget takes no step and leaves the controls bit for bit (without the stop
    its line search accepts tiny steps there)."""
    prob, x0, y = lq_problem(seed=5, T=2, n=2, m=2, B=4, r_eps=0.05)
    _run_to_fixed_point(EMSA(prob, rho=3.0, inner_iters=10), x0, y, max_steps=300)
    g = prob.gradients(x0, y)
    assert max(float(t.abs().max()) for gs in g for t in gs) < 1e-5
    before = [u.clone() for us in prob.controls for u in us]
    info = EMSA(prob, rho=3.0, inner_iters=10, inner_budget="iterations").step(x0, y)
    assert info.extra["inner_steps"].tolist() == [0, 0]
    assert all(torch.equal(u, v) for u, v in zip(before, [u for us in prob.controls
                                                         for u in us], strict=True))


def test_inner_budget_errors():
    prob, _, _ = lq_problem()
    with pytest.raises(ConfigError, match="evaluations, iterations"):
        EMSA(prob, inner_budget="epochs")
    with pytest.raises(ConfigError, match="Adam"):
        EMSA(prob, inner="adam", inner_budget="iterations")
    with pytest.raises(ConfigError, match="caps"):
        EMSA(prob, inner_max_evals=20)
    with pytest.raises(ConfigError, match="must be >= inner_iters"):
        EMSA(prob, inner_iters=10, inner_budget="iterations", inner_max_evals=5)
    assert EMSA(prob, inner_iters=7, inner_budget="iterations").inner_max_evals == 21


def test_iteration_budget_keeps_every_accepted_pair():
    """With rejections among 10 accepted steps, the L-BFGS memory of 10 still holds all 10
    pairs (a window over every evaluation), so the result does not depend on how many
    trials were rejected on the way: a history of 10 equals a history of 40."""
    def run(history: int) -> list[torch.Tensor]:
        prob, x, y = tanh_problem(seed=4)
        s = EMSA(prob, rho=0.5, lr=30.0, inner_iters=10, history=history,
                 inner_budget="iterations", inner_max_evals=40)
        info = s.step(x, y)
        assert info.extra["evaluations"] > 12  # rejected trials on the way
        return [u.clone() for us in prob.controls for u in us]

    for a, b in zip(run(10), run(40), strict=True):
        assert torch.equal(a, b)


def test_iteration_budget_applies_scipys_decrease_and_line_search_stops(monkeypatch):
    """The stops are wired per layer: with ftol 1 every accepted step of a layer whose
    -Htilde is below 1 in size is 'flat', so each layer stops after one step; with a
    line search of one trial and a step too large to pass, no layer takes any."""
    import ocnet.solvers.msa as msa

    prob, x, y = tanh_problem(seed=5)
    base = EMSA(prob, rho=0.5, inner_iters=6, inner_budget="iterations").step(x, y)
    assert int(base.extra["inner_steps"].min()) > 1
    monkeypatch.setattr(msa, "SCIPY_FTOL", 1.0)
    info = EMSA(prob, rho=0.5, inner_iters=6, inner_budget="iterations").step(x, y)
    assert info.extra["inner_steps"].tolist() == [1] * len(base.extra["inner_steps"])
    monkeypatch.setattr(msa, "SCIPY_FTOL", 0.0)
    monkeypatch.setattr(msa, "SCIPY_MAXLS", 1)
    info = EMSA(prob, rho=0.5, lr=1e4, inner="gd", inner_iters=6,
                inner_budget="iterations").step(x, y)
    assert int(info.extra["inner_steps"].max()) == 0


# ---------------------------------------------------------------------------- adaptive rho
def test_adaptive_rho_rules():
    """The trust-region rules on the ratio decrease / gain, by hand."""
    r = AdaptiveRho(1.0, rho_min=0.25, rho_max=4.0)
    assert r(0) == r(99) == 1.0
    assert r.update(0.9, 1.0) == (True, 0.9) and r.rho == 0.5      # > 0.75: shrink
    assert r.update(0.5, 1.0) == (True, 0.5) and r.rho == 0.5      # in between: keep
    assert r.update(0.1, 1.0) == (True, 0.1) and r.rho == 1.0      # < 0.25: grow, kept
    assert r.update(-0.1, 1.0) == (False, -0.1) and r.rho == 2.0   # J went up: declined
    assert r.update(5e-5, 1.0) == (False, 5e-5) and r.rho == 4.0   # < accept: declined
    ok, ratio = r.update(math.nan, 1.0)
    assert not ok and ratio == -math.inf and r.rho == 4.0          # capped at rho_max
    ok, ratio = r.update(0.0, 0.0)                                 # nothing to gain
    assert ok and math.isnan(ratio) and r.rho == 4.0
    r.rho = 1.0
    ok, ratio = r.update(-1.0, 0.0)                      # no gain, J went up: declined
    assert not ok and math.isnan(ratio) and r.rho == 2.0
    ok, ratio = r.update(1.0, math.nan)                  # a non-finite gain: declined
    assert not ok and r.rho == 4.0
    for _ in range(5):
        r.update(2.0, 1.0)
    assert r.rho == 0.25                                           # floored at rho_min
    with pytest.raises(ConfigError, match="factor"):
        AdaptiveRho(1.0, factor=1.0)
    with pytest.raises(ConfigError, match="accept <= low <= high"):
        AdaptiveRho(1.0, low=0.8, high=0.5)
    with pytest.raises(ConfigError, match="rho_min <= rho0"):
        AdaptiveRho(1.0, rho_min=2.0)


def _controls(prob):
    return [tuple(u.detach().clone() for u in s.controls) for s in prob.stages]


def test_adaptive_rho_never_increases_J_where_a_fixed_rho_does():  # noqa: N802
    """The LQ problem on which basic MSA diverges: E-MSA with a fixed small rho raises J at
    some step; the adaptive rho from the same rho never does, declines exactly the steps
    whose ratio is below ``accept`` (leaving the controls bit for bit and doubling rho),
    and its ratio is J's decrease (an independent forward pass) over the gain of the
    augmented Hamiltonians (the independent reference evaluation)."""
    rho0 = 0.02
    prob, x0, y = lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)
    start = _controls(prob)
    fixed = EMSA(prob, rho=rho0, inner_iters=10)
    js = [float(prob.objective(x0, y).detach())]
    for _ in range(10):
        fixed.step(x0, y)
        js.append(float(prob.objective(x0, y).detach()))
    assert any(b > a for a, b in zip(js, js[1:], strict=False)), js
    prob.set_controls(start)
    s = EMSA(prob, rho=rho0, inner_iters=10, rho_adapt=True)
    assert isinstance(s.rho_schedule, AdaptiveRho)
    j = j0 = float(prob.objective(x0, y).detach())
    declined = 0
    for _ in range(25):
        before = _controls(prob)
        rho = s.rho()
        info = s.step(x0, y)
        after = _controls(prob)
        j_new = float(prob.objective(x0, y).detach())
        assert j_new <= j
        assert info.extra["rho"] == rho
        if info.declined:
            declined += 1
            assert info.accepted is False and "declined" in info.reason
            assert info.extra["ratio"] < s.rho_schedule.accept
            assert all(torch.equal(a, b) for ua, ub in zip(after, before, strict=True)
                       for a, b in zip(ua, ub, strict=True))
            assert info.extra["rho_next"] == min(2 * rho, s.rho_schedule.rho_max)
        else:
            # the ratio from an independent evaluation of both sides
            prob.set_controls(before)
            gain = sum(reference_htilde(prob, x0, y, after, rho)) - sum(
                reference_htilde(prob, x0, y, before, rho))
            prob.set_controls(after)
            if gain > 1e-12:
                assert info.extra["ratio"] == pytest.approx((j - j_new) / gain, rel=1e-6)
                assert info.extra["ratio"] >= s.rho_schedule.accept
        j = j_new
    assert declined >= 1 and j < 0.7 * j0


def test_adaptive_rho_options_state_and_the_loop():
    prob, x0, y = lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)
    s = make_solver("emsa", prob, rho=0.02, inner_iters=10, rho_adapt=True, rho_min=0.01)
    assert s.rho_schedule.rho_min == 0.01
    for _ in range(6):
        s.step(x0, y)
    s2 = EMSA(prob, rho=0.02, inner_iters=10, rho_adapt=True)
    s2.load_state_dict(s.state_dict())
    assert s2.rho() == s.rho() != 0.02
    state = s.host_state()
    s.rho_schedule.rho = 123.0
    s.set_host_state(state)  # what the finiteness guard does when it undoes a step
    assert s.rho() == s2.rho() and s.evaluations == state["evaluations"]
    with pytest.raises(ConfigError, match="does not combine"):
        EMSA(prob, rho=GeometricRho(1.0, 0.5), rho_adapt=True)
    with pytest.raises(ConfigError, match="does not combine"):
        EMSA(prob, rho=1.0, rho_decay=0.5, rho_adapt=True)
    with pytest.raises(ConfigError, match="starting rho > 0"):
        EMSA(prob, rho=0.0, rho_adapt=True)
    with pytest.raises(ConfigError, match="True or False"):
        EMSA(prob, rho=1.0, rho_adapt="yes")
    # declined steps are the solver's own retries: fit(max_rejected=1) does not stop on them
    from ocnet.solvers.loop import fit

    prob.set_controls(lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)[0].controls)
    s3 = EMSA(prob, rho=0.02, inner_iters=10, rho_adapt=True)
    res = fit(s3, [(x0, y)], epochs=20, max_rejected=1)
    assert res.rejected >= 1 and res.steps == 20


def test_adaptive_rho_with_the_solvers_weight_decay():
    """With the solver's own weight decay the ratio's decrease carries wd/2 |u|^2, as the
    gain does: checked against J + wd/2 |u|^2 from an independent forward pass (a wrong
    sign or factor of that term changes the ratio)."""
    wd = 0.3
    prob, x, y = tanh_problem(seed=2, weight_decay=0.0)
    s = EMSA(prob, rho=0.5, inner_iters=6, weight_decay=wd, rho_adapt=True)

    def total() -> float:
        sq = sum(float((u.detach() ** 2).sum()) for u in prob.parameters())
        return float(prob.objective(x, y).detach()) + 0.5 * wd * sq

    j = total()
    checked = 0
    for _ in range(12):
        info = s.step(x, y)
        j_new = total()
        assert j_new <= j + 1e-12
        gain = float((info.extra["htilde_after"] - info.extra["htilde_before"]).sum())
        if info.accepted and gain > 1e-10:
            assert info.extra["ratio"] == pytest.approx((j - j_new) / gain, rel=1e-6)
            checked += 1
        j = j_new
    assert checked >= 3


def test_adaptive_rho_declines_only_while_rho_can_grow():
    """At rho_max a failed test is an ordinary rejection (fit(max_rejected=...) counts it),
    and so is a step whose start J is not finite; both stop the loop."""
    from ocnet.solvers.loop import TrainingDiverged, fit

    prob, x0, y = lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)
    s = EMSA(prob, rho=AdaptiveRho(0.02, rho_max=0.02), inner_iters=10)
    infos = [s.step(x0, y) for _ in range(8)]
    assert any(i.accepted is False for i in infos)
    assert not any(i.declined for i in infos)   # rho could not grow: not a retry
    prob, x0, y = lq_problem(seed=0, T=4, n=3, m=2, B=6, r_eps=0.01)
    with torch.no_grad():
        prob.parameters()[0].fill_(1e200)        # J(u) = inf at the start of every step
    s = EMSA(prob, rho=1.0, inner_iters=3, rho_adapt=True)
    with pytest.raises(TrainingDiverged):
        fit(s, [(x0, y)], epochs=5, max_rejected=2)
