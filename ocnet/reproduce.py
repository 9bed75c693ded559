"""``ocnet reproduce``: every seed paper's headline claim as a tracked, re-runnable row.

One entry per claim of the seed papers (``/work/shared/seeds``, summarised with their public
code's settings in REFERENCE.md). Each entry runs the claim's protocol at one of three levels
and returns one row

    claim | source | protocol | paper's / public code's figure | ocnet's | reproduced | why

- ``quick``: a smoke test (CI; the whole set in a few minutes on 2 cores);
- ``reduced`` (the default): the largest run that fits a shared 2-core CPU box, a few
  minutes per entry; this is what ``docs/reproductions.md`` shows;
- ``paper``: the paper's / public code's full protocol (seeds, steps, grids) as far as it is
  known; hours on a CPU.

The verdict is computed, never written in: ``no`` when ocnet's measurement contradicts the
claim (at whatever level it ran; the reason says at what scale), ``partly`` when it agrees
but the protocol was cut (the row names every cut: ``key used / paper``), ``yes`` only when
it agrees at the full protocol. Every ocnet figure in a row comes from the run; the papers'
figures quoted come from the seeds and REFERENCE.md (cited in the row), and where a paper's
numbers were not recoverable the row says so instead of inventing one.

This module is experiments layer: it imports the solvers, data, models, ``compare`` and
``adapt``; nothing below imports it. The small benchmark-specific pieces (the E-MSA toy
network, the NOVAS energy net and data protocols, the MMC loss) follow
``benchmarks/emsa.py``, ``benchmarks/novas.py`` and ``benchmarks/ddpnopt.py``.

    python -m ocnet.reproduce --quick --only novas-global
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn

from .bridge import to_problem
from .data import batches, load
from .models import ResidualBlock, build_model
from .ocp.errors import ConfigError, unknown_name
from .solvers import make_solver

__all__ = ["COLUMNS", "ENTRIES", "LEVELS", "VERDICTS", "Entry", "entry_names",
           "reproduce_command", "run", "run_entry"]

#: the row's columns, in table order
COLUMNS = ("claim", "source", "protocol", "paper", "ocnet", "reproduced", "why")
HEADERS = ("claim", "source (paper, figure/table)", "protocol",
           "paper's / public code's figure", "ocnet's", "reproduced", "why")
VERDICTS = ("yes", "partly", "no")
LEVELS = ("quick", "reduced", "paper")

Row = dict[str, Any]


# ============================================================================ shared helpers
def _log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cuts(cfg: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """The settings where this run's protocol differs from the paper's: 'key used / paper'."""
    out = []
    for key, want in paper.items():
        have = cfg.get(key)
        if have != want:
            out.append(f"{key} {_short(have)} / {_short(want)}")
    return out


def _short(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ",".join(_short(x) for x in v) + "]" if len(v) <= 6 else f"{len(v)} items"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _verdict(agrees: bool, cuts: list[str], reason: str) -> tuple[str, str]:
    """(verdict, why): no if the measurement contradicts the claim, partly if it agrees on a
    cut protocol, yes if it agrees on the full one."""
    scale = ("cut: " + "; ".join(cuts)) if cuts else "full protocol"
    if not agrees:
        return "no", f"{reason} ({scale})"
    if cuts:
        return "partly", f"{reason}; agrees, but {scale}"
    return "yes", f"{reason} ({scale})"


def _g(v: float, spec: str = ".3g") -> str:
    return "nan" if v is None or not math.isfinite(v) else format(v, spec)


def _mean(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return statistics.fmean(v) if v else math.nan


def _sd(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _fig(out: Path, name: str) -> Path:
    return out / f"reproduce_{name}.png"


def _savefig(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (temp file in the same folder + os.replace)."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fit(problem: Any, solver: Any, x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int,
         seed: int) -> dict[str, Any]:
    """Mini-batch training: per-epoch mean batch loss, median solver seconds per step."""
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    secs: list[float] = []
    for _ in range(epochs):
        losses = []
        for xb, yb in batches(x, y, batch, generator=gen):
            info = solver.step(xb, yb)
            losses.append(float(info.loss))
            secs.append(float(info.seconds))
        curve.append(_mean(losses) if all(math.isfinite(v) for v in losses) else math.nan)
        if not math.isfinite(curve[-1]):
            break
    tail = secs[len(secs) // 10:] or secs or [math.nan]
    return {"curve": curve, "sec": statistics.median(tail),
            "diverged": not (curve and math.isfinite(curve[-1]))}


def _fcn(n_in: int, n_out: int, width: int, layers: int, act: str) -> nn.Sequential:
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, width), acts[act]()]
        d = width
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    out = model(x)
    if not torch.isfinite(out).all():
        return math.nan
    return float((out.argmax(1) == y).double().mean())


# =================================================================== E-MSA (Li et al.)
class _Repeat(nn.Module):
    """x (B, 1) -> (B, width): the public toy feeds x repeated to every node."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.width)


class _SumFeatures(nn.Module):
    """The public toy's output: the sum of the final state's features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)


def _emsa_toy(perturb: float = 0.0) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The public toy (REFERENCE.md section 2): 100 points x ~ U[-pi, pi] from numpy seed 1,
    20 residual layers x + 0.25 tanh(W x + b) of width 5, all weights zero (optionally plus
    U(-perturb, perturb) once), output = feature sum, MSE + 1e-3/2 |u|^2, full batch."""
    x = np.random.RandomState(1).uniform(-math.pi, math.pi, size=(100, 1))
    xt = torch.tensor(x, dtype=torch.float32)
    net = nn.Sequential(_Repeat(5), *[ResidualBlock(5, 0.25, "tanh") for _ in range(20)],
                        _SumFeatures())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
            if perturb:
                p.add_((torch.rand(p.shape, generator=g) * 2 - 1) * perturb)
    return to_problem(net, "mse", weight_decay=1e-3), xt, torch.sin(xt)


def _emsa_toy_run(name: str, opts: dict[str, Any], iters: int, perturb: float = 0.0,
                  ) -> dict[str, Any]:
    problem, x, y = _emsa_toy(perturb)
    s = make_solver(name, problem, **opts)
    with torch.no_grad():
        losses = [float(problem.objective(x, y))]
    secs = []
    for _ in range(iters):
        info = s.step(x, y)
        secs.append(float(info.seconds))
        with torch.no_grad():
            losses.append(float(problem.objective(x, y)))
        if not math.isfinite(losses[-1]):
            break
    return {"losses": losses, "sec": statistics.median(secs[1:] or secs)}


