"""The training loop: a data set, a model as a control problem, a solver, epochs.

``train(TrainConfig(...))`` seeds torch, loads the data (checked finite), builds the model
and its problem J(u) = mean CE(x_T, y) + sum_t weight_decay/2 |u_t|^2, makes the solver and
runs the one training loop, :func:`ocnet.solvers.loop.fit`, over shuffled mini-batches with
this module's callbacks (:class:`EpochMetrics`, :class:`Checkpoints`,
:class:`StopOnDivergence`, :class:`ProgressBar`, and a ``TimeBudget``). The shuffling
generator's state is checkpointed with the controls and the solver state, so
``train(config, resume=OUT)`` continues exactly where the run stopped.

Files in ``config.out`` (when given), each written atomically (a temporary file, fsync,
``os.replace``: a run killed at any moment leaves the previous version of every file)::

    config.json        the configuration
    metrics.csv        one row per epoch (see METRIC_COLUMNS)
    summary.json       the final numbers (see SUMMARY_KEYS: a public contract)
    checkpoints/       epoch_NNNN.pt, the newest ``keep_checkpoints`` kept
    loss.png           loss curves; for 2-D data also decision_boundary.png and,
                       for the resnet model, trajectories.png
    .ocnet.lock        the lock that makes the directory one run's: a second ``train`` or
                       ``--resume`` on it is refused while the first runs (.ocnet.owner
                       names its PID); a killed run's lock is taken over

Everything that can be checked is checked before the directory is created or written
(names, numbers, the data sizes, the model and its problem, the solver and its options,
the checkpoint to resume from), so a refused run leaves nothing behind.

Data parallel: under ``torchrun --nproc-per-node N -m ocnet train ...`` (WORLD_SIZE > 1)
every rank loads the same data and model (same seed; rank 0's parameters are broadcast),
draws the same global batch order and trains on its equal shard of each global batch; the
solver all-reduces its batch statistics (``solver.comm``), so the run equals a one-process
run with the same global batch. Only rank 0 writes files. See ``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from . import checkpoint as ckpt
from .bridge import place, resolve_device, to_device, to_problem
from .data import DATASETS, DataError, batches, check_finite, load
from .metrics import METRIC_COLUMNS, read_metrics, write_metrics
from .models import MODELS, build_model
from .ocp.errors import CheckpointError, ConfigError, OcnetError, unknown_name
from .ocp.problem import Problem
from .solvers import make_solver, solver_entry, solver_names, solver_records
from .solvers.loop import Callback, EpochEnd, StepEvent, TimeBudget, TrainingDiverged, fit

__all__ = [
    "METRIC_COLUMNS",
    "SUMMARY_KEYS",
    "RunDirectoryBusy",
    "RunLock",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "read_metrics",
    "train",
]

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
#: the largest seed: every data set (scikit-learn's splits included) takes it
MAX_SEED = 2**32 - 1
# TrainingDiverged (the loss became NaN/inf, or too many consecutive rejected steps; the
# last good checkpoint is kept) is defined beside the loop, ocnet.solvers.loop.


class RunDirectoryBusy(OcnetError, RuntimeError):
    """Another process holds the run directory's lock (``--out`` is in use)."""


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
    #: stop with TrainingDiverged after this many consecutive rejected steps (a step the
    #: solver's finiteness guard undid, or one its own acceptance test refused); 0: never
    max_rejected: int = 3
    #: stream the step and epoch scalars to ``OUT/tensorboard`` (the ``tensorboard`` extra)
    tensorboard: bool = False

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
        if self.tensorboard and self.out is None:
            raise ConfigError("--tensorboard writes into the run directory: give --out DIR")
        if self.tensorboard:
            from .tensorboard import _summary_writer

            _summary_writer()  # the extra is missing: say so before anything runs
        for name in ("epochs", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not 0 <= self.seed <= MAX_SEED):
            raise ConfigError(f"seed must be an int from 0 to {MAX_SEED} (2**32 - 1), got "
                              f"{self.seed!r}")
        if self.lr is not None and not (_is_number(self.lr) and self.lr > 0
                                        and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number (or None for the "
                              f"solver's default), got {self.lr!r}")
        if self.max_seconds is not None and not (_is_number(self.max_seconds)
                                                 and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be positive or None, got {self.max_seconds!r}")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0 (e.g. 1e-4), got "
                              f"{self.weight_decay!r}")
        for name in ("max_rejected", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0 (0: no limit), got {v!r}")
        if not isinstance(self.solver_options, dict):
            raise ConfigError(f"solver_options must be a dict, got "
                              f"{type(self.solver_options).__name__}")
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be a positive int or None, got {self.threads!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    ckpt.atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a run directory, before anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory path "
                          "(it is created if missing)")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {parent} is a file; choose "
                          "another directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: no write permission in {parent}; "
                          "choose a directory you can write to")


OWNER_FILE = ".ocnet.owner"
LOCK_FILE = ".ocnet.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's)
    return True


class RunLock:
    """The lock that makes a run directory one process's for the whole run.

    A ``filelock.FileLock`` on ``OUT/.ocnet.lock`` (an OS lock: the kernel drops it when
    its process dies, so the lock of a killed run is stale by construction and taken
    over), plus ``OUT/.ocnet.owner`` naming the holder (PID, host, start time, command)
    for the message a second process gets. Not re-entrant: a second ``RunLock`` on the
    same directory is refused even in the same process.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._lock: Any = None
        #: the owner record of a killed run this lock took over, if any
        self.took_over: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads((self.out / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        try:
            lock = FileLock(str(self.out / LOCK_FILE), timeout=0)
            lock.acquire(timeout=0)
        except Timeout:
            raise RunDirectoryBusy(self._busy_message()) from None
        except OSError as err:
            raise ConfigError(f"--out {self.out} cannot be locked ({err.strerror or err}); "
                              "choose a directory on a local, writable file system") from None
        self._lock = lock
        previous = self._owner()
        if previous is not None and previous.get("pid") != os.getpid():
            self.took_over = previous
            warnings.warn(
                f"{self.out}: taking over the run directory from PID {previous.get('pid')} "
                f"(started {previous.get('started', '?')}), which is no longer running "
                "(a killed or crashed run)", RuntimeWarning, stacklevel=3)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "command": " ".join(sys.argv[:1] + sys.argv[1:])[:300]}
        try:
            ckpt.atomic_write(self.out / OWNER_FILE, json.dumps(owner) + "\n")
        except BaseException:
            self.release()
            raise
        return self

    def _busy_message(self) -> str:
        owner = self._owner()
        deadline = time.monotonic() + 2.0
        while owner is None and time.monotonic() < deadline:  # the holder is writing it
            time.sleep(0.05)
            owner = self._owner()
        if owner is None:
            who = "another process (its PID is not recorded yet)"
        else:
            pid, host = owner.get("pid"), owner.get("host")
            who = f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname()
                                   else "")
            if owner.get("started"):
                who += f", started {owner['started']}"
            if owner.get("command"):
                who += f": {owner['command']}"
            if (isinstance(pid, int) and host in (None, socket.gethostname())
                    and not _pid_alive(pid)):
                who += (f" (PID {pid} is no longer running, but a process it started still "
                        "holds the lock)")
        return (f"{self.out} is in use by another ocnet run ({who}); wait for it to finish "
                "or stop it, or choose another --out")

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            if (self._owner() or {}).get("pid") == os.getpid():
                (self.out / OWNER_FILE).unlink()
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- resume


def _config_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys that forbid resuming, keys that change the run but may differ)."""
    hard = [k for k in RESUME_MUST_MATCH if saved.get(k) != now.get(k)]
    soft_keys = ("batch_size", "lr", "weight_decay", "dtype", "solver_options")
    soft = [k for k in soft_keys if saved.get(k) != now.get(k)]
    return hard, soft


def _describe(keys: list[str], saved: dict[str, Any], now: dict[str, Any]) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys)


