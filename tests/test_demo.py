"""``ocnet demo``: a tiny real run writes the table and figures; the table is built from
the measured rows (ratios, learning rates, skips); the default solver list skips ipopt."""

from __future__ import annotations

import json

import pytest

from ocnet import demo
from ocnet.compare import SKIP
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import SolverRecord, registry, solver_names


def _not_applicable(problem, lr=None, **kw):
    raise ConfigError("this solver needs a problem with 2 stages")


def test_tiny_demo_writes_results_and_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test-na",
                        SolverRecord("test-na", _not_applicable, "not applicable"))
    r = demo.run_demo(tmp_path, solvers=["adam", "sgd", "test-na"], epochs=1, quick=True,
                      budget=5.0, progress=False)
    md = (tmp_path / "results.md").read_text()
    for png in ("digits_loss.png", "spirals/decision_boundary.png", "spirals/trajectories.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    rows = {(row["setting"], row["solver"]): row for row in r["rows"]}
    assert set(rows) == {(s, n) for s in demo.DEMO_SETTINGS for n in ("adam", "sgd", "test-na")}
    for s in demo.DEMO_SETTINGS:
        assert f"### {s}:" in md
        adam, sgd = rows[(s, "adam")], rows[(s, "sgd")]
        assert adam["status"] == "ok" and sgd["status"] == "ok"
        assert adam["epochs"] == sgd["epochs"] == 1 and adam["steps"] == 43  # 1347 / 32
        ratio = sgd["seconds_per_epoch"] / adam["seconds_per_epoch"]
        table = r["tables"][s]
        assert "| adam |" in table and "| 1.00 |" in table
        assert f"| {sgd['final_train_loss']:.4g} | {sgd['test_metric']:.4f} | {ratio:.2f} |" \
            in table
        assert rows[(s, "test-na")]["status"] == "skipped: this solver needs a problem with 2 " \
            "stages"
        assert "| test-na | n/a | - | - | - | - | skipped: this solver" in table
        assert 0.0 < adam["final_train_loss"] < adam["curve"][0]  # one epoch of Adam helps
    # the gradient baselines use the tuned MLP learning rates, the CNN the defaults
    assert rows[("mlp-digits", "sgd")]["lr"] == pytest.approx(demo.DEMO_LR["sgd"])
    assert rows[("cnn-digits", "sgd")]["lr"] == pytest.approx(0.1)
    assert rows[("mlp-digits", "adam")]["lr"] == pytest.approx(demo.DEMO_LR["adam"])
    assert r["spirals"]["test_accuracy"] > 0.5
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == len(r["rows"])


def test_default_solvers_are_every_registered_one_but_the_skipped(tmp_path, monkeypatch,
                                                                   capsys):
    calls = []

    def fake(setting, solver, lr_factor, seed, epochs, budget, hard_limit, **kw):
        calls.append((setting.name, solver, lr_factor, budget))
        return {"setting": setting.name, "solver": solver, "status": "failed: fake", "lr": None}

    monkeypatch.setattr(demo, "run_isolated", fake)
    monkeypatch.setattr(demo, "_warm_up", lambda: None)
    r = demo.run_demo(tmp_path, budget=3.0, spirals=False, progress=False)
    expected = [n for n in solver_names() if n not in SKIP]
    assert [c[1] for c in calls] == expected * len(demo.DEMO_SETTINGS)
    assert all(c[3] == 3.0 for c in calls)
    out = capsys.readouterr().out
    for name, why in SKIP.items():
        if name in solver_names():
            assert f"{name}: not run: {why}" in out
    assert r["winners"] == {} and not (tmp_path / "digits_loss.png").exists()
    with pytest.raises(Exception, match="unknown solver 'nope'"):
        demo.run_demo(tmp_path, solvers=["adam", "nope"], spirals=False)
