"""ocnet's DCEM layer side by side with the public DCEM code (issue 15 item 2).

The public code is facebookresearch/dcem (Amos & Yarats, ICML 2020): ``dcem/dcem.py``
(``dcem``) and the energy regression ``y = x sin x`` of ``exps/regression.py``
(``EnergyNet``, ``UnrollEnergyCEM``, ``RegressionExp.run``; settings in
``exps/regression-conf.yaml``). ``dcem.py`` imports ``LML`` from locuslab/lml (one file,
``lml.py``, which imports ``semantic_version``). None of it is part of this project:
obtain the two repositories with the ``fetch`` tool (``fetch github:facebookresearch/dcem``,
``fetch github:locuslab/lml``) or ``git clone``, export the trees outside the project
(defaults ``/tmp/dcem_public`` and ``/tmp/lml_public``) and pass ``--public DIR`` and
``--lml DIR``; ``semantic_version`` must be importable (``pip install --target
/tmp/dcem_deps semantic_version`` and ``--deps /tmp/dcem_deps``). (The PyPI package
named ``lml`` is an unrelated plugin manager, not this layer.) The script imports the
public files from there, unchanged. Shims, all for imports only: ``exps/regression.py``
imports ``hydra``, ``higher``, ``setproctitle`` and ``torchvision`` for its ``main``, its
gradient-descent baseline and nothing else; while it is imported, stub modules stand in
for those four (``hydra.main`` an identity decorator, ``setproctitle`` a no-op), so
``EnergyNet`` and ``UnrollEnergyCEM.forward`` run verbatim. ``dcem.py`` reads
``np.infty``, which numpy 2 removed: where it is missing it is set to ``np.inf``. The
"LML Warning" lines ``lml.py`` prints are captured and counted.

Settings (``regression-conf.yaml``, model ``dcem``): 100 samples, 10 elites, 10
iterations, init_sigma 7, temp 1, normalize True (the public forward passes
``normalize=self.temp``, truthy, so normalisation is on whatever ``normalize`` says),
init_mu 0; the defaults of ``dcem``: ``lml_eps=1e-3`` and early stop when the norm of
the whole batch's mean step is below ``iter_eps=1e-4``. ocnet's layer is ``DCEM(net, 1,
preset="paper")``. Differences (also printed with the tables): the preset has no early
stop (``tol=None``: all 10 iterations always run; ``tol=1e-4, check_every=1`` is the
public stop, per batch element instead of on the whole batch's norm, the same for a
batch of one), so a row with that override is timed too; LML: the public layer searches
nu on a 10-point grid (CPU) per round until the bracket is below 1e-3 (up to 100 rounds,
a host synchronisation each), ocnet bisects a fixed number of times with no
synchronisation (by default as many as the dtype resolves, 33 in float32: more change no
bit; same backward formula); ``var_floor`` 1e-10 under ocnet's square root (none in the public
code); ocnet divides by ``temperature``, the public code multiplies by ``temp`` (the same
at 1). Both start from the SAME energy-network weights (the public net's state dict
copied into ocnet's ``EnergyNet`` of benchmarks/novas.py).

Sections:

1. Agreement with the same sampling noise: the public layer draws its noise from the
   global RNG (``Normal(mu, sigma).rsample``, one draw of 100 per iteration); the same
   draws are replayed into ocnet's layer as ``noise=``, then the outputs and the energy
   net's gradients are compared on a few samples.
2. Seconds per training update, interleaved in one process: one update = the body of the
   public ``RegressionExp.run`` inner loop verbatim (one sample ``x_j``, forward,
   ``F.mse_loss``, ``backward(retain_graph=True)``, clip 1.0, Adam lr 1e-3) against the
   same on ocnet's layer, on the same sample. Entries take turns, the order rotated every
   round; ``time.thread_time`` per update; warm-up rounds excluded; the ratio is the
   median over rounds of the per-round ratio to the public update. The "energy net only"
   row is the arithmetic floor: 10 differentiated energy evaluations on 100 candidates, an
   LML-free softmax-weighted mean of each, backward, clip and the Adam step. A diagnostic
   row runs ocnet's layer with 20 LML bisections instead of 33 (``n_bisect``, a
   per-call override of :func:`ocnet.solvers.novas.dcem`), to show what the fixed
   bisection count costs at batch size one.
3. Training curves: both layers from the same init on the same sample sequence
   (``numpy`` ``randint`` draws, 3 updates per sample, as in the public loop), fixed lr
   1e-3 (the public plateau schedule, patience 20 validations of 100 updates, cannot act
   within ~1000 updates); the full-set MSE (the 100 points, the public protocol trains and
   tests on them) every 100 updates, without a graph. The noise streams differ (ocnet: a
   ``torch.Generator``; public: the global RNG), so the curves agree in distribution,
   not bit for bit.

Usage::

    .venv/bin/python benchmarks/dcem_public.py --public /tmp/dcem_public --lml /tmp/lml_public \\
        --deps /tmp/dcem_deps --out benchmarks/results/dcem_public.md
    .venv/bin/python benchmarks/dcem_public.py --quick          # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ocnet._atomic import atomic_write  # noqa: E402
from ocnet.solvers.novas import DCEM  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
# the module loader, the energy net of benchmarks/novas.py and the load average are shared
from novas_public import _load, interleave, load_ocnet_bench, loadavg  # noqa: E402

FETCH_HINT = (
    "fetch github:facebookresearch/dcem and github:locuslab/lml (or git clone "
    "https://github.com/facebookresearch/dcem and https://github.com/locuslab/lml) and "
    "export their trees to --public and --lml"
)
#: exps/regression-conf.yaml (model dcem) and the run loop of exps/regression.py
CONF = dict(n_sample=100, n_elite=10, n_iter=10, init_sigma=7.0, temp=1.0, normalize=True,
            n_hidden=128, n_samples=100, n_inner_update=3, lr=1e-3, clip=1.0)


def _stubs() -> dict[str, types.ModuleType]:
    """Stand-ins for the imports regression.py needs only for ``main`` and the GD baseline."""
    hydra = types.ModuleType("hydra")
    hydra.main = lambda *a, **k: (lambda fn: fn)
    hydra.utils = types.SimpleNamespace(instantiate=None)
    spt = types.ModuleType("setproctitle")
    spt.setproctitle = lambda *a, **k: None
    tv = types.ModuleType("torchvision")
    tv.datasets = tv.transforms = types.ModuleType("torchvision.stub")
    return {"hydra": hydra, "higher": types.ModuleType("higher"), "setproctitle": spt,
            "torchvision": tv}


def load_public(root: Path, lml_dir: Path, deps: Path | None):
    """The public ``exps/regression.py`` module (``dcem`` package and ``lml`` from the dirs)."""
    root, lml_dir = Path(root), Path(lml_dir)
    need = [root / "dcem" / "dcem.py", root / "exps" / "regression.py", lml_dir / "lml.py"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise SystemExit(f"public DCEM code not found: {', '.join(missing)} missing; "
                         f"{FETCH_HINT}")
    if not hasattr(np, "infty"):  # numpy 2 removed the alias dcem.py uses
        np.infty = np.inf
    paths = [str(root), str(lml_dir)] + ([str(deps)] if deps else [])
    sys.path[:0] = paths
    stubs = {k: v for k, v in _stubs().items() if k not in sys.modules}
    sys.modules.update(stubs)
    try:
        try:
            import semantic_version  # noqa: F401  (lml.py needs it)
        except ImportError:
            raise SystemExit("lml.py imports semantic_version: pip install --target "
                             "/tmp/dcem_deps semantic_version and pass --deps /tmp/dcem_deps"
                             ) from None
        reg = _load("dcem_public_regression", root / "exps" / "regression.py")
    finally:
        for k in stubs:
            sys.modules.pop(k, None)
        for p in paths:
            sys.path.remove(p)
    return reg


# ----------------------------------------------------------------------------- setup
class Setup:
    """The two layers on the same weights, the public settings, the data."""

    def __init__(self, public_dir: Path, lml_dir: Path, deps: Path | None, seed: int = 0):
        self.reg = load_public(public_dir, lml_dir, deps)
        self.bench = load_ocnet_bench()
        torch.manual_seed(seed)
        self.init_public = self.reg.EnergyNet(n_in=1, n_out=1, n_hidden=CONF["n_hidden"])
        self.init_ocnet = self.bench.EnergyNet(hidden=CONF["n_hidden"])
        src = list(self.init_public.state_dict().values())
        dst = self.init_ocnet.state_dict()
        assert [tuple(v.shape) for v in src] == [tuple(v.shape) for v in dst.values()]
        self.init_ocnet.load_state_dict(dict(zip(dst, src, strict=True)))
        # RegressionExp.load_data
        self.x = torch.linspace(0.0, 2.0 * np.pi, steps=CONF["n_samples"])
        self.y = self.x * torch.sin(self.x)
        self.lml_warnings = 0

    def public_layer(self, net: nn.Module) -> nn.Module:
        c = CONF
        return self.reg.UnrollEnergyCEM(net, n_sample=c["n_sample"], n_elite=c["n_elite"],
                                        n_iter=c["n_iter"], init_sigma=c["init_sigma"],
                                        temp=c["temp"], normalize=c["normalize"])

    def call_public(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # lml.py prints its convergence warnings
            out = model(x)
        self.lml_warnings += buf.getvalue().count("LML Warning")
        return out

    @staticmethod
    def ocnet_layer(net: nn.Module, **overrides) -> DCEM:
        layer = DCEM(net, 1, preset="paper", **overrides)
        o, c = layer.options, CONF
        assert (o["n_samples"], o["n_elite"], o["n_iter"], layer.sigma0, o["temperature"],
                o["normalize"], layer.mu0) == (
            c["n_sample"], c["n_elite"], c["n_iter"], c["init_sigma"], c["temp"],
            c["normalize"], 0.0), "ocnet preset differs from regression-conf.yaml"
        return layer


# ----------------------------------------------------------------------------- updates
def public_update(s: Setup):
    net = copy.deepcopy(s.init_public)
    model = s.public_layer(net)
    opt = torch.optim.Adam(net.parameters(), lr=CONF["lr"])

    def step(xj, yj):  # the body of RegressionExp.run's inner loop (xj, yj: 0-d)
        y_preds = s.call_public(model, xj.view(1)).squeeze()
        loss = F.mse_loss(input=y_preds, target=yj)
        opt.zero_grad()
        loss.backward(retain_graph=True)
        nn.utils.clip_grad_norm_(net.parameters(), CONF["clip"])
        opt.step()
        return loss.detach()

    def predict(x):
        with torch.no_grad():
            return s.call_public(model, x.view(-1, 1)).view(-1)

    return step, predict


def ocnet_update(s: Setup, seed: int = 0, call: dict | None = None, **overrides):
    net = copy.deepcopy(s.init_ocnet)
    layer = s.ocnet_layer(net, **overrides)
    call = call or {}
    opt = torch.optim.Adam(net.parameters(), lr=CONF["lr"])
    gen = torch.Generator().manual_seed(seed)

    def step(xj, yj):
        loss = F.mse_loss(layer(xj.view(1, 1), generator=gen, **call).squeeze(), yj)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), CONF["clip"])
        opt.step()
        return loss.detach()

    def predict(x):
        with torch.no_grad():
            return layer(x.view(-1, 1), generator=gen).view(-1)

    step.layer = layer
    return step, predict


def arithmetic_update(s: Setup):
    """The energy evaluations one DCEM update differentiates, nothing else."""
    net = copy.deepcopy(s.init_ocnet)
    opt = torch.optim.Adam(net.parameters(), lr=CONF["lr"])
    gen = torch.Generator().manual_seed(0)
    N, K = CONF["n_sample"], CONF["n_iter"]

    def step(xj, yj):
        x = xj.view(1, 1)
        pred = 0.0
        for _ in range(K):
            Y = 7.0 * torch.randn(1, N, 1, generator=gen)  # noqa: N806
            pred = pred + torch.softmax(-net(x, Y), dim=1)[..., None].mul(Y).sum(1)
        loss = F.mse_loss(pred.squeeze() / K, yj)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), CONF["clip"])
        opt.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- agreement
def agreement(s: Setup, points=(3, 25, 50, 80)) -> tuple[list[str], dict]:
    """Same weights, same noise: the public forward/backward against ocnet's."""
    K, N = CONF["n_iter"], CONF["n_sample"]
    rows = [
        "### Agreement with the same sampling noise (one forward + backward, initial weights)",
        "",
        "The public layer's global-RNG draws replayed into ocnet's as `noise=`. ocnet "
        "with the preset (10 iterations) and with `tol=1e-4, check_every=1` (the public "
        "early stop); max |grad| difference over the energy net's parameters, relative "
        "to the largest public gradient entry.",
        "",
        "| x_j | public y | ocnet y (preset) | ocnet y (tol 1e-4) | ocnet iterations "
        "(tol 1e-4) | rel. grad diff (preset) | rel. grad diff (tol 1e-4) |",
        "|---|---|---|---|---|---|---|",
    ]
    rec = []
    for j in points:
        xj, yj = s.x[j], s.y[j]
        pnet = copy.deepcopy(s.init_public)
        torch.manual_seed(100 + j)
        yp = s.call_public(s.public_layer(pnet), xj.view(1)).squeeze()
        F.mse_loss(yp, yj).backward()
        gp = torch.cat([p.grad.flatten() for p in pnet.parameters()])
        torch.manual_seed(100 + j)  # the same draws as Normal.rsample((N,)) per iteration
        noise = torch.stack([torch.empty(N, 1, 1).normal_().transpose(0, 1)
                             for _ in range(K)])
        out = [f"| {float(xj):.3f} | {float(yp.detach()):.5f}"]
        diffs, its = [], None
        for over in ({}, {"tol": 1e-4, "check_every": 1}):
            onet = copy.deepcopy(s.init_ocnet)
            layer = s.ocnet_layer(onet, **over)
            yo = layer(xj.view(1, 1), noise=noise).squeeze()
            F.mse_loss(yo, yj).backward()
            go = torch.cat([p.grad.flatten() for p in onet.parameters()])
            diffs.append(float((go - gp).abs().max() / gp.abs().max()))
            out.append(f"{float(yo.detach()):.5f}")
            if over:
                its = int(layer.last_result.iterations[0])
        out += [str(its), f"{diffs[0]:.2e}", f"{diffs[1]:.2e} |"]
        rows.append(" | ".join(out))
        rec.append(dict(x=float(xj), y_public=float(yp.detach()), grad_diff=diffs, iterations=its))
    return rows, {"points": rec}


