"""``to_problem``: an ``nn.Sequential`` as a control system.

Each layer with trainable parameters becomes one stage together with the
parameter-free layers that follow it (those before the first parametric layer join
the first stage). The stage's controls are the module's own parameter tensors, so a
solver that updates the problem trains the module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

from ..dynamics.activations import ACTIVATIONS
from ..dynamics.blocks import AffineModule
from ..ocp.errors import CapabilityError, ConfigError, ShapeError
from ..ocp.losses import LOSSES, resolve_loss
from ..ocp.problem import Problem
from ..ocp.stage import Controls, Stage, flatten_controls
from ..ocp.structure import Affine, CostDerivatives

_ELEMENTWISE = (
    nn.Identity, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Softplus, nn.ELU, nn.GELU, nn.LeakyReLU,
    nn.SiLU, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.SELU, nn.CELU, nn.Tanhshrink,
)
_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm,)
_RECURRENT = (nn.RNNBase,)
_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

__all__ = ["LOSSES", "ModuleStage", "resolve_loss", "to_problem"]



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

    def cost_derivatives(self, x: Tensor, u: Controls) -> CostDerivatives | None:
        """l = wd/2 |u|^2: l_u = wd u, l_uu = wd I, no state terms (closed form)."""
        if self.weight_decay <= 0:
            return None
        uf = flatten_controls([u], like=x).detach().to(x)
        wd, m, n = self.weight_decay, uf.numel(), x.numel()
        z = x.new_zeros
        return CostDerivatives(z(n), wd * uf, z(n, n), z(m, n),
                               wd * torch.eye(m, dtype=x.dtype, device=x.device))

    def affine(self) -> Affine | None:
        """The affine description of an nn.Linear / nn.Conv2d / AffineModule stage."""
        p, names = self.parametric, self._names
        around = {"before": tuple(self.before), "after": tuple(self.after)}
        if isinstance(p, AffineModule):
            full = list(p.parameter_names)
            if names not in (full[:1], full):
                return None
            aff = p.affine(has_bias=len(names) == 2)
            return dataclasses.replace(aff, **around)
        if not isinstance(p, nn.Linear | nn.Conv2d) or names not in (["weight"],
                                                                     ["weight", "bias"]):
            return None
        has_bias = "bias" in names
        fixed = None if has_bias else p.bias
        identity = ACTIVATIONS["identity"]
        if isinstance(p, nn.Linear):
            return Affine("linear", identity, "identity", has_bias=has_bias, fixed_bias=fixed,
                          **around)
        if p.padding_mode != "zeros" or isinstance(p.padding, str):
            raise CapabilityError(
                f"stage {self.describe()}: a Conv2d with padding_mode={p.padding_mode!r} and "
                f"padding={p.padding!r} has no affine description; use padding_mode='zeros' "
                "and give the padding as numbers"
            )
        return Affine("conv", identity, "identity", has_bias=has_bias, fixed_bias=fixed,
                      conv=(p.stride, p.padding, p.dilation, p.groups), **around)


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
    if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
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
            if isinstance(layer, nn.modules.instancenorm._InstanceNorm) and \
                    layer.track_running_stats:
                raise ConfigError(
                    f"layer {sub_name} ({type(layer).__name__}) tracks running statistics, so "
                    "its output depends on the layer's history; a stage must be a fixed "
                    "function f(x, u). Use track_running_stats=False (the default)"
                )
            if isinstance(layer, _RECURRENT):
                raise ConfigError(
                    f"layer {sub_name} ({type(layer).__name__}) is recurrent: it returns "
                    "(output, hidden state) and runs its own time loop, so it is not one "
                    "stage f(x, u). Unroll it into cells (one stage per time step), or train "
                    "the network with torch.optim"
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