def _candidates(resume: Path) -> list[Path]:
    """The checkpoints to resume from, newest first; an error when there are none that
    says why (a run stopped before its first checkpoint, or not a run directory)."""
    resume = Path(resume)
    candidates = [resume] if resume.is_file() else ckpt.find_checkpoints(resume)
    if candidates:
        return candidates
    run = resume.parent if resume.name == ckpt.CHECKPOINT_DIR else resume
    if any((run / name).exists() for name in ("config.json", "metrics.csv", OWNER_FILE)):
        raise CheckpointError(
            f"{run} is the directory of a run that has no checkpoint (it stopped before a "
            "first good epoch was checkpointed), so there is nothing to resume: run the same "
            f"command without --resume (with --out {run}) to start it again"
        )
    raise CheckpointError(
        f"no checkpoints (epoch_NNNN.pt) in {resume} or {resume / ckpt.CHECKPOINT_DIR}; "
        "resume needs the --out directory of an earlier run"
    )


def _fallback_warning(err: BaseException, candidates: list[Path], i: int) -> None:
    nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
    warnings.warn(
        f"{err}; " + (f"falling back to the previous checkpoint {nxt}" if nxt
                      else "no older checkpoint left"),
        RuntimeWarning,
        stacklevel=4,
    )


def _load_resume_state(resume: Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of ``resume`` that loads; warns about each one that does not."""
    candidates = _candidates(resume)
    errors = []
    for i, path in enumerate(candidates):
        try:
            return ckpt._read(path), path
        except CheckpointError as err:
            errors.append(str(err))
            _fallback_warning(err, candidates, i)
    raise CheckpointError(f"no checkpoint in {resume} loads: " + " | ".join(errors))


def _finite_row(row: Any) -> bool:
    """A metrics row whose losses are finite numbers (a "good" epoch)."""
    if not isinstance(row, dict):
        return False
    for key in ("train_loss", "test_loss"):
        v = row.get(key)
        if v is not None and not (_is_number(v) and math.isfinite(v)):
            return False
    return True


def _first_line(err: BaseException) -> str:
    """An exception's message as one line (at most 300 characters)."""
    text = " ".join(str(err).split())
    return (text[:297] + "...") if len(text) > 300 else (text or type(err).__name__)


def _check_state(state: dict[str, Any], path: Path) -> None:
    """The contents of a checkpoint that loaded (its envelope is valid): the keys and
    types an exact resume needs, finite weights, a last epoch with a finite loss."""
    missing = [k for k in ("epoch", "model", "solver", "generator") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it was not "
                              "written by ocnet train")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"checkpoint {path} holds epoch={epoch!r}, not an int >= 0: "
                              "it is damaged")
    if not isinstance(state["model"], dict) or not isinstance(state["solver"], dict):
        raise CheckpointError(f"checkpoint {path} holds no model/solver state dicts")
    bad = [k for k, v in state["model"].items()
           if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}): "
                              "not a good checkpoint")
    metrics = state.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics):
        raise CheckpointError(f"checkpoint {path} holds a damaged metrics history")
    if metrics and not _finite_row(metrics[-1]):
        raise CheckpointError(
            f"checkpoint {path}: its epoch evaluated to a non-finite loss (train "
            f"{metrics[-1].get('train_loss')}, test {metrics[-1].get('test_loss')}): not a "
            "good checkpoint")
    seconds = state.get("step_seconds", 0.0)
    if not _is_number(seconds):
        raise CheckpointError(f"checkpoint {path} holds step_seconds={seconds!r}")


