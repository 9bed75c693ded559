"""The one sweep: every solver goes through ``Problem`` (same checks, same costs).

- a float64 batch on a float32 problem is the same clear ShapeError in every solver;
- DDP scores its trial steps with ``Problem.policy_rollout``, so on a neural ODE whose
  regulariser couples the intervals (beta > 0) its trial cost is J at the trial controls;
- coupled costs are part of J, of dJ/du (against autograd through ``objective``) and of
  every stage-wise Hamiltonian share;
- a stage that does not describe an affine part is refused by name, not by type.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ocnet.bridge import flatten_controls, objective_gradient, to_problem
from ocnet.dynamics import TimeMesh
from ocnet.neural_ode import DG0Regularizer, NeuralODE, make_field
from ocnet.ocp import CapabilityError, ControlCost, FunctionStage, Problem, ShapeError
from ocnet.solvers import DDP, make_solver, solver_names

D = torch.float64


def _small_mlp() -> Problem:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return to_problem(net, "cross_entropy", weight_decay=1e-3)


@pytest.mark.parametrize("name", solver_names())
def test_a_float64_batch_on_a_float32_problem_is_one_clear_error(name):
    problem = _small_mlp()
    solver = make_solver(name, problem)
    x = torch.randn(5, 3, dtype=D)
    y = torch.randint(0, 2, (5,))
    before = [u.detach().clone() for u in problem.parameters()]
    with pytest.raises(ShapeError, match=r"x_0 is torch.float64 .* controls of torch.float32"):
        solver.step(x, y)
    for u, v in zip(problem.parameters(), before, strict=True):
        assert torch.equal(u, v)
    solver.check_inputs = False  # the sweep itself gives the same error
    with pytest.raises(ShapeError, match=r"x_0 is torch.float64 .* controls of torch.float32"):
        solver.step(x, y)


def _regularised_node(seed: int = 0) -> tuple[NeuralODE, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = NeuralODE(make_field("activation", 2, "tanh"), TimeMesh([0.4, 0.3, 0.5]),
                      in_features=2, out_features=2, reg=DG0Regularizer(0.5, 1.0, 2.0),
                      generator=g, dtype=D)
    x = torch.randn(6, 2, generator=g, dtype=D)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, x, y


def test_ddp_trial_cost_equals_the_objective_at_the_trial_controls():
    model, x, y = _regularised_node()
    problem = model.problem()
    assert problem.couplings, "beta > 0 must couple the Euler stages"
    ddp = DDP(problem, mu=1e-3)
    xs = problem.evaluate(x, y).xs
    quantities = ddp.backward_pass(xs, y)
    for alpha in (1.0, 0.5, 0.1):
        trial, cost = ddp.forward_pass(x, y, xs, quantities, alpha)
        exact = problem.objective(x, y, trial).detach()
        torch.testing.assert_close(cost, exact, rtol=0, atol=1e-12)
    # the trial controls differ from the live ones, so the coupling is read at the trial
    assert any(not torch.equal(a, b) for us, vs in zip(trial, problem.controls, strict=True)
               for a, b in zip(us, vs, strict=True))
    info = ddp.step(x, y)
    assert bool(info.accepted)
    torch.testing.assert_close(info.extra["loss_after"], problem.objective(x, y).detach(),
                               rtol=0, atol=1e-12)


def test_coupled_cost_is_in_j_and_in_the_gradient():
    model, x, y = _regularised_node(1)
    problem = model.problem()
    J, grads, _ = problem.value_and_gradients(x, y)  # noqa: N806
    torch.testing.assert_close(J, problem.objective(x, y).detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(flatten_controls(grads), objective_gradient(problem, x, y),
                               rtol=0, atol=1e-12)
    # the jump term really is there: without it J and dJ/du change
    plain = NeuralODE(model.field, model.mesh, in_features=2, out_features=2,
                      reg=DG0Regularizer(0.5, 1.0, 0.0), controls=model.controls,
                      head_controls=model.head_controls)
    assert float((J - plain.problem().objective(x, y)).abs()) > 1e-3


class _PairCost(ControlCost):
    """c |u_0 - u_2|^2: a toy cost coupling stages 0 and 2."""

    def __init__(self, c: float) -> None:
        self.stages = (0, 2)
        self.c = c

    def value(self, controls):
        (a,), (b,) = controls
        return self.c * ((a - b) ** 2).sum()


def _coupled_function_problem() -> Problem:
    g = torch.Generator().manual_seed(2)
    us = [torch.randn(2, generator=g, dtype=D) for _ in range(3)]
    stages = [FunctionStage(lambda x, u: torch.tanh(x + u[0]), [u]) for u in us]
    return Problem(stages, lambda x, y: 0.5 * (x ** 2).sum(-1).mean(), couplings=[_PairCost(0.7)])


def test_every_solver_path_sees_the_coupled_cost():
    problem = _coupled_function_problem()
    x = torch.randn(4, 2, dtype=D)
    with torch.no_grad():
        plain = Problem(problem.stages, problem.terminal_cost).objective(x)
    coupled = problem.coupled_cost()
    torch.testing.assert_close(problem.objective(x).detach(), plain + coupled)
    torch.testing.assert_close(problem.evaluate(x).objective, plain + coupled)
    torch.testing.assert_close(problem.policy_rollout(x, None, lambda t, xh: None).objective,
                               plain + coupled)
    # the stage-wise shares: gradients at the live controls sum to dC/du
    for t in (0, 2):
        u = tuple(v.detach().requires_grad_(True) for v in problem.stages[t].controls)
        (g,) = torch.autograd.grad(problem.stage_coupled_cost(t, u), u)
        other = problem.stages[2 - t].controls[0]
        torch.testing.assert_close(g, 2 * 0.7 * (u[0].detach() - other))
    assert problem.stage_coupled_cost(1, problem.stages[1].controls) is None
    # E-MSA and DDP train the coupled problem (J decreases)
    for name, opts in (("emsa", {"rho": 1.0}), ("ddp", {})):
        p = copy.deepcopy(problem)
        j0 = float(p.objective(x).detach())
        solver = make_solver(name, p, **opts)
        for _ in range(3):
            solver.step(x, None)
        assert float(p.objective(x).detach()) < j0


def test_a_stage_without_structure_is_refused_by_name():
    problem = _coupled_function_problem()
    with pytest.raises(CapabilityError, match=r"ddpnopt needs stage 0 .*FunctionStage.*affine"):
        make_solver("ddpnopt", problem)


def test_stages_describe_their_affine_part_exactly():
    torch.manual_seed(3)
    from ocnet.dynamics import Conv2d, Dense, Residual, ResidualBlock

    cases = [
        (to_problem(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), ResidualBlock(4), nn.Linear(4, 2)),
                    "cross_entropy"), torch.randn(5, 3)),
        (Problem([Dense.create(3, 4), Residual.create(4, 0.3), Dense.create(4, 2, "identity")],
                 lambda x, y: x.pow(2).mean()), torch.randn(5, 3)),
        (Problem([Conv2d.create(1, 2, 3), Conv2d.create(2, 2, 3, "tanh")],
                 lambda x, y: x.pow(2).mean()), torch.randn(5, 1, 6, 6)),
    ]
    for problem, x in cases:
        for t, stage in enumerate(problem.stages):
            aff = problem.affine(t)
            torch.testing.assert_close(aff.f(x, stage.controls), stage.f(x, stage.controls))
            x = stage.f(x, stage.controls)