# ----------------------------------------------------------------------------- timing
def timing(s: Setup, rounds: int, warmup: int) -> tuple[list[str], dict]:
    j = 37
    xj, yj = s.x[j].clone(), s.y[j].clone()
    torch.manual_seed(1)
    tol_step = ocnet_update(s, tol=1e-4, check_every=1)[0]
    entries = {
        "public DCEM (facebookresearch/dcem)": public_update(s)[0],
        'ocnet DCEM (preset="paper": 10 iterations, no early stop)': ocnet_update(s)[0],
        'ocnet DCEM (preset="paper", tol=1e-4, check_every=1: the public early stop)':
            tol_step,
        'ocnet DCEM (preset="paper", n_bisect=20 instead of 33: diagnostic)':
            ocnet_update(s, call={"n_bisect": 20})[0],
        "energy net only (arithmetic floor)": arithmetic_update(s),
    }
    names = list(entries)
    iters: list[int] = []
    la0 = loadavg()
    times = interleave(entries, (xj, yj), rounds, warmup, after_round=lambda r: iters.append(
        int(tol_step.layer.last_result.iterations[0])))
    la1 = loadavg()
    pub = times[names[0]]
    rows = [
        f"### Seconds per training update, interleaved ({rounds} rounds after {warmup} "
        f"warm-up, thread CPU time)",
        "",
        f"Public settings: one sample (x_{j} = {float(xj):.3f}), {CONF['n_sample']} samples, "
        f"{CONF['n_elite']} elites (LML), {CONF['n_iter']} iterations (all differentiated), "
        f"init_sigma {CONF['init_sigma']}, temp {CONF['temp']}, energies normalised; one "
        "update = forward, MSE, backward, clip 1.0, Adam. Each entry trains its own copy from "
        "the same weights on the same sample. Ratio: median over rounds of (entry / public) "
        "in the same round.",
        "",
        f"load average (1/5/15 min) before {la0}, after {la1}",
        "",
        "| update | median ms | ratio to public (median of per-round ratios) |",
        "|---|---|---|",
    ]
    rec = {"load_before": la0, "load_after": la1, "rounds": rounds, "rows": {},
           "tol_iterations_median": statistics.median(iters)}
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], pub, strict=True))
        ms = 1e3 * statistics.median(times[n])
        rows.append(f"| {n} | {ms:.2f} | {ratio:.3f} |")
        rec["rows"][n] = dict(ms=ms, ratio=ratio)
    rows += ["", f"With `tol=1e-4` ocnet ran a median of {statistics.median(iters)} "
             f"iterations per update (range {min(iters)}-{max(iters)})."]
    return rows, rec


