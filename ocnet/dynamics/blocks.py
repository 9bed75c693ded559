"""``nn.Module`` blocks for networks that are control systems (used with ``to_problem``).

    ResidualBlock:  x+ = x + h act(x W^T + b)     (the one residual block: ``layers.residual``)
    PadFeatures:    x+ = [x, 0, ..., 0]           (the parameter-free lift of a neural ODE)

A module that describes its own affine part subclasses :class:`AffineModule`; a stage
made from it (``ocnet.bridge.ModuleStage``) then describes itself to the solvers that
need the structure (DDPNOpt, IPOPT), whatever the module's type.
"""

from __future__ import annotations

import abc

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..ocp.errors import ConfigError
from ..ocp.structure import Affine
from .activations import activation as activation_fn
from .layers import residual


class AffineModule(abc.ABC):
    """Capability: the module's trainable parameters enter through one affine map.

    :meth:`affine` describes the module as x -> post(x, lin(x, (W, b))); ``parameter_names``
    are the names of W (and b) in ``named_parameters()``, in that order.
    """

    parameter_names: tuple[str, ...]

    @abc.abstractmethod
    def affine(self, has_bias: bool) -> Affine:
        """The description (``has_bias``: whether the bias is a trainable control)."""

    @abc.abstractmethod
    def frozen_bias(self) -> Tensor | None:
        """The bias used when it is not a control."""


class ResidualBlock(nn.Module, AffineModule):
    """x + h act(x W^T + b)."""

    parameter_names = ("linear.weight", "linear.bias")

    def __init__(self, width: int, h: float = 0.5, activation: str = "tanh") -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.h = h
        self.activation = activation
        self._act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return residual(x, self.linear.weight, self.linear.bias, self.h, self._act)

    def affine(self, has_bias: bool) -> Affine:
        return Affine("linear", self._act, self.activation, step=self.h, has_bias=has_bias,
                      fixed_bias=None if has_bias else self.linear.bias)

    def frozen_bias(self) -> Tensor | None:
        return self.linear.bias

    def extra_repr(self) -> str:
        return f"h={self.h}, activation={self.activation}"


class PadFeatures(nn.Module):
    """Zero-pads the last dimension to ``width``: the parameter-free lift of a neural ODE."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > self.width:
            raise ConfigError(f"PadFeatures({self.width}) got {x.shape[-1]} features")
        return F.pad(x, (0, self.width - x.shape[-1]))
