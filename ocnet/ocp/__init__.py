"""The optimal control problem: stages, problem, trajectory, costate sweep (torch only)."""

from .errors import (
    CapabilityError,
    CheckpointError,
    ConfigError,
    DataError,
    OcnetError,
    ShapeError,
)
from .losses import LOSSES, resolve_loss
from .problem import ControlCost, Policy, Problem, StageRecord, TerminalCost, Trajectory
from .stage import (
    Controls,
    FunctionStage,
    Stage,
    as_controls,
    flatten_controls,
    unflatten_controls,
    zeros_like_controls,
)
from .structure import Affine, CostDerivatives

__all__ = [
    "LOSSES",
    "Affine",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "ControlCost",
    "Controls",
    "CostDerivatives",
    "DataError",
    "FunctionStage",
    "OcnetError",
    "Policy",
    "Problem",
    "ShapeError",
    "Stage",
    "StageRecord",
    "TerminalCost",
    "Trajectory",
    "as_controls",
    "flatten_controls",
    "resolve_loss",
    "unflatten_controls",
    "zeros_like_controls",
]
