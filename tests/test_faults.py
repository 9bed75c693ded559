"""Fault injection: bad batches for every solver, kill -9 of real training processes at
random moments (inside the checkpoint and metrics writes too) followed by --resume, and two
runs on one --out (issue 16).

The processes are real ``ocnet train`` processes (``ocnet.cli.main``) forked from a
forkserver that imported ocnet once, so a run takes about a second instead of the ten an
interpreter start costs on a busy machine; one test starts a genuine ``python -m ocnet``
subprocess as well. ``OCNET_FAULT=NAME:N:PHASE`` (see ``ocnet.checkpoint``) makes a
process SIGKILL itself inside its N-th write of NAME; ``OCNET_FAULT_SLEEP`` makes it pause
there instead, so a test can hold a run inside a write. The 20-point version of the kill
test is marked ``slow``.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ocnet import checkpoint as ckpt
from ocnet.bridge import to_problem
from ocnet.ocp.errors import DataError
from ocnet.solvers import make_solver, solver_entry, solver_names
from ocnet.solvers.loop import TrainingDiverged, fit

# ----------------------------------------------------------------------------- bad batches


def _problem() -> object:
    torch.manual_seed(0)
    return to_problem(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
                      "cross_entropy")


def _batches(bad: str | None, at: int = 3, n: int = 4) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(1, n + 1):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        if k == at and bad == "empty":
            x, y = x[:0], y[:0]
        elif k == at and bad is not None:
            x[5, 2] = float(bad)
        out.append((x, y))
    return out


def _controls(problem) -> list[torch.Tensor]:
    return [u.detach().clone() for u in problem.parameters()]


@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
@pytest.mark.parametrize("solver", solver_names())
def test_a_bad_batch_at_step_3_is_a_clear_error_and_changes_nothing(solver, bad):
    """Checks on (the default): the bad batch raises DataError naming it (or, where the
    solver's own acceptance test refused the step first and nothing non-finite reached the
    controls -- DDP's line search on an inf input that tanh saturates -- the step is
    rejected), the controls are those before the step, and training goes on."""
    problem = _problem()
    s = make_solver(solver, problem)
    batches = _batches(bad)
    for x, y in batches[:2]:
        s.step(x, y)
    before = _controls(problem)
    try:
        info = s.step(*batches[2])
    except DataError as err:
        assert re.search(r"non-finite|empty", str(err)), err
    else:
        assert bad != "empty" and not bool(info.accepted), f"{solver} accepted a {bad} batch"
    after = _controls(problem)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    info = s.step(*batches[3])
    assert torch.isfinite(info.loss)


@pytest.mark.parametrize("bad", ["nan", pytest.param("inf", marks=pytest.mark.slow)])
@pytest.mark.parametrize("solver", solver_names())
def test_with_checks_off_the_guard_rejects_a_bad_batch(solver, bad):
    """check_inputs=False (benchmarking): the step on the bad batch is rejected and the
    weights stay finite; a good batch afterwards trains again."""
    problem = _problem()
    s = make_solver(solver, problem, check_inputs=False)
    assert s.check_inputs is False
    batches = _batches(bad)
    for x, y in batches[:2]:
        s.step(x, y)
    info = s.step(*batches[2])
    assert not bool(info.accepted), f"{solver} accepted a step on a {bad} batch"
    assert all(bool(torch.isfinite(u).all()) for u in problem.parameters())
    info = s.step(*batches[3])
    assert torch.isfinite(info.loss)
    assert all(bool(torch.isfinite(u).all()) for u in problem.parameters())


def test_fit_stops_after_max_rejected_naming_the_first_bad_batch():
    problem = _problem()
    s = make_solver("adam", problem, check_inputs=False)
    batches = _batches(None, n=6)
    for k in (2, 3, 4):  # steps 3, 4, 5 hold NaN
        batches[k][0][k, 1] = float("nan")
    with pytest.raises(TrainingDiverged) as e:
        fit(s, batches, epochs=2, max_rejected=3)
    msg = str(e.value)
    assert "3 consecutive steps of solver 'adam' were rejected (max_rejected=3)" in msg
    assert "epoch 1, step 3 of the epoch" in msg
    assert "NaN/inf in 1 of its 8 samples (indices within the batch: 2)" in msg
    assert "\n" not in msg
    # two rejected in a row is allowed; an accepted step resets the count
    batches[4] = _batches(None, n=6)[4]
    result = fit(make_solver("adam", _problem(), check_inputs=False), batches, epochs=2,
                 max_rejected=3)
    assert result.rejected == 4 and result.steps == 12


def test_fit_names_epoch_and_step_of_a_batch_the_checks_refuse():
    s = make_solver("sgd", _problem())
    with pytest.raises(DataError, match=r"^epoch 2, step 3 of the epoch \(step 7 of this fit\)"
                                        r": the batch holds non-finite values"):
        fit(s, lambda e: _batches("nan" if e == 2 else None), epochs=2)


def test_make_solver_takes_the_base_options_for_every_solver():
    for name in solver_names():
        s = make_solver(name, _problem(), check_inputs=False, guard="host")
        assert (s.check_inputs, s.guard) == (False, "host")
    with pytest.raises(Exception, match=r"valid options are: .*\(and check_inputs, guard"):
        make_solver("adam", _problem(), nonsense=1)
    with pytest.raises(Exception, match=r"guard must be one of"):
        make_solver("adam", _problem(), guard="sometimes")
    assert solver_entry("adam")  # the registry itself is unchanged


# ----------------------------------------------------------------------------- processes

ARGS = ["--data", "digits", "--n-train", "120", "--n-test", "60", "--width", "8",
        "--batch-size", "40", "--epochs", "3", "--no-progress", "--threads", "1"]
_CTX = None


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        # everything a run imports, once: the children start warm
        _CTX.set_forkserver_preload(["ocnet.cli", "ocnet.train", "ocnet.plots",
                                     "matplotlib.pyplot", "sklearn.datasets",
                                     "sklearn.model_selection", "filelock"])
    return _CTX


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key in ("OCNET_FAULT", "OCNET_FAULT_SLEEP"):
        os.environ.pop(key, None)
    os.environ.update(env)
    from ocnet import _atomic

    _atomic._FAULT_COUNTS.clear()
    from ocnet.cli import main

    main(["train", *argv])


def _start(argv: list[str], log: Path, **env: str):
    p = _ctx().Process(target=_child, args=(argv, env, str(log)))
    p.start()
    return p


def _run(argv: list[str], log: Path, timeout: float = 300, **env: str) -> int:
    p = _start(argv, log, **env)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"ocnet train {argv} did not finish in {timeout}s; log: {log.read_text()}")
    return p.exitcode


def _epochs(out: Path) -> list[int]:
    with open(out / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _final(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["final_train_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> float:
    """The uninterrupted run's final_train_loss (a float subclass carrying the run's wall
    seconds, from which the random kill moments are drawn)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(["--help"], out.parent / "warm")  # start the forkserver before timing
    t0 = time.perf_counter()
    assert _run(ARGS + ["--out", str(out)], out.parent / "log") == 0
    ref = _Reference(_final(out))
    ref.seconds = time.perf_counter() - t0
    assert _epochs(out) == [1, 2, 3]
    return ref


