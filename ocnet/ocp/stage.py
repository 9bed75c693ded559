"""A stage: one layer of a network seen as one time step of a control system.

    x_{t+1} = f_t(x_t, u_t),     running cost l_t(x_t, u_t)

``x`` is the batched state (first dimension = batch), ``u`` a tuple of control
tensors shared by the whole batch (a layer's weights, or the inputs of a
textbook control problem). ``l_t`` returns a scalar already reduced over the batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the structure module imports Controls from here
    from .structure import Affine, CostDerivatives

Controls = tuple[Tensor, ...]


class Stage(abc.ABC):
    """Abstract stage. Concrete stages implement :meth:`f` and may override :meth:`cost`.

    ``controls`` are the tensors a solver changes. They are the very tensors the
    stage computes with (for a stage built from an ``nn.Module`` they *are* the
    module's parameters), so updating them in place trains the module.
    ``in_features``/``out_features`` (the size of the last state dimension, or
    ``None`` when unknown) let a :class:`~ocnet.ocp.Problem` check that
    consecutive stages fit before anything runs.
    """

    in_features: int | None = None
    out_features: int | None = None

    def __init__(self, controls: Sequence[Tensor] = (), name: str | None = None) -> None:
        controls = tuple(controls)
        for i, u in enumerate(controls):
            if not isinstance(u, Tensor):
                raise TypeError(
                    f"{type(self).__name__}: control {i} is a {type(u).__name__}, not a tensor"
                )
        self._controls: Controls = controls
        self.name = name or type(self).__name__

    @property
    def controls(self) -> Controls:
        """The tensors this stage is controlled by (possibly empty)."""
        return self._controls

    def buffers(self) -> tuple[Tensor, ...]:
        """Tensors the stage computes with that are not controls (moved by ``bridge.place``)."""
        return ()

    @abc.abstractmethod
    def f(self, x: Tensor, u: Controls) -> Tensor:
        """The dynamics: the next state from state ``x`` under controls ``u``."""

    def cost(self, x: Tensor, u: Controls) -> Tensor | None:
        """The running cost l_t(x, u), a scalar reduced over the batch; ``None`` means zero."""
        return None

    @property
    def has_cost(self) -> bool:
        """Whether the stage has a running cost (stages without one skip its derivatives).

        True when :meth:`cost` is overridden; stages built from an optional cost function
        override this property."""
        return type(self).cost is not Stage.cost

    # ------------------------------------------------------------------ self-description
    def affine(self) -> Affine | None:
        """The stage's affine part and activation (:class:`~ocnet.ocp.structure.Affine`),
        or ``None`` when it does not have (or does not describe) one."""
        return None

    def cost_derivatives(self, x: Tensor, u: Controls) -> CostDerivatives | None:
        """Closed-form derivatives of the running cost on the flat batch state and the flat
        controls, or ``None`` (then a solver that needs them differentiates the cost)."""
        return None

    def __call__(self, x: Tensor, u: Controls | None = None) -> Tensor:
        return self.f(x, self._controls if u is None else u)

    def describe(self) -> str:
        """A short human-readable description used in error messages."""
        shapes = ", ".join("x".join(map(str, u.shape)) or "scalar" for u in self._controls)
        return f"{self.name}[{shapes}]" if shapes else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class FunctionStage(Stage):
    """A stage from plain functions: ``f(x, u) -> x_next`` and optionally ``cost(x, u)``.

    The quickest way to state a textbook control problem::

        A, B = torch.randn(3, 3), torch.randn(3, 1)
        u = torch.zeros(1)
        stage = FunctionStage(lambda x, u: x @ A.T + u[0] @ B.T, [u])

    Tensors the functions close over are not moved by ``bridge.place``; pass them as
    ``buffers`` so they are.
    """

    def __init__(
        self,
        f: Callable[[Tensor, Controls], Tensor],
        controls: Sequence[Tensor] = (),
        cost: Callable[[Tensor, Controls], Tensor] | None = None,
        *,
        buffers: Sequence[Tensor] = (),
        name: str | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__(controls, name or getattr(f, "__name__", "function"))
        self._f = f
        self._cost_fn = cost
        self._buffers = tuple(buffers)
        self.in_features = in_features
        self.out_features = out_features

    def buffers(self) -> tuple[Tensor, ...]:
        return self._buffers

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return self._f(x, u)

    def cost(self, x: Tensor, u: Controls) -> Tensor | None:
        return None if self._cost_fn is None else self._cost_fn(x, u)

    @property
    def has_cost(self) -> bool:
        return self._cost_fn is not None


def flatten_controls(controls: Sequence[Controls], like: Tensor | None = None) -> Tensor:
    """All controls in one vector (stage by stage, tensor by tensor).

    With no control tensors at all (e.g. a flatten stage) the result is an empty vector,
    on ``like``'s device and dtype when given.
    """
    parts = [u.reshape(-1) for us in controls for u in us]
    if not parts:
        return torch.zeros(0) if like is None else like.new_zeros(0)
    return torch.cat(parts)


def unflatten_controls(vector: Tensor, like: Sequence[Controls]) -> list[Controls]:
    """The inverse of :func:`flatten_controls`, shaped like ``like``."""
    out, k = [], 0
    for us in like:
        stage = []
        for u in us:
            stage.append(vector[k:k + u.numel()].reshape(u.shape))
            k += u.numel()
        out.append(tuple(stage))
    if k != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the controls {k}")
    return out


def as_controls(values: Sequence[Tensor] | Tensor) -> Controls:
    """A tuple of tensors from a tensor or a sequence of them."""
    if isinstance(values, Tensor):
        return (values,)
    return tuple(values)


def zeros_like_controls(u: Controls) -> Controls:
    """Zeros shaped like each control."""
    return tuple(torch.zeros_like(v) for v in u)
