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
from .ddp import DDP
from .ddpnopt import DDPNOpt
from .dwr import DWR, Level, doerfler, full_indicators, indicators
from .gradient import DEFAULT_LR, OPTIMIZERS, GradientSolver
from .ipopt import IpoptReference, QuadraticCost
from .msa import EMSA, MSA, ConstantRho, GeometricRho, RhoSchedule
from .novas import DCEM, NOVAS, UnrolledGD, dcem, novas, unrolled_gd
from .port_hamiltonian import GoalBraking, PortHamiltonian, PortHamiltonianSolver

__all__ = [
    "DEFAULT_LR",
    "DCEM",
    "DDP",
    "DDPNOpt",
    "DWR",
    "EMSA",
    "MSA",
    "NOVAS",
    "ConstantRho",
    "GeometricRho",
    "RhoSchedule",
    "OPTIMIZERS",
    "PortHamiltonian",
    "PortHamiltonianSolver",
    "GoalBraking",
    "GradientSolver",
    "IpoptReference",
    "Level",
    "QuadraticCost",
    "Solver",
    "doerfler",
    "full_indicators",
    "indicators",
    "StepInfo",
    "UnrolledGD",
    "dcem",
    "make_solver",
    "novas",
    "register",
    "solver_entry",
    "solver_names",
    "solver_summaries",
    "unrolled_gd",
]
