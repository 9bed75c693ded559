"""Dense, slow reference of one exact DDPNOpt step (``vxx="exact"``), for tests only.

Every per-sample derivative is an explicit matrix from classic autograd
(``torch.autograd.functional.jacobian`` / ``hessian``, one sample at a time) of the stage
``stage.f`` and of the terminal cost on one sample; P_t is an explicit m x m matrix; the
formulas of docs/ddp.md ("Exact mode") are then evaluated literally (hats: per-sample,
unnormalised; c = c_B (2 gamma - gamma^2))::

    Qhat_u^i = f_u^iT Vhat'_x^i,  Q_u = mean_i Qhat_u^i + l_u,
    Qhat_x^i = f_x^iT Vhat'_x^i,  Qhat_xx^i = f_x^iT Vhat'_xx^i f_x^i,
    Qhat_ux^i = f_u^iT Vhat'_xx^i f_x^i                       (m x n, explicit)
    k = base step with Q_u,  P = lr M^-1 after it (m x m),  K^i = -P Qhat_ux^i / B,
    R^i = Qhat_ux^iT P Qhat_ux^i,
    Vhat_x^i = Qhat_x^i  (vx="backprop")  or  Qhat_x^i - Qhat_ux^iT P Q_u  (vx="ddp"),
    Vhat_xx^i = Qhat_xx^i - c R^i + eps I,
    second_order: Qhat_xx^i += d2(Vhat'_x^i . f^i)/dx2, Qhat_ux^i += d2(Vhat'_x^i . f^i)/du dx
    (blocks of one classic ``hessian`` in (x, u) per sample),
    forward: xhat_0 = x_0,  u*_t = u_t + k_t + gamma sum_i K^i (xhat^i_t - x^i_t).

It shares no code with ``ocnet/solvers/ddpnopt.py``; the base optimizers (sgd, adam) are
written out here, the Kronecker base's factor inverses are read from the solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.functional import hessian, jacobian

from ocnet.ocp.problem import Problem
from ocnet.ocp.stage import flatten_controls, unflatten_controls


@dataclass
class RefBase:
    """The reference's own base optimizer state: sgd, or adam (torch.optim's formulas),
    or kfac (explicit P from the solver's factor inverses, given by ``kfac_inverses``)."""

    name: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    floor: float = 0.0
    kfac_inverses: Callable[[int], tuple[Tensor, Tensor]] | None = None
    moments: dict[int, list[Tensor]] = field(default_factory=dict)
    steps: int = 0

    def step(self, t: int, q_u: Tensor, shapes: list[torch.Size], has_bias: bool
             ) -> tuple[Tensor, Tensor]:
        """(k, P): the base update of stage t for the flat gradient q_u and the explicit
        inverse curvature after the update (m x m)."""
        m = q_u.numel()
        eye = torch.eye(m, dtype=q_u.dtype)
        if self.name == "sgd":
            return -self.lr * q_u, self.lr * eye
        if self.name == "adam":
            b1, b2 = self.betas
            mom, vel = self.moments.get(t, [torch.zeros_like(q_u), torch.zeros_like(q_u)])
            mom = b1 * mom + (1 - b1) * q_u
            vel = b2 * vel + (1 - b2) * q_u * q_u
            self.moments[t] = [mom, vel]
            s = self.steps + 1
            denom = torch.sqrt(vel / (1 - b2 ** s)) + self.eps
            k = -self.lr / (1 - b1 ** s) * mom / denom
            if self.floor > 0:  # per control tensor: max(denom, floor * mean(denom))
                parts, i = [], 0
                for shp in shapes:
                    n = int(torch.Size(shp).numel())
                    seg = denom[i:i + n]
                    parts.append(torch.maximum(seg, self.floor * seg.mean()))
                    i += n
                denom = torch.cat(parts)
            return k, torch.diag(self.lr / denom)
        if self.name == "kfac":
            a_inv, g_inv = self.kfac_inverses(t)
            cols = []
            for j in range(m):  # P e_j: e_j as [W | b], lr G^-1 [W | b] A^-1, flattened back
                e = eye[j]
                w = e[:shapes[0].numel()].reshape(shapes[0])
                mat = torch.cat([w, e[w.numel():][:, None]], 1) if has_bias else w
                sol = self.lr * g_inv @ mat @ a_inv
                cols.append(torch.cat([sol[:, :w.shape[1]].reshape(-1), sol[:, -1]])
                            if has_bias else sol.reshape(-1))
            P = torch.stack(cols, 1)  # noqa: N806
            return -P @ q_u, P
        raise ValueError(self.name)


@dataclass
class RefStage:
    """The reference's quantities of stage t (per sample i: leading dimension B)."""

    Q_u: Tensor | None = None
    Q_x: Tensor | None = None
    Q_xx: Tensor | None = None
    Q_ux: Tensor | None = None
    P: Tensor | None = None
    k: Tensor | None = None
    K: Tensor | None = None
    R: Tensor | None = None
    V_x: Tensor | None = None
    V_xx: Tensor | None = None
    d: Tensor | None = None
    u_new: Tensor | None = None


def reference_exact_step(problem: Problem, x0: Tensor, y: Tensor | None, base: RefBase, *,
                         gamma: float = 1.0, eps: float = 0.0, c_b: str = "joint",
                         vx: str = "backprop", terminal_hessian: str = "exact",
                         second_order: bool = False) -> list[RefStage]:
    """One exact DDPNOpt step at the problem's current controls (the problem is not
    changed; ``u_new`` holds each controlled stage's new flat controls)."""
    B = x0.shape[0]  # noqa: N806
    us = [tuple(v.detach() for v in u) for u in problem.controls]
    xs = [x0.detach()]
    with torch.no_grad():
        for t, stage in enumerate(problem.stages):
            xs.append(stage.f(xs[-1], us[t]))

    # terminal: per sample, phi(x^i) = Phi on a batch of one
    v_x, v_xx = [], []
    for i in range(B):
        yi = None if y is None else y[i:i + 1]
        shape = xs[-1][i:i + 1].shape

        def phi(v: Tensor, yi: Tensor | None = yi, shape: torch.Size = shape) -> Tensor:
            return problem.terminal_cost(v.reshape(shape), yi)

        xi = xs[-1][i].reshape(-1)
        g = jacobian(phi, xi)
        v_x.append(g)
        v_xx.append(hessian(phi, xi) if terminal_hessian == "exact" else torch.outer(g, g))
    v_x, v_xx = torch.stack(v_x), torch.stack(v_xx)

    out = [RefStage() for _ in problem.stages]
    c = (1.0 / B if c_b == "joint" else 1.0) * (2 * gamma - gamma * gamma)
    for t in reversed(range(problem.T)):
        stage, u, X = problem.stages[t], us[t], xs[t]  # noqa: N806
        uv = flatten_controls([u], like=X).detach()
        fxs, fus, sxx, sux = [], [], [], []
        for i in range(B):
            xi = X[i:i + 1]

            def f(xv: Tensor, w: Tensor, xi: Tensor = xi, stage=stage, u=u) -> Tensor:
                return stage.f(xv.reshape(xi.shape), unflatten_controls(w, [u])[0]).reshape(-1)

            if u:
                jx, ju = jacobian(f, (xi.reshape(-1), uv))
                fus.append(ju)
            else:
                jx = jacobian(lambda xv, f=f, uv=uv: f(xv, uv), xi.reshape(-1))
            fxs.append(jx)
            if second_order:
                vi = v_x[i]
                if u:
                    (hxx, _), (hux, _) = hessian(
                        lambda xv, w, f=f, vi=vi: (vi * f(xv, w)).sum(), (xi.reshape(-1), uv))
                    sux.append(hux)
                else:
                    hxx = hessian(lambda xv, f=f, vi=vi, uv=uv: (vi * f(xv, uv)).sum(),
                                  xi.reshape(-1))
                sxx.append(hxx)
        fx = torch.stack(fxs)  # (B, n', n)
        fu = torch.stack(fus) if u else None  # (B, n', m)
        n = fx.shape[2]
        q_x = torch.einsum("bon,bo->bn", fx, v_x)
        q_xx = fx.transpose(1, 2) @ v_xx @ fx
        if second_order:
            q_xx = q_xx + torch.stack(sxx)
        eye = torch.eye(n, dtype=X.dtype)
        st = out[t]
        st.Q_x, st.Q_xx = q_x, q_xx
        if not u:
            v_x, v_xx = q_x, q_xx + eps * eye
            st.V_x, st.V_xx = v_x, v_xx
            continue
        l_u = torch.zeros_like(uv)
        if stage.has_cost:
            l_u = jacobian(lambda w, stage=stage, X=X, u=u: stage.cost(  # noqa: N803
                X, unflatten_controls(w, [u])[0]), uv)
        q_u = torch.einsum("bom,bo->m", fu, v_x) / B + l_u
        q_ux = fu.transpose(1, 2) @ v_xx @ fx  # (B, m, n)
        if second_order:
            q_ux = q_ux + torch.stack(sux)
        k, P = base.step(t, q_u, [v.shape for v in u], len(u) == 2)  # noqa: N806
        K = -(P @ q_ux) / B  # noqa: N806
        R = q_ux.transpose(1, 2) @ P @ q_ux  # noqa: N806
        v_x_new = q_x if vx == "backprop" else q_x - q_ux.transpose(1, 2) @ (P @ q_u)
        v_xx_new = q_xx - c * R + eps * eye
        st.Q_u, st.Q_ux, st.P, st.k, st.K, st.R = q_u, q_ux, P, k, K, R
        st.V_x, st.V_xx = v_x_new, v_xx_new
        v_x, v_xx = v_x_new, v_xx_new
    base.steps += 1

    xhat = xs[0]
    with torch.no_grad():
        for t, stage in enumerate(problem.stages):
            st, u = out[t], us[t]
            if u:
                dx = (xhat - xs[t]).reshape(B, -1)
                st.d = torch.einsum("bmn,bn->m", st.K, dx)
                st.u_new = flatten_controls([u], like=xs[0]) + st.k + gamma * st.d
                xhat = stage.f(xhat, unflatten_controls(st.u_new, [u])[0])
            else:
                xhat = stage.f(xhat, u)
    return out
