"""Networks for the command line: ``mlp``, ``resnet`` and ``cnn`` as ``nn.Sequential``.

Every model is a plain ``nn.Sequential`` so :func:`ocnet.bridge.to_problem` turns it into
a control system; ``ResidualBlock`` is x + h act(W x + b), one explicit-Euler step.
"""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .dynamics.activations import activation as activation_fn
from .ocp.errors import ConfigError, unknown_name

MODELS = ("cnn", "mlp", "resnet")


class ResidualBlock(nn.Module):
    """x + h act(x W^T + b)."""

    def __init__(self, width: int, h: float = 0.5, activation: str = "tanh") -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.h = h
        self.activation = activation
        self._act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.h * self._act(self.linear(x))

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


_ACT_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus,
                "elu": nn.ELU, "gelu": nn.GELU, "identity": nn.Identity,
                "leaky_relu": nn.LeakyReLU}


def _act(name: str) -> nn.Module:
    try:
        return _ACT_MODULES[name]()
    except KeyError:
        raise unknown_name("activation", name, list(_ACT_MODULES)) from None


def build_model(name: str, n_features: int, n_outputs: int, *,
                image_shape: tuple[int, ...] | None = None, width: int | None = None,
                depth: int | None = None, activation: str | None = None,
                h: float | None = None) -> nn.Sequential:
    """A model by name.

    - ``mlp``: ``depth`` hidden dense layers of ``width`` (default 2 x 64, tanh).
    - ``resnet``: zero-pad lift to ``width`` (default max(4, n_features) for <= 4 features,
      else a dense lift to 32), ``depth`` residual blocks (default 8, step ``h`` = 0.5, tanh),
      dense head. Its states are the trajectories of a neural ODE under explicit Euler.
    - ``cnn``: for image data: 2 x (3x3 conv, 16 channels, relu), dense 64, dense head.
    """
    if name == "mlp":
        width, depth = width or 64, 2 if depth is None else depth
        act = activation or "tanh"
        layers: list[nn.Module] = []
        d = n_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), _act(act)]
            d = width
        layers.append(nn.Linear(d, n_outputs))
        return nn.Sequential(*layers)
    if name == "resnet":
        act = activation or "tanh"
        depth = 8 if depth is None else depth
        h = 0.5 if h is None else h
        if width is None:
            width = max(4, n_features) if n_features <= 4 else 32
        if n_features <= width and width <= 8:
            lift: list[nn.Module] = [PadFeatures(width)]
        else:
            lift = [nn.Linear(n_features, width), _act(act)]
        blocks = [ResidualBlock(width, h, act) for _ in range(depth)]
        return nn.Sequential(*lift, *blocks, nn.Linear(width, n_outputs))
    if name == "cnn":
        if image_shape is None:
            raise ConfigError(
                "model 'cnn' needs image data (e.g. --data digits, 8x8 images); this dataset "
                "has plain feature vectors: use --model mlp or resnet"
            )
        c, hh, ww = image_shape
        ch = width or 16
        act = activation or "relu"
        return nn.Sequential(
            nn.Unflatten(1, (c, hh, ww)),
            nn.Conv2d(c, ch, 3, padding=1), _act(act),
            nn.Conv2d(ch, ch, 3, padding=1), _act(act),
            nn.Flatten(),
            nn.Linear(ch * hh * ww, 64), _act(act),
            nn.Linear(64, n_outputs),
        )
    raise unknown_name("model", name, MODELS)
