"""DDPNOpt: exactly its base optimizer without feedback; the feedback equals the dense
per-sample formula -P sum_i Q_ux^i dx^i (outer-product model, factor B, old weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from ocnet.bridge import to_problem
from ocnet.bridge.derivatives import stage_jacobians
from ocnet.dynamics import ActivationField, Dense, LinearQuadratic, TimeMesh, euler_stages
from ocnet.models import build_model
from ocnet.ocp import Problem
from ocnet.ocp.errors import ConfigError
from ocnet.solvers.base import make_solver
from ocnet.solvers.ddpnopt import DDPNOpt
from ocnet.solvers.gradient import GradientSolver

DT = torch.float64


def _mlp(seed: int, wd: float = 0.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 3)).to(DT)
    return to_problem(net, "cross_entropy", weight_decay=wd)


def _resnet(seed: int):
    torch.manual_seed(seed)
    return to_problem(build_model("resnet", 4, 3, width=5, depth=2, h=0.5).to(DT),
                      "cross_entropy")


def _cnn(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(32, 3)).to(DT)
    return to_problem(net, "cross_entropy")


def _euler(seed: int):
    g = torch.Generator().manual_seed(seed)
    field = ActivationField(4)
    stages = euler_stages(field, TimeMesh.uniform(1.0, 3), generator=g, dtype=DT)
    stages.append(Dense.create(4, 3, "identity", generator=g, dtype=DT))
    return Problem(stages, nn.CrossEntropyLoss())


def _batch(seed: int, n_in: int, B: int = 5):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n_in, generator=g, dtype=DT),
            torch.randint(0, 3, (B,), generator=g))


@pytest.mark.parametrize("base,lr", [("sgd", 0.1), ("momentum", 0.05), ("rmsprop", 1e-2),
                                     ("adam", 1e-2)])
def test_without_feedback_it_is_the_base_optimizer(base, lr):
    p1 = _mlp(0, wd=1e-3)
    p2 = copy.deepcopy(p1)
    p3 = copy.deepcopy(p1)
    ref = GradientSolver(p1, base, lr=lr)
    ours = DDPNOpt(p2, lr=lr, base=base, feedback=False)
    fb = DDPNOpt(p3, lr=lr, base=base, feedback=True, gain=1.0)
    for step in range(20):
        x, y = _batch(step, 4)
        ref.step(x, y), ours.step(x, y), fb.step(x, y)
    def max_gap(m1: Problem, m2: Problem) -> float:
        with torch.no_grad():
            return max(float((a - b).abs().max())
                       for a, b in zip(m1.parameters(), m2.parameters(), strict=True))

    err = max_gap(p1, p2)
    assert err < 1e-12
    diff = max_gap(p1, p3)
    assert diff > 1e-6  # the feedback changes the updates


def _dense_feedback(stage, split, x, u_old, z_next, dx, eps):
    """-(1/B) sum_i [ (f_u^T z)(f_x^T z . dx) + eps h_u^T h_x dx ] per control, densely."""
    B = x.shape[0]  # noqa: N806
    fx, fus = stage_jacobians(stage, x, u_old)
    n_out = z_next[0].numel()
    fx = fx.reshape(B, n_out, -1)
    z = z_next.reshape(B, n_out)
    c = torch.einsum("bon,bo,bn->b", fx, z, dx.reshape(B, -1))
    qu = [torch.einsum("bo,bo...->b...", z, fu.reshape(B, n_out, *fu.shape[-u.dim():]))
          for fu, u in zip(fus, u_old, strict=True)]

    def h(xi, *us):
        return split.lin(split.pre(xi.unsqueeze(0)), us).reshape(-1)

    jac = vmap(jacrev(h, argnums=tuple(range(1 + len(u_old)))),
               in_dims=(0,) + (None,) * len(u_old))(x, *u_old)
    hx = jac[0].reshape(jac[0].shape[0], jac[0].shape[1], -1)
    r = torch.einsum("bhn,bn->bh", hx, dx.reshape(B, -1))
    hus = [j.reshape(B, hx.shape[1], *u.shape) for j, u in zip(jac[1:], u_old, strict=True)]
    grads = [(torch.einsum("b,b...->...", c, q) + eps * torch.einsum("bh,bh...->...", r, hu)) / B
             for q, hu in zip(qu, hus, strict=True)]
    return grads, c, qu, r, hus


@pytest.mark.parametrize("gain", [1.0, "auto"])
@pytest.mark.parametrize("make", [_mlp, _resnet, _cnn, _euler])
def test_feedback_equals_dense_outer_product_formula(make, gain):
    problem = make(1)
    n_in = 16 if make is _cnn else 4
    x, y = _batch(7, n_in)
    B, lr, eps = x.shape[0], 0.3, 0.7  # noqa: N806
    u_old = [tuple(v.detach().clone() for v in u) for u in problem.controls]
    traj = problem.costates(problem.rollout(x), y)
    g_old = problem.gradients(x, y)
    solver = DDPNOpt(problem, lr=lr, base="sgd", gain=gain, vxx_reg=eps, trust=0.0)
    solver.debug = True
    solver.step(x, y)
    assert len(solver.last_debug) >= 2
    for rec in solver.last_debug:
        t = rec["t"]
        stage, split = problem.stages[t], problem.affine(t)
        z_next = -B * traj.ps[t + 1]  # unnormalised per-sample dPhi/dx_{t+1}
        grads, c, qu, r, hus = _dense_feedback(stage, split, traj.xs[t], u_old[t], z_next,
                                               rec["dx"], eps)
        torch.testing.assert_close(rec["c"], c, rtol=0, atol=1e-10)
        for d, gr in zip(rec["d"], grads, strict=True):
            torch.testing.assert_close(d, -lr * gr, rtol=0, atol=1e-10)
        if gain == "auto":
            s = sum(torch.einsum("b...,...->b", q, d) for q, d in zip(qu, rec["d"], strict=True))
            qh = sum(torch.einsum("bh...,...->bh", hu, d) for hu, d in zip(hus, rec["d"],
                                                                          strict=True))
            num = (c * s).mean() + eps * (r * qh).sum(1).mean()
            den = (s * s).mean() + eps * (qh * qh).sum(1).mean()
            expect = (-num / den).clamp(0, 1)
            torch.testing.assert_close(rec["gamma"], expect, rtol=0, atol=1e-10)
            assert 0 < float(expect) <= 1
        gamma = rec["gamma"]
        for u, u0, g, d in zip(stage.controls, u_old[t], g_old[t], rec["d"], strict=True):
            torch.testing.assert_close(u.detach(), u0 - lr * g + gamma * d, rtol=0, atol=1e-10)


@pytest.mark.parametrize("base", ["adam", "rmsprop", "kfac", "momentum"])
@pytest.mark.parametrize("make", [_mlp, _cnn, _euler])
def test_bases_train_every_supported_stage(make, base):
    problem = make(2)
    n_in = 16 if make is _cnn else 4
    x, y = _batch(3, n_in, B=16)
    lr = {"adam": 1e-2, "rmsprop": 1e-2, "kfac": 0.1, "momentum": 0.05}[base]
    solver = make_solver("ddpnopt", problem, lr=lr, base=base)
    j0 = float(problem.objective(x, y).detach())
    for _ in range(30):
        info = solver.step(x, y)
    assert torch.isfinite(info.loss)
    assert float(problem.objective(x, y).detach()) < 0.8 * j0


def test_kfac_base_is_the_kronecker_preconditioned_gradient():
    problem = _mlp(4)
    x, y = _batch(5, 4, B=8)
    u_old = [tuple(v.detach().clone() for v in u) for u in problem.controls]
    grads = problem.gradients(x, y)
    traj = problem.costates(problem.rollout(x), y)
    lam, lr = 1e-2, 0.5
    DDPNOpt(problem, lr=lr, base="kfac", feedback=False, damping=lam).step(x, y)
    B = x.shape[0]  # noqa: N806
    for t, stage in enumerate(problem.stages):
        a = traj.xs[t]
        abar = torch.cat([a, torch.ones(B, 1, dtype=DT)], 1)
        A = abar.T @ abar / B  # noqa: N806
        # zeta = B dJ/dh: the pre-activation gradient from the post-activation costate
        h = torch.nn.functional.linear(a, *u_old[t])
        post = stage.f(a, u_old[t])
        dpost = -B * traj.ps[t + 1]
        zeta = dpost * (1 - post ** 2) if t < 2 else dpost
        del h
        G = zeta.T @ zeta / B  # noqa: N806
        pi = torch.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        Ai = torch.linalg.inv(A + pi * lam ** 0.5 * torch.eye(A.shape[0], dtype=DT))  # noqa: N806
        Gi = torch.linalg.inv(G + lam ** 0.5 / pi * torch.eye(G.shape[0], dtype=DT))  # noqa: N806
        mat = torch.cat([grads[t][0], grads[t][1][:, None]], 1)
        step = lr * Gi @ mat @ Ai
        torch.testing.assert_close(stage.controls[0].detach(), u_old[t][0] - step[:, :-1],
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(stage.controls[1].detach(), u_old[t][1] - step[:, -1],
                                   rtol=0, atol=1e-10)


def test_unsupported_stage_is_named_in_the_error():
    n, m = 2, 1
    lq = LinearQuadratic(torch.eye(n), torch.ones(n, m), torch.zeros(m), torch.eye(n),
                         torch.eye(m))
    problem = Problem([Dense.create(2, 2), lq], lambda x, y: x.pow(2).mean())
    with pytest.raises(ConfigError, match=r"stage 1 \(lq\(n=2,m=1\)"):
        DDPNOpt(problem)
    with pytest.raises(ConfigError, match="base"):
        DDPNOpt(_mlp(0), base="lbfgs")


def test_dead_unit_guard_bounds_the_feedback():
    """A hidden unit whose gradient is always zero has Adam denominator eps; without the
    floor its lr/eps inverse curvature would amplify the feedback by ~1e6."""
    problem = _mlp(6)
    with torch.no_grad():  # unit 0 of the second layer is dead: its outgoing weights are 0
        problem.stages[2].controls[0][:, 0] = 0.0
    x, y = _batch(8, 4, B=16)
    for floor in (0.1, 0.0):
        p = copy.deepcopy(problem)
        solver = DDPNOpt(p, lr=1e-2, base="adam", gain=1.0, curvature_floor=floor)
        solver.step(x, y)
        assert all(torch.isfinite(v).all() for v in p.parameters())
    w1 = len(p.stages[0].controls)  # position of stage 1's weight among the parameters
    inv = solver._inverse_curvatures()[w1]
    assert float(inv.max()) > 1e4  # unguarded: lr / eps on the dead unit's row
    p = copy.deepcopy(problem)
    guarded = DDPNOpt(p, lr=1e-2, base="adam", curvature_floor=0.1)
    guarded.step(x, y)
    assert float(guarded._inverse_curvatures()[w1].max()) < 1e3


def test_trust_bounds_the_feedback_by_the_base_step():
    problem = _mlp(9)
    x, y = _batch(10, 4, B=16)
    u_old = [tuple(v.detach().clone() for v in u) for u in problem.controls]
    g = problem.gradients(x, y)
    solver = DDPNOpt(problem, lr=0.5, base="sgd", gain=1.0, vxx_reg=5.0, trust=0.1)
    solver.debug = True
    solver.step(x, y)
    bound_hit = 0
    for rec in solver.last_debug:
        t = rec["t"]
        k = torch.cat([(-0.5 * gi).reshape(-1) for gi in g[t]])
        fb = torch.cat([(rec["gamma"] * d).reshape(-1) for d in rec["d"]])
        assert float(fb.norm()) <= 0.1 * float(k.norm()) * (1 + 1e-9)
        bound_hit += abs(float(fb.norm()) - 0.1 * float(k.norm())) < 1e-9
        new = torch.cat([u.detach().reshape(-1) for u in problem.stages[t].controls])
        old = torch.cat([u.reshape(-1) for u in u_old[t]])
        torch.testing.assert_close(new, old + k + fb, rtol=0, atol=1e-12)
    assert bound_hit >= 1


@pytest.mark.parametrize("base", ["adam", "kfac"])
def test_state_dict_resumes_identically(base):
    p1 = _mlp(11)
    s1 = DDPNOpt(p1, lr=1e-2, base=base)
    for step in range(3):
        s1.step(*_batch(step, 4))
    p2 = copy.deepcopy(p1)
    s2 = DDPNOpt(p2, lr=1e-2, base=base)
    s2.load_state_dict(copy.deepcopy(s1.state_dict()))
    for step in range(3, 6):
        x, y = _batch(step, 4)
        s1.step(x, y), s2.step(x, y)
    for a, b in zip(p1.parameters(), p2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [_mlp, _resnet, _cnn, _euler])
def test_split_policy_rollout_equals_the_stage_path(make):
    # the feedback pass evaluates stages through their affine description; the same values
    problem = make(4)
    x, y = _batch(8, 16 if make is _cnn else 4)
    plain = problem.policy_rollout(x, y, lambda t, xh: None)
    split = problem.policy_rollout(x, y, lambda t, xh: None, split=True)
    for a, b in zip(plain.xs, split.xs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    torch.testing.assert_close(plain.objective, split.objective, rtol=0, atol=1e-14)


@pytest.mark.parametrize("base", ["sgd", "adam", "kfac"])
def test_cap_rate_counts_the_stages_where_the_trust_bound_bites(base):
    # the fixed-gain bound m_t = T_t / max(T_t / (gamma unit), |D_t|): a tiny region binds at
    # every fed stage, a huge one never; the reported gains are the applied ones
    rates = {}
    for trust in (1e-6, 1e6):
        problem = _mlp(11)
        x, y = _batch(12, 4, B=16)
        solver = DDPNOpt(problem, lr={"sgd": 0.5, "adam": 1e-2, "kfac": 0.1}[base], base=base,
                         trust=trust)
        solver.debug = True
        solver.step(x, y)  # fills the adaptive statistics
        info = solver.step(x, y)
        rates[trust] = float(info.extra["cap_rate"])
        gains = info.extra["gains"]
        assert gains.shape == (len(solver.last_debug),)
        for g, rec in zip(gains, solver.last_debug, strict=True):
            torch.testing.assert_close(g, rec["gamma"], rtol=1e-12, atol=0)
            if trust > 1:
                assert float(g) == 1.0
    assert rates == {1e-6: 1.0, 1e6: 0.0}
