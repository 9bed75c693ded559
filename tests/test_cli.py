"""The ``ocnet`` command line, through click's CliRunner."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ----------------------------------------------------------------------------- issue 16:
# every failing trial is one clear error line, a nonzero exit, no traceback, and nothing
# written (no --out left behind)

def _error_only(r, code: int) -> str:
    """The one Error line of a refused run (click usage errors add Usage/Try lines)."""
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.strip().splitlines()
             if not ln.startswith(("Usage:", "Try ", "Warning:")) and ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


@pytest.mark.parametrize("args,code,pattern", [
    (["--solver", "emsa", "--solver-opt", "rho=abc"], 2,
     r"option rho='abc' is text.*give a number"),
    (["--solver", "momentum", "--solver-opt", "momentum=abc"], 2,
     r"option momentum='abc' is text, but momentum takes float"),
    (["--seed", "99999999999999999999"], 2, r"--seed.*not in the range 0<=x<=4294967295"),
    (["--weight-decay", "inf"], 2, r"weight_decay must be a finite number >= 0.*got inf"),
    (["--weight-decay", "nan"], 2, r"weight_decay must be a finite number >= 0.*got nan"),
    (["--lr", "nan"], 2, r"lr must be a positive finite number"),
    (["--lr", "inf"], 2, r"lr must be a positive finite number"),
    (["--n-train", "100000"], 2, r"digits has 1797 samples, so n_train=100000 is too many.*"
                                 r"--n-train at most 1787"),
    (["--n-test", "1797"], 2, r"n_test=1797 is too many"),
    (["--max-rejected", "-1"], 2, r"--max-rejected"),
    (["--solver-opt", "guard=maybe"], 2, r"guard must be one of"),
])
def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, args, code, pattern):
    out = tmp_path / "never"
    r = _run(["train", *TINY, *args, "--out", str(out)])
    assert re.search(pattern, _error_only(r, code)), r.output
    assert not out.exists()


def test_bad_out_paths_are_one_line_errors(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    line = _error_only(_run(["train", *TINY, "--out", str(f)]), 2)
    assert f"--out {f} is a file, not a directory" in line
    line = _error_only(_run(["train", *TINY, "--out", str(f / "below")]), 2)
    assert "is a file" in line
    line = _error_only(_run(["train", *TINY, "--out", "/proc/ocnet-test/run"]), 2)
    assert "cannot be created" in line or "cannot be written" in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        line = _error_only(_run(["train", *TINY, "--out", str(ro / "run")]), 2)
        assert "no write permission" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] + (
        [] if os.geteuid() == 0 else ["ro"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = _run(["train", *TINY, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("damage,expect", [
    ("shape", "does not fit the model of this run (RuntimeError: Error(s) in loading "
              "state_dict for Sequential: size mismatch for 0.weight"),
    ("epoch", "holds epoch='six', not an int >= 0"),
    ("nan_weight", "holds non-finite weights"),
    ("nan_metrics", "its epoch evaluated to a non-finite loss"),
    ("no_model", "lacks model"),
])
def test_a_damaged_checkpoint_inside_a_valid_envelope_falls_back(finished_run, tmp_path,
                                                                 damage, expect):
    out = _copy(finished_run, tmp_path)
    newest = ckpt.latest_checkpoint(out)
    state = ckpt.load_checkpoint(newest)
    key = next(iter(state["model"]))
    if damage == "shape":
        state["model"][key] = torch.zeros(3, 3)
    elif damage == "epoch":
        state["epoch"] = "six"
    elif damage == "nan_weight":
        state["model"][key] = state["model"][key] * float("nan")
    elif damage == "nan_metrics":
        state["metrics"][-1]["test_loss"] = float("nan")
    else:
        del state["model"]
    ckpt.save_checkpoint(newest, state)
    r = _run(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("Warning: checkpoint ") and expect in lines[0], lines[0]
    assert "falling back to the previous checkpoint epoch_0001.pt" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("epoch_0001.pt") and summary["epochs"] == 3
    # both damaged: one error line after the warnings
    for p in ckpt.find_checkpoints(out):
        st = ckpt.load_checkpoint(p)
        st["epoch"] = "six"
        ckpt.save_checkpoint(p, st)
    r = _run(["train", "--resume", str(out), "--epochs", "4", "--no-progress"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: no checkpoint of ")


def test_a_truncated_config_json_is_read_from_the_checkpoint(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])
    r = _run(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "config.json cannot be read (JSONDecodeError" in r.output
    assert json.loads((out / "config.json").read_text())["epochs"] == 3  # rewritten whole


def test_resume_before_the_first_checkpoint_says_so(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    line = _error_only(_run(["train", "--resume", str(out), "--no-progress"]), 1)
    assert "a run that has no checkpoint" in line and "without --resume" in line
    r = _run(["train", "--out", str(out), "--epochs", "1", "--no-progress"])  # which works
    assert r.exit_code == 0, r.output


def test_a_run_directory_in_use_is_refused_naming_the_pid(finished_run, tmp_path):
    from ocnet.train import RunLock

    out = _copy(finished_run, tmp_path)
    with RunLock(out):
        line = _error_only(_run(["train", "--resume", str(out), "--epochs", "3",
                                 "--no-progress"]), 1)
        assert f"is in use by another ocnet run (PID {os.getpid()}" in line
        line = _error_only(_run(["train", *TINY, "--overwrite", "--out", str(out)]), 1)
        assert f"PID {os.getpid()}" in line
    assert not (out / ".ocnet.owner").exists()
    # a stale owner record (a killed run) is taken over with a warning
    (out / ".ocnet.owner").write_text(json.dumps({"pid": 2**22 + 12345, "started": "then"}))
    r = _run(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "taking over the run directory from PID 4206649" in r.output


# Property: any value of any numeric option is a finished run or one error line, never a
# traceback, and a refused run writes nothing.
_BAD = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.integers(-(2**70), 2**70).map(str),
                 st.text(alphabet="abe-.0123456789 x", max_size=6))
_OK = {"--epochs": st.integers(1, 2), "--batch-size": st.integers(1, 10**6),
       "--lr": st.floats(1e-6, 1e6), "--seed": st.integers(0, 2**32 - 1),
       "--weight-decay": st.floats(0, 10), "--n-train": st.integers(10, 300),
       "--n-test": st.integers(10, 300), "--width": st.integers(1, 16),
       "--depth": st.integers(0, 2), "--max-rejected": st.integers(0, 5),
       "--keep-checkpoints": st.integers(0, 3)}


@st.composite
def _option_value(draw):
    opt = draw(st.sampled_from(sorted(_OK)))
    if opt in ("--width", "--depth", "--epochs"):  # large values would train for real
        bad = st.one_of(st.integers(-(2**70), 0).map(str), st.floats(allow_nan=True).map(repr),
                        st.text(alphabet="abe-.x ", max_size=4))
    else:
        bad = _BAD
    value = draw(st.one_of(_OK[opt].map(str), bad))
    return opt, value


def _one_option(tmp_path, option):
    opt, value = option
    out = tmp_path / f"run{abs(hash(option))}"
    base = ["--data", "digits", "--n-train", "100", "--n-test", "50", "--width", "4",
            "--epochs", "1", "--batch-size", "50", "--no-progress"]
    r = CliRunner().invoke(cli, ["train", *base, opt, value, "--out", str(out)])
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{opt} {value!r}: {type(r.exception).__name__}: {r.exception}")
    if r.exit_code == 0:
        assert (out / "summary.json").is_file()
        return
    line = _error_only(r, r.exit_code)
    if r.exit_code == 2:
        assert not out.exists(), f"{opt} {value!r} was refused but left {out}: {line}"
    else:  # a run that started and failed (e.g. diverged): its files are consistent
        assert "diverged" in line or "rejected" in line or "non-finite" in line \
            or "became" in line, line


_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=12, deadline=None, suppress_health_check=_HEALTH)
@given(option=_option_value())
def test_any_option_value_is_a_run_or_one_error_line(tmp_path, option):
    _one_option(tmp_path, option)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=_HEALTH)
@given(option=_option_value())
def test_any_option_value_is_a_run_or_one_error_line_many(tmp_path, option):
    _one_option(tmp_path, option)
