"""Vanilla differential dynamic programming (DDP) on any :class:`~ocnet.ocp.Problem`.

The batch is one dynamical system: the state of stage t is the whole batch
X_t = (x_t^1, ..., x_t^B) (flattened to a vector of size B n_t) and the controls u_t
(all control tensors of the stage, flattened to a vector of size m_t) are shared by
every sample. J = Phi(X_T) + sum_t l_t(X_t, u_t) exactly as the problem defines it
(Phi and l_t are batch means, so every derivative below carries their 1/B).

Backward sweep (V' = V_{t+1}; F_x = blockdiag(f_x^i), F_u = [f_u^1; ...; f_u^B]
the per-sample Jacobians stacked; Gauss-Newton drops the second-order dynamics terms
unless ``second_order=True`` adds them)::

    V_T = Phi,  V_x = dPhi/dX_T,  V_xx = d2Phi/dX_T2
    Q_x  = l_x  + F_x^T V'_x          Q_u  = l_u  + F_u^T V'_x
    Q_xx = l_xx + F_x^T V'_xx F_x     Q_ux = l_ux + F_u^T V'_xx F_x
    Q_uu = l_uu + F_u^T V'_xx F_u     (+ V'_x . f_xx, f_ux, f_uu if second_order)
    Q~_uu = Q_uu + mu I               (Levenberg-Marquardt)
    k = -Q~_uu^-1 Q_u,   K = -Q~_uu^-1 Q_ux
    V_x  = Q_x  + K^T Q_uu k + K^T Q_u + Q_ux^T k
    V_xx = Q_xx + K^T Q_uu K + K^T Q_ux + Q_ux^T K  + eps_v I   (Tikhonov)

(for mu = 0 these are V_x = Q_x - Q_ux^T Q_uu^-1 Q_u, V_xx = Q_xx - Q_ux^T Q_uu^-1 Q_ux).
Although Phi is a sum over samples (V_xx at T is block diagonal), the shared control
couples the samples: V_xx at t < T is block diagonal minus a rank <= m_t term, so exact
DDP keeps the full (B n_t) x (B n_t) matrix. The feedback K acts on the whole batch.

Forward pass with the feedback policy::

    Xhat_0 = X_0,   u*_t = u_t + alpha k_t + K_t (Xhat_t - X_t),   Xhat_{t+1} = f_t(Xhat_t, u*_t)

The step is accepted when J(u*) is finite and below J(u); otherwise mu grows by
``mu_factor`` and the sweep is retried (at most ``max_tries`` times); on acceptance mu
shrinks (not below ``mu_min`` once raised). A singular Q~_uu counts as a failed sweep. A
rejected step leaves the controls untouched, so training never continues on a NaN.
Cost: dense in the controls (cubic in m_t) and in the batch state: small
networks and control problems only. See docs/ddp.md for the derivation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError
from ..ocp.problem import Problem
from ..ocp.stage import Controls, flatten_controls, unflatten_controls
from .base import Solver, StepInfo, register


@dataclass
class StageQuantities:
    """The DDP quantities of stage t, on the flattened batch state (size B n_t) and
    flattened controls (size m_t). ``V_x``, ``V_xx`` are those of V_t (after stage t)."""

    Q_u: Tensor
    Q_x: Tensor
    Q_uu: Tensor
    Q_ux: Tensor
    Q_xx: Tensor
    V_x: Tensor
    V_xx: Tensor
    k: Tensor
    K: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in
                ("Q_u", "Q_x", "Q_uu", "Q_ux", "Q_xx", "V_x", "V_xx", "k", "K")}


def policy_update(u: Tensor, k: Tensor, K: Tensor, dx: Tensor,  # noqa: N803
                  alpha: float = 1.0) -> Tensor:
    """u* = u + alpha k + K dx on flat vectors."""
    return u + alpha * k + K @ dx


def gain_solve(Q_uu: Tensor, Q_u: Tensor, Q_ux: Tensor, mu: float  # noqa: N803
               ) -> tuple[Tensor, Tensor]:
    """k = -(Q_uu + mu I)^-1 Q_u, K = -(Q_uu + mu I)^-1 Q_ux (one LU factorisation)."""
    m = Q_uu.shape[0]
    reg = Q_uu + mu * torch.eye(m, dtype=Q_uu.dtype, device=Q_uu.device)
    # solve_ex does not raise on a singular matrix: the non-finite gains it then returns make
    # the forward pass fail the acceptance test, and the sweep is retried with a larger mu.
    sol, info = torch.linalg.solve_ex(reg, torch.cat([Q_u[:, None], Q_ux], dim=1))
    sol = torch.where(info == 0, sol, torch.full_like(sol, float("nan")))
    return -sol[:, 0], -sol[:, 1:]


def value_update(q: dict[str, Tensor], k: Tensor, K: Tensor,  # noqa: N803
                 eps_v: float) -> tuple[Tensor, Tensor]:
    """V_x, V_xx of the stage from its Q terms and gains (Tassa et al. 2012 forms)."""
    Q_x, Q_u, Q_uu, Q_ux, Q_xx = q["Q_x"], q["Q_u"], q["Q_uu"], q["Q_ux"], q["Q_xx"]  # noqa: N806
    V_x = Q_x + K.T @ (Q_uu @ k) + K.T @ Q_u + Q_ux.T @ k  # noqa: N806
    V_xx = Q_xx + K.T @ Q_uu @ K + K.T @ Q_ux + Q_ux.T @ K  # noqa: N806
    V_xx = 0.5 * (V_xx + V_xx.T)  # noqa: N806
    if eps_v:
        V_xx = V_xx + eps_v * torch.eye(V_xx.shape[0], dtype=V_xx.dtype, device=V_xx.device)  # noqa: N806
    return V_x, V_xx


def terminal_derivatives(problem: Problem, x_T: Tensor, y: Tensor | None  # noqa: N803
                         ) -> tuple[Tensor, Tensor]:
    """dPhi/dX_T and d2Phi/dX_T2 on the flattened batch state (``Problem`` computes them)."""
    return problem.terminal_derivatives(x_T, y)


class DDP(Solver):
    """Vanilla DDP (Gauss-Newton by default) with Levenberg-Marquardt step control.

    Args:
        problem: any problem; its running costs may depend on state and controls.
        lr: the step size alpha on the feed-forward gain k (default 1: a full DDP step).
        second_order: keep the second-order dynamics terms V'_x . f_xx, f_ux, f_uu
            (a dense Hessian of the batched stage: small problems only).
        mu: initial Q_uu regularisation; ``mu_min``, ``mu_max``, ``mu_factor`` its range
            and the factor of each adaptation (mu stays >= ``mu_min`` once raised; a start
            at mu = 0 stays exact until a step is rejected).
        eps_v: Tikhonov regularisation added to V_xx at every stage.
        max_tries: sweeps per step before the step is given up (controls unchanged).
        alphas: step sizes tried (in order) on each sweep before mu is increased.
        max_stage_controls: refuse stages with more controls than this (a dense Q_uu is
            factorised per stage, cubic in its size; ``None`` lifts the limit).

    Presets: ``paper`` = ``alphas=10**linspace(0, -3, 11), mu=1, mu_factor=1.6,
    mu_min=1e-6, mu_max=1e10, second_order=False`` (:data:`PRESETS`): the defaults of the
    public iLQG/DDP code of Tassa, Erez & Todorov (IROS 2012; ``iLQG.m``, MathWorks File
    Exchange 52069: ``Alpha``, ``lambda``, ``lambdaFactor``, ``lambdaMin``, ``lambdaMax``,
    ``regType=1`` i.e. mu on Q_uu; Gauss-Newton, no second-order dynamics terms). The values
    were checked against public copies of that file's defaults block. Two differences
    stay: ``iLQG.m`` also grows the factor itself (``dlambda``) and sets lambda to 0 below
    ``lambdaMin``, where ocnet multiplies or divides mu by ``mu_factor`` and keeps it
    >= ``mu_min``; and it tries all step sizes and keeps the best, where ocnet takes the
    first that lowers J. The defaults (one full step, mu starting at 1e-6) are not the
    paper's: on the small networks and LQ problems DDP is used for here a full step is
    accepted nearly always, and a start at mu = 1 would damp the exact LQ step (one
    iteration to the Riccati optimum is a test).
    """

    name = "ddp"

    def __init__(self, problem: Problem, lr: float | None = None, *, second_order: bool = False,
                 mu: float = 1e-6, mu_min: float = 1e-6, mu_max: float = 1e10,
                 mu_factor: float = 10.0, eps_v: float = 0.0, max_tries: int = 10,
                 alphas: Sequence[float] | None = None,
                 max_stage_controls: int | None = 1500) -> None:
        super().__init__(problem)
        if max_stage_controls is not None:
            for t, stage in enumerate(problem.stages):
                m = sum(u.numel() for u in stage.controls)
                if m > max_stage_controls:
                    raise ConfigError(
                        f"ddp: stage {t} ({stage.describe()}) has {m} controls; vanilla DDP "
                        f"factorises a dense {m}x{m} Q_uu per stage and a dense V_xx over the "
                        f"batch, which is too slow beyond max_stage_controls="
                        f"{max_stage_controls}. Use --solver ddpnopt for networks of this "
                        "size, or pass max_stage_controls=None to insist"
                    )
        if lr is not None and not lr > 0:
            raise ConfigError(f"ddp: lr (the step size alpha on k) must be positive, got {lr}")
        if mu < 0 or eps_v < 0 or mu_factor <= 1 or max_tries < 1:
            raise ConfigError(
                f"ddp: need mu >= 0, eps_v >= 0, mu_factor > 1, max_tries >= 1; got mu={mu}, "
                f"eps_v={eps_v}, mu_factor={mu_factor}, max_tries={max_tries}"
            )
        self.alpha = 1.0 if lr is None else float(lr)
        self.alphas = tuple(alphas) if alphas is not None else (self.alpha,)
        self.second_order = bool(second_order)
        self.mu, self.mu_min, self.mu_max = float(mu), float(mu_min), float(mu_max)
        self.mu_factor, self.eps_v, self.max_tries = float(mu_factor), float(eps_v), max_tries
        if not problem.parameters():
            raise ConfigError(f"{problem!r} has no controls for DDP to optimise")

    # ---------------------------------------------------------------- derivatives
    def _stage_q(self, t: int, x: Tensor, u: Controls, V_x: Tensor, V_xx: Tensor,  # noqa: N803
                 us: Sequence[Controls]) -> dict[str, Tensor]:
        """Q terms of stage t from per-sample Jacobians (block structure exploited)."""
        problem = self.problem
        B = x.shape[0]  # noqa: N806
        fx, fu = problem.stage_jacobians(t, x, u)  # (B, n', n), (B, n', m)
        m = fu.shape[-1]
        n_out = fx.shape[1]
        vx = V_x.reshape(B, n_out)
        vxx = V_xx.reshape(B, n_out, B, n_out)
        Q_x = torch.einsum("bon,bo->bn", fx, vx).reshape(-1)  # noqa: N806
        Vfx = torch.einsum("iojp,jpn->iojn", vxx, fx)  # noqa: N806
        Q_xx = torch.einsum("ioa,iojn->iajn", fx, Vfx).reshape(B * fx.shape[2], -1)  # noqa: N806
        if m:
            Q_u = torch.einsum("bom,bo->m", fu, vx)  # noqa: N806
            Q_ux = torch.einsum("iom,iojn->mjn", fu, Vfx).reshape(m, -1)  # noqa: N806
            Vfu = torch.einsum("iojp,jpm->iom", vxx, fu)  # noqa: N806
            Q_uu = torch.einsum("ioa,iom->am", fu, Vfu)  # noqa: N806
        else:
            Q_u, Q_ux, Q_uu = x.new_zeros(0), x.new_zeros(0, x.numel()), x.new_zeros(0, 0)  # noqa: N806
        if self.second_order:
            h_xx, h_ux, h_uu = problem.stage_second_order(t, x, u, V_x)
            Q_xx = Q_xx + h_xx  # noqa: N806
            if m:
                Q_ux, Q_uu = Q_ux + h_ux, Q_uu + h_uu  # noqa: N806
        q = {"Q_x": Q_x, "Q_u": Q_u, "Q_xx": Q_xx, "Q_ux": Q_ux, "Q_uu": Q_uu}
        lc = problem.cost_derivatives(t, x, u)
        if lc is not None:
            q["Q_x"] = q["Q_x"] + lc.l_x
            q["Q_xx"] = q["Q_xx"] + lc.l_xx
            if m:
                q["Q_u"] = q["Q_u"] + lc.l_u
                q["Q_ux"] = q["Q_ux"] + lc.l_ux
                q["Q_uu"] = q["Q_uu"] + lc.l_uu
        coupled = problem.coupled_cost_derivatives(t, us) if m else None
        if coupled is not None:  # the stage's own block of a cost coupling several stages
            q["Q_u"] = q["Q_u"] + coupled[0]
            q["Q_uu"] = q["Q_uu"] + coupled[1]
        q["Q_xx"] = 0.5 * (q["Q_xx"] + q["Q_xx"].T)
        q["Q_uu"] = 0.5 * (q["Q_uu"] + q["Q_uu"].T)
        return q

    def backward_pass(self, xs: Sequence[Tensor], y: Tensor | None, mu: float | None = None,
                      us: Sequence[Controls] | None = None) -> list[StageQuantities]:
        """The backward sweep along the states ``xs``: one :class:`StageQuantities` per stage.

        Also the debug hook the tests compare against the dense reference.
        """
        mu = self.mu if mu is None else mu
        us = self.problem.controls if us is None else us
        V_x, V_xx = self.problem.terminal_derivatives(xs[-1], y)  # noqa: N806
        out: list[StageQuantities] = [None] * self.problem.T  # type: ignore[list-item]
        for t in reversed(range(self.problem.T)):
            q = self._stage_q(t, xs[t], us[t], V_x, V_xx, us)
            if q["Q_uu"].numel():
                k, K = gain_solve(q["Q_uu"], q["Q_u"], q["Q_ux"], mu)  # noqa: N806
            else:
                k, K = q["Q_u"], q["Q_ux"]  # noqa: N806
            V_x, V_xx = value_update(q, k, K, self.eps_v)  # noqa: N806
            out[t] = StageQuantities(V_x=V_x, V_xx=V_xx, k=k, K=K, **q)
        return out

    def forward_pass(self, x0: Tensor, y: Tensor | None, xs: Sequence[Tensor],
                     quantities: Sequence[StageQuantities], alpha: float = 1.0
                     ) -> tuple[list[Controls], Tensor]:
        """Controls u*_t of the feedback policy along the new trajectory, and J(u*)
        (``Problem.policy_rollout``: coupled costs are evaluated at the trial controls)."""
        us = self.problem.controls

        def policy(t: int, xhat: Tensor) -> Controls:
            u = us[t]
            if not u:
                return u
            dx = (xhat - xs[t]).reshape(-1)
            q = quantities[t]
            flat = policy_update(flatten_controls([u], like=x0).detach(), q.k, q.K, dx, alpha)
            return unflatten_controls(flat, [u])[0]

        traj = self.problem.policy_rollout(x0, y, policy)
        return traj.us, traj.objective

    # ---------------------------------------------------------------- the step
    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        start = self.problem.evaluate(x0, y)
        xs, J = start.xs, start.objective  # noqa: N806
        tries, accepted, J_new = 0, False, J  # noqa: N806
        best: list[Controls] | None = None
        # Host-side retry loop (unavoidable: whether to retry with more regularisation
        # depends on the value of the new cost). Everything inside a sweep stays on device.
        while tries < self.max_tries and not accepted:
            tries += 1
            quantities = self.backward_pass(xs, y, self.mu)
            for alpha in self.alphas:
                new_us, J_try = self.forward_pass(x0, y, xs, quantities, alpha)  # noqa: N806
                ok = torch.isfinite(J_try) & (J_try < J)
                ok = ok & torch.stack([torch.isfinite(v).all() for u in new_us for v in u]).all()
                if bool(ok):
                    accepted, best, J_new = True, new_us, J_try  # noqa: N806
                    break
            if accepted:  # mu shrinks but stays >= mu_min once it was raised (0 stays 0)
                self.mu = max(self.mu / self.mu_factor, self.mu_min) if self.mu > 0 else 0.0
            else:
                self.mu = min(max(self.mu * self.mu_factor, self.mu_min), self.mu_max)
        if accepted and best is not None:
            self.problem.set_controls(best)
        return StepInfo(loss=J, accepted=torch.tensor(accepted),
                        extra={"mu": self.mu, "tries": tries, "loss_after": J_new})

    def host_state(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mu": self.mu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mu = float(state.get("mu", self.mu))


#: the presets of ``--solver ddp`` (see :class:`DDP` for the source)
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"alphas": tuple(10.0 ** (-3.0 * i / 10) for i in range(11)), "mu": 1.0,
              "mu_factor": 1.6, "mu_min": 1e-6, "mu_max": 1e10, "second_order": False},
}


def _factory(problem: Problem, lr: float | None = None, **options: Any) -> DDP:
    return DDP(problem, lr=lr, **options)


register("ddp", _factory, "vanilla differential dynamic programming (Gauss-Newton, "
         "Levenberg-Marquardt step control); small networks and control problems",
         solver_class=DDP, default_lr=1.0, cost="second-order-dense", max_controls=1500,
         limit_per="stage", host_sync=True, presets=PRESETS)

__all__: list[str] = ["DDP", "StageQuantities"]
