"""Running a ``benchmarks/*_public.py`` script in a subprocess, for the side-by-side tests.

The public code those scripts compare against is never part of the project; the tests run
the script as a user would (single-threaded, headless, the project on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: Path, args: list[str], cwd: Path,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in ``cwd`` with one thread and the Agg backend."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
