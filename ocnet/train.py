"""The training loop: a data set, a model as a control problem, a solver, epochs.

``train(TrainConfig(...))`` seeds torch, loads the data (checked finite), builds the model
and its problem J(u) = mean CE(x_T, y) + sum_t weight_decay/2 |u_t|^2, makes the solver and
runs ``solver.step(x, y)`` over shuffled mini-batches. The shuffling generator's state is
checkpointed with the controls and the solver state, so ``train(config, resume=OUT)``
continues exactly where the run stopped.

Files in ``config.out`` (when given)::

    config.json        the configuration
    metrics.csv        one row per epoch (see METRIC_COLUMNS)
    summary.json       the final numbers (see SUMMARY_KEYS: a public contract)
    checkpoints/       epoch_NNNN.pt, the newest ``keep_checkpoints`` kept
    loss.png           loss curves; for 2-D data also decision_boundary.png and,
                       for the resnet model, trajectories.png

Data parallel: under ``torchrun --nproc-per-node N -m ocnet train ...`` (WORLD_SIZE > 1)
every rank loads the same data and model (same seed; rank 0's parameters are broadcast),
draws the same global batch order and trains on its equal shard of each global batch; the
solver all-reduces its batch statistics (``solver.comm``), so the run equals a one-process
run with the same global batch. Only rank 0 writes files. See ``docs/distributed.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from . import checkpoint as ckpt
from .bridge import place, resolve_device, to_device, to_problem
from .data import DATASETS, DataError, batches, check_finite, load
from .models import MODELS, build_model
from .ocp.errors import CheckpointError, ConfigError, OcnetError, unknown_name
from .ocp.problem import Problem
from .solvers import make_solver, solver_names

__all__ = [
    "METRIC_COLUMNS",
    "SUMMARY_KEYS",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "train",
]

#: columns of metrics.csv, in order
METRIC_COLUMNS = (
    "epoch", "train_loss", "test_loss", "test_accuracy", "train_accuracy", "seconds", "steps",
)
#: keys summary.json always has (a public contract; more keys may be added)
SUMMARY_KEYS = (
    "data", "model", "solver", "steps", "final_train_loss", "test_accuracy", "seconds_per_step",
)
#: config keys that must match to resume a run (they change the data, the network or the
#: algorithm); other keys may change, at the cost of exactness
RESUME_MUST_MATCH = (
    "data", "model", "solver", "seed", "width", "depth", "activation", "n_train", "n_test",
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TrainingDiverged(OcnetError, RuntimeError):
    """The loss became NaN or inf; training stopped (the last good checkpoint is kept)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (``ocnet train`` options).

    ``lr=None`` takes the solver's default; ``width``/``depth``/``activation`` ``None`` the
    model's defaults; ``out=None`` writes no files (and cannot be resumed).
    """

    data: str = "digits"
    model: str = "mlp"
    solver: str = "adam"
    epochs: int = 20
    batch_size: int = 32
    lr: float | None = None
    seed: int = 0
    out: Path | None = None
    width: int | None = None
    depth: int | None = None
    activation: str | None = None
    weight_decay: float = 0.0
    device: str = "auto"
    dtype: str = "float32"
    solver_options: dict[str, Any] = field(default_factory=dict)
    n_train: int | None = None
    n_test: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    progress: bool = True
    #: a fresh (not resumed) run into a directory that already holds checkpoints is refused
    #: unless this is set; then the old checkpoints and metrics are replaced
    overwrite: bool = False
    #: write loss.png (and the 2-D pictures) at the end
    plots: bool = True
    #: stop after this many seconds of training (checked between steps; None: no limit).
    #: An epoch cut short is recorded (fewer steps) but not checkpointed; the summary says
    #: ``"stopped": "time budget"``. For demos and comparisons on a fixed budget.
    max_seconds: float | None = None
    #: torch intra-op CPU threads for the run (None: leave torch's setting). Small models
    #: gain nothing from more threads, and on a busy machine they can be many times slower.
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and ``weights_only``-safe dict (paths as strings)."""
        d = dataclasses.asdict(self)
        d["out"] = None if self.out is None else str(self.out)
        d["solver_options"] = dict(self.solver_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise ConfigError(f"unknown TrainConfig keys {extra}; valid keys: {sorted(names)}")
        d = dict(d)
        if d.get("out") is not None:
            d["out"] = Path(d["out"])
        return cls(**d)

    def validate(self) -> None:
        """Check names and numbers before any work; errors list the valid choices."""
        if self.data not in DATASETS:
            raise DataError(
                f"unknown dataset {self.data!r}; valid names are: {', '.join(DATASETS)}"
            )
        if self.model not in MODELS:
            raise unknown_name("model", self.model, MODELS)
        if self.solver not in solver_names():
            raise unknown_name("solver", self.solver, solver_names())
        if self.dtype not in DTYPES:
            raise unknown_name("dtype", self.dtype, list(DTYPES))
        for name in ("epochs", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number (or None for the default), "
                              f"got {self.lr}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be positive or None, got {self.max_seconds}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be a positive int or None, got {self.threads!r}")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(problem: Problem, x: Tensor, y: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, accuracy) of the problem's network on ``(x, y)``, as tensors.

    Runs the control system forward (``problem.rollout``) in chunks; x_T are the logits.
    """
    total_loss = torch.zeros((), dtype=x.dtype, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        logits = problem.rollout(xb).xs[-1]
        total_loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    n = max(int(x.shape[0]), 1)
    return total_loss / n, correct.to(x.dtype) / n


# --------------------------------------------------------------------------- files


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow(row)


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv as a list of dicts of numbers."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- resume


def _config_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys that forbid resuming, keys that change the run but may differ)."""
    hard = [k for k in RESUME_MUST_MATCH if saved.get(k) != now.get(k)]
    soft_keys = ("batch_size", "lr", "weight_decay", "dtype", "solver_options")
    soft = [k for k in soft_keys if saved.get(k) != now.get(k)]
    return hard, soft


def _describe(keys: list[str], saved: dict[str, Any], now: dict[str, Any]) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys)


