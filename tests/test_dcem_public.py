"""benchmarks/dcem_public.py --quick: ocnet's DCEM beside the public DCEM code (seconds).

The public code (facebookresearch/dcem, with locuslab/lml and ``semantic_version``) is not
part of the project; the smoke test runs only where it has been exported
(``OCNET_DCEM_PUBLIC``, default ``/tmp/dcem_public``; ``OCNET_LML_PUBLIC``, default
``/tmp/lml_public``; ``OCNET_DCEM_DEPS``, default ``/tmp/dcem_deps``) and skips otherwise.
Without it the script must stop with a message saying how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from public_code import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dcem_public.py"
PUBLIC = Path(os.environ.get("OCNET_DCEM_PUBLIC", "/tmp/dcem_public"))
LML = Path(os.environ.get("OCNET_LML_PUBLIC", "/tmp/lml_public"))
DEPS = Path(os.environ.get("OCNET_DCEM_DEPS", "/tmp/dcem_deps"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_benchmark(SCRIPT, args, cwd, timeout=300)


def _semantic_version() -> bool:
    return (DEPS / "semantic_version").is_dir() or (
        importlib.util.find_spec("semantic_version") is not None)


def test_missing_public_code_names_the_fetch(tmp_path):
    proc = _run(["--quick", "--public", str(tmp_path / "absent"), "--lml",
                 str(tmp_path / "absent_lml"), "--out", str(tmp_path / "x.md")], tmp_path)
    assert proc.returncode != 0
    assert "fetch github:facebookresearch/dcem" in proc.stderr
    assert "github:locuslab/lml" in proc.stderr
    assert not (tmp_path / "x.md").exists()


@pytest.mark.slow  # ~15 s, and only where the public code was fetched
@pytest.mark.skipif(not ((PUBLIC / "dcem" / "dcem.py").is_file()
                         and (PUBLIC / "exps" / "regression.py").is_file()
                         and (LML / "lml.py").is_file() and _semantic_version()),
                    reason=f"public DCEM code not exported to {PUBLIC} / {LML}")
def test_quick_writes_the_side_by_side_tables(tmp_path):
    out = tmp_path / "dcem_public.md"
    proc = _run(["--quick", "--public", str(PUBLIC), "--lml", str(LML), "--deps", str(DEPS),
                 "--out", str(out)], tmp_path)
    assert proc.returncode == 0, f"dcem_public.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    md = out.read_text()
    for needle in ("Settings: public", "Agreement with the same sampling noise",
                   "Seconds per training update", "load average", "Training curves",
                   "public DCEM (facebookresearch/dcem) |", 'ocnet DCEM (preset="paper"',
                   "energy net only (arithmetic floor) |", "LML warnings"):
        assert needle in md, f"{needle!r} missing from the report"
    pub = next(line for line in md.splitlines() if line.startswith("| public DCEM"))
    assert pub.rstrip().endswith("| 1.000 |")  # the public update's ratio to itself
    # the same noise: ocnet's output within LML's tolerance of the public one
    agree = [line.split("|")[1:-1] for line in md.splitlines()
             if line.startswith("| ") and line.count("|") == 8 and "x_j" not in line]
    assert len(agree) == 4
    for cells in agree:
        yp, yo = float(cells[1]), float(cells[2])
        assert abs(yp - yo) <= 1e-3 * max(1.0, abs(yp)), cells
    rows = [line for line in md.splitlines() if line.startswith(("| 10 |", "| 20 |", "| 30 |"))]
    assert len(rows) == 3  # --quick: 30 updates, MSE every 10
