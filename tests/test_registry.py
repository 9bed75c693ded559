"""The solver registry: one record per solver, checked options, and facts that are true.

Every list of solvers in the framework (``ocnet solvers``, the data-parallel refusal of
``ocnet train``, the solvers ``compare`` and the demo skip, the device tests' host lists) is
read from the records, so these tests check the records against the solvers themselves.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from devices import HostSyncError, no_host_sync
from torch import nn

from ocnet.bridge import place, to_problem
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import (
    COST_CLASSES,
    Solver,
    StepInfo,
    make_solver,
    register,
    solver_entry,
    solver_names,
    solver_records,
)
from ocnet.solvers import base as solver_base
from ocnet.solvers.gradient import GradientSolver
from ocnet.solvers.registry import valid_options


def _problem():  # noqa: ANN202
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    problem = place(to_problem(net, "cross_entropy", 1e-3), "cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return problem, x, y



class _Buggy(GradientSolver):
    """A solver whose constructor has a bug that raises TypeError."""

    def __init__(self, problem: Any, lr: float | None = None, *, width: int = 3) -> None:
        super().__init__(problem, "sgd", lr=lr)
        self.shape = len(width)  # TypeError: object of type 'int' has no len()


class _Recording:
    """A one-rank communicator that counts the reductions a solver asks for."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        return list(tensors)

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        return list(tensors)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast_(self, tensors: Any, src: int = 0) -> None:
        pass


# ----------------------------------------------------------------- registration and options


def test_registering_a_name_twice_is_an_error(temp_names):
    temp_names.append("_twice")
    register("_twice", lambda problem, lr=None: GradientSolver(problem, "sgd", lr=lr), "first",
             solver_class=GradientSolver)
    with pytest.raises(ConfigError, match=r"'_twice' is already registered .*unregister"):
        register("_twice", lambda problem, lr=None: None, "second", solver_class=GradientSolver)
    assert solver_entry("_twice").summary == "first"  # the first record is kept
    with pytest.raises(ConfigError, match="'adam' is already registered"):
        register("adam", lambda problem, lr=None: None, "again", solver_class=GradientSolver)


def test_unknown_option_is_refused_before_the_solver_is_built_and_lists_the_valid_ones():
    problem, _, _ = _problem()
    with pytest.raises(ConfigError, match=r"solver 'ddp' does not take these options: colour; "
                                          r"its valid options are: .*max_tries.*mu.*second_order"):
        make_solver("ddp", problem, colour="blue")
    with pytest.raises(ConfigError, match=r"'adam' does not take these options: momentum; .*"
                                          r"betas.*lr"):
        make_solver("adam", problem, momentum=0.9)  # SGD's option, not Adam's
    # the options of the base optimizer behind a gradient solver are options too
    assert "nesterov" in valid_options(solver_entry("momentum"))[0]
    assert isinstance(make_solver("momentum", problem, nesterov=True), GradientSolver)
    # the factory's own fixed argument is not an option
    assert "optimizer" not in valid_options(solver_entry("adam"))[0]


def test_a_type_error_inside_a_constructor_surfaces_as_itself(temp_names):
    temp_names.append("_buggy")
    register("_buggy", lambda problem, lr=None, **kw: _Buggy(problem, lr, **kw), "has a bug",
             solver_class=_Buggy)
    problem, _, _ = _problem()
    with pytest.raises(TypeError, match="has no len"):
        make_solver("_buggy", problem, width=4)
    with pytest.raises(ConfigError, match="valid options are: lr, width"):
        make_solver("_buggy", problem, depth=4)


def test_open_ended_options_are_passed_on():
    problem, _, _ = _problem()
    _, open_ended = valid_options(solver_entry("ipopt"))
    assert open_ended  # any IPOPT option
    solver = make_solver("ipopt", problem, mu_strategy="adaptive")
    assert solver.solver_options()["ipopt.mu_strategy"] == "adaptive"


def test_base_and_package_export_the_same_registry():
    assert solver_base.make_solver is make_solver and solver_base.register is register
    assert solver_base.solver_names() == solver_names()


# ----------------------------------------------------------------- the facts are true


def _lr_of(solver: Solver) -> float | None:
    """The learning rate a solver took (its lr/alpha or its torch.optim group's lr)."""
    for attr in ("lr", "alpha"):
        v = vars(solver).get(attr)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    if solver.optimizer is not None:
        return float(solver.optimizer.param_groups[0]["lr"])
    return None


@pytest.mark.parametrize("name", solver_names())
def test_every_record_matches_its_solver(name: str) -> None:
    record = solver_entry(name)
    problem, _, _ = _problem()
    solver = make_solver(name, problem)
    assert isinstance(solver, record.solver_class), "solver_class is what the factory builds"
    assert record.cost in COST_CLASSES and record.summary
    names, _ = valid_options(record)
    assert "lr" in names, "every solver takes lr (None: its default)"
    assert _lr_of(solver) == record.default_lr, "default_lr is the lr taken for lr=None"
    if record.lr_defaults is not None:
        key, table = record.lr_defaults
        for value, lr in table.items():
            other = make_solver(name, _problem()[0], **{key: value})
            assert _lr_of(other) == lr == record.lr({key: value}), (key, value)
    if record.max_controls is not None:  # the limit the constructor enforces, by default
        param = "max_controls" if record.limit_per == "problem" else "max_stage_controls"
        default = inspect.signature(record.solver_class).parameters[param].default
        assert default == record.max_controls


@pytest.mark.parametrize("name", solver_names())
def test_data_parallel_solvers_reduce_through_comm_and_the_others_do_not(name: str) -> None:
    record = solver_entry(name)
    if not record.on_device:
        pytest.skip("a host solve (IPOPT) on the whole problem: never data parallel")
    problem, x, y = _problem()
    solver = make_solver(name, problem)
    comm = solver.comm = _Recording()
    info = solver.step(x, y)
    assert isinstance(info, StepInfo)
    if record.data_parallel:
        assert comm.calls > 0, f"{name} is registered data_parallel but never reduces"
    else:
        assert comm.calls == 0, f"{name} reduces through comm but is not data_parallel"


@pytest.mark.parametrize("name", [r.name for r in solver_records() if r.host_sync
                                  and r.on_device])
def test_host_sync_solvers_really_read_the_host(name: str) -> None:
    problem, x, y = _problem()
    solver = make_solver(name, problem)
    solver.step(x, y)  # warm-up
    with pytest.raises(HostSyncError), no_host_sync("cpu", emulate_on_cpu=True):
        solver.step(x, y)


def test_train_refuses_a_solver_that_is_not_data_parallel_and_names_those_that_are(tmp_path):
    from ocnet.train import TrainConfig, _train_ranked

    config = TrainConfig(data="digits", model="mlp", solver="ddp", epochs=1, n_train=64,
                         n_test=32, width=4, depth=1, progress=False, plots=False)
    dp = [r.name for r in solver_records() if r.data_parallel]
    with pytest.raises(ConfigError, match="does not support data parallelism") as err:
        _train_ranked(config, None, _Recording())
    assert str(err.value).endswith("or use " + ", ".join(dp))
    assert "ddp," not in str(err.value) and {"adam", "ddpnopt", "emsa", "phb"} <= set(dp)
