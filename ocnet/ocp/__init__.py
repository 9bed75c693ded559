"""The optimal control problem: stages, problem, trajectory, costate sweep (torch only)."""

from .errors import CheckpointError, ConfigError, OcnetError, ShapeError
from .problem import Problem, TerminalCost, Trajectory
from .stage import Controls, FunctionStage, Stage, as_controls, zeros_like_controls

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Controls",
    "FunctionStage",
    "OcnetError",
    "Problem",
    "ShapeError",
    "Stage",
    "TerminalCost",
    "Trajectory",
    "as_controls",
    "zeros_like_controls",
]
