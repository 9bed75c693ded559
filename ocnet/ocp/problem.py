"""The optimal control problem a network's training is.

    minimise  J(u) = Phi(x_T, y) + sum_{t<T} l_t(x_t, u_t)
    s.t.      x_{t+1} = f_t(x_t, u_t),  x_0 given (a batch of inputs)

Costate sign convention (Pontryagin's *maximum* principle, as in Li et al. 2018):

    H_t(x, p, u) = p . f_t(x, u) - l_t(x, u)          (p . f sums over batch and features)
    p_T = -dPhi/dx_T,   p_t = dH_t/dx (x_t, p_{t+1}, u_t),   dJ/du_t = -dH_t/du (x_t, p_{t+1}, u_t)

so ``p_t = -dJ/dx_t`` (p = -V_x in dynamic-programming notation, and minus the
"adjoint" backpropagation carries). ``Phi`` and ``l_t`` are reduced over the batch
(typically a mean), so the costates carry that 1/B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ShapeError
from .stage import Controls, Stage

TerminalCost = Callable[[Tensor, Tensor | None], Tensor]

_SHAPE_WORDS = ("shape", "size", "mat1", "mat2", "dimension", "expected input", "must match")


@dataclass
class Trajectory:
    """States ``xs`` (x_0..x_T), controls ``us`` (u_0..u_{T-1}), costates ``ps`` (p_0..p_T)."""

    xs: list[Tensor]
    us: list[Controls]
    ps: list[Tensor] | None = None
    objective: Tensor | None = None
    running_costs: list[Tensor | None] = field(default_factory=list)

    @property
    def T(self) -> int:  # noqa: N802 - the horizon is T in every text on the subject
        return len(self.us)


@dataclass
class _LocalGraph:
    """One stage evaluated with a local autograd graph, for its vector-Jacobian products."""

    x: Tensor
    u: Controls
    out: Tensor
    cost: Tensor | None


class Problem:
    """Stages plus a terminal cost; see the module docstring for the equations.

    Args:
        stages: the time steps, in order.
        terminal_cost: ``Phi(x_T, y) -> scalar`` (e.g. a mean cross-entropy); ``y`` may be ``None``.
        name: used in messages.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        terminal_cost: TerminalCost,
        *,
        name: str = "problem",
    ) -> None:
        stages = list(stages)
        if not stages:
            raise ShapeError("a Problem needs at least one stage; got an empty list")
        for t, s in enumerate(stages):
            if not isinstance(s, Stage):
                raise TypeError(
                    f"stage {t} is a {type(s).__name__}, not an ocnet Stage; wrap a function "
                    "with ocnet.ocp.FunctionStage or a module with ocnet.bridge.to_problem"
                )
        _check_static_shapes(stages)
        self.stages: list[Stage] = stages
        self.terminal_cost = terminal_cost
        self.name = name
        # The nn.Module a problem was made from (set by ocnet.bridge.to_problem), else None.
        self.module: torch.nn.Module | None = None

    # ------------------------------------------------------------------ structure
    @property
    def T(self) -> int:  # noqa: N802
        """The horizon: the number of stages."""
        return len(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def controls(self) -> list[Controls]:
        """Every stage's controls, the live tensors (not copies)."""
        return [s.controls for s in self.stages]

    def parameters(self) -> list[Tensor]:
        """All control tensors in one flat list (what a ``torch.optim`` optimizer takes)."""
        return [u for s in self.stages for u in s.controls]

    def num_controls(self) -> int:
        """The number of scalar controls."""
        return sum(u.numel() for u in self.parameters())

    @property
    def device(self) -> torch.device | None:
        p = self.parameters()
        return p[0].device if p else None

    @property
    def dtype(self) -> torch.dtype | None:
        p = self.parameters()
        return p[0].dtype if p else None

    @torch.no_grad()
    def set_controls(self, controls: Sequence[Controls]) -> None:
        """Copy ``controls`` into the live control tensors, in place."""
        if len(controls) != self.T:
            raise ShapeError(f"set_controls: got {len(controls)} stages of controls, need {self.T}")
        for t, (stage, new) in enumerate(zip(self.stages, controls, strict=True)):
            if len(new) != len(stage.controls):
                raise ShapeError(
                    f"set_controls: stage {t} ({stage.describe()}) has {len(stage.controls)} "
                    f"control tensors, got {len(new)}"
                )
            for u, v in zip(stage.controls, new, strict=True):
                if u.shape != v.shape:
                    raise ShapeError(
                        f"set_controls: stage {t} ({stage.describe()}) control of shape "
                        f"{tuple(u.shape)} cannot take a value of shape {tuple(v.shape)}"
                    )
                u.copy_(v)

    # ------------------------------------------------------------------ evaluation
    def step(self, t: int, x: Tensor, u: Controls | None = None) -> Tensor:
        """x_{t+1} = f_t(x, u); shape errors name the stage and both shapes."""
        stage = self.stages[t]
        u = stage.controls if u is None else u
        if stage.in_features is not None and x.dim() > 1 and x.shape[-1] != stage.in_features:
            raise ShapeError(self._shape_message(t, x, None))
        try:
            out = stage.f(x, u)
        except (RuntimeError, ValueError) as err:
            if isinstance(err, ShapeError) or not any(w in str(err) for w in _SHAPE_WORDS):
                raise
            raise ShapeError(self._shape_message(t, x, err)) from err
        if out.shape[:1] != x.shape[:1]:
            raise ShapeError(
                f"stage {t} ({stage.describe()}) changed the batch size from {x.shape[0]} to "
                f"{out.shape[0]}; a stage must map each sample to one next state"
            )
        if stage.out_features is not None and out.dim() > 1 and out.shape[-1] != stage.out_features:
            raise ShapeError(
                f"stage {t} ({stage.describe()}) declares {stage.out_features} output features "
                f"but produced a state of shape {tuple(out.shape)} from one of shape "
                f"{tuple(x.shape)}; fix the stage's function or its out_features"
            )
        return out

    def _shape_message(self, t: int, x: Tensor, err: Exception | None) -> str:
        stage = self.stages[t]
        expects = f" It expects {stage.in_features} input features." if stage.in_features else ""
        came = "the input x_0" if t == 0 else f"stage {t - 1} ({self.stages[t - 1].describe()})"
        said = "" if err is None else f" (torch said: {err})"
        return (
            f"stage {t} ({stage.describe()}) cannot take a state of shape {tuple(x.shape)}, "
            f"which came from {came}.{expects} Make the output of the previous stage match "
            f"this stage's input.{said}"
        )

    def running_cost(self, t: int, x: Tensor, u: Controls | None = None) -> Tensor | None:
        """l_t(x, u) (``None`` means zero); it must be a scalar, reduced over the batch."""
        stage = self.stages[t]
        c = stage.cost(x, stage.controls if u is None else u)
        if c is not None and c.dim() != 0:
            raise ShapeError(
                f"the running cost of stage {t} ({stage.describe()}) has shape "
                f"{tuple(c.shape)}; it must be a scalar: reduce it over the batch (e.g. .mean())"
            )
        return c

    def terminal(self, x_T: Tensor, y: Tensor | None) -> Tensor:  # noqa: N803
        """Phi(x_T, y), with an error naming both shapes when they do not fit."""
        try:
            phi = self.terminal_cost(x_T, y)
        except (RuntimeError, ValueError, IndexError) as err:
            if isinstance(err, ShapeError):
                raise
            ys = None if y is None else tuple(y.shape)
            raise ShapeError(
                f"the terminal cost cannot take the final state of shape {tuple(x_T.shape)} "
                f"with targets of shape {ys}: check the output size of the last stage "
                f"({self.stages[-1].describe()}) against the targets. (torch said: {err})"
            ) from err
        if not isinstance(phi, Tensor) or phi.dim() != 0:
            shape = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
            raise ShapeError(
                f"the terminal cost returned {shape} for a final state of shape "
                f"{tuple(x_T.shape)}; it must be a scalar tensor: reduce it over the batch "
                "(e.g. .mean())"
            )
        return phi

    def _check_placement(self, x0: Tensor) -> None:
        for t, stage in enumerate(self.stages):
            if stage.controls:
                u = stage.controls[0]
                if u.device != x0.device or (u.is_floating_point() and u.dtype != x0.dtype):
                    raise ShapeError(
                        f"x_0 is {x0.dtype} on {x0.device} but stage {t} ({stage.describe()}) "
                        f"has controls of {u.dtype} on {u.device}; put data and problem in one "
                        "place with ocnet.bridge.place(problem, device=..., dtype=...) and "
                        "x.to(...)"
                    )
                return

    def rollout(self, x0: Tensor, controls: Sequence[Controls] | None = None) -> Trajectory:
        """Forward pass without a graph: all states x_0..x_T."""
        self._check_placement(x0)
        us = self.controls if controls is None else [tuple(u) for u in controls]
        xs = [x0]
        costs: list[Tensor | None] = []
        with torch.no_grad():
            for t in range(self.T):
                costs.append(self.running_cost(t, xs[-1], us[t]))
                xs.append(self.step(t, xs[-1], us[t]))
        return Trajectory(xs=xs, us=us, running_costs=costs)

    def objective(
        self, x0: Tensor, y: Tensor | None = None, controls: Sequence[Controls] | None = None
    ) -> Tensor:
        """J = Phi(x_T, y) + sum_t l_t(x_t, u_t), differentiable with respect to the controls."""
        self._check_placement(x0)
        us = self.controls if controls is None else [tuple(u) for u in controls]
        x = x0
        total: Tensor | None = None
        for t in range(self.T):
            c = self.running_cost(t, x, us[t])
            if c is not None:
                total = c if total is None else total + c
            x = self.step(t, x, us[t])
        phi = self.terminal(x, y)
        return phi if total is None else phi + total

    def hamiltonian(self, t: int, x: Tensor, p: Tensor, u: Controls | None = None) -> Tensor:
        """H_t(x, p, u) = p . f_t(x, u) - l_t(x, u), with ``p`` the costate p_{t+1}."""
        stage = self.stages[t]
        u = stage.controls if u is None else u
        h = (p * self.step(t, x, u)).sum()
        c = self.running_cost(t, x, u)
        return h if c is None else h - c

    # ------------------------------------------------------------------ the costate sweep
    def _local(self, t: int, x: Tensor, u: Controls, need_x: bool) -> _LocalGraph:
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(need_x)
            u_ = tuple(v.detach().requires_grad_(True) for v in u)
            out = self.step(t, x_, u_)
            cost = self.running_cost(t, x_, u_)
        return _LocalGraph(x_, u_, out, cost)

    @staticmethod
    def _pull(g: _LocalGraph, p_next: Tensor, need_x: bool) -> tuple[Tensor | None, Controls]:
        """(dH/dx, dH/du) at one stage by one vector-Jacobian product with cotangents (p, -1)."""
        inputs = ([g.x] if need_x else []) + list(g.u)
        outputs, cotangents = [], []
        if g.out.requires_grad:
            outputs.append(g.out)
            cotangents.append(p_next)
        if g.cost is not None and g.cost.requires_grad:
            outputs.append(g.cost)
            cotangents.append(torch.full_like(g.cost, -1.0))
        if outputs and inputs:
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        else:
            grads = (None,) * len(inputs)
        grads = [torch.zeros_like(i) if gr is None else gr
                 for i, gr in zip(inputs, grads, strict=True)]
        if need_x:
            return grads[0], tuple(grads[1:])
        return None, tuple(grads)

    def _terminal_costate(self, x_T: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:  # noqa: N803
        with torch.enable_grad():
            xT = x_T.detach().requires_grad_(True)  # noqa: N806
            phi = self.terminal(xT, y)
            (dphi,) = torch.autograd.grad(phi, xT, allow_unused=True)
        p_T = torch.zeros_like(xT) if dphi is None else -dphi  # noqa: N806
        return phi.detach(), p_T

    def costates(self, traj: Trajectory, y: Tensor | None = None) -> Trajectory:
        """The discrete Pontryagin backward sweep: fills ``traj.ps`` with p_0..p_T.

        Each stage is re-evaluated at (x_t, u_t) for its local vector-Jacobian product;
        no graph through the whole network is built.
        """
        phi, p = self._terminal_costate(traj.xs[-1], y)
        ps = [p]
        for t in reversed(range(self.T)):
            g = self._local(t, traj.xs[t], traj.us[t], need_x=True)
            p, _ = self._pull(g, p, need_x=True)
            ps.append(p)
        ps.reverse()
        traj.ps = ps
        running = [c for c in traj.running_costs if c is not None]
        traj.objective = phi + sum(running) if running else phi
        return traj

    def value_and_gradients(
        self, x0: Tensor, y: Tensor | None = None, *, keep_costates: bool = False
    ) -> tuple[Tensor, list[Controls], Trajectory]:
        """J, dJ/du for every stage (as -dH_t/du from the costates), and the trajectory.

        One forward pass keeps each stage's local graph; one backward sweep pulls the
        costate through it. ``keep_costates`` also stores p_0..p_T (p_0 costs one more
        input-gradient product at the first stage).
        """
        self._check_placement(x0)
        x = x0
        xs, locals_, costs = [x0], [], []
        for t in range(self.T):
            g = self._local(t, x, self.stages[t].controls, need_x=keep_costates or t > 0)
            locals_.append(g)
            costs.append(None if g.cost is None else g.cost.detach())
            x = g.out.detach()
            xs.append(x)
        phi, p = self._terminal_costate(x, y)
        ps = [p]
        grads: list[Controls] = [()] * self.T
        for t in reversed(range(self.T)):
            need_x = keep_costates or t > 0
            dH_dx, dH_du = self._pull(locals_[t], p, need_x=need_x)  # noqa: N806
            grads[t] = tuple(-g for g in dH_du)
            if need_x:
                p = dH_dx
                ps.append(p)
        running = [c for c in costs if c is not None]
        J = phi + sum(running) if running else phi  # noqa: N806
        traj = Trajectory(
            xs=xs,
            us=self.controls,
            ps=ps[::-1] if keep_costates else None,
            objective=J,
            running_costs=costs,
        )
        return J, grads, traj

    def gradients(self, x0: Tensor, y: Tensor | None = None) -> list[Controls]:
        """dJ/du_t for every stage, computed from the costates as -dH_t/du_t."""
        return self.value_and_gradients(x0, y)[1]

    def check(self, x0: Tensor, y: Tensor | None = None) -> Tensor:
        """Run the problem once on ``x0`` (and ``y``) to surface shape errors early; returns J."""
        with torch.no_grad():
            return self.objective(x0, y)

    def __repr__(self) -> str:
        inner = ", ".join(s.describe() for s in self.stages)
        return f"Problem({self.name}: T={self.T}, controls={self.num_controls()}, [{inner}])"


def _check_static_shapes(stages: list[Stage]) -> None:
    for t in range(1, len(stages)):
        a, b = stages[t - 1], stages[t]
        if a.out_features is not None and b.in_features is not None:
            if a.out_features != b.in_features:
                raise ShapeError(
                    f"stage {t - 1} ({a.describe()}) outputs {a.out_features} features but "
                    f"stage {t} ({b.describe()}) expects {b.in_features}; make the two sizes equal"
                )
