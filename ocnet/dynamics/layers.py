"""Stage dynamics of network layers: dense, convolutional, residual, flatten, zero-pad lift.

Each stage owns (or shares) its control tensors; ``create`` builds fresh ones with
PyTorch's default initialisation so a problem can be written without ``nn.Module``.

    Dense:     x+ = act(x W^T + b)
    Conv2d:    x+ = act(conv(x, W) + b)
    Residual:  x+ = x + h act(x W^T + b)
    Flatten:   x+ = x.reshape(B, -1)
    ZeroPad:   x+ = [x, 0]            (lifts features to a wider state, no controls)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..ocp.errors import ShapeError
from ..ocp.stage import Controls, Stage
from ..ocp.structure import Affine
from .activations import Activation, activation


def residual(x: Tensor, weight: Tensor, bias: Tensor | None, h: float, act: Activation) -> Tensor:
    """x + h act(x W^T + b): the one residual block (a stage, a module and an Euler step of
    an activation field all use it)."""
    return x + h * act(F.linear(x, weight, bias))


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None,
             dtype: torch.dtype | None, device: torch.device | str | None) -> Tensor:
    t = torch.empty(shape, dtype=dtype or torch.get_default_dtype(), device=device)
    return t.uniform_(-bound, bound, generator=generator)


class Dense(Stage):
    """x+ = act(x W^T + b): a fully connected layer and its activation."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, activation_name: str = "tanh",
                 *, name: str | None = None) -> None:
        if weight.dim() != 2:
            raise ShapeError(f"Dense: weight must be 2-D (out, in), got {tuple(weight.shape)}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ShapeError(
                f"Dense: bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}"
            )
        controls = (weight,) if bias is None else (weight, bias)
        self.out_features, self.in_features = weight.shape
        self.activation_name = activation_name
        self._act = activation(activation_name)
        super().__init__(controls, name or f"dense({self.in_features}->{self.out_features},"
                                           f"{activation_name})")

    @classmethod
    def create(cls, in_features: int, out_features: int, activation_name: str = "tanh", *,
               bias: bool = True, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> Dense:
        """Fresh controls, initialised as ``nn.Linear`` does (uniform, bound 1/sqrt(in))."""
        bound = 1.0 / math.sqrt(in_features)
        w = _uniform((out_features, in_features), bound, generator, dtype, device)
        b = _uniform((out_features,), bound, generator, dtype, device) if bias else None
        return cls(w, b, activation_name)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return self._act(F.linear(x, u[0], u[1] if len(u) > 1 else None))

    def affine(self) -> Affine:
        return Affine("linear", self._act, self.activation_name,
                      has_bias=len(self.controls) == 2)


class Residual(Stage):
    """x+ = x + h act(x W^T + b): one explicit-Euler step of x' = act(W x + b)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, h: float = 1.0,
                 activation_name: str = "tanh", *, name: str | None = None) -> None:
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ShapeError(
                f"Residual: weight must be square (width, width), got {tuple(weight.shape)}"
            )
        controls = (weight,) if bias is None else (weight, bias)
        self.in_features = self.out_features = weight.shape[0]
        self.h = float(h)
        self.activation_name = activation_name
        self._act = activation(activation_name)
        super().__init__(controls, name or f"residual({self.in_features},h={h:g},"
                                           f"{activation_name})")

    @classmethod
    def create(cls, width: int, h: float = 1.0, activation_name: str = "tanh", *,
               bias: bool = True, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> Residual:
        bound = 1.0 / math.sqrt(width)
        w = _uniform((width, width), bound, generator, dtype, device)
        b = _uniform((width,), bound, generator, dtype, device) if bias else None
        return cls(w, b, h, activation_name)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return residual(x, u[0], u[1] if len(u) > 1 else None, self.h, self._act)

    def affine(self) -> Affine:
        return Affine("linear", self._act, self.activation_name, step=self.h,
                      has_bias=len(self.controls) == 2)


class Conv2d(Stage):
    """x+ = act(conv2d(x, W, b)) on states of shape (B, C, H, W)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, activation_name: str = "relu",
                 *, stride: int = 1, padding: int = 0, name: str | None = None) -> None:
        if weight.dim() != 4:
            raise ShapeError(
                f"Conv2d: weight must be 4-D (out, in, kh, kw), got {tuple(weight.shape)}"
            )
        controls = (weight,) if bias is None else (weight, bias)
        self.stride, self.padding = stride, padding
        self.activation_name = activation_name
        self._act = activation(activation_name)
        co, ci, kh, kw = weight.shape
        super().__init__(controls, name or f"conv({ci}->{co},{kh}x{kw},{activation_name})")

    @classmethod
    def create(cls, in_channels: int, out_channels: int, kernel_size: int = 3,
               activation_name: str = "relu", *, stride: int = 1, padding: int = 1,
               bias: bool = True, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> Conv2d:
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        w = _uniform((out_channels, in_channels, kernel_size, kernel_size), bound, generator,
                     dtype, device)
        b = _uniform((out_channels,), bound, generator, dtype, device) if bias else None
        return cls(w, b, activation_name, stride=stride, padding=padding)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        if x.dim() != 4:
            raise ShapeError(
                f"{self.name} needs states of shape (batch, channels, height, width), got "
                f"{tuple(x.shape)}; reshape the input (e.g. digits to (B, 1, 8, 8)) first"
            )
        y = F.conv2d(x, u[0], u[1] if len(u) > 1 else None, stride=self.stride,
                     padding=self.padding)
        return self._act(y)

    def affine(self) -> Affine:
        return Affine("conv", self._act, self.activation_name, has_bias=len(self.controls) == 2,
                      conv=(self.stride, self.padding, 1, 1))


class Flatten(Stage):
    """x+ = x.reshape(B, -1) (no controls)."""

    def __init__(self, *, name: str = "flatten") -> None:
        super().__init__((), name)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return x.reshape(x.shape[0], -1)


class ZeroPad(Stage):
    """x+ = [x, 0, ..., 0]: lifts the features to ``width`` (no controls)."""

    def __init__(self, in_features: int, width: int, *, name: str | None = None) -> None:
        if width < in_features:
            raise ShapeError(f"ZeroPad: width {width} is smaller than the input {in_features}")
        self.in_features, self.out_features = in_features, width
        super().__init__((), name or f"zeropad({in_features}->{width})")

    def f(self, x: Tensor, u: Controls) -> Tensor:
        if x.shape[-1] != self.in_features:  # a negative pad would silently crop
            raise ShapeError(
                f"{self.name} needs states with {self.in_features} features, got shape "
                f"{tuple(x.shape)}"
            )
        return F.pad(x, (0, self.out_features - x.shape[-1]))


class LinearQuadratic(Stage):
    """x+ = x A^T + u B^T,  l(x, u) = mean_i [ x_i'Qx_i/2 + x_i'S u ] + u'Ru/2.

    The stage of a textbook linear-quadratic problem: the control ``u`` (shape (m,)) is a
    plain tensor shared by the batch of initial states; the running cost depends on the
    state and the control.
    """

    def __init__(self, A: Tensor, B: Tensor, u: Tensor, Q: Tensor, R: Tensor,  # noqa: N803
                 S: Tensor | None = None, *, name: str | None = None) -> None:
        n, m = B.shape
        if A.shape != (n, n) or Q.shape != (n, n) or R.shape != (m, m) or u.shape != (m,):
            raise ShapeError(
                f"LinearQuadratic: need A (n,n), B (n,m), Q (n,n), R (m,m), u (m,); got "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}, Q {tuple(Q.shape)}, "
                f"R {tuple(R.shape)}, u {tuple(u.shape)}"
            )
        if S is not None and S.shape != (n, m):
            raise ShapeError(f"LinearQuadratic: need S (n,m) = ({n},{m}), got {tuple(S.shape)}")
        self.A, self.B, self.Q, self.R = A, B, Q, R
        self.S = torch.zeros(n, m, dtype=A.dtype, device=A.device) if S is None else S
        self.in_features = self.out_features = n
        super().__init__((u,), name or f"lq(n={n},m={m})")

    def buffers(self) -> tuple[Tensor, ...]:
        return (self.A, self.B, self.Q, self.R, self.S)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return x @ self.A.T + u[0] @ self.B.T

    def cost(self, x: Tensor, u: Controls) -> Tensor:
        v = u[0]
        state = 0.5 * ((x @ self.Q) * x).sum(-1).mean()
        cross = (x @ self.S @ v).mean()
        return state + cross + 0.5 * v @ self.R @ v
