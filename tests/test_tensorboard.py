"""TensorBoard streaming and run overlays (stand-alone pieces for `ocnet train
--tensorboard` and `ocnet plot RUN_DIR...`): the scalars of real solver steps reach an event
file that TensorBoard reads back; several runs are drawn in one figure with a legend from
their configurations."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch import nn

from ocnet import make_solver, to_problem
from ocnet.ocp import ConfigError
from ocnet.overlay import load_run, overlay_runs, run_labels
from ocnet.solvers import StepInfo
from ocnet.tensorboard import TensorBoardCallback, step_scalars

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install -e '.[tensorboard]'")


def _problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return to_problem(net, "cross_entropy"), x, torch.randint(0, 3, (16,), generator=g)


def test_step_scalars_flattens_the_solver_diagnostics():
    info = StepInfo(loss=torch.tensor(0.5), accepted=torch.tensor(True),
                    grad_norm=torch.tensor(2.0), seconds=0.01,
                    extra={"rho": 3.0, "htilde_before": torch.tensor([1.0, 2.0]),
                           "htilde_after": torch.tensor([1.5, 2.0]), "events": [{"step": 3}],
                           "nested": {"a": 1}, "name": "skipped", "none": None})
    s = step_scalars(info)
    assert s["loss"] == 0.5 and s["accepted"] == 1.0 and s["grad_norm"] == 2.0
    assert s["seconds"] == 0.01 and s["rho"] == 3.0
    assert s["htilde_gain/0"] == 0.5 and s["htilde_gain/1"] == 0.0 and s["htilde_gain/mean"] == 0.25
    assert s["events/count"] == 1.0 and s["nested/a"] == 1.0
    assert "name" not in s and "none" not in s


@pytest.mark.parametrize("solver,opts,keys", [
    ("emsa", {"rho": 2.0}, ["rho", "htilde_gain/mean", "control_change"]),
    ("ddpnopt", {"base": "adam"}, ["grad_norm"]),
    ("phb-goal", {}, ["energy", "friction", "phase"]),
])
def test_real_steps_reach_an_event_file_tensorboard_reads(tmp_path, solver, opts, keys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    problem, x, y = _problem()
    sol = make_solver(solver, problem, **opts)
    with TensorBoardCallback(tmp_path, hparams={"solver": solver}) as tb:
        for step in range(1, 4):
            tb.on_step(step, step_scalars(sol.step(x, y)))
        tb.on_epoch_end(1, {"epoch": 1, "test_loss": 0.9, "test_accuracy": 0.5, "seconds": 0.1})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ["loss", *keys]:
        assert f"step/{key}" in tags, (key, sorted(tags))
    assert {"epoch/test_loss", "epoch/test_accuracy", "epoch/seconds"} <= tags
    assert [e.step for e in acc.Scalars("step/loss")] == [1, 2, 3]
    assert acc.Scalars("epoch/test_accuracy")[0].value == pytest.approx(0.5)


def test_every_and_the_missing_extra(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="every"):
        TensorBoardCallback(tmp_path, every=0)
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install ocnet\[tensorboard\]"):
        TensorBoardCallback(tmp_path / "x")


def _fake_run(path, solver, lr, losses):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"data": "digits", "model": "mlp",
                                                  "solver": solver, "lr": lr, "seed": 0}))
    rows = ["epoch,train_loss,test_loss,test_accuracy,train_accuracy,seconds,steps"]
    rows += [f"{i + 1},{v},{v * 1.1},{0.5 + 0.1 * i},{0.6},{1.5},{10}"
             for i, v in enumerate(losses)]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return path


def test_overlay_draws_every_run_with_a_legend_from_the_configs(tmp_path):
    a = _fake_run(tmp_path / "a", "adam", 1e-3, [1.0, 0.5, 0.3])
    b = _fake_run(tmp_path / "b", "ddpnopt", 1e-3, [1.0, 0.4, 0.2])
    assert run_labels([load_run(a), load_run(b)]) == ["solver=adam", "solver=ddpnopt"]
    assert run_labels([load_run(a)]) == ["solver=adam lr=0.001 model=mlp data=digits"]
    out = overlay_runs([a, b], tmp_path / "fig" / "overlay.png")
    assert out.exists() and out.stat().st_size > 10_000
    with pytest.raises(ConfigError, match="no metrics.csv"):
        overlay_runs([tmp_path], tmp_path / "x.png")


def test_ocnet_train_tensorboard_and_ocnet_plot(tmp_path, monkeypatch):
    """The command line: ``train --tensorboard`` streams step and epoch scalars (read back
    with tensorboard's own event reader), ``plot`` overlays the runs."""
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ocnet.cli import cli

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for name, solver in (("a", "adam"), ("b", "ddpnopt")):
        res = runner.invoke(cli, ["train", "--data", "moons", "--solver", solver, "--epochs",
                                  "2", "--n-train", "64", "--n-test", "32", "--out", name,
                                  "--tensorboard", "--no-progress"])
        assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/grad_norm", "step/seconds", "step/cap_rate",
            "epoch/test_accuracy", "epoch/train_loss"} <= tags
    assert [e.step for e in acc.Scalars("epoch/test_loss")] == [1, 2]
    assert len(acc.Scalars("step/loss")) == 4  # 64 samples / 32 per batch x 2 epochs
    res = runner.invoke(cli, ["plot", "a", "b", "--out", "both.png"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "both.png").stat().st_size > 10_000
    res = runner.invoke(cli, ["train", "--data", "moons", "--tensorboard", "--epochs", "1",
                              "--out", str(tmp_path / "c"), "--n-train", "32", "--no-progress"])
    assert res.exit_code == 0, res.output