def _load_resume_state(resume: Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of ``resume`` that loads; warns about each one that does not."""
    resume = Path(resume)
    candidates = [resume] if resume.is_file() else ckpt.find_checkpoints(resume)
    if not candidates:
        raise CheckpointError(
            f"no checkpoints (epoch_NNNN.pt) in {resume} or {resume / ckpt.CHECKPOINT_DIR}; "
            "resume needs the --out directory of an earlier run"
        )
    errors = []
    for i, path in enumerate(candidates):
        try:
            state = ckpt._read(path)
        except CheckpointError as err:
            errors.append(str(err))
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
            warnings.warn(
                f"{err}; " + (f"falling back to the previous checkpoint {nxt}" if nxt
                              else "no older checkpoint left"),
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        return state, path
    raise CheckpointError(
        f"no checkpoint in {resume} loads: " + " | ".join(errors)
    )


# --------------------------------------------------------------------------- progress


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    disable = not enabled or not sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep training without it anyway
        disable = True
    if disable:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- train


def train(config: TrainConfig, *, resume: Path | None = None) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data`` with ``config.solver``; returns the summary.

    With ``resume`` (a run directory or a checkpoint file) training continues from the
    newest checkpoint that loads (a corrupted newest one is reported with a warning and
    the previous one used) up to ``config.epochs`` epochs in total. Resuming with another
    data set, model, solver, seed, width, depth, activation or data size is refused.

    Returns the summary dict written to ``summary.json`` plus ``"history"`` (the per-epoch
    metric rows) and ``"problem"`` (the trained :class:`Problem`; its ``module`` is the
    network).

    Raises:
        DataError: unknown data set or non-finite data (before any training).
        ConfigError: unknown model/solver/dtype, bad numbers, solver options.
        CheckpointError: nothing to resume from, or a mismatching configuration.
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
    """
    config.validate()
    if config.threads is None:
        return _train(config, resume)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, resume)
    finally:
        torch.set_num_threads(old_threads)


#: config keys allowed to differ between ranks (paths and per-machine settings)
RANK_LOCAL_KEYS = ("out", "progress", "device")


def _train(config: TrainConfig, resume: Path | None) -> dict[str, Any]:
    from .bridge import distributed as dp

    created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    comm = dp.init_from_env()
    try:
        if comm is not None:
            dp.check_config_agreement(comm, config.to_dict(), ignore=RANK_LOCAL_KEYS)
        return _train_ranked(config, resume, comm)
    finally:
        if comm is not None and created:
            torch.distributed.destroy_process_group()


