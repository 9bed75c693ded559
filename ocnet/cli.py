"""The ``ocnet`` command line (click).

    ocnet train --data digits --model mlp --solver adam --epochs 20 --out runs/digits
    ocnet train --resume runs/digits --epochs 30
    torchrun --nproc-per-node 2 -m ocnet train --solver adam --batch-size 64   (data parallel)
    ocnet solvers | ocnet datasets | ocnet demo --out runs/demo

Every command runs inside :class:`OcnetGroup`, which turns an :class:`~ocnet.OcnetError`
into a one-line ``Error: ...`` (exit code 2 for bad names/options/data, 1 for failures such
as a corrupted checkpoint, a diverged run, a run directory in use, or an OS error such as a
full disk) instead of a traceback.

Adding a command from another module takes one line, e.g. at the end of this file
(section "more commands") or anywhere before ``main()`` runs::

    from ocnet.cli import cli
    cli.add_command(adapt)          # adapt: a @click.command()
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .data import DATASETS, DataError
from .models import MODELS
from .ocp.errors import ConfigError, OcnetError, ShapeError

__all__ = ["OcnetGroup", "cli", "main", "parse_option_value"]

_USAGE_ERRORS = (ConfigError, DataError, ShapeError)


class OcnetGroup(click.Group):
    """A click group whose commands report ocnet errors in one line, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except OcnetError as err:
                click.echo(f"Error: {_one_line(err)}", err=True)
                ctx.exit(2 if isinstance(err, _USAGE_ERRORS) else 1)
            except OSError as err:  # a full disk, a vanished directory: no traceback either
                where = f" ({err.filename})" if getattr(err, "filename", None) else ""
                click.echo(f"Error: {err.strerror or err}{where}", err=True)
                ctx.exit(1)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings on the command line: one ``Warning: ...`` line, no source location."""
    click.echo(f"Warning: {message}", err=True)


def parse_option_value(text: str) -> bool | int | float | str | None:
    """``--solver-opt`` values: true/false -> bool, none -> None, then int, float, else str."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_solver_opts(pairs: tuple[str, ...]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"--solver-opt takes KEY=VALUE with KEY a Python name, got {pair!r} "
                "(e.g. --solver-opt momentum=0.8)"
            )
        opts[key] = parse_option_value(value)
    return opts


def _solver_names() -> list[str]:
    from .solvers import solver_names

    return solver_names()


@click.group(cls=OcnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ocnet", prog_name="ocnet")
def cli() -> None:
    """ocnet: train neural networks as optimal control problems.

    A network is a control system (layers are time steps, weights are controls) and its
    training is solved by an optimal-control solver.
    """


# ----------------------------------------------------------------------------- train

# Options that --resume may take from the run's saved configuration when not given.
_RESUMABLE = {
    "data": "data", "model": "model", "solver": "solver", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "seed": "seed", "width": "width",
    "depth": "depth", "activation": "activation", "weight_decay": "weight_decay",
    "device": "device", "dtype": "dtype", "n_train": "n_train", "n_test": "n_test",
    "solver_opt": "solver_options", "threads": "threads", "max_rejected": "max_rejected",
}


def _saved_config(resume: Path) -> dict[str, Any]:
    """The configuration of the run being resumed (config.json, else the newest checkpoint)."""
    from .checkpoint import find_checkpoints

    run = resume.parent if resume.is_file() else resume
    if run.name == "checkpoints":
        run = run.parent
    cfg = run / "config.json"
    if cfg.is_file():
        try:
            saved = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warnings.warn(f"{cfg} cannot be read ({type(err).__name__}: {err}); taking the "
                          "run's configuration from its newest checkpoint instead",
                          RuntimeWarning, stacklevel=2)
        else:
            if isinstance(saved, dict):
                return saved
            warnings.warn(f"{cfg} holds no configuration (a JSON {type(saved).__name__}); "
                          "taking it from the run's newest checkpoint instead",
                          RuntimeWarning, stacklevel=2)
    for p in [resume] if resume.is_file() else find_checkpoints(resume):
        try:
            from .checkpoint import load_checkpoint

            saved = load_checkpoint(p).get("config", {})
            if isinstance(saved, dict):
                return dict(saved)
        except OcnetError:
            continue
    return {}


@cli.command()
@click.option("--data", default="digits", show_default=True,
              help=f"data set: {', '.join(DATASETS)}")
@click.option("--model", default="mlp", show_default=True, help=f"model: {', '.join(MODELS)}")
@click.option("--solver", default="adam", show_default=True,
              help="solver (see `ocnet solvers`)")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1),
              help="total number of epochs (a resumed run continues up to this)")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", type=float, default=None, help="learning rate [default: the solver's]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="output directory [default: runs/<data>_<model>_<solver>_seed<seed>]")
@click.option("--resume", type=click.Path(path_type=Path, exists=True), default=None,
              help="continue the run in this directory from its newest good checkpoint")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="hidden width [default: the model's]")
@click.option("--depth", type=click.IntRange(min=0), default=None,
              help="number of hidden layers / residual blocks [default: the model's]")
@click.option("--activation", default=None, help="tanh, relu, ... [default: the model's]")
@click.option("--weight-decay", default=0.0, show_default=True, type=float,
              help="running cost weight_decay/2 |u_t|^2 per stage")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--solver-opt", multiple=True, metavar="KEY=VALUE",
              help="solver option (repeatable); values parsed as bool/int/float/str")
@click.option("--n-train", type=click.IntRange(min=1), default=None,
              help="training-set size [default: the data set's]")