# ----------------------------------------------------------------------------- curves
def curves(s: Setup, updates: int, every: int = 100, seed: int = 0) -> tuple[list[str], dict]:
    n_in = CONF["n_inner_update"]
    rng = np.random.RandomState(seed)
    js = [int(rng.randint(CONF["n_samples"])) for _ in range(math.ceil(updates / n_in))]
    seq = [j for j in js for _ in range(n_in)][:updates]
    torch.manual_seed(seed)  # the public layer draws from the global RNG
    sides = {"public": public_update(s), "ocnet": ocnet_update(s, seed=seed)}
    marks = [0, *range(every, updates + 1, every)]
    if marks[-1] != updates:
        marks.append(updates)
    mse = {k: [] for k in sides}
    secs = {}
    for k, (step, predict) in sides.items():
        mse[k].append(float((predict(s.x) - s.y).pow(2).mean()))
        c0 = time.thread_time()
        for i, j in enumerate(seq, 1):
            step(s.x[j], s.y[j])
            if i in marks:
                mse[k].append(float((predict(s.x) - s.y).pow(2).mean()))
        secs[k] = time.thread_time() - c0
    rows = [
        f"### Training curves ({updates} updates from the same init, same sample sequence)",
        "",
        f"The public protocol: {CONF['n_samples']} points on linspace(0, 2pi), one random "
        f"sample per outer step (numpy RandomState({seed}).randint), {n_in} Adam updates on "
        "it, lr 1e-3 fixed, clip 1.0. MSE on all 100 points after so many updates (no "
        "graph; the public early stop then acts on the whole 100-point batch, ocnet's "
        "preset runs 10 iterations).",
        "",
        "| updates | public full-set MSE | ocnet full-set MSE |",
        "|---|---|---|",
        *(f"| {m} | {a:.4f} | {b:.4f} |" for m, a, b in zip(marks, mse["public"],
                                                           mse["ocnet"], strict=True)),
        f"| CPU s (incl. evaluations) | {secs['public']:.2f} | {secs['ocnet']:.2f} |",
    ]
    return rows, dict(marks=marks, mse=mse, seconds=secs)


