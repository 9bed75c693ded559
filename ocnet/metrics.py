"""metrics.csv: one row per epoch of a training run (``ocnet train``), and its reader.

The columns (``METRIC_COLUMNS``) are a public contract: ``epoch``, ``train_loss`` (the mean
of the epoch's step losses), ``test_loss``, ``test_accuracy``, ``train_accuracy`` (after
the epoch), ``seconds`` (the epoch's training wall time) and ``steps``.

The file is always replaced atomically (``ocnet._atomic.atomic_write``): a run killed
while writing it leaves the previous version, never an empty or half-written file.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ._atomic import atomic_write

__all__ = ["METRIC_COLUMNS", "append_metrics", "read_metrics", "write_metrics"]

#: columns of metrics.csv, in order
METRIC_COLUMNS = (
    "epoch", "train_loss", "test_loss", "test_accuracy", "train_accuracy", "seconds", "steps",
)


def _csv(history: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    if header:
        w.writeheader()
    for row in history:
        w.writerow(row)
    return buf.getvalue()


def write_metrics(path: str | os.PathLike, history: Iterable[Mapping[str, Any]]) -> None:
    """metrics.csv with the header and every row of ``history`` (replacing the file
    atomically)."""
    atomic_write(path, _csv(history))


def append_metrics(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """One row added to metrics.csv (the header first if the file is new); the file is
    replaced atomically with its old rows plus this one."""
    try:
        with open(path, newline="") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write(path, old + _csv([row], header=not old) if old else _csv([row]))


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """metrics.csv as a list of dicts of numbers."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
