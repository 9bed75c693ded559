"""Stream a training run's scalars to TensorBoard (the optional ``tensorboard`` extra).

    from ocnet.tensorboard import TensorBoardCallback, step_scalars

    tb = TensorBoardCallback("runs/digits/tensorboard")
    for step, (x, y) in enumerate(batches, start=1):
        info = solver.step(x, y)
        tb.on_step(step, step_scalars(info))           # loss, gradient norm, step time, ...
    tb.on_epoch_end(epoch, {"test_loss": ..., "test_accuracy": ...})
    tb.close()

``step_scalars`` flattens a :class:`~ocnet.solvers.StepInfo` into named numbers: the loss,
``accepted``, ``grad_norm``, the step's ``seconds`` and every number in the solver's own
``extra`` diagnostics (DDPNOpt's feedback gains per layer, E-MSA's ``rho`` and per-layer
``htilde_before``/``htilde_after`` with their ``htilde_gain``, the port-Hamiltonian
``energy``/``friction``/``phase``, ...); per-layer vectors become ``name/0``, ``name/1``, ...
plus ``name/mean``, nested dicts ``name/key``, lists of events their count (lists of
integers, which are indices, are skipped). Step scalars go
under ``step/``, epoch metrics under ``epoch/``.

Reading a device tensor's value is a host synchronisation: log every ``every`` steps to
keep a GPU run from waiting on each one. ``torch.utils.tensorboard`` is imported on first
use; without the ``tensorboard`` package the error says ``pip install ocnet[tensorboard]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .ocp.errors import ConfigError

__all__ = ["TensorBoardCallback", "step_scalars"]

#: the longest per-layer vector logged element by element (longer ones: mean, min, max)
MAX_ELEMENTS = 64


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises this when the tensorboard package is absent
        raise ImportError(
            "TensorBoard logging needs the tensorboard package, an optional extra of ocnet: "
            "pip install ocnet[tensorboard]  (or: pip install tensorboard)"
        ) from err
    return SummaryWriter


def _flatten(name: str, value: Any) -> Iterator[tuple[str, float]]:
    """(tag, number) pairs of one diagnostic; what is not numeric is skipped."""
    if value is None or isinstance(value, str | bytes):
        return
    if isinstance(value, bool):
        yield name, float(value)
    elif isinstance(value, numbers.Real):
        yield name, float(value)
    elif isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.bool, torch.int64,
                                                             torch.int32, torch.int16)):
            return
        v = value.detach()
        if v.numel() == 1:
            yield name, float(v.reshape(()))
        elif v.numel() > 0:
            flat = v.reshape(-1).double().cpu()
            if flat.numel() <= MAX_ELEMENTS:
                for k, x in enumerate(flat.tolist()):
                    yield f"{name}/{k}", x
            yield f"{name}/mean", float(flat.mean())
            if flat.numel() > MAX_ELEMENTS:
                yield f"{name}/min", float(flat.min())
                yield f"{name}/max", float(flat.max())
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(f"{name}/{k}", v)
    elif isinstance(value, list | tuple):
        if value and all(isinstance(v, Mapping) for v in value):  # e.g. braking events
            yield f"{name}/count", float(len(value))
        elif value and all(isinstance(v, float | torch.Tensor) for v in value):
            # (lists of Python ints are indices, e.g. E-MSA's controlled stages: skipped)
            try:
                stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(())
                                       for v in value])
            except (RuntimeError, TypeError, ValueError):  # not all scalars
                return
            yield from _flatten(name, stacked)


def step_scalars(info: Any) -> dict[str, float]:
    """The numbers of one :class:`~ocnet.solvers.StepInfo` (see the module docstring)."""
    out: dict[str, float] = {}
    for key in ("loss", "accepted", "grad_norm", "seconds"):
        out.update(_flatten(key, getattr(info, key, None)))
    extra = dict(getattr(info, "extra", None) or {})
    if "htilde_before" in extra and "htilde_after" in extra:  # E-MSA: the Hamiltonian gain
        try:
            extra["htilde_gain"] = (torch.as_tensor(extra["htilde_after"])
                                    - torch.as_tensor(extra["htilde_before"]))
        except (RuntimeError, TypeError, ValueError):
            pass
    for key, value in extra.items():
        out.update(_flatten(key, value))
    return out


class TensorBoardCallback:
    """Writes step and epoch scalars to a TensorBoard event file in ``log_dir``.

    Args:
        log_dir: the run's TensorBoard directory (created if needed).
        every: log every ``every``-th step (epoch metrics are always written).
        flush_secs: how often the writer flushes to disk.
        hparams: optional configuration (e.g. ``TrainConfig.to_dict()``) written once as
            text, so runs can be told apart in TensorBoard.
    """

    def __init__(self, log_dir: str | Path, *, every: int = 1, flush_secs: int = 10,
                 hparams: Mapping[str, Any] | None = None) -> None:
        if every < 1:
            raise ConfigError(f"TensorBoardCallback: every must be >= 1, got {every}")
        writer = _summary_writer()
        self.log_dir = Path(log_dir)
        self.every = int(every)
        self.writer = writer(log_dir=str(self.log_dir), flush_secs=flush_secs)
        if hparams:
            lines = [f"| {k} | {v} |" for k, v in sorted(hparams.items())]
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + "\n".join(lines), 0)

    def _write(self, prefix: str, step: int, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            for tag, number in _flatten(name, value):  # (non-finite values are logged too)
                self.writer.add_scalar(f"{prefix}/{tag}", number, int(step))

    def on_step(self, step: int, info: Mapping[str, Any]) -> None:
        """Scalars of step ``step`` (a dict, e.g. from :func:`step_scalars`) under ``step/``."""
        if step % self.every == 0:
            self._write("step", step, info)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """An epoch's metrics (e.g. a metrics.csv row) under ``epoch/``; flushed to disk."""
        self._write("epoch", epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
