"""ocnet: training neural networks as optimal control problems.

A network is a control system (layers = time steps, weights = controls), its
training loss the cost, and its optimisers are optimal-control solvers.
"""

from .bridge import place, to_problem
from .ocp import (
    CheckpointError,
    ConfigError,
    FunctionStage,
    OcnetError,
    Problem,
    ShapeError,
    Stage,
    Trajectory,
)
from .solvers import Solver, StepInfo, make_solver, solver_names

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FunctionStage",
    "OcnetError",
    "Problem",
    "ShapeError",
    "Solver",
    "Stage",
    "StepInfo",
    "Trajectory",
    "make_solver",
    "place",
    "solver_names",
    "to_problem",
]
