"""The one training loop, ``fit``, and the shuffled mini-batches it runs over.

``fit(solver, batches, epochs=E)`` is all that ``ocnet train``, ``ocnet compare``, the demo
and DWR's inner training share::

    for epoch in start_epoch + 1 .. E:
        on_epoch_start(epoch)
        for (x, y) in batches(epoch):          # drawn when the epoch starts
            info = solver.step(x, y)
            loss, accepted = info.loss, info.accepted   # the step's one host read
            on_step(event); stop if any should_stop(event)
        on_epoch_end(end)                       # may stop the fit too

The loop writes no files and computes no metrics: metrics, checkpoints, progress bars and
divergence checks are :class:`Callback` objects of the experiments layer (``ocnet.train``,
``ocnet.compare``). A time budget is generic and lives here (:class:`TimeBudget`).

With ``max_rejected=N`` the loop raises :class:`TrainingDiverged` after N consecutive
rejected steps (``info.accepted`` False: the solver's finiteness guard undid a non-finite
step, or the solver's own acceptance test failed; a step the solver *declined*,
``info.declined``, to retry with a changed setting, such as E-MSA's adaptive rho, neither
counts nor breaks the streak), naming the first rejected batch of the streak (epoch, step
and, when the batch itself holds NaN/inf, its bad samples). A batch refused by the
solver's input checks (:class:`~ocnet.ocp.errors.DataError`) is re-raised with the epoch
and step where it came.

Reading ``info.loss`` and ``info.accepted`` once per step (one device-to-host transfer
when both are tensors on the same device) is the only host read the loop makes; a solver's
step itself stays on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ocp.errors import ConfigError, DataError, OcnetError
from .base import Solver, StepInfo

__all__ = [
    "Batches",
    "Callback",
    "EpochEnd",
    "FitResult",
    "StepEvent",
    "TimeBudget",
    "TrainingDiverged",
    "fit",
    "minibatches",
]

Batch = tuple[Tensor, Tensor | None]


class TrainingDiverged(OcnetError, RuntimeError):
    """Training cannot go on: the loss became NaN/inf, or too many consecutive steps were
    rejected (``fit(max_rejected=...)``); the message names where and the usual fixes."""
#: ``epoch -> the batches of that epoch`` (called when the epoch starts), or a fixed
#: collection of batches iterated again in every epoch (e.g. ``[(x, y)]``: full batch)
Batches = Callable[[int], Iterable[Batch]] | Sequence[Batch]


def minibatches(x: Tensor, y: Tensor | None, batch_size: int, *,
                generator: torch.Generator | None = None, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[Batch]:
    """Mini-batches ``(x[idx], y[idx])`` covering every sample once per call.

    The permutation is drawn with ``torch.randperm(generator=generator)`` when this
    function is called (not lazily), so saving ``generator.get_state()`` before the
    call and restoring it reproduces the epoch exactly. ``y=None`` yields ``(x[idx], None)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size}")
    n = x.shape[0]
    if y is not None and y.shape[0] != n:
        raise DataError(f"x has {n} samples but y has {y.shape[0]}; pass matching tensors")
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n

    def _iterate() -> Iterator[Batch]:
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, stop)
            if order is None:
                yield x[start:end], None if y is None else y[start:end]
            else:
                idx = order[start:end]
                yield x[idx], None if y is None else y[idx.to(y.device)]

    return _iterate()


@dataclass
class StepEvent:
    """One step as the callbacks see it.

    ``loss`` and ``accepted`` are the host values of ``info.loss`` / ``info.accepted``
    (read once by the loop); ``step`` counts the steps of this fit (from 1),
    ``step_in_epoch`` those of the epoch.
    """

    epoch: int
    step: int
    step_in_epoch: int
    loss: float
    accepted: bool
    info: StepInfo


@dataclass
class EpochEnd:
    """The end of an epoch: its steps, rejected steps, wall seconds (from the start of the
    epoch to its last step; evaluation by callbacks not included) and, if a callback stopped
    the fit inside it, the reason (the epoch was cut short)."""

    epoch: int
    steps: int
    rejected: int
    seconds: float
    stopped: str | None = None


