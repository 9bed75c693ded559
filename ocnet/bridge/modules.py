"""``to_problem``: an ``nn.Sequential`` as a control system.

Each layer with trainable parameters becomes one stage together with the
parameter-free layers that follow it (those before the first parametric layer join
the first stage). The stage's controls are the module's own parameter tensors, so a
solver that updates the problem trains the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

from ..ocp.errors import ConfigError, ShapeError, unknown_name
from ..ocp.problem import Problem
from ..ocp.stage import Controls, Stage

_ELEMENTWISE = (
    nn.Identity, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Softplus, nn.ELU, nn.GELU, nn.LeakyReLU,
    nn.SiLU, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.SELU, nn.CELU, nn.Tanhshrink,
)
_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)



class _CheckedMSELoss(nn.MSELoss):
    """``nn.MSELoss`` that refuses to broadcast: output and target must have one shape."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002
        if input.shape != target.shape:
            raise ShapeError(
                f"mse: the network output has shape {tuple(input.shape)} but the targets have "
                f"shape {tuple(target.shape)}; they must be equal (broadcasting would compare "
                "every output with every target). Reshape the targets, e.g. y.reshape(out.shape)"
            )
        return super().forward(input, target)


LOSSES: dict[str, Callable[[], Callable[[Tensor, Tensor], Tensor]]] = {
    "cross_entropy": lambda: nn.CrossEntropyLoss(),
    "mse": lambda: _CheckedMSELoss(),
}


def _trainable(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in m.named_parameters() if p.requires_grad]


class ModuleStage(Stage):
    """A stage made of ``nn.Module`` layers, exactly one of them (``parametric``) trainable.

    ``Linear``, ``Conv1d`` and ``Conv2d`` are evaluated with their functional form on the
    given controls; other parametric layers through ``torch.func.functional_call``.
    """

    def __init__(self, layers: Sequence[nn.Module], parametric_index: int,
                 weight_decay: float = 0.0, *, name: str | None = None) -> None:
        self.layers = list(layers)
        self.parametric = self.layers[parametric_index]
        self._index = parametric_index
        named = _trainable(self.parametric)
        self._names = [n for n, _ in named]
        self.weight_decay = float(weight_decay)
        self.before = self.layers[:parametric_index]
        self.after = self.layers[parametric_index + 1:]
        p = self.parametric
        if isinstance(p, nn.Linear) and all(isinstance(m, _ELEMENTWISE) for m in self.before):
            self.in_features = p.in_features
        if isinstance(p, nn.Linear) and all(isinstance(m, _ELEMENTWISE) for m in self.after):
            self.out_features = p.out_features
        label = name or "+".join(type(m).__name__ for m in self.layers)
        super().__init__(tuple(p for _, p in named), label)

    @property
    def has_cost(self) -> bool:
        return self.weight_decay > 0

    def _parametric(self, x: Tensor, u: Controls) -> Tensor:
        p = self.parametric
        params = dict(zip(self._names, u, strict=True))
        # A frozen (requires_grad=False) weight or bias is not a control: take it from the layer.
        plain = set(params) <= {"weight", "bias"}
        if isinstance(p, nn.Linear) and plain:
            return F.linear(x, params.get("weight", p.weight), params.get("bias", p.bias))
        if isinstance(p, nn.Conv2d) and p.padding_mode == "zeros" and plain:
            return F.conv2d(x, params.get("weight", p.weight), params.get("bias", p.bias),
                            p.stride, p.padding, p.dilation, p.groups)
        if isinstance(p, nn.Conv1d) and p.padding_mode == "zeros" and plain:
            return F.conv1d(x, params.get("weight", p.weight), params.get("bias", p.bias),
                            p.stride, p.padding, p.dilation, p.groups)
        return functional_call(p, params, (x,))

    def f(self, x: Tensor, u: Controls) -> Tensor:
        for m in self.before:
            x = m(x)
        x = self._parametric(x, u)
        for m in self.after:
            x = m(x)
        return x

    def cost(self, x: Tensor, u: Controls) -> Tensor | None:
        if self.weight_decay <= 0:
            return None
        return 0.5 * self.weight_decay * sum((v * v).sum() for v in u)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    # Not named_children(): it skips a module that occurs twice, which would silently drop a
    # layer (e.g. one nn.Tanh instance used after two Linear layers).
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out += _leaves(child, path + ".")
        else:
            out.append((path, child))
    return out


def resolve_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """A terminal cost from a name (``cross_entropy``, ``mse``) or a callable ``loss(out, y)``."""
    if isinstance(loss, str):
        try:
            return LOSSES[loss]()
        except KeyError:
            raise unknown_name("loss", loss, list(LOSSES)) from None
    if not callable(loss):
        raise ConfigError(f"loss must be a callable loss(output, target) or a name, got {loss!r}")
    return loss


def to_problem(module: nn.Module, loss: str | Callable[[Tensor, Tensor], Tensor],
               weight_decay: float = 0.0) -> Problem:
    """The control problem of training ``module`` (an ``nn.Sequential``) on ``loss``.

    Stage t is the t-th layer with trainable parameters plus the parameter-free layers
    after it; its controls are that layer's parameters (the same tensors, no copies).
    ``weight_decay`` adds the running cost l_t(u) = weight_decay/2 |u_t|^2.
    The returned problem keeps the module as ``problem.module``.
    """
    if not isinstance(module, nn.Sequential):
        raise ConfigError(
            f"to_problem needs an nn.Sequential (its layers are the time steps); got "
            f"{type(module).__name__}. Put the layers in nn.Sequential, or build the stages "
            "yourself with ocnet.ocp.FunctionStage / ocnet.dynamics"
        )
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    leaves = _leaves(module)
    seen: dict[int, str] = {}
    groups: list[tuple[list[nn.Module], int]] = []
    pending: list[nn.Module] = []
    for path, leaf in leaves:
        # Check the layer and everything inside it (a custom block may hide a BatchNorm).
        for sub_name, layer in leaf.named_modules(prefix=path):
            if isinstance(layer, _BATCH_COUPLED):
                raise ConfigError(
                    f"layer {sub_name} ({type(layer).__name__}) normalises with batch statistics, "
                    "so a sample's next state depends on the other samples and on the layer's "
                    "history; a stage must be a fixed function f(x, u). Remove it or use "
                    "nn.LayerNorm"
                )
            if isinstance(layer, _RANDOM):
                raise ConfigError(
                    f"layer {sub_name} ({type(layer).__name__}) is random, so it is not a "
                    "deterministic stage f(x, u); remove it for optimal-control training"
                )
        layer = leaf
        params = _trainable(layer)
        for _, p in params:
            if id(p) in seen:
                raise ConfigError(
                    f"layer {path} shares a parameter with layer {seen[id(p)]}; each stage's "
                    "controls must be its own tensors"
                )
            seen[id(p)] = path
        if params:
            groups.append((pending + [layer], len(pending)))
            pending = []
        elif groups:
            groups[-1][0].append(layer)
        else:
            pending.append(layer)
    if not groups:
        raise ConfigError(
            f"{type(module).__name__} has no layer with trainable parameters, so there is "
            "nothing to control"
        )
    if pending:  # parameter-free layers after nothing: cannot happen, kept for clarity
        groups[-1][0].extend(pending)
    stages = [ModuleStage(layers, k, weight_decay) for layers, k in groups]
    try:
        problem = Problem(stages, resolve_loss(loss), name=type(module).__name__)
    except ShapeError as err:
        raise ShapeError(f"{err} (in {type(module).__name__} given to to_problem)") from None
    problem.module = module
    return problem
