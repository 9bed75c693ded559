"""Exact DDPNOpt (``vxx="exact"``): every quantity of the step against a dense reference
(tests/ddpnopt_exact_reference.py, float64, 1e-9); without feedback it is the base
optimizer; at B = 1 with the sgd base it is DDP's recursion with Q_uu = I / lr."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from ddp_reference import _stage_q
from ddpnopt_exact_reference import RefBase, reference_exact_step
from torch import Tensor, nn

from ocnet.bridge import to_problem
from ocnet.dynamics import ActivationField, Dense, TimeMesh, euler_stages
from ocnet.models import build_model
from ocnet.ocp import Problem
from ocnet.ocp.errors import ConfigError
from ocnet.ocp.stage import flatten_controls
from ocnet.solvers.base import make_solver
from ocnet.solvers.ddpnopt import DDPNOpt

DT = torch.float64
TOL = 1e-9
#: the worst error of each quantity over the reference cases run (for reports)
WORST: dict[str, float] = {}
ROOT = Path(__file__).resolve().parents[1]


def _mlp(seed: int, loss: str = "cross_entropy", wd: float = 1e-3) -> Problem:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                        nn.Linear(5, 3)).to(DT)
    return to_problem(net, loss, weight_decay=wd)


def _resnet(seed: int) -> Problem:  # zero-pad lift (control-free) + residual blocks + head
    torch.manual_seed(seed)
    return to_problem(build_model("resnet", 3, 3, width=4, depth=2, h=0.5).to(DT),
                      "cross_entropy")


def _euler(seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    stages = euler_stages(ActivationField(4), TimeMesh.uniform(1.0, 2), generator=g, dtype=DT)
    stages.append(Dense.create(4, 3, "identity", generator=g, dtype=DT))
    return Problem(stages, nn.CrossEntropyLoss())


def _batch(seed: int, n_in: int, B: int = 5, loss: str = "cross_entropy"):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n_in, generator=g, dtype=DT)
    if loss == "quadratic":
        return x, torch.randn(B, 3, generator=g, dtype=DT)
    return x, torch.randint(0, 3, (B,), generator=g)


def _dense_qux(solver: DDPNOpt, t: int) -> Tensor:
    """Qhat_ux^i (B, m, n) from the solver's factors (H^i, abar^i), W then b."""
    rec = solver.last_backward[t]
    H, abar = rec["H"], rec["abar"]  # noqa: N806
    B, nz, n = H.shape  # noqa: N806
    full = H[:, :, None, :] * abar[:, None, :, None]  # (B, n_z, n_a+1, n)
    if rec["v"] is not None:  # second_order: + v^i (x) (J^i delta), J = [da/dx; 0]
        full = full + rec["v"][:, :, None, None] * rec["J"][:, None, :, :]
    if solver.affines[t].has_bias:
        return torch.cat([full[:, :, :-1].reshape(B, -1, n), full[:, :, -1]], 1)
    return full.reshape(B, -1, n)


CASES = [  # (problem, loss, base, lr, options)
    ("mlp", "cross_entropy", "sgd", 0.3, {}),
    ("mlp", "cross_entropy", "adam", 3e-2, {"vx": "ddp", "gain": 0.5, "vxx_reg": 0.1}),
    ("mlp", "quadratic", "adam", 3e-2, {"c_b": "per_sample", "curvature_floor": 0.3}),
    ("mlp", "cross_entropy", "kfac", 0.2, {"vx": "ddp", "terminal_hessian": "outer",
                                          "vxx_reg": 0.3}),
    ("resnet", "cross_entropy", "adam", 3e-2, {"vx": "ddp", "vxx_reg": 0.2}),
    ("euler", "cross_entropy", "sgd", 0.5, {"vx": "ddp", "c_b": "per_sample", "gain": 0.7}),
    # the dynamics expanded to the second order (Vhat'_x . f_ux, Vhat'_x . f_xx)
    ("mlp", "cross_entropy", "sgd", 0.3, {"second_order": True}),
    ("mlp", "quadratic", "adam", 3e-2, {"second_order": True, "vx": "ddp", "vxx_reg": 0.1}),
    ("mlp", "cross_entropy", "kfac", 0.2, {"second_order": True, "vx": "ddp"}),
    ("resnet", "cross_entropy", "adam", 3e-2, {"second_order": True, "vx": "ddp"}),
    ("euler", "cross_entropy", "sgd", 0.5, {"second_order": True, "gain": 0.7}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{i}"
                                             for i, c in enumerate(CASES)])
