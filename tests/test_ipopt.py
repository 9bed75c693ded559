"""Tests of the IPOPT reference solve (ocnet.solvers.ipopt).

Independent checks: the transcribed objective and its CasADi gradient equal torch's
objective and autograd gradient at the start point (so the NLP is the training problem);
the optimum has an autograd gradient norm below 1e-6; on a linear-quadratic and a convex
problem an independent method (L-BFGS in torch; for LQ also the exact minimiser from one
Newton step with the dense autograd Hessian) reaches the same objective.
"""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import DEVICES
from torch import nn

from ocnet.bridge import (
    flatten_controls,
    objective_gradient,
    objective_hessian,
    place,
    to_problem,
    unflatten_controls,
)
from ocnet.dynamics import (
    ActivationField,
    AntisymmetricField,
    Dense,
    LinearQuadratic,
    Residual,
    TimeMesh,
    ZeroPad,
    euler_stages,
)
from ocnet.models import build_model
from ocnet.ocp import ConfigError, FunctionStage, Problem
from ocnet.solvers import GradientSolver, make_solver
from ocnet.solvers.ipopt import IpoptReference, QuadraticCost, transcribe

D = torch.float64


def _classification(n: int = 30, d: int = 4, k: int = 3, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    w = torch.randn(d, k, generator=g, dtype=D)
    y = (x @ w + 0.5 * torch.randn(n, k, generator=g, dtype=D)).argmax(1)
    return x, y


def _mlp_problem(widths: tuple[int, ...] = (4, 6, 3), act: type[nn.Module] = nn.Tanh,
                 loss: str = "cross_entropy", wd: float = 1e-3) -> Problem:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1], strict=True):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return to_problem(nn.Sequential(*layers).double(), loss, wd)


def _lq_problem(T: int = 5, n: int = 3, m: int = 2) -> Problem:  # noqa: N803
    g = torch.Generator().manual_seed(3)
    stages = []
    for _ in range(T):
        a = torch.eye(n, dtype=D) + 0.3 * torch.randn(n, n, generator=g, dtype=D)
        b = torch.randn(n, m, generator=g, dtype=D)
        q = torch.randn(n, n, generator=g, dtype=D)
        q = q @ q.T / n
        r = torch.eye(m, dtype=D) * 0.5
        s = 0.1 * torch.randn(n, m, generator=g, dtype=D)
        stages.append(LinearQuadratic(a, b, torch.randn(m, generator=g, dtype=D), q, r, s))
    return Problem(stages, QuadraticCost(n).double())


def _neural_ode_problem(field: type = AntisymmetricField) -> Problem:
    g = torch.Generator().manual_seed(2)
    stages = [ZeroPad(2, 4)]
    stages += euler_stages(field(4, "tanh"), TimeMesh.uniform(1.0, 3), generator=g, dtype=D)
    stages.append(Dense.create(4, 2, "identity", generator=g, dtype=D))
    return Problem(stages, nn.MSELoss())