def _train_ranked(config: TrainConfig, resume: Path | None, comm: Any) -> dict[str, Any]:
    t_start = time.perf_counter()
    rank = 0 if comm is None else comm.rank
    world = 1 if comm is None else comm.world_size
    state: dict[str, Any] | None = None
    resumed_from: Path | None = None
    if resume is not None:
        state, resumed_from = _load_resume_state(Path(resume))
        if config.out is None:
            rp = Path(resume)
            run_dir = rp.parent if rp.is_file() else rp
            if run_dir.name == ckpt.CHECKPOINT_DIR:
                run_dir = run_dir.parent
            config = dataclasses.replace(config, out=run_dir)
        saved = state.get("config", {})
        now = config.to_dict()
        hard, soft = _config_mismatch(saved, now)
        if hard:
            raise CheckpointError(
                f"cannot resume from {resumed_from}: the configuration differs in "
                f"{_describe(hard, saved, now)}; resume with the same settings or start a "
                "new run with another --out"
            )
        if soft:
            warnings.warn(
                f"resuming {resumed_from} with changed {_describe(soft, saved, now)}: the run "
                "continues but is not identical to an uninterrupted one",
                RuntimeWarning,
                stacklevel=2,
            )

    out = None if config.out is None else Path(config.out)
    ckpt_dir = None if out is None else out / ckpt.CHECKPOINT_DIR
    write = out is not None and rank == 0  # only rank 0 writes files
    refused: ConfigError | None = None
    if write:
        out.mkdir(parents=True, exist_ok=True)
        if state is None and ckpt.find_checkpoints(out):
            if not config.overwrite:
                refused = ConfigError(
                    f"{out} already holds the checkpoints of a run; continue it with "
                    f"--resume {out}, choose another --out, or pass --overwrite"
                )
            else:
                for p in ckpt.find_checkpoints(out):
                    p.unlink()
    if comm is not None and comm.any(refused is not None) and refused is None:
        raise ConfigError(f"rank 0 refused the output directory {out} (see its error); "
                          "use --resume, another --out or --overwrite")
    if refused is not None:
        raise refused

    # ---- set-up (seeded: the same seed gives the same data, weights and batches)
    device = resolve_device(config.device)
    if comm is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's GPU
    dtype = DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    ds = load(config.data, seed=config.seed, n_train=config.n_train, n_test=config.n_test,
              dtype=dtype)
    check_finite(ds.x_train, f"{config.data} training inputs")
    check_finite(ds.x_test, f"{config.data} test inputs")
    model = build_model(config.model, ds.n_features, ds.n_classes, image_shape=ds.image_shape,
                        width=config.width, depth=config.depth, activation=config.activation)
    problem = to_problem(model, "cross_entropy", config.weight_decay)
    place(problem, device, dtype)
    x_tr, y_tr, x_te, y_te = to_device(ds.x_train, ds.y_train, ds.x_test, ds.y_test,
                                       device=device, dtype=dtype)
    problem.check(x_tr[: min(4, x_tr.shape[0])], y_tr[: min(4, x_tr.shape[0])])
    solver = make_solver(config.solver, problem, lr=config.lr, **config.solver_options)
    if comm is not None:
        if not getattr(solver, "supports_comm", False):
            raise ConfigError(
                f"solver {config.solver!r} does not support data parallelism (it needs the "
                "whole batch in one process); run it without torchrun, or use sgd, momentum, "
                "rmsprop, adam, ddpnopt, msa, emsa, phb or phb-goal"
            )
        _check_divisible(x_tr.shape[0], config.batch_size, world)
        solver.comm = comm
    gen = torch.Generator(device="cpu")
    gen.manual_seed(config.seed)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    step_seconds = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        solver.load_state_dict(state["solver"])
        gen.set_state(state["generator"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        history = list(state.get("metrics", []))
        start_epoch = int(state["epoch"])
        step_seconds = float(state.get("step_seconds", 0.0))
        if start_epoch >= config.epochs:
            warnings.warn(
                f"{resumed_from} is at epoch {start_epoch} and epochs={config.epochs}: "
                "nothing left to train (raise --epochs to continue)",
                RuntimeWarning,
                stacklevel=2,
            )

    if comm is not None:  # identical starting controls on every rank
        comm.broadcast_(problem.parameters(), src=0)

    if write:
        _write_json(out / "config.json", config.to_dict())
        _write_metrics(out / "metrics.csv", history)  # a resumed run drops later rows

    n_batches = -(-x_tr.shape[0] // config.batch_size)
    bar = _progress_bar(n_batches * max(config.epochs - start_epoch, 0),
                        config.progress and rank == 0,
                        f"{config.solver} on {config.data}")
    last_ckpt: Path | None = resumed_from
    deadline = None if config.max_seconds is None else time.perf_counter() + config.max_seconds
    stopped: str | None = None
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            losses: list[Tensor] = []
            for step_in_epoch, (xb, yb) in enumerate(
                batches(x_tr, y_tr, config.batch_size, generator=gen), start=1
            ):
                if comm is not None:  # this rank's shard of the global batch
                    xb, yb = dp_shard(xb, yb, rank, world)
                info = solver.step(xb, yb)
                loss = info.loss.detach()
                losses.append(loss)
                step_seconds += info.seconds
                # Between steps: one host read so training never continues on NaN/inf.
                if not bool(torch.isfinite(loss)):
                    where = (
                        f"the last good checkpoint is {last_ckpt}" if last_ckpt is not None
                        else "no checkpoint was written yet"
                    )
                    raise TrainingDiverged(
                        f"the loss became {float(loss)} at epoch {epoch}, step "
                        f"{step_in_epoch} of {n_batches} (solver {config.solver}, lr "
                        f"{getattr(solver, 'lr', config.lr)}); training stopped and {where}. "
                        "Lower the learning rate (--lr) or use another solver"
                    )
                if bar is not None:
                    bar.update(1)
                if deadline is not None:
                    late = time.perf_counter() > deadline
                    if comm is not None:  # every rank must stop at the same step
                        late = comm.any(late)
                    if late:
                        stopped = "time budget"
                        break
            train_seconds = time.perf_counter() - t0
            # Epoch end: the one place tensors are read to the host.
            train_loss = float(torch.stack(losses).mean())
            test_loss, test_acc = evaluate(problem, x_te, y_te)
            _, train_acc = evaluate(problem, x_tr, y_tr)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "test_loss": float(test_loss),
                "test_accuracy": float(test_acc),
                "train_accuracy": float(train_acc),
                "seconds": train_seconds,
                "steps": len(losses),
            }
            history.append(row)
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4g}",
                                test_acc=f"{row['test_accuracy']:.3f}")
            if write:
                _append_metrics(out / "metrics.csv", row)
                complete = len(losses) == n_batches  # an epoch cut short is not checkpointed
                if complete and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
                    last_ckpt = ckpt.save_checkpoint(
                        ckpt.checkpoint_path(ckpt_dir, epoch),
                        {
                            "epoch": epoch,
                            "model": model.state_dict(),
                            "solver": solver.state_dict(),
                            "generator": gen.get_state(),
                            "torch_rng": torch.get_rng_state(),
                            "metrics": history,
                            "step_seconds": step_seconds,
                            "config": config.to_dict(),
                        },
                    )
                    ckpt.prune_checkpoints(ckpt_dir, config.keep_checkpoints)
            if stopped is not None:
                break
    finally:
        if bar is not None:
            bar.close()

    steps = int(solver.steps)
    final = history[-1] if history else {}
    summary: dict[str, Any] = {
        "data": config.data,
        "model": config.model,
        "solver": config.solver,
        "steps": steps,
        "final_train_loss": final.get("train_loss"),
        "test_accuracy": final.get("test_accuracy"),
        "seconds_per_step": step_seconds / steps if steps else None,
        "final_test_loss": final.get("test_loss"),
        "final_train_accuracy": final.get("train_accuracy"),
        "epochs": len(history),
        "seed": config.seed,
        "lr": getattr(solver, "lr", config.lr),
        "n_controls": problem.num_controls(),
        "stages": problem.T,
        "device": str(device),
        "dtype": config.dtype,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "stopped": stopped,
        "wall_seconds": time.perf_counter() - t_start,
        "config": config.to_dict(),
    }
    if comm is not None:
        summary["world_size"] = world
    if write:
        _write_json(out / "summary.json", summary)
        if config.plots:
            _write_plots(out, history, problem, ds, config, x_te, y_te)
    return {**summary, "history": history, "problem": problem}


