"""``ocnet compare``: every solver on the seed-003 benchmark protocol, on offline data.

The protocol (REFERENCE.md section 6), on data available without a download:

========== ===================================================== ========= ===============
setting    network                                               loss      test metric
========== ===================================================== ========= ===============
mlp-digits MLP classifier, 3 dense layers (64-64-64-10, tanh)    CE        accuracy
cnn-digits CNN, 2 conv (3x3, 16 ch, relu) + 2 dense (64, 10)     CE        accuracy
ae-digits  MLP autoencoder, 4 dense layers 64-32-8-32-64 (tanh)  MSE       reconstruction MSE
ae-mnist1d MLP autoencoder, 4 dense layers 40-32-8-32-40 (tanh)  MSE       reconstruction MSE
========== ===================================================== ========= ===============

Every registered solver (``ocnet.solvers.solver_names()``) is run on every setting, except
the exact references (``SolverRecord.reference``: ``ipopt``, whose dense NLP over all
samples and weights is far too slow at these sizes) and solvers whose factory raises
``ConfigError`` on the problem (reported with the reason). Each solver runs at learning
rates ``default x {1/3, 1, 3}`` around its own default (``SolverRecord.lr``; ``--quick``:
only the default), the same seeds, batches and initial weights for every solver. The
*training loss* per epoch is the objective on the full training set after the epoch
(log-scale curves per setting); the test metric is measured after the last epoch; seconds
per epoch are the solvers' own step times (evaluation excluded; mean step time x steps per
epoch, so an epoch cut by the time budget counts fully), reported as a ratio to Adam at its
default learning rate in the same run. Each run is a forked child killed if a single step
overruns the budget by far.

The autoencoders need no ``train.py`` support: runs use the one training loop
(:func:`ocnet.solvers.loop.fit`) on ``ocnet.data.batches`` with ``(x, target)`` batches
(target = x for the autoencoder) and this module's :class:`Curves` callback.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from .bridge import to_problem
from .data import batches, load
from .models import build_model
from .ocp.errors import ConfigError, OcnetError, unknown_name
from .ocp.problem import Problem
from .solvers import make_solver, solver_entry, solver_names, solver_records
from .solvers.loop import Callback, EpochEnd, StepEvent, TimeBudget, fit

__all__ = ["SETTINGS", "SKIP", "Curves", "Setting", "build_setting", "compare", "replot",
           "run_compare", "run_one", "skipped_solvers"]


def skipped_solvers() -> dict[str, str]:
    """Solvers never run by the comparison (the registry's exact references), with the reason
    printed in the report."""
    return {r.name: r.skip_reason() for r in solver_records() if r.reference}


#: the solvers skipped when this module was imported (``skipped_solvers()`` is current)
SKIP = skipped_solvers()
#: learning-rate multipliers around each solver's default
LR_FACTORS = (1 / 3, 1.0, 3.0)
QUICK_LR_FACTORS = (1.0,)


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: data set, network kind and loss."""

    name: str
    data: str
    kind: str  # "mlp" | "cnn" | "ae"
    description: str

    @property
    def autoencoder(self) -> bool:
        return self.kind == "ae"


SETTINGS: dict[str, Setting] = {
    s.name: s for s in (
        Setting("mlp-digits", "digits", "mlp", "MLP classifier, 3 dense layers (64-64-64-10)"),
        Setting("cnn-digits", "digits", "cnn", "CNN, 2 conv 3x3 x16 + 2 dense (64, 10)"),
        Setting("ae-digits", "digits", "ae", "MLP autoencoder, 4 dense layers 64-32-8-32-64"),
        Setting("ae-mnist1d", "mnist1d", "ae", "MLP autoencoder, 4 dense layers 40-32-8-32-40"),
    )
}


def _autoencoder(n_features: int, hidden: int = 32, code: int = 8) -> nn.Sequential:
    """4 dense layers n -> hidden -> code -> hidden -> n, tanh between (linear output)."""
    return nn.Sequential(
        nn.Linear(n_features, hidden), nn.Tanh(),
        nn.Linear(hidden, code), nn.Tanh(),
        nn.Linear(code, hidden), nn.Tanh(),
        nn.Linear(hidden, n_features),
    )


def build_setting(setting: Setting, seed: int, n_train: int | None = None,
                  ) -> tuple[nn.Sequential, str, Any]:
    """(model initialised from ``seed``, loss name, data set) of a setting."""
    n_test = None
    if n_train is not None and setting.data == "digits":
        n_test = 1797 - n_train if n_train < 1797 else None
    ds = load(setting.data, seed=seed, n_train=n_train, n_test=n_test)
    torch.manual_seed(seed)
    if setting.kind == "mlp":
        model = build_model("mlp", ds.n_features, ds.n_classes, width=64, depth=2)
        return model, "cross_entropy", ds
    if setting.kind == "cnn":
        model = build_model("cnn", ds.n_features, ds.n_classes, image_shape=ds.image_shape)
        return model, "cross_entropy", ds
    return _autoencoder(ds.n_features), "mse", ds


@torch.no_grad()
def _metrics(problem: Problem, x: torch.Tensor, y: torch.Tensor, ae: bool,
             chunk: int = 2048) -> tuple[float, float]:
    """(objective, test metric) on (x, y): accuracy for classifiers, MSE for autoencoders."""
    total, hits = 0.0, 0.0
    n = x.shape[0]
    for s in range(0, n, chunk):
        xb, yb = x[s:s + chunk], y[s:s + chunk]
        out = problem.rollout(xb).xs[-1]
        if ae:
            total += float(torch.nn.functional.mse_loss(out, xb, reduction="sum")) / xb[0].numel()
        else:
            total += float(torch.nn.functional.cross_entropy(out, yb, reduction="sum"))
            hits += float((out.argmax(1) == yb).sum())
    loss = total / n
    return loss, (loss if ae else hits / n)


class Curves(Callback):
    """The comparison's record of a run: the objective on the full training set and the test
    loss after every epoch, and the solver's step seconds; stops a diverged run."""

    def __init__(self, problem: Problem, ds: Any, ae: bool) -> None:
        self.problem, self.ds, self.ae = problem, ds, ae
        loss0, _ = _metrics(problem, ds.x_train, ds.y_train, ae)
        self.curve, self.test_curve = [loss0], []
        self.steps, self.seconds = 0, 0.0

    def on_step(self, event: StepEvent) -> None:
        self.steps += 1
        self.seconds += event.info.seconds

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        tr, _ = _metrics(self.problem, self.ds.x_train, self.ds.y_train, self.ae)
        te_loss, _ = _metrics(self.problem, self.ds.x_test, self.ds.y_test, self.ae)
        self.curve.append(tr)
        self.test_curve.append(te_loss)
        return None if math.isfinite(tr) else "diverged"


def run_one(setting: Setting, solver: str, lr_factor: float, seed: int, epochs: int,
            batch_size: int = 32, budget: float | None = None, n_train: int | None = None,
            solver_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one (setting, solver, lr, seed); a dict with status, curves and metrics."""
    model, loss, ds = build_setting(setting, seed, n_train)
    problem = to_problem(model, loss)
    row: dict[str, Any] = {"setting": setting.name, "solver": solver, "seed": seed,
                           "lr_factor": lr_factor}
    options = dict(solver_options or {})
    try:
        default = solver_entry(solver).lr(options)
        if lr_factor != 1.0 and default is None:
            row.update(status="skipped: the solver has no learning rate to sweep", lr=None)
            return row
        lr = None if lr_factor == 1.0 or default is None else default * lr_factor
        sol = make_solver(solver, problem, lr=lr, **options)
        row["lr"] = default if lr is None else lr
    except ConfigError as err:
        row.update(status=f"skipped: {err}", lr=None)
        return row
    ae = setting.autoencoder
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = ds.x_train, ds.y_train
    curves = Curves(problem, ds, ae)
    callbacks: list[Callback] = [curves]
    if budget is not None:
        callbacks.append(TimeBudget(budget))  # checked between steps: a host decision

    def epoch_batches(_epoch: int) -> Any:
        return ((xb, xb if ae else yb) for xb, yb in batches(xtr, ytr, batch_size,
                                                               generator=gen))

    status, stopped = "ok", False
    try:
        result = fit(sol, epoch_batches, epochs=epochs, callbacks=callbacks)
        status = "diverged" if result.stopped == "diverged" else "ok"
        stopped = result.stopped == "time budget"
    except OcnetError as err:
        status = f"failed: {err}"
    except RuntimeError as err:  # e.g. a singular solve inside a second-order step
        status = f"failed: {type(err).__name__}: {err}"
    _, metric = _metrics(problem, ds.x_test, ds.y_test, ae)
    per_epoch = math.ceil(xtr.shape[0] / batch_size)
    n_steps, curve = curves.steps, curves.curve
    row.update(status=status, stopped=stopped, curve=curve, test_curve=curves.test_curve,
               epochs=len(curve) - 1, final_train_loss=curve[-1], test_metric=metric,
               # per step x steps per epoch: also right for an epoch cut by the budget
               seconds_per_epoch=(curves.seconds / n_steps * per_epoch) if n_steps else None,
               steps=sol.steps)
    return row


def _child(conn: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    try:
        conn.send(run_one(*args, **kwargs))
    except Exception as err:  # report anything to the parent instead of dying silently
        conn.send({"status": f"failed: {type(err).__name__}: {err}"})
    finally:
        conn.close()


def run_isolated(setting: Setting, solver: str, lr_factor: float, seed: int, epochs: int,
                 budget: float | None, hard_limit: float | None,
                 **kwargs: Any) -> dict[str, Any]:
    """:func:`run_one` in a forked child killed after ``hard_limit`` s.

    The budget is checked between steps; a solver whose set-up or single step takes far
    longer (dense second-order solvers on these sizes) would stall the comparison, so the
    run is killed and reported as timed out. Without ``fork`` (not Linux) it runs here.
    """
    import multiprocessing as mp

    base = {"setting": setting.name, "solver": solver, "seed": seed, "lr_factor": lr_factor,
            "lr": None}
    if hard_limit is None or "fork" not in mp.get_all_start_methods():
        return run_one(setting, solver, lr_factor, seed, epochs, budget=budget, **kwargs)
    ctx = mp.get_context("fork")  # inherits solvers registered at run time
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, (setting, solver, lr_factor, seed, epochs),
                                            {"budget": budget, **kwargs}), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(hard_limit):
            return {**base, "status": f"timed out: no result after {hard_limit:g} s (set-up "
                                      f"or one step takes longer than the {budget:g} s budget "
                                      "at this size)"}
        row = recv.recv()
        return row if "setting" in row else {**base, **row}
    except EOFError:
        proc.join(5)
        return {**base, "status": f"failed: the worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()  # our own child, by handle
        proc.join(10)
        recv.close()


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (setting, solver, lr_factor)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["solver"], r["lr_factor"]), []).append(r)
    out = []
    for (setting, solver, f), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        agg = {"setting": setting, "solver": solver, "lr_factor": f, "lr": rs[0].get("lr"),
               "n_ok": len(ok), "n": len(rs),
               "status": "ok" if ok else rs[0]["status"]}
        if ok:
            n_ep = min(len(r["curve"]) for r in ok)
            agg.update(
                final_train_loss=_mean([r["final_train_loss"] for r in ok]),
                test_metric=_mean([r["test_metric"] for r in ok]),
                seconds_per_epoch=_mean([r["seconds_per_epoch"] for r in ok
                                         if r["seconds_per_epoch"] is not None]),
                curve=[_mean([r["curve"][i] for r in ok]) for i in range(n_ep)],
                epochs=n_ep - 1, stopped=any(r.get("stopped") for r in ok),
            )
        out.append(agg)
    return out


def _best(aggs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (setting, solver): the learning rate with the lowest mean final training loss."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for a in aggs:
        key = (a["setting"], a["solver"])
        cur = best.get(key)
        good = a["status"] == "ok" and math.isfinite(a.get("final_train_loss", math.nan))
        if cur is None or (good and (cur["status"] != "ok" or not math.isfinite(
                cur.get("final_train_loss", math.nan))
                or a["final_train_loss"] < cur["final_train_loss"])):
            best[key] = a
    return best


def _g(v: Any, spec: str = ".4g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v,
                                                                                              spec)


def tables(aggs: list[dict[str, Any]], settings: list[str]) -> tuple[str, dict[str, str]]:
    """(markdown of the best-lr table per setting and all runs, winner per setting)."""
    best = _best(aggs)
    lines, winners = [], {}
    for s in settings:
        setting = SETTINGS[s]
        metric = "test recon. MSE" if setting.autoencoder else "test accuracy"
        rows = [b for (ss, _), b in best.items() if ss == s]
        adam = next((a for a in aggs if a["setting"] == s and a["solver"] == "adam"
                     and a["lr_factor"] == 1.0 and a["status"] == "ok"), None)
        ref = adam["seconds_per_epoch"] if adam else None
        ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r["final_train_loss"])]
        ok.sort(key=lambda r: r["final_train_loss"])
        if ok:
            winners[s] = ok[0]["solver"]
        lines += [f"### {s}: {setting.description}", "",
                  f"| solver | best lr (x default) | epochs | final train loss | {metric} "
                  "| s/epoch vs adam |", "|---|---|---|---|---|---|"]
        for r in ok + [r for r in rows if r not in ok]:
            if r["status"] != "ok":
                lines.append(f"| {r['solver']} | - | - | - | - | {r['status'][:160]} |")
                continue
            ratio = r["seconds_per_epoch"] / ref if ref else None
            cut = "*" if r.get("stopped") else ""
            spec = ".4g" if setting.autoencoder else ".4f"
            lines.append(
                f"| {r['solver']} | {_g(r['lr'], '.3g')} (x{r['lr_factor']:.3g}) | "
                f"{r['epochs']}{cut} | {_g(r['final_train_loss'])} | "
                f"{_g(r['test_metric'], spec)} | {_g(ratio, '.2f')} |")
        lines.append("")
    lines += ["### All runs (mean over seeds)", "",
              "| setting | solver | lr | final train loss | test metric | s/epoch | status |",
              "|---|---|---|---|---|---|---|"]
    for a in aggs:
        lines.append(f"| {a['setting']} | {a['solver']} | {_g(a.get('lr'), '.3g')} | "
                     f"{_g(a.get('final_train_loss'))} | {_g(a.get('test_metric'))} | "
                     f"{_g(a.get('seconds_per_epoch'), '.3g')} | {a['status'][:100]} |")
    return "\n".join(lines), winners


def plot(aggs: list[dict[str, Any]], settings: list[str], out: Path) -> list[Path]:
    """One log-scale training-loss figure per setting (best lr per solver; others thin)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best(aggs)
    paths = []
    for s in settings:
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
        solvers = sorted({a["solver"] for a in aggs if a["setting"] == s})
        cmap = matplotlib.colormaps["tab10" if len(solvers) <= 10 else "tab20"]
        starts = [a["curve"][0] for a in aggs if a["setting"] == s and a["status"] == "ok"]
        off_scale = []
        for i, name in enumerate(solvers):
            color = cmap(i % cmap.N)
            for a in aggs:
                if a["setting"] != s or a["solver"] != name or a["status"] != "ok":
                    continue
                is_best = best.get((s, name)) is a
                if is_best and starts and max(a["curve"]) > 10 * max(starts):
                    off_scale.append(name)
                ax.plot(range(len(a["curve"])), a["curve"], "-" if is_best else ":",
                        color=color, lw=1.8 if is_best else 0.8,
                        label=f"{name} (lr {a['lr']:.2g})" if is_best and a["lr"] else
                        (name if is_best else None))
        ax.set_yscale("log")
        if starts:  # a diverged run must not squash the others: cut at 10x the start
            ax.set_ylim(top=10 * max(starts))
        if off_scale:
            ax.text(0.99, 0.98, "off scale (diverged): " + ", ".join(off_scale),
                    transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (full training set), log scale")
        ax.set_title(f"{s}: {SETTINGS[s].description}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  title="solid: best lr\ndotted: other lrs", title_fontsize=7)
        fig.tight_layout()
        path = out / f"{s}_loss.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def replot(results_json: str | os.PathLike, out: str | os.PathLike | None = None,
           ) -> list[Path]:
    """Redraw the figures of an earlier run from its ``results.json``."""
    path = Path(results_json)
    rows = json.loads(path.read_text())
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    return plot(_aggregate(rows), settings, Path(out) if out else path.parent)


def run_compare(out: str | os.PathLike = "runs/compare", settings: list[str] | None = None,
                solvers: list[str] | None = None, seeds: list[int] | None = None,
                epochs: int | None = None, quick: bool = False, budget: float | None = None,
                lr_factors: tuple[float, ...] | None = None, threads: int | None = 1,
                n_train: int | None = None, progress: bool = True,
                isolate: bool = True) -> dict[str, Any]:
    """Run the comparison; writes ``OUT/results.md``, ``OUT/results.json`` and PNG figures.

    ``budget``: seconds of training per run (checked between steps; a cut run is marked
    ``*``). ``--quick``: 3 epochs, default lr only, 8 s per run, seed 0. ``isolate``: run
    each in a forked child killed ``2 budget + 30`` s after it started.
    """
    settings = list(SETTINGS) if settings is None else list(settings)
    for s in settings:
        if s not in SETTINGS:
            raise unknown_name("setting", s, list(SETTINGS))
    valid = solver_names()
    skip = skipped_solvers()
    names = [n for n in valid if n not in skip] if solvers is None else list(solvers)
    for n in names:
        if n not in valid:
            raise unknown_name("solver", n, valid)
    seeds = [0] if seeds is None else list(seeds)
    epochs = epochs or (3 if quick else 10)
    factors = lr_factors or (QUICK_LR_FACTORS if quick else LR_FACTORS)
    budget = budget if budget is not None else (8.0 if quick else 60.0)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped = skip if solvers is None else {}
    for s in settings:
        for name in names:
            for f in factors:
                for seed in seeds:
                    r = run_isolated(SETTINGS[s], name, f, seed, epochs, budget,
                                     None if not isolate else 2 * budget + 30,
                                     n_train=n_train)
                    rows.append(r)
                    if progress:
                        msg = (f"loss {r['final_train_loss']:.4g} metric "
                               f"{r['test_metric']:.4g}" if r["status"] == "ok"
                               else r["status"][:120])
                        print(f"  {s:<11} {name:<9} lr x{f:.3g} seed {seed}: {msg}",
                              flush=True)
    aggs = _aggregate(rows)
    md, winners = tables(aggs, settings)
    figs = plot(aggs, settings, out)
    wall = time.perf_counter() - t0
    header = (
        f"# ocnet compare\n\n"
        f"Date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; seeds {seeds}; "
        f"{epochs} epochs, batch 32, lr factors {[round(f, 3) for f in factors]} x each "
        f"solver's default; at most {budget:g} s of training per run (`*`: cut by it); torch "
        f"{torch.__version__}, Python {platform.python_version()}, torch threads "
        f"{torch.get_num_threads()}. Machine: a shared 2-core CPU box (timings are ratios "
        f"within this run only). Training loss = objective on the full training set after "
        f"the last epoch (mean over seeds), best lr per solver = lowest final training loss."
        f"\n\n"
    )
    skip_md = "".join(f"- `{k}` not run: {v}\n" for k, v in skipped.items())
    win_md = "".join(f"- {s}: **{w}** (lowest final training loss)\n"
                     for s, w in winners.items())
    text = (header + (f"Skipped solvers:\n\n{skip_md}\n" if skip_md else "")
            + f"Winners:\n\n{win_md}\n" + md + f"\n\nTotal wall time {wall:.0f} s.\n")
    (out / "results.md").write_text(text)
    slim = [{k: v for k, v in r.items()} for r in rows]
    (out / "results.json").write_text(json.dumps(slim, indent=1, default=str))
    if progress:
        print(text)
    return {"rows": rows, "aggregates": aggs, "markdown": text, "winners": winners,
            "figures": figs, "seconds": wall}


def _csv(kind: type) -> Any:
    def parse(ctx: Any, param: Any, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


@click.command("compare")
@click.option("--out", default="runs/compare", show_default=True, type=click.Path(),
              help="directory for results.md, results.json and the PNG figures")
@click.option("--quick", is_flag=True, help="3 epochs, default lr only, 8 s per run")
@click.option("--settings", callback=_csv(str),
              help=f"comma-separated subset of: {', '.join(SETTINGS)}")
@click.option("--solvers", callback=_csv(str),
              help="comma-separated solver names (default: every registered one but the exact "
                   "references, e.g. ipopt)")
@click.option("--seeds", callback=_csv(int), help="comma-separated seeds (default 0)")
@click.option("--epochs", type=int, help="epochs per run (default 10, --quick 3)")
@click.option("--budget", type=float,
              help="seconds of training per run (default 60, --quick 8)")
@click.option("--n-train", type=int, help="training samples (default: the data set's split)")
def compare(out: str, quick: bool, settings: list[str] | None, solvers: list[str] | None,
            seeds: list[int] | None, epochs: int | None, budget: float | None,
            n_train: int | None) -> None:
    """Every solver on the seed-003 protocol: MLP, CNN (DIGITS), autoencoders (DIGITS,
    MNIST-1D); lr sweep, log-scale loss curves, test metrics, s/epoch vs Adam."""
    try:
        run_compare(out, settings=settings, solvers=solvers, seeds=seeds, epochs=epochs,
                    quick=quick, budget=budget, n_train=n_train)
    except OcnetError as err:
        raise click.ClickException(str(err)) from err
