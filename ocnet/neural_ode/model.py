"""Neural ODEs on a DG(0) time mesh: lift -> explicit Euler on dx/dt = F(x, theta(t)) -> head.

    x_0     = lift(input)                         (zero padding, a dense layer, or nothing)
    x_{m+1} = x_m + h_m F(x_m, theta_m, t_m),     m = 0..N-1   (theta piecewise constant)
    output  = head(x_N)                           (a dense layer, or nothing)

    J = Phi(output, y) + R_h(theta) + wd/2 (|lift|^2 + |head|^2)

with R_h the DG(0) form of lam/2 int |theta|^2 + |theta'|^2 (``regularizer.py``). The
network *is* the Euler discretisation of the ODE, so :meth:`NeuralODE.integrate` can
evaluate the very same controls with an adaptive torchdiffeq solver (interval by
interval, so the control jumps fall on solver steps) and measure the discretisation
error. :meth:`NeuralODE.refine` bisects intervals and copies each parent's control to
its children: theta(t) is unchanged, only the time stepping gets finer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..dynamics import (
    ActivationField,
    AntisymmetricField,
    Dense,
    EulerStage,
    TimeMesh,
    VectorField,
    ZeroPad,
)
from ..ocp.errors import ConfigError, ShapeError, unknown_name
from ..ocp.losses import LOSSES, Loss, resolve_loss
from ..ocp.problem import Problem
from ..ocp.stage import Controls, Stage
from .regularizer import DG0Regularizer, JumpPenalty

__all__ = ["FIELDS", "LOSSES", "LinearField", "Loss", "NeuralODE", "NeuralODEProblem",
           "make_field"]

FIELDS = {"activation": ActivationField, "antisymmetric": AntisymmetricField}
LIFTS = ("zeropad", "dense", "none")
HEADS = ("dense", "none")


class LinearField(VectorField):
    """F(x, (theta,), t) = x A^T + theta B^T: a linear control system (exact solutions)."""

    def __init__(self, A: Tensor, B: Tensor) -> None:  # noqa: N803
        if A.dim() != 2 or A.shape[0] != A.shape[1] or B.dim() != 2 or B.shape[0] != A.shape[0]:
            raise ShapeError(f"LinearField: need A (n, n) and B (n, m), got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        self.A, self.B = A, B
        self.width = A.shape[0]

    def __call__(self, x: Tensor, u: Controls, t: float) -> Tensor:
        return x @ self.A.T + u[0] @ self.B.T

    def init_controls(self, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Controls:
        return (torch.zeros(self.B.shape[1], dtype=dtype or self.A.dtype, device=device),)

    @property
    def name(self) -> str:
        return "Ax+B theta"


class _DenseDecay(Dense):
    """Dense with weight decay wd/2 |u|^2 as its running cost."""

    def __init__(self, weight: Tensor, bias: Tensor | None, activation_name: str,
                 weight_decay: float) -> None:
        super().__init__(weight, bias, activation_name)
        self.weight_decay = float(weight_decay)

    def cost(self, x: Tensor, u: Controls) -> Tensor | None:
        if self.weight_decay == 0:
            return None
        return 0.5 * self.weight_decay * sum((v * v).sum() for v in u)  # type: ignore[return-value]


class NeuralODEProblem(Problem):
    """The OCP of a :class:`NeuralODE` (``model``): stages lift, Euler steps, head; the
    regulariser's alpha term as each Euler stage's running cost and its jump term as a
    :class:`~ocnet.neural_ode.regularizer.JumpPenalty` coupling the Euler stages."""

    def __init__(self, stages: Sequence[Stage], terminal_cost: Loss, model: NeuralODE,
                 couplings: Sequence[JumpPenalty] = ()) -> None:
        super().__init__(stages, terminal_cost, couplings=couplings, name="neural_ode")
        self.model = model


class NeuralODE:
    """lift -> explicit Euler on a DG(0) mesh -> head; see the module docstring.

    Args:
        field: the vector field (``ActivationField``, ``AntisymmetricField``, ``LinearField``,
            ...); its ``width`` is the state size of the ODE.
        mesh: the time mesh; one layer per interval.
        in_features: input size (default: the field width).
        out_features: output size of the dense head (``head="dense"``).
        lift: ``"zeropad"`` (default), ``"dense"`` (a linear layer) or ``"none"``.
        head: ``"dense"`` (a linear layer, default) or ``"none"``.
        reg: the regulariser R_h (default none).
        weight_decay: wd/2 |u|^2 on the lift and head controls.
        controls: per-interval field controls (default: ``field.init_controls``).
        lift_controls, head_controls: given (weight, bias) tensors of lift and head.
    """

    def __init__(self, field: VectorField, mesh: TimeMesh, *, in_features: int | None = None,
                 out_features: int | None = None, lift: str = "zeropad", head: str = "dense",
                 reg: DG0Regularizer | None = None, weight_decay: float = 0.0,
                 controls: Sequence[Controls] | None = None,
                 lift_controls: Controls | None = None, head_controls: Controls | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if lift not in LIFTS:
            raise unknown_name("lift", lift, LIFTS)
        if head not in HEADS:
            raise unknown_name("head", head, HEADS)
        width = field.width
        self.field, self.mesh = field, mesh
        self.in_features = width if in_features is None else int(in_features)
        self.lift_kind, self.head_kind = lift, head
        self.reg = reg or DG0Regularizer(0.0)
        self.weight_decay = float(weight_decay)
        if lift == "none" and self.in_features != width:
            raise ShapeError(f"lift='none' needs in_features == width ({width}), got "
                             f"{self.in_features}; use lift='zeropad' or 'dense'")
        if lift == "zeropad" and self.in_features > width:
            raise ShapeError(f"lift='zeropad' cannot map {self.in_features} features to width "
                             f"{width}; widen the field or use lift='dense'")
        if head == "dense" and out_features is None:
            raise ConfigError("head='dense' needs out_features (e.g. the number of classes)")
        self.out_features = width if head == "none" else int(out_features)  # type: ignore[arg-type]
        kw: dict[str, Any] = {"generator": generator, "dtype": dtype, "device": device}
        if controls is None:
            controls = [field.init_controls(**kw) for _ in range(len(mesh))]
        if len(controls) != len(mesh):
            raise ShapeError(f"NeuralODE: {len(controls)} control sets for {len(mesh)} intervals")
        self.controls: list[Controls] = [tuple(u) for u in controls]
        self.lift_controls: Controls = ()
        if lift == "dense":
            self.lift_controls = lift_controls or Dense.create(
                self.in_features, width, "identity", **kw).controls
        self.head_controls: Controls = ()
        if head == "dense":
            self.head_controls = head_controls or Dense.create(
                width, self.out_features, "identity", **kw).controls

    # ------------------------------------------------------------------ structure
    @property
    def offset(self) -> int:
        """Index of the first Euler stage in :meth:`stages` (1 with a lift, else 0)."""
        return 0 if self.lift_kind == "none" else 1

    @property
    def num_layers(self) -> int:
        """The number of Euler layers (mesh intervals)."""
        return len(self.mesh)

    def _lift_stage(self) -> Stage | None:
        if self.lift_kind == "zeropad":
            return ZeroPad(self.in_features, self.field.width)
        if self.lift_kind == "dense":
            w, b = self.lift_controls
            return _DenseDecay(w, b, "identity", self.weight_decay)
        return None

    def _head_stage(self) -> Stage | None:
        if self.head_kind == "dense":
            w, b = self.head_controls
            return _DenseDecay(w, b, "identity", self.weight_decay)
        return None

    def _alpha_cost(self, h: float) -> Callable[[Tensor, Controls], Tensor] | None:
        reg = self.reg
        if not (reg.lam > 0 and reg.alpha > 0):
            return None
        scale = 0.5 * reg.lam * reg.alpha * h
        return lambda x, u: scale * sum((v * v).sum() for v in u)

    def stages(self) -> list[Stage]:
        """[lift] + one :class:`EulerStage` per interval (sharing the live controls) + [head];
        each Euler stage's running cost is the regulariser's alpha term on its interval."""
        nodes = self.mesh.nodes
        euler = [EulerStage(self.field, h, nodes[m], self.controls[m], self._alpha_cost(h))
                 for m, h in enumerate(self.mesh.lengths)]
        lift, head = self._lift_stage(), self._head_stage()
        return ([lift] if lift else []) + euler + ([head] if head else [])

    def problem(self, loss: Loss | str = "cross_entropy") -> NeuralODEProblem:
        """The OCP any solver trains: controls = lift, per-interval field and head controls;
        J = Phi + R_h (+ weight decay), the jump term of R_h a coupled cost."""
        couplings = []
        if self.reg.lam > 0 and self.reg.beta > 0 and len(self.mesh) > 1:
            stages = tuple(range(self.offset, self.offset + len(self.mesh)))
            couplings.append(JumpPenalty(stages, self.reg.pair_weights(self.mesh)))
        return NeuralODEProblem(self.stages(), resolve_loss(loss), self, couplings)

    def parameters(self) -> list[Tensor]:
        return [*self.lift_controls, *(u for us in self.controls for u in us),
                *self.head_controls]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def lift(self, x: Tensor) -> Tensor:
        s = self._lift_stage()
        return x if s is None else s(x)

    @torch.no_grad()
    def head(self, x: Tensor) -> Tensor:
        s = self._head_stage()
        return x if s is None else s(x)

    @torch.no_grad()
    def states(self, x: Tensor) -> list[Tensor]:
        """The Euler states x_0..x_N (after the lift)."""
        xs = [self.lift(x)]
        nodes = self.mesh.nodes
        for m, h in enumerate(self.mesh.lengths):
            xs.append(xs[-1] + h * self.field(xs[-1], self.controls[m], nodes[m]))
        return xs

    def __call__(self, x: Tensor) -> Tensor:
        """The network's output: head(x_N) of explicit Euler."""
        return self.head(self.states(x)[-1])

    @torch.no_grad()
    def integrate(self, x: Tensor, method: str = "dopri5", *, rtol: float = 1e-9,
                  atol: float = 1e-11, options: dict[str, Any] | None = None,
                  return_states: bool = False) -> Tensor | list[Tensor]:
        """The same controls through a torchdiffeq solver, interval by interval.

        Returns head(x(T)), or the states at the mesh nodes with ``return_states``.
        """
        from torchdiffeq import odeint

        z = self.lift(x)
        out = [z]
        nodes = self.mesh.nodes
        for m in range(len(self.mesh)):
            u = self.controls[m]

            # Host read kept: VectorField's contract is t: float (a field may use math/numpy
            # on it, which a CUDA tensor would break), and torchdiffeq itself decides on the
            # host (input checks, step acceptance), so integrate is an evaluation tool run
            # between training steps, never inside a sweep (docs/device_audit.md).
            def rhs(t: Tensor, s: Tensor, u: Controls = u) -> Tensor:
                return self.field(s, u, float(t))

            ts = torch.tensor([nodes[m], nodes[m + 1]], dtype=z.dtype, device=z.device)
            z = odeint(rhs, z, ts, method=method, rtol=rtol, atol=atol, options=options)[-1]
            out.append(z)
        return out if return_states else self.head(z)

    def theta(self, t: Sequence[float]) -> list[Controls]:
        """The DG(0) control function at times ``t`` (the control of the interval
        (t_m, t_{m+1}] containing each t; t_0 belongs to the first)."""
        nodes = self.mesh.nodes
        out = []
        for s in t:
            m = next((i for i in range(len(self.mesh)) if s <= nodes[i + 1]), len(self.mesh) - 1)
            out.append(self.controls[m])
        return out

    # ------------------------------------------------------------------ refinement
    def refine(self, marked: Sequence[int] | Sequence[bool] | Tensor) -> NeuralODE:
        """A new model on the mesh with the marked intervals bisected; each child copies its
        parent's controls (theta(t) unchanged); lift and head controls are copied."""
        mesh, parent = self.mesh.refine(marked)
        return self.with_mesh(mesh, TimeMesh.prolongate(self.controls, parent))

    def with_mesh(self, mesh: TimeMesh, controls: Sequence[Controls]) -> NeuralODE:
        """A copy on another mesh with the given field controls (lift/head copied)."""
        return NeuralODE(
            self.field, mesh, in_features=self.in_features,
            out_features=self.out_features if self.head_kind == "dense" else None,
            lift=self.lift_kind, head=self.head_kind, reg=self.reg,
            weight_decay=self.weight_decay, controls=controls,
            lift_controls=tuple(u.detach().clone() for u in self.lift_controls) or None,
            head_controls=tuple(u.detach().clone() for u in self.head_controls) or None,
        )

    def __repr__(self) -> str:
        return (f"NeuralODE({self.lift_kind} {self.in_features}->{self.field.width}, "
                f"{self.field.name}, N={len(self.mesh)}, T={self.mesh.T:g}, "
                f"head {self.head_kind}->{self.out_features})")


def make_field(kind: str, width: int, activation_name: str = "tanh", **options: Any
               ) -> VectorField:
    """``"activation"`` (act(Kx+b)) or ``"antisymmetric"`` (act((K-K^T-gamma I)x+b))."""
    if kind not in FIELDS:
        raise unknown_name("field", kind, list(FIELDS))
    return FIELDS[kind](width, activation_name, **options)
