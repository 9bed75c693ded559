"""Overlay several training runs in one figure (what ``ocnet plot RUN_DIR...`` draws).

Each run directory written by ``ocnet train`` holds ``metrics.csv`` (one row per epoch:
``train_loss``, ``test_loss``, ``test_accuracy``, ``seconds``, ...) and ``config.json``.
:func:`overlay_runs` draws, for every run, the loss (train solid, test dashed, log
scale), the test accuracy and the cumulative training seconds against the epoch, one
colour per run, with a legend naming each run from its configuration (the keys that
differ between the runs: e.g. ``solver=ddpnopt lr=0.01``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .ocp.errors import ConfigError

__all__ = ["load_run", "overlay_runs", "run_labels"]

#: configuration keys a legend may use, in order of preference
LABEL_KEYS = ("solver", "lr", "model", "data", "solver_options", "batch_size", "width",
              "depth", "activation", "weight_decay", "epochs", "seed", "dtype")


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"dir", "config", "metrics"}`` of one run; errors name the missing file and the fix."""
    d = Path(run_dir)
    metrics_path, config_path = d / "metrics.csv", d / "config.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{d} is not a training run: it has no metrics.csv (write one with "
                          f"`ocnet train --out {d}`)")
    with open(metrics_path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]
    if not rows:
        raise ConfigError(f"{metrics_path} has no rows yet (the run finished no epoch)")
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    return {"dir": d, "config": config, "metrics": rows}


def run_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A legend label per run: the configuration keys whose values differ between runs
    (all of solver/lr/model/data when there is one run), else the directory name."""
    configs = [r["config"] for r in runs]
    keys = [k for k in LABEL_KEYS
            if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    if len(runs) == 1:
        keys = [k for k in ("solver", "lr", "model", "data") if configs[0].get(k) is not None]
    labels = []
    for r in runs:
        parts = [f"{k}={_short(r['config'].get(k))}" for k in keys]
        labels.append(" ".join(parts) if parts else r["dir"].name)
    if len(set(labels)) < len(labels):  # identical configurations: tell them apart by dir
        labels = [f"{lab} ({r['dir'].name})" for lab, r in zip(labels, runs, strict=True)]
    return labels


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items())) or "{}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def overlay_runs(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike
                 ) -> Path:
    """Draw every run's loss, accuracy and seconds curves in one figure; returns the path.

    Args:
        run_dirs: directories written by ``ocnet train`` (each with metrics.csv and
            config.json).
        out_path: the image to write (``.png``, ``.pdf``, ``.svg``, ...).
    """
    if not run_dirs:
        raise ConfigError("overlay_runs needs at least one run directory")
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    runs = [load_run(d) for d in run_dirs]
    labels = run_labels(runs)
    fig = Figure(figsize=(15, 4.3))
    ax_loss, ax_acc, ax_sec = fig.subplots(1, 3)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (run, label) in enumerate(zip(runs, labels, strict=True)):
        color = colors[k % len(colors)]
        rows = run["metrics"]
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
        if any("train_loss" in r for r in rows):
            ax_loss.semilogy(epochs, [r.get("train_loss", float("nan")) for r in rows], "-",
                             color=color, label=f"{label} (train)")
        if any("test_loss" in r for r in rows):
            ax_loss.semilogy(epochs, [r.get("test_loss", float("nan")) for r in rows], "--",
                             color=color, label=f"{label} (test)")
        if any("test_accuracy" in r for r in rows):
            ax_acc.plot(epochs, [r.get("test_accuracy", float("nan")) for r in rows], "-o",
                        ms=3, color=color, label=label)
        total, cumulative = 0.0, []
        for r in rows:
            total += r.get("seconds", 0.0)
            cumulative.append(total)
        ax_sec.plot(epochs, cumulative, "-", color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: test)")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_sec.set(xlabel="epoch", ylabel="seconds", title="cumulative training seconds")
    for ax in (ax_loss, ax_acc, ax_sec):
        ax.grid(alpha=0.3, which="both")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
