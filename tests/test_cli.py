"""The ``ocnet`` command line, through click's CliRunner."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ocnet import checkpoint as ckpt
from ocnet.cli import cli, parse_option_value
from ocnet.data import DATASETS
from ocnet.demo import run_demo
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import SolverRecord, registry, solver_entry, solver_names
from ocnet.solvers.gradient import GradientSolver
from ocnet.train import SUMMARY_KEYS

TINY = ["--data", "digits", "--n-train", "200", "--n-test", "60", "--width", "8",
        "--epochs", "2", "--no-progress"]


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_help_lists_commands():
    r = _run(["--help"])
    assert r.exit_code == 0
    for cmd in ("train", "solvers", "datasets", "demo"):
        assert f"  {cmd} " in r.output
    r = _run(["train", "--help"])
    assert r.exit_code == 0
    for opt in ("--data", "--model", "--solver", "--epochs", "--batch-size", "--lr", "--seed",
                "--out", "--resume", "--solver-opt", "--no-progress", "--dtype"):
        assert opt in r.output


@pytest.mark.parametrize("args,valid", [
    # The solver registry grows as solver modules are imported: read it when the test runs.
    (["--solver", "nope"], solver_names),
    (["--data", "imagenet"], lambda: list(DATASETS)),
    (["--model", "transformer"], lambda: ["cnn", "mlp", "resnet"]),
])
def test_unknown_names_list_the_valid_ones(tmp_path, args, valid):
    r = _run(["train", *args, "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: unknown ")
    assert "Traceback" not in r.output
    assert ", ".join(sorted(valid())) in lines[0]
    assert not (tmp_path / "x" / "metrics.csv").exists()


def test_tiny_train_run_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    r = _run(["train", *TINY, "--solver", "momentum", "--lr", "0.05", "--seed", "1",
              "--solver-opt", "momentum=0.8", "--solver-opt", "nesterov=true", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "momentum on digits (mlp): 2 epochs" in r.output
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2
    assert {"train_loss", "test_loss", "test_accuracy", "seconds"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["data"] == "digits" and summary["solver"] == "momentum"
    assert summary["steps"] == 14 and summary["lr"] == 0.05
    assert summary["config"]["solver_options"] == {"momentum": 0.8, "nesterov": True}
    assert (out / "loss.png").is_file()

    # --resume takes the saved settings and continues to --epochs.
    r = _run(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 21
    assert summary["resumed_from"].endswith("epoch_0002.pt")
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["epoch"] == 3

    # A second fresh run into the same directory is refused with the fix, exit 2.
    r = _run(["train", *TINY, "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_bad_solver_option_is_a_one_line_error(tmp_path):
    r = _run(["train", *TINY, "--solver-opt", "bogus_option=1", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.startswith("Error: solver 'adam' does not take these options")
    r = _run(["train", *TINY, "--solver-opt", "no-equals-sign", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_corrupted_checkpoint_on_resume_is_reported(tmp_path):
    out = tmp_path / "run"
    assert _run(["train", *TINY, "--epochs", "1", "--out", str(out)]).exit_code == 0
    p = ckpt.latest_checkpoint(out)
    p.write_bytes(p.read_bytes()[:100])
    r = _run(["train", "--resume", str(out), "--epochs", "2", "--no-progress"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("Warning: checkpoint ") and "epoch_0001.pt is truncated" in lines[0]
    assert lines[1].startswith("Error: no checkpoint in") and len(lines) == 2


def test_listings():
    r = _run(["solvers"])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == solver_names() and {"sgd", "momentum", "rmsprop", "adam"} <= set(names)
    for name, line in zip(names, lines, strict=True):  # the registry's facts, e.g. "lr 0.001"
        record = solver_entry(name)
        assert record.summary in line and record.cost in line
        assert ("data parallel" in line) == record.data_parallel
    r = _run(["datasets"])
    assert r.exit_code == 0 and r.output.split() == list(DATASETS)


def test_option_values():
    assert parse_option_value("true") is True and parse_option_value("False") is False
    assert parse_option_value("3") == 3 and isinstance(parse_option_value("3"), int)
    assert parse_option_value("1e-3") == 1e-3 and parse_option_value("none") is None
    assert parse_option_value("adam") == "adam"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ocnet", "train", "--solver", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("Error: unknown solver 'nope'")
    assert "Traceback" not in r.stderr


def test_demo_quick_two_solvers(tmp_path):
    r = _run(["demo", "--quick", "--solvers", "adam,sgd", "--out", str(tmp_path),
              "--no-progress"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "results.md").read_text()
    assert "| adam | 0.003 | 3 | 129 |" in md and "| sgd | 0.5 | 3 | 129 |" in md
    assert "| 1.00 |" in md  # adam's seconds/step relative to itself
    for png in ("digits_loss.png", "spirals/decision_boundary.png", "spirals/trajectories.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    r = _run(["demo", "--solvers", "adam,nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown solver 'nope'" in r.output


class _Stalls(GradientSolver):
    """A solver whose step never finishes within the demo's budget."""

    def _step(self, x0, y):
        time.sleep(600)
        return super()._step(x0, y)


def _stalling(problem, lr=None, **kw):
    return _Stalls(problem, "sgd", lr=lr, **kw)


def _not_applicable(problem, lr=None, **kw):
    raise ConfigError("this solver needs a problem with 2 stages")


def test_demo_kills_a_stalled_solver_and_skips_inapplicable_ones(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test-stall",
                        SolverRecord("test-stall", _stalling, "stalls", _Stalls))
    monkeypatch.setitem(registry._REGISTRY, "test-na",
                        SolverRecord("test-na", _not_applicable, "not applicable"))
    t0 = time.perf_counter()
    r = run_demo(tmp_path, solvers=["test-stall", "test-na"], quick=True, budget=1.0,
                 grace=2.0, progress=False, spirals=False)
    status = {row["solver"]: row["status"] for row in r["rows"]}
    assert status["test-stall"].startswith("timed out")
    assert status["test-na"] == "skipped: this solver needs a problem with 2 stages"
    assert time.perf_counter() - t0 < 120
    assert "| test-na | n/a | - | - | - | - | skipped: this solver" in r["table"]