@dataclass
class FitResult:
    """What ``fit`` did: epochs begun, steps taken (``rejected`` of them not accepted), the
    solvers' own step seconds (``StepInfo.seconds`` summed), the stop reason (None: all
    epochs ran) and the host value of the last step's loss."""

    epochs: int = 0
    steps: int = 0
    rejected: int = 0
    step_seconds: float = 0.0
    stopped: str | None = None
    last_loss: float | None = None


class Callback:
    """A hook into :func:`fit`; override the methods needed (all do nothing here).

    Callbacks are called in the order given to ``fit``. ``should_stop`` and
    ``on_epoch_end`` return a reason (a string) to stop the fit, or None; every callback's
    ``should_stop`` is called at every step (a collective inside one, e.g. the
    data-parallel agreement of :class:`TimeBudget`, runs on every rank).
    """

    def on_fit_start(self, solver: Solver) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the epoch's batches are drawn."""

    def on_step(self, event: StepEvent) -> None:
        """After each step (may raise to abort, e.g. on a non-finite loss)."""

    def should_stop(self, event: StepEvent) -> str | None:
        """After ``on_step``: a reason to stop now (the epoch is cut short), or None."""
        return None

    def on_epoch_end(self, end: EpochEnd) -> str | None:
        """After the epoch's last step: a reason to stop after this epoch, or None."""
        return None

    def on_fit_end(self, result: FitResult) -> None:
        """After the last epoch (not called when a step or a callback raised)."""


class TimeBudget(Callback):
    """Stop after ``seconds`` of wall time from the start of the fit (checked between
    steps: a host decision by design). With ``comm`` (data parallel) the ranks agree, so
    every rank stops at the same step."""

    def __init__(self, seconds: float, *, comm: Any = None, reason: str = "time budget") -> None:
        if not seconds > 0:
            raise ConfigError(f"a time budget must be positive seconds, got {seconds}")
        self.seconds, self.comm, self.reason = float(seconds), comm, reason
        self.deadline: float | None = None

    def on_fit_start(self, solver: Solver) -> None:
        self.deadline = time.perf_counter() + self.seconds

    def should_stop(self, event: StepEvent) -> str | None:
        late = self.deadline is not None and time.perf_counter() > self.deadline
        if self.comm is not None:
            late = self.comm.any(late)
        return self.reason if late else None


def _read(info: StepInfo) -> tuple[float, bool]:
    """(loss, accepted) on the host: one transfer when both are tensors on one device."""
    loss, accepted = info.loss.detach(), info.accepted
    if isinstance(accepted, Tensor):
        if accepted.device == loss.device:
            both = torch.stack([loss.to(torch.float64), accepted.to(torch.float64)]).tolist()
            return both[0], bool(both[1])
        return float(loss), bool(accepted)
    return float(loss), bool(accepted)


def _bad_samples(x: Tensor, y: Tensor | None) -> str:
    """Which samples of a batch hold NaN/inf (read on the host: called on rejected steps
    only), or "" when the batch is finite."""
    try:
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.dim() else None
        if y is not None and y.is_floating_point() and y.dim():
            bad_y = ~torch.isfinite(y.reshape(y.shape[0], -1)).all(1)
            bad = bad_y if bad is None else bad | bad_y
        if bad is None or not bool(bad.any()):
            return "" if x.numel() else "the batch is empty"
        rows = bad.nonzero().flatten().tolist()
    except (RuntimeError, TypeError):  # an odd batch: say nothing rather than fail here
        return ""
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    return (f"the batch holds NaN/inf in {len(rows)} of its {x.shape[0]} samples "
            f"(indices within the batch: {shown})")


@dataclass
class _Streak:
    """Consecutive rejected steps and the first of them."""

    count: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    reason: str = ""
    samples: str = ""


