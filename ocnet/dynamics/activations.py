"""Activation functions by name (a registry whose error lists the valid names)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

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
    "silu": F.silu,
}

#: the ``nn.Module`` of each activation (the same names: one table)
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}
assert ACTIVATION_MODULES.keys() == ACTIVATIONS.keys()


def activation(name: str) -> Activation:
    """The activation called ``name``; an unknown name lists the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise unknown_name("activation", name, list(ACTIVATIONS)) from None


def activation_module(name: str) -> nn.Module:
    """A fresh ``nn.Module`` of the activation called ``name``."""
    try:
        return ACTIVATION_MODULES[name]()
    except KeyError:
        raise unknown_name("activation", name, list(ACTIVATION_MODULES)) from None
