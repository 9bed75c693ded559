"""benchmarks/novas_public.py --quick: ocnet's NOVAS beside the public NOVAS code (seconds).

The public code (iexarchos/NOVAS) is not part of the project; the smoke test runs only
where it has been exported (``OCNET_NOVAS_PUBLIC``, default ``/tmp/novas_public``) and
skips otherwise. Without it the script must stop with a message saying how to get it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from public_code import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "novas_public.py"
PUBLIC = Path(os.environ.get("OCNET_NOVAS_PUBLIC", "/tmp/novas_public"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_benchmark(SCRIPT, args, cwd, timeout=300)


def test_missing_public_code_names_the_fetch(tmp_path):
    proc = _run(["--quick", "--public", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "x.md")], tmp_path)
    assert proc.returncode != 0
    assert "fetch github:iexarchos/NOVAS" in proc.stderr
    assert not (tmp_path / "x.md").exists()


@pytest.mark.slow  # ~12 s, and only where the public code was fetched
@pytest.mark.skipif(not (PUBLIC / "SPEN" / "regression.py").is_file(),
                    reason=f"public NOVAS code not exported to {PUBLIC}")
def test_quick_writes_the_side_by_side_tables(tmp_path):
    out = tmp_path / "novas_public.md"
    proc = _run(["--quick", "--public", str(PUBLIC), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, f"novas_public.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    md = out.read_text()
    for needle in ("Seconds per training update", "load average", "Training curves",
                   "public NOVAS (iexarchos/NOVAS SPEN) |", 'ocnet NOVAS (preset="paper") |',
                   "energy net only (arithmetic floor) |", "test MSE (end)"):
        assert needle in md, f"{needle!r} missing from the report"
    pub = next(line for line in md.splitlines() if line.startswith("| public NOVAS"))
    assert pub.rstrip().endswith("| 1.000 |")  # the public update's ratio to itself
    rows = [line for line in md.splitlines() if line.startswith("| 10 |")
            or line.startswith("| 20 |")]
    assert len(rows) == 2  # --quick: 20 updates, MSE every 10
