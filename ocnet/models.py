"""Networks for the command line: ``mlp``, ``resnet`` and ``cnn`` as ``nn.Sequential``.

Every model is a plain ``nn.Sequential`` so :func:`ocnet.bridge.to_problem` turns it into
a control system; ``ResidualBlock`` is x + h act(W x + b), one explicit-Euler step.
"""

from __future__ import annotations

from torch import Tensor, nn

from .bridge import to_problem
from .dynamics.activations import ACTIVATION_MODULES
from .dynamics.blocks import PadFeatures, ResidualBlock
from .ocp.errors import ConfigError, unknown_name
from .ocp.problem import Problem

__all__ = ["MODELS", "PadFeatures", "ResidualBlock", "build_model", "emsa_toy_problem",
           "feature_sum_mse"]

MODELS = ("cnn", "mlp", "resnet")


_ACT_MODULES = ACTIVATION_MODULES  # one activation table (ocnet.dynamics.activations)


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


def feature_sum_mse(out: Tensor, target: Tensor) -> Tensor:
    """The MSE of the output features' sum: the loss of the E-MSA public toy
    (LiQianxiao/MaxPrinciple-DeepLearning, ``main_toy.py`` ``loss_func``)."""
    return ((out.sum(-1, keepdim=True) - target) ** 2).mean()


def emsa_toy_problem(weight_decay: float = 1e-3, *, width: int = 5, depth: int = 20,
                     h: float = 0.25) -> Problem:
    """The E-MSA public toy as a control problem, with the public code's layers as stages.

    ``depth`` residual layers x + h tanh(W x + b) of ``width`` nodes, all weights zero
    (the public ``config.yml`` 'toy'; set others through ``problem.module``), loss
    :func:`feature_sum_mse`, running cost ``weight_decay``/2 |u|^2. The input is x
    *repeated* over the nodes, ``x.repeat(1, width)``, as the public code's data are.

    Why the repeat and the sum are not layers: ``to_problem`` folds a parameter-free layer
    into the stage before it (or after it, at the start), and E-MSA penalises each stage's
    own state and costate. A repeat folded into the first stage and a sum folded into the
    last would make those penalties act on 1-entry sums instead of the public code's
    5-entry states, a different method on those two layers (J after one step from zero:
    0.529 against the public 0.430; docs/reproductions.md, emsa-toy)."""
    net = nn.Sequential(*[ResidualBlock(width, h, "tanh") for _ in range(depth)])
    for p in net.parameters():
        nn.init.zeros_(p)
    return to_problem(net, feature_sum_mse, weight_decay=weight_decay)