def _apply_state(state: dict[str, Any], path: Path, model: torch.nn.Module, solver: Any,
                 gen: torch.Generator) -> None:
    """Load a checked state into the model, the solver and the batch generator; a state
    that does not fit (another shape, a damaged optimizer state) is a CheckpointError."""
    _check_state(state, path)
    steps = [("the model", lambda: model.load_state_dict(state["model"])),
             ("the solver", lambda: solver.load_state_dict(state["solver"])),
             ("the batch generator", lambda: gen.set_state(state["generator"]))]
    if "torch_rng" in state:
        steps.append(("torch's RNG", lambda: torch.set_rng_state(state["torch_rng"])))
    for what, do_load in steps:
        try:
            do_load()
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError,
                IndexError, OverflowError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit {what} of this run "
                                  f"({type(err).__name__}: {_first_line(err)})") from err


def _restore(candidates: list[Path], first: tuple[dict[str, Any], Path], model: torch.nn.Module,
             solver: Any, gen: torch.Generator) -> tuple[dict[str, Any], Path]:
    """Apply the newest checkpoint that loads and fits (from ``first``, already read),
    falling back to older ones with a warning each."""
    errors: list[str] = []
    start = candidates.index(first[1]) if first[1] in candidates else 0
    for i in range(start, len(candidates)):
        path = candidates[i]
        try:
            state = first[0] if path == first[1] else ckpt._read(path)
            _apply_state(state, path, model, solver, gen)
        except CheckpointError as err:
            errors.append(str(err))
            _fallback_warning(err, candidates, i)
            continue
        return state, path
    raise CheckpointError(f"no checkpoint of {candidates[0].parent} can be resumed: "
                          + " | ".join(errors))


