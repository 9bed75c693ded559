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

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from .errors import CapabilityError, DataError, ShapeError
from .stage import Controls, Stage, flatten_controls, unflatten_controls
from .structure import Affine, CostDerivatives

TerminalCost = Callable[[Tensor, Tensor | None], Tensor]
#: a feedback policy for :meth:`Problem.policy_rollout`: ``policy(t, xhat_t)`` returns the
#: controls stage t runs with on the new trajectory (``None``: its live controls)
Policy = Callable[[int, Tensor], Controls | None]

_SHAPE_WORDS = ("shape", "size", "mat1", "mat2", "dimension", "expected input", "must match")


@dataclass
class StageRecord:
    """What the backward sweep keeps of stage t at the controls it started from.

    ``a`` = before(x_t) and ``dz`` = dJ/dz_t (z = lin(a, u), per-sample rows carrying the
    1/B of the mean) for a stage that describes an :class:`~ocnet.ocp.structure.Affine`
    part; ``dx`` = dJ/dx_t = -p_t (``None`` at t = 0 unless costates were asked for).
    """

    a: Tensor | None
    dz: Tensor | None
    dx: Tensor | None


@dataclass
class Trajectory:
    """States ``xs`` (x_0..x_T), controls ``us`` (u_0..u_{T-1}), costates ``ps`` (p_0..p_T)."""

    xs: list[Tensor]
    us: list[Controls]
    ps: list[Tensor] | None = None
    objective: Tensor | None = None
    running_costs: list[Tensor | None] = field(default_factory=list)
    #: per-stage :class:`StageRecord` of the sweep (``value_and_gradients(intermediates=True)``)
    records: list[StageRecord | None] | None = None

    @property
    def T(self) -> int:  # noqa: N802 - the horizon is T in every text on the subject
        return len(self.us)


class ControlCost(abc.ABC):
    """A cost C(u_{s_1}, ..., u_{s_k}) of the controls of several stages (no state).

    Such costs couple stages (the DG(0) jump term of a neural ODE couples neighbouring
    intervals), so they are not running costs: :class:`Problem` adds them to J at whatever
    controls are evaluated, and their gradients to dJ/du.
    """

    #: the stages whose controls the cost reads, in the order :meth:`value` takes them
    stages: tuple[int, ...] = ()

    @abc.abstractmethod
    def value(self, controls: Sequence[Controls]) -> Tensor:
        """C as a scalar tensor, from the controls of :attr:`stages` (in that order)."""


@dataclass
class _LocalGraph:
    """One stage evaluated with a local autograd graph, for its vector-Jacobian products."""

    x: Tensor
    u: Controls
    out: Tensor
    cost: Tensor | None
    a: Tensor | None = None
    z: Tensor | None = None


