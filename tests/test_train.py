"""The training loop: exact resume, NaN guards, fallbacks, output files."""

from __future__ import annotations

import csv
import json

import pytest
import torch

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


def test_nan_loss_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_step = GradientSolver._step

    def step(self, x0, y):
        info = real_step(self, x0, y)
        if self.steps == 15:  # during epoch 2 (10 steps per epoch)
            info.loss = info.loss * float("nan")
        return info

    monkeypatch.setattr(GradientSolver, "_step", step)
    with pytest.raises(TrainingDiverged, match=r"NaN|nan") as e:
        train(_cfg(tmp_path))
    assert "epoch 2, step 6" in str(e.value) and "epoch_0001.pt" in str(e.value)
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