# --------------------------------------------------------------------------- callbacks
# The loop is ocnet.solvers.loop.fit; what a training run adds to it are these callbacks.


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    disable = not enabled or not sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep training without it anyway
        disable = True
    if disable:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


class EpochMetrics(Callback):
    """The metrics.csv rows: the mean step loss of the epoch, then the test loss and
    accuracy and the training accuracy (evaluated after the epoch), and the solver's step
    seconds; appended to ``path`` when given."""

    def __init__(self, problem: Problem, train_data: tuple[Tensor, Tensor],
                 test_data: tuple[Tensor, Tensor], *, history: list[dict[str, Any]],
                 step_seconds: float = 0.0, path: Path | None = None) -> None:
        self.problem, self.train_data, self.test_data = problem, train_data, test_data
        self.history, self.step_seconds, self.path = history, step_seconds, path
        self.losses: list[Tensor] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.losses = []

    def on_step(self, event: StepEvent) -> None:
        self.losses.append(event.info.loss.detach())  # the mean is taken on the device
        self.step_seconds += event.info.seconds

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        # Epoch end: the one place the metrics are read to the host. The mean of the finite
        # step losses (a rejected step on a bad batch reports NaN; it changed nothing).
        losses = torch.stack(self.losses)
        finite = torch.isfinite(losses)
        train_loss = float(torch.where(finite, losses, 0).sum() / finite.sum())
        test_loss, test_acc = evaluate(self.problem, *self.test_data)
        _, train_acc = evaluate(self.problem, *self.train_data)
        row = {
            "epoch": end.epoch,
            "train_loss": train_loss,
            "test_loss": float(test_loss),
            "test_accuracy": float(test_acc),
            "train_accuracy": float(train_acc),
            "seconds": end.seconds,
            "steps": end.steps,
        }
        self.history.append(row)
        if self.path is not None:
            write_metrics(self.path, self.history)  # replaced atomically, every epoch
        return None


class TensorBoardLog(Callback):
    """Streams every step's scalars (loss, accepted, gradient norm, step seconds and the
    solver's own diagnostics: DDPNOpt's gains and cap rate, E-MSA's rho and Hamiltonian
    gain, the braking phase and friction, ...) and each epoch's metrics row to
    TensorBoard (``ocnet.tensorboard``). Reading the step's tensors is a host read per step,
    like the loss the loop reads anyway."""

    def __init__(self, log_dir: Path, history: list[dict[str, Any]], *,
                 hparams: dict[str, Any] | None = None) -> None:
        from .tensorboard import TensorBoardCallback

        self.writer = TensorBoardCallback(log_dir, hparams=hparams)
        self.history = history

    def on_step(self, event: StepEvent) -> None:
        from .tensorboard import step_scalars

        self.writer.on_step(event.step, step_scalars(event.info))

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        if self.history:
            self.writer.on_epoch_end(end.epoch, self.history[-1])
        return None

    def close(self) -> None:
        self.writer.close()


