"""benchmarks/speed.py --quick: every registered solver is stepped, timed and counted.

A smoke test (seconds): the tables are written, every solver either has a time or says
why it was not run, Adam's ratio to itself is 1, and the FLOP floor of the first-order
solvers equals Adam's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def test_speed_benchmark_quick_writes_every_solver(tmp_path):
    out = tmp_path / "speed.md"
    env = dict(os.environ)
    # the tree under test, not whatever ocnet is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"speed.py --quick failed:\n{proc.stdout}\n{proc.stderr}"

    md = out.read_text()
    for heading in ("## Networks", "## NOVAS layer", "## Scaling sweep", "load average"):
        assert heading in md, f"{heading!r} missing from the markdown report"

    res = json.loads(out.with_suffix(".json").read_text())
    from ocnet.solvers import solver_names

    assert sorted(res["solvers"]) == sorted(solver_names()), "not every registered solver ran"
    for net, table in res["networks"].items():
        rows = {r["solver"]: r for r in table["solvers"]}
        assert set(rows) == set(solver_names()), f"{net}: solvers missing from the table"
        adam = rows["adam"]
        assert adam["status"] == "ok" and len(adam["cpu_s"]) == 2, f"{net}: adam not timed"
        assert adam["floor"] == 1.0, f"{net}: Adam's floor relative to itself is {adam['floor']}"
        for name, r in rows.items():
            timed = r["status"].startswith("ok") and r["cpu_s"]
            assert timed or r["status"].startswith(("skipped", "dropped")), (
                f"{net}/{name}: neither timed nor skipped with a reason: {r['status']}")
            if timed:
                assert all(t > 0 for t in r["wall_s"]), f"{net}/{name}: non-positive wall time"
                assert r["peak_bytes"] is not None, f"{net}/{name}: no peak memory"
        for name in ("sgd", "momentum", "rmsprop"):
            if name in rows and rows[name]["floor"] is not None:
                assert abs(rows[name]["floor"] - 1.0) < 1e-9, (
                    f"{net}/{name}: a first-order step should count Adam's FLOPs, floor "
                    f"{rows[name]['floor']}")
    layers = {r["solver"]: r for r in res["novas"]["layers"]}
    assert all(r["status"] == "ok" for r in layers.values()), f"NOVAS section: {layers}"
    assert len(res["sweep"]["sizes"]) == 2 and "adam" in res["sweep"]["slopes"]
