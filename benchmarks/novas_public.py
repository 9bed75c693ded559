"""ocnet's NOVAS layer side by side with the public NOVAS code (issue 17 item 4, issue 15 item 2).

The public code is iexarchos/NOVAS (Exarchos et al., ICLR 2021), directory ``SPEN``: the
energy regression ``y = x sin x`` (``regression.py``: ``EnergyNet``,
``UnrollEnergyAdaStochSearch``; ``adaptive_stochastic_search.py``: ``ad_stoch_search``;
settings in ``regression_conf.py``). It is not part of this project: obtain it with the
``fetch`` tool (``fetch github:iexarchos/NOVAS``) or ``git clone
https://github.com/iexarchos/NOVAS``, export the tree somewhere outside the project (default
``/tmp/novas_public``) and pass ``--public DIR``. The script imports it from there; the
only shim is ``MPLBACKEND=Agg`` (``regression.py`` imports ``matplotlib.pyplot`` at the top)
and silencing the constructor's prints; on torch 2.13 nothing else needs patching.

Both layers run the public regression settings (``regression_conf.config``): energy net
concat(x, y) -> 3 x (Linear 128 + Softplus) -> Linear 1, minibatch 10, 100 samples,
10 inner iterations, soft-CE shape (10% elites, sharpness 1000), alpha 1, sigma0 10, the
first 9 iterations without a graph and the last one differentiated (``pre_compute_init``),
early stop when the mean moves less than 1e-4. ocnet's layer is ``NOVAS(net, 1,
preset="paper")`` (the same settings; its tolerance is per batch element, the public one on
the norm of the whole batch's step). Both start from the SAME energy-network weights (the
public net's state dict copied into ocnet's ``EnergyNet`` of benchmarks/novas.py).

Sections:

1. Seconds per training update, interleaved in one process: one update = layer forward on
   the same minibatch, MSE, backward, grad clip 1.0, Adam step (lr 1e-3); the public side is
   the body of the public ``RegressionExp.run`` loop verbatim (``squeeze_``, ``F.mse_loss``,
   ``backward(retain_graph=True)``). Entries take turns, the order rotated every round;
   ``time.thread_time`` per update; warm-up rounds excluded; the ratio is the median over
   rounds of the per-round ratio to the public update. The "energy net only" row is the
   arithmetic floor of benchmarks/speed.py's NOVAS section: 9 energy evaluations on
   (batch, samples) candidates without a graph, one with, a softmax-weighted mean, backward,
   clip and the Adam step.
2. Training curves: both layers from the same init on the same minibatch sequence
   (``numpy`` draws as in the public loop), fixed lr 1e-3 (the public plateau schedule,
   patience 20 validations of 100 updates, cannot act within a few hundred updates); the
   full-training-set MSE every 50 updates and the held-out MSE at the end. The sampling
   noise streams differ (ocnet: a ``torch.Generator``; public: the global RNG through
   ``torch.distributions.Normal``), so the curves agree in distribution, not bit for bit.

Usage::

    .venv/bin/python benchmarks/novas_public.py --public /tmp/novas_public
    .venv/bin/python benchmarks/novas_public.py --quick          # seconds
    .venv/bin/python benchmarks/novas_public.py --protocol P100 --updates 1000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ocnet._atomic import atomic_write  # noqa: E402
from ocnet.solvers.novas import NOVAS  # noqa: E402

FETCH_HINT = (
    "fetch github:iexarchos/NOVAS (or git clone https://github.com/iexarchos/NOVAS) and "
    "export its tree to that directory"
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_public(root: Path):
    """The public ``SPEN/regression.py`` module, imported from ``root`` (not copied)."""
    spen = Path(root) / "SPEN"
    if not (spen / "regression.py").is_file() or not (
        spen / "adaptive_stochastic_search.py"
    ).is_file():
        raise SystemExit(
            f"public NOVAS code not found: {spen}/regression.py and "
            f"{spen}/adaptive_stochastic_search.py are missing; {FETCH_HINT}"
        )
    # regression.py does ``from adaptive_stochastic_search import ad_stoch_search``
    sys.path.insert(0, str(spen))
    try:
        _load("adaptive_stochastic_search", spen / "adaptive_stochastic_search.py")
        reg = _load("novas_public_regression", spen / "regression.py")
        conf = _load("novas_public_regression_conf", spen / "regression_conf.py")
    finally:
        sys.path.remove(str(spen))
    return reg, conf.config()


def load_ocnet_bench():
    return _load("ocnet_bench_novas", ROOT / "benchmarks" / "novas.py")


# ----------------------------------------------------------------------------- setup
class Setup:
    """The two layers on the same weights, the public settings, the data."""

    def __init__(self, public_dir: Path, protocol: str, seed: int = 0) -> None:
        self.reg, self.cfg = load_public(public_dir)
        self.bench = load_ocnet_bench()
        cfg = self.cfg
        self.batch, self.samples, self.iters = cfg.n_batch, cfg.n_sample, cfg.n_iter
        torch.manual_seed(seed)
        self.init_public = self.reg.EnergyNet(n_in=1, n_out=1, n_hidden=cfg.n_hidden)
        self.init_ocnet = self.bench.EnergyNet(hidden=cfg.n_hidden)
        src = list(self.init_public.state_dict().values())
        dst = self.init_ocnet.state_dict()
        assert [tuple(v.shape) for v in src] == [tuple(v.shape) for v in dst.values()]
        self.init_ocnet.load_state_dict(dict(zip(dst, src, strict=True)))
        self.xt, self.yt, self.xv, self.yv = self.bench.protocol_data(protocol, seed)
        self.protocol = protocol

    def public_layer(self, net: nn.Module) -> nn.Module:
        cfg = self.cfg
        with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its options
            return self.reg.UnrollEnergyAdaStochSearch(
                Enet=net, n_sample=cfg.n_sample, n_iter=cfg.n_iter, alpha=cfg.alpha,
                kappa=cfg.kappa, sigma=cfg.sigma, opt=cfg.opt, shape_func=cfg.shape_func,
                use_Hessian=cfg.use_Hessian, pre_compute_init=cfg.pre_compute_init)

    def ocnet_layer(self, net: nn.Module, **overrides) -> NOVAS:
        layer = NOVAS(net, 1, preset="paper", **overrides)
        o = layer.options
        assert (o["n_samples"], o["n_iter"], o["shape"], o["alpha"], layer.sigma0) == (
            self.cfg.n_sample, self.cfg.n_iter,
            {"soft_ce": "soft_ce", "standard_exponential": "exponential"}[self.cfg.shape_func],
            self.cfg.alpha, self.cfg.sigma), "ocnet preset differs from regression_conf"
        assert not self.cfg.use_Hessian and self.cfg.pre_compute_init
        return layer


# ----------------------------------------------------------------------------- updates
def public_update(s: Setup):
    net = copy.deepcopy(s.init_public)
    model = s.public_layer(net)
    opt = torch.optim.Adam(model.parameters(), lr=s.cfg.lr_start_value)

    def step(x, y):  # the body of RegressionExp.run (x: (B,), y: (B,))
        y_preds, _, _, _ = model(x.view(-1, 1))
        y_preds.squeeze_(1)
        loss = F.mse_loss(input=y_preds, target=y)
        opt.zero_grad()
        loss.backward(retain_graph=True)
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.detach()

    def predict(x):
        with torch.no_grad():
            return model(x.view(-1, 1))[0].view(-1)

    return step, predict


def ocnet_update(s: Setup, seed: int = 0, **overrides):
    net = copy.deepcopy(s.init_ocnet)
    layer = s.ocnet_layer(net, **overrides)
    opt = torch.optim.Adam(net.parameters(), lr=s.cfg.lr_start_value)
    gen = torch.Generator().manual_seed(seed)

    def step(x, y):
        loss = (layer(x[:, None], generator=gen)[:, 0] - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.detach()

    def predict(x):
        with torch.no_grad():
            return layer(x[:, None], generator=gen)[:, 0]

    return step, predict


def arithmetic_update(s: Setup):
    """The energy evaluations one update makes (benchmarks/speed.py section_novas)."""
    net = copy.deepcopy(s.init_ocnet)
    opt = torch.optim.Adam(net.parameters(), lr=s.cfg.lr_start_value)
    gen = torch.Generator().manual_seed(0)
    B, N, K = s.batch, s.samples, s.iters

    def step(x, y):
        x = x[:, None]
        with torch.no_grad():
            for _ in range(K - 1):
                net(x, torch.randn(B, N, 1, generator=gen))
        Y = torch.randn(B, N, 1, generator=gen)  # noqa: N806
        pred = torch.softmax(-net(x, Y), dim=1)[..., None].mul(Y).sum(1)[:, 0]
        loss = (pred - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return step


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def interleave(entries: dict, args: tuple, rounds: int, warmup: int,
               after_round=None) -> dict[str, list[float]]:
    """Thread CPU seconds of each entry's update on ``args``, the entries taking turns (the
    order rotated every round and reversed every other one); warm-up rounds dropped.
    ``after_round(r)`` runs after each timed round (e.g. to read a diagnostic)."""
    names = list(entries)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        order = names[k:] + names[:k] if r % 2 == 0 else (names[k:] + names[:k])[::-1]
        for n in order:
            c0 = time.thread_time()
            entries[n](*args)
            c1 = time.thread_time()
            if r >= warmup:
                times[n].append(c1 - c0)
        if r >= warmup and after_round is not None:
            after_round(r)
    return times


def timing(s: Setup, rounds: int, warmup: int) -> tuple[list[str], dict]:
    x, y = s.xt[: s.batch, 0].clone(), s.yt[: s.batch, 0].clone()
    torch.manual_seed(1)
    entries = {
        "public NOVAS (iexarchos/NOVAS SPEN)": public_update(s)[0],
        'ocnet NOVAS (preset="paper")': ocnet_update(s)[0],
        'ocnet NOVAS (preset="paper", tol=None: no early-stop test)':
            ocnet_update(s, tol=None)[0],
        'ocnet NOVAS (preset="paper", fused=False: the tensor path)':
            ocnet_update(s, fused=False)[0],
        "energy net only (arithmetic floor)": arithmetic_update(s),
    }
    names = list(entries)
    la0 = loadavg()
    times = interleave(entries, (x, y), rounds, warmup)
    la1 = loadavg()
    pub = times[names[0]]
    rows = [
        f"### Seconds per training update, interleaved ({rounds} rounds after {warmup} "
        f"warm-up, thread CPU time)",
        "",
        f"Protocol {s.protocol}, public settings: minibatch {s.batch}, {s.samples} samples, "
        f"{s.iters} inner iterations (last differentiated), soft-CE, sigma0 {s.cfg.sigma}; "
        "one update = forward, MSE, backward, clip 1.0, Adam. Ratio: median over rounds "
        "of (entry / public) in the same round.",
        "",
        f"load average (1/5/15 min) before {la0}, after {la1}",
        "",
        "| update | median ms | ratio to public (median of per-round ratios) |",
        "|---|---|---|",
    ]
    rec = {"load_before": la0, "load_after": la1, "rounds": rounds, "rows": {}}
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], pub, strict=True))
        ms = 1e3 * statistics.median(times[n])
        rows.append(f"| {n} | {ms:.2f} | {ratio:.3f} |")
        rec["rows"][n] = dict(ms=ms, ratio=ratio)
    return rows, rec


# ----------------------------------------------------------------------------- curves
def curves(s: Setup, updates: int, every: int = 50, seed: int = 0) -> tuple[list[str], dict]:
    xt, yt = s.xt[:, 0], s.yt[:, 0]
    xv, yv = s.xv[:, 0], s.yv[:, 0]
    rng = np.random.RandomState(seed)
    batches = [torch.from_numpy(rng.choice(len(xt), size=s.batch, replace=False))
               for _ in range(updates)]
    torch.manual_seed(seed)  # the public layer draws from the global RNG
    sides = {"public": public_update(s), "ocnet": ocnet_update(s, seed=seed)}
    marks = list(range(every, updates + 1, every))
    if not marks or marks[-1] != updates:
        marks.append(updates)
    train = {k: [] for k in sides}
    secs = {}
    for k, (step, predict) in sides.items():
        c0 = time.thread_time()
        for i, idx in enumerate(batches, 1):
            step(xt[idx], yt[idx])
            if i in marks:
                train[k].append(float((predict(xt) - yt).pow(2).mean()))
        secs[k] = time.thread_time() - c0
    test = {k: float((predict(xv) - yv).pow(2).mean()) for k, (_, predict) in sides.items()}
    same = "the same points" if s.protocol == "P100" else "the held-out 25%"
    rows = [
        f"### Training curves ({updates} updates from the same init, same minibatches)",
        "",
        f"Protocol {s.protocol} ({len(xt)} training points; test on {same}, {len(xv)} "
        "points); Adam lr 1e-3 fixed, minibatch "
        f"{s.batch}. MSE on the whole training set after so many updates (no grad).",
        "",
        "| updates | public train MSE | ocnet train MSE |",
        "|---|---|---|",
        *(f"| {m} | {a:.4f} | {b:.4f} |" for m, a, b in zip(marks, train["public"],
                                                           train["ocnet"], strict=True)),
        f"| test MSE (end) | {test['public']:.4f} | {test['ocnet']:.4f} |",
        f"| CPU s (incl. evaluations) | {secs['public']:.2f} | {secs['ocnet']:.2f} |",
    ]
    return rows, dict(marks=marks, train=train, test=test, seconds=secs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", default="/tmp/novas_public",
                    help="the exported public code (the directory holding SPEN/)")
    ap.add_argument("--out", default="runs/bench/novas_public.md")
    ap.add_argument("--protocol", default="P200", choices=("P200", "P100"))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 100)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 10)")
    ap.add_argument("--updates", type=int, default=None,
                    help="training-curve updates per implementation (default 300)")
    ap.add_argument("--quick", action="store_true", help="10 rounds, 20 updates (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rounds = args.rounds or (10 if args.quick else 100)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    updates = args.updates or (20 if args.quick else 300)
    s = Setup(Path(args.public), args.protocol)
    t0 = time.perf_counter()
    trows, trec = timing(s, rounds, warmup)
    crows, crec = curves(s, updates, every=10 if updates < 100 else 50)
    head = (f"## ocnet NOVAS vs the public NOVAS code ({'quick' if args.quick else 'full'}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); public code "
            f"from {args.public}")
    text = "\n".join([head, "", *trows, "", *crows, "",
                      f"Total wall time {time.perf_counter() - t0:.1f} s.", ""])
    print(text, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return dict(timing=trec, curves=crec)


if __name__ == "__main__":
    main()