class Checkpoints(Callback):
    """A checkpoint after every ``every``-th complete epoch and the last one (an epoch cut
    short is not checkpointed), the newest ``keep`` kept. The state holds everything an
    exact resume needs: controls, solver state, the batch generator, torch's RNG. Only a
    good epoch is checkpointed: one whose losses (``good()``) are finite."""

    def __init__(self, folder: Path | None, state: Callable[[int], dict[str, Any]], *,
                 every: int, last_epoch: int, batches_per_epoch: int, keep: int,
                 last: Path | None = None, good: Callable[[], bool] = lambda: True) -> None:
        self.folder, self.state, self.every, self.last_epoch = folder, state, every, last_epoch
        self.batches_per_epoch, self.keep, self.last = batches_per_epoch, keep, last
        self.good = good

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        complete = end.steps == self.batches_per_epoch
        due = end.epoch % self.every == 0 or end.epoch == self.last_epoch
        if self.folder is not None and complete and due and self.good():
            self.last = ckpt.save_checkpoint(ckpt.checkpoint_path(self.folder, end.epoch),
                                             self.state(end.epoch))
            ckpt.prune_checkpoints(self.folder, self.keep)
        return None


class StopOnDivergence(Callback):
    """Raise :class:`TrainingDiverged` at the first non-finite loss of an accepted step
    (the loop's host read of the loss: the controls themselves are no longer finite; a
    rejected step changed nothing and is counted by ``fit(max_rejected=...)``), and after
    an epoch whose network evaluates to a non-finite loss (before it is checkpointed, so
    it never becomes "the last good checkpoint")."""

    def __init__(self, describe: str, batches_per_epoch: int, checkpoints: Checkpoints,
                 history: list[dict[str, Any]] | None = None) -> None:
        self.describe, self.batches_per_epoch, self.checkpoints = (describe, batches_per_epoch,
                                                                   checkpoints)
        self.history = history

    def _where(self) -> str:
        last = self.checkpoints.last
        return (f"the last good checkpoint is {last}" if last is not None
                else "no checkpoint was written yet")

    def on_step(self, event: StepEvent) -> None:
        if math.isfinite(event.loss) or not event.accepted:
            return
        raise TrainingDiverged(
            f"the loss became {event.loss} at epoch {event.epoch}, step "
            f"{event.step_in_epoch} of {self.batches_per_epoch} ({self.describe}); training "
            f"stopped and {self._where()}. Lower the learning rate (--lr) or use another solver"
        )

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        if not self.history or self.history[-1].get("epoch") != end.epoch:
            return None
        row = self.history[-1]
        if _finite_row(row):
            return None
        raise TrainingDiverged(
            f"after epoch {end.epoch} the network evaluates to a non-finite loss (train "
            f"{row['train_loss']}, test {row['test_loss']}; {self.describe}); training "
            f"stopped, the epoch was not checkpointed and {self._where()}. Lower the "
            "learning rate (--lr) or use another solver"
        )


class ProgressBar(Callback):
    """A tqdm bar over the run's steps (on a terminal only); closed by :meth:`close`."""

    def __init__(self, total: int, enabled: bool, desc: str,
                 history: list[dict[str, Any]]) -> None:
        self.bar = _progress_bar(total, enabled, desc)
        self.history = history

    def on_step(self, event: StepEvent) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        if self.bar is not None and self.history:
            row = self.history[-1]
            self.bar.set_postfix(epoch=end.epoch, loss=f"{row['train_loss']:.4g}",
                                 test_acc=f"{row['test_accuracy']:.3f}")
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        TrainingDiverged: the loss became NaN/inf, an epoch evaluated to a non-finite loss,
            or ``max_rejected`` consecutive steps were rejected (the last good checkpoint is
            kept and named).
        RunDirectoryBusy: another process holds ``config.out`` (its PID is named).

    Every check that can be made before training (the options, ``--out``, the data sizes,
    the model, the solver and its options, the checkpoint to resume from) is made before
    the output directory is created or written.
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


def _run_dir(resume: Path) -> Path:
    """The run directory of a ``--resume`` path (the directory, its checkpoints/, a file)."""
    rp = Path(resume)
    run_dir = rp.parent if rp.is_file() else rp
    if run_dir.name == ckpt.CHECKPOINT_DIR:
        run_dir = run_dir.parent
    return run_dir


