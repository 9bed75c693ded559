"""The training loop: exact resume, NaN guards, fallbacks, output files."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ocnet import checkpoint as ckpt
from ocnet import data as ocdata
from ocnet import train as trainmod
from ocnet.bridge import to_problem
from ocnet.data import DataError
from ocnet.ocp.errors import CheckpointError, ConfigError
from ocnet.solvers import Solver, StepInfo
from ocnet.solvers.gradient import GradientSolver
from ocnet.solvers.loop import Callback, FitResult, TimeBudget, fit, minibatches
from ocnet.train import SUMMARY_KEYS, TrainConfig, TrainingDiverged, train


def _cfg(out=None, **kw) -> TrainConfig:
    base = dict(data="digits", model="mlp", solver="adam", epochs=4, batch_size=32,
                seed=3, width=16, n_train=300, n_test=100, progress=False, plots=False)
    base.update(kw)
    return TrainConfig(out=out, **base)


@pytest.mark.parametrize(
    "dtype,solver", [("float64", "adam"), ("float64", "momentum"),
                     ("float32", "adam"), ("float32", "momentum")])
def test_resume_is_exact(tmp_path, dtype, solver):
    straight = train(_cfg(tmp_path / "a", dtype=dtype, solver=solver))
    half = train(_cfg(tmp_path / "b", dtype=dtype, solver=solver, epochs=2))
    assert half["epochs"] == 2
    resumed = train(_cfg(None, dtype=dtype, solver=solver), resume=tmp_path / "b")
    assert resumed["epochs"] == 4 and resumed["steps"] == straight["steps"] == 40
    assert resumed["resumed_from"].endswith("epoch_0002.pt")
    assert abs(resumed["final_train_loss"] - straight["final_train_loss"]) <= 1e-6
    # In fact the whole run is the same, bit for bit, on one machine:
    for ra, rb in zip(straight["history"], resumed["history"], strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["test_loss"] == rb["test_loss"]
    pa = straight["problem"].parameters()
    pb = resumed["problem"].parameters()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
    # ... and a resumed run without its uninterrupted twin would differ (the test can fail):
    other = train(_cfg(None, dtype=dtype, solver=solver, seed=4))
    assert abs(other["final_train_loss"] - straight["final_train_loss"]) > 1e-4
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_outputs_and_summary_contract(tmp_path):
    s = train(_cfg(tmp_path, epochs=2, keep_checkpoints=1, plots=True))
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 20 and summary["epochs"] == 2
    assert summary["final_train_loss"] == pytest.approx(s["history"][-1]["train_loss"])
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds_per_step"] > 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert list(rows[0]) == list(trainmod.METRIC_COLUMNS) and len(rows) == 2
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 16
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["epoch_0002.pt"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # Same directory again: refused unless overwrite, which replaces the run.
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(tmp_path, epochs=1))
    train(_cfg(tmp_path, epochs=1, overwrite=True))
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["epoch_0001.pt"]


def test_two_d_pictures(tmp_path):
    train(_cfg(tmp_path, data="spirals", model="resnet", width=None, n_train=200,
               n_test=100, epochs=1, plots=True))
    for name in ("loss.png", "decision_boundary.png", "trajectories.png"):
        assert (tmp_path / name).stat().st_size > 5000, name


def test_nan_in_data_is_refused_before_training(monkeypatch):
    real_load = ocdata.load

    def load_with_nan(*a, **k):
        ds = real_load(*a, **k)
        ds.x_train[7, 3] = float("nan")
        return ds

    monkeypatch.setattr(trainmod, "load", load_with_nan)
    monkeypatch.setattr(trainmod, "make_solver",
                        lambda *a, **k: pytest.fail("a solver was built for NaN data"))
    with pytest.raises(DataError, match=r"inputs is not finite: 1 NaN .*first bad row index 7"):
        train(_cfg())


@pytest.mark.parametrize("guard", [True, False])
def test_nan_loss_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch, guard):
    """Guard off: the first NaN loss of an accepted step stops the run. Guard on (the
    default): the NaN steps are undone and the run stops after max_rejected=3 of them in a
    row, naming the first; either way the last good checkpoint is named and kept."""
    real_step = GradientSolver._step
    calls = {"n": 0}

    def step(self, x0, y):
        calls["n"] += 1
        if calls["n"] >= 16 and guard:  # from step 6 of epoch 2 on: a NaN batch, undone
            return real_step(self, x0 * float("nan"), y)
        info = real_step(self, x0, y)
        if calls["n"] >= 16:  # no guard: a NaN loss reported for an accepted step
            info.loss = info.loss * float("nan")
        return info

    monkeypatch.setattr(GradientSolver, "_step", step)
    opts = {"guard": guard, "check_inputs": False}
    with pytest.raises(TrainingDiverged, match=r"NaN|nan|not finite") as e:
        train(_cfg(tmp_path, solver_options=opts))
    assert "epoch 2, step 6" in str(e.value) and "epoch_0001.pt" in str(e.value)
    if guard:
        assert "3 consecutive steps of solver 'adam' were rejected" in str(e.value)
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["epoch_0001.pt"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["epoch"] == 1
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 1


def test_resume_falls_back_past_a_corrupted_checkpoint(tmp_path):
    straight = train(_cfg(None, epochs=3))
    train(_cfg(tmp_path, epochs=3))
    newest = ckpt.latest_checkpoint(tmp_path)
    assert newest.name == "epoch_0003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=r"epoch_0003\.pt is truncated or corrupted.*"
                                            r"falling back to the previous checkpoint "
                                            r"epoch_0002\.pt"):
        resumed = train(_cfg(tmp_path, epochs=3), resume=tmp_path)
    assert resumed["resumed_from"].endswith("epoch_0002.pt")
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["epoch"] == 3  # rewritten


def test_resume_refuses_another_configuration(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(CheckpointError, match=r"width: checkpoint 16 vs now 32.*seed|seed.*width"):
        train(_cfg(tmp_path, epochs=2, width=32, seed=5), resume=tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        train(_cfg(tmp_path / "nothing", epochs=2), resume=tmp_path / "nothing")
    with pytest.warns(RuntimeWarning, match="lr: checkpoint None vs now 0.01"):
        train(_cfg(tmp_path, epochs=2, lr=0.01), resume=tmp_path)


@pytest.mark.parametrize("field,value,pattern", [
    ("solver", "nope", "valid solvers are: .*adam.*sgd"),
    ("model", "transformer", "valid models are: cnn, mlp, resnet"),
    ("data", "imagenet", "valid names are: .*digits.*spirals"),
    ("dtype", "float16", "valid dtypes are: float32, float64"),
    ("epochs", 0, "epochs must be a positive int"),
])
def test_bad_config_names_the_valid_choices(field, value, pattern):
    with pytest.raises((ConfigError, DataError), match=pattern):
        train(_cfg(**{field: value}))


def test_time_budget_stops_between_steps(tmp_path):
    s = train(_cfg(tmp_path, max_seconds=1e-9))
    assert s["stopped"] == "time budget" and s["steps"] == 1 and s["epochs"] == 1
    assert s["history"][0]["steps"] == 1
    assert ckpt.find_checkpoints(tmp_path) == []  # a partial epoch is not checkpointed
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == "time budget"


# --------------------------------------------------------------------------- the loop (fit)


class _Alternating(Solver):
    """Accepts every other step (accepted as a tensor, as DDP reports it); loss = step."""

    name = "alternating"

    def _step(self, x0, y):
        return StepInfo(loss=torch.tensor(float(self.steps)),
                        accepted=torch.tensor(self.steps % 2 == 0))


class _Log(Callback):
    def __init__(self, log, tag, stop_at=None):
        self.log, self.tag, self.stop_at = log, tag, stop_at

    def on_fit_start(self, solver):
        self.log.append((self.tag, "fit_start"))

    def on_epoch_start(self, epoch):
        self.log.append((self.tag, "epoch_start", epoch))

    def on_step(self, event):
        self.log.append((self.tag, "step", event.epoch, event.step_in_epoch, event.loss,
                         event.accepted))

    def should_stop(self, event):
        self.log.append((self.tag, "should_stop", event.step))
        return "enough" if event.step == self.stop_at else None

    def on_epoch_end(self, end):
        self.log.append((self.tag, "epoch_end", end.epoch, end.steps, end.rejected, end.stopped))

    def on_fit_end(self, result):
        self.log.append((self.tag, "fit_end", result.steps, result.stopped))


def _tiny_problem():
    torch.manual_seed(0)
    return to_problem(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cross_entropy")


def test_fit_calls_the_callbacks_in_order_and_counts_rejected_steps():
    log = []
    solver = _Alternating(_tiny_problem())
    x, y = torch.zeros(6, 2), torch.zeros(6, dtype=torch.long)
    result = fit(solver, lambda e: minibatches(x, y, 3, shuffle=False), epochs=2,
                 callbacks=[_Log(log, "a"), _Log(log, "b")])
    assert result == FitResult(epochs=2, steps=4, rejected=2, step_seconds=result.step_seconds,
                               stopped=None, last_loss=3.0)
    assert log[:5] == [("a", "fit_start"), ("b", "fit_start"), ("a", "epoch_start", 1),
                       ("b", "epoch_start", 1), ("a", "step", 1, 1, 0.0, True)]
    assert log[5:8] == [("b", "step", 1, 1, 0.0, True), ("a", "should_stop", 1),
                        ("b", "should_stop", 1)]
    assert ("a", "step", 1, 2, 1.0, False) in log  # the second step is rejected, and counted
    assert log[-4:] == [("a", "epoch_end", 2, 2, 1, None), ("b", "epoch_end", 2, 2, 1, None),
                        ("a", "fit_end", 4, None), ("b", "fit_end", 4, None)]


def test_fit_stops_when_a_callback_says_so_and_the_time_budget_runs_out():
    x, y = torch.zeros(6, 2), torch.zeros(6, dtype=torch.long)
    log = []
    result = fit(_Alternating(_tiny_problem()), [(x, y)] * 3, epochs=5,
                 callbacks=[_Log(log, "a", stop_at=4), _Log(log, "b")])
    assert result.stopped == "enough" and result.steps == 4 and result.epochs == 2
    assert ("b", "should_stop", 4) in log  # every callback is asked at every step
    assert ("a", "epoch_end", 2, 1, 1, "enough") in log  # the cut epoch still ends
    budget = fit(_Alternating(_tiny_problem()), [(x, y)] * 3, epochs=1000,
                 callbacks=[TimeBudget(0.05)])
    assert budget.stopped == "time budget" and 0 < budget.steps < 3000
    with pytest.raises(ConfigError, match="subclass Callback"):
        fit(_Alternating(_tiny_problem()), [(x, y)], epochs=1, callbacks=[object()])


def test_minibatches_cover_every_sample_once_and_allow_no_targets():
    x = torch.arange(10.0)[:, None]
    g = torch.Generator().manual_seed(0)
    got = torch.cat([xb for xb, yb in minibatches(x, None, 4, generator=g) if yb is None])
    assert sorted(got[:, 0].tolist()) == list(range(10))
    with pytest.raises(DataError, match="batch_size must be a positive int"):
        minibatches(x, None, 0)


# ----------------------------------------------------------------------------- issue 16


def test_an_epoch_that_evaluates_to_nan_is_never_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
    real_evaluate = trainmod.evaluate
    calls = {"n": 0}

    def evaluate(problem, x, y, chunk=4096):
        calls["n"] += 1
        loss, acc = real_evaluate(problem, x, y, chunk)
        return (loss * float("nan"), acc) if calls["n"] == 3 else (loss, acc)  # epoch 2 test

    monkeypatch.setattr(trainmod, "evaluate", evaluate)
    with pytest.raises(TrainingDiverged, match=r"after epoch 2 the network evaluates to a "
                                               r"non-finite loss .*not checkpointed.*"
                                               r"epoch_0001\.pt"):
        train(_cfg(tmp_path))
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["epoch_0001.pt"]


def test_one_step_epochs_with_a_diverging_lr_stop_with_finite_checkpoints(tmp_path):
    """Either the guard rejects the steps (3 in a row stop the run) or, when the update is
    finite but the network no longer evaluates finitely, the epoch is refused; no
    checkpoint ever holds such weights."""
    cfg = _cfg(tmp_path, solver="sgd", lr=1e38, batch_size=10**6, epochs=5)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps of solver 'sgd' were "
                                               r"rejected .*epoch 1, step 1 of the epoch|"
                                               r"after epoch 1 the network evaluates to a "
                                               r"non-finite loss .*not checkpointed"):
        train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) in (1, 3)
    for p in ckpt.find_checkpoints(tmp_path):
        st = ckpt.load_checkpoint(p)
        assert all(bool(torch.isfinite(v).all()) for v in st["model"].values())


def test_metrics_csv_is_replaced_atomically_every_epoch(tmp_path, monkeypatch):
    writes = []
    real = ckpt.atomic_write

    def spy(path, data):
        writes.append((ckpt.Path(path).name, data))
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", spy)
    monkeypatch.setattr(trainmod.ckpt, "atomic_write", spy)
    import ocnet.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "atomic_write", spy)
    s = train(_cfg(tmp_path, epochs=2))
    names = [n for n, _ in writes]
    assert names.count("metrics.csv") == 3  # the header at the start, then every epoch
    assert {"config.json", "summary.json", "epoch_0001.pt", "epoch_0002.pt",
            ".ocnet.owner"} <= set(names)
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))
    assert not (tmp_path / ".ocnet.owner").exists()
    assert s["rejected_steps"] == 0


@pytest.mark.parametrize("field,value,pattern", [
    ("seed", 2**32, r"seed must be an int from 0 to 4294967295"),
    ("weight_decay", float("inf"), r"weight_decay must be a finite number"),
    ("max_rejected", -1, r"max_rejected must be an int >= 0"),
    ("lr", "abc", r"lr must be a positive finite number"),
])
def test_config_refuses_bad_numbers_with_the_fix(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _cfg(**{field: value}).validate()


def test_a_run_directory_is_locked_for_the_whole_run(tmp_path):
    from ocnet.train import RunDirectoryBusy, RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another ocnet run \(PID "
                                                   rf"{os.getpid()}"):
            train(_cfg(tmp_path, epochs=1))
        with pytest.raises(RunDirectoryBusy):
            RunLock(tmp_path).acquire()  # not re-entrant, even in one process
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ocnet.lock"]  # nothing written
    train(_cfg(tmp_path, epochs=1))  # released: the run goes ahead


# Property: the contents of a checkpoint with a valid envelope are checked; whatever they
# hold, resuming from them is a CheckpointError (or works), never another exception.
_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(),
                  st.text(max_size=5), st.lists(st.integers(), max_size=2))


_TINY = to_problem(torch.nn.Sequential(torch.nn.Linear(3, 2)), "cross_entropy")


@st.composite
def _states(draw):
    good = {"epoch": 1, "model": dict(_TINY.module.state_dict()),
            "solver": {"steps": 3}, "generator": torch.Generator().get_state(),
            "metrics": [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.6}],
            "step_seconds": 0.1, "torch_rng": torch.get_rng_state()}
    tensors = st.builds(lambda shape, v: torch.full(shape, v),
                        st.lists(st.integers(0, 3), max_size=2).map(tuple),
                        st.floats(allow_nan=True, allow_infinity=True, width=32))
    choices = {
        "epoch": st.one_of(_junk, st.just("six")),
        "model": st.one_of(_junk, st.dictionaries(st.sampled_from(["0.weight", "0.bias", "x"]),
                                                   st.one_of(tensors, _junk), max_size=3)),
        "solver": st.one_of(_junk, st.fixed_dictionaries({"steps": _junk}),
                            st.fixed_dictionaries({"optimizer": _junk})),
        "generator": st.one_of(_junk, tensors, st.just(torch.zeros(5, dtype=torch.uint8))),
        "metrics": st.one_of(_junk, st.lists(st.one_of(_junk, st.fixed_dictionaries(
            {"train_loss": st.one_of(st.floats(), _junk)})), max_size=2)),
        "step_seconds": _junk,
        "torch_rng": st.one_of(_junk, tensors),
    }
    state = dict(good)
    for key in draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=3,
                             unique=True)):
        if draw(st.booleans()):
            state[key] = draw(choices[key])
        else:
            state.pop(key)
    return state


@settings(max_examples=50, deadline=None)
@given(state=_states())
def test_any_checkpoint_content_is_resumed_or_a_checkpoint_error(state):
    from ocnet.solvers import make_solver

    problem = to_problem(torch.nn.Sequential(torch.nn.Linear(3, 2)), "cross_entropy")
    solver = make_solver("sgd", problem)
    rng = torch.get_rng_state()
    try:
        trainmod._apply_state(state, ckpt.Path("epoch_0001.pt"), problem.module, solver,
                              torch.Generator())
    except CheckpointError as err:
        assert "epoch_0001.pt" in str(err) and "\n" not in str(err)
    finally:
        torch.set_rng_state(rng)
