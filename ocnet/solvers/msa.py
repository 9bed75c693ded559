"""MSA and E-MSA: training by maximising every layer's (augmented) Hamiltonian.

The method of successive approximations (Li, Chen, Tai, E, JMLR 2018) alternates the
three parts of Pontryagin's maximum principle. With the sign convention of
:mod:`ocnet.ocp.problem` (``Phi`` and ``l_t`` are batch means, so costates carry 1/B):

    forward    x_{t+1} = f_t(x_t, u_t)                                     (x frozen)
    backward   p_T = -dPhi/dx_T,   p_t = dH_t/dx (x_t, p_{t+1}, u_t)       (p frozen)
    maximise   u_t <- argmax_u  Htilde_t(u)          for every t at once

    H_t(u)      = sum_i p_{t+1}^i . f_t(x_t^i, u) - l_t(x_t, u)
    Htilde_t(u) = H_t(u) - rho/(2B) sum_i |x_{t+1}^i - f_t(x_t^i, u)|^2
                         - rho B/2  sum_i |p_t^i - dH_t/dx^i (x_t, p_{t+1}, u)|^2

Basic MSA is ``rho = 0`` (it can diverge: the argmax of H ignores that x and p move);
E-MSA penalises leaving the region where the frozen x and p are still valid. The
factors 1/B and B make Htilde the batch *mean* of the per-sample augmented Hamiltonian
of the paper (whose costates are the per-sample p^i * B), see ``docs/msa.md``.
A cost coupling several stages (``Problem.couplings``, e.g. the DG(0) jump term) enters
each layer's Htilde_t with the other stages held at the iterate (so the per-layer
gradients at u_t sum to dC/du). At u = u_t both penalties vanish and
grad Htilde_t = dH_t/du = -dJ/du_t, so a fixed point of E-MSA satisfies dJ/du = 0 (the
Pontryagin condition).

The maximisation runs for all controlled layers together on one flat vector of all
controls, on the problem's device. Each evaluation is one forward pass of every layer,
one vector-Jacobian product for dH/dx (kept differentiable) and one backward pass
(a double backward through the costate penalty) to one leaf per control tensor (views of
the flat vector, so the gradient is one concatenation: O(controls) per evaluation).
Per-layer quantities (values, dot products, step sizes) are reductions over the layers'
segments of that vector, done per *run* of consecutive equal-sized layers (a (k, size) view),
so the layers are independent problems solved in one batch and the bookkeeping of an inner
iteration runs the same operators whatever the depth. Inner solvers:

- ``lbfgs``: a batched L-BFGS with per-layer memory, scaling and an Armijo
  accept/reject per layer (rejected layers backtrack to the minimiser of a quadratic
  fit, within [0.1, 0.5] of the step); no host synchronisation. The direction is the
  two-loop recursion in its compact form (per-layer (m, m) Gram matrices of the memory,
  kept up to date), which reads the memory twice per iteration in batched products.
- ``gd``: the same with no memory: gradient ascent with a per-layer Armijo step.
- ``adam``: Adam ascent; each layer keeps the best iterate it has seen.
- ``torch-lbfgs``: ``torch.optim.LBFGS`` (strong Wolfe) over all controls at once,
  followed by a per-layer safeguard; its line search decides on the host.

Data parallel (``comm`` set; W ranks with equal shards): with the ``mean`` scaling every
term of Htilde is a local batch mean (p carries 1/B_l), so J, dJ/du, Htilde and its
gradient are all-reduced (mean) at every evaluation; with ``reference`` the penalty
weights become (rho W/2, rho/(2W)) so that the mean over ranks is the global Htilde.
All line-search decisions are then taken on identical reduced values on every rank.

Every inner solver returns, per layer, a point whose Htilde is not below the starting
one (recorded as ``htilde_before``/``htilde_after`` in ``StepInfo.extra``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..bridge.modules import ModuleStage
from ..dynamics.activations import ACTIVATION_MODULES, ACTIVATIONS
from ..ocp.errors import CapabilityError, ConfigError, unknown_name
from ..ocp.problem import Problem
from ..ocp.stage import Controls
from .base import Solver, StepInfo, grad_norm, register

INNER_SOLVERS = ("adam", "gd", "lbfgs", "torch-lbfgs")
SCALINGS = ("mean", "reference")
INNER_BUDGETS = ("evaluations", "iterations")
#: the stops of ``inner_budget="iterations"``: scipy's L-BFGS-B defaults (``ftol`` = factr 1e7
#: times the float64 epsilon, ``gtol`` on the largest gradient entry, ``maxls`` trials in
#: one line search), per layer
SCIPY_FTOL, SCIPY_GTOL, SCIPY_MAXLS = 2.220446049250313e-09, 1e-5, 20
DEFAULT_INNER_LR = {"lbfgs": 1.0, "gd": 1.0, "adam": 1e-2, "torch-lbfgs": 1.0}


# ---------------------------------------------------------------------------- rho schedules
class RhoSchedule(abc.ABC):
    """The penalty rho as a function of the outer iteration (0, 1, 2, ...)."""

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """rho at outer step ``step``."""


class ConstantRho(RhoSchedule):
    """rho_k = rho."""

    def __init__(self, rho: float) -> None:
        self.rho = _check_rho(rho)

    def __call__(self, step: int) -> float:
        return self.rho

    def __repr__(self) -> str:
        return f"ConstantRho({self.rho:g})"


class GeometricRho(RhoSchedule):
    """rho_k = clip(rho0 * factor^(k // every), rho_min, rho_max)."""

    def __init__(self, rho0: float, factor: float, *, every: int = 1, rho_min: float = 0.0,
                 rho_max: float = math.inf) -> None:
        self.rho0 = _check_rho(rho0)
        if not factor > 0:
            raise ConfigError(f"GeometricRho: factor must be positive, got {factor}")
        if every < 1:
            raise ConfigError(f"GeometricRho: every must be >= 1, got {every}")
        self.factor, self.every = float(factor), int(every)
        self.rho_min, self.rho_max = float(rho_min), float(rho_max)

    def __call__(self, step: int) -> float:
        rho = self.rho0 * self.factor ** (step // self.every)
        return min(max(rho, self.rho_min), self.rho_max)

    def __repr__(self) -> str:
        return (f"GeometricRho({self.rho0:g}, factor={self.factor:g}, every={self.every}, "
                f"rho_min={self.rho_min:g}, rho_max={self.rho_max:g})")


class AdaptiveRho(RhoSchedule):
    """rho set by each step's outcome: a trust region whose inverse radius is rho.

    The E-MSA error estimate (Li et al. 2018; ``docs/msa.md`` section 1) says
    J(u') - J(u) <= -sum_t Delta Htilde_t once rho exceeds a constant of the problem, which
    is not known. The step's own ratio tells which side of it rho is on:

        ratio = (J(u) - J(u')) / sum_t (Htilde_t(u') - Htilde_t(u))

    (the decrease of J over the gain of the augmented Hamiltonians, both on the step's
    batch). ``ratio >= 1`` is the estimate's descent; a small one means the frozen x and p
    no longer describe the network at u'. The rules are the textbook trust-region ones
    (Nocedal & Wright, Algorithm 4.1), with rho in place of the inverse radius:

    - ``ratio < accept`` or J(u') not finite: the step is **declined** (the controls stay
      at u) and rho grows by ``factor``;
    - ``ratio < low``: accepted, rho grows by ``factor``;
    - ``ratio > high``: accepted, rho shrinks by ``factor``;
    - else accepted, rho unchanged;

    always within ``[rho_min, rho_max]``. A step with no gain (every layer already at its
    maximiser) is accepted if J did not go up, and leaves rho. J (with the solver's own
    ``weight_decay`` term, when it has one) never increases from one step to the next on
    the same batch. It costs one forward pass per step (J(u')) and one host read (the
    decision), as DDP's line search. A step is reported *declined* (``StepInfo.declined``:
    a retry with a larger rho, not a failure) only while rho could still grow; at
    ``rho_max``, or when J(u) itself is not finite, it is an ordinary rejection, which
    ``fit(max_rejected=...)`` counts.
    """

    def __init__(self, rho0: float = 1.0, *, factor: float = 2.0, low: float = 0.25,
                 high: float = 0.75, accept: float = 1e-4, rho_min: float = 1e-6,
                 rho_max: float = 1e6) -> None:
        self.rho0 = _check_rho(rho0)
        if not (factor > 1 and math.isfinite(factor)):
            raise ConfigError(f"AdaptiveRho: factor must be a finite number > 1 (rho is "
                              f"multiplied or divided by it), got {factor}")
        if not accept <= low <= high:
            raise ConfigError(f"AdaptiveRho: need accept <= low <= high (the ratio thresholds),"
                              f" got accept={accept}, low={low}, high={high}")
        if not 0 < rho_min <= self.rho0 <= rho_max:
            raise ConfigError(f"AdaptiveRho: need 0 < rho_min <= rho0 <= rho_max, got "
                              f"rho_min={rho_min}, rho0={rho0}, rho_max={rho_max}")
        self.factor, self.low, self.high = float(factor), float(low), float(high)
        self.accept, self.rho_min, self.rho_max = float(accept), float(rho_min), float(rho_max)
        #: the current rho (the next step's)
        self.rho = self.rho0

    def __call__(self, step: int) -> float:
        return self.rho

    def update(self, decrease: float, gain: float) -> tuple[bool, float]:
        """Judge a step by J's ``decrease`` and the Hamiltonians' ``gain``: (accepted, ratio);
        rho becomes the next step's."""
        if not (math.isfinite(decrease) and math.isfinite(gain)):
            self.rho = min(self.rho * self.factor, self.rho_max)
            return False, -math.inf
        if not gain > 0:  # no gain: kept only if J did not go up (the controls did not move)
            if decrease >= 0:
                return True, math.nan
            self.rho = min(self.rho * self.factor, self.rho_max)
            return False, math.nan
        ratio = decrease / gain
        if ratio < self.low:
            self.rho = min(self.rho * self.factor, self.rho_max)
        elif ratio > self.high:
            self.rho = max(self.rho / self.factor, self.rho_min)
        return ratio >= self.accept, ratio

    def __repr__(self) -> str:
        return (f"AdaptiveRho({self.rho0:g}, now {self.rho:g}, factor={self.factor:g}, "
                f"low={self.low:g}, high={self.high:g}, accept={self.accept:g})")


def _check_rho(rho: float) -> float:
    rho = float(rho)
    if not (rho >= 0 and math.isfinite(rho)):
        raise ConfigError(f"rho must be a finite number >= 0, got {rho}")
    return rho


# ---------------------------------------------------------------------------- flat layout
class _Layout:
    """All controlled stages' controls as one flat vector z, and per-layer reductions.

    The layers are contiguous segments of z, in stage order. Consecutive layers with the
    same number of controls form a *run*, a (k, size) view of z, so a per-layer sum, a
    per-layer broadcast or a batch of per-layer dot products is one tensor operation per
    run (a residual stack of equal blocks is one run, whatever its depth): no index
    tensors, no Python work per layer.
    """

    def __init__(self, problem: Problem) -> None:
        self.stages = [t for t, s in enumerate(problem.stages) if s.controls]
        if not self.stages:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.shapes = [[u.shape for u in problem.stages[t].controls] for t in self.stages]
        sizes = [[u.numel() for u in problem.stages[t].controls] for t in self.stages]
        self.sizes = sizes
        self.numel = sum(map(sum, sizes))
        self.L = len(self.stages)
        self.tensor_sizes = [n for s in sizes for n in s]
        self.tensor_shapes = [sh for shs in self.shapes for sh in shs]
        self.counts = [len(s) for s in sizes]  # control tensors per layer
        runs: list[tuple[int, int, int]] = []  # (offset, layers, size of each)
        offset = 0
        for n in (sum(s) for s in sizes):
            if runs and runs[-1][2] == n:
                o, k, _ = runs[-1]
                runs[-1] = (o, k + 1, n)
            else:
                runs.append((offset, 1, n))
            offset += n
        self.runs = runs

    def flatten(self, controls: Sequence[Controls]) -> Tensor:
        """The flat vector of the controls of the controlled stages (``controls`` per stage)."""
        return torch.cat([u.reshape(-1) for t in self.stages for u in controls[t]])

    def views(self, z: Tensor) -> list[Controls]:
        """Per controlled stage, its controls as views of ``z``."""
        flat = [v.view(sh) for v, sh in zip(z.split(self.tensor_sizes), self.tensor_shapes,
                                            strict=True)]
        out, k = [], 0
        for c in self.counts:
            out.append(tuple(flat[k:k + c]))
            k += c
        return out

    def _run(self, v: Tensor, o: int, k: int, n: int) -> Tensor:
        """Run (o, k, n) of ``v`` (..., numel) as a view (..., k, n)."""
        return v.narrow(-1, o, k * n).view(v.shape[:-1] + (k, n))

    def run_views(self, v: Tensor) -> list[Tensor]:
        """The runs of the flat vector ``v`` as views (k, n) (writable: they share ``v``)."""
        return [self._run(v, *r) for r in self.runs]

    def run_scalars(self, s: Tensor) -> list[Tensor]:
        """A per-layer quantity (L,) as one (k, 1) view per run (broadcasts over a run)."""
        out, j = [], 0
        for _, k, _ in self.runs:
            out.append(s[j:j + k, None])
            j += k
        return out

    def seg_sum(self, v: Tensor) -> Tensor:
        """Per-layer sums of the flat vector(s) ``v`` (..., numel): shape (..., L)."""
        return torch.cat([self._run(v, *r).sum(-1) for r in self.runs], -1)

    def grams(self, M: Tensor, V: Tensor) -> Tensor:  # noqa: N803
        """Per-layer dot products of the rows of ``M`` (r, numel) with those of ``V`` (q, numel):
        shape (r, q, L); one batched matrix product per run."""
        out = []
        for run in self.runs:
            m, w = self._run(M, *run), self._run(V, *run)
            # (k, r, n) @ (k, n, q) -> (k, r, q)
            out.append(torch.matmul(m.transpose(0, 1), w.permute(1, 2, 0)).permute(1, 2, 0))
        return torch.cat(out, -1)

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-layer dot products of two flat vectors: shape (L,)."""
        return self.seg_sum(a * b)

    def combine(self, C: Tensor, M: Tensor, v: Tensor, s: Tensor,  # noqa: N803
                out: Tensor | None = None) -> Tensor:
        """s v + sum_j C[j] M[j] per layer: C (r, L), M (r, numel), v (numel,), s (L,)."""
        out = torch.empty_like(v) if out is None else out
        for o_, c, m, w, sc in zip(self.run_views(out), self._coef_runs(C), self.run_views(M),
                                   self.run_views(v), self.run_scalars(s), strict=True):
            # (k, 1, r) @ (k, r, n) -> (k, 1, n), then + s v
            torch.matmul(c.unsqueeze(1), m.transpose(0, 1), out=o_.unsqueeze(1))
            o_.addcmul_(w, sc)
        return out

    def _coef_runs(self, C: Tensor) -> list[Tensor]:  # noqa: N803
        out, j = [], 0
        for _, k, _ in self.runs:
            out.append(C[:, j:j + k].T)  # (k, r)
            j += k
        return out

    def scale(self, v: Tensor, s: Tensor, add: Tensor | None = None,
              out: Tensor | None = None) -> Tensor:
        """``add + s v`` (``add`` None: ``s v``) with s per layer (L,), as a flat vector
        (or rows of flat vectors, (..., numel)); ``out`` may be ``v`` or ``add``."""
        out = torch.empty_like(v) if out is None else out
        adds = self.run_views(add) if add is not None else [None] * len(self.runs)
        for o_, w, sc, a in zip(self.run_views(out), self.run_views(v), self.run_scalars(s),
                                adds, strict=True):
            if a is None:
                torch.mul(w, sc, out=o_)
            else:
                torch.addcmul(a, w, sc, out=o_)
        return out

    def where(self, cond: Tensor, a: Tensor, b: Tensor | float, out: Tensor | None = None
              ) -> Tensor:
        """``a`` in the layers where ``cond`` (L,) holds, else ``b`` (flat vectors)."""
        out = torch.empty_like(a) if out is None else out
        if not isinstance(b, Tensor):
            b = a.new_tensor(b)
        bs = self.run_views(b) if b.dim() else [b] * len(self.runs)
        for o_, c, x, y in zip(self.run_views(out), self.run_scalars(cond), self.run_views(a),
                               bs, strict=True):
            torch.where(c, x, y, out=o_)
        return out

    def expand(self, s: Tensor) -> Tensor:
        """A per-layer quantity (L,) broadcast to the flat vector."""
        out, j = [], 0
        for _, k, n in self.runs:
            out.append(s[j:j + k, None].expand(k, n).reshape(-1))
            j += k
        return torch.cat(out)


@dataclass
class _Frozen:
    """The iterate an inner solve is frozen at (controlled stages only, in order)."""

    x_in: list[Tensor]    # x_t (leaves that require grad when rho > 0)
    x_out: list[Tensor]   # x_{t+1}
    p_in: list[Tensor]    # p_t
    p_out: list[Tensor]   # p_{t+1}
    rho: float
    batch: int
    #: the controls the other stages of a coupled cost are held at (None: no couplings)
    reference: list[Controls] | None = None
    #: the closed-form evaluation's stacked frozen tensors (None: not built yet; False: the
    #: autograd evaluation applies)
    closed: Any = None


# ---------------------------------------------------------------------------- closed form
#: activations whose first two derivatives the closed-form evaluation knows
CLOSED_FORM_ACTIVATIONS = ("identity", "tanh", "relu")


@dataclass(frozen=True)
class _DenseSpec:
    """x+ = act(x W^T + b) (``step`` None) or x + step act(x W^T + b); W is (m, n)."""

    m: int
    n: int
    bias: bool      # b is a control (else the fixed bias, or none)
    act: str        # one of CLOSED_FORM_ACTIVATIONS
    step: float | None
    decay: float = 0.0  # the stage's running cost decay/2 |u|^2 (to_problem's weight decay)

    @property
    def size(self) -> int:
        return self.m * self.n + (self.m if self.bias else 0)


@dataclass(frozen=True)
class _DenseGroup:
    """Consecutive layers with one spec: layers first..first+count-1, at ``offset`` of z."""

    first: int
    count: int
    offset: int
    spec: _DenseSpec
    stages: tuple[int, ...]


@dataclass
class _DenseFrozen:
    """One group's frozen tensors, stacked (k, B, .) once per outer step."""

    A: Tensor               # x_t                      (k, B, n)
    hP: Tensor              # h p_{t+1}                (k, B, m)
    negHP: Tensor           # -h p_{t+1}
    D0: Tensor              # c x_t - x_{t+1}          (c = 1 residual, 0 plain)
    PinC: Tensor            # p_t - c p_{t+1}
    H0: Tensor | None       # c p_{t+1} . x_t per layer (k,)
    bias: Tensor | None     # the fixed bias (k, 1, m) when b is not a control


def _dense_spec(problem: Problem, t: int) -> _DenseSpec | None:
    """Stage t as a dense layer the closed form covers (None: it does not)."""
    stage = problem.stages[t]
    decay = 0.0
    if stage.has_cost:
        # only to_problem's weight decay, l = wd/2 |u|^2 (no state term): phi += l, grad += wd u
        if not (isinstance(stage, ModuleStage) and type(stage).cost is ModuleStage.cost):
            return None
        decay = stage.weight_decay
    try:
        aff = problem.affine(t, needed_by="E-MSA's closed-form evaluation")
    except CapabilityError:
        return None
    if aff is None or aff.kind != "linear" or aff.before:
        return None
    act, step = aff.activation_name, aff.step
    if ACTIVATIONS.get(act) is not aff.activation:
        return None
    if aff.after:  # a to_problem layer: nn.Linear, then its activation module
        if step is not None or act != "identity" or len(aff.after) != 1:
            return None
        names = [k for k, v in ACTIVATION_MODULES.items() if type(aff.after[0]) is v]
        if not names:
            return None
        act = names[0]
    if act not in CLOSED_FORM_ACTIVATIONS:
        return None
    u = stage.controls
    w = u[0]
    if w.dim() != 2 or len(u) != (2 if aff.has_bias else 1):
        return None
    if aff.has_bias and u[1].shape != w.shape[:1]:
        return None
    if not aff.has_bias and aff.fixed_bias is not None and aff.fixed_bias.shape != w.shape[:1]:
        return None
    if step is not None and w.shape[0] != w.shape[1]:
        return None
    return _DenseSpec(int(w.shape[0]), int(w.shape[1]), bool(aff.has_bias), act,
                      None if step is None else float(step), decay)


def _vdot(a: Tensor, b: Tensor, tmp: Tensor | None = None) -> Tensor:
    """Per-layer dot products of two (k, ...) tensors: (k,), a product (into ``tmp``, a
    contiguous tensor shaped like them, when given) and a sum. (Not a (k, 1, N) @ (k, N, 1)
    bmm: BLAS runs that shape 4-10x slower.)"""
    k = a.shape[0]
    return torch.mul(a, b, out=tmp).view(k, -1).sum(1)


class _DenseClosedForm:
    """Htilde_t and its gradient in closed form for dense layers (no autograd).

    For x+ = c x + h act(z), z = x W^T + b (c = 1, h = step: residual; c = 0, h = 1: plain),
    with y = act(z), s1 = act'(z), s2 = act''(z), delta = h p_{t+1} s1 (rows of the batch):

        H = c p_{t+1}.x + h p_{t+1}.y - l,   dH/dx = c p_{t+1} + delta W,
        dx = x+ - x_{t+1},  r = p_t - dH/dx,   phi = -H + wx |dx|^2 + wp |r|^2,
        dphi/dz = h s1 (2 wx dx - p_{t+1}) + 4 wp h p_{t+1} y s1 (r W^T)   (tanh: s2 = -2 y s1;
                  identity, relu: s2 = 0, no second term),
        dphi/dW = (dphi/dz)^T x - 2 wp delta^T r,   dphi/db = sum over the batch of dphi/dz,

    where l = wd/2 |u|^2 is the stage's running cost if it has one (``to_problem``'s weight
    decay, the only cost covered; it adds wd u to the gradient).

    Five products per layer (z = x W^T, delta W, r W^T, and the weight gradient as one bmm
    and one baddbmm): the matrix products of the autograd evaluation's forward pass,
    vector-Jacobian product and double backward, with none of its graph. Consecutive
    layers with one spec (a residual stack) are one group of batched products, so an
    evaluation runs the same operators whatever the depth.
    """

    def __init__(self, groups: list[_DenseGroup]) -> None:
        self.groups = groups
        self._buffers: dict[int, tuple[Any, dict[str, Tensor]]] = {}

    @classmethod
    def build(cls, problem: Problem, lay: _Layout) -> _DenseClosedForm | None:
        if problem.couplings:
            return None
        specs = [_dense_spec(problem, t) for t in lay.stages]
        if any(s is None for s in specs):
            return None
        groups: list[_DenseGroup] = []
        offset = 0
        for k, (t, sp) in enumerate(zip(lay.stages, specs, strict=True)):
            assert sp is not None
            if sp.size != sum(lay.sizes[k]):
                return None
            if groups and groups[-1].spec == sp:
                g = groups[-1]
                groups[-1] = _DenseGroup(g.first, g.count + 1, g.offset, sp, g.stages + (t,))
            else:
                groups.append(_DenseGroup(k, 1, offset, sp, (t,)))
            offset += sp.size
        return cls(groups)

    def freeze(self, problem: Problem, fr: _Frozen) -> list[_DenseFrozen] | None:
        """The groups' frozen tensors, or None when the states do not have the 2-D
        (batch, features) shapes the closed form is written for."""

        def stack(ts: list[Tensor]) -> Tensor:
            return ts[0].detach().unsqueeze(0) if len(ts) == 1 else torch.stack(
                [v.detach() for v in ts])

        out = []
        for g in self.groups:
            sp, sl = g.spec, slice(g.first, g.first + g.count)
            A, Xo, Pi, Po = (stack(v[sl]) for v in (fr.x_in, fr.x_out, fr.p_in, fr.p_out))  # noqa: N806
            if A.dim() != 3 or A.shape[2] != sp.n or Xo.shape != (g.count, A.shape[1], sp.m) \
                    or Pi.shape != A.shape or Po.shape != Xo.shape:
                return None
            h = 1.0 if sp.step is None else sp.step
            hP = Po if h == 1.0 else h * Po  # noqa: N806
            bias = None
            if not sp.bias:
                fb = [problem.affine(t).fixed_bias for t in g.stages]  # type: ignore[union-attr]
                if fb[0] is not None:
                    bias = stack(fb).unsqueeze(1)
            if sp.step is None:
                out.append(_DenseFrozen(A, hP, -hP, -Xo, Pi, None, bias))
            else:
                out.append(_DenseFrozen(A, hP, -hP, A - Xo, Pi - Po, _vdot(Po, A), bias))
        return out

    def _scratch(self, gi: int, out: Tensor, inp: Tensor) -> dict[str, Tensor]:
        """Group ``gi``'s temporaries, shaped like its outputs (k, B, m) or inputs (k, B, n),
        kept from evaluation to evaluation: made afresh, the large ones cost a page fault
        per 4 KiB at every evaluation (batch 256, width 512: about a quarter of the step)."""
        key = (out.shape, inp.shape, out.dtype, out.device)
        ws = self._buffers.get(gi)
        if ws is None or ws[0] != key:
            bufs = {name: out.new_empty(out.shape) for name in ("y", "dx", "s1n", "dn", "v",
                                                                "tmp")}
            bufs["mask"] = out.new_empty(out.shape, dtype=torch.bool)
            bufs["r"], bufs["tmp_in"] = inp.new_empty(inp.shape), inp.new_empty(inp.shape)
            ws = (key, bufs)
            self._buffers[gi] = ws
        return ws[1]

    def evaluate(self, z: Tensor, frozen: list[_DenseFrozen], wx: float, wp: float,
                 need_grad: bool, out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """phi per layer (L,) and d(sum phi)/dz at the flat controls z (penalty weights
        wx, wp; both 0: basic MSA), the gradient written into ``out`` when given."""
        penalised = wx != 0 or wp != 0
        grad = None if not need_grad else z.new_empty(z.numel()) if out is None else out
        phis = []
        for gi, (g, c) in enumerate(zip(self.groups, frozen, strict=True)):
            sp, k = g.spec, g.count
            m, mn, act = sp.m, sp.m * sp.n, sp.act
            h = 1.0 if sp.step is None else sp.step
            buf = self._scratch(gi, c.hP, c.A)

            zg = z.narrow(0, g.offset, k * sp.size).view(k, sp.size)
            W = zg[:, :mn].view(k, m, sp.n)  # noqa: N806
            Wt = W.transpose(1, 2)  # noqa: N806
            b = zg[:, mn:].view(k, 1, m) if sp.bias else c.bias
            y = buf["y"]
            if b is None:
                torch.bmm(c.A, Wt, out=y)
            else:
                torch.baddbmm(b, c.A, Wt, out=y)
            mask = None
            if act == "tanh":
                y.tanh_()
            elif act == "relu":
                y.relu_()
                mask = torch.gt(y, 0, out=buf["mask"])
            phi = _vdot(c.negHP, y, buf["tmp"])  # -h p_{t+1}.y
            if c.H0 is not None:
                phi = phi.sub_(c.H0)
            s1n = dn = None
            if penalised:
                dx = torch.add(c.D0, y, alpha=h, out=buf["dx"])
                if act == "tanh":
                    s1n = torch.addcmul(y.new_full((), -1.0), y, y, out=buf["s1n"])  # -act'(z)
                    dn = torch.mul(c.hP, s1n, out=buf["dn"])                        # -delta
                elif act == "relu":
                    dn = torch.mul(c.negHP, mask, out=buf["dn"])
                else:
                    dn = c.negHP
                r = torch.baddbmm(c.PinC, dn, W, out=buf["r"])  # p_t - dH/dx
                phi = phi.add_(_vdot(dx, dx, buf["tmp"]), alpha=wx).add_(
                    _vdot(r, r, buf["tmp_in"]), alpha=wp)
            if sp.decay:  # the running cost decay/2 |u_t|^2 of every layer in the group
                phi = phi.add_(torch.linalg.vecdot(zg, zg), alpha=0.5 * sp.decay)
            phis.append(phi)
            if grad is None:
                continue
            if penalised:
                if act == "tanh":
                    v = torch.bmm(r, Wt, out=buf["v"]).mul_(y)
                    v = torch.addcmul(c.hP, c.hP, v, value=-4.0 * wp, out=v)
                    gz = v.sub_(dx, alpha=2.0 * wx * h).mul_(s1n)
                else:
                    gz = torch.add(c.negHP, dx, alpha=2.0 * wx * h, out=buf["v"])
                    if mask is not None:
                        gz = gz.mul_(mask)
            else:
                if act == "tanh":
                    gz = torch.addcmul(y.new_full((), -1.0), y, y, out=buf["v"]).mul_(c.hP)
                elif mask is not None:
                    gz = torch.mul(c.negHP, mask, out=buf["v"])
                else:
                    gz = c.negHP
            # the weight gradient straight into its (strided) place in the flat gradient:
            # no (k, m, n) temporary and no copy of it
            gg = grad.narrow(0, g.offset, k * sp.size).view(k, sp.size)
            gw = gg[:, :mn].view(k, m, sp.n)
            torch.bmm(gz.transpose(1, 2), c.A, out=gw)
            if penalised:
                gw.baddbmm_(dn.transpose(1, 2), r, alpha=2.0 * wp)
            if sp.bias:
                torch.sum(gz, 1, out=gg[:, mn:])
            if sp.decay:
                gg.add_(zg, alpha=sp.decay)
        return (phis[0] if len(phis) == 1 else torch.cat(phis)), grad


# ---------------------------------------------------------------------------- the solver
class EMSA(Solver):
    """Extended method of successive approximations (see the module docstring).

    Args:
        problem: any :class:`~ocnet.ocp.Problem` (``to_problem`` stages, Euler meshes, LQ).
        rho: the penalty (a number, a :class:`RhoSchedule` or any ``step -> rho`` callable).
        rho_decay: if not 1, ``rho`` (a number) becomes ``GeometricRho(rho, rho_decay)``.
        rho_min: lower bound of that geometric schedule (or of the adaptive rho; 0 there
            means its own floor, 1e-6 or ``rho`` if smaller).
        rho_adapt: set rho from each step's outcome (:class:`AdaptiveRho` from ``rho``): a
            step whose decrease of J falls short of its gain in the augmented Hamiltonians is
            rejected and rho grows; a step that meets it lets rho shrink. J then never
            increases; one more forward pass and one host read per step. Off by default (the
            paper's rho is fixed); ``rho=AdaptiveRho(...)`` gives its thresholds.
        inner: the inner maximiser, one of ``INNER_SOLVERS``.
        inner_iters: the inner budget per outer step, counted as ``inner_budget`` says.
        inner_budget: ``"evaluations"`` (default): ``inner_iters`` evaluations of
            (Htilde, grad Htilde) for all layers at once, a fixed cost and no host read.
            ``"iterations"`` (``lbfgs``, ``gd``): at most ``inner_iters`` *accepted* steps
            per layer, as scipy's ``maxiter`` counts L-BFGS-B iterations (each with its
            line-search evaluations), and a layer also stops at scipy's default tests
            (:data:`SCIPY_FTOL`: the relative decrease (f_k - f_k+1) / max(|f_k|, |f_k+1|,
            1) of an accepted step; :data:`SCIPY_GTOL`: the largest gradient entry) or after
            :data:`SCIPY_MAXLS` rejected trials in a row (scipy then drops its memory and
            retries along the gradient before it stops). With ``inner_iters <= history``
            every accepted pair of the step stays in the memory, as scipy's does. A stopped
            layer keeps its point; the maximisation ends when every layer has stopped, or
            after ``inner_max_evals`` evaluations. It reads one flag on the host per
            evaluation after the first ``inner_iters`` (none before).
            ``torch-lbfgs``: ``max_iter=inner_iters`` iterations of torch's L-BFGS over all
            layers together (one line search, no per-layer stops), ``max_eval=inner_max_evals``.
        inner_max_evals: the evaluation cap of ``inner_budget="iterations"`` (default
            ``3 * inner_iters``).
        lr: the inner step size (L-BFGS/gd: the largest step multiplier; Adam: its lr).
        history: the L-BFGS memory.
        weight_decay: an extra running cost ``weight_decay/2 |u_t|^2`` this solver adds to
            every controlled stage (prefer ``to_problem(..., weight_decay=...)``, so that
            every solver sees the same objective; ``StepInfo.loss`` is the problem's J).
        betas, eps: Adam's.
        c1: the Armijo constant of the per-layer acceptance.
        scaling: ``"mean"`` (batch means, default) or ``"reference"`` (the public code's
            sums over the batch; docs/msa.md section 2).
        perturb_init: the public code's ``perturb_init``: every inner maximisation starts
            from the current controls plus ``perturb_init * U(-1, 1)`` noise, drawn anew at
            each step (0, the default: start at the controls). The start then costs one
            evaluation of Htilde, and a layer whose result is worse than its unperturbed
            controls keeps those (a safeguard the public code has not), so
            ``htilde_after >= htilde_before`` still holds.
        perturb_seed: the seed of that noise's own generator (on the problem's device, made
            at the first step and saved in ``state_dict``): equal seeds give equal runs.

    Presets (``make_solver("emsa", problem, preset="paper")``, :data:`PRESETS`): ``paper``
    = ``rho=1, scaling="reference", inner="lbfgs", inner_iters=10,
    inner_budget="iterations", history=10, perturb_init=0.005``: the toy setting of the
    public code (LiQianxiao/
    MaxPrinciple-DeepLearning, ``config.yml`` 'toy': ``rho``, ``msa_maxiter``,
    ``msa_perturb_init``; ``msalib/layers.py``: penalties summed over the batch;
    ``msalib/scipyoptimizer.py``: the perturbed start; scipy's L-BFGS-B keeps 10
    corrections; ``maxiter`` 10 counts iterations, hence ``inner_budget="iterations"``).
    Its MNIST setting differs (``rho=0.03``, no perturbation). Not the same as there:
    scipy's line search (Moré-Thuente, strong Wolfe) is not our per-layer Armijo
    backtracking, and after a failed line search scipy restarts from the gradient once
    where a layer here stops; the stops themselves are scipy's defaults. The public
    code's ``reg=1e-3`` is a running cost of the problem
    (``to_problem(..., weight_decay=1e-3)``), not a solver option. The defaults are not
    the paper's: ``scaling="mean"`` makes one rho mean the same at every batch size (the
    reference scaling's penalties change with it), and no perturbation keeps a step
    deterministic and its start free of an evaluation.
    """

    name = "emsa"

    def __init__(
        self,
        problem: Problem,
        rho: float | RhoSchedule | Callable[[int], float] = 1.0,
        *,
        rho_decay: float = 1.0,
        rho_min: float = 0.0,
        rho_adapt: bool = False,
        inner: str = "lbfgs",
        inner_iters: int = 10,
        inner_budget: str = "evaluations",
        inner_max_evals: int | None = None,
        lr: float | None = None,
        history: int = 10,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        c1: float = 1e-4,
        scaling: str = "mean",
        perturb_init: float = 0.0,
        perturb_seed: int = 0,
    ) -> None:
        super().__init__(problem)
        if inner_budget not in INNER_BUDGETS:
            raise unknown_name("inner budget", inner_budget, INNER_BUDGETS)
        if inner_budget == "iterations" and inner == "adam":
            raise ConfigError('inner_budget="iterations" (also set by preset="paper") counts '
                              'accepted steps, which Adam does not take (it moves every '
                              'time); use inner="lbfgs" or "gd", or give '
                              'inner_budget="evaluations" beside inner="adam"')
        if inner_max_evals is not None and inner_budget != "iterations":
            raise ConfigError('inner_max_evals caps inner_budget="iterations"; with '
                              '"evaluations" the cap is inner_iters itself')
        if not (isinstance(perturb_init, int | float) and math.isfinite(perturb_init)
                and perturb_init >= 0):
            raise ConfigError(f"perturb_init (the size of the uniform noise on the inner "
                              f"solver's start) must be a number >= 0, got {perturb_init!r}")
        if not isinstance(perturb_seed, int) or isinstance(perturb_seed, bool):
            raise ConfigError(f"perturb_seed must be an integer, got {perturb_seed!r}")
        self.perturb_init = float(perturb_init)
        self.perturb_seed = int(perturb_seed)
        self._perturb_rng: torch.Generator | None = None
        if scaling not in SCALINGS:
            raise unknown_name("penalty scaling", scaling, SCALINGS)
        self.scaling = scaling
        if inner not in INNER_SOLVERS:
            raise unknown_name("inner solver", inner, INNER_SOLVERS)
        if not isinstance(rho_adapt, bool):
            raise ConfigError(f"rho_adapt must be True or False, got {rho_adapt!r}")
        if rho_adapt and (isinstance(rho, RhoSchedule) or callable(rho) or rho_decay != 1.0):
            raise ConfigError("rho_adapt=True sets rho from each step's outcome, starting at a "
                              "numeric rho; it does not combine with a schedule or rho_decay "
                              "(give rho=<number>, or rho=AdaptiveRho(...) for its thresholds)")
        if isinstance(rho, RhoSchedule) or callable(rho):
            if rho_decay != 1.0:
                raise ConfigError("rho_decay applies to a numeric rho; give either a schedule "
                                  "object or rho=<number> with rho_decay=<factor>")
            self.rho_schedule = rho
        elif rho_adapt:
            if not (isinstance(rho, int | float) and rho > 0):
                raise ConfigError(f"rho_adapt=True needs a starting rho > 0, got rho={rho!r} "
                                  "(rho=0 is basic MSA, which has no penalty to adapt)")
            # rho_min 0 (the default) means the schedule's own floor, 1e-6 (or rho if smaller)
            self.rho_schedule = AdaptiveRho(rho, rho_min=rho_min or min(1e-6, rho))
        elif rho_decay != 1.0:
            self.rho_schedule = GeometricRho(rho, rho_decay, rho_min=rho_min)
        else:
            self.rho_schedule = ConstantRho(rho)
        if int(inner_iters) < 1:
            raise ConfigError(f"inner_iters must be >= 1, got {inner_iters}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"lr (the inner step size) must be positive, got {lr}")
        if int(history) < 1:
            raise ConfigError(f"history (the L-BFGS memory) must be >= 1, got {history}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        self.inner = inner
        self.inner_iters = int(inner_iters)
        self.inner_budget = inner_budget
        self.inner_max_evals = (int(inner_max_evals) if inner_max_evals is not None
                                else 3 * self.inner_iters)
        if self.inner_max_evals < self.inner_iters:
            raise ConfigError(f"inner_max_evals ({self.inner_max_evals}) must be >= inner_iters"
                              f" ({self.inner_iters}): each accepted step costs an evaluation")
        self.lr = DEFAULT_INNER_LR[inner] if lr is None else float(lr)
        self.history = int(history)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.c1 = float(c1)
        self.layout = _Layout(problem)
        #: the closed-form evaluation when every controlled stage is a dense layer it covers
        #: (else None: autograd); set it to None to force the autograd evaluation
        self.closed_form = _DenseClosedForm.build(problem, self.layout)
        self.evaluations = 0

    # ------------------------------------------------------------------ public helpers
    def perturbation(self, like: Tensor) -> Tensor:
        """The next draw of the start noise ``perturb_init * U(-1, 1)``, shaped, placed and
        typed like ``like`` (zeros for ``perturb_init=0``; the generator advances)."""
        if not self.perturb_init:
            return torch.zeros_like(like)
        if self._perturb_rng is None:
            self._perturb_rng = torch.Generator(device=like.device)
            self._perturb_rng.manual_seed(self.perturb_seed)
        u = torch.rand(like.shape, generator=self._perturb_rng, device=like.device,
                       dtype=like.dtype)
        return (2 * u - 1) * self.perturb_init

    def rho(self, step: int | None = None) -> float:
        """rho at outer step ``step`` (default: the next step)."""
        return _check_rho(self.rho_schedule(self.steps if step is None else step))

    # ------------------------------------------------------------------ one outer step
    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        problem, lay = self.problem, self.layout
        rho = self.rho()
        J, grads, traj = problem.value_and_gradients(x0, y, keep_costates=True)  # noqa: N806
        J, grads = self.reduce_grads(J, grads)  # noqa: N806 - data parallel: mean over ranks
        ps = traj.ps
        assert ps is not None  # keep_costates=True fills them
        fr = _Frozen(
            x_in=[traj.xs[t].detach().requires_grad_(rho > 0) for t in lay.stages],
            x_out=[traj.xs[t + 1] for t in lay.stages],
            p_in=[ps[t] for t in lay.stages],
            p_out=[ps[t + 1] for t in lay.stages],
            rho=rho,
            batch=x0.shape[0],
            reference=[tuple(v.detach().clone() for v in us) for us in problem.controls]
            if problem.couplings else None,
        )
        with torch.no_grad():
            z0 = lay.flatten(problem.controls).detach().clone()
            # At u_t the penalties vanish: Htilde_t = H_t = p_{t+1}.x_{t+1} - l_t, and
            # grad Htilde_t = dH_t/du = -dJ/du_t; so the start costs no evaluation.
            h0 = []
            for k, t in enumerate(lay.stages):
                h = (fr.p_out[k] * fr.x_out[k]).sum()
                c = traj.running_costs[t]
                if problem.couplings:
                    cc = problem.stage_coupled_cost(t, problem.stages[t].controls, fr.reference)
                    c = cc if c is None else (c if cc is None else c + cc)
                h0.append(h if c is None else h - c)
            (phi0,) = self.reduce_mean([-torch.stack(h0)])  # local batch means
            g0 = lay.flatten(grads)
            if self.weight_decay:
                phi0 = phi0 + 0.5 * self.weight_decay * lay.seg_sum(z0 * z0)
                g0 = g0 + self.weight_decay * z0
        before = self.evaluations
        zs, phis, gs = z0, phi0, g0
        if self.perturb_init:  # the public code's perturbed start (one more evaluation)
            zs = z0 + self.perturbation(z0)
            phis, gs = self.evaluate(zs, fr)
            assert gs is not None
        steps_taken: Tensor | None = None  # accepted steps per layer (inner_budget="iterations")
        if self.inner == "adam":
            z, phi = self._adam(zs, phis, gs, fr)
        elif self.inner == "torch-lbfgs":
            z, phi = self._torch_lbfgs(zs, phis, fr)
        else:
            z, phi, steps_taken = self._lbfgs(zs, phis, gs, fr,
                                              history=0 if self.inner == "gd" else None)
        if self.perturb_init:  # never worse than the unperturbed controls, per layer
            ok = torch.isfinite(phi) & (phi <= phi0)
            z = torch.where(lay.expand(ok), z, z0)
            phi = torch.where(ok, phi, phi0)
            if steps_taken is not None:  # a layer put back at z0 has taken no step
                steps_taken = torch.where(ok, steps_taken, 0)
        judged: dict[str, Any] = {}
        if isinstance(self.rho_schedule, AdaptiveRho):
            judged = self._judge(x0, y, J, z0, z, phi0, phi)
            if not judged["accepted"]:
                z, phi = z0, phi0
                if steps_taken is not None:  # back at z0: no step taken
                    steps_taken = torch.zeros_like(steps_taken)
        with torch.no_grad():
            for t, us in zip(lay.stages, lay.views(z), strict=True):
                for u, v in zip(problem.stages[t].controls, us, strict=True):
                    u.copy_(v)
        extra: dict[str, Any] = {
            "rho": rho,
            "htilde_before": -phi0,
            "htilde_after": -phi,
            "stages": list(lay.stages),
            "evaluations": self.evaluations - before,
            "control_change": torch.linalg.vector_norm(z - z0),
        }
        if steps_taken is not None:  # inner_budget="iterations": accepted steps per layer
            extra["inner_steps"] = steps_taken
        if not judged:
            return StepInfo(loss=J, accepted=True, grad_norm=grad_norm(grads), extra=extra)
        extra.update(ratio=judged["ratio"], loss_after=judged["loss_after"],
                     rho_next=self.rho_schedule.rho)
        ok = judged["accepted"]
        return StepInfo(loss=J, accepted=ok, grad_norm=grad_norm(grads), extra=extra,
                        declined=judged["declined"],
                        reason="" if ok else (
                            f"E-MSA's adaptive rho declined the step (decrease of J / gain "
                            f"of the augmented Hamiltonians = {judged['ratio']:.3g} < "
                            f"{self.rho_schedule.accept:g}): the controls are unchanged and "
                            f"rho is now {self.rho_schedule.rho:g}"))

    def _judge(self, x0: Tensor, y: Tensor | None, J: Tensor, z0: Tensor, z: Tensor,  # noqa: N803
               phi0: Tensor, phi: Tensor) -> dict[str, Any]:
        """The adaptive rho's test of the candidate ``z``: J there (one forward pass), the
        ratio of J's decrease to the gain sum_t (phi0_t - phi_t) of the augmented
        Hamiltonians, and the schedule's decision (one host read, as DDP's line search)."""
        problem, lay = self.problem, self.layout
        controls = list(problem.controls)
        for t, us in zip(lay.stages, lay.views(z), strict=True):
            controls[t] = us
        with torch.no_grad():
            (J_new,) = self.reduce_mean([problem.objective(x0, y, controls=controls)])  # noqa: N806
            decrease = J.detach() - J_new
            if self.weight_decay:  # phi holds the solver's own weight decay: so must J
                decrease = decrease + 0.5 * self.weight_decay * (z0.dot(z0) - z.dot(z))
            gain = (phi0 - phi).sum()
            dec, g, j0 = torch.stack([decrease.to(gain.dtype), gain,
                                      J.detach().to(gain.dtype)]).tolist()  # the one read
        sched: AdaptiveRho = self.rho_schedule  # type: ignore[assignment]
        rho_before = sched.rho
        accepted, ratio = sched.update(dec, g)
        # a retry with a larger rho, unless rho cannot grow or J was not finite to begin
        # with (then the guard's rejection, which fit(max_rejected=...) counts)
        declined = not accepted and sched.rho > rho_before and math.isfinite(j0)
        return {"accepted": accepted, "ratio": ratio, "loss_after": J_new,
                "declined": declined}

    # ------------------------------------------------------------------ Htilde and its gradient
    def _weights(self, rho: float, batch: int) -> tuple[float, float]:
        """The factors of sum_i |dx^i|^2 and sum_i |dp^i|^2 in Htilde (see ``scaling``)."""
        if self.scaling == "mean":
            return 0.5 * rho / batch, 0.5 * rho * batch
        w = 1 if self.comm is None else self.comm.world_size
        if w == 1:
            return 0.5 * rho, 0.5 * rho
        # sum over ranks of |dx|^2 (x W after the mean) and p carrying 1/B_l = W/B (/ W^2)
        return 0.5 * rho * w, 0.5 * rho / w

    def evaluate(self, z: Tensor, fr: _Frozen, need_grad: bool = True,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """phi = -Htilde per layer (L,) at the flat controls ``z``, and d(sum phi)/dz (written
        into ``out`` when given, a flat vector like ``z``, and returned as that tensor)."""
        self.evaluations += 1
        z = z.detach()
        if self.closed_form is not None and fr.closed is None:
            fr.closed = self.closed_form.freeze(self.problem, fr) or False
        if fr.closed:
            phi, grad = self.closed_form.evaluate(z, fr.closed, *self._penalty(fr), need_grad,
                                                  out=out)
        else:
            phi, grad = self._evaluate_autograd(z, fr, need_grad)
        phi, grad = self._finish(z, phi, grad)
        if out is not None and grad is not None and grad is not out:
            out.copy_(grad)
            grad = out
        return phi, grad

    def _penalty(self, fr: _Frozen) -> tuple[float, float]:
        """(wx, wp), the factors of sum_i |dx^i|^2 and sum_i |dp^i|^2 (0, 0 when rho = 0)."""
        return (0.0, 0.0) if fr.rho == 0 else self._weights(fr.rho, fr.batch)

    def _evaluate_autograd(self, z: Tensor, fr: _Frozen, need_grad: bool = True
                           ) -> tuple[Tensor, Tensor | None]:
        """The evaluation by autograd (any stages): phi (L,) and d(sum phi)/dz, without the
        solver's weight decay and the data-parallel mean (see ``evaluate``)."""
        lay, problem = self.layout, self.problem
        rho, B = fr.rho, fr.batch  # noqa: N806
        with torch.enable_grad():
            # Each control tensor its own leaf (a view of z): the gradient is one cat of the
            # leaves' gradients. (Views of one leaf z would make autograd add a zero-padded
            # copy of z per control tensor: O(layers x controls) per evaluation.)
            leaves = [v.view(sh).requires_grad_(need_grad)
                      for v, sh in zip(z.split(lay.tensor_sizes), lay.tensor_shapes,
                                       strict=True)]
            hs, sq_x, j = [], [], 0
            for k, t in enumerate(lay.stages):
                u = tuple(leaves[j:j + lay.counts[k]])
                j += lay.counts[k]
                x = fr.x_in[k]
                out = problem.step(t, x, u)
                h = (fr.p_out[k] * out).sum()
                c = problem.running_cost(t, x, u)
                if problem.couplings:  # this layer's share of costs coupling stages
                    cc = problem.stage_coupled_cost(t, u, fr.reference)
                    c = cc if c is None else (c if cc is None else c + cc)
                hs.append(h if c is None else h - c)
                if rho > 0:
                    d = out - fr.x_out[k]
                    sq_x.append((d * d).sum())
            H = torch.stack(hs)  # noqa: N806
            if rho > 0:
                dh_dx = torch.autograd.grad(H.sum(), fr.x_in, create_graph=need_grad,
                                            allow_unused=True)
                sq_p = []
                for k, g in enumerate(dh_dx):
                    r = fr.p_in[k] if g is None else fr.p_in[k] - g
                    sq_p.append((r * r).sum())
                wx, wp = self._weights(rho, B)
                H = H - wx * torch.stack(sq_x) - wp * torch.stack(sq_p)  # noqa: N806
            phi = -H
            grad = None
            if need_grad:
                gs = torch.autograd.grad(phi.sum(), leaves, allow_unused=True)
                grad = torch.cat([v.new_zeros(v.numel()) if g is None else g.reshape(-1)
                                  for v, g in zip(leaves, gs, strict=True)])
        return phi.detach(), grad

    def _finish(self, z: Tensor, phi: Tensor, grad: Tensor | None
                ) -> tuple[Tensor, Tensor | None]:
        """The solver's weight decay and the data-parallel mean on an evaluation."""
        lay = self.layout
        if self.weight_decay:  # the solver's own l = wd/2 |u|^2, in closed form
            phi = phi + 0.5 * self.weight_decay * lay.dot(z, z)
            if grad is not None:  # in place: the evaluation's own (or its out) tensor
                grad = grad.add_(z, alpha=self.weight_decay)
        if self.comm is not None:  # data parallel: phi and its gradient are batch means
            if grad is None:
                (phi,) = self.reduce_mean([phi])
            else:
                phi, grad = self.reduce_mean([phi, grad])
        return phi, grad

    # ------------------------------------------------------------------ inner solvers
    def _workspace(self, rows: int, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The inner solver's full-size buffers (the rows (rows, n) and a trial point (n,)),
        kept from step to step: allocating them afresh every step cost more than the L-BFGS
        arithmetic on wide networks."""
        key = (rows, n, like.dtype, like.device)
        ws = self.__dict__.get("_lbfgs_buffers")
        if ws is None or ws[0] != key:
            ws = (key, like.new_empty(rows, n), like.new_empty(n))
            self._lbfgs_buffers = ws
        return ws[1], ws[2]

    def _lbfgs(self, z: Tensor, phi: Tensor, g: Tensor, fr: _Frozen, history: int | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Batched L-BFGS (``history=0``: gradient ascent), per-layer Armijo accept/reject.
        Returns the controls, phi per layer and, with ``inner_budget="iterations"``, the
        accepted steps per layer (else None).

        The direction is the two-loop recursion's -H g in its compact form (Byrd, Nocedal,
        Schnabel 1994), per layer: with the pairs oldest to newest, a = S'g, b = Y'g,
        R = triu(S'Y) (R_ii = 1 for a position that holds no pair), D = diag(S'Y),

            H g = gamma g + S v_s + Y v_y,   w = R^-1 a,   v_y = -gamma w,
            v_s = R^-T ((D + gamma Y'Y) w - gamma b),

        the same linear map as the two loops with H_0 = gamma I (and g.d = -(v_s.a + v_y.b)
        - gamma g.g). S'Y, Y'Y and (S'g, Y'g) are kept per layer.

        The full-size vectors live in the rows of one buffer, a window of the memory
        ``y_0, s_0, ..., y_{c-1}, s_{c-1}`` (oldest first) followed by the current gradient g.
        An iteration reads the window twice, in two batched products per run of layers:

        1. the trial step ``tau d`` from the window and g (one product: g is the next row),
           written into the row after g;
        2. after the evaluation, whose gradient is written into the row after that, the
           new gradient (g where rejected) and ``y = g_new - g`` over g: the rows
           ``y_c, s_c, g_new`` now end the window, and their products with the whole window
           (themselves included) give the new Gram entries, the curvature test and
           ``g_new . g_new``.

        So the new pair is never copied into the memory, y needs no buffer of its own and
        the step needs no separate update with g. A position whose pair is not kept (a
        rejected trial, or ``s.y`` too small) keeps its rows; its Gram entries are 0, which
        makes its coefficients in step 1 exactly 0. Once the memory holds ``history`` pairs
        the window drops its oldest pair (it moves on by two rows; when it reaches the end
        of the buffer it is copied back to the front, at most every ``history`` iterations).
        Everything else is a few passes over the flat vector and small (layers, m, m)
        algebra.
        """
        lay = self.layout
        m = self.history if history is None else history
        n, L = z.numel(), lay.L  # noqa: N806
        by_steps = self.inner_budget == "iterations"
        iters = self.inner_max_evals if by_steps else self.inner_iters
        if by_steps and 0 < m and self.inner_iters <= m:
            # A rejected trial holds a window position (with no pair); a layer keeps at most
            # inner_iters <= history pairs, so a window over every evaluation drops none of
            # them, as scipy keeps all the pairs of its maxiter iterations.
            m = iters
        # 2 rows per kept pair, then g, the trial step and the new gradient; a buffer that
        # would need more than 4m + 4 rows moves its window back instead (see above)
        rows = 3 if not m else min(2 * iters + 1, 4 * m + 4)
        Q, ZC = self._workspace(rows, n, z)  # noqa: N806 - never zero-filled: rows are written before they are read
        z = z.clone()
        Q[0] = g
        # The run views of the buffers, made once: an iteration's full-size work is then one
        # operator per run, and the per-layer scalars are (L, 1) columns sliced per run.
        spans, j = [], 0
        for _, k, _ in lay.runs:
            spans.append((j, j + k))
            j += k
        Zr, Qr = lay.run_views(z), lay.run_views(Q)  # noqa: N806 - Q runs: (rows, k, size)
        if m:
            # window positions, oldest first (m + 1: the new pair before the oldest is dropped)
            SY = z.new_zeros(L, m + 1, m + 1)  # noqa: N806 - s_i . y_j (i <= j) per layer
            YY = z.new_zeros(L, m + 1, m + 1)  # noqa: N806 - y_i . y_j per layer
            AB = z.new_zeros(L, m + 1, 2)  # noqa: N806 - (s_j . g, y_j . g) per layer
            # position j holds a pair
            kept = torch.zeros(L, m + 1, dtype=torch.bool, device=z.device)
            zero = z.new_zeros(())
            # the first L-BFGS step: torch's scaling lr * min(1, 1/|g|_1)
            gamma = self.lr * torch.clamp(1.0 / lay.seg_sum(g.abs()), max=1.0)
            gamma = torch.nan_to_num(gamma, nan=self.lr, posinf=self.lr)
        else:
            gamma = torch.full((L,), self.lr, dtype=z.dtype, device=z.device)
        tau = torch.ones(L, dtype=z.dtype, device=z.device)
        w, count = 0, 0  # the window's first row; pairs added so far
        gg = lay.dot(g, g)
        if by_steps:  # accepted steps and consecutive rejections per layer; scipy's stops
            taken = torch.zeros(L, dtype=torch.long, device=z.device)
            fails = torch.zeros(L, dtype=torch.long, device=z.device)
            active = self._largest(g) > SCIPY_GTOL
        for it in range(iters):
            if by_steps and it >= self.inner_iters and not bool(active.any()):
                break  # the one host read of this mode (none in the first inner_iters)
            c = min(count, m)
            if w + 2 * c + 3 > rows:  # back to the front (w >= 2c + 2: no overlap)
                Q[:2 * c + 1].copy_(Q[w:w + 2 * c + 1])
                w = 0
            ig, i_s, i_n = w + 2 * c, w + 2 * c + 1, w + 2 * c + 2  # rows of g, s, g_new
            ng = (-gamma * tau)[:, None]
            if c:
                a, b = AB[:, :c, :1], AB[:, :c, 1:]  # (L, c, 1), oldest first
                sy, yy = SY[:, :c, :c], YY[:, :c, :c]
                R = sy.triu() + torch.diag_embed((~kept[:, :c]).to(z.dtype))  # noqa: N806
                gm = gamma[:, None, None]
                wv = torch.linalg.solve_triangular(R, a, upper=True)
                rhs = sy.diagonal(0, 1, 2).unsqueeze(-1) * wv + gm * (yy @ wv - b)
                vs = torch.linalg.solve_triangular(R.mT, rhs, upper=False)
                vy = -gm * wv
                gd = -((vs * a).sum((1, 2)) + (vy * b).sum((1, 2))) - gamma * gg  # g . d
                descent = gd < 0
                gd = torch.where(descent, gd, -gamma * gg)
                # coefficients of the rows y_0, s_0, ..., s_{c-1}, g: tau d (no descent:
                # -tau gamma g)
                coef = torch.cat([vy, vs], 2) * (-descent.to(z.dtype) * tau)[:, None, None]
                coef = torch.cat([coef.reshape(L, 2 * c), ng], 1).unsqueeze(1)  # (L, 1, 2c+1)
                for (j0, j1), qr in zip(spans, Qr, strict=True):
                    # (k, 1, 2c+1) @ (k, 2c+1, size) -> the row of s
                    torch.bmm(coef[j0:j1], qr[w:ig + 1].transpose(0, 1),
                              out=qr[i_s].unsqueeze(1))
            else:
                gd = -gamma * gg
                for (j0, j1), qr in zip(spans, Qr, strict=True):
                    torch.mul(qr[ig], ng[j0:j1], out=qr[i_s])  # the trial step tau d
            torch.add(z, Q[i_s], out=ZC)
            gn = Q[i_n]
            phic, gc = self.evaluate(ZC, fr, out=gn)  # the gradient into its row
            if gc is not gn:
                gn.copy_(gc)
            ok = torch.isfinite(phic) & (phic <= phi + self.c1 * tau * gd)
            if by_steps:  # a stopped layer keeps its point (its trial is never accepted)
                ok = ok & active
            okc = ok[:, None]
            dst = i_n if m else ig  # gradient ascent keeps g in row 0
            for (j0, j1), qr in zip(spans, Qr, strict=True):
                torch.where(okc[j0:j1], qr[i_n], qr[ig], out=qr[dst])  # g_new: g where rejected
            if by_steps:
                taken += ok
                fails = torch.where(ok, 0, fails + active.long())
                scale = torch.clamp(torch.maximum(phi.abs(), phic.abs()), min=1.0)
                flat = ok & ((phi - phic) <= SCIPY_FTOL * scale)
                small = ok & (self._largest(Q[dst]) <= SCIPY_GTOL)
                active = (active & (taken < self.inner_iters) & ~flat & ~small
                          & (fails < SCIPY_MAXLS))
            if m:
                torch.sub(Q[i_n], Q[ig], out=Q[ig])  # y over g: 0 where rejected
                # (y, s, g_new) times the window, themselves included: (L, 3, 2c + 3)
                P = torch.cat([torch.bmm(qr[ig:i_n + 1].transpose(0, 1),  # noqa: N806
                                         qr[w:i_n + 1].permute(1, 2, 0)) for qr in Qr])
                yy_, sy_, ss = P[:, 0, 2 * c], P[:, 0, 2 * c + 1], P[:, 1, 2 * c + 1]
                good = ok & (sy_ > 1e-10 * torch.sqrt(ss * yy_))
            okf = ok.to(z.dtype)[:, None]
            for (j0, j1), zr, qr in zip(spans, Zr, Qr, strict=True):
                zr.addcmul_(qr[i_s], okf[j0:j1])  # z + s where accepted: zc
            if m:
                # the new pair at position c: its entries are 0 where it is not kept, and so
                # are those with the positions that hold no pair
                keep = torch.cat([kept[:, :c], good[:, None]], 1)  # (L, c + 1)
                both = keep & good[:, None]
                SY[:, :c + 1, c] = torch.where(both, P[:, 0, 1:2 * c + 2:2], zero)  # s_j . y_c
                yyn = torch.where(both, P[:, 0, 0:2 * c + 1:2], zero)  # y_j . y_c
                YY[:, :c + 1, c] = yyn
                YY[:, c, :c + 1] = yyn
                # (s_j . g, y_j . g) at the next iterate: g_new where accepted
                abn = torch.stack([P[:, 2, 1:2 * c + 2:2], P[:, 2, 0:2 * c + 1:2]], 2)
                AB[:, :c + 1] = torch.where(keep[:, :, None], torch.where(
                    okc[:, :, None], abn, AB[:, :c + 1]), zero)
                kept[:, c] = good
                gamma = torch.where(good, sy_ / torch.where(good, yy_, 1.0), gamma)
                count += 1
                if count > m:  # the memory is full: drop the oldest pair
                    SY[:, :m, :m] = SY[:, 1:, 1:].clone()
                    YY[:, :m, :m] = YY[:, 1:, 1:].clone()
                    AB[:, :m] = AB[:, 1:].clone()
                    kept[:, :m] = kept[:, 1:].clone()
                    w += 2
            # accepted: back to the full step (L-BFGS) or twice the last one (gd). Rejected:
            # the minimiser of the quadratic through phi(0), phi'(0) = gd and phi(tau),
            # safeguarded to [0.1, 0.5] tau. (Halving alone needs log2(tau c gamma) inner
            # iterations to reach a layer's step 1/(c gamma) when its curvature c is large;
            # with few inner iterations every trial of such a layer was rejected and E-MSA
            # stalled at a non-stationary point.)
            grow = torch.ones_like(tau) if m else torch.clamp(2 * tau, max=1.0)
            excess = phic - phi - tau * gd  # = c tau^2 |d|^2 / 2 on a quadratic
            fit = torch.isfinite(excess) & (excess > 0)
            t_q = -gd * tau * tau / (2 * torch.where(fit, excess, 1.0))
            shrink = torch.where(fit, torch.minimum(torch.maximum(t_q, 0.1 * tau), 0.5 * tau),
                                 0.5 * tau)
            tau = torch.where(ok, grow, shrink)
            gg = torch.where(ok, P[:, 2, 2 * c + 2], gg) if m else lay.dot(Q[0], Q[0])
            phi = torch.where(ok, phic, phi)
        return z, phi, (taken if by_steps else None)

    def _largest(self, v: Tensor) -> Tensor:
        """Per layer, the largest |entry| of the flat vector ``v``: shape (L,)."""
        return torch.cat([r.abs().amax(-1) for r in self.layout.run_views(v)])

    def _adam(self, z: Tensor, phi: Tensor, g: Tensor, fr: _Frozen) -> tuple[Tensor, Tensor]:
        """Adam ascent on all controls; each layer returns its best evaluated iterate."""
        lay = self.layout
        b1, b2 = self.betas
        mom, vel = torch.zeros_like(z), torch.zeros_like(z)
        best_z, best_phi = z, phi
        for k in range(1, self.inner_iters + 1):
            mom = b1 * mom + (1 - b1) * g
            vel = b2 * vel + (1 - b2) * g * g
            mhat, vhat = mom / (1 - b1 ** k), vel / (1 - b2 ** k)
            z = z - self.lr * mhat / (torch.sqrt(vhat) + self.eps)
            phik, g = self.evaluate(z, fr)
            better = torch.isfinite(phik) & (phik < best_phi)
            best_z = torch.where(lay.expand(better), z, best_z)
            best_phi = torch.where(better, phik, best_phi)
        return best_z, best_phi

    def _torch_lbfgs(self, z0: Tensor, phi0: Tensor, fr: _Frozen) -> tuple[Tensor, Tensor]:
        """``torch.optim.LBFGS`` on sum_t phi_t, then a per-layer safeguard.

        Host decisions: torch's strong-Wolfe line search and its stopping tests read
        tensor values on the host; this option exists as a reference for ``lbfgs``.
        """
        lay = self.layout
        zt = z0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([zt], lr=self.lr, max_iter=self.inner_iters,
                                max_eval=self.inner_max_evals
                                if self.inner_budget == "iterations" else self.inner_iters,
                                history_size=self.history,
                                tolerance_grad=0.0, tolerance_change=0.0,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            phi, grad = self.evaluate(zt.detach(), fr)
            zt.grad = grad
            return phi.sum()

        opt.step(closure)
        z = zt.detach()
        phi, _ = self.evaluate(z, fr, need_grad=False)
        ok = torch.isfinite(phi) & (phi <= phi0)
        return torch.where(lay.expand(ok), z, z0), torch.where(ok, phi, phi0)

    # ------------------------------------------------------------------ checkpoints
    def host_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"evaluations": self.evaluations}
        if isinstance(self.rho_schedule, AdaptiveRho):  # a step undone puts rho back too
            state["adaptive_rho"] = self.rho_schedule.rho
        return state

    def set_host_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        rho = state.pop("adaptive_rho", None)
        if rho is not None and isinstance(self.rho_schedule, AdaptiveRho):
            self.rho_schedule.rho = float(rho)
        super().set_host_state(state)

    def state_dict(self) -> dict[str, Any]:
        # Each outer step starts its inner solver afresh, so the step count (the start
        # noise's generator, with perturb_init; the adaptive rho) is all the state.
        state = {**super().state_dict(), "evaluations": self.evaluations}
        if isinstance(self.rho_schedule, AdaptiveRho):  # the adaptive rho has moved
            state["adaptive_rho"] = self.rho_schedule.rho
        if self._perturb_rng is not None:
            state["perturb_rng"] = self._perturb_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evaluations = int(state.get("evaluations", 0))
        if "adaptive_rho" in state and isinstance(self.rho_schedule, AdaptiveRho):
            self.rho_schedule.rho = float(state["adaptive_rho"])
        if "perturb_rng" in state and self.perturb_init:
            # the noise is drawn where the controls live
            self._perturb_rng = torch.Generator(device=self.problem.parameters()[0].device)
            self._perturb_rng.set_state(state["perturb_rng"])

    def __repr__(self) -> str:
        budget = "" if self.inner_budget == "evaluations" else " iterations"
        return (f"{type(self).__name__}(problem={self.problem.name}, rho={self.rho_schedule!r}, "
                f"inner={self.inner}x{self.inner_iters}{budget}, lr={self.lr:g}, "
                f"steps={self.steps})")


class MSA(EMSA):
    """The basic method of successive approximations: u_t <- argmax_u H_t (E-MSA, rho = 0).

    It can diverge: the maximiser of H_t may leave the region where the frozen states
    and costates describe the network (``examples/04_msa_divergence.py``).

    Presets: ``paper`` = ``inner="lbfgs", inner_iters=10, inner_budget="iterations",
    history=10, perturb_init=0.005``, the inner maximisation of the public code's toy setting (see
    :class:`EMSA`). The public code runs E-MSA only; basic MSA is the paper's Algorithm 1
    (Li, Chen, Tai & E, JMLR 2018), so these inner settings are borrowed from there, and
    the default stays unperturbed for the reasons given at :class:`EMSA`.
    """

    name = "msa"

    def __init__(self, problem: Problem, *, inner: str = "lbfgs", inner_iters: int = 10,
                 inner_budget: str = "evaluations", inner_max_evals: int | None = None,
                 lr: float | None = None, history: int = 10, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 c1: float = 1e-4, perturb_init: float = 0.0, perturb_seed: int = 0) -> None:
        super().__init__(problem, 0.0, inner=inner, inner_iters=inner_iters,
                         inner_budget=inner_budget, inner_max_evals=inner_max_evals, lr=lr,
                         history=history, weight_decay=weight_decay, betas=betas, eps=eps, c1=c1,
                         perturb_init=perturb_init, perturb_seed=perturb_seed)


#: the presets of ``--solver msa`` and ``--solver emsa`` (sources: :class:`EMSA`, :class:`MSA`)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "msa": {"paper": {"inner": "lbfgs", "inner_iters": 10, "inner_budget": "iterations",
                      "history": 10, "perturb_init": 0.005}},
    "emsa": {"paper": {"rho": 1.0, "scaling": "reference", "inner": "lbfgs", "inner_iters": 10,
                       "inner_budget": "iterations", "history": 10, "perturb_init": 0.005}},
}

register("msa", lambda problem, lr=None, **kw: MSA(problem, lr=lr, **kw),
         "basic method of successive approximations: maximise each layer's Hamiltonian",
         solver_class=MSA, default_lr=DEFAULT_INNER_LR["lbfgs"],
         lr_defaults=("inner", DEFAULT_INNER_LR), data_parallel=True, cost="inner-iterations",
         presets=PRESETS["msa"])
register("emsa", lambda problem, lr=None, **kw: EMSA(problem, lr=lr, **kw),
         "extended MSA: maximise each layer's augmented Hamiltonian (penalty rho)",
         solver_class=EMSA, default_lr=DEFAULT_INNER_LR["lbfgs"],
         lr_defaults=("inner", DEFAULT_INNER_LR), data_parallel=True, cost="inner-iterations",
         presets=PRESETS["emsa"])
