"""CasADi expressions of stages and terminal costs, and the single-shooting transcription.

The IPOPT reference (``ocnet.solvers.ipopt``) solves the NLP written here. Each stage
describes itself: a stage with an :class:`~ocnet.ocp.structure.Affine` part is written from
that description (its before/after layers through :data:`MODULE_EXPRESSIONS`, its
activation through :data:`ACTIVATION_EXPRESSIONS`); other stage types register an
expression with :func:`stage_expression` (``functools.singledispatch``), next to the
others here in the bridge, the one place where tensors change library.

Conventions: the batch of states is a (B, n) matrix X_t (rows are samples, as in torch);
vectors are columns; ``stage_expression`` returns (f_t(X, u), the rows' share of the
per-sample cost sum_i l_i / B or None, the cost of the controls alone or None).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import casadi as ca
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..dynamics.activations import ACTIVATION_MODULES, ACTIVATIONS
from ..dynamics.blocks import PadFeatures
from ..dynamics.fields import AntisymmetricField
from ..dynamics.layers import Flatten, LinearQuadratic, ZeroPad
from ..dynamics.mesh import EulerStage
from ..ocp.errors import ConfigError, ShapeError
from ..ocp.losses import MSELoss, QuadraticCost, QuadraticLoss, resolve_loss
from ..ocp.problem import Problem
from ..ocp.stage import Stage, flatten_controls
from .casadi import to_numpy
from .modules import ModuleStage

Sym = ca.SX | ca.MX


# ---------------------------------------------------------------------------- activations
def _softplus(z: Sym, beta: float, threshold: float) -> Sym:
    # torch: x for beta x > threshold, else log(1 + exp(beta x)) / beta
    return ca.if_else(beta * z > threshold, z, ca.log1p(ca.exp(beta * z)) / beta)


def _sigmoid(z: Sym) -> Sym:
    return 1 / (1 + ca.exp(-z))


#: the CasADi expression of each activation of ``ocnet.dynamics.ACTIVATIONS`` (same names)
ACTIVATION_EXPRESSIONS: dict[str, Callable[[Sym], Sym]] = {
    "identity": lambda z: z,
    "tanh": ca.tanh,
    "relu": lambda z: ca.fmax(z, 0),
    "sigmoid": _sigmoid,
    "softplus": lambda z: _softplus(z, 1.0, 20.0),
    "elu": lambda z: ca.if_else(z > 0, z, ca.exp(z) - 1),
    "gelu": lambda z: 0.5 * z * (1 + ca.erf(z / math.sqrt(2.0))),
    "leaky_relu": lambda z: ca.if_else(z > 0, z, 0.01 * z),
    "silu": lambda z: z * _sigmoid(z),
}
assert ACTIVATION_EXPRESSIONS.keys() == ACTIVATIONS.keys()


def activation_expression(name: str, z: Sym, stage: str) -> Sym:
    """The activation ``name`` applied to the CasADi expression ``z``."""
    try:
        return ACTIVATION_EXPRESSIONS[name](z)
    except KeyError:
        raise ConfigError(
            f"IpoptReference cannot transcribe activation {name!r} of {stage}; supported: "
            f"{', '.join(ACTIVATION_EXPRESSIONS)}"
        ) from None


def _activation_module(m: nn.Module, x: Sym) -> Sym:
    if isinstance(m, nn.Softplus):
        return _softplus(x, float(m.beta), float(m.threshold))
    if isinstance(m, nn.ELU):
        return ca.if_else(x > 0, x, m.alpha * (ca.exp(x) - 1))
    if isinstance(m, nn.LeakyReLU):
        return ca.if_else(x > 0, x, m.negative_slope * x)
    if isinstance(m, nn.GELU) and m.approximate != "none":
        raise ConfigError("IpoptReference transcribes nn.GELU(approximate='none') only")
    name = _MODULE_NAMES[type(m)]
    return ACTIVATION_EXPRESSIONS[name](x)


_MODULE_NAMES = {cls: name for name, cls in ACTIVATION_MODULES.items()}

#: CasADi expressions of parameter-free layers on a (B, n) matrix, by the layer's type
MODULE_EXPRESSIONS: dict[type, Callable[[nn.Module, Sym], Sym]] = {
    **{cls: _activation_module for cls in ACTIVATION_MODULES.values()},
    nn.Flatten: lambda m, x: x if m.start_dim == 1 else _unsupported(m),
    PadFeatures: lambda m, x: _pad(x, m.width),
}


def _unsupported(m: nn.Module) -> Sym:
    raise ConfigError(f"IpoptReference cannot transcribe {m!r} on flat states")


def _module_expr(m: nn.Module, x: Sym, stage: str) -> Sym:
    """A parameter-free elementwise / reshaping layer on a (B, n) matrix."""
    expr = MODULE_EXPRESSIONS.get(type(m))
    if expr is None:
        raise ConfigError(
            f"IpoptReference cannot transcribe layer {type(m).__name__} in stage {stage}; "
            f"supported parameter-free layers: "
            f"{', '.join(sorted(c.__name__ for c in MODULE_EXPRESSIONS))}. Replace it or "
            "solve with another solver"
        )
    return expr(m, x)


# ---------------------------------------------------------------------------- stages
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


def _label(stage: Stage, t: int) -> str:
    return f"{t} ({stage.describe()}, a {type(stage).__name__})"


def _affine_expression(stage: Stage, t: int, x: Sym, u: list[Sym]) -> Sym:
    """f_t of a stage from its :class:`~ocnet.ocp.structure.Affine` description."""
    label = _label(stage, t)
    aff = stage.affine()
    if aff is None or aff.kind != "linear":
        raise ConfigError(
            f"IpoptReference cannot transcribe stage {label}: it describes no dense affine "
            "part (Stage.affine()) and registers no expression (stage_expression.register). "
            "Supported: dense / residual / Euler stages, to_problem stages of nn.Linear or "
            "an AffineModule (ResidualBlock), LinearQuadratic, ZeroPad, Flatten. Rewrite the "
            "stage with these, or solve the problem with another solver"
        )
    for m in aff.before:
        x = m(x) if not isinstance(m, nn.Module) else _module_expr(m, x, label)
    b = u[1] if aff.has_bias else (None if aff.fixed_bias is None else _dm(aff.fixed_bias))
    z = activation_expression(aff.activation_name, _linear(x, u[0], b), label)
    x = z if aff.step is None else x + aff.step * z
    for m in aff.after:
        x = _module_expr(m, x, label)
    return x


@functools.singledispatch
def stage_expression(stage: Stage, t: int, x: Sym, u: list[Sym], batch: int
                     ) -> tuple[Sym, Sym | None, Sym | None]:
    """f_t and l_t of one stage as CasADi expressions.

    ``x`` holds some rows (samples) of the (B, n) state matrix, ``batch`` = B the size of
    the whole batch, ``u`` the stage's controls (vectors as columns, matrices as matrices).
    Returns (f_t(x, u), the rows' share of the per-sample cost sum_i l_i / B or None, the
    cost that depends on the controls only or None). The default writes a stage without a
    running cost from its affine description; register other stage types.
    """
    if stage.has_cost:
        raise ConfigError(
            f"IpoptReference cannot transcribe the running cost of stage {_label(stage, t)} "
            "(an arbitrary torch function); drop it or solve with another solver"
        )
    return _affine_expression(stage, t, x, u), None, None


@stage_expression.register
def _(stage: ModuleStage, t: int, x: Sym, u: list[Sym], batch: int
      ) -> tuple[Sym, Sym | None, Sym | None]:
    shared = 0.5 * stage.weight_decay * _sumsq(u) if stage.weight_decay > 0 else None
    return _affine_expression(stage, t, x, u), None, shared


@stage_expression.register
def _(stage: EulerStage, t: int, x: Sym, u: list[Sym], batch: int
      ) -> tuple[Sym, Sym | None, Sym | None]:
    label = _label(stage, t)
    if stage.has_cost:
        raise ConfigError(
            f"IpoptReference cannot transcribe the running cost of stage {label} (an "
            "arbitrary torch function); drop it or solve with another solver"
        )
    field = stage.field
    if isinstance(field, AntisymmetricField):
        k = u[0] - u[0].T - field.gamma * ca.DM.eye(field.width)
        z = _linear(x, k, u[1])
        return x + stage.h * activation_expression(field.activation_name, z, label), None, None
    if stage.affine() is None:
        raise ConfigError(
            f"IpoptReference cannot transcribe the vector field {type(field).__name__} of "
            f"stage {label}; supported: ActivationField, AntisymmetricField"
        )
    return _affine_expression(stage, t, x, u), None, None


@stage_expression.register
def _(stage: LinearQuadratic, t: int, x: Sym, u: list[Sym], batch: int
      ) -> tuple[Sym, Sym | None, Sym | None]:
    a, bm, q, r, s = (_dm(m) for m in (stage.A, stage.B, stage.Q, stage.R, stage.S))
    v = u[0]  # (m, 1)
    f = ca.mtimes(x, a.T) + ca.repmat(ca.mtimes(bm, v).T, x.size1(), 1)
    state = 0.5 * ca.sum1(ca.sum2(ca.mtimes(x, q) * x)) / batch
    cross = ca.sum1(ca.mtimes(ca.mtimes(x, s), v)) / batch
    return f, state + cross, 0.5 * ca.mtimes(ca.mtimes(v.T, r), v)


@stage_expression.register
def _(stage: ZeroPad, t: int, x: Sym, u: list[Sym], batch: int
      ) -> tuple[Sym, Sym | None, Sym | None]:
    return _pad(x, stage.out_features), None, None


@stage_expression.register
def _(stage: Flatten, t: int, x: Sym, u: list[Sym], batch: int
      ) -> tuple[Sym, Sym | None, Sym | None]:
    return x, None, None


# ---------------------------------------------------------------------------- terminal costs
def _resolve_terminal(cost: Callable) -> Callable:
    return resolve_loss(cost) if isinstance(cost, str) else cost


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
    if isinstance(cost, nn.MSELoss | MSELoss) or cost is F.mse_loss:
        if y is None:
            raise ConfigError("an MSE terminal cost needs targets y")
        if isinstance(cost, nn.MSELoss) and cost.reduction not in ("mean", "sum"):
            raise ConfigError("IpoptReference transcribes nn.MSELoss with reduction mean or sum")
        return to_numpy(y).reshape(batch, -1)
    if isinstance(cost, QuadraticCost | QuadraticLoss):
        if isinstance(cost, QuadraticLoss) and y is None:
            raise ConfigError("a quadratic terminal cost needs targets y")
        return np.zeros((batch, n_out)) if y is None else to_numpy(y).reshape(batch, -1)
    raise ConfigError(
        f"IpoptReference cannot transcribe the terminal cost {cost!r}; supported: "
        "nn.CrossEntropyLoss / F.cross_entropy, nn.MSELoss / F.mse_loss, the losses of "
        "ocnet.ocp.LOSSES and ocnet.ocp.losses.QuadraticCost"
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
    if isinstance(cost, nn.MSELoss | MSELoss) or cost is F.mse_loss:
        total = ca.sumsqr(x - target)
        if isinstance(cost, nn.MSELoss) and cost.reduction == "sum":
            return total
        return total / (batch * x.size2())
    if isinstance(cost, QuadraticCost):
        d = x - target
        return 0.5 * ca.sum1(ca.sum2(ca.mtimes(d, _dm(cost.Q)) * d)) / batch
    if isinstance(cost, QuadraticLoss):
        return 0.5 * ca.sumsqr(x - target) / batch
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
    if problem.couplings:
        raise ConfigError(
            f"IpoptReference cannot transcribe the costs coupling stages of {problem.name} "
            f"({', '.join(type(c).__name__ for c in problem.couplings)}); solve the problem "
            "with another solver or without them (e.g. a neural ODE with beta = 0)"
        )
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
