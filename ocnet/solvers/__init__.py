"""Optimal-control solvers behind one interface: ``solver.step(x0, y) -> StepInfo``."""

from .base import (
    Solver,
    StepInfo,
    make_solver,
    register,
    solver_entry,
    solver_names,
    solver_summaries,
)
from .gradient import DEFAULT_LR, OPTIMIZERS, GradientSolver
from .ipopt import IpoptReference, QuadraticCost

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "GradientSolver",
    "IpoptReference",
    "QuadraticCost",
    "Solver",
    "StepInfo",
    "make_solver",
    "register",
    "solver_entry",
    "solver_names",
    "solver_summaries",
]