def _resume(config: TrainConfig, resume: Path
            ) -> tuple[dict[str, Any], Path, list[Path]]:
    """(the newest checkpoint state that loads, its path, every candidate); a configuration
    that forbids resuming is refused, one that changes the run warned."""
    candidates = _candidates(Path(resume))
    state, resumed_from = _load_resume_state(Path(resume))
    saved = state.get("config", {})
    if not isinstance(saved, dict):
        saved = {}
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
            stacklevel=4,
        )
    return state, resumed_from, candidates


def _claim_output(out: Path | None, fresh: bool, overwrite: bool, comm: Any, rank: int,
                  lock: RunLock | None) -> bool:
    """Create ``out`` and take its lock on rank 0 (whether this rank writes files); a fresh
    run into a directory holding checkpoints is refused on every rank unless ``overwrite``.
    Stale temporary files of killed runs are removed once the lock is held."""
    write = out is not None and rank == 0  # only rank 0 writes files
    refused: OcnetError | None = None
    if write:
        assert out is not None and lock is not None
        try:
            if not lock.held:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except FileExistsError:
                    raise ConfigError(f"--out {out} is a file, not a directory; choose a "
                                      "directory path") from None
                except OSError as err:
                    raise ConfigError(f"--out {out} cannot be created ({err.strerror or err}); "
                                      "choose a directory you can write to") from None
                lock.acquire()
            if fresh and ckpt.find_checkpoints(out):
                if not overwrite:
                    raise ConfigError(
                        f"{out} already holds the checkpoints of a run; continue it with "
                        f"--resume {out}, choose another --out, or pass --overwrite"
                    )
                for p in ckpt.find_checkpoints(out):
                    p.unlink()
            ckpt.clean_stale_temp(out, out / ckpt.CHECKPOINT_DIR)
        except OcnetError as err:
            refused = err
    if comm is not None and comm.any(refused is not None) and refused is None:
        raise ConfigError(f"rank 0 refused the output directory {out} (see its error); "
                          "use --resume, another --out or --overwrite")
    if refused is not None:
        raise refused
    return write


