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

from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem
from ..ocp.stage import Controls
from .base import Solver, StepInfo, grad_norm, register

INNER_SOLVERS = ("adam", "gd", "lbfgs", "torch-lbfgs")
SCALINGS = ("mean", "reference")
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

    def combine(self, C: Tensor, M: Tensor, v: Tensor, s: Tensor) -> Tensor:  # noqa: N803
        """s v + sum_j C[j] M[j] per layer: C (r, L), M (r, numel), v (numel,), s (L,)."""
        out = torch.empty_like(v)
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

    def scale(self, v: Tensor, s: Tensor, add: Tensor | None = None) -> Tensor:
        """``add + s v`` (``add`` None: ``s v``) with s per layer (L,), as a flat vector."""
        out = torch.empty_like(v)
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


# ---------------------------------------------------------------------------- the solver
class EMSA(Solver):
    """Extended method of successive approximations (see the module docstring).

    Args:
        problem: any :class:`~ocnet.ocp.Problem` (``to_problem`` stages, Euler meshes, LQ).
        rho: the penalty (a number, a :class:`RhoSchedule` or any ``step -> rho`` callable).
        rho_decay: if not 1, ``rho`` (a number) becomes ``GeometricRho(rho, rho_decay)``.
        rho_min: lower bound of that geometric schedule.
        inner: the inner maximiser, one of ``INNER_SOLVERS``.
        inner_iters: evaluations of (Htilde, grad Htilde) per outer step.
        lr: the inner step size (L-BFGS/gd: the largest step multiplier; Adam: its lr).
        history: the L-BFGS memory.
        weight_decay: an extra running cost ``weight_decay/2 |u_t|^2`` this solver adds to
            every controlled stage (prefer ``to_problem(..., weight_decay=...)``, so that
            every solver sees the same objective; ``StepInfo.loss`` is the problem's J).
        betas, eps: Adam's.
        c1: the Armijo constant of the per-layer acceptance.
    """

    name = "emsa"

    def __init__(
        self,
        problem: Problem,
        rho: float | RhoSchedule | Callable[[int], float] = 1.0,
        *,
        rho_decay: float = 1.0,
        rho_min: float = 0.0,
        inner: str = "lbfgs",
        inner_iters: int = 10,
        lr: float | None = None,
        history: int = 10,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        c1: float = 1e-4,
        scaling: str = "mean",
    ) -> None:
        super().__init__(problem)
        if scaling not in SCALINGS:
            raise unknown_name("penalty scaling", scaling, SCALINGS)
        self.scaling = scaling
        if inner not in INNER_SOLVERS:
            raise unknown_name("inner solver", inner, INNER_SOLVERS)
        if isinstance(rho, RhoSchedule) or callable(rho):
            if rho_decay != 1.0:
                raise ConfigError("rho_decay applies to a numeric rho; give either a schedule "
                                  "object or rho=<number> with rho_decay=<factor>")
            self.rho_schedule = rho
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
        self.lr = DEFAULT_INNER_LR[inner] if lr is None else float(lr)
        self.history = int(history)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.c1 = float(c1)
        self.layout = _Layout(problem)
        self.evaluations = 0

    # ------------------------------------------------------------------ public helpers
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
        if self.inner == "adam":
            z, phi = self._adam(z0, phi0, g0, fr)
        elif self.inner == "torch-lbfgs":
            z, phi = self._torch_lbfgs(z0, phi0, fr)
        else:
            z, phi = self._lbfgs(z0, phi0, g0, fr, history=0 if self.inner == "gd" else None)
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
        return StepInfo(loss=J, accepted=True, grad_norm=grad_norm(grads), extra=extra)

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

    def evaluate(self, z: Tensor, fr: _Frozen, need_grad: bool = True
                 ) -> tuple[Tensor, Tensor | None]:
        """phi = -Htilde per layer (L,) at the flat controls ``z``, and d(sum phi)/dz."""
        lay, problem = self.layout, self.problem
        self.evaluations += 1
        rho, B = fr.rho, fr.batch  # noqa: N806
        z = z.detach()
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
        phi = phi.detach()
        if self.weight_decay:  # the solver's own l = wd/2 |u|^2, in closed form
            phi = phi + 0.5 * self.weight_decay * lay.dot(z, z)
            if grad is not None:
                grad = grad + self.weight_decay * z
        if self.comm is not None:  # data parallel: phi and its gradient are batch means
            if grad is None:
                (phi,) = self.reduce_mean([phi])
            else:
                phi, grad = self.reduce_mean([phi, grad])
        return phi, grad

    # ------------------------------------------------------------------ inner solvers
    def _lbfgs(self, z: Tensor, phi: Tensor, g: Tensor, fr: _Frozen, history: int | None
               ) -> tuple[Tensor, Tensor]:
        """Batched L-BFGS (``history=0``: gradient ascent), per-layer Armijo accept/reject.

        The direction is the two-loop recursion's -H g in its compact form (Byrd, Nocedal,
        Schnabel 1994), per layer: with the pairs oldest to newest, a = S'g, b = Y'g,
        R = triu(S'Y) (R_ii = 1 for an empty slot, whose s = y = 0), D = diag(S'Y),

            H g = gamma g + S v_s + Y v_y,   w = R^-1 a,   v_y = -gamma w,
            v_s = R^-T ((D + gamma Y'Y) w - gamma b),

        the same linear map as the two loops with H_0 = gamma I (and g.d = -(v_s.a + v_y.b)
        - gamma g.g). S'Y, Y'Y and (S'g, Y'g) are kept per layer and updated from one
        batched product of the memory with (s_new, y_new, g_new), so an iteration reads the
        memory twice (that product and the combination), whatever the memory size and the
        number of layers; everything else is a few passes over the flat vector and small
        (layers, m, m) algebra.
        """
        lay = self.layout
        m = self.history if history is None else history
        n, L = z.numel(), lay.L  # noqa: N806
        if m:  # the first L-BFGS step: torch's scaling lr * min(1, 1/|g|_1)
            M = z.new_zeros(m, 2, n)  # noqa: N806 - slot j: (s_j, y_j)
            SY = z.new_zeros(L, m, m)  # noqa: N806 - s_i . y_j per layer (slot coordinates)
            YY = z.new_zeros(L, m, m)  # noqa: N806 - y_i . y_j per layer
            AB = z.new_zeros(m, 2, L)  # noqa: N806 - (s_j . g, y_j . g) per layer
            empty = z.new_ones(L, m)  # 1: slot j holds no pair for that layer
            # age order of the slots once the memory is full: row h lists h, h+1, ... (mod m)
            order = (torch.arange(m, device=z.device)[:, None]
                     + torch.arange(m, device=z.device)) % m
            W = z.new_empty(3, n)  # noqa: N806 - (s_new, y_new, g_new)
            zero = z.new_zeros(())
            gamma = self.lr * torch.clamp(1.0 / lay.seg_sum(g.abs()), max=1.0)
            gamma = torch.nan_to_num(gamma, nan=self.lr, posinf=self.lr)
        else:
            gamma = torch.full((L,), self.lr, dtype=z.dtype, device=z.device)
        tau = torch.ones(L, dtype=z.dtype, device=z.device)
        head, count = 0, 0
        gg = lay.dot(g, g)
        for _ in range(self.inner_iters):
            c = min(count, m)
            if c:
                # slots 0..c-1 are in use; oldest first is slot `head` once the memory is full
                shift = head if c == m else 0
                ab, sy, yy, e = AB[:c], SY[:, :c, :c], YY[:, :c, :c], empty[:, :c]
                if shift:
                    idx = order[shift]
                    ab, e = ab.index_select(0, idx), e.index_select(1, idx)
                    sy = sy.index_select(1, idx).index_select(2, idx)
                    yy = yy.index_select(1, idx).index_select(2, idx)
                a = ab[:, 0].T.unsqueeze(-1)  # (L, c, 1), oldest first
                b = ab[:, 1].T.unsqueeze(-1)
                R = sy.triu() + torch.diag_embed(e)  # noqa: N806
                gm = gamma[:, None, None]
                w = torch.linalg.solve_triangular(R, a, upper=True)
                rhs = sy.diagonal(0, 1, 2).unsqueeze(-1) * w + gm * (yy @ w - b)
                vs = torch.linalg.solve_triangular(R.mT, rhs, upper=False)
                vy = -gm * w
                gd = -((vs * a).sum((1, 2)) + (vy * b).sum((1, 2))) - gamma * gg  # g . d
                descent = gd < 0
                gd = torch.where(descent, gd, -gamma * gg)
                coef = torch.stack([vs.squeeze(-1), vy.squeeze(-1)], 1)  # (L, 2, c)
                coef = coef * descent[:, None, None]  # no descent: d = -gamma g
                if shift:  # back to slot order
                    coef = coef.index_select(2, order[(m - shift) % m])
                coef = coef.permute(2, 1, 0).reshape(2 * c, L)
                d = lay.combine(-coef, M[:c].reshape(2 * c, n), g, -gamma)
            else:
                gd = -gamma * gg
                d = lay.scale(g, -gamma)
            zc = lay.scale(d, tau, add=z)
            phic, gc = self.evaluate(zc, fr)
            ok = torch.isfinite(phic) & (phic <= phi + self.c1 * tau * gd)
            if m:
                W[0] = lay.scale(d, torch.where(ok, tau, 0.0))         # s = zc - z
                lay.where(ok, gc - g, zero, out=W[1])                    # y
                W[2] = gc
                q3 = lay.grams(W, W)  # (3, 3, L): ss, sy, yy, ..., g_new . g_new
                ss, sy_, yy_ = q3[0, 0], q3[0, 1], q3[1, 1]
                good = ok & (sy_ > 1e-10 * torch.sqrt(ss * yy_))
                lay.where(good, W[:2], zero, out=M[head])
                W[:2] = M[head]
                empty[:, head] = (~good).to(empty.dtype)
                c1 = min(count + 1, m)
                # the memory in use times (s_new, y_new, g_new), per layer: (c1, 2, 3, L)
                P = lay.grams(M[:c1].reshape(2 * c1, n), W).view(c1, 2, 3, L)  # noqa: N806
                SY[:, head, :c1] = P[:, 1, 0].T   # s_new . y_j
                SY[:, :c1, head] = P[:, 0, 1].T   # s_j . y_new
                YY[:, head, :c1] = P[:, 1, 1].T
                YY[:, :c1, head] = P[:, 1, 1].T
                # (s_j . g, y_j . g) at the next iterate: g_new where accepted; the new slot
                # is empty where rejected, so its products are P's in every layer
                AB[:c1] = torch.where(ok, P[:, :, 2], AB[:c1])
                AB[head] = torch.where(ok, P[head, :, 2], 0.0)  # (gc may be inf where rejected)
                gamma = torch.where(good, sy_ / torch.where(good, yy_, 1.0), gamma)
                head, count = (head + 1) % m, count + 1
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
            z = lay.where(ok, zc, z)
            g = lay.where(ok, gc, g)
            gg = torch.where(ok, q3[2, 2], gg) if m else lay.dot(g, g)
            phi = torch.where(ok, phic, phi)
        return z, phi

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
                                max_eval=self.inner_iters, history_size=self.history,
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
        return {"evaluations": self.evaluations}

    def state_dict(self) -> dict[str, Any]:
        # Each outer step starts its inner solver afresh, so the step count is all the state.
        return {**super().state_dict(), "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evaluations = int(state.get("evaluations", 0))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(problem={self.problem.name}, rho={self.rho_schedule!r}, "
                f"inner={self.inner}x{self.inner_iters}, lr={self.lr:g}, steps={self.steps})")