def test_every_quantity_matches_the_dense_reference(case):
    name, loss, base, lr, opts = case
    opts = dict(opts)
    problem = {"mlp": lambda: _mlp(3, loss), "resnet": lambda: _resnet(3),
               "euler": lambda: _euler(3)}[name]()
    n_in = 3 if name == "resnet" else 4
    solver = make_solver("ddpnopt", problem, lr=lr, base=base, vxx="exact",
                         curvature_floor=opts.pop("curvature_floor", 0.0), **opts)
    solver.debug = True
    ref_base = RefBase(base, lr, floor=solver.curvature_floor, kfac_inverses=lambda t: (
        solver.state[t]["Ainv"], solver.state[t]["Ginv"]))
    gamma = float(solver.gain)
    for step in range(2):  # the second step checks the base state carried over
        x, y = _batch(10 + step, n_in, loss=loss)
        before = copy.deepcopy(problem)
        B = x.shape[0]  # noqa: N806
        _, grads, traj = problem.value_and_gradients(x, y, keep_costates=True)
        info = solver.step(x, y)
        ref = reference_exact_step(before, x, y, ref_base, gamma=gamma, eps=solver.vxx_reg,
                                   c_b=solver.c_b, vx=solver.vx,
                                   terminal_hessian=solver.terminal_hessian,
                                   second_order=solver.second_order)
        debug = {r["t"]: r for r in solver.last_debug}
        assert len(debug) >= 2
        for t, st in enumerate(ref):
            got = solver.last_backward[t]

            def close(a: Tensor, b: Tensor, what: str, t: int = t, step: int = step) -> None:
                err = float((a - b).abs().max())
                WORST[what] = max(WORST.get(what, 0.0), err)
                assert err < TOL, f"step {step} stage {t}: {what} off by {err:.2e}"

            close(got["Q_x"], st.Q_x, "Q_x")
            close(got["Q_xx"], st.Q_xx, "Q_xx")
            close(got["V_x"].reshape(B, -1), st.V_x, "V_x")
            close(got["V_xx"], st.V_xx, "V_xx")
            if st.Q_u is None:
                continue
            close(flatten_controls([got["Q_u"]]), st.Q_u, "Q_u")
            close(_dense_qux(solver, t), st.Q_ux, "Q_ux")
            close(got["R"], st.R, "R")
            close(flatten_controls([got["k"]]), st.k, "k")
            close(solver.dense_feedback_gains(t), st.K, "K")
            if t in debug:
                close(flatten_controls([debug[t]["d"]]), st.d, "d")
            else:
                assert float(st.d.abs().max()) == 0.0  # the first controlled stage
            close(flatten_controls([problem.stages[t].controls]).detach(), st.u_new,
                  "applied update")
            if solver.vx == "backprop":  # the sweep's Q_u and V_x are autograd's
                close(flatten_controls([got["Q_u_sweep"]]), flatten_controls([grads[t]]),
                      "Q_u (sweep) vs autograd")
                close(got["V_x"].reshape(B, -1), -B * traj.ps[t].reshape(B, -1),
                      "V_x vs B dJ/dx")
        assert float(info.extra["cap_rate"]) == 0.0  # no cap by default in exact mode
        assert info.extra["vxx_min_eig"].shape == (problem.T,)


@pytest.mark.parametrize("base,lr", [("sgd", 0.1), ("momentum", 0.05), ("rmsprop", 1e-2),
                                     ("adam", 1e-2), ("kfac", 0.1)])
def test_without_feedback_it_is_the_base_optimizer(base, lr):
    p1 = _mlp(0)
    p2 = copy.deepcopy(p1)
    ref = DDPNOpt(p1, lr=lr, base=base, feedback=False)
    ours = DDPNOpt(p2, lr=lr, base=base, feedback=False, vxx="exact")
    for step in range(5):
        x, y = _batch(step, 4)
        ref.step(x, y), ours.step(x, y)
    with torch.no_grad():
        err = max(float((a - b).abs().max()) for a, b in zip(p1.parameters(), p2.parameters(),
                                                              strict=True))
    assert err < 1e-12


