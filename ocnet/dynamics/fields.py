"""Continuous vector fields F(x, u, t) of neural ODEs dx/dt = F(x, u(t), t)."""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..ocp.stage import Controls
from ..ocp.structure import Affine
from .activations import activation


class VectorField(abc.ABC):
    """Abstract field F(x, u, t) on states of shape (B, width), with controls ``u``."""

    width: int

    @abc.abstractmethod
    def __call__(self, x: Tensor, u: Controls, t: float) -> Tensor:
        """dx/dt at state ``x``, controls ``u`` and time ``t``."""

    @abc.abstractmethod
    def init_controls(self, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Controls:
        """Fresh controls for one interval."""

    def affine(self, h: float) -> Affine | None:
        """The Euler step x + h F(x, u) as an :class:`~ocnet.ocp.structure.Affine`, or
        ``None`` when the field does not describe one."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__


class ActivationField(VectorField):
    """F(x, (K, b), t) = act(x K^T + b)."""

    def __init__(self, width: int, activation_name: str = "tanh", *, scale: float = 1.0) -> None:
        self.width = width
        self.activation_name = activation_name
        self.scale = scale
        self._act = activation(activation_name)

    def __call__(self, x: Tensor, u: Controls, t: float) -> Tensor:
        return self._act(F.linear(x, u[0], u[1]))

    def affine(self, h: float) -> Affine | None:
        """The Euler step x + h act(x K^T + b) as an affine description."""
        return Affine("linear", self._act, self.activation_name, step=h)

    def init_controls(self, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Controls:
        bound = self.scale / math.sqrt(self.width)
        dtype = dtype or torch.get_default_dtype()
        k = torch.empty(self.width, self.width, dtype=dtype, device=device)
        b = torch.empty(self.width, dtype=dtype, device=device)
        return (k.uniform_(-bound, bound, generator=generator),
                b.uniform_(-bound, bound, generator=generator))

    @property
    def name(self) -> str:
        return f"{self.activation_name}(Kx+b)"


class AntisymmetricField(ActivationField):
    """F(x, (K, b), t) = act(x (K - K^T - gamma I)^T + b) (Haber & Ruthotto 2017).

    The Jacobian's eigenvalues have real part <= 0 (times act'), so the forward
    propagation is stable and, for small gamma, nearly conservative.
    """

    def __init__(self, width: int, activation_name: str = "tanh", *, gamma: float = 1e-2,
                 scale: float = 1.0) -> None:
        super().__init__(width, activation_name, scale=scale)
        self.gamma = gamma

    def __call__(self, x: Tensor, u: Controls, t: float) -> Tensor:
        k = u[0]
        eye = torch.eye(self.width, dtype=k.dtype, device=k.device)
        return self._act(F.linear(x, k - k.T - self.gamma * eye, u[1]))

    def affine(self, h: float) -> Affine | None:
        return None  # the control enters through K - K^T: not one affine map of (K, b)

    @property
    def name(self) -> str:
        return f"{self.activation_name}((K-K^T-{self.gamma:g}I)x+b)"
