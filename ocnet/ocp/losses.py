"""The one table of terminal costs by name (``to_problem(model, "cross_entropy")``).

    cross_entropy   Phi = mean_i CE(x_T^i, y^i)                   (y: class indices)
    mse             Phi = mean over all entries of (x_T - y)^2    (torch's ``nn.MSELoss``)
    quadratic       Phi = mean_i |x_T^i - y^i|^2 / 2              (a sum over features)

"mse" means what it means in torch (a mean over samples *and* features). The
control-theory form, half the squared distance summed over the features and averaged
over the samples, is "quadratic": its gradient is (x_T - y)/B, with no 1/n_features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError, unknown_name

Loss = Callable[[Tensor, Tensor | None], Tensor]


def _same_shape(name: str, out: Tensor, y: Tensor | None) -> Tensor:
    if y is None:
        raise ShapeError(f"{name}: the loss needs targets y, got None; pass y to the solver step")
    if out.shape != y.shape:
        raise ShapeError(
            f"{name}: the network output has shape {tuple(out.shape)} but the targets have "
            f"shape {tuple(y.shape)}; they must be equal (broadcasting would compare "
            "every output with every target). Reshape the targets, e.g. y.reshape(out.shape)"
        )
    return y


class MSELoss(nn.MSELoss):
    """``nn.MSELoss`` (mean over all entries) that refuses to broadcast."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002
        return super().forward(input, _same_shape("mse", input, target))


class QuadraticLoss(nn.Module):
    """Phi(x, y) = mean_i |x_i - y_i|^2 / 2 (summed over the features)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002
        d = input - _same_shape("quadratic", input, target)
        return 0.5 * (d * d).reshape(d.shape[0], -1).sum(1).mean()


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (mean over the batch) with an error for missing targets."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002
        if target is None:
            raise ShapeError("cross_entropy: the loss needs class labels y, got None; pass "
                             "y (a LongTensor of class indices) to the solver step")
        return super().forward(input, target)


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


LOSSES: dict[str, Callable[[], Loss]] = {
    "cross_entropy": CrossEntropyLoss,
    "mse": MSELoss,
    "quadratic": QuadraticLoss,
}


def resolve_loss(loss: str | Loss) -> Loss:
    """A terminal cost from a name in :data:`LOSSES` or a callable ``loss(output, target)``."""
    if isinstance(loss, str):
        try:
            return LOSSES[loss]()
        except KeyError:
            raise unknown_name("loss", loss, list(LOSSES)) from None
    if not callable(loss):
        raise ConfigError(f"loss must be a callable loss(output, target) or a name, got {loss!r}")
    return loss


__all__ = ["LOSSES", "CrossEntropyLoss", "Loss", "MSELoss", "QuadraticCost", "QuadraticLoss",
           "resolve_loss"]