@pytest.mark.parametrize("second_order", [False, True])
def test_batch_of_one_is_ddp_with_the_base_curvature(second_order):
    """B = 1, sgd base, vx="ddp", gamma = 1: the exact backward pass is DDP's (Tassa's V_x,
    V_xx from tests/ddp_reference.py's derivatives of the batched stage, with or without
    the second-order dynamics terms) with Q_uu = I / lr, k = -lr Q_u, K = -lr Q_ux;
    "joint" and "per_sample" coincide."""
    lr, eps = 0.2, 0.05
    problem = _mlp(5, wd=0.0)
    x, y = _batch(6, 4, B=1)
    with torch.no_grad():
        xs = [x]
        for st in problem.stages:
            xs.append(st.f(xs[-1], st.controls))
    v_x, v_xx = problem.terminal_derivatives(xs[-1], y)
    expect = {}
    for t in reversed(range(problem.T)):
        u = tuple(v.detach() for v in problem.stages[t].controls)
        q_x, q_u, q_xx, q_ux, _ = _stage_q(problem.stages[t], xs[t], u, v_x, v_xx,
                                           second_order)
        m = q_u.numel()
        k, K = -lr * q_u, -lr * q_ux  # noqa: N806
        q_uu = torch.eye(m, dtype=DT) / lr
        v_x = q_x + K.T @ q_uu @ k + K.T @ q_u + q_ux.T @ k
        v_xx = q_xx + K.T @ q_uu @ K + K.T @ q_ux + q_ux.T @ K + eps * torch.eye(q_xx.shape[0],
                                                                                  dtype=DT)
        expect[t] = (q_u, k, K, v_x, v_xx)
    for c_b in ("joint", "per_sample"):
        p = copy.deepcopy(problem)
        solver = DDPNOpt(p, lr=lr, base="sgd", vxx="exact", vx="ddp", vxx_reg=eps, c_b=c_b,
                         second_order=second_order)
        solver.debug = True
        solver.step(x, y)
        for t, (q_u, k, K, v_x, v_xx) in expect.items():  # noqa: N806
            got = solver.last_backward[t]
            assert float((flatten_controls([got["Q_u"]]) - q_u).abs().max()) < TOL
            assert float((flatten_controls([got["k"]]) - k).abs().max()) < TOL
            assert float((solver.dense_feedback_gains(t)[0] - K).abs().max()) < TOL
            assert float((got["V_x"][0] - v_x).abs().max()) < TOL
            assert float((got["V_xx"][0] - v_xx).abs().max()) < TOL


def test_exact_mode_refuses_conv_stages_and_bad_options():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                        nn.Flatten(), nn.Linear(32, 3)).to(DT)
    with pytest.raises(ConfigError, match=r"stage 0 \(.*Conv2d.*conv stage"):
        DDPNOpt(to_problem(net, "cross_entropy"), vxx="exact")
    with pytest.raises(ConfigError, match="gain"):
        DDPNOpt(_mlp(0), vxx="exact", gain="auto")
    for opt in ("vxx", "vx", "c_b", "terminal_hessian"):
        with pytest.raises(ConfigError, match=opt):
            DDPNOpt(_mlp(0), **{opt: "nonsense"})
    with pytest.raises(ConfigError, match="second_order.*vxx='exact'"):
        DDPNOpt(_mlp(0), second_order=True)


def test_defaults_of_the_two_models():
    outer, exact = DDPNOpt(_mlp(0)), DDPNOpt(_mlp(0), vxx="exact")
    assert (outer.gain, outer.trust, outer.vxx_reg) == (1.0, 0.3, 0.0)
    assert (exact.gain, exact.trust, exact.vx, exact.c_b, exact.terminal_hessian) == (
        1.0, 0.0, "backprop", "joint", "exact")


def test_cap_and_clip_rates_are_reported():
    problem = _mlp(9)
    x, y = _batch(1, 4, B=16)
    info = DDPNOpt(problem, lr=0.5, base="sgd").step(x, y)
    for key in ("cap_rate", "clip_rate"):
        assert 0.0 <= float(info.extra[key]) <= 1.0
    info = DDPNOpt(problem, lr=0.5, base="sgd", gain=1.0, trust=0.0).step(x, y)
    assert float(info.extra["clip_rate"]) == 0.0 and float(info.extra["cap_rate"]) == 0.0
    info = DDPNOpt(problem, lr=0.5, base="sgd", vxx="exact", trust=1e-6).step(x, y)
    assert float(info.extra["cap_rate"]) == 1.0  # a tiny cap binds at every feedback stage


def test_benchmark_quick_runs(tmp_path):
    """benchmarks/ddpnopt_exact.py --quick, in this process (its tables are written)."""
    spec = importlib.util.spec_from_file_location("ddpnopt_exact_bench",
                                                  ROOT / "benchmarks" / "ddpnopt_exact.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "exact.md"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "cosine" in text and "cap_rate" in text


def test_claims_benchmark_quick_runs(tmp_path):
    """benchmarks/ddpnopt_claims.py, a reduced --quick run in this process: every part
    writes its table, and a rerun takes the runs from the cache."""
    spec = importlib.util.spec_from_file_location("ddpnopt_claims_bench",
                                                  ROOT / "benchmarks" / "ddpnopt_claims.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--quick", "--seeds", "1", "--twins", "exact", "--epochs-b", "1", "--max-steps", "5",
            "--runs-b", "sgd;ddpnopt-sgd exact, 2nd-order dynamics", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        bench.main(args)
        n_runs = len((tmp_path / "runs.jsonl").read_text().splitlines())
        bench.main(args + ["--parts", "ab"])  # everything cached: nothing runs again
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "claims.md").read_text()
    assert "Learning-rate sweep" in text and "Vanishing gradients" in text
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == n_runs == 9 * 2 + 2
    assert (tmp_path / "lr_sweep.png").exists() and (tmp_path / "vanishing_gradient.png").exists()
