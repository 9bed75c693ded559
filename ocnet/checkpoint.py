"""Checkpoints that are written atomically and verified when read.

File format (one file per checkpoint, e.g. ``OUT/checkpoints/epoch_0003.pt``)::

    torch.save({"format": "ocnet-checkpoint", "version": 1,
                "sha256": <hex digest of payload bytes>,
                "payload": <uint8 tensor: the bytes of torch.save(state)>})

The state itself is serialised once into ``payload`` and its SHA-256 digest stored beside
it, so a flipped byte in the weights -- which ``torch.load`` would happily read as a
different number -- is caught. Both levels are read with ``torch.load(weights_only=True)``,
so a state may hold only tensors and primitive containers (dict, list, tuple, str, int,
float, bool, None): model ``state_dict``, optimizer ``state_dict``, generator states
(``ByteTensor``), metric histories, a config dict.

Writes go to a temporary file in the same directory (``.NAME.tmp-PID``), are flushed and
fsync'ed, then moved over the target with ``os.replace``: a crash mid-write leaves the old
file intact. :func:`atomic_write` does the same for every other file of a run (metrics.csv,
summary.json, config.json), and :func:`clean_stale_temp` removes the temporary files a
killed run left behind (both live in ``ocnet._atomic``, which also holds the
fault-injection hook the tests use to kill a run inside a write).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write, clean_stale_temp
from .ocp.errors import CheckpointError

__all__ = [
    "CHECKPOINT_DIR",
    "atomic_write",
    "clean_stale_temp",
    "checkpoint_path",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

FORMAT = "ocnet-checkpoint"
VERSION = 1
#: the sub-folder of a run directory that holds its checkpoints
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch_(\d+)\.pt$")


def checkpoint_path(directory: str | os.PathLike, epoch: int) -> Path:
    """``directory/epoch_NNNN.pt`` (``directory`` is the checkpoint folder itself)."""
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def _checkpoint_folder(directory: str | os.PathLike) -> Path:
    """A run directory's ``checkpoints/`` folder if it has one, else ``directory`` itself."""
    d = Path(directory)
    sub = d / CHECKPOINT_DIR
    return sub if sub.is_dir() else d


def find_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The ``epoch_NNNN.pt`` files of a run (or checkpoint) directory, newest (highest epoch)
    first. Unverified: use :func:`load_checkpoint` to read one."""
    folder = _checkpoint_folder(directory)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint file of a run directory (by epoch number), or None."""
    found = find_checkpoints(directory)
    return found[0] if found else None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically with an embedded SHA-256 digest; returns the path.

    ``state`` must hold only tensors and primitive containers (it is read back with
    ``weights_only=True``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inner = io.BytesIO()
    torch.save(state, inner)
    data = inner.getvalue()
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    outer = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": payload,
    }
    buf = io.BytesIO()
    torch.save(outer, buf)
    return atomic_write(path, buf.getvalue())


def _read(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint; raises CheckpointError naming the problem."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write did not finish")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({size} bytes; torch.load said: "
            f"{type(err).__name__}: {_first_line(err)})"
        ) from err
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ocnet checkpoint (no '{FORMAT}' header); it was not written "
            "by ocnet.checkpoint.save_checkpoint"
        )
    if outer.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {outer.get('version')!r}; this ocnet "
            f"reads version {VERSION}"
        )
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint {path} is corrupted: its payload is missing")
    data = payload.contiguous().numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != outer.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: SHA-256 digest mismatch (stored "
            f"{str(outer.get('sha256'))[:12]}..., content {digest[:12]}...)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} holds a state that cannot be loaded with weights_only=True "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def _older_good(path: Path) -> Path | None:
    """The newest checkpoint in ``path``'s folder that is older than ``path`` and loads."""
    m = _NAME.match(path.name)
    epoch = int(m.group(1)) if m else None
    for other in find_checkpoints(path.parent):
        if other == path:
            continue
        om = _NAME.match(other.name)
        if epoch is not None and om and int(om.group(1)) >= epoch:
            continue
        try:
            _read(other)
        except CheckpointError:
            continue
        return other
    return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`~ocnet.ocp.errors.CheckpointError` naming the file and what is wrong
    (missing, empty, truncated, corrupted, digest mismatch) and, when there is one, the
    newest older checkpoint in the same folder that does load.
    """
    path = Path(path)
    try:
        return _read(path)
    except CheckpointError as err:
        good = _older_good(path) if path.parent.is_dir() else None
        hint = (
            f"; the older checkpoint {good} loads: resume from it (delete or move {path.name})"
            if good is not None
            else "; no older checkpoint in the same folder loads"
        )
        raise CheckpointError(f"{err}{hint}") from err.__cause__


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``epoch_NNNN.pt`` files; returns the deleted paths.

    ``keep <= 0`` keeps everything.
    """
    if keep <= 0:
        return []
    removed = []
    for p in find_checkpoints(directory)[keep:]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
