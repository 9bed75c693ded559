"""Optimal-control solvers behind one interface: ``solver.step(x0, y) -> StepInfo``."""

from .base import Solver, StepInfo, make_solver, register, solver_names, solver_summaries
from .gradient import DEFAULT_LR, OPTIMIZERS, GradientSolver

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "GradientSolver",
    "Solver",
    "StepInfo",
    "make_solver",
    "register",
    "solver_names",
    "solver_summaries",
]
