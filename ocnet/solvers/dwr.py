"""Layerwise goal-oriented adaptivity for neural ODEs by dual-weighted residuals (DWR).

Hintermueller, Hinze, Korolev (arXiv 2601.07397) after Becker & Rannacher (Acta Numerica
2001) and Becker, Kapp & Rannacher (SICON 2000). Derivation: ``docs/dwr.md``.

Loop: train on the mesh -> indicators eta_m -> Doerfler marking -> bisect (controls
copied, theta(t) unchanged) -> warm start -> retrain, until |sum eta_m| <= tol or the
layer budget is spent.

Indicator of interval I_m = (t_m, t_{m+1}] (z = -p the goal sensitivity dJ/dx, from the
costate sweep; x_h the piecewise-linear Euler state):

    eta_m = int_{I_m} z_h(t) . R_h(t) dt,   R_h(t) = F(x_h(t), theta_m, t) - (x_{m+1} - x_m)/h_m
          ~ h_m/6 [ 4 zbar_m . (F(xbar_m, theta_m, t_m + h_m/2) - F(x_m, theta_m, t_m))
                    + z_{m+1} . (F(x_{m+1}, theta_m, t_{m+1}) - F(x_m, theta_m, t_m)) ]

(Simpson's rule; xbar, zbar interval midpoints; the residual vanishes at t_m). The
estimate J(x, theta) - J_h ~ sum_m eta_m is the leading term of the exact error
representation J - J_h = 1/2 L'(y_h)(y - y_h) + rho(y_h)(z_h) + R3; the adjoint and
control residual terms are of higher order (docs/dwr.md). ``estimator="full"`` adds
them, with the errors x - x_h, z - z_h, theta - theta_h approximated by a once-refined
solve and Richardson extrapolation (order 1): e ~ 2 (y_{h/2} - y_h).

``strategy="sensitivity"`` replaces *where* the layers go by SensLI's criterion (Kreis,
Herberg, Koehne, Schiela, Herzog, arXiv 2311.15995): the first-order sensitivity of the
objective to the virtual parameters a new layer would offer. Here a candidate is the
bisection of I_m with both children copying theta_m (theta(t) unchanged, as DWR's
refinement); the new degree of freedom is the *split* delta_m of the children,
theta_{m,1} = theta_m - delta_m, theta_{m,2} = theta_m + delta_m, which the coarse mesh
constrains to zero (theta_{m,2} - theta_{m,1} = 0). With g_{m,k} = dJ_fine/dtheta_{m,k} on
the once-uniformly-refined mesh (one forward pass and costate sweep for all candidates, as
SensLI's frozen zero layers at every position), the least-squares Lagrange multiplier of
that constraint and the score are

    mu_m = 1/2 (g_{m,1} - g_{m,2}) = -1/2 dJ_fine/d delta_m |_{delta=0},
    s_m  = |mu_m|^2   (squared Euclidean norm over all control tensors of the interval)

and the intervals with the largest s_m are bisected, as many as the Doerfler step marks
(so the arms differ only in where the layers go). docs/dwr.md section 4 has the derivation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..neural_ode.model import Loss, NeuralODE
from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem
from .loop import fit, minibatches
from .registry import make_solver

Inner = Callable[[Problem, Tensor, Tensor | None], None]
ESTIMATORS = ("primal", "full")
STRATEGIES = ("doerfler", "uniform", "random", "sensitivity")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


@torch.no_grad()
def indicators(model: NeuralODE, problem: Problem, x0: Tensor, y: Tensor | None) -> Tensor:
    """The signed DWR indicators eta_0..eta_{N-1} (a tensor; see the module docstring)."""
    traj = problem.costates(problem.rollout(x0), y)
    assert traj.ps is not None
    off, nodes, F = model.offset, model.mesh.nodes, model.field  # noqa: N806
    etas = []
    for m, h in enumerate(model.mesh.lengths):
        xa, xb = traj.xs[off + m], traj.xs[off + m + 1]
        za, zb = -traj.ps[off + m], -traj.ps[off + m + 1]
        u, t = model.controls[m], nodes[m]
        f0 = F(xa, u, t)
        r_mid = F(0.5 * (xa + xb), u, t + 0.5 * h) - f0
        r_end = F(xb, u, t + h) - f0
        etas.append(h / 6.0 * (4.0 * _dot(0.5 * (za + zb), r_mid) + _dot(zb, r_end)))
    return torch.stack(etas)


@torch.no_grad()
def full_indicators(model: NeuralODE, problem: Problem, fine: NeuralODE, fine_problem: Problem,
                    x0: Tensor, y: Tensor | None) -> Tensor:
    """eta_m + 1/2 [rho_z(e_z) + rho*(e_x) + rho_theta(e_theta)]_m with the errors from the
    once-uniformly-refined solution ``fine`` (children 2m, 2m+1 of interval m), extrapolated
    by Richardson (e ~ 2 (y_{h/2} - y_h)). Residuals by Simpson's rule on each interval."""
    tr = problem.costates(problem.rollout(x0), y)
    tf = fine_problem.costates(fine_problem.rollout(x0), y)
    assert tr.ps is not None and tf.ps is not None
    off, nodes, F = model.offset, model.mesh.nodes, model.field  # noqa: N806
    foff = fine.offset
    weights = model.reg.pair_weights(model.mesh)
    etas = []
    for m, h in enumerate(model.mesh.lengths):
        u, t = model.controls[m], nodes[m]
        xa, xb = tr.xs[off + m], tr.xs[off + m + 1]
        za, zb = -tr.ps[off + m], -tr.ps[off + m + 1]
        # fine values at t_m, t_m + h/2, t_{m+1}
        fx = [tf.xs[foff + 2 * m + k] for k in range(3)]
        fz = [-tf.ps[foff + 2 * m + k] for k in range(3)]
        xs = [xa, 0.5 * (xa + xb), xb]
        zs = [za, 0.5 * (za + zb), zb]
        ex = [2.0 * (a - b) for a, b in zip(fx, xs, strict=True)]
        ez = [2.0 * (a - b) for a, b in zip(fz, zs, strict=True)]
        etheta = [tuple(2.0 * (a - b) for a, b in zip(fine.controls[2 * m + k], u, strict=True))
                  for k in range(2)]
        ts = [t, t + 0.5 * h, t + h]
        wts = [h / 6.0, 4.0 * h / 6.0, h / 6.0]
        dz = (zb - za) / h  # z_h' on the interval
        total = torch.zeros((), dtype=xa.dtype, device=xa.device)
        f0 = F(xa, u, t)
        for k in range(3):
            with torch.enable_grad():
                xk = xs[k].detach().requires_grad_(True)
                uk = tuple(v.detach().requires_grad_(True) for v in u)
                fk = F(xk, uk, ts[k])
                # F_x^T z and F_theta^T z at (x_h(t_k), theta_m) by one vector-Jacobian product
                grads = torch.autograd.grad(fk, (xk, *uk), zs[k], allow_unused=True)
            gx, *gu = [torch.zeros_like(v) if g is None else g
                       for v, g in zip((xk, *uk), grads, strict=True)]
            r = fk.detach() - f0  # primal residual F(x_h) - x_h'
            rho = _dot(zs[k], r) + 0.5 * _dot(ez[k], r)  # rho(z_h) + 1/2 rho(e_z)
            rho = rho + 0.5 * _dot(dz + gx, ex[k])  # 1/2 adjoint residual (z_h' + F_x^T z_h)
            # 1/2 control residual r'(theta) + F_theta^T z; e_theta of the child holding t_k
            child = etheta[0] if k == 0 else etheta[1] if k == 2 else None
            if child is not None:
                rho = rho + 0.5 * sum(_dot(g, e) for g, e in zip(gu, child, strict=True))
            else:
                avg = tuple(0.5 * (a + b) for a, b in zip(etheta[0], etheta[1], strict=True))
                rho = rho + 0.5 * sum(_dot(g, e) for g, e in zip(gu, avg, strict=True))
            total = total + wts[k] * rho
        # the regulariser's part of the control residual, dR_h/dtheta_m . mean e_theta:
        # lam alpha h_m theta_m + sum_n 2 w_mn (theta_m - theta_n) (the jump coupling)
        reg = model.reg
        if reg.lam > 0:
            mean_e = tuple(0.5 * (a + b) for a, b in zip(etheta[0], etheta[1], strict=True))
            grad = [reg.lam * reg.alpha * h * v for v in u]
            for n, w in ((m - 1, weights[m - 1] if m > 0 else 0.0),
                         (m + 1, weights[m] if m < len(weights) else 0.0)):
                if w:
                    grad = [g + 2.0 * w * (v - vn)
                            for g, v, vn in zip(grad, u, model.controls[n], strict=True)]
            total = total + 0.5 * sum(_dot(g, e) for g, e in zip(grad, mean_e, strict=True))
        etas.append(total)
    return torch.stack(etas)


