"""Optimal-control solvers behind one interface: ``solver.step(x0, y) -> StepInfo``.

Each solver module registers its solver at its bottom (``register(...)``, one
:class:`SolverRecord`); every public module of this package is imported here, so a new
solver is one new file (``docs/writing_a_solver.md``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import Solver, StepInfo
from .ddp import DDP
from .ddpnopt import DDPNOpt
from .dwr import DWR, Level, doerfler, full_indicators, indicators
from .gradient import DEFAULT_LR, OPTIMIZERS, GradientSolver
from .ipopt import IpoptReference, QuadraticCost
from .loop import Callback, EpochEnd, FitResult, StepEvent, TimeBudget, fit, minibatches
from .msa import EMSA, MSA, AdaptiveRho, ConstantRho, GeometricRho, RhoSchedule
from .novas import DCEM, NOVAS, UnrolledGD, dcem, novas, unrolled_gd
from .port_hamiltonian import GoalBraking, PortHamiltonian, PortHamiltonianSolver
from .registry import (
    COST_CLASSES,
    SolverRecord,
    make_solver,
    register,
    solver_entry,
    solver_names,
    solver_presets,
    solver_records,
    solver_summaries,
    unregister,
)

__all__ = [
    "COST_CLASSES",
    "DEFAULT_LR",
    "Callback",
    "EpochEnd",
    "FitResult",
    "SolverRecord",
    "StepEvent",
    "TimeBudget",
    "fit",
    "minibatches",
    "solver_records",
    "unregister",
    "DCEM",
    "DDP",
    "DDPNOpt",
    "DWR",
    "EMSA",
    "MSA",
    "NOVAS",
    "AdaptiveRho",
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
    "solver_presets",
    "solver_summaries",
    "unrolled_gd",
]

for _module in _pkgutil.iter_modules(__path__):  # register every solver module's solvers
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")
