"""The interface every solver shares, and the registry the command line uses.

A solver is built on a :class:`~ocnet.ocp.Problem` and changes its controls in place:
``info = solver.step(x0, y)``. ``StepInfo`` holds tensors on the problem's device, so a
step never waits for the device; read them (``float(info.loss)``) outside the sweep.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem


@dataclass
class StepInfo:
    """What one solver step did.

    ``loss`` is the objective J at the controls the step started from (the one the
    step's derivatives were taken at); ``accepted`` whether the update was kept;
    ``grad_norm`` the norm of dJ/du there; ``seconds`` the host wall time of the step.
    """

    loss: Tensor
    accepted: bool | Tensor = True
    grad_norm: Tensor | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Solver(abc.ABC):
    """Abstract solver: ``step(x0, y) -> StepInfo`` on the problem it was built on."""

    #: the registry key (``--solver NAME``)
    name: str = "solver"
    #: a ``torch.optim`` optimizer the solver steps with; its state is checkpointed
    optimizer: torch.optim.Optimizer | None = None
    #: whether the solver all-reduces its batch statistics through ``comm`` (data parallel)
    supports_comm: bool = False
    #: a data-parallel communicator (``ocnet.bridge.distributed.Comm``) or None (one
    #: process: every reduction below is the identity and nothing changes)
    comm: Any = None

    def __init__(self, problem: Problem) -> None:
        if not isinstance(problem, Problem):
            raise ConfigError(
                f"{type(self).__name__} needs an ocnet Problem, got {type(problem).__name__}; "
                "make one with ocnet.bridge.to_problem(module, loss)"
            )
        self.problem = problem
        self.steps = 0

    @abc.abstractmethod
    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        """One iteration; :meth:`step` adds the timing and the step count."""

    def step(self, x0: Tensor, y: Tensor | None = None) -> StepInfo:
        """One iteration on the batch ``(x0, y)``; updates the problem's controls in place."""
        start = time.perf_counter()
        info = self._step(x0, y)
        info.seconds = time.perf_counter() - start
        self.steps += 1
        return info

    def reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean over data-parallel ranks of batch-mean tensors (identity without comm)."""
        if self.comm is None:
            return tensors
        return self.comm.all_reduce_mean(tensors)

    def reduce_grads(self, loss: Tensor, grads: list[tuple[Tensor, ...]]
                     ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """J and per-stage dJ/du averaged over the ranks in one collective (identity alone)."""
        if self.comm is None:
            return loss, grads
        flat = self.comm.all_reduce_mean([loss] + [g for gs in grads for g in gs])
        out, k = [], 1
        for gs in grads:
            out.append(tuple(flat[k:k + len(gs)]))
            k += len(gs)
        return flat[0], out

    def state_dict(self) -> dict[str, Any]:
        """The solver's own state (not the controls), for checkpoints; includes the state of
        the ``torch.optim`` optimizer the solver steps with, if it has one."""
        state: dict[str, Any] = {"steps": self.steps}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(problem={self.problem.name}, steps={self.steps})"


def grad_norm(grads: list[tuple[Tensor, ...]]) -> Tensor:
    """The Euclidean norm of all gradients together, as a tensor (no host sync)."""
    norms = [torch.linalg.vector_norm(g) for gs in grads for g in gs]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


SolverFactory = Callable[..., Solver]
_REGISTRY: dict[str, tuple[SolverFactory, str]] = {}


def register(name: str, factory: SolverFactory, summary: str) -> None:
    """Add a solver to the registry behind ``make_solver`` and ``--solver``."""
    _REGISTRY[name] = (factory, summary)


def solver_names() -> list[str]:
    """The valid ``--solver`` names."""
    return sorted(_REGISTRY)


def solver_summaries() -> dict[str, str]:
    """Each registered solver's one-line summary, by name."""
    return {k: v[1] for k, v in sorted(_REGISTRY.items())}


def solver_entry(name: str) -> tuple[SolverFactory, str]:
    """The registered ``(factory, summary)`` of ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("solver", name, solver_names()) from None


def make_solver(name: str, problem: Problem, **options: Any) -> Solver:
    """The solver registered as ``name`` on ``problem``; unknown names list the valid ones."""
    factory, _ = solver_entry(name)
    try:
        return factory(problem, **options)
    except TypeError as err:
        raise ConfigError(f"solver {name!r} does not take these options: {err}") from err