def _too_many_rejected(streak: _Streak, limit: int, solver: Solver) -> TrainingDiverged:
    where = (f"epoch {streak.epoch}, step {streak.step_in_epoch} of the epoch (step "
             f"{streak.step} of this fit)")
    bad = f"; {streak.samples}" if streak.samples else ""
    fix = ("clean the data (ocnet.data.check_finite) or drop those samples" if streak.samples
           else "lower the learning rate (--lr) or use another solver")
    return TrainingDiverged(
        f"{streak.count} consecutive steps of solver {solver.name!r} were rejected "
        f"(max_rejected={limit}); the first bad batch was at {where}: "
        f"{streak.reason or 'the step was not accepted'}{bad}. Training stopped: {fix}, "
        "or allow more rejected steps (--max-rejected)"
    )


def fit(solver: Solver, batches: Batches, *, epochs: int, start_epoch: int = 0,
        callbacks: Sequence[Callback] = (), max_rejected: int | None = None) -> FitResult:
    """Run ``solver.step`` over ``batches`` for epochs ``start_epoch + 1 .. epochs``.

    Args:
        solver: any registered solver (``make_solver``).
        batches: ``epoch -> iterable of (x, y)``, called when each epoch starts (e.g.
            ``lambda e: minibatches(x, y, 32, generator=g)``), or a sequence of batches
            used in every epoch.
        epochs: the last epoch (a resumed run passes its total and ``start_epoch``).
        start_epoch: epochs already done.
        callbacks: :class:`Callback` objects, called in this order.
        max_rejected: raise :class:`TrainingDiverged` after this many consecutive rejected
            steps (None or 0: never), naming the first bad batch of the streak.

    Returns:
        :class:`FitResult`. Exceptions raised by a step or a callback propagate; a
        :class:`~ocnet.ocp.errors.DataError` of a step is re-raised naming the epoch and
        step.
    """
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise ConfigError(f"fit: callbacks must be ocnet.solvers.Callback objects, got "
                              f"{type(cb).__name__}; subclass Callback and override its hooks")
    if max_rejected is not None and (isinstance(max_rejected, bool)
                                     or not isinstance(max_rejected, int) or max_rejected < 0):
        raise ConfigError(f"max_rejected must be a non-negative int or None, got "
                          f"{max_rejected!r}")
    draw = batches if callable(batches) else (lambda _epoch: batches)
    result = FitResult()
    streak = _Streak()
    for cb in callbacks:
        cb.on_fit_start(solver)
    for epoch in range(start_epoch + 1, epochs + 1):
        for cb in callbacks:
            cb.on_epoch_start(epoch)
        t0 = time.perf_counter()
        result.epochs += 1
        n, rejected, stopped = 0, 0, None
        for x, y in draw(epoch):
            try:
                info = solver.step(x, y)
            except DataError as err:
                raise DataError(f"epoch {epoch}, step {n + 1} of the epoch (step "
                                f"{result.steps + 1} of this fit): {err}") from err
            loss, accepted = _read(info)
            n += 1
            rejected += not accepted
            result.steps += 1
            result.step_seconds += info.seconds
            result.last_loss = loss
            if accepted:
                streak.count = 0
            elif info.declined:  # the solver's own test, not a failure: no streak
                pass
            else:
                if streak.count == 0:
                    streak = _Streak(0, epoch, n, result.steps, info.reason,
                                     _bad_samples(x, y))
                streak.count += 1
            event = StepEvent(epoch=epoch, step=result.steps, step_in_epoch=n, loss=loss,
                              accepted=accepted, info=info)
            for cb in callbacks:
                cb.on_step(event)
            if max_rejected and streak.count >= max_rejected:
                raise _too_many_rejected(streak, max_rejected, solver)
            reasons = [cb.should_stop(event) for cb in callbacks]  # every one, every step
            stopped = next((r for r in reasons if r is not None), None)
            if stopped is not None:
                break
        result.rejected += rejected
        end = EpochEnd(epoch=epoch, steps=n, rejected=rejected,
                       seconds=time.perf_counter() - t0, stopped=stopped)
        reasons = [cb.on_epoch_end(end) for cb in callbacks]
        stopped = stopped or next((r for r in reasons if r is not None), None)
        if stopped is not None:
            result.stopped = stopped
            break
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