def sensitivities(model: NeuralODE, loss: Loss | str, x0: Tensor, y: Tensor | None) -> Tensor:
    """SensLI's insertion sensitivities s_0..s_{N-1} of ``model``'s intervals (module docstring).

    The model is bisected everywhere with copied controls; with g_{m,k} = dJ/dtheta of child
    k of interval m on that mesh (one costate sweep), mu_m = (g_{m,1} - g_{m,2}) / 2 and
    s_m = |mu_m|^2 (summed over the interval's control tensors). Largest s_m: the interval
    whose new layer would decrease J fastest under a gradient step on the split."""
    n = len(model.mesh)
    fine = model.refine(list(range(n)))
    grads = fine.problem(loss).gradients(x0, y)
    off = fine.offset
    out = []
    for m in range(n):
        g1, g2 = grads[off + 2 * m], grads[off + 2 * m + 1]
        out.append(sum((0.5 * (a - b)).pow(2).sum() for a, b in zip(g1, g2, strict=True)))
    return torch.stack(out).detach()


def doerfler(eta: Sequence[float], theta: float = 0.5) -> list[int]:
    """The smallest set of intervals whose |eta| sum to at least theta * sum |eta| (sorted)."""
    if not 0 < theta <= 1:
        raise ConfigError(f"Doerfler fraction theta must be in (0, 1], got {theta}")
    a = [abs(float(e)) for e in eta]
    order = sorted(range(len(a)), key=lambda i: -a[i])
    goal, acc, chosen = theta * sum(a), 0.0, []
    for i in order:
        chosen.append(i)
        acc += a[i]
        if acc >= goal:
            break
    return sorted(chosen)


