"""ocnet.ocp.Problem: bad input is refused with errors that name the stage and the shapes;
rollout/objective/set_controls behave as documented."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ocnet.bridge import place, to_problem
from ocnet.dynamics import Dense, Flatten, ZeroPad
from ocnet.ocp import ConfigError, FunctionStage, Problem, ShapeError, Stage

DT = torch.float64


def _mlp_problem(loss: str = "cross_entropy") -> Problem:
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return place(to_problem(module, loss), dtype=DT)


def _x(b: int = 5, n: int = 4):
    return torch.randn(b, n, dtype=DT)


def _y(b: int = 5, k: int = 2):
    return torch.randint(0, k, (b,))


# ---------------------------------------------------------------- static shape check
def test_static_mismatch_names_both_stages_and_sizes():
    module = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(16, 10))
    with pytest.raises(ShapeError) as info:
        to_problem(module, "cross_entropy")
    msg = str(info.value)
    assert "stage 0" in msg and "stage 1" in msg
    assert "Linear+Tanh" in msg and "outputs 32" in msg and "expects 16" in msg


def test_static_mismatch_of_dynamics_stages():
    with pytest.raises(ShapeError, match=r"stage 0 .*outputs 4 features but stage 1 .*expects 5"):
        Problem([Dense.create(3, 4), Dense.create(5, 2)], F.cross_entropy)


def test_empty_problem_and_non_stage_are_refused():
    with pytest.raises(ShapeError, match="at least one stage"):
        Problem([], F.cross_entropy)
    with pytest.raises(TypeError, match="stage 1 is a Linear.*FunctionStage.*to_problem"):
        Problem([Dense.create(3, 3), nn.Linear(3, 3)], F.cross_entropy)


# ---------------------------------------------------------------- dynamic shape checks
@pytest.mark.parametrize("method", ["objective", "rollout", "gradients"])
def test_x0_with_wrong_features(method):
    problem = _mlp_problem()
    call = getattr(problem, method)
    args = (_x(5, 6),) if method == "rollout" else (_x(5, 6), _y())
    with pytest.raises(ShapeError) as info:
        call(*args)
    msg = str(info.value)
    assert "stage 0" in msg and "(5, 6)" in msg and "4 input features" in msg and "x_0" in msg


def test_function_stage_with_wrong_output_shape_is_named():
    # the bad stage declares its output size: it is caught where it happens
    bad = FunctionStage(lambda x, u: x[:, :2], name="crop", out_features=3)
    problem = Problem([Dense.create(3, 3, dtype=DT), bad, Dense.create(3, 2, dtype=DT)],
                      F.cross_entropy)
    with pytest.raises(ShapeError) as info:
        problem.objective(_x(5, 3), _y())
    msg = str(info.value)
    assert "stage 1 (crop)" in msg and "(5, 2)" in msg and "3 output features" in msg

    # undeclared: the next stage names itself, both shapes and where the state came from
    bad = FunctionStage(lambda x, u: x[:, :2], name="crop")
    problem = Problem([Dense.create(3, 3, dtype=DT), bad, Dense.create(3, 2, dtype=DT)],
                      F.cross_entropy)
    with pytest.raises(ShapeError) as info:
        problem.objective(_x(5, 3), _y())
    msg = str(info.value)
    assert "stage 2" in msg and "(5, 2)" in msg and "stage 1 (crop)" in msg
    assert "3 input features" in msg


def test_stage_that_changes_the_batch_size():
    half = FunctionStage(lambda x, u: x[:2], name="half")
    problem = Problem([Dense.create(3, 3, dtype=DT), half], lambda x, y: x.sum())
    with pytest.raises(ShapeError, match=r"stage 1 \(half\) changed the batch size from 5 to 2"):
        problem.objective(_x(5, 3))


def test_zero_pad_refuses_a_wider_input_instead_of_cropping():
    problem = Problem([ZeroPad(3, 4), Dense.create(4, 2, dtype=DT)], lambda x, y: x.sum())
    with pytest.raises(ShapeError, match=r"stage 0 .*\(5, 5\).*3 input features"):
        problem.objective(_x(5, 5))
    with pytest.raises(ShapeError, match="3 features"):
        ZeroPad(3, 4)(_x(5, 5))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_targets_of_the_wrong_length(loss):
    problem = _mlp_problem(loss)
    y = _y(6) if loss == "cross_entropy" else torch.randn(6, 2, dtype=DT)
    with pytest.raises(ShapeError) as info:
        problem.objective(_x(5), y)
    msg = str(info.value)
    assert "(5, 2)" in msg and ("(6,)" in msg or "(6, 2)" in msg)
    with pytest.raises(ShapeError):
        problem.gradients(_x(5), y)


def test_mse_does_not_broadcast():
    problem = place(to_problem(nn.Sequential(nn.Linear(3, 1)), "mse"), dtype=DT)
    with pytest.raises(ShapeError, match=r"\(5, 1\).*\(5,\)"):
        problem.objective(_x(5, 3), torch.randn(5, dtype=DT))
    problem.objective(_x(5, 3), torch.randn(5, 1, dtype=DT))  # the right shape works


def test_conv_stage_on_flat_input_says_how_to_fix():
    from ocnet.dynamics import Conv2d

    problem = Problem([Conv2d.create(1, 2, dtype=DT), Flatten(), Dense.create(128, 2, dtype=DT)],
                      F.cross_entropy)
    with pytest.raises(ShapeError, match=r"\(5, 64\).*\(B, 1, 8, 8\)"):
        problem.objective(_x(5, 64), _y())


# ---------------------------------------------------------------- dtype / device
def test_dtype_mismatch_says_how_to_fix():
    problem = to_problem(nn.Sequential(nn.Linear(4, 2)), "cross_entropy")  # float32
    for call in (problem.objective, problem.gradients, problem.rollout):
        with pytest.raises(ShapeError) as info:
            call(_x(5))
        msg = str(info.value)
        assert "torch.float64" in msg and "torch.float32" in msg
        assert "ocnet.bridge.place" in msg
    place(problem, dtype=DT)
    problem.objective(_x(5), _y())  # fixed as the message says


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_device_mismatch_says_how_to_fix():
    problem = to_problem(nn.Sequential(nn.Linear(4, 2)), "cross_entropy")
    with pytest.raises(ShapeError, match=r"cuda.*cpu|cpu.*cuda"):
        problem.objective(torch.randn(5, 4, device="cuda"), _y().cuda())


# ---------------------------------------------------------------- set_controls
def test_set_controls_copies_in_place_and_refuses_wrong_shapes():
    problem = _mlp_problem()
    live = problem.parameters()
    new = [tuple(torch.randn_like(u) for u in s.controls) for s in problem.stages]
    problem.set_controls(new)
    assert all(a is b for a, b in zip(problem.parameters(), live, strict=True))  # same tensors
    for s, us in zip(problem.stages, new, strict=True):
        for a, b in zip(s.controls, us, strict=True):
            assert torch.equal(a, b)
    # the module sees the new values
    x = _x()
    assert torch.allclose(problem.module(x), problem.rollout(x).xs[-1])

    with pytest.raises(ShapeError, match="got 1 stages of controls, need 2"):
        problem.set_controls(new[:1])
    with pytest.raises(ShapeError, match="stage 1 .*has 2 control tensors, got 1"):
        problem.set_controls([new[0], new[1][:1]])
    bad = [new[0], (torch.zeros(3, 2, dtype=DT), new[1][1])]
    with pytest.raises(ShapeError, match=r"stage 1 .*shape \(2, 3\).*shape \(3, 2\)"):
        problem.set_controls(bad)


# ---------------------------------------------------------------- evaluation
def test_rollout_objective_and_controls_argument():
    g = torch.Generator().manual_seed(0)
    stages = [Dense.create(3, 4, "tanh", generator=g, dtype=DT),
              Dense.create(4, 2, "identity", generator=g, dtype=DT)]
    problem = Problem(stages, F.cross_entropy)
    x, y = _x(5, 3), _y()
    traj = problem.rollout(x)
    assert traj.T == 2 and len(traj.xs) == 3 and traj.xs[0] is x
    (w0, b0), (w1, b1) = problem.controls
    h = torch.tanh(x @ w0.T + b0)
    out = h @ w1.T + b1
    assert torch.allclose(traj.xs[1], h, atol=0, rtol=1e-15)
    assert torch.allclose(traj.xs[2], out, atol=0, rtol=1e-15)
    assert not traj.xs[-1].requires_grad
    J = problem.objective(x, y)  # noqa: N806
    assert torch.allclose(J, F.cross_entropy(out, y), atol=0, rtol=1e-15)
    assert problem.check(x, y) == J
    # objective at other controls does not touch the live ones
    other = [tuple(2 * u for u in us) for us in problem.controls]
    J2 = problem.objective(x, y, other)  # noqa: N806
    h2 = torch.tanh(x @ (2 * w0).T + 2 * b0)
    assert torch.allclose(J2, F.cross_entropy(h2 @ (2 * w1).T + 2 * b1, y), rtol=1e-14)
    assert torch.equal(problem.controls[0][0], w0)
    assert problem.T == len(problem) == 2
    assert problem.num_controls() == 3 * 4 + 4 + 4 * 2 + 2
    assert "T=2" in repr(problem)


def test_function_stage_problem_and_has_cost():
    a = torch.tensor([[0.5, 0.1], [0.0, 0.9]], dtype=DT)
    u = torch.zeros(2, dtype=DT)
    st = FunctionStage(lambda x, u: x @ a.T + u[0], [u], cost=lambda x, u: (u[0] ** 2).sum(),
                       buffers=[a], name="affine")
    plain = FunctionStage(lambda x, u: x, name="id")
    assert st.has_cost and not plain.has_cost and st.buffers() == (a,)
    assert isinstance(st, Stage) and st.describe() == "affine[2]"
    problem = Problem([st, plain], lambda x, y: (x**2).sum(-1).mean())
    x = _x(4, 2)
    traj = problem.rollout(x)
    assert traj.running_costs[0] == 0 and traj.running_costs[1] is None
    with pytest.raises(TypeError, match="control 0 is a list"):
        FunctionStage(lambda x, u: x, [[1.0]])


def test_unknown_names_list_the_valid_ones():
    from ocnet.dynamics import activation
    from ocnet.models import build_model
    from ocnet.solvers import make_solver

    with pytest.raises(ConfigError) as info:
        activation("swishy")
    assert "tanh" in str(info.value) and "relu" in str(info.value) and "swishy" in str(info.value)
    with pytest.raises(ConfigError, match=re.escape("cnn, mlp, resnet")):
        build_model("transformer", 2, 2)
    with pytest.raises(ConfigError, match="valid activations are: .*tanh"):
        build_model("mlp", 2, 2, activation="swishy")
    with pytest.raises(ConfigError, match="valid losses are: cross_entropy, mse"):
        to_problem(nn.Sequential(nn.Linear(2, 2)), "hinge")
    with pytest.raises(ConfigError, match="valid solvers are: .*adam.*sgd"):
        make_solver("newton-raphson", _mlp_problem())


def test_costs_must_be_scalars():
    per_sample = FunctionStage(lambda x, u: x, cost=lambda x, u: (x * x).sum(-1), name="l")
    problem = Problem([per_sample], lambda x, y: x.sum())
    for call in (problem.objective, problem.gradients, problem.rollout):
        with pytest.raises(ShapeError, match=r"running cost of stage 0 \(l\) has shape \(5,\)"):
            call(_x(5, 3))
    problem = Problem([Dense.create(3, 2, dtype=DT)], lambda x, y: (x * x).sum(-1))
    with pytest.raises(ShapeError, match=r"terminal cost returned \(5,\).*\.mean\(\)"):
        problem.gradients(_x(5, 3))