DIFFERENCES = [
    "### Settings: public (regression-conf.yaml + dcem defaults) vs ocnet preset=\"paper\"",
    "",
    "| setting | public | ocnet preset | same? |",
    "|---|---|---|---|",
    "| samples / elites / iterations | 100 / 10 / 10 | 100 / 10 / 10 | yes |",
    "| init mu / init sigma | 0 / 7 | 0 / 7 | yes |",
    "| temperature | `-z * temp`, temp 1 | `-z / temperature`, 1 | yes at 1 (inverse "
    "convention otherwise) |",
    "| normalise energies | yes (`normalize=self.temp`: the config's flag is ignored) | "
    "yes | yes |",
    "| iterations differentiated | all | all | yes |",
    "| early stop | `iter_eps=1e-4` on the whole batch's mean-step norm | none (`tol=None`) "
    "| **no** (`tol=1e-4, check_every=1` matches for a batch of one) |",
    "| LML solve | 10-point grid search on nu until the bracket < `lml_eps=1e-3` (<= 100 "
    "rounds, host sync each) | 33 bisections (float32), no sync | close (nu within 5e-4 vs "
    "exact) |",
    "| LML backward | implicit, h = y(1-y) | implicit, h = p(1-p) | yes |",
    "| sigma update | sqrt(var) | sqrt(var + 1e-10) | ~yes |",
    "| sampling noise | global RNG, `Normal.rsample` | `torch.Generator` / `noise=` | "
    "stream only |",
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", default="/tmp/dcem_public",
                    help="the exported facebookresearch/dcem tree (holding dcem/ and exps/)")
    ap.add_argument("--lml", default="/tmp/lml_public",
                    help="the exported locuslab/lml tree (holding lml.py)")
    ap.add_argument("--deps", default="/tmp/dcem_deps",
                    help="an extra import path for semantic_version (lml.py needs it)")
    ap.add_argument("--out", default="runs/bench/dcem_public.md")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 100)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 10)")
    ap.add_argument("--updates", type=int, default=None,
                    help="training-curve updates per implementation (default 900)")
    ap.add_argument("--quick", action="store_true", help="10 rounds, 30 updates (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rounds = args.rounds or (10 if args.quick else 100)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    updates = args.updates or (30 if args.quick else 900)
    deps = Path(args.deps) if args.deps and Path(args.deps).is_dir() else None
    s = Setup(Path(args.public), Path(args.lml), deps)
    t0 = time.perf_counter()
    arows, arec = agreement(s)
    trows, trec = timing(s, rounds, warmup)
    crows, crec = curves(s, updates, every=10 if updates < 100 else 100)
    head = (f"## ocnet DCEM vs the public DCEM code ({'quick' if args.quick else 'full'}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); public code "
            f"from {args.public} (LML from {args.lml})")
    text = "\n".join([head, "", *DIFFERENCES, "", *arows, "", *trows, "", *crows, "",
                      f"LML warnings printed by the public code: {s.lml_warnings}. "
                      f"Total wall time {time.perf_counter() - t0:.1f} s.", ""])
    print(text, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return dict(agreement=arec, timing=trec, curves=crec, lml_warnings=s.lml_warnings)


if __name__ == "__main__":
    main()