def _lbfgs(problem: Problem, x0: torch.Tensor, y: torch.Tensor | None, iters: int = 60
           ) -> float:
    """Independent minimiser: torch.optim.LBFGS (strong Wolfe) on the autograd objective."""
    for u in problem.parameters():
        u.requires_grad_(True)
    opt = torch.optim.LBFGS(problem.parameters(), lr=1, max_iter=50, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.objective(x0, y)
        loss.backward()
        return loss

    for _ in range(iters):
        opt.step(closure)
    with torch.no_grad():
        return float(problem.objective(x0, y).detach())


def _gradient_descent(problem: Problem, x0: torch.Tensor, y: torch.Tensor | None, lr: float,
                      steps: int) -> float:
    """ocnet's GradientSolver (heavy-ball momentum 0.9, full batch) on costate gradients."""
    solver = GradientSolver(problem, "momentum", lr)
    for _ in range(steps):
        solver.step(x0, y)
    with torch.no_grad():
        return float(problem.objective(x0, y).detach())


def _cases() -> dict[str, tuple]:  # name -> (problem, x0, y)
    x, y = _classification()
    xr = torch.randn(30, 4, dtype=D, generator=torch.Generator().manual_seed(5))
    yr = torch.randn(30, 2, dtype=D, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(4)
    cases = {
        "mlp-tanh-ce": (_mlp_problem(), x, y),
        "mlp-ce-probabilities": (_mlp_problem(), x, F.one_hot(y, 3).to(D) * 0.8 + 0.2 / 3),
        "lq": (_lq_problem(), torch.randn(10, 3, dtype=D, generator=g), None),
        "euler-antisymmetric": (_neural_ode_problem(), x[:, :2], yr),
        "euler-activation": (_neural_ode_problem(ActivationField), x[:, :2], yr),
        "dense-residual": (Problem([Dense.create(4, 5, "sigmoid", generator=g, dtype=D),
                                    Residual.create(5, 0.5, "softplus", generator=g, dtype=D),
                                    Dense.create(5, 2, "gelu", generator=g, dtype=D)],
                                   F.mse_loss), xr, yr),
        "resnet-model": (to_problem(build_model("resnet", 4, 3, width=4, depth=2).double(),
                                    "cross_entropy", 1e-2), x, y),
    }
    for act in (nn.ReLU, nn.Sigmoid, nn.Softplus, nn.ELU, nn.GELU, nn.LeakyReLU, nn.SiLU):
        cases[f"mlp-{act.__name__}-mse"] = (_mlp_problem((4, 5, 2), act, "mse", 1e-2), xr, yr)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_transcription_is_the_training_problem(name: str, record_error) -> None:  # noqa: ANN001
    problem, x0, y = CASES[name]
    nlp = transcribe(problem, x0, y)
    fun = ca.Function("Jg", [nlp.w], [nlp.objective, ca.gradient(nlp.objective, nlp.w)])
    j, g = fun(nlp.w0)
    with torch.no_grad():
        j_torch = float(problem.objective(x0, y).detach())
    g_torch = objective_gradient(problem, x0, y).numpy()
    err = max(abs(float(j) - j_torch), np.abs(np.asarray(g).ravel() - g_torch).max())
    record_error(f"transcription J, dJ/du vs torch: {name}", err)
    assert err < 1e-12


@pytest.mark.parametrize("name", ["mlp-tanh-ce", "lq", "resnet-model", "euler-antisymmetric"])
@pytest.mark.parametrize("symbolic", ["SX", "map"])
def test_transcription_graphs_agree(name: str, symbolic: str) -> None:
    """The scalar graph and the per-sample map (which splits the control-only costs
    weight decay and u'Ru from the per-sample sums) give the same J and gradient."""
    problem, x0, y = CASES[name]
    ref, other = transcribe(problem, x0, y), transcribe(problem, x0, y, symbolic=symbolic)
    outs = []
    for nlp in (ref, other):
        fun = ca.Function("Jg", [nlp.w], [nlp.objective, ca.gradient(nlp.objective, nlp.w)])
        outs.append([np.asarray(v).ravel() for v in fun(nlp.w0)])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_ipopt_solves_an_mlp_training_problem(record_error) -> None:  # noqa: ANN001
    """MLP 4-6-3 (tanh), 30 points, weight decay 1e-3: the optimum's gradient is ~0."""
    x, y = _classification()
    problem = _mlp_problem()
    assert problem.num_controls() == 51
    info = IpoptReference(problem).step(x, y)
    gnorm = float(objective_gradient(problem, x, y).norm())
    record_error("ipopt mlp 4-6-3 |dJ/du| at optimum", gnorm)
    assert info.extra["success"], info.extra["status"]
    assert gnorm < 1e-6
    assert float(info.extra["objective"]) < float(info.loss)
    assert abs(float(info.extra["objective"]) - info.extra["ipopt_objective"]) < 1e-12
    # the module itself is trained: its forward pass gives the optimal objective
    with torch.no_grad():
        out = problem.module(x)
        j = F.cross_entropy(out, y) + 0.5e-3 * sum((p ** 2).sum()
                                                   for p in problem.module.parameters())
    assert abs(float(j) - float(info.extra["objective"])) < 1e-12


def test_ipopt_solves_a_few_hundred_controls(record_error) -> None:  # noqa: ANN001
    """MLP 4-16-16-3 (403 controls) on 30 points, weight decay 1e-3; the Newton matrix from
    torch.func.hessian (CasADi's symbolic Hessian takes ~25 s to build at this size)."""
    x, y = _classification()
    problem = _mlp_problem((4, 16, 16, 3))
    assert problem.num_controls() == 403
    info = IpoptReference(problem, hessian="torch").step(x, y)
    gnorm = float(objective_gradient(problem, x, y).norm())
    record_error("ipopt mlp 4-16-16-3 |dJ/du| at optimum", gnorm)
    assert info.extra["success"], info.extra["status"]
    assert gnorm < 1e-6


def test_ipopt_solves_a_neural_ode_problem(record_error) -> None:  # noqa: ANN001
    """ZeroPad 2->4, three antisymmetric Euler steps, dense head; MSE on 60 noisy points."""
    x, _ = _classification(n=60)
    x0 = x[:, :2]
    noise = torch.randn(60, 2, dtype=D, generator=torch.Generator().manual_seed(9))
    y = torch.stack([torch.sin(x0[:, 0]), x0[:, 0] * x0[:, 1]], 1) + 0.3 * noise
    problem = _neural_ode_problem()
    info = IpoptReference(problem).step(x0, y)
    gnorm = float(objective_gradient(problem, x0, y).norm())
    record_error("ipopt neural ODE (antisymmetric Euler) |dJ/du|", gnorm)
    assert info.extra["success"], info.extra["status"]
    assert gnorm < 1e-6


def test_lq_ipopt_matches_exact_minimiser_and_lbfgs(record_error) -> None:  # noqa: ANN001
    x0 = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(7))
    problem = _lq_problem()
    start = [tuple(u.clone() for u in us) for us in problem.controls]
    # exact: J is quadratic in u, so one Newton step from anywhere lands on the minimiser
    h = objective_hessian(problem, x0)
    g = objective_gradient(problem, x0)
    w_star = flatten_controls(problem.controls) - torch.linalg.solve(h, g)
    j_exact = float(problem.objective(x0, None, unflatten_controls(w_star, problem.controls)))
    info = IpoptReference(problem).step(x0)
    j_ipopt = float(info.extra["objective"])
    problem.set_controls(start)
    j_lbfgs = _lbfgs(problem, x0, None)
    problem.set_controls(start)
    j_gd = _gradient_descent(problem, x0, None, lr=0.02, steps=600)
    record_error("LQ |J_ipopt - J_exact|", abs(j_ipopt - j_exact))
    record_error("LQ |J_ipopt - J_lbfgs|", abs(j_ipopt - j_lbfgs))
    record_error("LQ |J_ipopt - J_gd(momentum, 600 steps)|", abs(j_ipopt - j_gd))
    assert abs(j_ipopt - j_exact) < 1e-10
    assert abs(j_ipopt - j_lbfgs) < 1e-6
    assert abs(j_ipopt - j_gd) < 1e-6


def test_logistic_regression_ipopt_matches_lbfgs(record_error) -> None:  # noqa: ANN001
    """Convex: one linear layer (identity activation), cross-entropy, weight decay 1e-3."""
    x, y = _classification(n=60)
    torch.manual_seed(0)
    problem = to_problem(nn.Sequential(nn.Linear(4, 3)).double(), "cross_entropy", 1e-3)
    start = [tuple(u.clone() for u in us) for us in problem.controls]
    info = IpoptReference(problem).step(x, y)
    j_ipopt = float(info.extra["objective"])
    problem.set_controls(start)
    j_lbfgs = _lbfgs(problem, x, y)
    problem.set_controls(start)
    j_gd = _gradient_descent(problem, x, y, lr=0.5, steps=1500)
    record_error("logreg |J_ipopt - J_lbfgs|", abs(j_ipopt - j_lbfgs))
    record_error("logreg |J_ipopt - J_gd(momentum, 1500 steps)|", abs(j_ipopt - j_gd))
    assert info.extra["success"]
    assert abs(j_ipopt - j_lbfgs) < 1e-6
    assert abs(j_ipopt - j_gd) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_on_the_problems_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    x, y = _classification()
    problem = place(_mlp_problem(), device, dtype)
    tensors = problem.parameters()
    info = make_solver("ipopt", problem, lr=None).step(x.to(device, dtype), y.to(device))
    assert [id(u) for u in problem.parameters()] == [id(u) for u in tensors]
    for u in problem.parameters():
        assert u.device.type == device and u.dtype == dtype
    assert info.extra["objective"].device.type == device
    assert info.loss.device.type == device
    assert info.extra["success"]


def test_options_status_and_iterations() -> None:
    x, y = _classification()
    problem = _mlp_problem()
    info = make_solver("ipopt", problem, max_iter=3, mu_strategy="adaptive").step(x, y)
    assert info.extra["iterations"] == 3
    assert info.extra["status"] == "Maximum_Iterations_Exceeded"
    assert not info.extra["success"] and info.accepted is False
    lbfgs = IpoptReference(_mlp_problem(), hessian="limited-memory", symbolic="MX")
    info = lbfgs.step(x, y)
    assert info.extra["success"], info.extra["status"]
    with pytest.raises(ConfigError, match="hessian"):
        IpoptReference(problem, hessian="bfgs")


def test_unsupported_stage_and_cost_name_the_cause() -> None:
    x, y = _classification()
    u = torch.zeros(4, dtype=D)
    custom = FunctionStage(lambda x, u: x + u[0], [u], name="shift")
    problem = Problem([custom, Dense.create(4, 3, "identity", dtype=D)], F.cross_entropy)
    with pytest.raises(ConfigError, match=r"stage 0 \(shift"):
        IpoptReference(problem).step(x, y)
    problem = Problem([Dense.create(4, 3, "identity", dtype=D)], lambda out, y: out.sum())
    with pytest.raises(ConfigError, match="terminal cost"):
        IpoptReference(problem).step(x, y)
    conv = to_problem(build_model("cnn", 16, 2, image_shape=(1, 4, 4), width=2).double(), "mse")
    with pytest.raises(ConfigError, match="Unflatten"):
        IpoptReference(conv).step(torch.randn(5, 16, dtype=D), torch.randn(5, 2, dtype=D))


def _logreg_problem() -> Problem:
    torch.manual_seed(0)
    return to_problem(nn.Sequential(nn.Linear(4, 3)).double(), "cross_entropy", 1e-3)


@pytest.mark.parametrize("case", ["lq", "logreg"])
def test_ddp_reaches_the_ipopt_objective(case: str, record_error) -> None:  # noqa: ANN001
    """IPOPT as the ground truth of another solver (DDP, when it is installed)."""
    ddp = pytest.importorskip("ocnet.solvers.ddp")
    if case == "lq":
        problem = _lq_problem()
        x0, y = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(7)), None
        steps = 3
    else:
        problem = _logreg_problem()
        (x0, y), steps = _classification(n=60), 10
    start = [tuple(u.clone() for u in us) for us in problem.controls]
    j_ipopt = float(IpoptReference(problem).step(x0, y).extra["objective"])
    problem.set_controls(start)
    solver = ddp.DDP(problem)
    for _ in range(steps):
        solver.step(x0, y)
    with torch.no_grad():
        j_ddp = float(problem.objective(x0, y).detach())
    record_error(f"{case} |J_ipopt - J_ddp({steps} steps)|", abs(j_ipopt - j_ddp))
    assert abs(j_ipopt - j_ddp) < 1e-6


