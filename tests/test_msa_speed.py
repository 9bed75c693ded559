"""E-MSA's fast paths are the same computation: the per-run layout reductions against index
sums, the compact L-BFGS direction against the two-loop recursion (a reference copy of the
former inner solver lives here), and the structure that makes the cost flat (no bookkeeping
operation per layer, no full-size temporary per control tensor). No timings: the speed
targets live in benchmarks/emsa_speed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ocnet.bridge import to_problem
from ocnet.bridge.modules import ModuleStage
from ocnet.models import ResidualBlock, build_model
from ocnet.solvers.msa import EMSA, _Frozen

DT = torch.float64


def _assert_same_runs(runs: list, rtol: float, atol: float) -> None:
    """Two runs' final controls and every step's Htilde after the inner solve agree."""
    (z_new, i_new), (z_ref, i_ref) = runs
    torch.testing.assert_close(z_new, z_ref, rtol=rtol, atol=atol)
    for a, b in zip(i_new, i_ref, strict=True):
        torch.testing.assert_close(a.extra["htilde_after"], b.extra["htilde_after"],
                                   rtol=rtol, atol=atol)


def _net(depth: int = 3, width: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(),
                         *[ResidualBlock(width, 0.5, "tanh") for _ in range(depth)],
                         nn.Linear(width, 2)).to(DT)


def _data(b: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, generator=g, dtype=DT), torch.randn(b, 2, generator=g, dtype=DT)


def _seg(lay) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(lay.L),
                                   torch.tensor([sum(s) for s in lay.sizes]))


# ---------------------------------------------------------------------------- the layout
def test_runs_group_consecutive_equal_layers():
    lay = EMSA(to_problem(_net(depth=5), "mse")).layout
    assert [(k, n) for _, k, n in lay.runs] == [(1, 16), (5, 20), (1, 10)]
    deeper = EMSA(to_problem(_net(depth=40), "mse")).layout
    assert len(deeper.runs) == len(lay.runs)  # the bookkeeping does not grow with depth


def test_layout_reductions_equal_index_sums():
    lay = EMSA(to_problem(_net(depth=4), "mse")).layout
    g = torch.Generator().manual_seed(2)
    n, L = lay.numel, lay.L  # noqa: N806
    seg = _seg(lay)
    M = torch.randn(5, n, generator=g, dtype=DT)  # noqa: N806
    V = torch.randn(3, n, generator=g, dtype=DT)  # noqa: N806
    C = torch.randn(5, L, generator=g, dtype=DT)  # noqa: N806
    v, s = torch.randn(n, generator=g, dtype=DT), torch.randn(L, generator=g, dtype=DT)
    cond = torch.arange(L) % 2 == 0

    def ref_sum(x):
        return x.new_zeros(x.shape[:-1] + (L,)).index_add_(-1, seg, x)

    torch.testing.assert_close(lay.seg_sum(M), ref_sum(M), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lay.dot(v, M[0]), ref_sum(v * M[0]), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lay.grams(M, V), ref_sum(M[:, None] * V[None]),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lay.combine(C, M, v, s), s[seg] * v + (C[:, seg] * M).sum(0),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lay.expand(s), s[seg])
    torch.testing.assert_close(lay.scale(v, s, add=M[1]), M[1] + s[seg] * v)
    torch.testing.assert_close(lay.where(cond, v, M[2]), torch.where(cond[seg], v, M[2]))
    zs = lay.views(v)
    assert all(u.data_ptr() >= v.data_ptr() for us in zs for u in us)  # views, no copies
    torch.testing.assert_close(torch.cat([u.reshape(-1) for us in zs for u in us]), v)


# ---------------------------------------------------------------------------- the two-loop
def _two_loop_lbfgs(self, z, phi, g, fr, history):
    """The former inner solver (two-loop recursion over index-based segment sums)."""
    lay = self.layout
    seg = _seg(lay).to(z.device)

    def seg_sum(v):
        return v.new_zeros(lay.L).index_add_(0, seg, v)

    def expand(s):
        return s[seg]

    m = self.history if history is None else history
    n, L = z.numel(), lay.L  # noqa: N806
    S, Y, R = z.new_zeros(m, n), z.new_zeros(m, n), z.new_zeros(m, L)  # noqa: N806
    if m:
        gamma = self.lr * torch.clamp(1.0 / seg_sum(g.abs()), max=1.0)
        gamma = torch.nan_to_num(gamma, nan=self.lr, posinf=self.lr)
    else:
        gamma = torch.full((L,), self.lr, dtype=z.dtype, device=z.device)
    tau = torch.ones(L, dtype=z.dtype, device=z.device)
    head, count = 0, 0
    for _ in range(self.inner_iters):
        q = g.clone()
        slots = [(head - 1 - j) % m for j in range(min(count, m))] if m else []
        alphas = []
        for j in slots:
            a = R[j] * seg_sum(S[j] * q)
            q -= expand(a) * Y[j]
            alphas.append(a)
        r = expand(gamma) * q
        for j, a in zip(reversed(slots), reversed(alphas), strict=True):
            b = R[j] * seg_sum(Y[j] * r)
            r += S[j] * expand(a - b)
        d = -r
        gd = seg_sum(g * d)
        descent = gd < 0
        d = torch.where(expand(descent), d, -expand(gamma) * g)
        gd = torch.where(descent, gd, -gamma * seg_sum(g * g))
        zc = z + expand(tau) * d
        phic, gc = self.evaluate(zc, fr)
        ok = torch.isfinite(phic) & (phic <= phi + self.c1 * tau * gd)
        okx = expand(ok)
        if m:
            s = torch.where(okx, zc - z, 0.0)
            yv = torch.where(okx, gc - g, 0.0)
            sy, yy, ss = seg_sum(s * yv), seg_sum(yv * yv), seg_sum(s * s)
            good = ok & (sy > 1e-10 * torch.sqrt(ss * yy))
            S[head] = torch.where(expand(good), s, 0.0)
            Y[head] = torch.where(expand(good), yv, 0.0)
            R[head] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
            gamma = torch.where(good, sy / torch.where(good, yy, 1.0), gamma)
            head, count = (head + 1) % m, count + 1
        grow = torch.ones_like(tau) if m else torch.clamp(2 * tau, max=1.0)
        excess = phic - phi - tau * gd
        fit = torch.isfinite(excess) & (excess > 0)
        t_q = -gd * tau * tau / (2 * torch.where(fit, excess, 1.0))
        shrink = torch.where(fit, torch.minimum(torch.maximum(t_q, 0.1 * tau), 0.5 * tau),
                             0.5 * tau)
        tau = torch.where(ok, grow, shrink)
        z = torch.where(okx, zc, z)
        g = torch.where(okx, gc, g)
        phi = torch.where(ok, phic, phi)
    return z, phi, None  # as EMSA._lbfgs with the evaluation budget (no step counts)


@pytest.mark.parametrize("options", [{"history": 3, "inner_iters": 9},  # a full memory
                                     {"history": 1, "inner_iters": 8},  # window moves 3 times
                                     {"inner_iters": 6, "weight_decay": 1e-3},
                                     {"inner": "gd", "inner_iters": 5}])
def test_compact_lbfgs_iterates_equal_the_two_loop_recursion(options):
    x, y = _data()
    runs = []
    for reference in (False, True):
        prob = to_problem(_net(depth=3), "mse")
        solver = EMSA(prob, rho=2.0, **options)
        if reference:
            solver._lbfgs = _two_loop_lbfgs.__get__(solver)
        infos = [solver.step(x, y) for _ in range(3)]
        runs.append((torch.cat([u.detach().reshape(-1) for u in prob.parameters()]), infos))
    _assert_same_runs(runs, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- flat structure
class _Ops(TorchDispatchMode):
    """Counts dispatched operators and the outputs with exactly ``numel`` elements."""

    def __init__(self, numel: int = -1) -> None:
        super().__init__()
        self.ops, self.full, self.numel = 0, [], numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.full.append(str(func))
        return out


def _frozen(solver: EMSA, x, y) -> tuple[torch.Tensor, torch.Tensor, _Frozen]:
    prob, lay = solver.problem, solver.layout
    _, grads, traj = prob.value_and_gradients(x, y, keep_costates=True)
    fr = _Frozen([traj.xs[t].detach().requires_grad_(True) for t in lay.stages],
                 [traj.xs[t + 1] for t in lay.stages], [traj.ps[t] for t in lay.stages],
                 [traj.ps[t + 1] for t in lay.stages], 1.0, x.shape[0])
    return lay.flatten(prob.controls).detach(), lay.flatten(grads), fr


def _bookkeeping_ops(depth: int) -> int:
    prob = to_problem(_net(depth=depth), "mse")
    solver = EMSA(prob, inner_iters=12, history=4)
    x, y = _data()
    z, g, fr = _frozen(solver, x, y)
    phi, gz = solver.evaluate(z, fr)
    # accepted trials (the gradient row `out` is left as it is)
    solver.evaluate = lambda zc, fr, need_grad=True, out=None: (phi - 1e-3, gz * 0.5)
    with _Ops() as ops:
        solver._lbfgs(z, phi, g, fr, None)
    return ops.ops


def test_inner_bookkeeping_does_not_grow_with_depth():
    """The L-BFGS iteration runs the same operators for 5 or 40 residual blocks."""
    assert _bookkeeping_ops(5) == _bookkeeping_ops(40)


def test_evaluation_makes_no_full_size_copy_per_control_tensor():
    """One evaluation writes the flat gradient once (the cat of the leaves' gradients): the
    former views of one flat leaf made autograd add a zero-padded copy per tensor."""
    prob = to_problem(build_model("mlp", 6, 3, width=8, depth=4).to(DT), "cross_entropy")
    solver = EMSA(prob)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 6, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    z, _, fr = _frozen(solver, x, y)
    for closed, one in ((True, "aten.new_empty.default"), (False, "aten.cat.default")):
        if not closed:  # the autograd evaluation (the closed form writes into one new_empty)
            solver.closed_form, fr.closed = None, None
        with _Ops(solver.layout.numel) as ops:
            solver.evaluate(z, fr)
        made = [f for f in ops.full if not any(w in f for w in ("detach", "alias", "view"))]
        assert made == [one], made


# ---------------------------------------------------------------------------- closed form
def _nets() -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    frozen_bias = nn.Linear(5, 5)
    frozen_bias.bias.requires_grad_(False)
    return {
        "mlp": build_model("mlp", 6, 3, width=8, depth=3).to(DT),
        "relu": build_model("mlp", 6, 3, width=8, depth=3, activation="relu").to(DT),
        "residual": nn.Sequential(nn.Linear(6, 5), nn.Tanh(),
                                  *[ResidualBlock(5, 0.5, "tanh") for _ in range(4)],
                                  ResidualBlock(5, 0.3, "relu"), nn.Linear(5, 3)).to(DT),
        "fixed bias": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), frozen_bias, nn.Tanh(),
                                    nn.Linear(5, 3)).to(DT),
    }


@pytest.mark.parametrize("decay", [0.0, 0.05])
@pytest.mark.parametrize("name", ["mlp", "relu", "residual", "fixed bias"])
@pytest.mark.parametrize("rho, scaling", [(0.0, "mean"), (2.0, "mean"), (2.0, "reference")])
def test_closed_form_evaluation_equals_autograd(name, rho, scaling, decay):
    """The closed-form Htilde and gradient of dense layers equal the autograd evaluation
    (float64), away from the frozen iterate (where both penalties are non-zero), with and
    without to_problem's weight decay as the layers' running cost."""
    net = _nets()[name]
    solver = EMSA(to_problem(net, "cross_entropy", weight_decay=decay), rho=rho,
                  scaling=scaling)
    assert solver.closed_form is not None
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 6, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    z, _, fr = _frozen(solver, x, y)
    fr.rho = rho
    zc = z + 0.3 * torch.randn(z.shape, generator=g, dtype=DT)
    phi, grad = solver.evaluate(zc, fr)
    assert fr.closed  # the closed form ran
    phi_ref, grad_ref = solver._finish(zc, *solver._evaluate_autograd(zc, fr))
    torch.testing.assert_close(phi, phi_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-13)
    phi_only, none = solver.evaluate(zc, fr, need_grad=False)
    assert none is None
    torch.testing.assert_close(phi_only, phi, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "relu", "residual"])
def test_closed_form_reused_buffers_and_out_equal_autograd(name):
    """The closed form keeps its temporaries between evaluations and writes into a given
    gradient row: repeated evaluations at other points and another batch size still equal
    the autograd evaluation (float64), and the gradient is the ``out`` tensor."""
    g = torch.Generator().manual_seed(3)
    solver = EMSA(to_problem(_nets()[name], "cross_entropy"), rho=2.0, weight_decay=1e-3)
    for b in (7, 7, 4):
        x, y = torch.randn(b, 6, generator=g, dtype=DT), torch.randint(0, 3, (b,), generator=g)
        z, _, fr = _frozen(solver, x, y)
        fr.rho = 2.0
        for _ in range(2):
            zc = z + 0.3 * torch.randn(z.shape, generator=g, dtype=DT)
            out = torch.full_like(z, float("nan"))
            phi, grad = solver.evaluate(zc, fr, out=out)
            assert fr.closed and grad is out
            phi_ref, grad_ref = solver._finish(zc, *solver._evaluate_autograd(zc, fr))
            torch.testing.assert_close(phi, phi_ref, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["mlp", "residual"])
def test_closed_form_steps_equal_autograd_steps(name):
    """Whole E-MSA steps (L-BFGS, weight decay) with either evaluation end at the same
    controls."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 6, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    runs = []
    for closed in (True, False):
        prob = to_problem(_nets()[name], "cross_entropy")
        solver = EMSA(prob, rho=2.0, weight_decay=1e-3)
        assert solver.closed_form is not None
        if not closed:
            solver.closed_form = None
        infos = [solver.step(x, y) for _ in range(3)]
        runs.append((torch.cat([u.detach().reshape(-1) for u in prob.parameters()]), infos))
    _assert_same_runs(runs, rtol=1e-9, atol=1e-11)


def test_closed_form_covers_only_what_it_describes():
    """A running cost other than to_problem's weight decay, a coupling or a layer it does not
    know: the autograd evaluation."""
    net = build_model("mlp", 6, 3, width=8, depth=2).to(DT)
    assert EMSA(to_problem(net, "cross_entropy", weight_decay=1e-3)).closed_form is not None

    class StateCost(ModuleStage):  # a running cost with a state term: not covered
        def cost(self, x, u):
            return (x * x).sum(-1).mean()

    prob = to_problem(net, "cross_entropy", weight_decay=1e-3)
    prob.stages[0].__class__ = StateCost
    assert EMSA(prob).closed_form is None
    gelu = build_model("mlp", 6, 3, width=8, depth=2, activation="gelu").to(DT)
    assert EMSA(to_problem(gelu, "cross_entropy")).closed_form is None
    cnn = build_model("cnn", 64, 10, image_shape=(1, 8, 8)).to(DT)
    assert EMSA(to_problem(cnn, "cross_entropy")).closed_form is None


def test_emsa_speed_benchmark_quick_runs(capsys):
    """benchmarks/emsa_speed.py, reduced to one network and one round, in this process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "emsa_speed.py"
    spec = importlib.util.spec_from_file_location("emsa_speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--rounds", "1", "--warmup", "0", "--networks", "mlp",
                    "--sweep", "none"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| mlp |" in out and "load average at the end" in out
