"""What a stage tells the solvers that need more than its dynamics (asked, never inferred).

A solver never switches on a stage's type; it asks the stage (``stage.affine()``,
``stage.cost_derivatives(x, u)``) and gets ``None`` when the stage does not describe
that structure. :meth:`ocnet.ocp.Problem.affine` turns the ``None`` into an error that
names the stage, the solver and the fix.

The affine description (DDPNOpt's feedback, the Kronecker curvature, IPOPT's
transcription, exact DDPNOpt)::

    a  = before(x)                    parameter-free maps (flatten, padding, ...)
    z  = lin(a, u) = a W^T + b        or conv2d(a, W) + b
    x+ = after(post(a, z)),   post(a, z) = act(z)              (a plain layer)
                                         = a + step act(z)     (a residual / Euler layer)

``u = (W, b)`` or ``(W,)`` with a ``fixed_bias`` that is not a control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .stage import Controls

Map = Callable[[Tensor], Tensor]


def _chain(maps: Sequence[Map], x: Tensor) -> Tensor:
    for m in maps:
        x = m(x)
    return x


@dataclass(frozen=True)
class Affine:
    """A stage whose controls enter through one dense or convolutional affine map.

    Attributes:
        kind: ``"linear"`` or ``"conv"``.
        activation: the activation applied to z (a torch function).
        activation_name: its name in ``ocnet.dynamics.ACTIVATIONS`` (for transcriptions).
        step: ``None`` for x+ = act(z); a number h for x+ = a + h act(z).
        has_bias: whether the bias is a control (``u = (W, b)``) or not (``u = (W,)``).
        fixed_bias: the bias that is not a control (or ``None``).
        conv: stride, padding, dilation, groups of a convolution.
        before, after: parameter-free maps around the affine part (callables; for a
            module stage, the ``nn.Module`` layers themselves).
    """

    kind: str
    activation: Map
    activation_name: str
    step: float | None = None
    has_bias: bool = True
    fixed_bias: Tensor | None = None
    conv: tuple[int | tuple[int, ...], ...] = (1, 0, 1, 1)
    before: tuple[Map, ...] = ()
    after: tuple[Map, ...] = ()

    def pre(self, x: Tensor) -> Tensor:
        """a = before(x)."""
        return _chain(self.before, x)

    def lin(self, a: Tensor, u: Controls, bias: bool = True) -> Tensor:
        """z = lin(a, u) (``bias=False``: the weight part alone, a linear map of W)."""
        b = (u[1] if self.has_bias else self.fixed_bias) if bias else None
        if self.kind == "linear":
            return F.linear(a, u[0], b)
        s, p, d, g = self.conv
        return F.conv2d(a, u[0], b, s, p, d, g)

    def post(self, a: Tensor, z: Tensor) -> Tensor:
        """x+ = after(act(z)) or after(a + step act(z))."""
        out = self.activation(z)
        if self.step is not None:
            out = a + self.step * out
        return _chain(self.after, out)

    def f(self, x: Tensor, u: Controls) -> Tensor:
        """The whole stage, x+ = post(a, lin(a, u)) with a = pre(x)."""
        a = self.pre(x)
        return self.post(a, self.lin(a, u))

    def weight_grad(self, a: Tensor, dz: Tensor, w_shape: torch.Size) -> tuple[Tensor, ...]:
        """Sum over the batch of dz/du^T dz: the weight (and bias) gradient of cotangent dz."""
        if self.kind == "linear" and dz.dim() == 2:  # the common case, in three dispatches
            gw = dz.t().mm(a)
            gb = dz.sum(0)
        elif self.kind == "linear":
            gw = dz.reshape(-1, dz.shape[-1]).T @ a.reshape(-1, a.shape[-1])
            gb = dz.reshape(-1, dz.shape[-1]).sum(0)
        else:
            s, p, d, g = self.conv
            gw = torch.nn.grad.conv2d_weight(a, w_shape, dz, s, p, d, g)
            gb = dz.sum((0, 2, 3))
        return (gw, gb) if self.has_bias else (gw,)

    def patches(self, a: Tensor, w_shape: torch.Size) -> Tensor:
        """The affine map's inputs as rows (N, fan_in) (+ a column of ones for the bias)."""
        if self.kind == "linear":
            rows = a.reshape(-1, a.shape[-1])
        else:
            s, p, d, _ = self.conv
            cols = F.unfold(a, w_shape[2:], dilation=d, padding=p, stride=s)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows


@dataclass(frozen=True)
class CostDerivatives:
    """Closed-form derivatives of a running cost on the flat batch state (size n = B n_t)
    and the flat controls of the stage (size m): l_x, l_u, l_xx, l_ux, l_uu."""

    l_x: Tensor
    l_u: Tensor
    l_xx: Tensor
    l_ux: Tensor
    l_uu: Tensor