# E-MSA is a proximal first-order method (each outer step maximises the linearised
# Hamiltonian plus the penalties, a metric M = R + rho (B'B + S'S) per LQ stage), so it
# converges linearly; these settings are the fastest found (docs/device_audit.md):
# LQ: the rate of u <- u - M^-1 dJ/du is best near rho = 15 (spectral radius 0.986;
# rho <= 12 diverges); logistic regression: rho = 0.15 is about the smallest stable
# penalty (0.1 oscillates), and the logit-shift direction, curved only by the weight
# decay 1e-3, sets the rate.
EMSA_SETTINGS = {
    "lq": ({"rho": 15.0, "inner_iters": 3}, 500),
    "logreg": ({"rho": 0.15, "inner_iters": 4}, 600),
}


@pytest.mark.parametrize("case", ["lq", "logreg"])
def test_emsa_reaches_the_ipopt_objective(case: str, record_error) -> None:  # noqa: ANN001
    """E-MSA (batched L-BFGS inner solver) from IPOPT's start point reaches its objective."""
    from ocnet.solvers.msa import EMSA

    if case == "lq":
        problem = _lq_problem()
        x0, y = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(7)), None
    else:
        problem = _logreg_problem()
        x0, y = _classification(n=60)
    start = [tuple(u.clone() for u in us) for us in problem.controls]
    j_ipopt = float(IpoptReference(problem).step(x0, y).extra["objective"])
    problem.set_controls(start)
    options, steps = EMSA_SETTINGS[case]
    solver = EMSA(problem, **options)
    for _ in range(steps):
        solver.step(x0, y)
    with torch.no_grad():
        j_emsa = float(problem.objective(x0, y).detach())
    record_error(f"{case} |J_ipopt - J_emsa({steps} steps)|", abs(j_ipopt - j_emsa))
    assert j_emsa >= j_ipopt - 1e-9  # IPOPT's point is the minimiser
    assert abs(j_ipopt - j_emsa) < 1e-6