class Problem:
    """Stages, a terminal cost and costs that couple stages; see the module docstring.

    ``Problem`` is the one place where stages are evaluated: every solver asks it for the
    forward pass, the costate sweep, per-stage intermediates and derivatives, costs at
    trial controls and rollouts under a feedback policy, so every solver gets the same
    placement, dtype, shape and finiteness checks and the same sign convention.

    Args:
        stages: the time steps, in order.
        terminal_cost: ``Phi(x_T, y) -> scalar`` (e.g. a mean cross-entropy); ``y`` may be ``None``.
        couplings: :class:`ControlCost` terms over the controls of several stages.
        name: used in messages.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        terminal_cost: TerminalCost,
        *,
        couplings: Sequence[ControlCost] = (),
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
        self.couplings: list[ControlCost] = list(couplings)
        for c in self.couplings:
            if not isinstance(c, ControlCost) or not c.stages:
                raise TypeError(f"couplings must be ControlCost objects naming their stages; "
                                f"got {c!r}")
            bad = [s for s in c.stages if not 0 <= s < len(stages)]
            if bad:
                raise ShapeError(f"coupled cost {type(c).__name__} names stages {bad}, but the "
                                 f"problem has stages 0..{len(stages) - 1}")
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

    def affine(self, t: int, *, needed_by: str = "this solver") -> Affine | None:
        """Stage t's :class:`~ocnet.ocp.structure.Affine` description (``None`` for a stage
        without controls); a controlled stage that does not describe one is an error
        naming the stage, the solver and the fix."""
        stage = self.stages[t]
        if not stage.controls:
            return None
        aff = self._affine_of(t)
        if aff is None:
            raise CapabilityError(
                f"{needed_by} needs stage {t} ({stage.describe()}, a {type(stage).__name__}) "
                "to describe its controls as one dense or conv affine map (Stage.affine()); "
                "stages that do: to_problem stages of nn.Linear / nn.Conv2d / modules "
                "subclassing ocnet.dynamics.AffineModule (ResidualBlock), dynamics.Dense / "
                "Residual / Conv2d, EulerStage of an ActivationField. Implement affine() for "
                "this stage, or train the problem with a solver that needs no structure "
                "(sgd, adam, emsa, ddp for small problems)"
            )
        return aff

    def _affine_of(self, t: int) -> Affine | None:
        """stage t's affine description, asked once (a stage's structure does not change)."""
        cache = self.__dict__.setdefault("_affine_cache", {})
        if t not in cache:
            cache[t] = self.stages[t].affine()
        return cache[t]

    # ------------------------------------------------------------------ checks
    def check_batch_shape(self, x0: Tensor, y: Tensor | None = None) -> None:
        """Type, emptiness, placement and dtype of a batch, and one target per sample (no
        tensor is read)."""
        if not isinstance(x0, Tensor):
            raise DataError(f"x_0 must be a tensor, got {type(x0).__name__}")
        if x0.dim() == 1 and x0.shape[0] > 0 and self.stages[0].in_features not in (None, 1):
            raise DataError(
                f"x_0 has shape {tuple(x0.shape)}, one dimension; a batch is (batch, "
                f"features...): use x.unsqueeze(0) for one sample of "
                f"{self.stages[0].in_features} features"
            )
        if x0.dim() == 0 or x0.shape[0] == 0:
            raise DataError(
                f"the batch is empty (x_0 of shape {tuple(x0.shape)}); a step needs at least "
                "one sample: check the batch size and the data set size"
            )
        if y is not None and (not isinstance(y, Tensor) or y.shape[:1] != x0.shape[:1]):
            got = f"{y.shape[0]} targets" if isinstance(y, Tensor) and y.dim() else repr(y)
            raise DataError(f"x_0 has {x0.shape[0]} samples but y has {got}; give one target "
                            "per sample")
        self._check_placement(x0)

    def check_batch(self, x0: Tensor, y: Tensor | None = None) -> None:
        """:meth:`check_batch_shape` plus finiteness: NaN/inf in x_0 or a floating y raise
        :class:`~ocnet.ocp.errors.DataError` naming the first bad sample (reads flags on the
        host: call it before a sweep, never inside one)."""
        self.check_batch_shape(x0, y)
        bad = ~torch.isfinite(x0)
        if y is not None and y.is_floating_point():
            bad_y = ~torch.isfinite(y)
        else:
            bad_y = None
        flags = torch.stack([bad.any()] + ([bad_y.any()] if bad_y is not None else []))
        if bool(flags.any()):
            which, t = ("x_0", bad) if bool(flags[0]) else ("y", bad_y)
            rows = t.reshape(t.shape[0], -1).any(1).nonzero().flatten()
            raise DataError(
                f"the batch holds non-finite values: {int(t.sum())} NaN/inf entries of {which} "
                f"in {rows.numel()} of {t.shape[0]} samples (first bad sample: {int(rows[0])}); "
                "clean the data (ocnet.data.check_finite) or drop those samples"
            )

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
        if not isinstance(out, Tensor):
            raise ShapeError(
                f"stage {t} ({stage.describe()}) returned a {type(out).__name__}, not a "
                "tensor; a stage maps a state to one next state (a layer returning a tuple, "
                "such as an LSTM's (output, state), needs a wrapper that returns the output)"
            )
        if out.shape[:1] != x.shape[:1]:
            raise ShapeError(
                f"stage {t} ({stage.describe()}) changed the batch size from {x.shape[0]} to "
                f"{out.shape[0]}; a stage must map each sample to one next state (is the "
                "input a batch of shape (batch, features)?)"
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
        if not stage.has_cost:
            return None
        c = stage.cost(x, stage.controls if u is None else u)
        if c is not None and c.dim() != 0:
            raise ShapeError(
                f"the running cost of stage {t} ({stage.describe()}) has shape "
                f"{tuple(c.shape)}; it must be a scalar: reduce it over the batch (e.g. .mean())"
            )
        return c

    def coupled_cost(self, controls: Sequence[Controls] | None = None) -> Tensor | None:
        """The sum of the costs that couple stages, at ``controls`` (default: the live ones)."""
        if not self.couplings:
            return None
        us = self.controls if controls is None else controls
        total = None
        for c in self.couplings:
            v = c.value([us[s] for s in c.stages])
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise ShapeError(f"coupled cost {type(c).__name__} must return a scalar tensor")
            total = v if total is None else total + v
        return total

    def stage_coupled_cost(self, t: int, u: Controls,
                           reference: Sequence[Controls] | None = None) -> Tensor | None:
        """The coupled costs as a function of stage t's controls alone: every coupling that
        reads stage t, with ``u`` there and the other stages at ``reference`` (default: the
        live controls, read without a graph). Its gradient at u = u_t is dC/du_t."""
        ref = self.controls if reference is None else reference
        total = None
        for c in self.couplings:
            if t not in c.stages:
                continue
            v = c.value([u if s == t else tuple(w.detach() for w in ref[s]) for s in c.stages])
            total = v if total is None else total + v
        return total

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

    def _total(self, phi: Tensor, costs: Sequence[Tensor | None], us: Sequence[Controls]
               ) -> Tensor:
        running = [c for c in costs if c is not None]
        total = phi + sum(running) if running else phi
        coupled = self.coupled_cost(us)
        return total if coupled is None else total + coupled

    def rollout(self, x0: Tensor, controls: Sequence[Controls] | None = None) -> Trajectory:
        """Forward pass without a graph: all states x_0..x_T and the running costs."""
        self._check_placement(x0)
        us = self.controls if controls is None else [tuple(u) for u in controls]
        xs = [x0]
        costs: list[Tensor | None] = []
        with torch.no_grad():
            for t in range(self.T):
                costs.append(self.running_cost(t, xs[-1], us[t]))
                xs.append(self.step(t, xs[-1], us[t]))
        return Trajectory(xs=xs, us=us, running_costs=costs)

    def evaluate(self, x0: Tensor, y: Tensor | None = None,
                 controls: Sequence[Controls] | None = None) -> Trajectory:
        """:meth:`rollout` plus J (``traj.objective``) at ``controls``: the cost of trial
        controls, coupled costs included (no graph)."""
        traj = self.rollout(x0, controls)
        with torch.no_grad():
            traj.objective = self._total(self.terminal(traj.xs[-1], y), traj.running_costs,
                                         traj.us)
        return traj

    def policy_rollout(self, x0: Tensor, y: Tensor | None, policy: Policy, *,
                       costs: bool = True, split: bool = False) -> Trajectory:
        """The forward pass under a feedback policy (no graph).

        At each stage ``u_t = policy(t, xhat_t)`` (``None``: the live controls), then
        xhat_{t+1} = f_t(xhat_t, u_t); ``traj.us`` are the controls used and
        ``traj.objective`` is J along the new trajectory (coupled costs at those controls).
        ``costs=False`` skips the running and coupled costs: ``traj.objective`` is then
        Phi(xhat_T) alone (for a solver that only reports it). ``split`` evaluates every
        controlled stage through its :class:`~ocnet.ocp.structure.Affine` description, as
        ``value_and_gradients(intermediates=True)`` does (the same values, fewer calls; the
        shapes were checked by that sweep).
        """
        self._check_placement(x0)
        xs, us, running = [x0], [], []
        with torch.no_grad():
            for t, stage in enumerate(self.stages):
                u = policy(t, xs[-1])
                u = stage.controls if u is None else tuple(u)
                us.append(u)
                running.append(self.running_cost(t, xs[-1], u) if costs else None)
                aff = self._affine_of(t) if split and u else None
                xs.append(self.step(t, xs[-1], u) if aff is None else aff.f(xs[-1], u))
            phi = self.terminal(xs[-1], y)
            J = self._total(phi, running, us) if costs else phi  # noqa: N806
        return Trajectory(xs=xs, us=us, running_costs=running, objective=J)

    def objective(
        self, x0: Tensor, y: Tensor | None = None, controls: Sequence[Controls] | None = None
    ) -> Tensor:
        """J = Phi(x_T, y) + sum_t l_t(x_t, u_t) + coupled costs, differentiable with
        respect to the controls."""
        self._check_placement(x0)
        us = self.controls if controls is None else [tuple(u) for u in controls]
        x = x0
        costs = []
        for t in range(self.T):
            costs.append(self.running_cost(t, x, us[t]))
            x = self.step(t, x, us[t])
        return self._total(self.terminal(x, y), costs, us)

    def hamiltonian(self, t: int, x: Tensor, p: Tensor, u: Controls | None = None) -> Tensor:
        """H_t(x, p, u) = p . f_t(x, u) - l_t(x, u), with ``p`` the costate p_{t+1}."""
        stage = self.stages[t]
        u = stage.controls if u is None else u
        h = (p * self.step(t, x, u)).sum()
        c = self.running_cost(t, x, u)
        return h if c is None else h - c

    # ------------------------------------------------------------------ the costate sweep
    def _local(self, t: int, x: Tensor, u: Controls, need_x: bool,
               split: bool = False) -> _LocalGraph:
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(need_x)
            # leaves sharing the live storage: a solver changes them in place only after
            # the backward sweep that reads them is complete
            u_ = tuple(v.detach().requires_grad_(True) for v in u)
            aff = self._affine_of(t) if split and u_ else None
            if aff is None:
                a = z = None
                out = self.step(t, x_, u_)
            else:
                a = aff.pre(x_)
                z = aff.lin(a, u_)
                out = aff.post(a, z)
            cost = self.running_cost(t, x_, u_)
        return _LocalGraph(x_, u_, out, cost, a, z)

    @staticmethod
    def _pull(g: _LocalGraph, lam_next: Tensor, need_x: bool
              ) -> tuple[Tensor | None, Tensor | None, Controls]:
        """(dJ/dx_t, dJ/dz_t, dJ/du_t) at one stage by one vector-Jacobian product with
        cotangents (dJ/dx_{t+1}, 1): the adjoint lam = -p carried by the sweep."""
        inputs = ([g.x] if need_x else []) + ([g.z] if g.z is not None else []) + list(g.u)
        outputs, cotangents = [], []
        if g.out.requires_grad:
            outputs.append(g.out)
            cotangents.append(lam_next)
        if g.cost is not None and g.cost.requires_grad:
            outputs.append(g.cost)
            cotangents.append(torch.ones_like(g.cost))
        if outputs and inputs:
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        else:
            grads = (None,) * len(inputs)
        grads = [torch.zeros_like(i) if gr is None else gr
                 for i, gr in zip(inputs, grads, strict=True)]
        k = 0
        dx = dz = None
        if need_x:
            dx, k = grads[0], 1
        if g.z is not None:
            dz, k = grads[k], k + 1
        return dx, dz, tuple(grads[k:])

    def _terminal_adjoint(self, x_T: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:  # noqa: N803
        """Phi and dPhi/dx_T (= -p_T)."""
        with torch.enable_grad():
            xT = x_T.detach().requires_grad_(True)  # noqa: N806
            phi = self.terminal(xT, y)
            (dphi,) = torch.autograd.grad(phi, xT, allow_unused=True)
        return phi.detach(), torch.zeros_like(xT) if dphi is None else dphi

    def _coupled_gradients(self, grads: list[Controls]) -> tuple[list[Controls], Tensor]:
        """dJ/du += dC/du of the coupled costs (at the live controls)."""
        with torch.enable_grad():
            leaves = [tuple(v.detach().requires_grad_(True) for v in us) for us in self.controls]
            total = self.coupled_cost(leaves)
            flat = [v for us in leaves for v in us]
            extra = torch.autograd.grad(total, flat, allow_unused=True)
        out, k = [], 0
        for gs in grads:
            n = len(gs)
            out.append(tuple(g if e is None else g + e for g, e in zip(gs, extra[k:k + n],
                                                                       strict=True)))
            k += n
        return out, total.detach()

    def costates(self, traj: Trajectory, y: Tensor | None = None) -> Trajectory:
        """The discrete Pontryagin backward sweep: fills ``traj.ps`` with p_0..p_T.

        Each stage is re-evaluated at (x_t, u_t) for its local vector-Jacobian product;
        no graph through the whole network is built.
        """
        phi, lam = self._terminal_adjoint(traj.xs[-1], y)
        ps = [-lam]
        for t in reversed(range(self.T)):
            g = self._local(t, traj.xs[t], traj.us[t], need_x=True)
            lam, _, _ = self._pull(g, lam, need_x=True)
            ps.append(-lam)
        ps.reverse()
        traj.ps = ps
        traj.objective = self._total(phi, traj.running_costs, traj.us)
        return traj

    def value_and_gradients(
        self, x0: Tensor, y: Tensor | None = None, *, keep_costates: bool = False,
        intermediates: bool = False,
    ) -> tuple[Tensor, list[Controls], Trajectory]:
        """J, dJ/du for every stage (as -dH_t/du from the costates), and the trajectory.

        One forward pass keeps each stage's local graph; one backward sweep pulls the
        adjoint lam_t = dJ/dx_t = -p_t through it. ``keep_costates`` also stores p_0..p_T
        (p_0 costs one more input-gradient product at the first stage). ``intermediates``
        evaluates every controlled stage through its :class:`~ocnet.ocp.structure.Affine`
        description and keeps, per stage, a :class:`StageRecord` (before(x_t), dJ/dz_t,
        dJ/dx_t) in ``traj.records`` (what DDPNOpt and Kronecker curvatures need).
        """
        self._check_placement(x0)
        x = x0
        xs, locals_, costs = [x0], [], []
        for t in range(self.T):
            g = self._local(t, x, self.stages[t].controls, need_x=keep_costates or t > 0,
                            split=intermediates)
            locals_.append(g)
            costs.append(None if g.cost is None else g.cost.detach())
            x = g.out.detach()
            xs.append(x)
        phi, lam = self._terminal_adjoint(x, y)
        ps = [-lam] if keep_costates else []
        grads: list[Controls] = [()] * self.T
        records: list[StageRecord | None] = [None] * self.T
        for t in reversed(range(self.T)):
            need_x = keep_costates or t > 0
            g = locals_[t]
            if not need_x and not g.u:
                continue  # a control-free first stage (e.g. a zero-pad lift): nothing to pull
            dx, dz, grads[t] = self._pull(g, lam, need_x=need_x)
            if intermediates and g.z is not None:
                records[t] = StageRecord(g.a.detach(), dz, dx)
            if need_x:
                lam = dx
                if keep_costates:
                    ps.append(-lam)
        running = [c for c in costs if c is not None]
        J = phi + sum(running) if running else phi  # noqa: N806
        if self.couplings:
            grads, coupled = self._coupled_gradients(grads)
            J = J + coupled  # noqa: N806
        traj = Trajectory(
            xs=xs,
            us=self.controls,
            ps=ps[::-1] if keep_costates else None,
            objective=J,
            running_costs=costs,
            records=records if intermediates else None,
        )
        return J, grads, traj

    def gradients(self, x0: Tensor, y: Tensor | None = None) -> list[Controls]:
        """dJ/du_t for every stage, computed from the costates as -dH_t/du_t."""
        return self.value_and_gradients(x0, y)[1]

    def check(self, x0: Tensor, y: Tensor | None = None) -> Tensor:
        """Run the problem once on ``x0`` (and ``y``) to surface data and shape errors early
        (a non-finite or empty batch raises :class:`~ocnet.ocp.errors.DataError`); returns J."""
        self.check_batch(x0, y)
        with torch.no_grad():
            return self.objective(x0, y)

    # ------------------------------------------------------------------ dense derivatives
    # What second-order solvers (DDP) ask of a stage: per-sample Jacobians, the second-order
    # dynamics term, running and coupled cost derivatives, all on flat vectors (torch.func).
    def stage_jacobians(self, t: int, x: Tensor, u: Controls) -> tuple[Tensor, Tensor]:
        """Per-sample f_x (B, n', n) and f_u (B, n', m) of stage t (u flattened)."""
        uf = flatten_controls([u], like=x).detach()

        def single(xi: Tensor, uv: Tensor) -> Tensor:
            return self.step(t, xi.unsqueeze(0), unflatten_controls(uv, [u])[0]).reshape(-1)

        fx, fu = vmap(jacrev(single, argnums=(0, 1)), in_dims=(0, None))(x.detach(), uf)
        return fx.reshape(x.shape[0], fx.shape[1], -1), fu

    def stage_second_order(self, t: int, x: Tensor, u: Controls, v_next: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """The Hessian blocks (xx, ux, uu) of V'_x . f_t(X, u) on the flat batch state."""
        uf = flatten_controls([u], like=x).detach()

        def lam(xv: Tensor, uv: Tensor) -> Tensor:
            nxt = self.step(t, xv.reshape(x.shape), unflatten_controls(uv, [u])[0])
            return (v_next * nxt.reshape(-1)).sum()

        h = hessian(lam, argnums=(0, 1))(x.detach().reshape(-1), uf)
        return h[0][0], h[1][0], h[1][1]

    def cost_derivatives(self, t: int, x: Tensor, u: Controls) -> CostDerivatives | None:
        """l_x, l_u, l_xx, l_ux, l_uu of stage t on the flat batch state and flat controls
        (the stage's closed form when it gives one, else torch.func); ``None`` without a cost."""
        stage = self.stages[t]
        if not stage.has_cost:
            return None
        closed = stage.cost_derivatives(x, u)
        if closed is not None:
            return closed
        uf = flatten_controls([u], like=x).detach()
        shape = x.shape

        def cost(xv: Tensor, uv: Tensor) -> Tensor:
            c = self.running_cost(t, xv.reshape(shape), unflatten_controls(uv, [u])[0])
            return xv.sum() * 0 if c is None else c

        xv = x.detach().reshape(-1)
        g = jacrev(cost, argnums=(0, 1))(xv, uf)
        h = hessian(cost, argnums=(0, 1))(xv, uf)
        return CostDerivatives(g[0], g[1], h[0][0], h[1][0], h[1][1])

    def coupled_cost_derivatives(self, t: int, controls: Sequence[Controls] | None = None
                                 ) -> tuple[Tensor, Tensor] | None:
        """dC/du_t and the diagonal block d2C/du_t2 of the coupled costs (flat), the other
        stages held at ``controls`` (default: the live ones); ``None`` if none reads t."""
        if not any(t in c.stages for c in self.couplings):
            return None
        us = self.controls if controls is None else controls
        u = us[t]
        like = u[0] if u else None
        uf = flatten_controls([u], like=like).detach()

        def c(uv: Tensor) -> Tensor:
            return self.stage_coupled_cost(t, unflatten_controls(uv, [u])[0], us)

        return jacrev(c)(uf), hessian(c)(uf)

    def terminal_derivatives(self, x_T: Tensor, y: Tensor | None  # noqa: N803
                             ) -> tuple[Tensor, Tensor]:
        """dPhi/dX_T and d2Phi/dX_T2 on the flattened batch state (torch.func)."""
        shape = x_T.shape

        def phi(v: Tensor) -> Tensor:
            return self.terminal(v.reshape(shape), y)

        v = x_T.detach().reshape(-1)
        return jacrev(phi)(v), hessian(phi)(v)

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