class _Reference(float):
    seconds: float = 1.0


def _kill_then_resume(tmp: Path, point: str | float, reference: float) -> str:
    """One kill -9 point (a fault spec, or seconds after the start), then resume (or start
    again if the run died before its first checkpoint) until it finishes; the result must
    equal the uninterrupted run. Returns what happened, for the report."""
    out, log = tmp / "run", tmp / "log"
    if isinstance(point, str):
        rc = _run(ARGS + ["--out", str(out)], log, OCNET_FAULT=point)
    else:
        for _ in range(5):  # a run faster than the draw finishes first: kill it earlier
            p = _start(ARGS + ["--out", str(out)], log)
            time.sleep(point)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(60)
            rc = p.exitcode
            if rc == -signal.SIGKILL:
                break
            shutil.rmtree(out)
            point *= 0.6
    killed = rc == -signal.SIGKILL
    has_ckpt = bool(ckpt.find_checkpoints(out))
    stale_owner = (out / ".ocnet.owner").exists()  # the killed run held the lock
    resume = ["--resume", str(out)] if has_ckpt else ["--out", str(out)]
    assert _run(ARGS + resume, log) == 0, log.read_text()
    assert _epochs(out) == [1, 2, 3], log.read_text()
    assert _final(out) == reference
    left = sorted(p.name for d in (out, out / "checkpoints") for p in d.iterdir()
                  if ".tmp" in p.name)
    assert not left, f"temporary files left: {left}"
    assert not (out / ".ocnet.owner").exists()
    if stale_owner:
        assert "taking over the run directory from PID" in log.read_text()
    at = "" if isinstance(point, str) else f"killed at {point:.2f}s, "
    return f"{at}killed={killed} resumed={has_ckpt} stale lock taken over={stale_owner}"