def _check_divisible(n_train: int, batch_size: int, world: int) -> None:
    """Every global batch of an epoch (the last one may be shorter) must split evenly."""
    sizes = {batch_size} | ({n_train % batch_size} if n_train % batch_size else set())
    bad = sorted(b for b in sizes if b % world)
    if bad:
        raise ConfigError(
            f"global batches of {bad} samples do not divide among {world} ranks (n_train "
            f"{n_train}, batch size {batch_size}); choose --batch-size divisible by {world} "
            f"and --n-train with n_train mod batch_size divisible by {world}"
        )


def dp_shard(x: Tensor, y: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    from .bridge.distributed import shard

    xs, ys = shard(x, y, rank, world)
    return xs, ys  # type: ignore[return-value]


def _write_plots(out: Path, history: list[dict[str, Any]], problem: Problem, ds: Any,
                 config: TrainConfig, x_te: Tensor, y_te: Tensor) -> None:
    from . import plots

    if history:
        plots.plot_losses(history, out / "loss.png",
                          title=f"{config.solver} on {config.data} ({config.model})")
    if ds.n_features == 2:
        plots.plot_decision_boundary(problem, (x_te, y_te), out / "decision_boundary.png",
                                     title=f"{config.model} / {config.solver} on {config.data}")
        if config.model == "resnet":
            n = min(150, x_te.shape[0])
            plots.plot_trajectories(problem, x_te[:n], y_te[:n], out / "trajectories.png")
