"""Activation functions by name (a registry whose error lists the valid names)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..ocp.errors import unknown_name

Activation = Callable[[Tensor], Tensor]

ACTIVATIONS: dict[str, Activation] = {
    "identity": lambda x: x,
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "elu": F.elu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
}


def activation(name: str) -> Activation:
    """The activation called ``name``; an unknown name lists the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise unknown_name("activation", name, list(ACTIVATIONS)) from None
