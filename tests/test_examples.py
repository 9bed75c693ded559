"""Every example runs in its smoke mode and writes the figures the gallery shows.

Each example is run through ``examples/run_all.py`` (its own process, working directory
a temporary folder). Examples whose smoke run takes over ~30 s on the shared 2-core box
are marked slow (``make test-slow``); every other one runs in the default suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "examples" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
sys.modules["run_all"] = run_all
_spec.loader.exec_module(run_all)

#: figures each example must write (file names); examples not listed only need to succeed
FIGURES = {
    "02_backprop_is_pmp": ["backprop_is_pmp.png"],
    "03_ddpnopt_digits": ["ddpnopt_vs_adam.png"],
    "05_adaptive_neural_ode": ["mesh.png", "accuracy.png", "trajectories.png"],
    "08_exact_optimum": ["exact_optimum.png"],
    "06_goal_oriented_momentum": ["energy_loss_events.png"],
    "04_msa_divergence": ["msa_divergence.png"],
}
#: smoke runs too long for the default suite (seconds measured on the shared 2-core box)
SLOW: dict[str, float] = {}


def _params():
    for script in run_all.examples():
        marks = [pytest.mark.slow] if script.stem in SLOW else []
        yield pytest.param(script, id=script.stem, marks=marks)


@pytest.mark.parametrize("script", list(_params()))
def test_example_smoke_run(script, tmp_path):
    r = run_all.run(script, tmp_path / script.stem, smoke=True, timeout=600)
    assert r["status"] == "ok", r["output"]
    names = {f.name for f in r["figures"]}
    for fig in FIGURES.get(script.stem, []):
        assert fig in names, f"{script.stem} did not write {fig}; it wrote {sorted(names)}"
    for f in r["figures"]:
        assert f.stat().st_size > 1000, f"{f} is (nearly) empty"


def test_run_all_knows_every_example_and_sets_the_smoke_convention(tmp_path):
    stems = [p.stem for p in run_all.examples()]
    assert "run_all" not in stems and len(stems) == len(set(stems))
    assert stems[: len(run_all.ORDER)] == [s for s in run_all.ORDER if s in stems]
    unknown = tmp_path / "zz_new_example.py"
    argv, env = run_all.command(unknown, tmp_path / "out", smoke=True)
    assert argv[1:] == [str(unknown)] and env["OCNET_SMOKE"] == "1"
    argv, _ = run_all.command(ROOT / "examples" / "08_exact_optimum.py", tmp_path, smoke=False)
    assert argv[2:] == ["--out", str(tmp_path)]
    argv, _ = run_all.command(ROOT / "examples" / "08_exact_optimum.py", tmp_path, smoke=True)
    assert argv[2:] == ["--quick", "--out", str(tmp_path)]