def _train_ranked(config: TrainConfig, resume: Path | None, comm: Any) -> dict[str, Any]:
    rank = 0 if comm is None else comm.rank
    if resume is not None and config.out is None:
        config = dataclasses.replace(config, out=_run_dir(resume))
    out = None if config.out is None else Path(config.out)
    lock = RunLock(out) if out is not None and rank == 0 else None
    if lock is not None:
        assert out is not None
        _check_out_path(out)  # nothing is written before everything is checked
        if out.is_dir():  # an existing run directory (a resume): lock it before reading it
            lock.acquire()
    try:
        return _train_locked(config, resume, comm, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: TrainConfig, resume: Path | None, comm: Any,
                  lock: RunLock | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    rank = 0 if comm is None else comm.rank
    world = 1 if comm is None else comm.world_size
    state: dict[str, Any] | None = None
    resumed_from: Path | None = None
    candidates: list[Path] = []
    if resume is not None:
        state, resumed_from, candidates = _resume(config, resume)
    out = None if config.out is None else Path(config.out)
    ckpt_dir = None if out is None else out / ckpt.CHECKPOINT_DIR

    # ---- set-up (seeded: the same seed gives the same data, weights and batches); all of
    # it before the output directory is created, so a refused run leaves nothing behind
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
    record = solver_entry(config.solver)
    if comm is not None and not record.data_parallel:
        names = ", ".join(r.name for r in solver_records() if r.data_parallel)
        raise ConfigError(
            f"solver {config.solver!r} does not support data parallelism (it needs the "
            f"whole batch in one process); run it without torchrun, or use {names}"
        )
    solver = make_solver(config.solver, problem, lr=config.lr, **config.solver_options)
    lr = config.lr if config.lr is not None else record.lr(config.solver_options)
    if comm is not None:
        _check_divisible(x_tr.shape[0], config.batch_size, world)
        solver.comm = comm
    gen = torch.Generator(device="cpu")
    gen.manual_seed(config.seed)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    step_seconds = 0.0
    if state is not None:
        assert resumed_from is not None
        state, resumed_from = _restore(candidates, (state, resumed_from), model, solver, gen)
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

    write = _claim_output(out, state is None, config.overwrite, comm, rank, lock)
    if write:
        assert out is not None
        _write_json(out / "config.json", config.to_dict())
        write_metrics(out / "metrics.csv", history)  # a resumed run drops later rows

    n_batches = -(-x_tr.shape[0] // config.batch_size)

    def epoch_batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        drawn = batches(x_tr, y_tr, config.batch_size, generator=gen)  # drawn now: exact
        if comm is None:
            return drawn
        return (dp_shard(xb, yb, rank, world) for xb, yb in drawn)  # this rank's shard

    metrics = EpochMetrics(problem, (x_tr, y_tr), (x_te, y_te), history=history,
                           step_seconds=step_seconds,
                           path=out / "metrics.csv" if write else None)

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": model.state_dict(),
            "solver": solver.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "metrics": history,
            "step_seconds": metrics.step_seconds,
            "config": config.to_dict(),
        }

    checkpoints = Checkpoints(ckpt_dir if write else None, checkpoint_state,
                              every=config.checkpoint_every, last_epoch=config.epochs,
                              batches_per_epoch=n_batches, keep=config.keep_checkpoints,
                              last=resumed_from,
                              good=lambda: bool(history) and _finite_row(history[-1]))
    progress = ProgressBar(n_batches * max(config.epochs - start_epoch, 0),
                           config.progress and rank == 0, f"{config.solver} on {config.data}",
                           history)
    divergence = StopOnDivergence(f"solver {config.solver}, lr {lr}", n_batches, checkpoints,
                                  history)
    callbacks: list[Callback] = [
        metrics,
        divergence,
        progress,
        checkpoints,
    ]
    if config.max_seconds is not None:
        callbacks.append(TimeBudget(config.max_seconds, comm=comm))
    board = None
    if config.tensorboard and write:
        board = TensorBoardLog(out / "tensorboard", history,
                               hparams={k: v for k, v in config.to_dict().items()
                                        if isinstance(v, int | float | str | bool)})
        callbacks.insert(1, board)  # after the metrics row of the epoch is made
    try:
        result = fit(solver, epoch_batches, epochs=config.epochs, start_epoch=start_epoch,
                     callbacks=callbacks, max_rejected=config.max_rejected or None)
    except TrainingDiverged as err:
        if "checkpoint" in str(err):
            raise
        raise TrainingDiverged(f"{err} ({divergence._where()})") from err
    finally:
        progress.close()
        if board is not None:
            board.close()
    stopped = result.stopped
    step_seconds = metrics.step_seconds
    if result.steps and result.rejected == result.steps:
        warnings.warn(
            f"every one of the {result.steps} steps of this run was rejected (solver "
            f"{config.solver}, lr {lr}): the controls did not change. Lower the learning rate "
            "(--lr) or use another solver", RuntimeWarning, stacklevel=2)

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
        "lr": lr,
        "n_controls": problem.num_controls(),
        "stages": problem.T,
        "device": str(device),
        "dtype": config.dtype,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "stopped": stopped,
        "rejected_steps": result.rejected,
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

    def atomic(draw: Callable[[Path], None], path: Path) -> None:
        # matplotlib picks the format from the suffix: the temporary name keeps it
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        try:
            draw(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    if history:
        atomic(lambda p: plots.plot_losses(
            history, p, title=f"{config.solver} on {config.data} ({config.model})"),
            out / "loss.png")
    if ds.n_features == 2:
        atomic(lambda p: plots.plot_decision_boundary(
            problem, (x_te, y_te), p, title=f"{config.model} / {config.solver} on {config.data}"),
            out / "decision_boundary.png")
        if config.model == "resnet":
            n = min(150, x_te.shape[0])
            atomic(lambda p: plots.plot_trajectories(problem, x_te[:n], y_te[:n], p),
                   out / "trajectories.png")
