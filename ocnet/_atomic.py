"""Atomic file writes for every file of a run, and the fault-injection hook of the tests.

:func:`atomic_write` writes a temporary file beside the target (``.NAME.tmp-PID``),
flushes and fsyncs it, moves it over the target with ``os.replace`` and fsyncs the
directory: a crash at any moment leaves the old file or the new one, never a partial one.
:func:`clean_stale_temp` removes the temporary files a killed run left behind. Standard
library only, so every layer may use it (checkpoints, metrics.csv, the JSON files).

Fault injection (tests only): ``OCNET_FAULT=NAME:N:PHASE`` makes the process kill itself
with SIGKILL during its N-th atomic write of a file called NAME (``epoch_*.pt`` patterns
allowed), at PHASE ``before`` (nothing written yet), ``mid`` (the temporary file half
written, not synced), ``synced`` (the temporary file complete, not yet moved) or
``after`` (moved over the target). ``OCNET_FAULT_SLEEP=SECONDS`` sleeps instead of dying,
so a test can kill the process from outside while it is inside that write.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import time
from pathlib import Path

__all__ = ["atomic_write", "clean_stale_temp"]


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_FAULT_COUNTS: dict[str, int] = {}


def _fault(path: Path, phase: str) -> None:
    """The fault-injection hook (see the module docstring); a no-op unless OCNET_FAULT is set."""
    spec = os.environ.get("OCNET_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    nth, _, when = rest.partition(":")
    if not fnmatch.fnmatch(path.name, name) or when != phase:
        return
    key = f"{name}:{phase}"
    _FAULT_COUNTS[key] = _FAULT_COUNTS.get(key, 0) + 1
    if str(_FAULT_COUNTS[key]) != nth:
        return
    pause = os.environ.get("OCNET_FAULT_SLEEP")
    if pause:
        time.sleep(float(pause))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, flushed and
    fsync'ed, then ``os.replace``; a crash at any moment leaves either the old or the new
    file, never a partial one (and at worst a ``.NAME.tmp-PID`` file, which
    :func:`clean_stale_temp` removes)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = _temp_path(path)
    _fault(path, "before")
    try:
        with open(tmp, "wb") as f:
            half = len(raw) // 2
            f.write(raw[:half])
            if os.environ.get("OCNET_FAULT"):
                f.flush()
                _fault(path, "mid")
            f.write(raw[half:])
            f.flush()
            os.fsync(f.fileno())
        _fault(path, "synced")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    _fault(path, "after")
    return path


_TEMP = re.compile(r"^\..+\.tmp(-\d+)?(\.[A-Za-z]+)?$")


def clean_stale_temp(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID``, ``.NAME.tmp``) that interrupted
    writes left in ``folders`` (call it while holding the run directory's lock, so that no
    live writer owns them); returns the deleted paths."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _TEMP.match(p.name) and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed
