"""The gradient baseline: GradientSolver equals torch.optim + loss.backward() step by step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from devices import no_host_sync
from torch import Tensor, nn

from ocnet.bridge import place, to_problem
from ocnet.dynamics import Dense
from ocnet.ocp import ConfigError, FunctionStage, Problem
from ocnet.solvers import (
    DEFAULT_LR,
    OPTIMIZERS,
    GradientSolver,
    Solver,
    StepInfo,
    make_solver,
    solver_names,
)

DT = torch.float64
STEPS = 10

# optimizer name -> (GradientSolver options, the plain torch.optim optimizer on a copy)
REFERENCE = {
    "sgd": ({"lr": 0.2}, lambda ps: torch.optim.SGD(ps, lr=0.2)),
    "momentum": ({"lr": 0.1}, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "nesterov": ({"lr": 0.1, "momentum": 0.5, "nesterov": True},
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, nesterov=True)),
    "rmsprop": ({"lr": 1e-2}, lambda ps: torch.optim.RMSprop(ps, lr=1e-2)),
    "adam": ({"lr": 1e-2, "betas": (0.8, 0.95)},
             lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95))),
}


def _module(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).to(device, DT)


def _batches(device: str, n: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 4, generator=g, dtype=DT).to(device),
             torch.randint(0, 3, (12,), generator=g).to(device)) for _ in range(n)]


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max() / q.detach().abs().max())
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _solver(module: nn.Module, name: str, wd: float = 0.0) -> GradientSolver:
    kind = "momentum" if name == "nesterov" else name
    return GradientSolver(to_problem(module, "cross_entropy", weight_decay=wd), kind,
                          **REFERENCE[name][0])


@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_updates_equal_torch_optim(name, wd, device, record_error):
    ours = _module(device)
    theirs = copy.deepcopy(ours)
    solver = _solver(ours, name, wd)
    # weight decay as a running cost of the problem == torch.optim's weight_decay (L2 in g)
    opt = REFERENCE[name][1](theirs.parameters())
    for group in opt.param_groups:
        group["weight_decay"] = wd
    worst = 0.0
    for x, y in _batches(device):
        info = solver.step(x, y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(theirs(x), y)
        loss.backward()
        with torch.no_grad():  # StepInfo.loss is J where the step started, with its wd cost
            start = loss + 0.5 * wd * sum((p * p).sum() for p in theirs.parameters())
        opt.step()
        assert info.loss.dim() == 0
        assert torch.allclose(info.loss, start, rtol=1e-12, atol=0)
        worst = max(worst, _max_rel_diff(ours, theirs))
        assert worst < 1e-12, (name, worst)
    record_error(f"GradientSolver {name} (wd={wd:g}) vs torch.optim, 10 steps", worst)
    assert solver.steps == STEPS
    # the training actually moved the parameters
    assert _max_rel_diff(ours, _module(device)) > 1e-3


@pytest.mark.parametrize("name", ["momentum", "rmsprop", "adam"])
def test_state_dict_round_trip_continues_identically(name, device):
    batches = _batches(device, 10)
    module = _module(device)
    solver = _solver(module, name)
    for x, y in batches[:5]:
        solver.step(x, y)
    # a checkpoint as the training loop writes it, read back with weights_only=True
    buf = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "model": module.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for x, y in batches[5:]:
        solver.step(x, y)

    resumed = _module(device)
    resumed.load_state_dict(ckpt["model"])
    solver2 = _solver(resumed, name)
    solver2.load_state_dict(ckpt["solver"])
    assert solver2.steps == 5
    for x, y in batches[5:]:
        solver2.step(x, y)
    assert solver2.steps == 10
    for p, q in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)

    # without the optimizer state the continuation differs (the test can fail)
    fresh = _module(device)
    fresh.load_state_dict(ckpt["model"])
    solver3 = _solver(fresh, name)
    for x, y in batches[5:]:
        solver3.step(x, y)
    assert not all(torch.equal(p, q) for p, q in zip(module.parameters(), fresh.parameters(),
                                                     strict=True))


def test_step_info_fields_are_tensors_on_the_device(device):
    module = _module(device)
    problem = to_problem(module, "cross_entropy")
    x, y = _batches(device, 1)[0]
    J, grads, _ = problem.value_and_gradients(x, y)  # noqa: N806
    norm = torch.cat([g.reshape(-1) for gs in grads for g in gs]).norm()
    solver = make_solver("sgd", problem, lr=0.1)
    info = solver.step(x, y)
    assert isinstance(info, StepInfo)
    for t in (info.loss, info.grad_norm):
        assert isinstance(t, Tensor) and t.dim() == 0 and t.device.type == device
        assert t.dtype == DT and not t.requires_grad
    assert torch.equal(info.loss, J)
    assert torch.allclose(info.grad_norm, norm, rtol=1e-14, atol=0)
    assert info.accepted is True or bool(info.accepted)
    assert isinstance(info.seconds, float) and info.seconds > 0
    assert solver.steps == 1 and "steps=1" in repr(solver)


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam"])
def test_gradient_step_does_not_sync_with_the_host(name, device):
    """On CUDA a host sync raises; on the CPU the syncing tensor methods are made to raise.

    The base optimizers keep their step count on the device (Adam's bias corrections need no
    host read), so Adam is checked on the CPU too. The finiteness guard runs its device path
    (on a CPU problem it would read its flag where it lies, which costs nothing there).
    """
    solver = _solver(_module(device), name)
    solver.guard, solver.check_inputs = "device", False
    x, y = _batches(device, 1)[0]
    solver.step(x, y)  # warm up (lazy optimizer state)
    with no_host_sync(device, emulate_on_cpu=True):
        info = solver.step(x, y)
    assert float(info.loss) > 0  # reading is fine after the step


def test_registry_and_errors():
    assert set(solver_names()) >= {"sgd", "momentum", "rmsprop", "adam"}
    assert set(OPTIMIZERS) == {"sgd", "momentum", "rmsprop", "adam"}
    module = _module("cpu")
    problem = to_problem(module, "cross_entropy")
    for name in ("sgd", "momentum", "rmsprop", "adam"):
        solver = make_solver(name, problem)
        assert isinstance(solver, Solver) and solver.lr == DEFAULT_LR[name]
        assert solver.name == name
    assert make_solver("momentum", problem).curvature.hyperparameters()["momentum"] == 0.9
    assert make_solver("adam", problem, lr=0.01, betas=(0.8, 0.9)).curvature.betas \
        == (0.8, 0.9)
    with pytest.raises(ConfigError, match="valid solvers are: .*adam.*momentum.*rmsprop.*sgd"):
        make_solver("lbfgs-ish", problem)
    with pytest.raises(ConfigError, match="solver 'adam' does not take these options.*colour"):
        make_solver("adam", problem, colour="blue")
    with pytest.raises(ConfigError, match="valid optimizers are: adam, momentum, rmsprop, sgd"):
        GradientSolver(problem, "adagrad")
    with pytest.raises(ConfigError, match="lr must be positive"):
        GradientSolver(problem, "sgd", lr=0.0)
    with pytest.raises(ConfigError, match="needs an ocnet Problem.*to_problem"):
        GradientSolver(module, "sgd")
    empty = Problem([FunctionStage(lambda x, u: x)], lambda x, y: x.sum())
    with pytest.raises(ConfigError, match="no controls"):
        GradientSolver(empty, "sgd")


def test_gradient_solver_on_a_stage_problem_decreases_the_loss():
    """Not only modules: plain-tensor controls (Dense stages) are trained too."""
    g = torch.Generator().manual_seed(0)
    problem = place(Problem([Dense.create(2, 8, generator=g), Dense.create(8, 2, "identity",
                                                                            generator=g)],
                            nn.functional.cross_entropy), dtype=DT)
    x = torch.randn(64, 2, dtype=DT)
    y = (x[:, 0] * x[:, 1] > 0).long()
    solver = GradientSolver(problem, "adam", lr=0.05)
    first = solver.step(x, y).loss
    for _ in range(30):
        last = solver.step(x, y).loss
    assert last < 0.7 * first
