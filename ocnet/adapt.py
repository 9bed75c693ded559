"""``ocnet adapt``: goal-oriented layer insertion (DWR) for a neural ODE on a data set.

(The experiments layer: it uses a data set, the DWR solver and the NeuralODE model; it was
``ocnet.neural_ode.adapt_cli`` before the layers were enforced.)

Trains a coarse NeuralODE, refines it adaptively (DWR + Doerfler) and, with
``--compare-uniform`` (default), uniformly from the same coarse start; writes
``history.json`` (mesh, objective, estimate, indicators, accuracy per refinement) and
plots: ``mesh.png`` (the mesh over refinements), ``accuracy.png`` (test accuracy against
the number of layers, adaptive and uniform) and ``trajectories.png`` (the points'
paths through the final network's ODE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from .data import load
from .dynamics import TimeMesh
from .neural_ode.model import FIELDS, LIFTS, NeuralODE, make_field
from .neural_ode.regularizer import DG0Regularizer
from .ocp.errors import unknown_name
from .solvers.dwr import DWR

# per-data-set defaults from the literature (REFERENCE.md section 4)
PRESETS: dict[str, dict[str, Any]] = {
    "swissroll": {"width": 4, "T": 20.0, "field": "antisymmetric"},
    "peaks": {"width": 8, "T": 5.0, "field": "activation"},
    "donut": {"width": 4, "T": 5.0, "field": "activation"},
    "spirals": {"width": 4, "T": 5.0, "field": "activation"},
}
DEFAULT_PRESET: dict[str, Any] = {"width": 4, "T": 5.0, "field": "activation"}
ARMS = {"adaptive": "doerfler", "uniform": "uniform", "random": "random",
        "sensitivity": "sensitivity"}


def build_model(n_features: int, n_classes: int, *, width: int, T: float, n0: int,  # noqa: N803
                field: str = "activation", activation: str = "tanh", lift: str = "zeropad",
                lam: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> NeuralODE:
    """A NeuralODE classifier on a uniform coarse mesh of ``n0`` intervals of [0, T]."""
    if lift == "zeropad" and n_features > width:
        lift = "dense"
    g = torch.Generator().manual_seed(seed)
    return NeuralODE(make_field(field, width, activation), TimeMesh.uniform(T, n0),
                     in_features=n_features, out_features=n_classes, lift=lift,
                     reg=DG0Regularizer(lam), generator=g, dtype=dtype)


def run_adapt(data: str, *, seed: int = 0, n0: int = 4, max_layers: int = 32,
              max_levels: int = 10, steps: int = 300, lr: float = 0.02, solver: str = "adam",
              theta: float = 0.5, tol: float = 0.0, lam: float = 1e-3,
              width: int | None = None, T: float | None = None,  # noqa: N803
              field: str | None = None, activation: str = "tanh", lift: str = "zeropad",
              estimator: str = "primal", n_train: int | None = None, n_test: int | None = None,
              arms: tuple[str, ...] = ("adaptive", "uniform")) -> dict[str, Any]:
    """Refinement from the same coarse start for each arm: ``adaptive`` (DWR + Doerfler),
    ``uniform`` (bisect all), ``random`` (as many as Doerfler, at random), ``sensitivity``
    (as many as Doerfler, largest SensLI sensitivity; ocnet.solvers.dwr.sensitivities).
    Returns a dict with
    each arm's :class:`~ocnet.solvers.dwr.DWR` (history, final model), settings and data."""
    preset = {**PRESETS.get(data, DEFAULT_PRESET)}
    width = width or preset["width"]
    T = T or preset["T"]  # noqa: N806
    field = field or preset["field"]
    ds = load(data, seed=seed, n_train=n_train, n_test=n_test)
    coarse = build_model(ds.n_features, ds.n_classes, width=width, T=T, n0=n0, field=field,
                         activation=activation, lift=lift, lam=lam, seed=seed)
    out: dict[str, Any] = {"data": ds, "settings": {
        "data": data, "seed": seed, "n0": n0, "max_layers": max_layers, "steps": steps,
        "lr": lr, "solver": solver, "theta": theta, "lam": lam, "width": width, "T": T,
        "field": field, "activation": activation, "estimator": estimator}}
    for kind in arms:
        if kind not in ARMS:
            raise unknown_name("arm", kind, list(ARMS))
        start = coarse.with_mesh(coarse.mesh, [tuple(u.clone() for u in c)
                                               for c in coarse.controls])
        dwr = DWR(start, "cross_entropy", inner=solver, lr=lr, steps=steps, theta=theta,
                  tol=tol, max_layers=max_layers, max_levels=max_levels,
                  strategy=ARMS[kind], estimator=estimator, seed=seed)
        dwr.run(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
        out[kind] = dwr
    return out


# ---------------------------------------------------------------------------- plots
def plot_mesh(history: list[Any], path: Path, title: str = "") -> None:
    """The mesh nodes of every refinement level (level on the y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, lev in enumerate(history):
        ax.plot(lev.nodes, [k] * len(lev.nodes), "|", ms=10, color="C0")
        if lev.marked:
            mids = [(lev.nodes[i] + lev.nodes[i + 1]) / 2 for i in lev.marked]
            ax.plot(mids, [k] * len(mids), "v", ms=4, color="C3")
    ax.set_xlabel("t")
    ax.set_ylabel("refinement level")
    ax.set_title(title or "mesh over refinements (red: marked)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(curves: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> None:
    """Test accuracy against the number of layers, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("layers (mesh intervals)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(model: NeuralODE, x: torch.Tensor, y: torch.Tensor, path: Path,
                      n_points: int = 200, title: str = "") -> None:
    """Paths of ``n_points`` inputs through the Euler network (first two state coordinates),
    coloured by class; circles at the mesh nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.stack(model.states(x[:n_points].to(model.controls[0][0].dtype)))  # (N+1, B, w)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for i in range(xs.shape[1]):
        c = f"C{int(y[i])}"
        ax.plot(xs[:, i, 0].tolist(), xs[:, i, 1].tolist(), "-", lw=0.5, color=c, alpha=0.5)
        ax.plot(xs[-1, i, 0].item(), xs[-1, i, 1].item(), "o", ms=2, color=c)
    ax.set_title(title or f"trajectories, {model.num_layers} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """history.json and the three plots into ``out``; returns the JSON content."""
    out.mkdir(parents=True, exist_ok=True)
    ds = result["data"]
    content: dict[str, Any] = {"settings": result["settings"]}
    curves = {}
    for kind in ARMS:
        if kind in result:
            hist = result[kind].history
            content[kind] = [lev.as_dict() for lev in hist]
            curves[kind] = [(lev.n_layers, lev.test_accuracy) for lev in hist]
    (out / "history.json").write_text(json.dumps(content, indent=1))
    plot_mesh(result["adaptive"].history, out / "mesh.png", f"{ds.name}: adaptive mesh")
    plot_accuracy(curves, out / "accuracy.png", ds.name)
    plot_trajectories(result["adaptive"].model, ds.x_test, ds.y_test, out / "trajectories.png")
    return content


@click.command("adapt")
@click.option("--data", "data", required=True, help="data set name (e.g. swissroll, peaks, "
              "donut, spirals; see ocnet.data.DATASETS)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--n0", default=4, show_default=True, help="layers of the coarse start")
@click.option("--max-layers", default=32, show_default=True, help="layer budget")
@click.option("--max-levels", default=10, show_default=True, help="at most this many refinements")
@click.option("--steps", default=300, show_default=True, help="inner solver steps per level")
@click.option("--solver", default="adam", show_default=True, help="inner solver (registry name)")
@click.option("--lr", default=0.02, show_default=True, type=float)
@click.option("--theta", default=0.5, show_default=True, help="Doerfler fraction")
@click.option("--tol", default=0.0, show_default=True, help="stop when |estimate| <= tol")
@click.option("--lam", default=1e-3, show_default=True, help="regulariser weight lambda")
@click.option("--width", default=None, type=int, help="state width (default: per data set)")
@click.option("--T", "T", default=None, type=float, help="final time (default: per data set)")
@click.option("--field", default=None, type=click.Choice(sorted(FIELDS)))
@click.option("--activation", default="tanh", show_default=True)
@click.option("--lift", default="zeropad", show_default=True, type=click.Choice(LIFTS))
@click.option("--estimator", default="primal", show_default=True,
              type=click.Choice(["primal", "full"]))
@click.option("--n-train", default=None, type=int)
@click.option("--n-test", default=None, type=int)
@click.option("--compare-uniform/--no-compare-uniform", default=True, show_default=True,
              help="also refine uniformly from the same coarse start")
@click.option("--compare-random/--no-compare-random", default=False, show_default=True,
              help="also mark as many intervals as Doerfler at random (control arm)")
@click.option("--compare-sensitivity/--no-compare-sensitivity", default=False,
              show_default=True, help="also mark as many intervals as Doerfler by the largest "
              "SensLI sensitivity (Kreis et al. 2023; peer arm)")
@click.option("--out", default=None, help="output directory (default runs/adapt/DATA-sSEED)")
def adapt(data: str, seed: int, n0: int, max_layers: int, max_levels: int, steps: int,
          solver: str, lr: float, theta: float, tol: float, lam: float, width: int | None,
          T: float | None, field: str | None, activation: str, lift: str,  # noqa: N803
          estimator: str, n_train: int | None, n_test: int | None, compare_uniform: bool,
          compare_random: bool, compare_sensitivity: bool, out: str | None) -> None:
    """Adaptive layer insertion for a neural ODE by dual-weighted residuals."""
    result = run_adapt(data, seed=seed, n0=n0, max_layers=max_layers, max_levels=max_levels,
                       steps=steps, lr=lr, solver=solver, theta=theta, tol=tol, lam=lam,
                       width=width, T=T, field=field, activation=activation, lift=lift,
                       estimator=estimator, n_train=n_train, n_test=n_test,
                       arms=("adaptive",) + (("uniform",) if compare_uniform else ())
                       + (("random",) if compare_random else ())
                       + (("sensitivity",) if compare_sensitivity else ()))
    path = Path(out or f"runs/adapt/{data}-s{seed}")
    write_outputs(result, path)
    for kind in ARMS:
        if kind not in result:
            continue
        click.echo(f"{kind}:")
        click.echo("| level | layers | objective | estimate | train acc | test acc |")
        click.echo("|---|---|---|---|---|---|")
        for k, lev in enumerate(result[kind].history):
            click.echo(f"| {k} | {lev.n_layers} | {lev.objective:.4f} | {lev.estimate:.3e} | "
                       f"{lev.train_accuracy:.3f} | {lev.test_accuracy:.3f} |")
    click.echo(f"wrote {path}/history.json, mesh.png, accuracy.png, trajectories.png")


if __name__ == "__main__":
    adapt()