class MSA(EMSA):
    """The basic method of successive approximations: u_t <- argmax_u H_t (E-MSA, rho = 0).

    It can diverge: the maximiser of H_t may leave the region where the frozen states
    and costates describe the network (``examples/04_msa_divergence.py``).
    """

    name = "msa"

    def __init__(self, problem: Problem, *, inner: str = "lbfgs", inner_iters: int = 10,
                 lr: float | None = None, history: int = 10, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 c1: float = 1e-4) -> None:
        super().__init__(problem, 0.0, inner=inner, inner_iters=inner_iters, lr=lr,
                         history=history, weight_decay=weight_decay, betas=betas, eps=eps, c1=c1)


register("msa", lambda problem, lr=None, **kw: MSA(problem, lr=lr, **kw),
         "basic method of successive approximations: maximise each layer's Hamiltonian",
         solver_class=MSA, default_lr=DEFAULT_INNER_LR["lbfgs"],
         lr_defaults=("inner", DEFAULT_INNER_LR), data_parallel=True, cost="inner-iterations")
register("emsa", lambda problem, lr=None, **kw: EMSA(problem, lr=lr, **kw),
         "extended MSA: maximise each layer's augmented Hamiltonian (penalty rho)",
         solver_class=EMSA, default_lr=DEFAULT_INNER_LR["lbfgs"],
         lr_defaults=("inner", DEFAULT_INNER_LR), data_parallel=True, cost="inner-iterations")