def emsa_toy(level: str, out: Path) -> Row:
    paper = {"iterations": 500, "init": "zero", "inner L-BFGS iterations": 10,
             "rho (reference scaling)": 1.0}
    cfg = {**paper, "iterations": {"quick": 15, "reduced": 150, "paper": 500}[level]}
    it = cfg["iterations"]
    arms = {
        "E-MSA (rho 1, reference scaling), zero init": (
            "emsa", {"rho": 1.0, "scaling": "reference", "inner_iters": 10}, 0.0),
        "E-MSA, zero init + U(-0.005, 0.005) once": (
            "emsa", {"rho": 1.0, "scaling": "reference", "inner_iters": 10}, 0.005),
        "Adam (lr 0.005, public baseline), zero init": ("adam", {"lr": 0.005}, 0.0),
    }
    res = {}
    for label, (name, opts, pert) in arms.items():
        res[label] = _emsa_toy_run(name, opts, it, pert)
        _log(f"emsa-toy {label}: J final {res[label]['losses'][-1]:.4g}")
    em, em_p, ad = (res[k]["losses"] for k in arms)
    ks = sorted({k for k in (10, 50, 100, 500) if k <= it} | {it})

    def at(ls: list[float], k: int) -> float:
        return ls[min(k, len(ls) - 1)]

    spike = max(em[5:] or [math.nan])
    ratio = res[list(arms)[0]]["sec"] / res[list(arms)[2]]["sec"]
    k10 = min(10, it)
    agrees = at(em, k10) < at(ad, k10) and at(em, it) < at(ad, it)
    ocnet = ("J at it. " + "/".join(str(k) for k in ks) + ": E-MSA zero init "
             + "/".join(_g(at(em, k)) for k in ks) + "; E-MSA perturbed "
             + "/".join(_g(at(em_p, k)) for k in ks) + "; Adam "
             + "/".join(_g(at(ad, k)) for k in ks)
             + f"; E-MSA max J after it. 5: {_g(spike)}; s/step E-MSA / Adam {ratio:.1f}x")
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        f"E-MSA from the all-zero init is {'below' if agrees else 'not below'} Adam at "
        f"iteration {k10} and at {it}"
        + (f"; its curve is not monotone (spike J = {_g(spike)})" if spike > 2 * at(em, 1)
           else ""))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in arms:
        ax.semilogy(res[label]["losses"], label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("J (MSE + 1e-3/2 |u|^2)")
    ax.set_title("E-MSA public toy: sin(x), 20 residual layers x 5")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "emsa-toy"))
    return {
        "protocol": f"public toy (config.yml 'toy'): 100 pts, 20 res. layers x 5, all-zero init, "
                    f"rho 1 summed penalties, 10 L-BFGS iters/step, {it} iterations, seed "
                    "numpy 1; vs Adam lr 0.005",
        "paper": "loss curves only: E-MSA converges faster per iteration than SGD/Adagrad/Adam "
                 "(Li et al. JMLR 2018; REFERENCE.md s.2); the public code's curve values are "
                 "not in the seeds (issue 15: ocnet's plain-API curve spikes to J = 58.7 at it. "
                 "18 and ends 2.3x above the public code's at 500)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {k: v["losses"] for k, v in res.items()},
    }


def emsa_classification(level: str, out: Path) -> Row:
    paper = {"data": "MNIST", "seeds": 10, "epochs": 10}
    cfg = {"data": "DIGITS (MNIST needs a download)",
           "seeds": {"quick": 1, "reduced": 3, "paper": 10}[level],
           "epochs": {"quick": 1, "reduced": 5, "paper": 10}[level]}
    solvers = {"E-MSA (rho 10, mean scaling)": ("emsa", {"rho": 10.0, "inner_iters": 10}),
               "Adam (lr 3e-3)": ("adam", {"lr": 3e-3}),
               "SGD (lr 0.3)": ("sgd", {"lr": 0.3})}
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in solvers}
    for seed in range(cfg["seeds"]):
        ds = load("digits", seed=seed)
        for label, (name, opts) in solvers.items():
            torch.manual_seed(seed)
            model = _fcn(ds.n_features, ds.n_classes, 32, 5, "tanh")
            problem = to_problem(model, "cross_entropy", weight_decay=1e-4)
            r = _fit(problem, make_solver(name, problem, **opts), ds.x_train, ds.y_train, 32,
                     cfg["epochs"], seed)
            r["acc"] = _accuracy(model, ds.x_test, ds.y_test)
            res[label].append(r)
    labels = list(solvers)
    ep1 = {k: _mean([r["curve"][0] for r in v]) for k, v in res.items()}
    last = {k: _mean([r["curve"][-1] for r in v]) for k, v in res.items()}
    acc = {k: [r["acc"] for r in v] for k, v in res.items()}
    sec = {k: statistics.median(r["sec"] for r in v) for k, v in res.items()}
    em = labels[0]
    agrees = ep1[em] <= min(ep1[k] for k in labels[1:])
    ocnet = "; ".join(
        f"{k}: epoch-1 loss {_g(ep1[k])}, final {_g(last[k])}, test acc "
        f"{100 * _mean(acc[k]):.1f} +- {100 * _sd(acc[k]):.1f} %, "
        f"{sec[k] / sec[labels[1]]:.1f}x Adam s/step" for k in labels)
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        f"E-MSA's first-epoch training loss is {'the lowest' if agrees else 'not the lowest'} "
        f"(per iteration); per second it costs {sec[em] / sec[labels[1]]:.0f}x an Adam step")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in labels:
        c = [_mean([r["curve"][e] for r in res[k] if e < len(r["curve"])])
             for e in range(cfg["epochs"])]
        ax.semilogy(range(1, len(c) + 1), c, "o-", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training batch loss")
    ax.set_title("E-MSA vs Adam/SGD: DIGITS FCN 5 x 32 tanh")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "emsa-classification"))
    return {
        "protocol": f"FCN 5 x 32 tanh on DIGITS, batch 32, weight decay 1e-4, {cfg['epochs']} "
                    f"epochs, seeds {cfg['seeds']}; E-MSA 10 L-BFGS evaluations/step",
        "paper": "MNIST loss curves: fast initial per-iteration convergence against SGD/Adagrad/"
                 "Adam, rho 0.03; no accuracy table (Li et al. 2018, Li & Hao 2018; "
                 "REFERENCE.md s.2)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {k: [{"curve": r["curve"], "acc": r["acc"]} for r in v] for k, v in res.items()},
    }


# ============================================================================ DDPNOpt (seed 000)
def _digits_fcn_run(solver: str, opts: dict[str, Any], seed: int, epochs: int,
                    layers: int = 5, act: str = "tanh", loss: Any = "cross_entropy",
                    ) -> dict[str, Any]:
    ds = load("digits", seed=seed)
    torch.manual_seed(seed)
    model = _fcn(ds.n_features, ds.n_classes, 32, layers, act)
    problem = to_problem(model, loss)
    r = _fit(problem, make_solver(solver, problem, **opts), ds.x_train, ds.y_train, 32,
             epochs, seed)
    if isinstance(loss, _MMCLoss):
        with torch.no_grad():
            z = model(ds.x_test)
            pred = ((z[:, None, :] - loss.mu[None]) ** 2).sum(-1).argmin(1)
            r["acc"] = float((pred == ds.y_test).double().mean())
    else:
        r["acc"] = math.nan if r["diverged"] else _accuracy(model, ds.x_test, ds.y_test)
    return r


