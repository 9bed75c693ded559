"""The interface every solver shares, and the registry the command line uses.

A solver is built on a :class:`~ocnet.ocp.Problem` and changes its controls in place:
``info = solver.step(x0, y)``. ``StepInfo`` holds tensors on the problem's device, so a
step never waits for the device; read them (``float(info.loss)``) outside the sweep.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError
from ..ocp.problem import Problem

GATE_REASON = ("the loss or the gradient was not finite: the update was not applied "
               "(controls and solver state unchanged)")


@dataclass
class _Saved:
    """What the finiteness guard keeps before a step: the controls and in-place state
    (``live``) with their copies (``backup``), and the functional state (a reference)."""

    params: list[Tensor]
    live: list[Tensor]
    backup: list[Tensor]
    functional: dict[str, Any] | None
    host: dict[str, Any]


def where_tree(ok: Tensor, new: Any, old: Any) -> Any:
    """torch.where(ok, new, old) over matching dicts / lists of tensors."""
    if old is None or new is None:  # created by this very step: nothing to go back to
        return new
    if isinstance(new, Tensor):
        return torch.where(ok, new, old)
    if isinstance(new, dict):
        return {k: where_tree(ok, new[k], old[k]) if k in old else new[k] for k in new}
    return [where_tree(ok, a, b) for a, b in zip(new, old, strict=True)]


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
    #: why the step is rejected, when ``accepted`` is False (set before the outcome is known)
    reason: str = ""
    #: the solver's own acceptance test turned the update down and changed a setting to try
    #: again (E-MSA's :class:`~ocnet.solvers.AdaptiveRho`): a normal outcome, which
    #: ``fit(max_rejected=...)`` does not count as a failed step
    declined: bool = False


class Solver(abc.ABC):
    """Abstract solver: ``step(x0, y) -> StepInfo`` on the problem it was built on."""

    #: the registry key (``--solver NAME``)
    name: str = "solver"
    #: a ``torch.optim`` optimizer the solver steps with; its state is checkpointed
    optimizer: torch.optim.Optimizer | None = None
    #: a data-parallel communicator (``ocnet.bridge.distributed.Comm``) or None (one
    #: process: every reduction below is the identity and nothing changes)
    comm: Any = None

    #: check every batch (finite, not empty, placed like the problem) before a step
    check_inputs: bool = True
    #: undo steps whose loss, gradient or update is not finite: True (on the host for a CPU
    #: problem, on the device elsewhere), "device", "host" or False
    guard: bool | str = True
    #: the solver gates its own update with :meth:`finite_gate` before changing anything
    #: (its update is finite whenever the loss and the gradient are), so :meth:`step` keeps
    #: no copies; every other solver is undone after the fact
    gates_itself: bool = False
    #: ... also on the device path (it applies the device flag with torch.where itself)
    gates_on_device: bool = False

    def __init__(self, problem: Problem) -> None:
        self._backup: list[Tensor] | None = None
        self._gate_path: str | None = None
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
        """One iteration on the batch ``(x0, y)``; updates the problem's controls in place.

        The finiteness guard (``guard``, on by default): a step whose loss, gradient norm or
        updated controls are not finite is undone, so the controls and the solver's state
        tensors keep their values, ``info.accepted`` is False and ``info.reason`` says why.
        Where the problem lives on the CPU the outcome is read there (a CPU read costs no
        synchronisation); on an accelerator (or with ``guard="device"``) the undo is a
        ``torch.where`` on the device and nothing is read. With ``check_inputs`` (on by
        default) an empty or misplaced batch raises before anything changes, and a
        rejected step whose batch holds NaN/inf raises :class:`~ocnet.ocp.errors.DataError`
        naming the bad samples. A step undone on the host is not counted in ``steps`` and
        the solver's :meth:`host_state` is restored too (on the device path the host
        cannot know, so ``steps`` counts it). On an accelerator the batch is checked before
        the step, which reads it on the host: turn ``check_inputs`` off for benchmarking.
        """
        start = time.perf_counter()
        on_device = self.guard == "device" or (
            self.guard and x0.device.type != "cpu" and self.guard != "host")
        if self.check_inputs:
            if on_device or not self.guard:
                self.problem.check_batch(x0, y)
            else:
                self.problem.check_batch_shape(x0, y)
        gating = bool(self.guard) and self.gates_itself and (
            not on_device or self.gates_on_device)
        self._gate_path = None if not gating else "device" if on_device else "host"
        saved = self._save() if self.guard and not gating else None
        info = self._step(x0, y)
        if gating and info.accepted is False:
            info.seconds = time.perf_counter() - start
            if self.check_inputs:
                self.problem.check_batch(x0, y)  # raises DataError for a bad batch
            return info  # gated: nothing changed, not counted
        if saved is not None:
            total = self._finite_sum(info, saved.params)
            if on_device:
                ok = torch.isfinite(total)
                self._restore(saved, ok)
            else:  # a CPU tensor: reading it is no synchronisation
                ok = math.isfinite(float(total))
                if not ok:  # the guard's rejection, whatever the solver said of its step
                    info.declined, info.reason = False, ""
                    self._restore(saved, None)
                    self.set_host_state(saved.host)
                    self._mark(info, ok)
                    info.seconds = time.perf_counter() - start
                    if self.check_inputs:
                        self.problem.check_batch(x0, y)  # raises DataError for a bad batch
                    return info  # not counted: the solver is as it was before the step
            self._mark(info, ok)
        info.seconds = time.perf_counter() - start
        self.steps += 1
        return info

    # ------------------------------------------------------------------ the finiteness guard
    def state_tensors(self) -> list[Tensor]:
        """The device tensors of the solver's own state that a step changes *in place* (a
        rejected step copies them back); by default the state of the ``torch.optim``
        optimizer it steps with."""
        if self.optimizer is None:
            return []
        return [v for st in self.optimizer.state.values() for v in st.values()
                if isinstance(v, Tensor) and v.is_floating_point()]

    def functional_state(self) -> dict[str, Any] | None:
        """The solver's state when its step *replaces* it rather than changing it in place
        (the curvature objects' ``update`` returns a new state): a rejected step then
        reinstates the old one without copying anything. ``None``: no such state."""
        return None

    def set_functional_state(self, state: dict[str, Any]) -> None:
        """Reinstate a state returned by :meth:`functional_state` (solvers that have one)."""
        raise ConfigError(f"{type(self).__name__} has no functional state to set")

    def finite_gate(self, loss: Tensor, grad_norm: Tensor | None) -> bool | Tensor:
        """For a solver that :attr:`gates_itself`: may the update be applied?

        ``True`` (guard off, not gating this step, or finite on the host path), ``False``
        (not finite: change nothing and return ``StepInfo(accepted=False,
        reason=GATE_REASON)``), or a device flag (apply ``torch.where(flag, new, old)`` to
        the controls and the state)."""
        if self._gate_path is None:
            return True
        total = loss.detach() if grad_norm is None else loss.detach() + grad_norm.detach()
        if self._gate_path == "device":
            return torch.isfinite(total)
        return math.isfinite(float(total))

    def host_state(self) -> dict[str, Any]:
        """Plain host values of the solver's state that a step may change (e.g. DDP's
        regularisation mu): restored with the tensors when a step is undone on the host."""
        return {}

    def set_host_state(self, state: dict[str, Any]) -> None:
        """Reinstate the values of :meth:`host_state`."""
        for key, value in state.items():
            setattr(self, key, value)

    def _save(self) -> _Saved:
        params = self.problem.parameters()
        tensors = self.state_tensors()
        live = params + tensors
        backup = self._backup
        with torch.no_grad():
            try:
                if backup is None or len(backup) != len(live):
                    raise RuntimeError("no backup yet")
                torch._foreach_copy_(backup, live)
            except RuntimeError:  # first step, or the state changed shape/device/dtype
                backup = self._backup = [v.detach().clone() for v in live]
        return _Saved(params, live, backup, self.functional_state(), self.host_state())

    def _restore(self, saved: _Saved, ok: Tensor | None) -> None:
        """Undo the step: everything back to ``saved`` (``ok=None``, a host decision), or
        ``torch.where(ok, new, saved)`` elementwise (a device decision, no host read)."""
        with torch.no_grad():
            if ok is None:
                torch._foreach_copy_(saved.live, saved.backup)
            else:
                torch._foreach_copy_(saved.live, [torch.where(ok, v, b) for v, b in
                                                  zip(saved.live, saved.backup, strict=True)])
        if saved.functional is not None:
            if ok is None:
                self.set_functional_state(saved.functional)
            else:
                self.set_functional_state(where_tree(ok, self.functional_state(),
                                                      saved.functional))

    @staticmethod
    def _finite_sum(info: StepInfo, params: list[Tensor]) -> Tensor:
        """loss + grad norm + sum_k |u_k| of the new controls: finite exactly when each of
        them is (NaN and inf propagate through the sum), in three kernels."""
        parts = [info.loss.detach()]
        if info.grad_norm is not None:
            parts.append(info.grad_norm.detach())
        with torch.no_grad():
            if params:
                parts.extend(torch._foreach_norm(params))
            if any(p.dtype != parts[0].dtype or p.device != parts[0].device for p in parts):
                parts = [p.to(parts[0]) for p in parts]
            return torch.stack(parts).sum()

    @staticmethod
    def _mark(info: StepInfo, ok: Tensor | bool) -> None:
        accepted = info.accepted
        if isinstance(accepted, Tensor):
            info.accepted = accepted.to(ok.device) & ok if isinstance(ok, Tensor) else \
                accepted & ok
        elif accepted:
            info.accepted = ok
        if not info.reason:
            info.reason = ("the loss, the gradient norm or the updated controls were not "
                           "finite: the step was undone (controls and solver state unchanged)")

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
    flat = [g for gs in grads for g in gs]
    if not flat:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(flat)))


# The registry lives in registry.py (one record per solver); re-exported here.
from .registry import (  # noqa: E402
    SolverFactory,
    SolverRecord,
    make_solver,
    register,
    solver_entry,
    solver_names,
    solver_summaries,
)

__all__ = ["GATE_REASON", "Solver", "SolverFactory", "SolverRecord", "StepInfo", "grad_norm",
           "make_solver", "register", "solver_entry", "solver_names", "solver_summaries",
           "where_tree"]