@click.option("--n-test", type=click.IntRange(min=1), default=None,
              help="test-set size [default: the data set's]")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="torch CPU threads (0: torch's default). More threads slowed the small "
                   "models 40x on a busy 2-core machine; raise it for large CPU models")
@click.option("--keep-checkpoints", default=3, show_default=True, type=click.IntRange(min=0),
              help="keep this many newest checkpoints (0: all)")
@click.option("--max-rejected", default=3, show_default=True, type=click.IntRange(min=0),
              help="stop after this many consecutive rejected steps (non-finite, undone); "
                   "0: never")
@click.option("--overwrite", is_flag=True,
              help="replace the checkpoints of an earlier run in --out")
@click.option("--tensorboard", is_flag=True,
              help="stream step and epoch scalars to OUT/tensorboard (pip install "
                   "ocnet[tensorboard])")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.pass_context
def train(ctx: click.Context, resume: Path | None, out: Path | None, no_progress: bool,
          keep_checkpoints: int, overwrite: bool, **options: Any) -> None:
    """Train a model on a data set with a solver; writes metrics, summary, checkpoints, plots."""
    from .train import TrainConfig
    from .train import train as run_train

    options["solver_opt"] = _parse_solver_opts(options["solver_opt"])
    options["threads"] = options["threads"] or None
    if resume is not None:
        saved = _saved_config(resume)
        for opt, key in _RESUMABLE.items():
            src = ctx.get_parameter_source(opt)
            if src in (click.core.ParameterSource.DEFAULT, None) and key in saved:
                options[opt] = saved[key]
        if out is None:
            out = resume.parent if resume.is_file() else resume
            if out.name == "checkpoints":
                out = out.parent
    solvers = _solver_names()
    if options["solver"] not in solvers:  # validated at call time: solvers register at import
        from .ocp.errors import unknown_name

        raise unknown_name("solver", options["solver"], solvers)
    if out is None:
        out = Path("runs") / (f"{options['data']}_{options['model']}_{options['solver']}"
                              f"_seed{options['seed']}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in options.items() if k in fields}
    config = TrainConfig(
        **kwargs, solver_options=options["solver_opt"], out=out,
        progress=not no_progress, keep_checkpoints=keep_checkpoints, overwrite=overwrite,
    )
    summary = run_train(config, resume=resume)
    if summary.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    click.echo(
        f"{summary['solver']} on {summary['data']} ({summary['model']}): "
        f"{summary['epochs']} epochs, {summary['steps']} steps, final train loss "
        f"{_fmt(summary['final_train_loss'])}, test accuracy {_fmt(summary['test_accuracy'])}, "
        f"{_fmt(summary['seconds_per_step'], 3, scale=1e3)} ms/step -> {out}"
    )


def _fmt(v: float | None, digits: int = 4, scale: float = 1.0) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}g}"


# ----------------------------------------------------------------------------- listings


def _facts(record: Any) -> str:
    """The registry facts of a solver in a few words (``ocnet solvers``)."""
    facts = [f"lr {record.default_lr:g}" if record.default_lr is not None else "no lr",
             record.cost]
    if record.max_controls is not None:
        facts.append(f"<= {record.max_controls} controls per {record.limit_per}")
    if record.data_parallel:
        facts.append("data parallel")
    if record.host_sync:
        facts.append("host decisions")
    if record.reference:
        facts.append("exact reference")
    facts.append("presets: " + ", ".join(sorted(record.presets)) if record.presets
                 else "no presets")
    return "; ".join(facts)


@cli.command()
def solvers() -> None:
    """List the registered solvers (valid --solver names) with their registry facts."""
    from .solvers import solver_records

    records = solver_records()
    width = max((len(r.name) for r in records), default=0)
    for r in records:
        click.echo(f"{r.name:<{width}}  {r.summary} [{_facts(r)}]")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/overlay.png"),
              show_default=True, help="the figure to write (.png, .pdf, .svg)")
def plot(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Overlay several runs' curves (loss, accuracy, seconds) in one figure; the legend
    names what differs between their configs."""
    from .overlay import overlay_runs

    path = overlay_runs(list(run_dirs), out)
    click.echo(f"{len(run_dirs)} runs -> {path}")


@cli.command()
def datasets() -> None:
    """List the data sets (valid --data names)."""
    for name in DATASETS:
        click.echo(name)


# ----------------------------------------------------------------------------- demo


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True, help="output directory")
@click.option("--solvers", "solver_list", default=None, metavar="A,B,C",
              help="comma-separated solvers [default: every registered solver]")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="DIGITS epochs per solver [default: 10]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--quick", is_flag=True, help="fewer epochs (a smoke test)")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="torch CPU threads (0: torch's default)")
@click.option("--budget", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds of training per solver and setting on DIGITS (0: no limit)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def demo(out: Path, solver_list: str | None, epochs: int | None, seed: int, quick: bool,
         threads: int, budget: float, no_progress: bool) -> None:
    """The default experiment: every solver on DIGITS, and a ResNet's trajectories on spirals."""
    from .demo import run_demo

    names = None if solver_list is None else [s.strip() for s in solver_list.split(",") if s]
    run_demo(out, solvers=names, epochs=epochs, seed=seed, quick=quick,
             progress=not no_progress, threads=threads or None, budget=budget or None)


# ----------------------------------------------------------------------------- more commands
# Commands defined elsewhere are added here with one line each.
from .adapt import adapt  # noqa: E402
from .compare import compare  # noqa: E402
from .reproduce import reproduce_command  # noqa: E402

cli.add_command(adapt)
cli.add_command(compare)
cli.add_command(reproduce_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ocnet`` / ``python -m ocnet``)."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="ocnet")
