"""Dense, slow reference of the DDP backward sweep, for tests only.

Every derivative is an explicit matrix from classic autograd
(``torch.autograd.functional.jacobian`` / ``hessian``) of the *whole batched* stage
F_t(X, u) (so the Jacobians include the zero cross-sample blocks), of the batched running
cost l_t(X, u) and of the terminal cost Phi(X_T); the DDP formulas are then evaluated
literally with explicit inverses:

    Q_x = l_x + F_x^T V'_x,  Q_u = l_u + F_u^T V'_x,
    Q_xx = l_xx + F_x^T V'_xx F_x (+ V'_x . F_xx),  Q_ux = l_ux + F_u^T V'_xx F_x (+ V'_x . F_ux),
    Q_uu = l_uu + F_u^T V'_xx F_u (+ V'_x . F_uu),
    k = -(Q_uu + mu I)^-1 Q_u,  K = -(Q_uu + mu I)^-1 Q_ux,
    V_x = Q_x + K^T Q_uu k + K^T Q_u + Q_ux^T k,  V_xx = Q_xx + K^T Q_uu K + K^T Q_ux + Q_ux^T K
          + eps_v I.

It shares no code with the fast path in ``ddp.py`` except the result dataclass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.functional import hessian, jacobian

from ocnet.ocp.problem import Problem
from ocnet.ocp.stage import Controls, Stage, flatten_controls, unflatten_controls
from ocnet.solvers.ddp import StageQuantities


def reference_backward(problem: Problem, x0: Tensor, y: Tensor | None, *, mu: float = 0.0,
                       eps_v: float = 0.0, second_order: bool = False
                       ) -> list[StageQuantities]:
    """The DDP backward sweep at the problem's current controls, densely."""
    us = [tuple(v.detach() for v in u) for u in problem.controls]
    xs = [x0.detach()]
    with torch.no_grad():
        for t, stage in enumerate(problem.stages):
            xs.append(stage.f(xs[-1], us[t]))
    shape_T = xs[-1].shape  # noqa: N806

    def phi(v: Tensor) -> Tensor:
        return problem.terminal_cost(v.reshape(shape_T), y)

    xT = xs[-1].reshape(-1)  # noqa: N806
    V_x = jacobian(phi, xT)  # noqa: N806
    V_xx = hessian(phi, xT)  # noqa: N806
    out: list[StageQuantities] = [None] * problem.T  # type: ignore[list-item]
    for t in reversed(range(problem.T)):
        stage, u, X = problem.stages[t], us[t], xs[t]  # noqa: N806
        xv, uv = X.reshape(-1), flatten_controls([u], like=X).detach().to(X)
        n, m = xv.numel(), uv.numel()
        Q_x, Q_u, Q_xx, Q_ux, Q_uu = _stage_q(stage, X, u, V_x, V_xx, second_order)  # noqa: N806
        if m:
            inv = torch.linalg.inv(Q_uu + mu * torch.eye(m, dtype=X.dtype))
            k, K = -inv @ Q_u, -inv @ Q_ux  # noqa: N806
        else:
            k, K = Q_u, Q_ux  # noqa: N806
        V_x = Q_x + K.T @ Q_uu @ k + K.T @ Q_u + Q_ux.T @ k  # noqa: N806
        V_xx = Q_xx + K.T @ Q_uu @ K + K.T @ Q_ux + Q_ux.T @ K + eps_v * torch.eye(n, dtype=X.dtype)  # noqa: N806, E501
        out[t] = StageQuantities(Q_u=Q_u, Q_x=Q_x, Q_uu=Q_uu, Q_ux=Q_ux, Q_xx=Q_xx,
                                 V_x=V_x, V_xx=V_xx, k=k, K=K)
    return out


def reference_states(problem: Problem, x0: Tensor) -> Sequence[Tensor]:
    """X_0..X_T at the current controls."""
    return problem.rollout(x0).xs


def _stage_q(stage: Stage, X: Tensor, u: Controls, V_x: Tensor, V_xx: Tensor,  # noqa: N803
             second_order: bool) -> tuple[Tensor, ...]:
    """Q_x, Q_u, Q_xx, Q_ux, Q_uu of one stage from dense Jacobians and Hessians."""
    shape = X.shape
    xv, uv = X.reshape(-1), flatten_controls([u], like=X).detach().to(X)

    def F(a: Tensor, b: Tensor) -> Tensor:  # noqa: N802
        return stage.f(a.reshape(shape), unflatten_controls(b, [u])[0]).reshape(-1)

    Fx, Fu = jacobian(F, (xv, uv))  # noqa: N806
    Q_x = Fx.T @ V_x  # noqa: N806
    Q_u = Fu.T @ V_x  # noqa: N806
    Q_xx = Fx.T @ V_xx @ Fx  # noqa: N806
    Q_ux = Fu.T @ V_xx @ Fx  # noqa: N806
    Q_uu = Fu.T @ V_xx @ Fu  # noqa: N806
    if second_order:
        def lam(a: Tensor, b: Tensor) -> Tensor:
            return V_x @ F(a, b)

        if uv.numel():
            H = hessian(lam, (xv, uv))  # noqa: N806
            Q_xx, Q_ux, Q_uu = Q_xx + H[0][0], Q_ux + H[1][0], Q_uu + H[1][1]  # noqa: N806
        else:  # a stage without controls
            Q_xx = Q_xx + hessian(lambda a: lam(a, uv), xv)  # noqa: N806
    if stage.has_cost:
        def cost(a: Tensor, b: Tensor) -> Tensor:
            c = stage.cost(a.reshape(shape), unflatten_controls(b, [u])[0])
            return a.sum() * 0 if c is None else c

        g = jacobian(cost, (xv, uv))
        H = hessian(cost, (xv, uv))  # noqa: N806
        Q_x, Q_u = Q_x + g[0], Q_u + g[1]  # noqa: N806
        Q_xx, Q_ux, Q_uu = Q_xx + H[0][0], Q_ux + H[1][0], Q_uu + H[1][1]  # noqa: N806
    return Q_x, Q_u, Q_xx, Q_ux, Q_uu
