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
from .port_hamiltonian import GoalBraking, PortHamiltonian, PortHamiltonianSolver

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "PortHamiltonian",
    "PortHamiltonianSolver",
    "GoalBraking",
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
