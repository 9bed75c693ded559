"""Figures of a training run (matplotlib, Agg backend: no display needed).

- :func:`plot_losses`: train (solid) and test (dashed) loss per epoch, one run or several.
- :func:`plot_decision_boundary`: the classes a 2-D classifier assigns over the plane.
- :func:`plot_trajectories`: the network as a control system -- each input point x_0 is a
  state that the stages move, x_{t+1} = f_t(x_t, u_t); drawn as a line through
  x_0, x_1, ..., coloured by class. Separable final states are what training steers to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .metrics import read_metrics  # noqa: E402
from .ocp.problem import Problem  # noqa: E402

__all__ = ["plot_decision_boundary", "plot_losses", "plot_trajectories"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]

History = Sequence[Mapping[str, Any]]


def _history(metrics: str | os.PathLike | History) -> list[dict[str, float]]:
    if isinstance(metrics, (str, os.PathLike)):
        return read_metrics(metrics)
    return [dict(r) for r in metrics]


def plot_losses(
    metrics: str | os.PathLike | History | Mapping[str, str | os.PathLike | History],
    path: str | os.PathLike,
    log_scale: bool = True,
    title: str | None = None,
) -> Path:
    """Loss per epoch from a metrics.csv path or list of metric rows, or a dict
    ``{label: metrics}`` of several runs on one axis (train solid, test dashed)."""
    runs: dict[str, list[dict[str, float]]]
    if isinstance(metrics, Mapping):
        runs = {str(k): _history(v) for k, v in metrics.items()}
    else:
        runs = {"": _history(metrics)}
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(8.5 if several else 7, 4.5), dpi=110)
    styles = ["-o", "-s", "-^", "-D", "-v"]
    runs = {k: v for k, v in runs.items() if v}
    palette = _COLORS if len(runs) <= len(_COLORS) else [
        matplotlib.colormaps["tab20"](j) for j in range(20)]
    for i, (label, hist) in enumerate(runs.items()):
        color = palette[i % len(palette)]
        ep = [r["epoch"] for r in hist]
        # Several runs: one legend entry per run (solid train, dashed test, same colour).
        ax.plot(ep, [r["train_loss"] for r in hist], styles[(i // len(palette)) % 5], ms=3,
                color=color, label=label if several else "train")
        if all("test_loss" in r for r in hist):
            ax.plot(ep, [r["test_loss"] for r in hist], "--", color=color, alpha=0.6,
                    label=None if several else "test")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (cross-entropy)" + (", log scale" if log_scale else ""))
    ax.set_title(title or "training loss (solid) and test loss (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    if several:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  title="solid: train\ndashed: test", title_fontsize=8)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _xy(dataset: Any) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, tuple):
        return dataset[0], dataset[1]
    return dataset.x_test, dataset.y_test


@torch.no_grad()
def _logits(model: Problem | nn.Module, x: Tensor) -> Tensor:
    if isinstance(model, Problem):
        return model.rollout(x).xs[-1]
    return model(x)


def _like(model: Problem | nn.Module) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, Problem):
        return model.device, model.dtype
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def plot_decision_boundary(
    model: Problem | nn.Module,
    dataset: Any,
    path: str | os.PathLike,
    resolution: int = 250,
    title: str | None = None,
) -> Path:
    """Predicted classes on a grid over the data (2 features), with the points on top.

    ``model`` is a :class:`Problem` or an ``nn.Module``; ``dataset`` a ``Dataset`` (its test
    split is drawn) or a tuple ``(x, y)``.
    """
    x, y = _xy(dataset)
    if x.shape[1] != 2:
        raise ValueError(f"plot_decision_boundary needs 2-D inputs, got {x.shape[1]} features")
    device, dtype = _like(model)
    xn = x.detach().cpu().double().numpy()
    yn = y.detach().cpu().numpy()
    lo, hi = xn.min(axis=0), xn.max(axis=0)
    pad = 0.08 * (hi - lo)
    g0 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution)
    g1 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution)
    gx, gy = np.meshgrid(g0, g1)
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype, device=device)
    logits = _logits(model, grid)
    n_classes = logits.shape[1]
    pred = logits.argmax(dim=1).cpu().numpy().reshape(gx.shape)
    colors = _COLORS[:max(n_classes, 2)]
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    ax.contourf(gx, gy, pred, levels=np.arange(n_classes + 1) - 0.5,
                cmap=ListedColormap(colors), alpha=0.25)
    ax.contour(gx, gy, pred, levels=np.arange(n_classes) + 0.5, colors="k", linewidths=0.8)
    for k in range(n_classes):
        m = yn == k
        ax.scatter(xn[m, 0], xn[m, 1], s=8, color=colors[k], edgecolors="none",
                   label=f"class {k}")
    acc = float((_logits(model, x.to(device=device, dtype=dtype)).argmax(1).cpu() ==
                 y.cpu()).double().mean())
    ax.set_title((title or "decision boundary") + f"\naccuracy on the points shown: {acc:.3f}",
                 fontsize=10)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_aspect("equal", adjustable="box")
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def plot_trajectories(
    problem: Problem,
    x0: Tensor,
    y: Tensor,
    path: str | os.PathLike,
    include_head: bool = False,
    max_points: int = 300,
    title: str | None = None,
) -> Path:
    """States x_0, x_1, ... of the points ``x0`` through the stages, as lines coloured by class.

    Uses ``problem.rollout``. Stages whose state is not flat ``(N, D)`` or is narrower than
    2 are skipped; for states wider than 2 the first two coordinates are drawn (with a
    zero-padded lift those are the original plane; the title says so). The classifier head
    (the last stage, whose output are logits, not points of the plane) is left out unless
    ``include_head``.
    """
    device, dtype = problem.device, problem.dtype
    x0 = x0[:max_points].to(device=device, dtype=dtype)
    yn = y[:max_points].detach().cpu().numpy()
    xs = problem.rollout(x0).xs
    last = len(xs) if include_head else len(xs) - 1
    kept = [(t, xs[t]) for t in range(last) if xs[t].ndim == 2 and xs[t].shape[1] >= 2]
    if len(kept) < 2:
        raise ValueError("plot_trajectories needs at least two flat states of width >= 2")
    widths = sorted({int(s.shape[1]) for _, s in kept})
    path_xy = np.stack([s[:, :2].detach().cpu().double().numpy() for _, s in kept], axis=0)
    n_classes = int(yn.max()) + 1 if yn.size else 1
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=110)
    for i in range(path_xy.shape[1]):
        c = _COLORS[int(yn[i]) % len(_COLORS)]
        ax.plot(path_xy[:, i, 0], path_xy[:, i, 1], "-", color=c, lw=0.6, alpha=0.35)
    for k in range(n_classes):
        m = yn == k
        c = _COLORS[k % len(_COLORS)]
        ax.scatter(path_xy[0, m, 0], path_xy[0, m, 1], s=7, color=c, marker="o", alpha=0.6,
                   edgecolors="none", label=f"class {k}: $x_0$")
        ax.scatter(path_xy[-1, m, 0], path_xy[-1, m, 1], s=22, color=c, marker="^",
                   edgecolors="k", linewidths=0.3, label=f"class {k}: $x_{{{kept[-1][0]}}}$")
    skipped = (len(xs) - (0 if include_head else 1)) - len(kept)
    t0, t1 = kept[0][0], kept[-1][0]
    note = ""
    if widths[-1] > 2:
        note = (f"\nfirst 2 of {widths[-1]} state coordinates (zero-padded lift: "
                "these are the input plane)")
    if not include_head:
        note += "\nclassifier head (logits) not drawn"
    if skipped > 0:
        note += f"; {skipped} non-flat state(s) skipped"
    ax.set_title((title or f"trajectories of {path_xy.shape[1]} points, states "
                  f"$x_{{{t0}}}$ to $x_{{{t1}}}$") + note, fontsize=9)
    ax.set_xlabel("state coordinate 1")
    ax.set_ylabel("state coordinate 2")
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return _save(fig, path)
