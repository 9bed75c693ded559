"""The bridge: nn.Module <-> Problem, device/dtype placement, torch.func derivative helpers.

This is the only package where tensors change device, dtype or library.
"""

from .casadi import TorchCallback, casadi_apply, from_numpy, to_numpy
from .derivatives import (
    flatten_controls,
    objective_gradient,
    objective_hessian,
    stage_jacobians,
    unflatten_controls,
)
from .modules import LOSSES, ModuleStage, resolve_loss, to_problem
from .placement import host_view, place, resolve_device, to_device

__all__ = [
    "LOSSES",
    "ModuleStage",
    "TorchCallback",
    "casadi_apply",
    "flatten_controls",
    "from_numpy",
    "host_view",
    "objective_gradient",
    "objective_hessian",
    "place",
    "resolve_device",
    "resolve_loss",
    "stage_jacobians",
    "to_device",
    "to_numpy",
    "to_problem",
    "unflatten_controls",
]