#: kill points inside the writes: (file, n-th write of it, phase)
WRITE_POINTS = [
    "metrics.csv:2:mid",        # epoch 1's row, the temporary file half written
    "epoch_*.pt:2:synced",      # epoch 2's checkpoint complete but not yet moved
    "epoch_*.pt:1:mid",         # the first checkpoint half written
    "metrics.csv:3:synced",
    "metrics.csv:4:after",      # after the last row: before the last checkpoint
    "epoch_*.pt:3:before",
    "summary.json:1:mid",       # all checkpoints written, the summary half written
    "config.json:1:synced",     # before anything but the lock exists
]


@pytest.mark.parametrize("point", ["metrics.csv:2:mid", "epoch_*.pt:2:synced", "random"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, reference, point):
    if point == "random":  # a moment inside the run
        point = random.Random(16).uniform(0.1, 0.9) * reference.seconds
    assert "killed=True" in _kill_then_resume(tmp_path, point, reference)


@pytest.mark.slow
def test_twenty_kill_9_points_then_resume(tmp_path, reference):
    rng = random.Random(2016)
    points: list[str | float] = WRITE_POINTS + [rng.uniform(0.02, 0.95) * reference.seconds
                                                for _ in range(12)]
    report = []
    for i, point in enumerate(points):
        d = tmp_path / f"p{i:02d}"
        d.mkdir()
        what = point if isinstance(point, str) else f"SIGKILL drawn at {point:.2f}s"
        report.append(f"{what}: {_kill_then_resume(d, point, reference)}")
        assert "killed=True" in report[-1]
    print(f"\nuninterrupted run {reference.seconds:.2f}s, final_train_loss {float(reference)!r}")
    print("\n".join(report))


def test_two_concurrent_runs_on_one_out(tmp_path, reference):
    """A holds --out (paused inside its config.json write); B is refused naming A's PID;
    A then finishes as if alone. The same for two concurrent --resume."""
    out = tmp_path / "run"
    a = _start(ARGS + ["--out", str(out)], tmp_path / "a.log",
               OCNET_FAULT="config.json:1:after", OCNET_FAULT_SLEEP="2")
    deadline = time.time() + 60
    while not (out / ".ocnet.owner").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert _run(ARGS + ["--out", str(out)], tmp_path / "b.log") == 1
    b_err = (tmp_path / "b.log").read_text()
    assert f"is in use by another ocnet run (PID {a.pid}" in b_err
    assert "Traceback" not in b_err and len(b_err.strip().splitlines()) == 1
    a.join(120)
    assert a.exitcode == 0, (tmp_path / "a.log").read_text()
    assert _epochs(out) == [1, 2, 3] and _final(out) == reference

    # two --resume at once (of a run stopped after epoch 1)
    run2 = tmp_path / "run2"
    rc = _run(ARGS + ["--out", str(run2)], tmp_path / "c.log", OCNET_FAULT="epoch_*.pt:2:before")
    assert rc == -signal.SIGKILL
    c = _start(ARGS + ["--resume", str(run2)], tmp_path / "c2.log",
               OCNET_FAULT="metrics.csv:1:after", OCNET_FAULT_SLEEP="2")
    deadline = time.time() + 60
    while not (run2 / ".ocnet.owner").exists() or json.loads(
            (run2 / ".ocnet.owner").read_text())["pid"] != c.pid:
        assert time.time() < deadline
        time.sleep(0.05)
    assert _run(ARGS + ["--resume", str(run2)], tmp_path / "d.log") == 1
    assert f"PID {c.pid}" in (tmp_path / "d.log").read_text()
    c.join(120)
    assert c.exitcode == 0
    assert _epochs(run2) == [1, 2, 3] and _final(run2) == reference


@pytest.mark.slow
def test_a_real_subprocess_killed_inside_the_checkpoint_write(tmp_path, reference):
    """A genuine ``python -m ocnet train`` (not forked) killed by SIGKILL inside its
    second checkpoint write; the resumed run equals the uninterrupted one."""
    out = tmp_path / "run"
    env = {**os.environ, "OCNET_FAULT": "epoch_*.pt:2:mid"}
    p = subprocess.run([sys.executable, "-m", "ocnet", "train", *ARGS, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [c.name for c in ckpt.find_checkpoints(out)] == ["epoch_0001.pt"]
    assert any(".tmp-" in c.name for c in (out / "checkpoints").iterdir())  # the torn write
    assert _run(ARGS + ["--resume", str(out)], tmp_path / "log") == 0
    assert _epochs(out) == [1, 2, 3] and _final(out) == reference
    assert not any(".tmp" in c.name for c in (out / "checkpoints").iterdir())
    shutil.rmtree(out)