def ddpnopt_lr_sweep(level: str, out: Path) -> Row:
    paper = {"seeds": 10, "bases": ["sgd", "rmsprop", "adam"], "epochs": 20}
    cfg = {"seeds": {"quick": 1, "reduced": 3, "paper": 10}[level],
           "bases": ["adam"] if level == "quick" else ["sgd", "adam"] if level == "reduced"
           else ["sgd", "rmsprop", "adam"],
           "epochs": {"quick": 1, "reduced": 10, "paper": 20}[level]}
    grids = {"sgd": [0.03, 0.1, 0.3, 1.0], "rmsprop": [3e-4, 1e-3, 3e-3, 1e-2],
             "adam": [1e-3, 3e-3, 1e-2, 3e-2]}
    if level == "quick":
        grids = {"adam": [1e-3, 3e-2]}
    diffs: dict[str, list[tuple[float, float, float]]] = {}
    raw: dict[str, Any] = {}
    for base in cfg["bases"]:
        diffs[base] = []
        for lr in grids[base]:
            a = [_digits_fcn_run(base, {"lr": lr}, s, cfg["epochs"])["acc"]
                 for s in range(cfg["seeds"])]
            b = [_digits_fcn_run("ddpnopt", {"base": base, "lr": lr}, s, cfg["epochs"])["acc"]
                 for s in range(cfg["seeds"])]
            a0 = [v if math.isfinite(v) else 0.0 for v in a]
            b0 = [v if math.isfinite(v) else 0.0 for v in b]
            d = [y - x for x, y in zip(a0, b0, strict=True)]
            diffs[base].append((lr, 100 * _mean(d), 100 * _sd(d) / math.sqrt(len(d))))
            raw[f"{base}|{lr:g}"] = {"base": a, "ddpnopt": b}
            _log(f"ddpnopt-lr-sweep {base} lr {lr:g}: {_mean(a0):.3f} -> {_mean(b0):.3f}")
    # the claim's shape: the gain grows with the learning rate, and is positive at the top
    grows = []
    for rows in diffs.values():
        half = len(rows) // 2
        lo = _mean([d for _, d, _ in rows[:half]])
        hi = _mean([d for _, d, _ in rows[half:]])
        se = max(se for _, _, se in rows[half:])
        grows.append(hi > lo and hi > max(se, 0.0))
    agrees = all(grows)
    ocnet = "; ".join(f"{b}: " + ", ".join(f"lr {lr:g} {d:+.1f} pp" for lr, d, _ in rows)
                      for b, rows in diffs.items())
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        "DDPNOpt - base test accuracy " + ("grows" if agrees else "does not grow")
        + " with the learning rate for every base (top half of the grid above the bottom half"
          " and above one standard error)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for base, rows in diffs.items():
        ax.errorbar([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                    marker="o", capsize=3, label=f"ddpnopt-{base} - {base}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (same for base and DDPNOpt)")
    ax.set_ylabel("test accuracy gain [pp]")
    ax.set_title("DDPNOpt vs its base (paper Fig. 4a shape), DIGITS FCN")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "ddpnopt-lr-sweep"))
    return {
        "protocol": f"DIGITS FCN 5 x 32 tanh, batch 32, {cfg['epochs']} epochs, seeds "
                    f"{cfg['seeds']}; each base vs ddpnopt(base=...) at the same lr, grid "
                    + "; ".join(f"{b} {_short(grids[b])}" for b in cfg["bases"]),
        "paper": "Fig. 4a: with identical hyper-parameters DDPNOpt beats its base and the gain "
                 "grows with the learning rate (Liu et al. ICLR 2021; REFERENCE.md s.1; the "
                 "paper's numbers were not recoverable)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {"diffs_pp": diffs, "raw": raw},
    }


class _MMCLoss(nn.Module):
    """mean_i |z_i - mu_{y_i}|^2 / 2 with fixed Max-Mahalanobis centers (a regular simplex)."""

    def __init__(self, k: int, radius: float = 10.0) -> None:
        super().__init__()
        e = torch.eye(k, dtype=torch.float64)
        v = e - e.mean(0, keepdim=True)
        self.register_buffer("mu", (radius * v / v.norm(dim=1, keepdim=True)).float())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((z - self.mu[y]) ** 2).sum(1).mean()