@dataclass
class Level:
    """One refinement level of the history."""

    n_layers: int
    nodes: list[float]
    objective: float
    estimate: float
    eta: list[float]
    marked: list[int] = field(default_factory=list)
    sensitivity: list[float] = field(default_factory=list)
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def accuracy(model: NeuralODE, x: Tensor, y: Tensor) -> float:
    """Fraction of argmax(output) == y (host value: called between levels only)."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


class DWR:
    """Goal-oriented adaptive layer insertion for a :class:`NeuralODE` (module docstring).

    Args:
        model: the coarse starting model.
        loss: the terminal cost (callable or ``"cross_entropy"``/``"mse"``).
        inner: a registered solver name (default ``"adam"``; ``"sgd"`` is the paper's
            steepest descent) or a callable ``inner(problem, x, y)`` training in place.
        lr: learning rate of a named inner solver.
        steps: inner iterations per level (epochs when ``batch_size`` is set).
        batch_size: mini-batches for the inner solver (default: full batch).
        theta: Doerfler fraction (default 0.5).
        tol: stop when |sum eta_m| <= tol.
        max_layers: layer budget; a refinement is truncated (largest |eta| first) to fit.
        max_levels: at most this many refinements.
        strategy: ``"doerfler"`` (default), ``"uniform"`` (bisect every interval: the
            baseline) or ``"random"`` (as many intervals as Doerfler marks, chosen at random:
            the control that isolates *where* the layers go from *how many*) or
            ``"sensitivity"`` (as many as Doerfler marks, the largest SensLI sensitivities
            s_m of :func:`sensitivities`: the peer criterion).
        estimator: ``"primal"`` (default) or ``"full"`` (once-refined solve weights).
        seed: seeds the mini-batch order.
        **solver_options: passed to ``make_solver``.
    """

    def __init__(self, model: NeuralODE, loss: Loss | str = "cross_entropy", *,
                 inner: str | Inner = "adam", lr: float | None = None, steps: int = 200,
                 batch_size: int | None = None, theta: float = 0.5, tol: float = 0.0,
                 max_layers: int = 64, max_levels: int = 8, strategy: str = "doerfler",
                 estimator: str = "primal", seed: int = 0, **solver_options: Any) -> None:
        if strategy not in STRATEGIES:
            raise unknown_name("strategy", strategy, STRATEGIES)
        if estimator not in ESTIMATORS:
            raise unknown_name("estimator", estimator, ESTIMATORS)
        if not 0 < theta <= 1:
            raise ConfigError(f"DWR: theta (Doerfler fraction) must be in (0, 1], got {theta}")
        if max_layers < len(model.mesh):
            raise ConfigError(f"DWR: max_layers={max_layers} is below the starting mesh's "
                              f"{len(model.mesh)} layers; raise it or start coarser")
        self.model, self.loss = model, loss
        self.inner, self.lr, self.steps, self.batch_size = inner, lr, steps, batch_size
        self.theta, self.tol, self.max_layers, self.max_levels = theta, tol, max_layers, max_levels
        self.strategy, self.estimator = strategy, estimator
        self.solver_options = solver_options
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[Level] = []
        self.models: list[NeuralODE] = []

    # ------------------------------------------------------------------ pieces
    def train(self, model: NeuralODE, x: Tensor, y: Tensor | None) -> Problem:
        """Run the inner solver on ``model``'s problem (warm start: its current controls)."""
        problem = model.problem(self.loss)
        if callable(self.inner):
            self.inner(problem, x, y)
            return problem
        solver = make_solver(self.inner, problem, lr=self.lr, **self.solver_options)
        if self.batch_size is None or y is None:
            fit(solver, [(x, y)], epochs=self.steps)  # full batch: one step per "epoch"
        else:
            bs, gen = self.batch_size, self.generator
            fit(solver, lambda _epoch: minibatches(x, y, bs, generator=gen), epochs=self.steps)
        return problem

    def estimate(self, model: NeuralODE, x: Tensor, y: Tensor | None) -> Tensor:
        """The indicators eta_m of the trained ``model`` (signed tensor)."""
        problem = model.problem(self.loss)
        if self.estimator == "primal":
            return indicators(model, problem, x, y)
        fine = model.refine(list(range(len(model.mesh))))
        fine_problem = self.train(fine, x, y)
        return full_indicators(model, problem, fine, fine_problem, x, y)

    def mark(self, eta: Tensor, scores: Tensor | Sequence[float] | None = None) -> list[int]:
        """Doerfler marking (or all / random / largest-``scores`` intervals), truncated to the
        layer budget. ``scores`` (the SensLI sensitivities) is required by, and only used by,
        ``strategy="sensitivity"``: it marks the len(doerfler(eta)) largest scores."""
        # Host decision between levels (which intervals get a layer): not inside a sweep.
        a = eta.abs().tolist()
        rank = a
        if self.strategy == "uniform":
            chosen = list(range(len(a)))
        else:
            chosen = doerfler(a, self.theta)
            if self.strategy == "random":
                perm = torch.randperm(len(a), generator=self.generator).tolist()
                chosen = sorted(perm[:len(chosen)])
            elif self.strategy == "sensitivity":
                if scores is None:
                    raise ConfigError("DWR.mark: strategy='sensitivity' needs the scores (the "
                                      "SensLI sensitivities from ocnet.solvers.dwr.sensitivities)")
                rank = [float(v) for v in (scores.tolist() if isinstance(scores, Tensor)
                                           else scores)]
                if len(rank) != len(a):
                    raise ConfigError(f"DWR.mark: {len(rank)} scores for {len(a)} intervals")
                chosen = sorted(sorted(range(len(a)), key=lambda i: -rank[i])[:len(chosen)])
        room = self.max_layers - len(a)
        if len(chosen) > room:
            chosen = sorted(sorted(chosen, key=lambda i: -rank[i])[:max(room, 0)])
        return chosen

    # ------------------------------------------------------------------ loop
    def run(self, x: Tensor, y: Tensor | None, x_test: Tensor | None = None,
            y_test: Tensor | None = None,
            callback: Callable[[Level, NeuralODE], None] | None = None) -> list[Level]:
        """Train, estimate, mark, refine until the tolerance or the budget; returns the history.
        ``self.model`` is the final model; ``self.models`` every level's model."""
        # The outer loop is host-side by nature (objective, estimate and marking are read
        # between levels); the inner solver steps and the indicators stay on the device.
        model = self.model
        self.models = []
        classify = y is not None and not y.is_floating_point()
        for level in range(self.max_levels + 1):
            start = time.perf_counter()
            problem = self.train(model, x, y)
            eta = self.estimate(model, x, y)
            with torch.no_grad():
                j = float(problem.objective(x, y))
            rec = Level(n_layers=len(model.mesh), nodes=model.mesh.nodes, objective=j,
                        estimate=float(eta.sum()), eta=eta.tolist())
            if classify:
                assert y is not None
                rec.train_accuracy = accuracy(model, x, y)
                if x_test is not None and y_test is not None:
                    rec.test_accuracy = accuracy(model, x_test, y_test)
            done = (abs(rec.estimate) <= self.tol or len(model.mesh) >= self.max_layers
                    or level == self.max_levels)
            if not done:
                scores = None
                if self.strategy == "sensitivity":
                    scores = sensitivities(model, self.loss, x, y)
                    rec.sensitivity = scores.tolist()
                rec.marked = self.mark(eta, scores)
            rec.seconds = time.perf_counter() - start
            self.history.append(rec)
            self.models.append(model)
            if callback is not None:
                callback(rec, model)
            if done:
                break
            model = model.refine(rec.marked)
        self.model = model
        return self.history
