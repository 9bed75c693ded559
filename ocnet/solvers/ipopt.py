"""An IPOPT reference solve: the exact optimum of a small training problem.

Single shooting. With all controls stacked in one vector w (``flatten_controls`` order),
the states are functions of w, and the training problem is the unconstrained NLP

    minimise_w  J(w) = Phi(x_T(w), y) + sum_{t<T} l_t(x_t(w), u_t(w)),
    x_0 given,  x_{t+1}(w) = f_t(x_t(w), u_t(w)).

Each stage's f_t and l_t is written as a CasADi expression of (X_t, u_t), with the batch
of states as a (B, n) matrix X_t (rows are samples, as in torch). IPOPT (a primal-dual
interior-point method; here without constraints, i.e. Newton's method on grad J = 0 with
an inertia-corrected exact Hessian and a filter line search) solves it to the tolerance
``tol`` on the scaled KKT error ``|grad J|_inf / s_d``. CasADi supplies the exact gradient
and Hessian of J by algorithmic differentiation of the expression graph.

Supported (transcribed symbolically; anything else raises a ConfigError naming the stage):

- stages: ``ModuleStage`` from ``ocnet.bridge.to_problem`` with an ``nn.Linear`` or
  ``ocnet.models.ResidualBlock`` and elementwise layers (Identity, Tanh, ReLU, Sigmoid,
  Softplus, ELU, GELU, LeakyReLU, SiLU), ``PadFeatures`` and ``nn.Flatten`` on flat
  states, with their weight decay l_t = wd/2 |u_t|^2; ``ocnet.dynamics`` ``Dense``,
  ``Residual``, ``ZeroPad``, ``Flatten`` (flat states), ``EulerStage`` of an
  ``ActivationField`` or ``AntisymmetricField`` (without running cost), and
  ``LinearQuadratic`` (dynamics and cost);
- terminal costs: cross-entropy (``nn.CrossEntropyLoss``, ``F.cross_entropy``, class
  indices or class probabilities), mean squared error (``nn.MSELoss``, ``F.mse_loss``) and
  :class:`QuadraticCost`.

``step`` solves to optimality once and writes the optimum back into the problem's own
control tensors (on their device and dtype; the conversions happen in
``ocnet.bridge.casadi``). It is a host-side reference, not a training algorithm: it
synchronises with the device by design.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import casadi as ca
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..bridge.casadi import TorchCallback, from_numpy, to_numpy
from ..bridge.derivatives import flatten_controls, objective_gradient, unflatten_controls
from ..bridge.modules import ModuleStage
from ..bridge.placement import place
from ..dynamics.fields import ActivationField, AntisymmetricField
from ..dynamics.layers import Dense, Flatten, LinearQuadratic, Residual, ZeroPad
from ..dynamics.mesh import EulerStage
from ..ocp.errors import ConfigError, ShapeError
from ..ocp.problem import Problem
from ..ocp.stage import Stage
from .base import Solver, StepInfo, grad_norm, register

Sym = ca.SX | ca.MX


class QuadraticCost(nn.Module):
    """Phi(x, y) = mean_i (x_i - y_i)' Q (x_i - y_i) / 2 (``y`` None means a zero target).

    A terminal cost torch and the IPOPT transcription both understand; ``Q`` defaults
    to the identity of size ``n`` and is a buffer, so ``bridge.place`` moves it.
    """

    def __init__(self, n: int, Q: Tensor | None = None) -> None:  # noqa: N803
        super().__init__()
        q = torch.eye(n) if Q is None else Q
        if q.shape != (n, n):
            raise ShapeError(f"QuadraticCost: Q must be ({n}, {n}), got {tuple(q.shape)}")
        self.register_buffer("Q", q)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        d = x if y is None else x - y
        return 0.5 * ((d @ self.Q) * d).sum(-1).mean()


# ---------------------------------------------------------------------------- expressions
def _act_by_name(name: str, z: Sym, stage: str) -> Sym:
    if name == "identity":
        return z
    if name == "tanh":
        return ca.tanh(z)
    if name == "relu":
        return ca.fmax(z, 0)
    if name == "sigmoid":
        return 1 / (1 + ca.exp(-z))
    if name == "softplus":
        return _softplus(z, 1.0, 20.0)
    if name == "elu":
        return ca.if_else(z > 0, z, ca.exp(z) - 1)
    if name == "gelu":
        return 0.5 * z * (1 + ca.erf(z / math.sqrt(2.0)))
    if name == "leaky_relu":
        return ca.if_else(z > 0, z, 0.01 * z)
    raise ConfigError(
        f"IpoptReference cannot transcribe activation {name!r} of {stage}; supported: "
        "identity, tanh, relu, sigmoid, softplus, elu, gelu, leaky_relu"
    )


def _softplus(z: Sym, beta: float, threshold: float) -> Sym:
    # torch: x for beta x > threshold, else log(1 + exp(beta x)) / beta
    return ca.if_else(beta * z > threshold, z, ca.log1p(ca.exp(beta * z)) / beta)


def _module_expr(m: nn.Module, x: Sym, stage: str) -> Sym:
    """A parameter-free elementwise / reshaping layer on a (B, n) matrix."""
    from ..models import PadFeatures  # models imports dynamics; imported late on purpose

    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, nn.Tanh):
        return ca.tanh(x)
    if isinstance(m, nn.ReLU):
        return ca.fmax(x, 0)
    if isinstance(m, nn.Sigmoid):
        return 1 / (1 + ca.exp(-x))
    if isinstance(m, nn.Softplus):
        return _softplus(x, float(m.beta), float(m.threshold))
    if isinstance(m, nn.ELU):
        return ca.if_else(x > 0, x, m.alpha * (ca.exp(x) - 1))
    if isinstance(m, nn.GELU) and m.approximate == "none":
        return 0.5 * x * (1 + ca.erf(x / math.sqrt(2.0)))
    if isinstance(m, nn.LeakyReLU):
        return ca.if_else(x > 0, x, m.negative_slope * x)
    if isinstance(m, nn.SiLU):
        return x / (1 + ca.exp(-x))
    if isinstance(m, nn.Flatten) and m.start_dim == 1:
        return x  # states are already (B, n)
    if isinstance(m, PadFeatures):
        return _pad(x, m.width)
    raise ConfigError(
        f"IpoptReference cannot transcribe layer {type(m).__name__} in stage {stage}; "
        "supported parameter-free layers: Identity, Tanh, ReLU, Sigmoid, Softplus, ELU, "
        "GELU, LeakyReLU, SiLU, Flatten, PadFeatures. Replace it or solve with another solver"
    )


def _pad(x: Sym, width: int) -> Sym:
    extra = width - x.size2()
    return x if extra == 0 else ca.horzcat(x, ca.DM.zeros(x.size1(), extra))


def _linear(x: Sym, w: Sym, b: Sym | None) -> Sym:
    """x W^T + b on a (B, n) matrix, b a column (out, 1)."""
    z = ca.mtimes(x, w.T)
    return z if b is None else z + ca.repmat(b.T, x.size1(), 1)


def _sumsq(us: list[Sym]) -> Sym:
    return sum(ca.sumsqr(u) for u in us)


def _dm(t: Tensor) -> ca.DM:
    a = to_numpy(t)
    return ca.DM(a.reshape(a.shape[0], -1) if a.ndim == 2 else a.reshape(-1, 1))


def stage_expression(stage: Stage, t: int, x: Sym, u: list[Sym], batch: int
                     ) -> tuple[Sym, Sym | None, Sym | None]:
    """f_t and l_t of one stage as CasADi expressions.

    ``x`` holds some rows (samples) of the (B, n) state matrix, ``batch`` = B the size of
    the whole batch, ``u`` the stage's controls (vectors as columns, matrices as matrices).
    Returns (f_t(x, u), the rows' share of the per-sample cost sum_i l_i / B or None, the
    cost that depends on the controls only or None).
    """
    label = f"{t} ({stage.describe()}, a {type(stage).__name__})"
    if type(stage) is ModuleStage:
        from ..models import ResidualBlock

        for m in stage.before:
            x = _module_expr(m, x, label)
        p = stage.parametric
        named = dict(zip(stage._names, u, strict=True))
        if isinstance(p, nn.Linear) and set(named) <= {"weight", "bias"}:
            b = named.get("bias", None if p.bias is None else _dm(p.bias))
            x = _linear(x, named["weight"], b)
        elif isinstance(p, ResidualBlock) and set(named) <= {"linear.weight", "linear.bias"}:
            lin = p.linear
            b = named.get("linear.bias", None if lin.bias is None else _dm(lin.bias))
            x = x + p.h * _act_by_name(p.activation, _linear(x, named["linear.weight"], b),
                                       label)
        else:
            raise ConfigError(
                f"IpoptReference cannot transcribe stage {label}: its trainable layer is a "
                f"{type(p).__name__}; supported are nn.Linear and ocnet.models.ResidualBlock"
            )
        for m in stage.after:
            x = _module_expr(m, x, label)
        shared = 0.5 * stage.weight_decay * _sumsq(u) if stage.weight_decay > 0 else None
        return x, None, shared
    if type(stage) is Dense:
        z = _linear(x, u[0], u[1] if len(u) > 1 else None)
        return _act_by_name(stage.activation_name, z, label), None, None
    if type(stage) is Residual:
        z = _linear(x, u[0], u[1] if len(u) > 1 else None)
        return x + stage.h * _act_by_name(stage.activation_name, z, label), None, None
    if type(stage) is EulerStage:
        field = stage.field
        if stage._cost_fn is not None:
            raise ConfigError(
                f"IpoptReference cannot transcribe the running cost of stage {label} (an "
                "arbitrary torch function); drop it or solve with another solver"
            )
        if type(field) is AntisymmetricField:
            k = u[0] - u[0].T - field.gamma * ca.DM.eye(field.width)
        elif type(field) is ActivationField:
            k = u[0]
        else:
            raise ConfigError(
                f"IpoptReference cannot transcribe the vector field {type(field).__name__} of "
                f"stage {label}; supported: ActivationField, AntisymmetricField"
            )
        z = _linear(x, k, u[1])
        return x + stage.h * _act_by_name(field.activation_name, z, label), None, None
    if type(stage) is LinearQuadratic:
        a, bm, q, r, s = (_dm(m) for m in (stage.A, stage.B, stage.Q, stage.R, stage.S))
        v = u[0]  # (m, 1)
        f = ca.mtimes(x, a.T) + ca.repmat(ca.mtimes(bm, v).T, x.size1(), 1)
        state = 0.5 * ca.sum1(ca.sum2(ca.mtimes(x, q) * x)) / batch
        cross = ca.sum1(ca.mtimes(ca.mtimes(x, s), v)) / batch
        return f, state + cross, 0.5 * ca.mtimes(ca.mtimes(v.T, r), v)
    if type(stage) is ZeroPad:
        return _pad(x, stage.out_features), None, None
    if type(stage) is Flatten:
        return x, None, None
    raise ConfigError(
        f"IpoptReference cannot transcribe stage {label}: only ModuleStage (Linear or "
        "ResidualBlock), Dense, Residual, EulerStage (ActivationField/AntisymmetricField), "
        "LinearQuadratic, ZeroPad and Flatten have a CasADi expression. Rewrite the stage "
        "with these, or solve the problem with another solver"
    )


def _resolve_terminal(cost: Callable) -> Callable:
    if isinstance(cost, str):
        from ..bridge.modules import resolve_loss

        return resolve_loss(cost)
    return cost


def terminal_target(cost: Callable, y: Tensor | None, n_out: int, batch: int) -> np.ndarray:
    """The targets as a (B, k) float64 matrix the terminal expression reads row by row
    (one-hot rows for class labels); checks the cost is one the transcription knows."""
    cost = _resolve_terminal(cost)
    if isinstance(cost, nn.CrossEntropyLoss) or cost is F.cross_entropy:
        if isinstance(cost, nn.CrossEntropyLoss) and (
            cost.weight is not None or cost.label_smoothing != 0 or cost.reduction != "mean"
        ):
            raise ConfigError(
                "IpoptReference transcribes nn.CrossEntropyLoss only with reduction='mean', "
                "no class weights and no label smoothing"
            )
        if y is None:
            raise ConfigError("a cross-entropy terminal cost needs targets y")
        if y.is_floating_point() and y.dim() == 2:
            return to_numpy(y)  # class probabilities
        labels = to_numpy(y).astype(np.int64).reshape(-1)
        if labels.min() < 0 or labels.max() >= n_out:
            raise ShapeError(
                f"cross-entropy labels must lie in 0..{n_out - 1} (the final state has "
                f"{n_out} features); got {labels.min()}..{labels.max()}"
            )
        return np.eye(n_out)[labels]
    if isinstance(cost, nn.MSELoss) or cost is F.mse_loss:
        if y is None:
            raise ConfigError("an MSE terminal cost needs targets y")
        if isinstance(cost, nn.MSELoss) and cost.reduction not in ("mean", "sum"):
            raise ConfigError("IpoptReference transcribes nn.MSELoss with reduction mean or sum")
        return to_numpy(y).reshape(batch, -1)
    if isinstance(cost, QuadraticCost):
        return np.zeros((batch, n_out)) if y is None else to_numpy(y).reshape(batch, -1)
    raise ConfigError(
        f"IpoptReference cannot transcribe the terminal cost {cost!r}; supported: "
        "nn.CrossEntropyLoss / F.cross_entropy, nn.MSELoss / F.mse_loss and "
        "ocnet.solvers.ipopt.QuadraticCost"
    )


def terminal_expression(cost: Callable, x: Sym, target: Sym, batch: int) -> Sym:
    """The rows' share of Phi(X_T, y): ``x`` some rows of X_T, ``target`` the same rows of
    :func:`terminal_target`, ``batch`` the size of the whole batch."""
    cost = _resolve_terminal(cost)
    if isinstance(cost, nn.CrossEntropyLoss) or cost is F.cross_entropy:
        ncls = x.size2()
        # log-sum-exp shifted by a row maximum: exact for any shift, so AD is exact too
        c = x[:, 0]
        for j in range(1, ncls):
            c = ca.fmax(c, x[:, j])
        lse = ca.log(ca.sum2(ca.exp(x - ca.repmat(c, 1, ncls)))) + c
        return ca.sum1(lse * ca.sum2(target) - ca.sum2(x * target)) / batch
    if isinstance(cost, nn.MSELoss) or cost is F.mse_loss:
        total = ca.sumsqr(x - target)
        if isinstance(cost, nn.MSELoss) and cost.reduction == "sum":
            return total
        return total / (batch * x.size2())
    if isinstance(cost, QuadraticCost):
        d = x - target
        return 0.5 * ca.sum1(ca.sum2(ca.mtimes(d, _dm(cost.Q)) * d)) / batch
    terminal_target(cost, None, x.size2(), batch)  # raises the ConfigError
    raise AssertionError("unreachable")


@dataclass
class Transcription:
    """The NLP of a problem: decision vector ``w``, objective ``J(w)``, start ``w0``."""

    w: Sym
    objective: Sym
    w0: np.ndarray

    def function(self) -> ca.Function:
        """J as a CasADi Function of w."""
        return ca.Function("J", [self.w], [self.objective])


def _control_blocks(problem: Problem, w: Sym) -> list[list[Sym]]:
    out, k = [], 0
    for t, stage in enumerate(problem.stages):
        us = []
        for u in stage.controls:
            block = w[k:k + u.numel()]
            if u.dim() == 1:
                us.append(block)
            elif u.dim() == 2:
                # torch flattens row-major, CasADi reshapes column-major: W = reshape(., c, r)^T
                us.append(ca.reshape(block, u.shape[1], u.shape[0]).T)
            else:
                raise ConfigError(
                    f"IpoptReference handles vector and matrix controls; stage {t} "
                    f"({stage.describe()}) has a control of shape {tuple(u.shape)}"
                )
            k += u.numel()
        out.append(us)
    return out


def _rollout(problem: Problem, x: Sym, w: Sym, target: Sym, batch: int
             ) -> tuple[Sym, Sym | None]:
    """(the rows' share of the sample costs, the control-only costs) along the rollout."""
    rows: Sym | None = None
    shared: Sym | None = None
    for t, (stage, us) in enumerate(zip(problem.stages, _control_blocks(problem, w),
                                        strict=True)):
        x, row_cost, ctrl_cost = stage_expression(stage, t, x, us, batch)
        if row_cost is not None:
            rows = row_cost if rows is None else rows + row_cost
        if ctrl_cost is not None:
            shared = ctrl_cost if shared is None else shared + ctrl_cost
    phi = terminal_expression(problem.terminal_cost, x, target, batch)
    return (phi if rows is None else phi + rows), shared


def transcribe(problem: Problem, x0: Tensor, y: Tensor | None = None, *,
               symbolic: str = "map") -> Transcription:
    """Single-shooting transcription of ``problem`` on the data ``(x0, y)``.

    ``symbolic``: ``"map"`` (default) writes the rollout of ONE sample as a scalar
    CasADi ``SX`` graph phi(w, x_i, y_i) and sums it over the batch with ``Function.map``
    (an ``MX`` node), so CasADi differentiates a graph B times smaller; ``"SX"``/``"MX"``
    write the whole batch as one graph (the simplest, slow to differentiate for B > 10).
    """
    if symbolic not in ("map", "SX", "MX"):
        raise ConfigError(f"symbolic must be 'map', 'SX' or 'MX', got {symbolic!r}")
    if x0.dim() != 2:
        raise ShapeError(
            f"IpoptReference needs flat states (B, n); x0 has shape {tuple(x0.shape)}"
        )
    batch, n0 = x0.shape
    like = problem.controls
    n = sum(u.numel() for us in like for u in us)
    w0 = to_numpy(flatten_controls(like)) if n else np.zeros(0)
    with torch.no_grad():
        n_out = problem.rollout(x0[:1]).xs[-1].reshape(1, -1).shape[1]
    target = terminal_target(problem.terminal_cost, y, n_out, batch)
    if symbolic in ("SX", "MX"):
        sym = ca.SX if symbolic == "SX" else ca.MX
        w = sym.sym("w", n)
        rows, shared = _rollout(problem, _dm(x0), w, ca.DM(target), batch)
        return Transcription(w, rows if shared is None else rows + shared, w0)
    ws = ca.SX.sym("w", n)
    xs = ca.SX.sym("x", 1, n0)
    ts = ca.SX.sym("t", 1, target.shape[1])
    rows, shared = _rollout(problem, xs, ws, ts, batch)
    sample = ca.Function("sample_cost", [ws, xs, ts], [rows])
    summed = sample.map("batch_cost", "serial", batch, [0], [0])  # shared w, summed output
    w = ca.MX.sym("w", n)
    # the map lays samples side by side: (1, n0 B) = the row-major flattening of (B, n0)
    objective = summed(w, ca.DM(to_numpy(x0).reshape(1, -1)), ca.DM(target.reshape(1, -1)))
    if shared is not None:
        objective = objective + ca.Function("control_cost", [ws], [shared])(w)
    return Transcription(w, objective, w0)


def _torch_hessian_of_lagrangian(problem: Problem, x0: Tensor, y: Tensor | None
                                 ) -> tuple[ca.Function, TorchCallback]:
    """IPOPT's ``hess_lag(x, p, lam_f, lam_g) = lam_f triu(d^2 J/dw^2)`` with the Hessian
    from ``torch.func.hessian`` on a float64 CPU copy of the problem (no constraints)."""
    twin = place(copy.deepcopy(problem), "cpu", torch.float64)
    like = twin.controls
    xc = x0.detach().to("cpu", torch.float64)
    yc = None if y is None else y.detach().to(
        "cpu", torch.float64 if y.is_floating_point() else y.dtype)

    def objective(w: Tensor) -> Tensor:
        return twin.objective(xc, yc, unflatten_controls(w, like))

    n = twin.num_controls()
    call = TorchCallback("torch_hessian", torch.func.hessian(objective), [(n,)])
    w = ca.MX.sym("x", n)
    lam_f = ca.MX.sym("lam_f")
    h = lam_f * ca.triu(call(w))
    fn = ca.Function("nlp_hess_l", [w, ca.MX.sym("p", 0), lam_f, ca.MX.sym("lam_g", 0)], [h],
                     ["x", "p", "lam_f", "lam_g"], ["triu_hess_gamma_x_x"])
    return fn, call


# ---------------------------------------------------------------------------- the solver
class IpoptReference(Solver):
    """Solve the whole training problem to optimality with IPOPT (see the module docstring).

    Args:
        problem: a small problem of supported stages (a few hundred to a few thousand
            controls; the expression graph grows with batch size times width).
        lr: ignored (the factory signature every solver shares).
        tol: IPOPT's tolerance on the scaled KKT error (default 1e-10).
        max_iter: IPOPT's iteration limit.
        print_level: IPOPT's print level (0, silent, by default).
        hessian: ``"exact"`` (CasADi differentiates the expression graph twice; building it
            grows fast with the number of controls: ~25 s for 400), ``"torch"`` (the exact
            dense Hessian by ``torch.func.hessian`` on a float64 CPU copy of the problem,
            handed to IPOPT through a :class:`~ocnet.bridge.casadi.TorchCallback`: fast for
            a few hundred controls) or ``"limited-memory"`` (IPOPT's L-BFGS: cheap
            iterations, slow final convergence).
        symbolic: how the NLP is written (see :func:`transcribe`): ``"MX"`` (default),
            ``"SX"`` or ``"map"``.
        max_controls: refuse problems with more controls than this (the NLP is dense in
            the controls; ``None`` lifts the limit).
        **ipopt_options: any other IPOPT option (e.g. ``mu_strategy="adaptive"``).

    ``step(x0, y)`` returns StepInfo with the objective and gradient norm at the start, and
    in ``extra``: ``objective`` (after, a tensor), ``status`` (IPOPT's return status),
    ``iterations``, ``success``, ``ipopt_objective`` (IPOPT's own value, a float),
    ``grad_norm_after`` (the autograd gradient norm at the solution, a tensor).
    """

    name = "ipopt"

    def __init__(self, problem: Problem, lr: float | None = None, *, tol: float = 1e-10,
                 max_iter: int = 3000, print_level: int = 0, hessian: str = "exact",
                 symbolic: str = "MX", max_controls: int | None = 3000,
                 **ipopt_options: Any) -> None:
        super().__init__(problem)
        n = problem.num_controls()
        if max_controls is not None and n > max_controls:
            raise ConfigError(
                f"ipopt: the problem has {n} controls; the IPOPT reference transcribes the "
                f"whole training problem into one dense NLP, which is too slow beyond "
                f"max_controls={max_controls}. It is meant for small problems (a few hundred "
                "controls); pass max_controls=None to insist"
            )
        if hessian not in ("exact", "torch", "limited-memory"):
            raise ConfigError(
                f"hessian must be 'exact', 'torch' or 'limited-memory', got {hessian!r}"
            )
        if not problem.parameters():
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.tol, self.max_iter, self.print_level = float(tol), int(max_iter), int(print_level)
        self.hessian, self.symbolic = hessian, symbolic
        self.ipopt_options = dict(ipopt_options)
        self.last_stats: dict[str, Any] = {}

    def solver_options(self) -> dict[str, Any]:
        """The options handed to ``casadi.nlpsol``."""
        opts: dict[str, Any] = {
            "print_time": False,
            "ipopt.tol": self.tol,
            "ipopt.max_iter": self.max_iter,
            "ipopt.print_level": self.print_level,
            "ipopt.sb": "yes",
            "ipopt.hessian_approximation": "limited-memory"
            if self.hessian == "limited-memory" else "exact",
        }
        opts.update({f"ipopt.{k}": v for k, v in self.ipopt_options.items()})
        return opts

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        problem = self.problem
        loss, grads, _ = problem.value_and_gradients(x0, y)
        gnorm = grad_norm(grads)
        start = time.perf_counter()
        nlp = transcribe(problem, x0, y, symbolic=self.symbolic)
        opts = self.solver_options()
        keep_alive = None
        if self.hessian == "torch":
            opts["hess_lag"], keep_alive = _torch_hessian_of_lagrangian(problem, x0, y)
        solver = ca.nlpsol("ipopt_reference", "ipopt", {"x": nlp.w, "f": nlp.objective}, opts)
        built = time.perf_counter()
        sol = solver(x0=nlp.w0)
        solved = time.perf_counter()
        del keep_alive  # the callback must outlive the solve
        stats = solver.stats()
        self.last_stats = stats
        w_star = np.asarray(sol["x"].full()).reshape(-1)
        flat = from_numpy(w_star, problem.parameters()[0])  # the problem's device and dtype
        problem.set_controls(unflatten_controls(flat, problem.controls))
        with torch.no_grad():
            after = problem.objective(x0, y)
        extra = {
            "objective": after,
            "ipopt_objective": float(sol["f"]),
            "status": str(stats.get("return_status")),
            "iterations": int(stats.get("iter_count", -1)),
            "success": bool(stats.get("success", False)),
            "grad_norm_after": torch.linalg.vector_norm(objective_gradient(problem, x0, y)),
            "build_seconds": built - start,
            "solve_seconds": solved - built,
        }
        return StepInfo(loss=loss.detach(), accepted=extra["success"], grad_norm=gnorm,
                        extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_status": str(self.last_stats.get("return_status"))}


register("ipopt", lambda problem, lr=None, **kw: IpoptReference(problem, lr, **kw),
         "IPOPT on the single-shooting NLP (CasADi): the exact optimum of a small problem")