def ddpnopt_vanishing(level: str, out: Path) -> Row:
    paper = {"seeds": 10, "epochs": 30}
    cfg = {"seeds": {"quick": 1, "reduced": 3, "paper": 10}[level],
           "epochs": {"quick": 1, "reduced": 15, "paper": 30}[level]}
    arms = {"sgd": ("sgd", {"lr": 0.1}), "ddpnopt-sgd": ("ddpnopt", {"base": "sgd", "lr": 0.1})}
    if level != "quick":
        arms["ddpnopt-sgd (literal gain 1, no V_hh reg, no trust bound)"] = (
            "ddpnopt", {"base": "sgd", "lr": 0.1, "gain": 1.0, "vxx_reg": 0.0, "trust": 0.0})
    res: dict[str, list[dict[str, Any]]] = {}
    for label, (name, opts) in arms.items():
        try:
            res[label] = [_digits_fcn_run(name, opts, s, cfg["epochs"], layers=10,
                                          act="sigmoid", loss=_MMCLoss(10))
                          for s in range(cfg["seeds"])]
        except (ConfigError, TypeError) as err:  # an option the solver no longer takes
            _log(f"ddpnopt-vanishing {label}: skipped ({err})")
    first = {k: _mean([r["curve"][0] for r in v]) for k, v in res.items()}
    final = {k: _mean([r["curve"][-1] for r in v]) for k, v in res.items()}
    spread = max(_sd([r["curve"][-1] for r in v]) for v in res.values())
    best_ddp = min((k for k in res if k != "sgd"), key=lambda k: final[k])
    drop = final["sgd"] - final[best_ddp]
    agrees = drop > max(0.01 * final["sgd"], 2 * spread)
    ocnet = "; ".join(f"{k}: MMC loss epoch 1 {_g(first[k], '.4g')} -> final "
                      f"{_g(final[k], '.4g')}, test acc "
                      f"{100 * _mean([r['acc'] for r in res[k]]):.1f} %" for k in res)
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        f"best DDPNOpt final loss {_g(final[best_ddp], '.4g')} vs SGD "
        f"{_g(final['sgd'], '.4g')}: " + ("DDPNOpt keeps moving where SGD stalls" if agrees
                                          else "DDPNOpt stalls like SGD"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in res.items():
        c = [_mean([r["curve"][e] for r in v if e < len(r["curve"])])
             for e in range(cfg["epochs"])]
        ax.plot(range(1, len(c) + 1), c, "o-", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MMC training loss")
    ax.set_title("10-layer sigmoid FCN on DIGITS (vanishing gradients)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "ddpnopt-vanishing"))
    return {
        "protocol": f"10-layer sigmoid FCN (width 32) on DIGITS, Max-Mahalanobis-center loss "
                    f"(radius 10), batch 32, lr 0.1, {cfg['epochs']} epochs, seeds "
                    f"{cfg['seeds']}",
        "paper": "SGD and EKFAC stall on the deep sigmoid net, DDPNOpt keeps decreasing the "
                 "loss through its feedback term (Liu et al. ICLR 2021, vanishing-gradient "
                 "figure; seed 000 'preventing gradient vanishing'; REFERENCE.md s.1)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {k: [r["curve"] for r in v] for k, v in res.items()},
    }


# ============================================================================ NOVAS (seed 004)
class _EnergyNet(nn.Module):
    """concat(x, y) -> 3 x (Linear 128 + Softplus) -> Linear 1 (the DCEM/NOVAS energy net)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
        xs = x[:, None, :].expand(-1, Y.shape[1], -1)
        return self.net(torch.cat([xs, Y], -1)).squeeze(-1)


def _novas_layer(method: str, net: nn.Module) -> nn.Module:
    from .solvers.novas import DCEM, NOVAS, UnrolledGD

    if method == "NOVAS":  # the public NOVAS regression script: the soft-CE shape
        return NOVAS(net, 1, mu0=0.0, sigma0=10.0, n_samples=100, n_iter=10, shape="soft_ce")
    if method == "DCEM":
        return DCEM(net, 1, mu0=0.0, sigma0=7.0, n_samples=100, n_elite=10, n_iter=10)
    return UnrolledGD(net, 1, mu0=0.0, n_iter=10, lr=0.1)


def _novas_data(protocol: str, seed: int) -> tuple[torch.Tensor, ...]:
    """P200: 200 points on a linspace of [0, 2 pi], a random 25 % held out; P100: 100 points
    used both to train and to test."""
    n = 200 if protocol == "P200" else 100
    x = torch.linspace(0.0, 2 * math.pi, n)
    if protocol == "P200":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))
        xt, xv = x[perm[50:]], x[perm[:50]]
    else:
        xt = xv = x
    return xt[:, None], (xt * torch.sin(xt))[:, None], xv[:, None], (xv * torch.sin(xv))[:, None]


def _novas_eval(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
                **overrides: Any) -> float:
    with torch.no_grad():
        g = torch.Generator().manual_seed(10_000 + seed)
        return float((layer(x, generator=g, **overrides) - y).pow(2).mean())


def novas_regression(level: str, out: Path) -> Row:
    paper = {"updates": 18000, "seeds": 5, "protocols": ["P200", "P100"]}
    cfg = {"updates": {"quick": 20, "reduced": 300, "paper": 18000}[level],
           "seeds": {"quick": 1, "reduced": 2, "paper": 5}[level],
           "protocols": ["P200"] if level != "paper" else ["P200", "P100"]}
    grid = [1, 2, 5, 10, 20, 30] if level != "paper" else list(range(1, 31))
    methods = ("NOVAS", "DCEM", "unrolled GD")
    res: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for protocol in cfg["protocols"]:
        res[protocol] = {m: [] for m in methods}
        for seed in range(cfg["seeds"]):
            xt, yt, xv, yv = _novas_data(protocol, seed)
            for m in methods:
                torch.manual_seed(seed)
                net = _EnergyNet()
                layer = _novas_layer(m, net)
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.5,
                                                                   patience=5)
                g = torch.Generator().manual_seed(seed)
                t0 = time.perf_counter()
                for step in range(cfg["updates"]):
                    idx = torch.randperm(xt.shape[0], generator=g)[:10]
                    loss = (layer(xt[idx], generator=g) - yt[idx]).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()
                    if (step + 1) % 50 == 0:
                        sched.step(_novas_eval(layer, xv, yv, seed))
                sec = (time.perf_counter() - t0) / cfg["updates"]
                abl = [_novas_eval(layer, xv, yv, seed, n_iter=k) for k in grid]
                res[protocol][m].append({"test": abl[grid.index(10)], "ablation": abl,
                                         "sec": sec})
                _log(f"novas-regression {protocol} {m} seed {seed}: MSE {abl[grid.index(10)]:.3f}")
    p = cfg["protocols"][0]
    r = res[p]
    test = {m: _mean([x["test"] for x in r[m]]) for m in methods}
    off_idx = [j for j, k in enumerate(grid) if k != 10]
    off = {m: _mean([x["ablation"][j] for x in r[m] for j in off_idx]) for m in methods}
    sec = {m: _mean([x["sec"] for x in r[m]]) for m in methods}
    # the claims: NOVAS is competitive with DCEM at the training iteration count, and unlike
    # unrolled GD it does not overfit the number of inner iterations
    competitive = test["NOVAS"] <= 1.25 * test["DCEM"]
    robust = off["NOVAS"] < off["unrolled GD"]
    agrees = competitive and robust
    ocnet = (f"{p} test MSE at 10 inner its: " + ", ".join(f"{m} {_g(test[m])}" for m in methods)
             + "; mean over off-training counts " + _short(
                 [k for k in grid if k != 10]) + ": "
             + ", ".join(f"{m} {_g(off[m])}" for m in methods)
             + "; s/update " + ", ".join(f"{m} {sec[m] / sec['NOVAS']:.2f}x" for m in methods)
             + " NOVAS")
    reason = (f"NOVAS {'within' if competitive else 'above'} 1.25x DCEM's MSE at 10 "
              f"iterations; {'less' if robust else 'not less'} sensitive than unrolled GD to "
              "the test-time iteration count")
    if not agrees and cfg["updates"] < paper["updates"]:
        reason += (f" after {cfg['updates']} of the public code's {paper['updates']} updates "
                   "(far from converged)")
    verdict, why = _verdict(agrees, _cuts(cfg, paper), reason)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        a = np.array([x["ablation"] for x in r[m]]).mean(0)
        ax.plot(grid, a, "o-", ms=3, label=m)
    ax.axvline(10, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("inner iterations at test (trained with 10)")
    ax.set_ylabel("test MSE")
    ax.set_title(f"energy regression y = x sin x ({p}, {cfg['updates']} updates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "novas-regression"))
    return {
        "protocol": f"y = x sin x, energy net 3 x 128 Softplus, Adam 1e-3 + plateau schedule, "
                    f"clip 1, minibatch 10, {cfg['updates']} updates, seeds {cfg['seeds']}, "
                    f"protocols {'/'.join(cfg['protocols'])}; NOVAS soft-CE (public regression "
                    "script), DCEM 10/100 elites sigma0 7, unrolled GD 10 x lr 0.1",
        "paper": "NOVAS benchmarked against DCEM and unrolled GD on the energy regression; "
                 "unrolled GD overfits its inner step count (train 10, test 1..30); the NOVAS "
                 "paper's numbers were not recoverable (seed 004 abstract; REFERENCE.md s.5)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {pp: {m: v for m, v in d.items()} for pp, d in res.items()} | {"grid": grid},
    }


def _rastrigin(Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return 20 + (Y**2 - 10 * torch.cos(2 * math.pi * Y)).sum(-1)


def _double_well(Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return ((Y**2 - 1) ** 2 + 0.3 * Y).sum(-1)


def novas_global(level: str, out: Path) -> Row:
    from .solvers.novas import dcem, novas

    paper = {"seeds": 100}
    cfg = {"seeds": {"quick": 10, "reduced": 100, "paper": 100}[level]}
    f64 = torch.float64
    r = np.roots([4.0, 0.0, -4.0, 0.3])
    r = r[np.isreal(r)].real
    dw_star = float(r[np.argmin((r**2 - 1) ** 2 + 0.3 * r)])
    problems = [("Rastrigin 2-D", _rastrigin, [2.5, -3.3], 5.0, 1e-3, torch.zeros(2, dtype=f64)),
                ("double well 1-D", _double_well, [1.5], 2.0, 1e-2,
                 torch.tensor([dw_star], dtype=f64))]
    methods: dict[str, dict[str, Any] | None] = {
        "NOVAS exp kappa 5": {"kappa": 5.0}, "NOVAS soft-CE": {"shape": "soft_ce"},
        "DCEM": None}
    rows: dict[str, dict[str, int]] = {}
    gd_ok: dict[str, bool] = {}
    for name, E, mu0, s0, lr, star in problems:
        m0 = torch.tensor([mu0], dtype=f64)
        y = m0.clone()
        for _ in range(3000):
            y = y.requires_grad_(True)
            (gr,) = torch.autograd.grad(E(y[:, None]).sum(), y)
            y = (y - lr * gr).detach()
        gd_ok[name] = float((y[0] - star).norm()) < 1e-3
        rows[name] = {}
        for mname, opts in methods.items():
            hits = 0
            for seed in range(cfg["seeds"]):
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    if opts is None:
                        yy = dcem(E, m0, s0, n_iter=200, generator=g).y[0]
                    else:
                        yy = novas(E, m0, s0, n_iter=200, var_floor=1e-14, generator=g,
                                   **opts).y[0]
                hits += int(float((yy - star).norm()) < 1e-3)
            rows[name][mname] = hits
    n = cfg["seeds"]
    best = {p: max(v["NOVAS exp kappa 5"], v["NOVAS soft-CE"]) for p, v in rows.items()}
    agrees = all(b >= 0.9 * n for b in best.values()) and not any(gd_ok.values())
    ocnet = "; ".join(f"{p}: GD {'global' if gd_ok[p] else 'wrong basin'}, "
                      + ", ".join(f"{m} {h}/{n}" for m, h in v.items()) for p, v in rows.items())
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        "from a mean where gradient descent ends in a wrong basin, NOVAS "
        + ("finds the global minimum in >= 90 % of seeds on both problems" if agrees
           else "misses the global minimum in > 10 % of seeds on some problem"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.25
    for i, m in enumerate(methods):
        ax.bar([j + i * width for j in range(len(rows))], [rows[p][m] / n for p in rows], width,
               label=m)
    ax.set_xticks([j + width for j in range(len(rows))], list(rows))
    ax.set_ylabel(f"success rate over {n} seeds")
    ax.set_ylim(0, 1.05)
    ax.set_title("global-basin success (gradient descent: 0 on both)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _savefig(fig, _fig(out, "novas-global"))
    return {
        "protocol": f"Rastrigin 2-D from [2.5, -3.3] (sigma0 5) and a tilted double well from "
                    f"1.5 (sigma0 2); 100 samples, 200 iterations, variance floor 1e-14; "
                    f"success |y - y*| < 1e-3 over {n} seeds; GD 3000 steps",
        "paper": "adaptive stochastic search as a non-convex optimisation module (seed 004 "
                 "abstract; no success-rate figure in the seed; REFERENCE.md s.5)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {"hits": rows, "gd_global": gd_ok, "seeds": n},
    }


# ============================================================================ DWR (seed 002)
def _layers_to_reach(hist: list[Any], target: float) -> int | None:
    for lev in hist:
        if lev.test_accuracy >= target - 1e-12:
            return int(lev.n_layers)
    return None


def dwr_placement(level: str, out: Path) -> Row:
    from .adapt import run_adapt

    paper = {"datasets": ["swissroll", "peaks", "donut", "spirals"], "seeds": 5,
             "steps per level": 150, "max layers": 32, "n0": 4}
    cfg = {"datasets": ["spirals"] if level == "quick" else paper["datasets"],
           "seeds": {"quick": 1, "reduced": 2, "paper": 5}[level],
           "steps per level": {"quick": 20, "reduced": 80, "paper": 150}[level],
           "max layers": {"quick": 8, "reduced": 32, "paper": 32}[level],
           "n0": {"quick": 2, "reduced": 4, "paper": 4}[level]}
    n_train = {"quick": 150, "reduced": 300, "paper": 500}[level]
    arms = ("adaptive", "random", "uniform")
    table: dict[str, dict[str, Any]] = {}
    for name in cfg["datasets"]:
        per = []
        for seed in range(cfg["seeds"]):
            res = run_adapt(name, seed=seed, n0=cfg["n0"], max_layers=cfg["max layers"],
                            max_levels=12, steps=cfg["steps per level"], lr=0.02, theta=0.5,
                            lam=1e-3, n_train=n_train, n_test=500 if level != "paper" else None,
                            arms=arms)
            per.append({k: res[k].history for k in arms})
        finest = per[0]["uniform"][-1].n_layers
        need = {k: [_layers_to_reach(s[k], s["uniform"][-1].test_accuracy) for s in per]
                for k in ("adaptive", "random")}
        wins = {k: sum(1 for v in need[k] if v is not None and v <= finest // 2)
                for k in need}
        curves = {k: [(lv.n_layers, lv.test_accuracy) for lv in per[0][k]] for k in arms}
        table[name] = {"finest": finest, "uniform_acc": _mean(
            [s["uniform"][-1].test_accuracy for s in per]), "need": need, "wins": wins,
            "curves": curves}
        _log(f"dwr-placement {name}: need {need}, finest {finest}")
    nsets = len(table)
    ad_wins = sum(1 for t in table.values() if t["wins"]["adaptive"] * 2 > cfg["seeds"])

    def fewer(t: dict[str, Any]) -> bool:  # adaptive needs fewer layers than random
        big = 10**6
        a = [v or big for v in t["need"]["adaptive"]]
        r = [v or big for v in t["need"]["random"]]
        return sum(x < y for x, y in zip(a, r, strict=True)) * 2 > len(a)

    ad_vs_random = sum(1 for t in table.values() if fewer(t))
    agrees = ad_wins * 2 > nsets and ad_vs_random * 2 > nsets
    ocnet = "; ".join(
        f"{n}: uniform {t['finest']} layers acc {t['uniform_acc']:.3f}; layers to reach it "
        f"adaptive {_short(t['need']['adaptive'])}, random {_short(t['need']['random'])}"
        for n, t in table.items())
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        f"adaptive reaches the finest uniform accuracy with <= half its layers on {ad_wins}/"
        f"{nsets} data sets, and with fewer layers than random placement (same levels and "
        f"steps) on {ad_vs_random}/{nsets}"
        + ("" if agrees else ": where the layers go is not what makes the gain"))
    plt = _plt()
    fig, axes = plt.subplots(1, nsets, figsize=(3.6 * nsets, 3.3), squeeze=False)
    for ax, (n, t) in zip(axes[0], table.items(), strict=True):
        for k in arms:
            xs, ys = zip(*t["curves"][k], strict=True)
            ax.plot(xs, ys, "o-", ms=3, label=k)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n} (seed 0)", fontsize=9)
        ax.set_xlabel("layers")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "dwr-placement"))
    return {
        "protocol": f"NeuralODE classifiers (DG(0), explicit Euler), coarse {cfg['n0']} -> "
                    f"{cfg['max layers']} layers, Adam 0.02 x {cfg['steps per level']} steps per"
                    f" level (warm start), Doerfler 0.5, lam 1e-3, n_train {n_train}; arms "
                    f"adaptive / random (as many marks, at random) / uniform; data "
                    f"{'/'.join(cfg['datasets'])}; seeds {cfg['seeds']}",
        "paper": "goal-oriented DWR layer insertion builds the network layer by layer for "
                 "classification (Hintermueller, Hinze, Korolev, arXiv 2601.07397, seed 002); "
                 "estimator, data and numbers not recoverable (REFERENCE.md s.4)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {n: {k: v for k, v in t.items()} for n, t in table.items()},
    }


# ============================================================================ braking (seed 001)
_BASELINE_NAMES = {"sgd": "SGD", "momentum": "heavy ball (SGD momentum 0.9)", "adam": "Adam",
                   "phb": "constant-friction phb"}


def goal_braking(level: str, out: Path) -> Row:
    paper = {"settings": ["digits-mlp", "mnist1d-mlp", "digits-cnn"], "seeds": 10,
             "epochs (mlp/cnn)": [40, 25]}
    cfg = {"settings": ["digits-mlp"] if level == "quick"
           else paper["settings"],
           "seeds": {"quick": 1, "reduced": 3, "paper": 10}[level],
           "epochs (mlp/cnn)": {"quick": [2, 2], "reduced": [13, 8], "paper": [40, 25]}[level]}
    grids = {"sgd": [0.1, 0.3], "momentum": [0.01, 0.03], "adam": [1e-3, 3e-3],
             "phb": [0.2, 0.4], "phb-goal": [0.2, 0.4]}
    if level == "paper":
        grids = {"sgd": [0.03, 0.1, 0.3, 1.0], "momentum": [0.003, 0.01, 0.03, 0.1],
                 "adam": [3e-4, 1e-3, 3e-3, 1e-2], "phb": [0.1, 0.2, 0.4, 0.8],
                 "phb-goal": [0.1, 0.2, 0.4, 0.8]}
    if level == "quick":  # the smoke test: SGD against phb-goal only, default-ish rates
        grids = {k: grids[k][-1:] for k in ("sgd", "phb-goal")}
    opts = {"sgd": {}, "momentum": {}, "adam": {}, "phb": {"gamma": 0.5},
            "phb-goal": {"gamma": 0.5, "r": 0.1, "events": 2, "brake": 10.0}}

    def train(sname: str, opt: str, lr: float, seed: int, x: torch.Tensor, y: torch.Tensor,
              xe: torch.Tensor, ye: torch.Tensor, epochs: int) -> dict[str, Any]:
        ds = dsets[sname]
        torch.manual_seed(seed)
        model = build_model(sname.split("-")[1], ds.n_features, ds.n_classes,
                            image_shape=ds.image_shape)
        problem = to_problem(model, "cross_entropy")
        solver = make_solver(opt, problem, lr=lr, **opts[opt])
        r = _fit(problem, solver, x, y, 64, epochs, 1000 + seed)
        r["acc"] = math.nan if r["diverged"] else _accuracy(model, xe, ye)
        r["events"] = [e["step"] for e in solver.events()] if opt == "phb-goal" else []
        return r

    dsets = {s: load(s.split("-")[0], seed=0) for s in cfg["settings"]}
    results: dict[str, dict[str, Any]] = {}
    for sname in cfg["settings"]:
        ds = dsets[sname]
        epochs = cfg["epochs (mlp/cnn)"][0 if sname.endswith("mlp") else 1]
        n_fit = int(0.8 * ds.x_train.shape[0])
        results[sname] = {}
        for opt, grid in grids.items():
            if len(grid) > 1:  # the lr by validation accuracy (last 20 %), seed 0
                scores = []
                for lr in grid:
                    r = train(sname, opt, lr, 0, ds.x_train[:n_fit], ds.y_train[:n_fit],
                              ds.x_train[n_fit:], ds.y_train[n_fit:], epochs)
                    scores.append((r["acc"] if math.isfinite(r["acc"]) else 0.0, lr))
                lr = max(scores)[1]
            else:
                lr = grid[0]
            runs = [train(sname, opt, lr, s, ds.x_train, ds.y_train, ds.x_test, ds.y_test,
                          epochs) for s in range(cfg["seeds"])]
            results[sname][opt] = {"lr": lr, "acc": [r["acc"] for r in runs],
                                   "curve": [_mean([r["curve"][e] for r in runs
                                                    if e < len(r["curve"])])
                                             for e in range(epochs)],
                                   "events": [r["events"] for r in runs]}
            acc = _mean(results[sname][opt]["acc"])
            _log(f"goal-braking {sname} {opt} lr {lr:g}: acc {acc:.4f}")
    beats = {b: sum(1 for s in results.values()
                    if _mean(s["phb-goal"]["acc"]) > _mean(s[b]["acc"]))
             for b in ("sgd", "momentum", "adam", "phb") if b in grids}
    nset = len(results)
    agrees = beats["sgd"] * 2 > nset
    early = []  # settings where the first goal is met in the first half of training and
    for sname, r in results.items():  # phb-goal ends below its no-brake twin phb
        ds = dsets[sname]
        per_epoch = math.ceil(ds.x_train.shape[0] / 64)
        epochs = len(r["phb-goal"]["curve"])
        firsts = [ev[0] / per_epoch for ev in r["phb-goal"]["events"] if ev]
        if (firsts and statistics.median(firsts) < epochs / 2 and "phb" in r
                and _mean(r["phb-goal"]["acc"]) < _mean(r["phb"]["acc"])):
            early.append(f"{sname} (first goal at epoch {statistics.median(firsts):.1f} of "
                         f"{epochs})")
    ocnet = "; ".join(
        f"{s}: " + ", ".join(f"{o} {100 * _mean(v['acc']):.2f}" for o, v in r.items())
        + " % test acc; phb-goal events at steps " + _short(r["phb-goal"]["events"][0])
        for s, r in results.items())
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        "phb-goal's mean test accuracy beats " + ", ".join(
            f"{_BASELINE_NAMES[b]} on {n}/{nset}" for b, n in beats.items()) + " settings"
        + (("; braking early loses to the same dynamics without brakes on "
            + ", ".join(early)) if early else ""))
    plt = _plt()
    fig, axes = plt.subplots(1, nset, figsize=(5 * nset, 3.6), squeeze=False)
    for ax, (s, r) in zip(axes[0], results.items(), strict=True):
        for o, v in r.items():
            ax.semilogy(range(1, len(v["curve"]) + 1), v["curve"], label=f"{o} (lr {v['lr']:g})")
        ax.set_title(s)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("mean training batch loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, _fig(out, "goal-braking"))
    return {
        "protocol": f"{'/'.join(cfg['settings'])} (mlp 2 x 64 tanh; cnn 2 conv + 2 dense), "
                    f"batch 64, epochs mlp/cnn {_short(cfg['epochs (mlp/cnn)'])}, lr by "
                    "validation accuracy (seed 0, last 20 % of the training split) from "
                    + ", ".join(f"{o} {_short(g)}" for o, g in grids.items())
                    + f"; seeds {cfg['seeds']}; phb-goal: friction 0.5, x10 at EMA loss "
                    "0.1 L0 and 0.01 L0",
        "paper": "braking at predefined loss-reduction goals improves on SGD (Burghoff et al., "
                 "ICANN 2023, seed 001 abstract); goal rule and numbers not recoverable "
                 "(REFERENCE.md s.3)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": results,
    }


# ============================================================================ seed 003 protocol
def seed003_protocol(level: str, out: Path) -> Row:
    from .compare import SETTINGS as CMP_SETTINGS
    from .compare import run_one

    paper = {"settings": ["mlp-digits", "cnn-digits", "ae-digits"], "epochs": 20,
             "lr factors": [1 / 3, 1.0, 3.0], "seeds": 3}
    cfg = {"settings": ["mlp-digits"] if level == "quick" else paper["settings"],
           "epochs": {"quick": 1, "reduced": 4, "paper": 20}[level],
           "lr factors": [1.0] if level == "quick" else paper["lr factors"],
           "seeds": {"quick": 1, "reduced": 1, "paper": 3}[level]}
    solvers = (["adam", "sgd"] if level == "quick"
               else ["adam", "sgd", "momentum", "rmsprop", "ddpnopt", "phb", "phb-goal", "emsa"])
    n_train = 400 if level == "quick" else None
    budget = {"quick": 10.0, "reduced": 15.0, "paper": None}[level]
    rows = []
    max_ext = 0 if level == "quick" else 2  # widen the grid until the best lr is inside it
    grids: dict[tuple[str, str], list[float]] = {}

    def loss_at(s: str, solver: str, f: float) -> float:
        rs = [r for r in rows if r["setting"] == s and r["solver"] == solver
              and r["lr_factor"] == f and r.get("status") == "ok"]
        v = _mean([r["final_train_loss"] for r in rs]) if rs else math.nan
        return v if math.isfinite(v) else math.inf

    for s in cfg["settings"]:
        for solver in solvers:
            grid = list(cfg["lr factors"])
            todo = list(grid)
            for ext in range(max_ext + 1):
                for f in todo:
                    for seed in range(cfg["seeds"]):
                        rows.append(run_one(CMP_SETTINGS[s], solver, f, seed, cfg["epochs"],
                                            budget=budget, n_train=n_train))
                fb = min(grid, key=lambda f, s=s, solver=solver: loss_at(s, solver, f))
                if ext == max_ext or len(grid) < 2 or not math.isfinite(
                        loss_at(s, solver, fb)) or fb not in (grid[0], grid[-1]):
                    break
                new = fb / 3 if fb == grid[0] else fb * 3
                grid = sorted([*grid, new])
                todo = [new]
            grids[(s, solver)] = grid
        _log(f"seed003-protocol {s} done")
    # best lr per (setting, solver) by mean final training loss; Adam's time per epoch as 1
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for s in cfg["settings"]:
        for solver in solvers:
            by_f = {}
            for f in grids[(s, solver)]:
                rs = [r for r in rows if r["setting"] == s and r["solver"] == solver
                      and r["lr_factor"] == f and r.get("status") == "ok"]
                if rs:
                    by_f[f] = {"loss": _mean([r["final_train_loss"] for r in rs]),
                               "spe": _mean([r["seconds_per_epoch"] or math.nan for r in rs]),
                               "curve": [_mean([r["curve"][i] for r in rs])
                                         for i in range(min(len(r["curve"]) for r in rs))],
                               "cut": any(r.get("stopped") for r in rs)}
            if by_f:
                fb = min(by_f, key=lambda f: by_f[f]["loss"] if math.isfinite(by_f[f]["loss"])
                         else math.inf)
                grid = grids[(s, solver)]
                best[(s, solver)] = {"factor": fb, **by_f[fb], "grid": grid,
                                     "centred": len(grid) == 1 or fb not in (grid[0], grid[-1])}
    # the seed's claim: a first-order method below Adam's training loss on every setting at
    # <= 4.3 / 2.6 = 1.65x Adam's seconds per epoch
    limit = 4.3 / 2.6
    winners = []
    for solver in solvers:
        if solver == "adam":
            continue
        ok = True
        for s in cfg["settings"]:
            a, b = best.get((s, "adam")), best.get((s, solver))
            if not a or not b or not (b["loss"] < a["loss"]) or not (
                    b["spe"] / a["spe"] <= limit):
                ok = False
        if ok:
            winners.append(solver)
    agrees = bool(winners)
    centred = sum(b["centred"] for b in best.values())
    parts = []
    for s in cfg["settings"]:
        a = best.get((s, "adam"))
        cells = []
        for solver in solvers:
            b = best.get((s, solver))
            if b and a:
                cells.append(f"{solver} {_g(b['loss'])} ({b['spe'] / a['spe']:.1f}x"
                             f"{', edge' if not b['centred'] else ''})")
        parts.append(f"{s}: " + ", ".join(cells))
    ocnet = ("final training loss at the best lr (s/epoch vs Adam): " + "; ".join(parts)
             + f"; best lr inside the (widened) grid for {centred}/{len(best)}")
    verdict, why = _verdict(
        agrees, _cuts(cfg, paper),
        ("solvers below Adam's training loss on every setting at <= 1.65x its time: "
         + ", ".join(winners)) if winners else
        "no ocnet solver is below Adam's training loss on every setting at <= 1.65x Adam's "
        "seconds per epoch (seed 003's GLS claim, applied to ocnet's solvers)")
    plt = _plt()
    fig, axes = plt.subplots(1, len(cfg["settings"]), figsize=(5 * len(cfg["settings"]), 3.8),
                             squeeze=False)
    for ax, s in zip(axes[0], cfg["settings"], strict=True):
        for solver in solvers:
            b = best.get((s, solver))
            if b:
                ax.semilogy(range(len(b["curve"])), b["curve"],
                            label=f"{solver} (x{b['factor']:.2g} lr)")
        ax.set_title(s)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss (full set), log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    _savefig(fig, _fig(out, "seed003-protocol"))
    return {
        "protocol": f"ocnet compare settings {'/'.join(cfg['settings'])} (MLP 3 dense, CNN 2 conv"
                    f" + 2 dense, AE 4 dense; DIGITS stands in for CIFAR-10), lr = default x "
                    f"{_short(cfg['lr factors'])}"
                    + (f" widened x3 up to {max_ext} times while the best is at an edge"
                       if max_ext else "") + f", {cfg['epochs']} epochs, seeds {cfg['seeds']}"
                    f", solvers {'/'.join(solvers)}"
                    + (f", {budget:g} s budget per run" if budget else ""),
        "paper": "an undisclosed first-order method (GLS) reaches a lower CIFAR-10 training loss "
                 "per epoch than SGD and Adam on MLP, CNN and autoencoder, at 4.3 s/epoch vs "
                 "Adam's 2.6 s (seed 003; REFERENCE.md s.6)",
        "ocnet": ocnet, "reproduced": verdict, "why": why,
        "data": {f"{s}|{v}": b for (s, v), b in best.items()},
    }


# ============================================================================ registry and run
@dataclass(frozen=True)
class Entry:
    """One claim: its name, one-line statement, source, and the function running it."""

    name: str
    claim: str
    source: str
    fn: Callable[[str, Path], Row]
    full_command: str


ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("emsa-toy", "E-MSA converges faster per iteration than Adam on the public sin(x) toy",
          "Li, Chen, Tai, E, JMLR 2018, toy loss curves; public code LiQianxiao/"
          "MaxPrinciple-DeepLearning main_toy.py", emsa_toy,
          "python -m ocnet.reproduce --paper --only emsa-toy"),
    Entry("emsa-classification",
          "E-MSA has fast initial per-iteration convergence on classification",
          "Li & Hao, ICML 2018 / Li et al. JMLR 2018, MNIST loss curves", emsa_classification,
          "python -m ocnet.reproduce --paper --only emsa-classification"),
    Entry("ddpnopt-lr-sweep",
          "DDPNOpt beats its base optimizer at equal hyper-parameters, more so at larger lr",
          "Liu, Chen, Theodorou, ICLR 2021, Fig. 4a", ddpnopt_lr_sweep,
          "python -m ocnet.reproduce --paper --only ddpnopt-lr-sweep"),
    Entry("ddpnopt-vanishing", "DDPNOpt prevents gradient vanishing where SGD stalls",
          "Liu, Chen, Theodorou, ICLR 2021, vanishing-gradient experiment (seed 000)",
          ddpnopt_vanishing, "python -m ocnet.reproduce --paper --only ddpnopt-vanishing"),
    Entry("novas-regression",
          "NOVAS matches DCEM on the x sin x energy regression and, unlike unrolled GD, does "
          "not overfit the inner iteration count",
          "Exarchos et al., ICLR 2021, energy regression (seed 004); DCEM, Amos & Yarats 2020",
          novas_regression, "python -m ocnet.reproduce --paper --only novas-regression"),
    Entry("novas-global", "NOVAS finds the global basin where gradient descent is trapped",
          "Exarchos et al., ICLR 2021 (seed 004 abstract: non-convex optimisation module)",
          novas_global, "python -m ocnet.reproduce --paper --only novas-global"),
    Entry("dwr-placement",
          "goal-oriented (DWR) layer insertion needs fewer layers than uniform refinement, "
          "because of where it inserts them",
          "Hintermueller, Hinze, Korolev, arXiv 2601.07397, classification examples (seed 002)",
          dwr_placement, "python -m ocnet.reproduce --paper --only dwr-placement"),
    Entry("goal-braking",
          "goal-oriented braking (port-Hamiltonian heavy ball) improves on SGD",
          "Burghoff, Heinrich Monells, Gottschalk, ICANN 2023 (seed 001)", goal_braking,
          "python -m ocnet.reproduce --paper --only goal-braking"),
    Entry("seed003-protocol",
          "a first-order method beats SGD and Adam in training loss per epoch on MLP, CNN "
          "and autoencoder at <= 1.65x Adam's time",
          "seed 003 (personal research page; MLP/CNN/autoencoder figures, 4.3 s vs 2.6 s)",
          seed003_protocol, "python -m ocnet.reproduce --paper --only seed003-protocol"),
)}


def entry_names() -> list[str]:
    """The valid entry names, in table order."""
    return list(ENTRIES)


def _check_names(only: list[str] | None) -> list[str]:
    if not only:
        return entry_names()
    for name in only:
        if name not in ENTRIES:
            raise unknown_name("reproduction entry", name, entry_names())
    return list(dict.fromkeys(only))


def run_entry(name: str, level: str, out: Path) -> Row:
    """Run one entry at ``level`` (quick | reduced | paper); its row with name and seconds."""
    if level not in LEVELS:
        raise unknown_name("reproduction level", level, list(LEVELS))
    entry = ENTRIES[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    row = entry.fn(level, out)
    fig = _fig(out, name)
    row = {"name": name, "claim": entry.claim, "source": entry.source, **row,
           "level": level, "seconds": round(time.perf_counter() - t0, 1),
           "figure": fig.name if fig.exists() else None, "full_command": entry.full_command}
    if row["reproduced"] not in VERDICTS:  # pragma: no cover - a bug in an entry
        raise AssertionError(f"entry {name} gave verdict {row['reproduced']!r}")
    return row


def _cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    """The reproduction table as markdown (one row per entry)."""
    lines = ["| entry | " + " | ".join(HEADERS) + " |",
             "|---" * (len(HEADERS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run(quick: bool, only: list[str] | None, out: Path, *, paper: bool = False,
        threads: int | None = 1) -> list[dict[str, Any]]:
    """Run the entries (all, or those in ``only``), print the table and write
    ``OUT/reproduce.json``, ``OUT/reproduce.md`` and one ``OUT/reproduce_NAME.png`` per entry
    (each file written atomically). ``quick``: the smoke-test level; default: the reduced
    level; ``paper``: the full protocols. Returns the rows (``COLUMNS`` plus name, level,
    seconds, figure, full_command and the entry's raw data)."""
    if quick and paper:
        raise ConfigError("reproduce: choose one of quick and paper, not both")
    names = _check_names(only)
    level = "quick" if quick else "paper" if paper else "reduced"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        _log(f"{name} ({level}) ...")
        rows.append(run_entry(name, level, out))
        _log(f"{name}: {rows[-1]['reproduced']} ({rows[-1]['seconds']} s)")
    total = time.perf_counter() - t0
    table = markdown_table(rows)
    print(table)
    print(f"\n{len(rows)} entries, level {level}, {total:.0f} s wall")
    meta = {"level": level, "seconds": round(total, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    _atomic_write(out / "reproduce.json", json.dumps(
        _jsonable({"meta": meta, "rows": rows}), indent=1) + "\n")
    md = [f"# ocnet reproduce ({level})", "",
          f"{meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), "
          f"{total:.0f} s wall.", "", table, ""]
    for r in rows:
        md += [f"## {r['name']}", "", f"- seconds: {r['seconds']}",
               f"- full protocol: `{r['full_command']}`"]
        if r["figure"]:
            md.append(f"\n![{r['name']}]({r['figure']})")
        md.append("")
    _atomic_write(out / "reproduce.md", "\n".join(md))
    return rows


@click.command("reproduce")
@click.option("--quick", is_flag=True, help="smoke-test scale (a few minutes on 2 cores)")
@click.option("--paper", is_flag=True, help="the papers' full protocols (hours on a CPU)")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="run only this entry (repeatable): " + ", ".join(ENTRIES))
@click.option("--out", "out", default="runs/reproduce", show_default=True,
              type=click.Path(file_okay=False), help="output folder")
@click.option("--threads", default=1, show_default=True, help="torch threads")
def reproduce_command(quick: bool, paper: bool, only: tuple[str, ...], out: str,
                      threads: int) -> None:
    """Every seed paper's claim as a row: claim, source, protocol, the paper's figure,
    ocnet's, reproduced (yes / partly / no) and why."""
    try:
        run(quick, list(only) or None, Path(out), paper=paper, threads=threads)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


if __name__ == "__main__":  # pragma: no cover
    reproduce_command()
