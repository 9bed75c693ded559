"""DDPNOpt (Liu, Chen, Theodorou, ICLR 2021): DDP with a base optimizer's curvature.

Stage t of a network: a_t = pre(x_t) (parameter-free), h_t = a_t W_t^T + b_t (dense) or
conv(a_t, W_t) + b_t, x_{t+1} = post(a_t, h_t) (activation; a + step * act(h) for a
residual/Euler stage). Backward sweep (autograd on the mean loss J; g_t = dJ/dx_t,
delta_t = dJ/dh_t, per-sample rows, each carrying the 1/B of the mean)::

    Q_u = dJ/du_t                                         (the batch gradient)
    Q_uu ~ M_t / lr  ->  P_t = Q_uu^-1 = lr M_t^-1       (base optimizer's curvature)
    k_t = base optimizer update  (-lr g, -lr m/(sqrt(v)+eps), -lr mhat/(sqrt(vhat)+eps),
                                  or -lr (G+)^-1 Q_u (A+)^-1 for the Kronecker base)

Outer-product model of the value Hessian, per sample i (zeta = B delta is the
unnormalised per-sample gradient; the joint V_xx of the mean is 1/B of it)::

    V_hh^i ~ zeta_i zeta_i^T + eps_v I        (eps_v: Tikhonov on V_hh, ``vxx_reg``)
    sum_i Q_ux^i dx^i = (1/B) sum_i [ zeta_i c_i + eps_v r_i ] (x) a_i
    c_i = B g_t^i . dx^i,   r_i = (pre(xhat^i) - a^i) W_t^T      (h-change from the input)

so the feedback is a weighted weight-gradient with per-sample cotangent
delta_i c_i + (eps_v / B) r_i, at the *pre-update* activations a and deltas (no per-sample
Jacobian is formed; the factor B is put back, else the gain silently becomes 1/B)::

    d_t = -P_t weightgrad(a_t, delta_t * c + eps_v r / B)
    u*_t = u_t + k_t + gamma_t d_t,     xhat_{t+1} = f_t(xhat_t, u*_t),   xhat_0 = x_0

gamma_t = ``gain`` (a number; 1 is the paper's literal DDP policy), or ``gain="auto"``:
the exact minimiser along d_t of the quadratic model Q with the Gauss-Newton curvature
of the same outer-product model (rather than M/lr, whose scale comes from batch-mean
gradients while the feedback is a sum of per-sample terms)::

    s_i = zeta_i . (a_i d_W^T + d_b),  q_i = a_i d_W^T + d_b
    gamma_t = clip( -(mean c s + eps_v mean r.q) / (mean s^2 + eps_v mean q.q), 0, gain_max)
    gamma_t <- min(gamma_t, trust |k_t| / |d_t|)     (trust bound; 0 disables it)

Defaults: gain="auto", vxx_reg=1, trust=0.3 (the literal paper policy is gain=1, vxx_reg=0,
trust=0; it diverges at large learning rates, see docs/ddp.md).

Data parallel (``comm`` set; W ranks, equal shards of B_l = B/W samples): every sum above
carries the 1/B_l of the local mean (delta, the eps_v r / B_l term, the gain's means), so
each is a local batch mean and the global one is their mean over ranks: J, Q_u, the
feedback weight-gradient per stage, the gain's numerator and denominator, and the
Kronecker factors A, G are all-reduced (mean); c_i = B_l g^i.dx^i stays per-sample.

With ``feedback=False`` the step is exactly the base optimizer (torch.optim for sgd,
momentum, rmsprop, adam). Derivation, scaling and the joint-batch view: docs/ddp.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..bridge.modules import ModuleStage
from ..dynamics.activations import activation
from ..dynamics.fields import ActivationField
from ..dynamics.layers import Conv2d as ConvStage
from ..dynamics.layers import Dense, Residual
from ..dynamics.mesh import EulerStage
from ..models import ResidualBlock
from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem
from ..ocp.stage import Controls, Stage
from .base import Solver, StepInfo, grad_norm, register

BASES = ("sgd", "momentum", "rmsprop", "adam", "kfac")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3, "kfac": 1e-2}


# ------------------------------------------------------------------ stage structure
@dataclass
class LayerSplit:
    """A stage as x -> a = pre(x) -> h = lin(a, u) -> out = post(a, h)."""

    pre: Callable[[Tensor], Tensor]
    post: Callable[[Tensor, Tensor], Tensor]
    kind: str  # "linear" or "conv"
    has_bias: bool  # whether the bias is a control (controls = (W, b) or (W,))
    fixed_bias: Tensor | None = None
    conv: tuple = (1, 0, 1, 1)  # stride, padding, dilation, groups

    def lin(self, a: Tensor, u: Controls, bias: bool = True) -> Tensor:
        b = (u[1] if self.has_bias else self.fixed_bias) if bias else None
        if self.kind == "linear":
            return F.linear(a, u[0], b)
        s, p, d, g = self.conv
        return F.conv2d(a, u[0], b, s, p, d, g)

    def weight_grad(self, a: Tensor, dh: Tensor, w_shape: torch.Size) -> tuple[Tensor, ...]:
        """sum over the batch of the weight (and bias) gradient with cotangent dh at h."""
        if self.kind == "linear":
            gw = dh.reshape(-1, dh.shape[-1]).T @ a.reshape(-1, a.shape[-1])
            gb = dh.reshape(-1, dh.shape[-1]).sum(0)
        else:
            s, p, d, g = self.conv
            gw = torch.nn.grad.conv2d_weight(a, w_shape, dh, s, p, d, g)
            gb = dh.sum((0, 2, 3))
        return (gw, gb) if self.has_bias else (gw,)

    def patches(self, a: Tensor, w_shape: torch.Size) -> Tensor:
        """Inputs of the affine map as rows (N, fan_in) (+ a column of ones for the bias)."""
        if self.kind == "linear":
            rows = a.reshape(-1, a.shape[-1])
        else:
            s, p, d, _ = self.conv
            cols = F.unfold(a, w_shape[2:], dilation=d, padding=p, stride=s)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows


def _seq(mods: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for m in mods:
            x = m(x)
        return x
    return run


def _names(stage: ModuleStage) -> list[str]:
    return [n for n, p in stage.parametric.named_parameters() if p.requires_grad]


def layer_split(stage: Stage, t: int) -> LayerSplit | None:
    """The structure DDPNOpt needs, or None for a stage without controls."""
    if not stage.controls:
        return None
    if isinstance(stage, ModuleStage):
        p, names = stage.parametric, _names(stage)
        pre, after = _seq(stage.before), _seq(stage.after)
        if isinstance(p, nn.Linear | nn.Conv2d) and names in (["weight"], ["weight", "bias"]):
            if isinstance(p, nn.Conv2d) and p.padding_mode != "zeros":
                raise ConfigError(f"ddpnopt: stage {t} ({stage.describe()}) uses padding_mode="
                                  f"{p.padding_mode!r}; only 'zeros' is supported")
            fixed = None if "bias" in names else p.bias
            if isinstance(p, nn.Linear):
                return LayerSplit(pre, lambda a, h: after(h), "linear", "bias" in names, fixed)
            if isinstance(p.padding, str):
                raise ConfigError(f"ddpnopt: stage {t} ({stage.describe()}) has padding="
                                  f"{p.padding!r}; give the padding as numbers")
            return LayerSplit(pre, lambda a, h: after(h), "conv", "bias" in names, fixed,
                              (p.stride, p.padding, p.dilation, p.groups))
        if isinstance(p, ResidualBlock) and names in (["linear.weight"],
                                                      ["linear.weight", "linear.bias"]):
            act, step = activation(p.activation), p.h
            return LayerSplit(pre, lambda a, h: after(a + step * act(h)), "linear",
                              len(names) == 2, None if len(names) == 2 else p.linear.bias)
    elif isinstance(stage, Dense):
        act = activation(stage.activation_name)
        return LayerSplit(lambda x: x, lambda a, h: act(h), "linear", len(stage.controls) == 2)
    elif isinstance(stage, Residual):
        act, step = activation(stage.activation_name), stage.h
        return LayerSplit(lambda x: x, lambda a, h: a + step * act(h), "linear",
                          len(stage.controls) == 2)
    elif isinstance(stage, ConvStage):
        act = activation(stage.activation_name)
        return LayerSplit(lambda x: x, lambda a, h: act(h), "conv", len(stage.controls) == 2,
                          None, (stage.stride, stage.padding, 1, 1))
    elif isinstance(stage, EulerStage) and type(stage.field) is ActivationField:
        act, step = activation(stage.field.activation_name), stage.h
        return LayerSplit(lambda x: x, lambda a, h: a + step * act(h), "linear", True)
    raise ConfigError(
        f"ddpnopt cannot handle stage {t} ({stage.describe()}, a {type(stage).__name__}): it "
        "needs stages whose controls enter through one dense or conv layer (to_problem stages "
        "of nn.Linear / nn.Conv2d / ocnet.models.ResidualBlock, dynamics.Dense / Residual / "
        "Conv2d, EulerStage of an ActivationField). Use --solver ddp (small problems) or a "
        "gradient solver for this problem"
    )


@dataclass
class _Record:
    """What the backward pass keeps of stage t, at the pre-update controls."""

    a: Tensor  # pre(x_t)
    delta: Tensor  # dJ/dh_t (per-sample rows, carrying 1/B)
    g_x: Tensor | None  # dJ/dx_t
    w_old: Tensor  # the weight before the update (a copy when the eps_v term needs it)
    u_old: Controls = ()  # all controls before the update (copies when needed)


# ------------------------------------------------------------------ the solver
class DDPNOpt(Solver):
    """DDPNOpt on a network's problem; see the module docstring for the equations.

    Args:
        problem: stages of dense/conv/residual layers (see :func:`layer_split`).
        base: ``sgd``, ``momentum``, ``rmsprop``, ``adam`` (torch.optim; Q_uu = identity or
            adaptive diagonal) or ``kfac`` (Kronecker-factored Gauss-Newton, own code).
        lr: the base optimizer's learning rate (default ``DEFAULT_LR[base]``).
        feedback: apply the feedback policy (False: exactly the base optimizer).
        gain: the feedback gain gamma, a number or ``"auto"`` (see above).
        gain_max: the upper clip of the auto gain.
        vxx_reg: eps_v, the Tikhonov regularisation of the per-sample V_hh.
        curvature_floor: the feedback uses lr / max(denom, floor * mean(denom)) per tensor
            for the adaptive bases (guards dead inputs/units whose denom is ~eps).
        damping, ema, kfac_every: Kronecker base: Tikhonov damping lambda (pi-split),
            factor averaging, and how often the factor inverses are recomputed.
        trust: bound on the feedback step relative to the base step of the same stage,
            |gamma_t d_t| <= trust |k_t| (0 disables it).
        **options: passed to the torch.optim class (betas, eps, alpha, momentum, ...).
    """

    name = "ddpnopt"
    supports_comm = True

    def __init__(self, problem: Problem, lr: float | None = None, *, base: str = "adam",
                 feedback: bool = True, gain: float | str = "auto", gain_max: float = 1.0,
                 vxx_reg: float = 1.0, curvature_floor: float = 0.1, damping: float = 1e-3,
                 ema: float = 0.95, kfac_every: int = 1, trust: float = 0.3,
                 **options: Any) -> None:
        super().__init__(problem)
        if base not in BASES:
            raise unknown_name("ddpnopt base optimizer", base, BASES)
        if lr is not None and not lr > 0:
            raise ConfigError(f"ddpnopt: lr must be positive, got {lr}")
        if not (gain == "auto" or (isinstance(gain, int | float) and gain >= 0)):
            raise ConfigError(f"ddpnopt: gain must be a number >= 0 or 'auto', got {gain!r}")
        if vxx_reg < 0 or curvature_floor < 0 or damping <= 0 or not 0 <= ema < 1:
            raise ConfigError("ddpnopt: need vxx_reg >= 0, curvature_floor >= 0, damping > 0, "
                              f"0 <= ema < 1; got {vxx_reg}, {curvature_floor}, {damping}, {ema}")
        self.base, self.feedback = base, bool(feedback)
        self.name = f"ddpnopt-{base}"
        self.lr = DEFAULT_LR[base] if lr is None else float(lr)
        self.gain, self.gain_max = gain, float(gain_max)
        self.vxx_reg, self.curvature_floor = float(vxx_reg), float(curvature_floor)
        self.damping, self.ema, self.kfac_every = float(damping), float(ema), int(kfac_every)
        if trust < 0:
            raise ConfigError(f"ddpnopt: trust must be >= 0 (0 disables it), got {trust}")
        self.trust = float(trust)
        self.splits = [layer_split(s, t) for t, s in enumerate(problem.stages)]
        #: set True to keep, per controlled stage of the last feedback pass, a dict with
        #: t, dx (xhat_t - x_t), d (the feedback direction d_t), gamma, c (the weights c_i)
        self.debug = False
        self.last_debug: list[dict[str, Any]] = []
        params = problem.parameters()
        if not params:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        if base == "kfac":
            if options:
                raise ConfigError(f"ddpnopt base kfac takes no torch.optim options: {options}")
            self.optimizer = None
            self.kfac_state: list[dict[str, Tensor]] = [{} for _ in problem.stages]
        else:
            if base == "momentum":
                options.setdefault("momentum", 0.9)
            if base == "rmsprop" and options.get("centered", False):
                raise ConfigError("ddpnopt: centered RMSprop is not supported (its curvature "
                                  "is not sqrt(v)+eps); use centered=False")
            if base == "adam" and options.get("amsgrad", False):
                raise ConfigError("ddpnopt: amsgrad is not supported; use amsgrad=False")
            cls = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD,
                   "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base]
            self.optimizer = cls(params, lr=self.lr, **options)

    # -------------------------------------------------------------- forward/backward
    def _forward_backward(self, x0: Tensor, y: Tensor | None
                          ) -> tuple[Tensor, list[Controls], list[_Record | None], list[Tensor]]:
        """J, dJ/du, per-stage records and the states, from local graphs at the old controls."""
        xs, graphs, costs = [x0], [], []
        for t, stage in enumerate(self.problem.stages):
            sp = self.splits[t]
            with torch.enable_grad():
                x_ = xs[-1].detach().requires_grad_(t > 0)
                # leaves sharing the live storage: the optimizer changes them in place only
                # after this step's backward sweep is complete
                u_ = tuple(v.detach().requires_grad_(True) for v in stage.controls)
                if sp is None:
                    a, h, out = None, None, stage.f(x_, u_)
                else:
                    a = sp.pre(x_)
                    h = sp.lin(a, u_)
                    out = sp.post(a, h)
                c = stage.cost(x_, u_)
            graphs.append((x_, u_, a, h, out, c))
            costs.append(None if c is None else c.detach())
            xs.append(out.detach())
        with torch.enable_grad():
            xT = xs[-1].detach().requires_grad_(True)  # noqa: N806
            phi = self.problem.terminal(xT, y)
            (g,) = torch.autograd.grad(phi, xT)
        J = phi.detach() + sum(c for c in costs if c is not None)  # noqa: N806
        grads: list[Controls] = [()] * self.problem.T
        records: list[_Record | None] = [None] * self.problem.T
        for t in reversed(range(self.problem.T)):
            x_, u_, a, h, out, c = graphs[t]
            outs, cots = [out], [g]
            if c is not None:
                outs.append(c)
                cots.append(torch.ones_like(c))
            inputs = ([x_] if t > 0 else []) + ([h] if h is not None else []) + list(u_)
            if not inputs:  # a control-free first stage (e.g. a zero-pad lift): nothing to pull
                continue
            res = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
            res = [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res,
                                                                            strict=True)]
            g_x = res[0] if t > 0 else None
            off = (1 if t > 0 else 0) + (1 if h is not None else 0)
            grads[t] = tuple(res[off:])
            if h is not None:
                keep = self.feedback and (self.vxx_reg > 0 or self.trust > 0)
                u_old = tuple(v.detach().clone() if keep else v.detach() for v in u_)
                records[t] = _Record(a.detach(), res[off - 1], g_x, u_old[0], u_old)
            if g_x is not None:
                g = g_x
        return J, grads, records, xs

    # -------------------------------------------------------------- curvature
    def _inverse_curvatures(self) -> dict[int, Tensor | float]:
        """P = lr / denom for every control tensor (id -> tensor; a float lr for sgd/momentum).

        denom is the base optimizer's own (sqrt(v) + eps, bias-corrected for Adam), floored
        at ``curvature_floor`` times its mean over the tensor, so dead inputs or units whose
        denom is ~eps do not get an lr/eps gain on the feedback.
        """
        group = self.optimizer.param_groups[0]
        lr = group["lr"]
        params = self.problem.parameters()
        if self.base in ("sgd", "momentum"):
            return {id(p): lr for p in params}
        if self.base == "rmsprop":
            denom = torch._foreach_sqrt([self.optimizer.state[p]["square_avg"] for p in params])
        else:
            # the step count lives on the host (torch.optim keeps it there unless capturable)
            step = float(self.optimizer.state[params[0]]["step"])
            bc2 = math.sqrt(1 - group["betas"][1] ** step)
            denom = torch._foreach_sqrt([self.optimizer.state[p]["exp_avg_sq"] for p in params])
            torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, group["eps"])
        if self.curvature_floor > 0:
            sums = torch._foreach_norm(denom, 1)
            floors = [self.curvature_floor * s_ / d.numel() for s_, d in zip(sums, denom,
                                                                            strict=True)]
            denom = torch._foreach_maximum(denom, floors)
        inv = torch._foreach_reciprocal(denom)
        torch._foreach_mul_(inv, lr)
        return {id(p): v for p, v in zip(params, inv, strict=True)}

    def _kfac_update_factors(self, t: int, rec: _Record, w_shape: torch.Size) -> None:
        sp, st = self.splits[t], self.kfac_state[t]
        B = rec.delta.shape[0]  # noqa: N806
        rows = sp.patches(rec.a, w_shape)
        A = rows.T @ rows / rows.shape[0]  # noqa: N806
        zeta = (B * rec.delta)
        zeta = zeta.transpose(1, -1).reshape(-1, zeta.shape[1]) if sp.kind == "conv" else \
            zeta.reshape(-1, zeta.shape[-1])
        G = zeta.T @ zeta / B  # noqa: N806
        A, G = self.reduce_mean([A, G])  # noqa: N806 - data parallel: means over ranks
        if "A" not in st:
            st["A"], st["G"] = A, G
        else:
            st["A"].mul_(self.ema).add_(A, alpha=1 - self.ema)
            st["G"].mul_(self.ema).add_(G, alpha=1 - self.ema)
        if "Ainv" not in st or self.steps % self.kfac_every == 0:
            # pi-damping (Martens & Grosse 2015): split lambda between the two factors
            a_, g_ = st["A"], st["G"]
            pi = torch.sqrt((torch.trace(a_) / a_.shape[0]) / (torch.trace(g_) / g_.shape[0])
                            .clamp_min(1e-30)).clamp(1e-4, 1e4)
            lam = math.sqrt(self.damping)
            st["Ainv"] = torch.linalg.inv(a_ + pi * lam * torch.eye(a_.shape[0], dtype=a_.dtype,
                                                                     device=a_.device))
            st["Ginv"] = torch.linalg.inv(g_ + lam / pi * torch.eye(g_.shape[0], dtype=g_.dtype,
                                                                     device=g_.device))

    def _kfac_apply(self, t: int, gs: Controls) -> tuple[Tensor, ...]:
        """lr (G+)^-1 [gW, gb] (A+)^-1 per stage (the Kronecker inverse curvature times lr)."""
        st, sp = self.kfac_state[t], self.splits[t]
        gw = gs[0].reshape(gs[0].shape[0], -1)
        mat = torch.cat([gw, gs[1][:, None]], dim=1) if sp.has_bias else gw
        sol = self.lr * (st["Ginv"] @ mat @ st["Ainv"])
        out = [sol[:, :gw.shape[1]].reshape(gs[0].shape)]
        if sp.has_bias:
            out.append(sol[:, -1])
        return tuple(out)

    def _precondition(self, t: int, gs: Controls, P: dict[int, Tensor | float] | None  # noqa: N803
                      ) -> tuple[Tensor, ...]:
        if self.base == "kfac":
            return self._kfac_apply(t, gs)
        return tuple(P[id(u)] * g for u, g in zip(self.problem.stages[t].controls, gs,
                                                  strict=True))

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def _base_step(self, grads: list[Controls], records: list[_Record | None]) -> None:
        if self.optimizer is not None:
            for stage, gs in zip(self.problem.stages, grads, strict=True):
                for u, g in zip(stage.controls, gs, strict=True):
                    u.grad = g
            self.optimizer.step()
            for u in self.problem.parameters():
                u.grad = None
            return
        for t, stage in enumerate(self.problem.stages):
            if not stage.controls:
                continue
            self._kfac_update_factors(t, records[t], stage.controls[0].shape)
            for u, k in zip(stage.controls, self._kfac_apply(t, grads[t]), strict=True):
                u.sub_(k)

    @torch.no_grad()
    def _feedback_pass(self, x0: Tensor, y: Tensor | None, xs: list[Tensor],
                       records: list[_Record | None]) -> tuple[Tensor, list[Tensor]]:
        B = x0.shape[0]  # noqa: N806
        xhat = x0
        gains: list[Tensor] = []
        self.last_debug = []
        P = None if self.base == "kfac" else self._inverse_curvatures()  # noqa: N806
        moved = False  # whether xhat can differ from x (a controlled stage came before)
        for t, stage in enumerate(self.problem.stages):
            sp, rec = self.splits[t], records[t]
            if sp is not None and moved:
                dx = xhat - xs[t]
                c = (rec.g_x * dx).reshape(B, -1).sum(1).mul_(B)
                cot = rec.delta * c.reshape((B,) + (1,) * (rec.delta.dim() - 1))
                r = None
                if self.vxx_reg > 0:
                    r = sp.lin(sp.pre(xhat) - rec.a, (rec.w_old,), bias=False)
                    cot.add_(r, alpha=self.vxx_reg / B)
                wg = sp.weight_grad(rec.a, cot, stage.controls[0].shape)
                wg = tuple(self.reduce_mean(list(wg)))  # a local batch mean per rank
                d = self._precondition(t, wg, P)  # d_t = -this
                gamma = self._gain(sp, rec, d, c, r, B, x0)
                if self.trust > 0:  # |gamma d| <= trust |k|
                    k_sq = sum(((u - u0) ** 2).sum() for u, u0 in zip(stage.controls, rec.u_old,
                                                                     strict=True))
                    d_sq = sum((v * v).sum() for v in d)
                    bound = self.trust * torch.sqrt(k_sq / d_sq)
                    gamma = torch.minimum(gamma, torch.nan_to_num_(bound, 0.0, 0.0, 0.0))
                gains.append(gamma)
                if self.debug:
                    self.last_debug.append({"t": t, "dx": dx, "d": tuple(-v for v in d),
                                            "gamma": gamma, "c": c})
                for u, di in zip(stage.controls, d, strict=True):
                    # non-finite feedback entries are dropped (the base update stays)
                    u.sub_(torch.nan_to_num_(di.mul_(gamma), 0.0, 0.0, 0.0))
            if stage.controls:
                moved = True
            xhat = stage.f(xhat, stage.controls)
        (phi,) = self.reduce_mean([self.problem.terminal(xhat, y)])
        return phi, gains

    def _gain(self, sp: LayerSplit, rec: _Record, d: tuple[Tensor, ...], c: Tensor,
              r: Tensor | None, B: int, like: Tensor) -> Tensor:  # noqa: N803
        """gamma_t; ``d`` here is -d_t (the gain formula is written for d_t)."""
        if self.gain != "auto":
            return torch.as_tensor(float(self.gain), dtype=like.dtype, device=like.device)
        q = sp.lin(rec.a, d, bias=sp.has_bias)  # -(h-change of the samples caused by d_t)
        s = (rec.delta * q).reshape(B, -1).sum(1)  # -s_i / B
        num = (c * s).mean() * B
        den = (s * s).mean() * (B * B)
        if r is not None:
            num = num + self.vxx_reg * (r * q).sum() / B
            den = den + self.vxx_reg * (q * q).sum() / B
        if self.comm is not None:  # both are local batch means
            num, den = self.reduce_mean([num, den])
        gamma = num / den  # = -(mean c s + eps mean r.q) / (mean s^2 + eps mean q.q) for d_t
        return torch.nan_to_num_(gamma, 0.0, 0.0, 0.0).clamp_(0.0, self.gain_max)

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        J, grads, records, xs = self._forward_backward(x0, y)  # noqa: N806
        J, grads = self.reduce_grads(J, grads)  # noqa: N806 - data parallel: mean over ranks
        self._base_step(grads, records)
        extra: dict[str, Any] = {}
        if self.feedback:
            loss_after, gains = self._feedback_pass(x0, y, xs, records)
            extra = {"loss_after_phi": loss_after, "gains": gains}
        return StepInfo(loss=J, accepted=True, grad_norm=grad_norm(grads), extra=extra)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the base optimizer's state, when there is one
        if self.optimizer is None:
            state["kfac"] = [{k: v.clone() for k, v in s.items()} for s in self.kfac_state]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.optimizer is None and "kfac" in state:
            self.kfac_state = [{k: v.clone() for k, v in s.items()} for s in state["kfac"]]


def _factory(problem: Problem, lr: float | None = None, **options: Any) -> DDPNOpt:
    return DDPNOpt(problem, lr=lr, **options)


register("ddpnopt", _factory, "DDPNOpt: layer-wise DDP feedback policy on a base optimizer's "
         "curvature (base=sgd|momentum|rmsprop|adam|kfac, gain=auto|number, vxx_reg)")
