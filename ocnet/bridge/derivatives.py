"""Derivatives the solvers and their dense reference checks need, built on ``torch.func``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from ..ocp.problem import Problem
from ..ocp.stage import Controls, Stage, flatten_controls, unflatten_controls


def stage_jacobians(stage: Stage, x: Tensor, u: Controls | None = None
                    ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Per-sample Jacobians of a stage on flat states (B, n).

    Returns ``f_x`` of shape (B, n_out, n) and, for each control, ``f_u`` of shape
    (B, n_out, *u.shape). Dense and slow: for reference implementations and tests.
    """
    u = stage.controls if u is None else u

    def single(xi: Tensor, *ui: Tensor) -> Tensor:
        return stage.f(xi.unsqueeze(0), ui).squeeze(0)

    argnums = tuple(range(1 + len(u)))
    jac = vmap(jacrev(single, argnums=argnums), in_dims=(0,) + (None,) * len(u))(x, *u)
    return jac[0], tuple(jac[1:])


def objective_hessian(problem: Problem, x0: Tensor, y: Tensor | None = None) -> Tensor:
    """The dense Hessian of J with respect to all controls (flattened). Small problems only."""
    like = problem.controls
    flat = flatten_controls(like).detach()

    def J(v: Tensor) -> Tensor:  # noqa: N802
        return problem.objective(x0, y, unflatten_controls(v, like))

    return hessian(J)(flat)


def objective_gradient(problem: Problem, x0: Tensor, y: Tensor | None = None) -> Tensor:
    """dJ/du by autograd through the whole rollout, flattened: the independent check of
    :meth:`Problem.gradients`."""
    like = problem.controls
    flat = flatten_controls(like).detach().requires_grad_(True)
    with torch.enable_grad():
        J = problem.objective(x0, y, unflatten_controls(flat, like))  # noqa: N806
        (g,) = torch.autograd.grad(J, flat)
    return g
