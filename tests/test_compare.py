"""``ocnet compare``: metrics against direct computation, the protocol's invariants, the
time guard, the skip path and the command."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from click.testing import CliRunner

from ocnet.bridge import to_problem
from ocnet.compare import (
    SETTINGS,
    SKIP,
    _metrics,
    build_setting,
    compare,
    replot,
    run_compare,
    run_isolated,
    run_one,
    skipped_solvers,
)
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import StepInfo, register, solver_entry, solver_records, unregister
from ocnet.solvers.gradient import GradientSolver


@pytest.fixture
def temp_solver():
    """Register solvers for one test and remove them afterwards."""
    added = []

    def add(name, factory):
        register(name, factory, "test solver")
        added.append(name)

    yield add
    for name in added:
        unregister(name)


def test_settings_have_the_protocol_shapes():
    n_linear = {}
    for name, s in SETTINGS.items():
        model, loss, ds = build_setting(s, seed=0, n_train=200 if s.data == "digits" else None)
        kinds = [type(m).__name__ for m in model]
        n_linear[name] = (kinds.count("Linear"), kinds.count("Conv2d"))
        x = ds.x_train[:5]
        out = model(x)
        assert loss == ("mse" if s.autoencoder else "cross_entropy")
        assert out.shape == (x.shape if s.autoencoder else (5, ds.n_classes))
    assert n_linear["mlp-digits"] == (3, 0)
    assert n_linear["cnn-digits"] == (2, 2)
    assert n_linear["ae-digits"] == (4, 0) and n_linear["ae-mnist1d"] == (4, 0)


def test_metrics_match_direct_computation():
    torch.manual_seed(0)
    for name in ("mlp-digits", "ae-digits"):
        s = SETTINGS[name]
        model, loss, ds = build_setting(s, seed=1, n_train=300)
        problem = to_problem(model, loss)
        x, y = ds.x_test, ds.y_test
        got_loss, got_metric = _metrics(problem, x, y, s.autoencoder, chunk=37)
        with torch.no_grad():
            out = model(x)
        if s.autoencoder:
            want = float(F.mse_loss(out, x))
            assert got_loss == pytest.approx(want, rel=1e-5)
            assert got_metric == pytest.approx(want, rel=1e-5)
        else:
            assert got_loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
            assert got_metric == pytest.approx(float((out.argmax(1) == y).float().mean()))


def test_default_lr_and_skips_are_read_from_the_registry():
    assert solver_entry("adam").lr() == pytest.approx(1e-3)
    assert solver_entry("sgd").lr() == pytest.approx(0.1)
    assert solver_entry("phb").lr() == pytest.approx(0.25)
    assert solver_entry("ddpnopt").lr({"base": "sgd"}) == pytest.approx(0.1)
    assert solver_entry("ipopt").lr() is None
    assert set(SKIP) == set(skipped_solvers()) == {r.name for r in solver_records()
                                                   if r.reference} == {"ipopt"}
    assert "exact reference" in SKIP["ipopt"]
    c = run_one(SETTINGS["mlp-digits"], "ipopt", 3.0, seed=0, epochs=1, n_train=200)
    assert c["status"] == "skipped: the solver has no learning rate to sweep"


def test_run_one_is_seeded_and_starts_every_solver_from_the_same_weights():
    s = SETTINGS["ae-digits"]
    a = run_one(s, "adam", 1.0, seed=3, epochs=2, n_train=200)
    b = run_one(s, "adam", 1.0, seed=3, epochs=2, n_train=200)
    c = run_one(s, "sgd", 3.0, seed=3, epochs=2, n_train=200)
    assert a["status"] == "ok" and a["curve"] == b["curve"]
    assert len(a["curve"]) == 3 and a["epochs"] == 2
    assert c["curve"][0] == a["curve"][0]  # same initial weights, same data
    assert c["lr"] == pytest.approx(0.3)
    assert a["curve"][-1] < a["curve"][0]  # Adam reduces the reconstruction error
    assert a["seconds_per_epoch"] > 0


def test_a_solver_raising_config_error_is_skipped_with_the_reason(temp_solver):
    def refuse(problem, lr=None, **kw):
        raise ConfigError("needs a linear-quadratic problem")

    temp_solver("_refuses", refuse)
    r = run_one(SETTINGS["mlp-digits"], "_refuses", 1.0, seed=0, epochs=1, n_train=200)
    assert r["status"] == "skipped: needs a linear-quadratic problem"


class _Slow(GradientSolver):
    def _step(self, x0, y):
        time.sleep(30)
        return StepInfo(loss=torch.zeros(()))


def test_a_step_that_overruns_the_budget_is_killed(temp_solver):
    temp_solver("_slow", lambda problem, lr=None, **kw: _Slow(problem, "sgd", lr=lr))
    t0 = time.perf_counter()
    r = run_isolated(SETTINGS["mlp-digits"], "_slow", 1.0, 0, 1, budget=0.1, hard_limit=3.0,
                     n_train=200)
    assert r["status"].startswith("timed out")
    assert time.perf_counter() - t0 < 20


def test_run_compare_writes_table_and_figures(tmp_path):
    r = run_compare(tmp_path, settings=["mlp-digits"], solvers=["adam", "sgd"], epochs=1,
                    lr_factors=(1.0, 3.0), n_train=300, progress=False, isolate=False)
    md = (tmp_path / "results.md").read_text()
    assert (tmp_path / "mlp-digits_loss.png").stat().st_size > 1000
    assert "shared 2-core CPU" in md and "| adam |" in md
    aggs = {(a["solver"], a["lr_factor"]): a for a in r["aggregates"]}
    best_sgd = min((aggs[("sgd", f)] for f in (1.0, 3.0)), key=lambda a: a["final_train_loss"])
    ratio = best_sgd["seconds_per_epoch"] / aggs[("adam", 1.0)]["seconds_per_epoch"]
    sgd_row = next(line for line in md.splitlines() if line.startswith("| sgd |"))
    assert sgd_row.rstrip().endswith(f"| {ratio:.2f} |")
    assert r["winners"]["mlp-digits"] in ("adam", "sgd")
    assert len(r["rows"]) == 4
    best = min((a for a in r["aggregates"]), key=lambda a: a["final_train_loss"])
    assert r["winners"]["mlp-digits"] == best["solver"]
    assert all(math.isfinite(a["final_train_loss"]) for a in r["aggregates"])
    (tmp_path / "mlp-digits_loss.png").unlink()
    assert replot(tmp_path / "results.json") == [tmp_path / "mlp-digits_loss.png"]
    assert (tmp_path / "mlp-digits_loss.png").stat().st_size > 1000


def test_cli_compare_and_its_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(compare, ["--out", str(tmp_path), "--settings", "ae-mnist1d",
                                  "--solvers", "adam", "--epochs", "1", "--quick"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ae-mnist1d_loss.png").exists()
    bad = runner.invoke(compare, ["--out", str(tmp_path), "--settings", "nope"])
    assert bad.exit_code != 0 and "mlp-digits" in bad.output
    bad = runner.invoke(compare, ["--out", str(tmp_path), "--solvers", "adamm"])
    assert bad.exit_code != 0 and "sgd" in bad.output
