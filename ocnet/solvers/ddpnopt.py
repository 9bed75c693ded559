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

Defaults (outer model): gain=1, vxx_reg=0, trust=0.3: the paper's literal step on the
factorised model (Alg. 3: one learning rate on k and K, no Tikhonov term) inside a trust
region of 0.3 |k_t|. Chosen from the 10-seed learning-rate sweep (docs/ddp.md, "The
paper's two claims"): without the region the literal step collapses at all but the
smallest rates; with it, it is never below its base beyond the seed spread except at
Adam's two largest rates and is the cheapest feedback (~1.5-1.6x Adam per step); the
former default (auto gain, vxx_reg 1) loses at large rates and costs ~1.8-1.9x.

Exact mode (``vxx="exact"``; docs/ddp.md, "Exact mode"): per sample, unnormalised
(hats, B times the joint quantities), F^i = dx_{t+1}/dx_t, S^i = dpost/dz, abar = [a; 1]::

    Vhat_x^T = d phi(x_T^i),  Vhat_xx^T = d2 phi(x_T^i)   (terminal_hessian="outer": g g^T)
    Vhat_h = S^T Vhat'_x,  Qhat_x = F^T Vhat'_x,  Qhat_xx = F^T Vhat'_xx F,
    H = S^T Vhat'_xx F,    Qhat_ux^i delta = (H^i delta) (x) abar^i      (Gauss-Newton)
    Q_u = weightgrad(a, Vhat_h / B) + l_u,  k_t = base step with Q_u,  P_t = lr M_t^-1
    R^i = Qhat_ux^iT P_t Qhat_ux^i  (diagonal P: H^T diag(rho^i) H, rho_k = sum_l P_kl abar_l^2)
    Vhat_xx = Qhat_xx - c_B (2 gamma - gamma^2) R + eps_v I,   c_B = 1/B ("joint") or 1
    Vhat_x = Qhat_x ("backprop")  or  Qhat_x + H^T (D abar), D = -P_t Q_u ("ddp")
    d_t = -P_t weightgrad(a_t, (H dx) / B),  u*_t = u_t + k_t + gamma d_t   (gamma = 1)

``second_order=True`` expands the dynamics to the second order (per sample, autograd of
Vhat'_x . f): Qhat_xx += d2/dx2 (Vhat'_x . f), Qhat_ux^i delta += T^i delta with
T^i = d/dx grad_u (Vhat'_x . f); then R^i, the ddp V_x and d_t use the full Qhat_ux^i.

Data parallel (``comm`` set; W ranks, equal shards of B_l = B/W samples): every sum above
carries the 1/B_l of the local mean (delta, the eps_v r / B_l term, the gain's means), so
each is a local batch mean and the global one is their mean over ranks: J, Q_u, the
feedback weight-gradient per stage, the gain's numerator and denominator, and the
Kronecker factors A, G are all-reduced (mean); c_i = B_l g^i.dx^i stays per-sample.

With ``feedback=False`` the step is exactly the base optimizer (the curvature objects of
:mod:`ocnet.solvers.curvature`, equal to torch.optim for sgd, momentum, rmsprop, adam).
Everything the step needs of the network comes from the problem's one sweep
(``Problem.value_and_gradients(intermediates=True)``: a_t, dJ/dz_t, dJ/dx_t) and its
policy rollout (``Problem.policy_rollout``); the stages describe their affine parts.
Derivation, scaling and the joint-batch view: docs/ddp.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacfwd, jacrev, vmap

from ..dynamics.activations import ACTIVATION_MODULES
from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem, StageRecord
from ..ocp.stage import Controls
from ..ocp.structure import Affine
from .base import GATE_REASON, Solver, StepInfo, grad_norm, register
from .compiled import compile_mode, maybe_compile
from .curvature import SGD, Adam, Kronecker, RMSprop, load_state, make_curvature, state_to_dict

BASES = ("sgd", "momentum", "rmsprop", "adam", "kfac")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3, "kfac": 1e-2}
#: the value-Hessian models: today's outer-product model, or the exact per-sample one
VXX_MODES = ("outer", "exact")
#: exact mode's V_x: the backpropagated gradient, or DDP's Q_x + Q_ux^T (-P Q_u) (Eq. 5)
VX_MODES = ("backprop", "ddp")
#: exact mode's factor on R^i = Qhat_ux^T P Qhat_ux: 1/B (block diagonal of the joint
#: batch DDP) or 1 (Eq. 5 literally per sample)
C_B_MODES = ("joint", "per_sample")
#: exact mode's terminal Hessian: per-sample d2 phi, or the gradient outer product (ablation)
TERMINAL_HESSIANS = ("exact", "outer")
#: exact mode's default eps_v (Tikhonov term on Vhat_xx at x_t; see docs/ddp.md, Exact mode)
EXACT_VXX_REG = 0.1
#: parameter-free maps after a dense layer that act entry by entry (the activation modules)
_ELEMENTWISE = tuple(ACTIVATION_MODULES.values())


def _min_eig(mats: Tensor) -> Tensor:
    """The smallest eigenvalue of a batch of symmetric matrices (a diagnostic: computed in
    float64; NaN where LAPACK does not converge)."""
    try:
        return torch.linalg.eigvalsh(mats.to(torch.float64)).min().to(mats.dtype)
    except torch.linalg.LinAlgError:
        return mats.new_full((), float("nan"))


def _hypot(norms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """sqrt(sum of squares) of a few 0-d norms (the norm of their concatenation)."""
    out = norms[0]
    for n in norms[1:]:
        out = torch.hypot(out, n)
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all entries."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _rate(flags: list[Tensor], like: Tensor) -> Tensor:
    """The fraction of True flags (0 without any), as a device tensor (no host read)."""
    return torch.stack(flags).to(like.dtype).mean() if flags else like.new_zeros(())


def feedback_direction(aff: Affine, xhat: Tensor, x: Tensor, g: Tensor, dz: Tensor,
                       a: Tensor, w_shape: torch.Size, w_old: Tensor | None,
                       den: list[Tensor] | None, vxx_reg: float, reduce: Any = None,
                       precondition: Any = None
                       ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor | None,
                                  Tensor, Tensor]:
    """One stage's feedback direction D_t (d_t = -unit D_t; see ``_feedback_pass``).

    c'_i = g^i . dx^i, cot = delta c' (+ eps_v r / B^2), wg = weightgrad(a, cot) (1/B of
    the true one), D = wg / den (``den`` None: M = I; ``precondition``: the Kronecker base),
    non-finite entries dropped. ``reduce`` all-reduces wg (data parallel). Returns
    (D, wg, r, c', dx). A function of tensors only: the compiled path traces it."""
    B = x.shape[0]  # noqa: N806
    dx = xhat - x
    if dx.dim() == 2:
        c = torch.linalg.vecdot(g, dx)
        cot = dz * c.unsqueeze(1)
    else:
        c = torch.linalg.vecdot(g.reshape(B, -1), dx.reshape(B, -1))
        cot = dz * c.reshape((B,) + (1,) * (dz.dim() - 1))
    r = None
    if w_old is not None:  # h-change from the input at the old weights u - k
        r = aff.lin(aff.pre(xhat) - a, (w_old,), bias=False)
        cot.add_(r, alpha=vxx_reg / B ** 2)
    wg = aff.weight_grad(a, cot, w_shape)
    if reduce is not None:
        wg = tuple(reduce(list(wg)))  # a local batch mean per rank
    if precondition is not None:
        D = precondition(wg)  # noqa: N806
    elif den is not None:
        D = tuple(torch._foreach_div(wg, den))  # noqa: N806
    else:
        D = tuple(wg)  # noqa: N806
    for v in D:  # non-finite feedback entries are dropped (the base update stays)
        torch.nan_to_num_(v, 0.0, 0.0, 0.0)
    return D, wg, r, c, dx


def bounded_ratio(D: tuple[Tensor, ...], theta: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
    """rho = theta / max(theta, |D|) and |D| (the trust bound of a fixed gain)."""
    d_norm = _hypot(torch._foreach_norm(D))
    return theta.div(torch.maximum(theta, d_norm)), d_norm


def apply_feedback(controls: tuple[Tensor, ...], D: tuple[Tensor, ...],  # noqa: N803
                   ratio: Tensor | None, scale: float) -> None:
    """controls -= scale ratio D in place (one foreach operation)."""
    if ratio is None:
        torch._foreach_add_(controls, D, alpha=-scale)
    else:
        torch._foreach_addcmul_(controls, D, [ratio] * len(D), value=-scale)


def fixed_gain_stage(aff: Affine, xhat: Tensor, x: Tensor, g: Tensor, dz: Tensor, a: Tensor,
                     w_old: Tensor | None, den: list[Tensor] | None, vxx_reg: float,
                     controls: tuple[Tensor, ...], theta: Tensor | None, scale: float
                     ) -> tuple[Tensor | None, Tensor | None]:
    """The whole feedback of one stage with a fixed gain (what ``compile=`` compiles):
    D_t, the trust ratio (``theta`` None: none) and the in-place update; (rho, |D|)."""
    D = feedback_direction(aff, xhat, x, g, dz, a, controls[0].shape, w_old, den,  # noqa: N806
                           vxx_reg)[0]
    ratio = d_norm = None
    if theta is not None:
        ratio, d_norm = bounded_ratio(D, theta)
    apply_feedback(controls, D, ratio, scale)
    return ratio, d_norm


@dataclass
class _Exact:
    """What the exact backward pass keeps of a controlled stage t for the feedback pass.

    ``a`` = pre(x_t) (B, n_a); ``abar`` = [a, 1] (B, n_a+1; [a] without a bias control);
    ``H`` = S^T Vhat'_xx F (B, n_z, n), so Qhat_ux^i delta = (H^i delta) (x) abar^i;
    ``P`` the inverse curvature lr M^-1 (a float for M = I, a weight-shaped
    (n_z, n_a+1) matrix for a diagonal M, ``None`` for the Kronecker base, whose factors
    stay in the solver's state); ``k`` the base step (added to the controls).
    """

    a: Tensor
    abar: Tensor
    H: Tensor
    P: Tensor | float | None
    k: Controls
    #: second_order: Qhat_ux^i delta = (H^i delta) (x) abar^i + v^i (x) (J^i delta), with H
    #: including d/dx (S^T Vhat'_x); ``v`` = S^T Vhat'_x (B, n_z), ``J`` = [da/dx; 0]
    #: (B, n_a+1, n) (``None`` without ``second_order``)
    v: Tensor | None = None
    J: Tensor | None = None


# ------------------------------------------------------------------ the solver
class DDPNOpt(Solver):
    """DDPNOpt on a network's problem; see the module docstring for the equations.

    Args:
        problem: stages that describe an affine part (``Stage.affine()``: dense, conv,
            residual and Euler layers; ``Problem.affine`` names the stage that does not).
        base: ``sgd``, ``momentum``, ``rmsprop``, ``adam`` (the curvature objects of
            :mod:`ocnet.solvers.curvature`, equal to torch.optim; Q_uu = identity or
            adaptive diagonal) or ``kfac`` (Kronecker-factored Gauss-Newton).
        lr: the base optimizer's learning rate (default ``DEFAULT_LR[base]``).
        feedback: apply the feedback policy (False: exactly the base optimizer; in exact
            mode with ``vx="ddp"`` the base is fed the DDP Q_u).
        gain: the feedback gain gamma, a number or ``"auto"`` (see above). Default: 1 (the
            paper's; in exact mode ``"auto"`` is refused).
        gain_max: the upper clip of the auto gain. ``StepInfo.extra["clip_rate"]`` is the
            fraction of feedback stages where the auto gain was clipped at 0 or gain_max.
        vxx_reg: eps_v, the Tikhonov term: on the per-sample V_hh (outer, default 0), or on
            Vhat_xx at every x_t, t < T (exact, default ``EXACT_VXX_REG``).
        curvature_floor: the feedback uses lr / max(denom, floor * mean(denom)) per tensor
            for the adaptive bases (guards dead inputs/units whose denom is ~eps).
        damping, ema, kfac_every: Kronecker base: Tikhonov damping lambda (pi-split),
            factor averaging, and how often the factor inverses are recomputed.
        trust: bound on the feedback step relative to the base step of the same stage,
            |gamma_t d_t| <= trust |k_t| (0 disables it). ``StepInfo.extra["cap_rate"]``
            is the fraction of stages where it bound. Default: 0.3 (outer), 0 (exact).
        vxx: the value-Hessian model: ``"outer"`` (the outer-product model above, the
            default) or ``"exact"`` (per-sample dense V_xx propagated backward; small dense
            and residual/Euler networks; see "Exact mode" above and docs/ddp.md).
        vx: exact mode's V_x: ``"backprop"`` (the gradient, default) or ``"ddp"``
            (Vhat_x = Qhat_x + Qhat_ux^T (-P Q_u), the paper's Eq. 5).
        c_b: exact mode's factor on R in V_xx: ``"joint"`` (1/B, the block diagonal of the
            joint-batch DDP, default) or ``"per_sample"`` (1, Eq. 5 per sample).
        terminal_hessian: exact mode's Vhat_xx^T: ``"exact"`` (per-sample d2 phi, default)
            or ``"outer"`` (ghat ghat^T, for ablations).
        second_order: exact mode: expand the dynamics to the second order (the paper's
            "fully expanded" case): Qhat_xx += d2/dx2 (Vhat'_x . f), Qhat_ux += d/dx
            grad_u (Vhat'_x . f) per sample (default False: Gauss-Newton in the dynamics).
        compile: ``False`` (default), ``True`` or an inductor mode (``"reduce-overhead"``:
            CUDA graphs on a GPU): the base update and the fixed-gain stage feedback under
            ``torch.compile`` (first-order bases, outer model; equal to the eager path to
            rounding; :mod:`ocnet.solvers.compiled`).
        **options: the base optimizer's options (betas, eps, alpha, momentum, ...).

    Presets (``make_solver("ddpnopt", problem, preset="paper")``): ``paper`` =
    ``vxx="exact", gain=1, trust=0`` (Alg. 3 of the paper: the exact per-sample V_xx and
    terminal Hessian, one learning rate on k and K, no cap; docs/ddp.md, "DDPNOpt as the
    paper defines it"). It is not the default: the exact model holds dense per-sample
    matrices (dense and residual layers of widths up to ~64) and costs 12-25x Adam's step.
    """

    name = "ddpnopt"

    def __init__(self, problem: Problem, lr: float | None = None, *, base: str = "adam",
                 feedback: bool = True, gain: float | str | None = None, gain_max: float = 1.0,
                 vxx_reg: float | None = None, curvature_floor: float = 0.1,
                 damping: float = 1e-3, ema: float = 0.95, kfac_every: int = 1,
                 trust: float | None = None, vxx: str = "outer", vx: str = "backprop",
                 c_b: str = "joint", terminal_hessian: str = "exact",
                 second_order: bool = False, compile: bool | str = False,
                 **options: Any) -> None:
        super().__init__(problem)
        if base not in BASES:
            raise unknown_name("ddpnopt base optimizer", base, BASES)
        for opt, value, valid in (("vxx", vxx, VXX_MODES), ("vx", vx, VX_MODES),
                                  ("c_b", c_b, C_B_MODES),
                                  ("terminal_hessian", terminal_hessian, TERMINAL_HESSIANS)):
            if value not in valid:
                raise unknown_name(f"ddpnopt {opt} option", value, valid)
        self.exact = vxx == "exact"
        self.vxx, self.vx, self.c_b, self.terminal_hessian = vxx, vx, c_b, terminal_hessian
        if second_order and not self.exact:
            raise ConfigError(
                "ddpnopt second_order=True adds the dynamics' second-order terms "
                "(Vhat'_x . f_ux, Vhat'_x . f_xx) to the exact per-sample model; the "
                "outer-product model has no place for them. Use vxx='exact' with it")
        self.second_order = bool(second_order)
        if gain is None:
            gain = 1.0
        if vxx_reg is None:
            vxx_reg = EXACT_VXX_REG if self.exact else 0.0
        if trust is None:
            trust = 0.0 if self.exact else 0.3
        if self.exact and gain == "auto":
            raise ConfigError(
                "ddpnopt vxx='exact': gain='auto' is the outer-product model's least-squares "
                "gain; along d_t = -P_t Q_ux dx the exact model with Q_uu = P_t^-1 is "
                "minimised at gamma = 1. Give a number (gain=1, the default, is the paper's)")
        if lr is not None and not lr > 0:
            raise ConfigError(f"ddpnopt: lr must be positive, got {lr}")
        if not (gain == "auto" or (isinstance(gain, int | float) and gain >= 0)):
            raise ConfigError(f"ddpnopt: gain must be a number >= 0 or 'auto', got {gain!r}")
        if vxx_reg < 0 or curvature_floor < 0 or damping <= 0 or not 0 <= ema < 1:
            raise ConfigError("ddpnopt: need vxx_reg >= 0, curvature_floor >= 0, damping > 0, "
                              f"0 <= ema < 1; got {vxx_reg}, {curvature_floor}, {damping}, {ema}")
        if trust < 0:
            raise ConfigError(f"ddpnopt: trust must be >= 0 (0 disables it), got {trust}")
        self.base, self.feedback = base, bool(feedback)
        self.name = f"ddpnopt-{base}"
        self.lr = DEFAULT_LR[base] if lr is None else float(lr)
        self.gain, self.gain_max = gain, float(gain_max)
        self.vxx_reg, self.curvature_floor = float(vxx_reg), float(curvature_floor)
        self.trust = float(trust)
        self.affines: list[Affine | None] = [problem.affine(t, needed_by="ddpnopt")
                                             for t in range(problem.T)]
        if self.exact:
            for t, aff in enumerate(self.affines):
                if aff is not None and aff.kind != "linear":
                    raise ConfigError(
                        f"ddpnopt vxx='exact' holds dense per-sample matrices and supports "
                        f"dense and residual/Euler stages; stage {t} "
                        f"({problem.stages[t].describe()}) is a {aff.kind} stage. Use "
                        "vxx='outer' (the default) for convolutional networks")
        #: exact mode, set True to keep per stage of the last backward pass a dict of the
        #: exact-model quantities (Q_u, H, Q_x, Q_xx, V_x, V_xx, R, k, ...); see _exact_backward
        self.last_backward: list[dict[str, Any] | None] = []
        self._last_exact: list[_Exact | None] = []
        #: set True to keep, per controlled stage of the last feedback pass, a dict with
        #: t, dx (xhat_t - x_t), d (the feedback direction d_t), gamma, c (the weights c_i)
        self.debug = False
        self.last_debug: list[dict[str, Any]] = []
        #: exact mode: report ``vxx_min_eig`` (an eigendecomposition of every Vhat_xx, 10-20 %
        #: of a step); set False to skip it (the entry is then NaN)
        self.diagnostics = True
        self.params = problem.parameters()
        self._denom: list[Tensor] | None = None  # the base step's denominators, this step
        if not self.params:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        if base == "kfac":
            if options:
                raise ConfigError(f"ddpnopt base kfac takes no first-order options: {options}")
            self.kronecker: Kronecker | None = Kronecker(self.lr, damping, ema, kfac_every)
            self.curvature = None
            self.state: Any = self.kronecker.init(problem.T)
        else:
            if base == "rmsprop" and options.get("centered", False):
                raise ConfigError("ddpnopt: centered RMSprop is not supported (its curvature "
                                  "is not sqrt(v)+eps); use centered=False")
            if base == "adam" and options.get("amsgrad", False):
                raise ConfigError("ddpnopt: amsgrad is not supported; use amsgrad=False")
            self.kronecker = None
            self.curvature = make_curvature(base, self.lr, **options)
            self.state = self.curvature.init(self.params)
        self.compile = compile_mode(compile, "ddpnopt")
        if self.compile is not None and (self.exact or self.kronecker is not None):
            raise ConfigError(
                "ddpnopt compile=True compiles the first-order base update and the fixed-gain "
                "feedback of the outer-product model; the exact model and the Kronecker base "
                "have no compiled path. Use compile=False with vxx='exact' or base='kfac'")
        self._base_update = None if self.curvature is None else maybe_compile(
            self.curvature.update_with_diagonal, compile, "ddpnopt")
        #: the fixed-gain stage feedback, eager or compiled (the auto gain, debug records
        #: and data parallel runs take the eager general path)
        self._fixed_gain_stage = maybe_compile(fixed_gain_stage, compile, "ddpnopt")

    # -------------------------------------------------------------- curvature
    def _inverse_curvatures(self, state: dict[str, Any] | None = None) -> list[Tensor] | float:
        """P = lr / denom for every control tensor of ``state`` (default: the solver's; a
        float lr for sgd/momentum).

        denom is the base optimizer's own (sqrt(v) + eps, bias-corrected for Adam), floored
        at ``curvature_floor`` times its mean over the tensor, so dead inputs or units whose
        denom is ~eps do not get an lr/eps gain on the feedback.
        """
        denom = self.curvature.diagonal(self.state if state is None else state)
        if denom is None:
            return self.lr
        inv = torch._foreach_reciprocal(self._floored_denominators(denom))
        torch._foreach_mul_(inv, self.lr)
        return inv

    def _kfac_factors(self, t: int, aff: Affine, rec: StageRecord, w_shape: torch.Size
                      ) -> None:
        B = rec.dz.shape[0]  # noqa: N806
        rows = aff.patches(rec.a, w_shape)
        A = rows.T @ rows / rows.shape[0]  # noqa: N806
        zeta = B * rec.dz
        zeta = zeta.transpose(1, -1).reshape(-1, zeta.shape[1]) if aff.kind == "conv" else \
            zeta.reshape(-1, zeta.shape[-1])
        G = zeta.T @ zeta / B  # noqa: N806
        A, G = self.reduce_mean([A, G])  # noqa: N806 - data parallel: means over ranks
        self.kronecker.update_factors(self.state, t, A, G,
                                      refresh=self.steps % self.kronecker.every == 0)

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def _base_step(self, grads: list[Controls], records: list[StageRecord | None]
                   ) -> list[Controls]:
        """Apply the base optimizer's step k_t to every stage; returns the k_t per stage
        (the feedback's trust bound and its V_hh term read them; no copies of controls)."""
        stages = self.problem.stages
        if self.curvature is not None:
            flat = [g for gs in grads for g in gs]
            k, self.state, self._denom = self._base_update(flat, self.state)
            torch._foreach_add_(self.params, k)
            out, i = [], 0
            for stage in stages:
                out.append(tuple(k[i:i + len(stage.controls)]))
                i += len(stage.controls)
            return out
        out = []
        for t, stage in enumerate(stages):
            if not stage.controls:
                out.append(())
                continue
            self._kfac_factors(t, self.affines[t], records[t], stage.controls[0].shape)
            steps = self.kronecker.apply(self.state, t, grads[t], self.affines[t].has_bias)
            for u, k in zip(stage.controls, steps, strict=True):
                u.sub_(k)
            out.append(tuple(-k for k in steps))
        return out

    def _feedback_pass(self, x0: Tensor, y: Tensor | None, xs: list[Tensor],
                       records: list[StageRecord | None], ks: list[Controls]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The new trajectory under u*_t = u_t + k_t + gamma_t d_t (``Problem.policy_rollout``):
        each stage's feedback is applied in place before the stage is evaluated. ``ks``: the
        base steps k_t already applied (u_t = controls - k_t at the time of the call).

        Written for few operations per stage (on small layers each costs more than its
        arithmetic): the factors common to every stage leave the loop. With c'_i = g^i . dx^i
        (c_i / B) and D_t = weightgrad(a_t, delta_t c') / M_t (M_t the floored denominators;
        1 for sgd/momentum; the Kronecker inverse for kfac), d_t = -unit D_t with unit = B lr
        (B for kfac), and the applied step is -gamma unit D_t, or under the trust bound
        |gamma_t d_t| <= T_t = trust |k_t|, gamma_t = min(gamma, T_t / (unit |D_t|))::

            gamma_t = gamma rho_t,   rho_t = theta_t / max(theta_t, |D_t|),
            theta_t = T_t / (gamma unit)

        whose thresholds theta_t come from one pass over every |k_t| before the rollout
        (floored at the smallest normal number, so that k_t = D_t = 0 gives no 0 / 0); the
        bound binds where |D_t| > theta_t.
        """
        B = x0.shape[0]  # noqa: N806
        stages = self.problem.stages
        raw: list[Tensor] = []  # the auto gains before the clip (for clip_rate)
        self.last_debug = []
        controlled = [t for t, kt in enumerate(ks) if kt]
        # the stages that get feedback: every controlled stage after the first (x̂_0 = x_0),
        # slot[t] their position; nothing is computed for the first one
        fed = controlled[1:]
        slot = {t: j for j, t in enumerate(fed)}
        auto = self.gain == "auto"
        offsets, k = [], 0
        for stage in stages:
            offsets.append(k)
            k += len(stage.controls)
        den: list[list[Tensor]] | None = None  # the floored M_t of each fed stage
        if self.kronecker is not None:
            unit = float(B)
        else:
            unit = B * self.lr
            denom = self._denom if self._denom is not None else \
                self.curvature.diagonal(self.state)
            if denom is not None and fed:
                flat = self._floored_denominators(
                    [v for t in fed for v in denom[offsets[t]:offsets[t] + len(ks[t])]])
                den, i = [], 0
                for t in fed:
                    den.append(flat[i:i + len(ks[t])])
                    i += len(ks[t])
        self._denom = None
        limits = thresholds = thr = None
        scale = unit if auto else float(self.gain) * unit  # the applied step: scale ratio D
        if self.trust > 0 and fed:
            norms = torch.stack(torch._foreach_norm([v for t in fed for v in ks[t]]))
            if len({len(ks[t]) for t in fed}) == 1:  # as many tensors per stage (W, b)
                k_norms = torch.linalg.vector_norm(norms.view(len(fed), -1), dim=1)
            else:
                index = torch.tensor([j for j, t in enumerate(fed) for _ in ks[t]],
                                     device=norms.device)
                k_norms = norms.new_zeros(len(fed)).index_add_(0, index, norms * norms).sqrt_()
            if auto:
                limits = (k_norms * self.trust).unbind()
            else:
                thr = k_norms * (self.trust / scale)
                thresholds = thr.clamp_min_(torch.finfo(thr.dtype).tiny).unbind()
        steps: list[Tensor] = []  # rho_t (fixed gain under the bound) or gamma_t (auto)
        bound: list[Tensor] = []  # |D_t| (fixed gain) or whether the bound bit (auto)
        fast = None
        if not auto and not self.debug and self.comm is None and self.kronecker is None:
            fast = self._fixed_gain_stage

        def policy(t: int, xhat: Tensor) -> None:
            stage, aff, rec = stages[t], self.affines[t], records[t]
            if t in slot:
                w_old = stage.controls[0] - ks[t][0] if self.vxx_reg > 0 else None
                j = slot[t]
                theta = None if thresholds is None else thresholds[j]
                if fast is not None:  # the fixed gain without debug records or ranks
                    ratio, d_norm = fast(aff, xhat, xs[t], rec.dx, rec.dz, rec.a, w_old,
                                         den[j] if den is not None else None,
                                         self.vxx_reg, stage.controls, theta, scale)
                    if theta is not None:
                        bound.append(d_norm)
                        steps.append(ratio)
                    return None
                reduce = None if self.comm is None else self.reduce_mean
                precondition = None if self.kronecker is None else \
                    self._kronecker_apply(t)
                D, wg, r, c, dx = feedback_direction(  # noqa: N806
                    aff, xhat, xs[t], rec.dx, rec.dz, rec.a, stage.controls[0].shape, w_old,
                    den[j] if den is not None else None, self.vxx_reg, reduce, precondition)
                ratio = None  # the tensor factor of the applied step
                if auto:
                    lim = None if limits is None else limits[j]
                    d = tuple(torch._foreach_mul(D, unit))  # -d_t
                    gamma = self._gain(aff, rec, d, tuple(torch._foreach_mul(wg, float(B))),
                                       r, B, raw)
                    if lim is not None:  # |gamma d| <= trust |k|
                        cap = torch.nan_to_num_(lim.div(_hypot(torch._foreach_norm(d))),
                                                0.0, 0.0, 0.0)
                        bound.append(cap < gamma)
                        gamma = torch.minimum(gamma, cap)
                    steps.append(gamma)
                    ratio = gamma
                elif theta is not None:
                    ratio, d_norm = bounded_ratio(D, theta)
                    bound.append(d_norm)
                    steps.append(ratio)
                if self.debug:
                    gamma = scale / unit if ratio is None else ratio * (scale / unit)
                    self.last_debug.append({"t": t, "dx": dx, "d": tuple(-unit * v for v in D),
                                            "gamma": torch.as_tensor(gamma), "c": c * B})
                apply_feedback(stage.controls, D, ratio, scale)
            return None

        with torch.no_grad():  # Phi along the new trajectory is all it reports
            traj = self.problem.policy_rollout(x0, y, policy, costs=False, split=True)
        (after,) = self.reduce_mean([traj.objective])
        zero = x0.new_zeros(())
        clip = rate = zero
        if auto:
            gains = torch.stack(steps) if steps else x0.new_zeros(0)
            if raw:  # clipped at 0 or gain_max, or not finite
                g = torch.stack(raw)
                clip = (~((g >= 0) & (g <= self.gain_max))).mean(dtype=x0.dtype)
            if bound:
                rate = torch.stack(bound).mean(dtype=x0.dtype)
        elif thr is not None and fed:
            gains = torch.stack(steps)
            if self.gain != 1:
                gains.mul_(float(self.gain))
            rate = (torch.stack(bound) > thr).mean(dtype=x0.dtype)  # the bound replaced gamma
        else:
            gains = zero.new_full((len(fed),), float(self.gain))
        return after, gains, rate, clip

    def _floored_denominators(self, denom: list[Tensor]) -> list[Tensor]:
        """The base optimizer's denominators M floored at ``curvature_floor`` times their
        mean per tensor."""
        if self.curvature_floor <= 0:
            return denom
        floors = torch._foreach_mul(torch._foreach_norm(denom, 1),  # mean = L1 norm / numel
                                    [self.curvature_floor / d.numel() for d in denom])
        return list(torch._foreach_maximum(denom, floors))

    def _kronecker_apply(self, t: int) -> Any:
        """The Kronecker base's own step lr (G+)^-1 gs (A+)^-1 at stage t (so unit = B)."""
        has_bias = self.affines[t].has_bias
        return lambda gs: tuple(self.kronecker.apply(self.state, t, gs, has_bias))

    def _gain(self, aff: Affine, rec: StageRecord, d: tuple[Tensor, ...],
              wg: tuple[Tensor, ...], r: Tensor | None, B: int, raw: list[Tensor]  # noqa: N803
              ) -> Tensor:
        """The auto gain; ``d`` here is -d_t = P wg (the formula is written for d_t), ``wg``
        the feedback's weight-gradient. Appends the unclipped gain to ``raw``.

        The numerator sum_i (c_i s_i + eps_v r_i . q_i) (per-sample unnormalised) equals
        <d, wg> up to the sign: both are sum_i cot_i . q_i with q_i = lin(a_i, d), by the
        adjoint of the weight-gradient; only the denominator needs q."""
        q = aff.lin(rec.a, d, bias=aff.has_bias)  # -(h-change of the samples caused by d_t)
        s = (rec.dz * q).reshape(B, -1).sum(1)  # -s_i / B
        num = _dot(d[0], wg[0])
        for a, b in zip(d[1:], wg[1:], strict=True):
            num = num + _dot(a, b)
        den = torch.dot(s, s).mul_(B)
        if r is not None:
            den.add_(_dot(q, q), alpha=self.vxx_reg / B)
        if self.comm is not None:  # both are local batch means
            num, den = self.reduce_mean([num, den])
        gamma = num / den  # = -(mean c s + eps mean r.q) / (mean s^2 + eps mean q.q) for d_t
        raw.append(gamma)
        return gamma.nan_to_num(0.0, 0.0, 0.0).clamp_(0.0, self.gain_max)

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        if self.exact:
            return self._exact_step(x0, y)
        J, grads, traj = self.problem.value_and_gradients(x0, y, intermediates=True)  # noqa: N806
        J, grads = self.reduce_grads(J, grads)  # noqa: N806 - data parallel: mean over ranks
        norm = grad_norm(grads)
        if self.finite_gate(J, norm) is False:  # nothing changed yet: the base step is skipped
            return StepInfo(loss=J, accepted=False, grad_norm=norm, reason=GATE_REASON)
        ks = self._base_step(grads, traj.records)
        extra: dict[str, Any] = {}
        if self.feedback:
            after, gains, rate, clip = self._feedback_pass(x0, y, traj.xs, traj.records, ks)
            extra = {"loss_after_phi": after, "gains": gains, "cap_rate": rate,
                     "clip_rate": clip}
        self._denom = None  # this step's (feedback=False never reads it)
        return StepInfo(loss=J, accepted=True, grad_norm=norm, extra=extra)

    @property
    def gates_itself(self) -> bool:  # type: ignore[override]
        """The fast model on a first-order base: the base step is a finite function of a
        finite gradient and the feedback drops non-finite entries, so the finiteness guard
        looks at the loss and the gradient before anything changes (host path only)."""
        return self.curvature is not None and not self.exact

    # -------------------------------------------------------------- exact mode
    # Notation (docs/ddp.md, "Exact mode"): stage t, a = pre(x), z = a W^T + b,
    # x' = post(a, z), abar = [a; 1]; per-sample F^i = dx'/dx, S^i = dpost/dz; hats are
    # per-sample, unnormalised (B times the joint quantities of the mean loss).
    @staticmethod
    def _join(aff: Affine, us: Controls | list[Tensor]) -> Tensor:
        """(W, b) -> the weight-shaped matrix [W, b] (n_z, n_a+1) (``[W]`` without bias)."""
        return torch.cat([us[0], us[1][..., None]], -1) if aff.has_bias else us[0]

    @staticmethod
    def _split(aff: Affine, mat: Tensor) -> Controls:
        """The inverse of :meth:`_join` (on the last two dimensions)."""
        return (mat[..., :-1], mat[..., -1]) if aff.has_bias else (mat,)

    def _apply_p(self, t: int, P: Tensor | float | None, mat: Tensor) -> Tensor:  # noqa: N803
        """P_t applied to weight-shaped matrices (..., n_z, n_a+1): lr M^-1 elementwise, or
        lr (G+)^-1 mat (A+)^-1 for the Kronecker base."""
        if self.kronecker is not None:
            st = self.state[t]
            return self.lr * (st["Ginv"] @ mat @ st["Ainv"])
        return P * mat

    def _r_matrix(self, t: int, P: Tensor | float | None, H: Tensor, abar: Tensor,  # noqa: N803
                  v: Tensor | None = None, J: Tensor | None = None) -> Tensor:  # noqa: N803
        """R^i = Qhat_ux^iT P Qhat_ux^i (B, n, n).

        Diagonal P: R^i = H^T diag(rho^i) H, rho_k^i = sum_l P_kl (abar_l^i)^2; Kronecker:
        R^i = lr (abar^iT (A+)^-1 abar^i) H^T (G+)^-1 H. With the second-order part
        Qhat_ux delta += v (x) (J delta) (``v``, ``J``) the cross terms C + C^T and
        J^T diag(sigma) J are added (diagonal: C = H^T (P . v abar^T) J, sigma_l =
        sum_k P_kl v_k^2; Kronecker: C = lr (H^T G^-1 v)(J^T A^-1 abar)^T and
        lr (v^T G^-1 v) J^T A^-1 J).
        """
        Ht = H.transpose(1, 2)  # noqa: N806
        if self.kronecker is not None:
            st = self.state[t]
            s = self.lr * torch.einsum("bi,ij,bj->b", abar, st["Ainv"], abar)
            R = s[:, None, None] * (Ht @ st["Ginv"] @ H)  # noqa: N806
            if v is None:
                return R
            gv = v @ st["Ginv"]  # (B, n_z); Ginv is symmetric
            C = self.lr * (torch.einsum("bzn,bz->bn", H, gv)[:, :, None]  # noqa: N806
                           * torch.einsum("bln,bl->bn", J, abar @ st["Ainv"])[:, None, :])
            third = self.lr * (gv * v).sum(1)[:, None, None] * (
                J.transpose(1, 2) @ st["Ainv"] @ J)
            return R + C + C.transpose(1, 2) + third
        sq = abar * abar
        rho = sq @ P.T if isinstance(P, Tensor) else (P * sq.sum(1, keepdim=True)).expand(
            -1, H.shape[1])
        R = Ht @ (rho[:, :, None] * H)  # noqa: N806
        if v is None:
            return R
        mx = P * (v[:, :, None] * abar[:, None, :])  # (B, n_z, n_a+1)
        C = Ht @ mx @ J  # noqa: N806
        vv = v * v
        sigma = vv @ P if isinstance(P, Tensor) else (P * vv.sum(1, keepdim=True)).expand(
            -1, J.shape[1])
        return R + C + C.transpose(1, 2) + J.transpose(1, 2) @ (sigma[:, :, None] * J)

    def _terminal_value(self, x_T: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:  # noqa: N803
        """Vhat_x^T (B, n) = B dJ/dx_T = d phi(x_T^i, y^i) and Vhat_xx^T (B, n, n): the exact
        per-sample Hessian d2 phi (``terminal_hessian="exact"``) or ghat ghat^T ("outer").
        phi is the problem's terminal cost on one sample (a batch of one)."""
        def phi(xi: Tensor, yi: Tensor | None) -> Tensor:
            return self.problem.terminal(xi.unsqueeze(0), None if yi is None else yi.unsqueeze(0))

        def grad2(xi: Tensor, yi: Tensor | None) -> tuple[Tensor, Tensor]:
            g = grad(phi)(xi, yi)
            return g, g

        dims = (0, None if y is None else 0)
        xT = x_T.detach()  # noqa: N806
        B = xT.shape[0]  # noqa: N806
        if self.terminal_hessian == "outer":
            g = vmap(grad(phi), in_dims=dims)(xT, y).reshape(B, -1)
            return g, g[:, :, None] * g[:, None, :]
        h, g = vmap(jacfwd(grad2, has_aux=True), in_dims=dims)(xT, y)  # d2 phi, d phi
        g = g.reshape(B, -1)
        return g, h.reshape(B, g.shape[1], g.shape[1])

    def _state_jacobian(self, t: int, x: Tensor) -> Tensor:
        """Per-sample F^i = dx_{t+1}/dx_t of the stage (``Problem.step``), (B, n', n)."""
        u = tuple(v.detach() for v in self.problem.stages[t].controls)

        def single(xi: Tensor) -> Tensor:
            return self.problem.step(t, xi.unsqueeze(0), u).reshape(-1)

        fx = vmap(jacrev(single))(x.detach())
        return fx.reshape(x.shape[0], fx.shape[1], -1)

    @staticmethod
    def _affine_jacobians(aff: Affine, x: Tensor, u: Controls, z: Tensor
                          ) -> tuple[Tensor, Tensor]:
        """Per-sample F^i = dx'/dx (B, n', n) and S^i = dpost(a, z)/dz (B, n', n_z) of
        x' = post(a, lin(a, u) + e), a = pre(x), at e = 0.

        A dense stage without before/after maps (the activations of the table are
        elementwise): S = diag(s), F = [I] + diag(s) W, s = act'(z) (times the residual
        step), one jvp. Otherwise one vmap(jacrev) of the stage."""
        elementwise_after = all(isinstance(m, _ELEMENTWISE) for m in aff.after)
        if (aff.kind == "linear" and not aff.before and z.dim() == 2
                and (not aff.after or (aff.step is None and elementwise_after))):
            a = x.detach()
            s = torch.func.jvp(lambda v: aff.post(a, v), (z.detach(),),
                               (torch.ones_like(z),))[1]
            if aff.step is not None:  # x' = a + h act(z): s = h act'(z), F = I + diag(s) W
                s = torch.func.jvp(aff.activation, (z.detach(),), (torch.ones_like(z),))[1]
                s = s * aff.step
            F = s[:, :, None] * u[0][None]  # noqa: N806
            if aff.step is not None:
                F = F + torch.eye(F.shape[1], dtype=F.dtype, device=F.device)  # noqa: N806
            return F, torch.diag_embed(s)

        def single(xi: Tensor, ei: Tensor) -> Tensor:
            a = aff.pre(xi.unsqueeze(0))
            return aff.post(a, aff.lin(a, u) + ei.unsqueeze(0)).reshape(-1)

        fx, s = vmap(jacrev(single, argnums=(0, 1)))(x.detach(), torch.zeros_like(z))
        return fx.reshape(x.shape[0], fx.shape[1], -1), s

    def _second_order_terms(self, t: int, x: Tensor, u: Controls, v_x: Tensor, full: bool
                            ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The dynamics' second-order terms of stage t, per sample (``second_order``):
        d2/dx2 (Vhat'_x . f) (B, n, n) when ``full``; for an affine stage also
        dv/dx (B, n_z, n) and J = [da/dx; 0] (B, n_a+1, n) (None for a control-free stage).

        grad_u (Vhat'_x . f) = v (x) abar with v = S^T Vhat'_x (Vhat'_x held fixed), so
        d/dx grad_u (Vhat'_x . f) delta = ((dv/dx) delta) (x) abar + v (x) (J delta): the
        dv/dx part joins H, the second is kept as (v, J); no m x n matrix is formed."""
        shape = x.shape[1:]
        xf, vv = x.detach().reshape(x.shape[0], -1), v_x.detach()

        def vf(xi: Tensor, vi: Tensor) -> Tensor:
            return (vi * self.problem.step(t, xi.reshape((1,) + shape), u).reshape(-1)).sum()

        hxx = vmap(jacfwd(grad(vf)))(xf, vv) if full else None
        aff = self.affines[t]
        if not u:
            return hxx, None, None

        def v_of(xi: Tensor, vi: Tensor) -> Tensor:  # v = d (Vhat'_x . post(a, z)) / dz
            a = aff.pre(xi.reshape((1,) + shape))
            z = aff.lin(a, u)

            def outer(e: Tensor) -> Tensor:
                return (vi * aff.post(a, z + e).reshape(-1)).sum()

            return grad(outer)(torch.zeros_like(z)).reshape(-1)

        def a_of(xi: Tensor) -> Tensor:
            return aff.pre(xi.reshape((1,) + shape)).reshape(-1)

        dv = vmap(jacfwd(v_of))(xf, vv)  # (B, n_z, n)
        da = vmap(jacfwd(a_of))(xf)  # (B, n_a, n)
        if aff.has_bias:
            da = torch.cat([da, da.new_zeros(da.shape[0], 1, da.shape[2])], 1)
        return hxx, dv, da

    def _dense_qux(self, st: _Exact) -> Tensor:
        """Qhat_ux^i in the layout (B, n, n_z, n_a+1): (H^T) (x) abar (+ v (x) J)."""
        qux = st.H.transpose(1, 2)[:, :, :, None] * st.abar[:, None, None, :]
        if st.v is not None:
            qux = qux + st.v[:, None, :, None] * st.J.permute(0, 2, 1)[:, :, None, :]
        return qux

    def _stage_state(self, offset: int, n: int) -> dict[str, Any]:
        """The base optimizer's state restricted to the control tensors offset..offset+n
        (per-tensor lists sliced; shared counters such as the step count as they are)."""
        return {key: val if isinstance(val, Tensor) else val[offset:offset + n]
                for key, val in self.state.items()}

    @torch.no_grad()
    def _exact_backward(self, grads: list[Controls], xs: list[Tensor],
                        records: list[StageRecord | None], y: Tensor | None
                        ) -> tuple[list[_Exact | None], Tensor]:
        """The exact per-sample backward pass (t = T-1..0; V' = stage t+1's values)::

            Vhat_h = S^T Vhat'_x,  Qhat_x = F^T Vhat'_x,  H = S^T Vhat'_xx F,
            Qhat_xx = F^T Vhat'_xx F,  Q_u = weightgrad(a, Vhat_h / B) + l_u,
            k_t = base step with Q_u,  P_t = lr M_t^-1 (the state after that step),
            R^i = Qhat_ux^iT P_t Qhat_ux^i,
            Vhat_xx = Qhat_xx - c_B (2 gamma - gamma^2) R + eps_v I,
            Vhat_x = Qhat_x (vx="backprop") or Qhat_x + H^T (D abar), D = -P_t Q_u (vx="ddp")

        Control-free stages: Vhat_x = F^T Vhat'_x, Vhat_xx = F^T Vhat'_xx F + eps_v I.
        l_u (weight decay, coupled costs) is the part of dJ/du_t that does not pass through
        z (the autograd gradient minus weightgrad(a, dJ/dz)); state-dependent running costs
        (l_x, l_xx, l_ux) are not modelled. Returns the stages' records and, per stage, the
        smallest eigenvalue of Vhat_xx at x_t over the batch (NaN at t = 0: V_0 is used by
        nothing and is only computed when ``debug`` is set).
        """
        problem = self.problem
        B = xs[0].shape[0]  # noqa: N806
        v_x, v_xx = self._terminal_value(xs[-1], y)
        gamma = float(self.gain)
        c_b = (1.0 / B if self.c_b == "joint" else 1.0) * (2 * gamma - gamma * gamma)
        # the base optimizer's next state, assembled stage by stage (its update is functional)
        new_state: dict[str, Any] = {}
        offsets, off = [], 0
        for stage in problem.stages:
            offsets.append(off)
            off += len(stage.controls)
        out: list[_Exact | None] = [None] * problem.T
        self.last_backward = [None] * problem.T
        eigs: list[Tensor] = [xs[0].new_full((), float("nan"))] * problem.T
        for t in reversed(range(problem.T)):
            stage, aff, x = problem.stages[t], self.affines[t], xs[t]
            n = x[0].numel()
            # V_0 is used by nothing (no stage before it): skipped unless debugging
            full = t > 0 or self.debug
            reg = self.vxx_reg * torch.eye(n, dtype=x.dtype, device=x.device)
            if aff is None:
                if not full:
                    continue
                F = self._state_jacobian(t, x)  # noqa: N806
                q_x = torch.einsum("bon,bo->bn", F, v_x)
                q_xx = F.transpose(1, 2) @ v_xx @ F
                if self.second_order:
                    q_xx = q_xx + self._second_order_terms(t, x, (), v_x, True)[0]
                v_x, v_xx = q_x, q_xx + reg
                if self.diagnostics:
                    eigs[t] = _min_eig(v_xx)
                if self.debug:
                    self.last_backward[t] = {"Q_x": q_x, "Q_xx": q_xx, "V_x": v_x, "V_xx": v_xx}
                continue
            rec = records[t]
            if rec.a.dim() != 2:
                raise ConfigError(
                    f"ddpnopt vxx='exact': stage {t} ({stage.describe()}) applies its dense "
                    f"map to inputs of shape {tuple(rec.a.shape)}; the exact mode needs one "
                    "input vector per sample (B, n). Use vxx='outer'")
            u = tuple(v.detach() for v in stage.controls)
            a = rec.a
            z = aff.lin(a, u)
            F, S = self._affine_jacobians(aff, x, u, z)  # noqa: N806
            q_x = torch.einsum("bon,bo->bn", F, v_x)
            q_xx = F.transpose(1, 2) @ v_xx @ F if full else None
            v2 = J2 = None  # noqa: N806
            if self.second_order:
                hxx, dv, J2 = self._second_order_terms(t, x, u, v_x, full)  # noqa: N806
            v_h = torch.einsum("boz,bo->bz", S, v_x)  # = B dJ/dz for vx="backprop"
            H = S.transpose(1, 2) @ v_xx @ F  # noqa: N806
            if self.second_order:
                H = H + dv  # noqa: N806
                v2 = v_h
                if full:
                    q_xx = q_xx + hxx
            w_shape = u[0].shape
            l_u = tuple(g - w for g, w in zip(grads[t], aff.weight_grad(a, rec.dz, w_shape),
                                              strict=True))
            q_u_sweep = tuple(g + lu for g, lu in zip(aff.weight_grad(a, v_h / B, w_shape), l_u,
                                                      strict=True))
            q_u = grads[t] if self.vx == "backprop" else q_u_sweep
            if self.kronecker is not None:
                dz = rec.dz if self.vx == "backprop" else v_h.reshape(rec.dz.shape) / B
                self._kfac_factors(t, aff, StageRecord(a, dz, rec.dx), w_shape)
                k = tuple(-v for v in self.kronecker.apply(self.state, t, q_u, aff.has_bias))
                P: Tensor | float | None = None  # noqa: N806
            else:
                k_list, sub = self.curvature.update(list(q_u), self._stage_state(offsets[t],
                                                                                 len(u)))
                k = tuple(k_list)
                for key, val in sub.items():
                    if isinstance(val, Tensor):
                        new_state[key] = val  # shared counters: the same value every stage
                    else:
                        new_state.setdefault(key, {})[offsets[t]] = val
                inv = self._inverse_curvatures(sub)
                P = inv if isinstance(inv, float) else self._join(aff, inv)  # noqa: N806
            abar = torch.cat([a, a.new_ones(B, 1)], 1) if aff.has_bias else a
            out[t] = _Exact(a, abar, H, P, k, v2, J2)
            if not full:
                continue
            R = self._r_matrix(t, P, H, abar, v2, J2)  # noqa: N806
            v_x_new = q_x
            if self.vx == "ddp":
                D = -self._apply_p(t, P, self._join(aff, q_u))  # noqa: N806
                v_x_new = q_x + torch.einsum("bzn,bz->bn", H, abar @ D.T)
                if v2 is not None:
                    v_x_new = v_x_new + torch.einsum("bln,bl->bn", J2, v2 @ D)
            v_xx_new = q_xx - c_b * R + reg
            if self.debug:
                self.last_backward[t] = {
                    "Q_u": q_u, "Q_u_sweep": q_u_sweep, "V_h": v_h, "H": H, "Q_x": q_x,
                    "Q_xx": q_xx, "R": R, "V_x": v_x_new, "V_xx": v_xx_new, "k": k, "P": P,
                    "abar": abar, "v": v2, "J": J2}
            v_x, v_xx = v_x_new, v_xx_new
            if self.diagnostics:
                eigs[t] = _min_eig(v_xx)
        if self.curvature is not None and new_state:
            state = dict(self.state)
            for key, val in new_state.items():
                if isinstance(val, Tensor):
                    state[key] = val
                else:  # per-tensor lists: the stages' slices in order of their offsets
                    state[key] = [v for off in sorted(val) for v in val[off]]
            self.state = state
        self._last_exact = out
        return out, torch.stack(eigs)

    def dense_feedback_gains(self, t: int) -> Tensor:
        """K_t^i = -P_t Qhat_ux^i / B (B, m, n), densely, from the last exact backward pass
        (the joint gain of sample i: sum_i K^i dx^i is the feedback direction d_t; m the
        controls of stage t flattened W then b). For tests and small networks."""
        st, aff = self._last_exact[t], self.affines[t]
        B = st.H.shape[0]  # noqa: N806
        qux = self._dense_qux(st)  # (B, n, n_z, n_a+1)
        pq = self._apply_p(t, st.P, qux)
        parts = [v.reshape(B, v.shape[1], -1) for v in self._split(aff, pq)]
        return -torch.cat(parts, 2).transpose(1, 2) / B

    def _exact_feedback_pass(self, x0: Tensor, y: Tensor | None, xs: list[Tensor],
                             stages: list[_Exact | None]) -> tuple[Tensor, list[Tensor], Tensor]:
        """u*_t = u_t + k_t + gamma d_t, d_t = -P_t weightgrad(a_t, (H dx) / B) with
        dx = xhat_t - x_t, xhat_0 = x_0 (``Problem.policy_rollout``; k is already applied)."""
        B = x0.shape[0]  # noqa: N806
        gains: list[Tensor] = []
        bound: list[Tensor] = []
        self.last_debug = []
        moved = [False]
        gain = torch.as_tensor(float(self.gain), dtype=x0.dtype, device=x0.device)

        def policy(t: int, xhat: Tensor) -> None:
            stage, st, aff = self.problem.stages[t], stages[t], self.affines[t]
            if st is not None and moved[0]:
                dx = (xhat - xs[t]).reshape(B, -1)
                hdx = torch.einsum("bzn,bn->bz", st.H, dx)
                wg = self._join(aff, aff.weight_grad(st.a, hdx / B, stage.controls[0].shape))
                if st.v is not None:  # second_order: sum_i v^i (x) (J^i dx^i) / B
                    wg = wg + st.v.T @ torch.einsum("bln,bn->bl", st.J, dx) / B
                d = self._split(aff, -self._apply_p(t, st.P, wg))
                gamma = gain
                if self.trust > 0:  # |gamma d| <= trust |k|
                    k_sq = sum((v * v).sum() for v in st.k)
                    d_sq = sum((v * v).sum() for v in d)
                    cap = torch.nan_to_num_(self.trust * torch.sqrt(k_sq / d_sq), 0.0, 0.0, 0.0)
                    bound.append(cap < gamma)
                    gamma = torch.minimum(gamma, cap)
                gains.append(gamma)
                if self.debug:
                    self.last_debug.append({"t": t, "dx": dx, "d": d, "gamma": gamma,
                                            "k": st.k})
                for u, di in zip(stage.controls, d, strict=True):
                    u.add_(torch.nan_to_num(di * gamma, 0.0, 0.0, 0.0))
            if stage.controls:
                moved[0] = True
            return None

        with torch.no_grad():
            traj = self.problem.policy_rollout(x0, y, policy)
        return traj.objective, gains, _rate(bound, x0)

    def _exact_step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        if self.comm is not None:
            raise ConfigError("ddpnopt vxx='exact' runs in one process (its per-sample "
                              "matrices are not all-reduced); use vxx='outer' for data "
                              "parallel training")
        J, grads, traj = self.problem.value_and_gradients(x0, y, intermediates=True)  # noqa: N806
        stages, eigs = self._exact_backward(grads, traj.xs, traj.records, y)
        with torch.no_grad():
            for t, st in enumerate(stages):
                if st is not None:
                    torch._foreach_add_(list(self.problem.stages[t].controls), list(st.k))
        extra: dict[str, Any] = {"vxx_min_eig": eigs}
        if self.feedback:
            after, gains, rate = self._exact_feedback_pass(x0, y, traj.xs, stages)
            extra.update(loss_after=after, gains=gains, cap_rate=rate,
                         clip_rate=x0.new_zeros(()))
        return StepInfo(loss=J, accepted=True, grad_norm=grad_norm(grads), extra=extra)

    def functional_state(self) -> Any:
        # the curvature objects return a new state; the Kronecker factors are reassigned
        # per stage (never changed in place), so a shallow copy of the stage dicts suffices
        if self.curvature is None:
            return {"kfac": [dict(st) for st in self.state]}
        return self.state

    def set_functional_state(self, state: Any) -> None:
        self.state = [dict(st) for st in state["kfac"]] if self.curvature is None else state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.curvature is not None:
            state["curvature"] = state_to_dict(self.state)
        else:
            state["kfac"] = [{k: v.clone() for k, v in s.items()} for s in self.state]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.curvature is not None and "curvature" in state:
            load_state(self.state, state["curvature"])
        elif self.curvature is None and "kfac" in state:
            self.state = [{k: v.clone() for k, v in s.items()} for s in state["kfac"]]


def _factory(problem: Problem, lr: float | None = None, **options: Any) -> DDPNOpt:
    return DDPNOpt(problem, lr=lr, **options)


register("ddpnopt", _factory, "DDPNOpt: layer-wise DDP feedback policy on a base optimizer's "
         "curvature (base=sgd|momentum|rmsprop|adam|kfac, gain=number|auto, vxx_reg, trust, "
         "vxx=outer|exact)",
         solver_class=DDPNOpt, default_lr=DEFAULT_LR["adam"], lr_defaults=("base", DEFAULT_LR),
         data_parallel=True, cost="first-order-feedback",
         options=(DDPNOpt, SGD, RMSprop, Adam),
         # paper: Liu, Chen & Theodorou, ICLR 2021, Alg. 3 (docs/ddp.md, "DDPNOpt as the
         # paper defines it", items 4, 6 and 8): exact per-sample V_xx with the exact
         # terminal Hessian, one learning rate on k and K (gain 1), no cap on the feedback
         presets={"paper": {"vxx": "exact", "gain": 1.0, "trust": 0.0}})
