"""Port-Hamiltonian training: the parameters as a damped mechanical system.

The weights q and a momentum p of the same shape evolve under

    H(q, p) = a L(q) + |p|^2 / (2m) + c |q|^2
    dq/dt   =  dH/dp = p / m
    dp/dt   = -dH/dq - gamma dH/dp = -(a grad L(q) + 2 c q) - gamma p / m

so dH/dt = -gamma |p/m|^2 <= 0 (Massaroli et al., CDC 2019: "heavy ball with friction").
With the force F(q) = a grad L(q) + 2 c q and the time step h (``lr``) the integrators are

    symplectic_euler  p+ = (p - h F(q)) / (1 + gamma h / m);   q+ = q + h p+ / m
    verlet            p_half = (p - h/2 F(q)) / (1 + gamma h / (2m));   q+ = q + h p_half / m
                      p+ = (p_half - h/2 F(q+)) / (1 + gamma h / (2m))
    explicit_euler    q+ = q + h p / m;   p+ = p - h (F(q) + gamma p / m)
    ode               (q, p)(h) of the flow above on [0, h] by torchdiffeq (two end points),
                      the gradient taken on the current mini-batch (energy-shaping flow)

The damping is implicit (backward Euler on dp/dt = -gamma p / m) in both symplectic
integrators: unconditionally stable and, for gamma = 0, exactly the symplectic map. The
symplectic Euler step is heavy-ball momentum: with beta = 1/(1 + gamma h/m) it is
torch's SGD(momentum=beta, lr=beta h^2/m) on a L + c|q|^2. Verlet's second half kick is
taken at the start of the next step, with the next batch's gradient at q+ (one gradient
per step; on a fixed loss this is exactly velocity Verlet). Derivations: docs/port_hamiltonian.md.

Goal-oriented braking (:class:`GoalBraking`, Burghoff et al., ICANN 2023): explore with
low friction until the smoothed loss reaches a goal, then brake. With the exponential
moving average E_n = beta E_{n-1} + (1 - beta) L_n (E_0 = L_0) and goals g_k = r_k L_0,
r_1 > r_2 > ..., event k fires at the first step n with E_n <= g_k; from that step on the
friction is gamma_k (and the step h * s_k). The decision is a tensor computation on the
loss's device (``torch.where``/indexing), so no step waits for the host.

The "paper" rule (``make_phb_goal(rule="paper")``) is the one switch the abstract of
Burghoff et al. describes, "from exploration to exploitation based on reaching a predefined
reduction of the loss function", with the loss read as the training loss of the last
``window`` batches (one epoch when ``window`` is the number of batches per epoch):

    E_n = (1 / w_n) sum_{j = n - w_n + 1}^{n} L_j,   w_n = min(n + 1, window)
    event at the first n with E_n <= r L_0;   gamma = gamma_0 before it, gamma_0 * brake from it
    (that step's update included)

(one goal r by default; explicit ``ratios`` give several). The paper's own goal levels and
frictions were not recoverable (docs/port_hamiltonian.md, section 5).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem
from .base import GATE_REASON, Solver, StepInfo, grad_norm, register

INTEGRATORS = ("symplectic_euler", "verlet", "explicit_euler", "ode")
#: the goal rules of ``--solver phb-goal`` (``rule=``; see :func:`make_phb_goal`)
GOAL_RULES = ("geometric", "paper")
#: the default averaging window (batches) of ``rule="paper"``
PAPER_WINDOW = 20


# --------------------------------------------------------------------------- schedules


class BrakingSchedule(abc.ABC):
    """Decides the friction (and a step factor) of every step from the loss, on device.

    ``observe(loss)`` is called once per optimizer step with the loss at the step's
    starting point and returns ``(gamma, step_factor)`` as 0-dim tensors on the loss's
    device. It must not read tensor values on the host.
    """

    @abc.abstractmethod
    def observe(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """Update with this step's loss; the friction and step factor to use now."""

    def functional_state(self) -> dict[str, Tensor] | None:
        """The schedule's tensors when each step *replaces* them (a rejected step of the
        solver reinstates them; see ``Solver.functional_state``), or None."""
        return None

    def set_functional_state(self, state: dict[str, Tensor] | None) -> None:  # noqa: B027
        """Reinstate :meth:`functional_state` (a schedule without tensors has nothing)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, for checkpoints."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _as_list(values: Sequence[float] | str | float, what: str) -> list[float]:
    if isinstance(values, str):
        try:
            return [float(v) for v in values.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise ConfigError(
                f"{what} must be numbers separated by commas, e.g. '0.1,0.01'; got {values!r}"
            ) from None
    if isinstance(values, (int, float)):
        return [float(values)]
    return [float(v) for v in values]


class GoalBraking(BrakingSchedule):
    """Event-based switch from exploration (low friction) to exploitation (braking).

    Args:
        ratios: goal ratios r_1 > r_2 > ... > 0; event k fires at the first step where the
            smoothed loss E_n <= r_k L_0.
        frictions: gamma_0 (exploration) and gamma_k after event k: ``len(ratios) + 1``.
        step_factors: optional factors s_0..s_K of the time step per phase (default all 1).
        smoothing: beta of the loss EMA E_n = beta E_{n-1} + (1 - beta) L_n, in [0, 1).
        initial_loss: L_0; by default the first observed loss.
        window: if given, E_n is instead the mean of the last ``min(n + 1, window)`` losses
            (a ring buffer on the device; ``smoothing`` is then unused), e.g. one epoch.

    ``events()`` (reads the device: call it between steps) lists the fired events with
    the 0-based step at which each fired.
    """

    def __init__(self, ratios: Sequence[float] | str, frictions: Sequence[float] | str, *,
                 step_factors: Sequence[float] | str | None = None, smoothing: float = 0.9,
                 initial_loss: float | None = None, window: int | None = None) -> None:
        self.ratios = _as_list(ratios, "ratios")
        self.frictions = _as_list(frictions, "frictions")
        k = len(self.ratios)
        if k == 0:
            raise ConfigError("GoalBraking needs at least one goal ratio, e.g. ratios=[0.1]")
        if any(not 0 < r for r in self.ratios) or any(
            b >= a for a, b in zip(self.ratios, self.ratios[1:], strict=False)
        ):
            raise ConfigError(
                f"goal ratios must be positive and strictly decreasing, got {self.ratios}"
            )
        if len(self.frictions) != k + 1:
            raise ConfigError(
                f"{k} goals need {k + 1} frictions (exploration, then one per event); "
                f"got {len(self.frictions)}: {self.frictions}"
            )
        if any(g < 0 for g in self.frictions):
            raise ConfigError(f"frictions must be >= 0, got {self.frictions}")
        self.step_factors = [1.0] * (k + 1) if step_factors is None else _as_list(
            step_factors, "step_factors")
        if len(self.step_factors) != k + 1 or any(s <= 0 for s in self.step_factors):
            raise ConfigError(
                f"{k} goals need {k + 1} positive step factors; got {self.step_factors}"
            )
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"smoothing (EMA beta) must be in [0, 1), got {smoothing}")
        if initial_loss is not None and not initial_loss > 0:
            raise ConfigError(f"initial_loss must be positive, got {initial_loss}")
        if window is not None and (isinstance(window, bool) or int(window) != window
                                   or window < 1):
            raise ConfigError(f"window must be a positive whole number of steps, got {window!r}")
        self.smoothing = float(smoothing)
        self.initial_loss = initial_loss
        self.window = None if window is None else int(window)
        self._state: dict[str, Tensor] | None = None

    @classmethod
    def geometric(cls, r: float = 0.1, n_events: int = 2, friction: float = 0.5,
                  brake: float = 10.0, step_factor: float = 1.0,
                  **kwargs: Any) -> GoalBraking:
        """Goals r^k L_0 (k = 1..n_events), friction gamma_0 brake^k, step h step_factor^k."""
        if not 0 < r < 1:
            raise ConfigError(f"goal ratio r must be in (0, 1), got {r}")
        if n_events < 1:
            raise ConfigError(f"n_events must be >= 1, got {n_events}")
        return cls([r ** (k + 1) for k in range(n_events)],
                   [friction * brake ** k for k in range(n_events + 1)],
                   step_factors=[step_factor ** k for k in range(n_events + 1)], **kwargs)

    def _init(self, loss: Tensor) -> dict[str, Tensor]:
        dev, dt = loss.device, loss.dtype if loss.is_floating_point() else torch.float32
        l0 = (loss.detach().to(dt) if self.initial_loss is None
              else torch.tensor(self.initial_loss, device=dev, dtype=dt))
        extra = {} if self.window is None else {
            "buf": torch.zeros(self.window, device=dev, dtype=dt),
            "slots": torch.arange(self.window, device=dev)}
        return {
            **extra,
            "step": torch.zeros((), dtype=torch.int64, device=dev),
            "ema": loss.detach().to(dt).clone(),
            "l0": l0.clone(),
            "ratios": torch.tensor(self.ratios, device=dev, dtype=dt),
            "frictions": torch.tensor(self.frictions, device=dev, dtype=dt),
            "step_factors": torch.tensor(self.step_factors, device=dev, dtype=dt),
            "event_steps": torch.full((len(self.ratios),), -1, dtype=torch.int64, device=dev),
        }

    def observe(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(loss, Tensor):
            loss = torch.as_tensor(loss)
        loss = loss.detach()
        first = self._state is None  # a Python-side flag, no tensor is read
        if first:
            self._state = self._init(loss)
        s = self._state
        if self.window is not None:  # E_n: mean of the last min(n + 1, window) losses
            here = s["slots"] == s["step"] % self.window
            s["buf"] = torch.where(here, loss.to(s["buf"].dtype), s["buf"])
            s["ema"] = s["buf"].sum() / torch.clamp(s["step"] + 1, max=self.window)
        elif not first:
            s["ema"] = self.smoothing * s["ema"] + (1.0 - self.smoothing) * loss.to(s["ema"].dtype)
        met = s["ema"] <= s["ratios"] * s["l0"]
        s["event_steps"] = torch.where(met & (s["event_steps"] < 0), s["step"], s["event_steps"])
        phase = (s["event_steps"] >= 0).sum()
        s["step"] = s["step"] + 1
        return s["frictions"][phase], s["step_factors"][phase]

    def functional_state(self) -> dict[str, Tensor] | None:
        # observe() assigns new tensors to the keys: a shallow copy is a snapshot
        return None if self._state is None else dict(self._state)

    def set_functional_state(self, state: dict[str, Tensor] | None) -> None:
        self._state = None if state is None else dict(state)

    @property
    def phase(self) -> Tensor | None:
        """The number of events fired so far (a tensor), or None before the first step."""
        return None if self._state is None else (self._state["event_steps"] >= 0).sum()

    @property
    def smoothed_loss(self) -> Tensor | None:
        return None if self._state is None else self._state["ema"]

    def events(self) -> list[dict[str, float | int]]:
        """The fired events: goal index, ratio, target loss and the step it fired at.

        Reads tensors on the host: call between steps, not inside one.
        """
        if self._state is None:
            return []
        steps = self._state["event_steps"].tolist()
        l0 = float(self._state["l0"])
        return [{"event": k + 1, "ratio": r, "target": r * l0, "step": s,
                 "friction": self.frictions[k + 1], "step_factor": self.step_factors[k + 1]}
                for k, (r, s) in enumerate(zip(self.ratios, steps, strict=True)) if s >= 0]

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "frictions": list(self.frictions),
                "step_factors": list(self.step_factors), "smoothing": self.smoothing,
                "initial_loss": self.initial_loss, "window": self.window,
                "state": None if self._state is None else
                {k: v.clone() for k, v in self._state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["ratios"]) != self.ratios or list(state["frictions"]) != self.frictions:
            raise ConfigError(
                f"checkpoint schedule has goals {state['ratios']} / frictions "
                f"{state['frictions']}, this one {self.ratios} / {self.frictions}; build the "
                "GoalBraking with the checkpoint's settings"
            )
        self.step_factors = list(state["step_factors"])
        self.smoothing = float(state["smoothing"])
        self.initial_loss = state["initial_loss"]
        self.window = state.get("window")
        self._state = None if state["state"] is None else {
            k: v.clone() for k, v in state["state"].items()}

    def __repr__(self) -> str:
        return (f"GoalBraking(ratios={self.ratios}, frictions={self.frictions}, "
                f"step_factors={self.step_factors}, smoothing={self.smoothing}"
                + ("" if self.window is None else f", window={self.window}") + ")")


# --------------------------------------------------------------------------- optimizer


class PortHamiltonian(torch.optim.Optimizer):
    """Integrates the damped port-Hamiltonian system of the parameters (module docstring).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: the time step h.
        gamma: the friction (ignored when a ``schedule`` sets it).
        mass: m.  a: the weight of the loss in H.  c: the confinement c |q|^2.
        integrator: one of ``INTEGRATORS``.
        schedule: a :class:`BrakingSchedule` (e.g. :class:`GoalBraking`) or None.
        ode_method, rtol, atol, ode_options: passed to ``torchdiffeq.odeint`` (``ode``).
        track_energy: keep H at each step's starting point in ``last_energy`` (a tensor).

    ``step(closure)`` (``closure`` re-evaluates the loss and calls backward, as in
    ``torch.optim.LBFGS``) or ``step(loss=loss)`` after ``loss.backward()``. The ``ode``
    integrator needs the closure; a schedule and ``track_energy`` need the loss.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.25,
                 *, gamma: float = 0.5, mass: float = 1.0, a: float = 1.0, c: float = 0.0,
                 integrator: str = "symplectic_euler", schedule: BrakingSchedule | None = None,
                 ode_method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8,
                 ode_options: dict[str, Any] | None = None, track_energy: bool = False) -> None:
        if integrator not in INTEGRATORS:
            raise unknown_name("integrator", integrator, INTEGRATORS)
        for name, value, ok in [("lr (time step)", lr, lr > 0), ("gamma", gamma, gamma >= 0),
                                ("mass", mass, mass > 0), ("a", a, a > 0), ("c", c, c >= 0)]:
            if not ok:
                raise ConfigError(f"PortHamiltonian: {name} out of range, got {value}")
        if schedule is not None and not isinstance(schedule, BrakingSchedule):
            raise ConfigError(f"schedule must be a BrakingSchedule, got {type(schedule).__name__}")
        super().__init__(params, {"lr": lr, "gamma": gamma, "mass": mass, "a": a, "c": c})
        self.integrator = integrator
        self.schedule = schedule
        self.ode_method, self.rtol, self.atol = ode_method, rtol, atol
        self.ode_options = dict(ode_options or {})
        self.track_energy = track_energy
        self.last_energy: Tensor | None = None
        self.last_friction: Tensor | float | None = None

    # ------------------------------------------------------------------ helpers
    def _momentum(self, q: Tensor) -> Tensor:
        st = self.state[q]
        if "momentum" not in st:
            st["momentum"] = torch.zeros_like(q, memory_format=torch.preserve_format)
            st["half"] = False  # Verlet: is the stored momentum a half step p_{n+1/2}?
        return st["momentum"]

    def _active(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, q) for g in self.param_groups for q in g["params"] if q.grad is not None]

    def energy_parts(self) -> Tensor:
        """|p|^2/(2m) + c|q|^2 at the current (synchronous) state, as a tensor."""
        total = None
        for g in self.param_groups:
            for q in g["params"]:
                p = self.state[q].get("momentum")
                e = g["c"] * q.detach().pow(2).sum()
                if p is not None:
                    e = e + p.pow(2).sum() / (2 * g["mass"])
                total = e if total is None else total + e
        return total if total is not None else torch.zeros(())

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the
        # integrator, the schedule and the diagnostics too (deepcopy, checkpoints)
        return dict(self.__dict__)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *,
             loss: Tensor | None = None) -> Tensor | None:
        """One integrator step; returns the loss at the starting point (if known)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.integrator == "ode" and closure is None:
            raise ConfigError(
                "the 'ode' integrator evaluates the gradient along the flow: call "
                "step(closure) with a closure that recomputes the loss and calls backward()"
            )
        gamma_s: Tensor | None = None
        factor: Tensor | None = None
        if self.schedule is not None:
            if loss is None:
                raise ConfigError(
                    "goal-oriented braking needs the loss: call step(closure) or step(loss=loss)"
                )
            gamma_s, factor = self.schedule.observe(loss)
        self.last_friction = gamma_s
        if self.integrator == "ode":
            self._ode_step(closure, gamma_s, factor, loss)
            return loss
        kinetic = None
        for g, q in self._active():
            p = self._momentum(q)
            st = self.state[q]
            m, a, c = g["mass"], g["a"], g["c"]
            gamma = g["gamma"] if gamma_s is None else gamma_s.to(q.dtype)
            h = g["lr"] if factor is None else g["lr"] * factor.to(q.dtype)
            force = q.grad.mul(a) if c == 0 else q.grad.mul(a).add_(q, alpha=2 * c)
            if self.integrator == "symplectic_euler":
                kinetic = self._add_energy(kinetic, p, q, m, c)
                p.sub_(h * force).div_(1 + gamma * h / m)
                q.add_(p * (h / m))
            elif self.integrator == "explicit_euler":
                kinetic = self._add_energy(kinetic, p, q, m, c)
                dq = p * (h / m)
                p.sub_(h * (force + p * (gamma / m)))
                q.add_(dq)
            else:  # verlet
                if st["half"]:  # second half kick of the previous step, force at q_n
                    hp, gp = st["half_h"], st["half_gamma"]
                    p.sub_(0.5 * hp * force).div_(1 + gp * hp / (2 * m))
                kinetic = self._add_energy(kinetic, p, q, m, c)
                p.sub_(0.5 * h * force).div_(1 + gamma * h / (2 * m))
                q.add_(p * (h / m))
                st["half"], st["half_h"], st["half_gamma"] = True, h, gamma
        if self.track_energy and loss is not None and kinetic is not None:
            self.last_energy = self.param_groups[0]["a"] * loss.detach() + kinetic
        return loss

    @staticmethod
    def _add_energy(total: Tensor | None, p: Tensor, q: Tensor, m: float, c: float) -> Tensor:
        e = p.pow(2).sum() / (2 * m)
        if c:
            e = e + c * q.pow(2).sum()
        return e if total is None else total + e

    def _ode_step(self, closure: Callable[[], Tensor], gamma_s: Tensor | None,
                  factor: Tensor | None, loss: Tensor | None) -> None:
        from torchdiffeq import odeint

        # Host decisions inside torchdiffeq (input checks, adaptive step acceptance): the
        # 'ode' integrator is the one port-Hamiltonian variant that waits for the device.
        items = [(g, q) for g in self.param_groups for q in g["params"]]
        if not items:
            return
        n = len(items)
        qs = [q for _, q in items]
        ps = [self._momentum(q) for q in qs]
        if self.track_energy and loss is not None:
            self.last_energy = self.param_groups[0]["a"] * loss.detach() + self.energy_parts()
        ref = qs[0]
        gammas = [g["gamma"] if gamma_s is None else gamma_s.to(q.dtype) for g, q in items]

        def force(state_q: Sequence[Tensor]) -> list[Tensor]:
            for q, v in zip(qs, state_q, strict=True):
                q.copy_(v)
                q.grad = None
            with torch.enable_grad():
                closure()
            return [(q.grad if q.grad is not None else torch.zeros_like(q)) * g["a"]
                    + 2 * g["c"] * v
                    for (g, q), v in zip(items, state_q, strict=True)]

        def field(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            sq, sp = state[:n], state[n:]
            fs = force(sq)
            dq = [p / g["mass"] for (g, _), p in zip(items, sp, strict=True)]
            dp = [-f - gm * p / g["mass"]
                  for (g, _), f, p, gm in zip(items, fs, sp, gammas, strict=True)]
            return (*dq, *dp)

        h = self.param_groups[0]["lr"]
        if any(g["lr"] != h for g in self.param_groups):
            raise ConfigError("the 'ode' integrator needs one time step (lr) for all groups")
        h_t = (torch.tensor(h, dtype=ref.dtype, device=ref.device) if factor is None
               else h * factor.to(ref.dtype))
        t = torch.stack([torch.zeros_like(h_t), h_t])  # the two end points of [0, h]
        y0 = tuple(q.detach().clone() for q in qs) + tuple(p.clone() for p in ps)
        sol = odeint(field, y0, t, method=self.ode_method, rtol=self.rtol, atol=self.atol,
                     options=self.ode_options or None)
        for i, q in enumerate(qs):
            q.copy_(sol[i][-1])
            ps[i].copy_(sol[n + i][-1])
            q.grad = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["port_hamiltonian"] = {
            "integrator": self.integrator,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("port_hamiltonian", None)
        if extra is not None:
            if extra["integrator"] != self.integrator:
                raise ConfigError(
                    f"checkpoint was written with integrator {extra['integrator']!r}, this "
                    f"optimizer uses {self.integrator!r}; build it with the same integrator"
                )
            if (extra["schedule"] is None) != (self.schedule is None):
                raise ConfigError(
                    "checkpoint and optimizer disagree on goal-oriented braking (one has a "
                    "schedule, the other not); build the optimizer like the checkpointed one"
                )
            if self.schedule is not None:
                self.schedule.load_state_dict(extra["schedule"])
        super().load_state_dict(sd)


# --------------------------------------------------------------------------- solver adapter


class PortHamiltonianSolver(Solver):
    """:class:`PortHamiltonian` on an ocnet :class:`Problem` (costate gradients).

    ``StepInfo.extra`` holds ``energy`` (H at the step's start, batch loss), ``friction``
    and, with a schedule, ``phase`` (events fired so far) and ``smoothed_loss``: tensors.

    Presets (:data:`PRESETS`):

    - ``phb``: paper = ``integrator="ode"``: Massaroli et al. (CDC 2019) integrate the
      continuous flow on each mini-batch (REFERENCE.md section 3; their public code calls
      SciPy's ``solve_ivp``). Their friction, mass, time step and tolerances could not be
      recovered, so those stay ocnet's (gamma 0.5, m 1, h 0.25, dopri5 with rtol 1e-6,
      atol 1e-8). The default stays ``symplectic_euler``: one gradient per step (the
      adaptive ``ode`` solve takes several and its step-size control reads the host), and
      it conserves a shadow energy (docs/port_hamiltonian.md).
    - ``phb-goal``: no preset. Burghoff et al. (ICANN 2023) switch from exploration to
      braking at loss goals. What their abstract states (one event-based switch at a
      predefined loss reduction) is the option ``rule="paper"`` of :func:`make_phb_goal`;
      their goal levels, frictions, steps and loss averaging were not recoverable
      (docs/port_hamiltonian.md, section 5), so there are no paper *numbers* to put in a
      preset, and ``preset="paper"`` is refused. The default ``rule="geometric"`` is
      ocnet's own design.
    """

    def __init__(self, problem: Problem, lr: float | None = None, *,
                 schedule: BrakingSchedule | None = None, name: str = "phb",
                 **options: Any) -> None:
        super().__init__(problem)
        params = problem.parameters()
        if not params:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.name = name
        options.setdefault("track_energy", True)
        self.optimizer = PortHamiltonian(params, lr=0.25 if lr is None else lr,
                                         schedule=schedule, **options)

    @property
    def schedule(self) -> BrakingSchedule | None:
        return self.optimizer.schedule

    def functional_state(self) -> dict[str, Any] | None:
        if self.schedule is None:
            return None
        return {"schedule": self.schedule.functional_state()}

    def set_functional_state(self, state: dict[str, Any]) -> None:
        self.schedule.set_functional_state(state["schedule"])

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        first: dict[str, Tensor] = {}

        def closure() -> Tensor:
            loss, grads, _ = self.problem.value_and_gradients(x0, y)
            # data parallel: the loss (which drives braking) and the force are global means
            loss, grads = self.reduce_grads(loss, grads)
            for stage, gs in zip(self.problem.stages, grads, strict=True):
                for u, g in zip(stage.controls, gs, strict=True):
                    u.grad = g
            if not first:
                first["norm"] = grad_norm(grads)
            return loss

        if self._gate_path is not None:  # gated: the gradient first, the step if finite
            with torch.enable_grad():
                loss = closure()
            if self.finite_gate(loss, first["norm"]) is False:
                return StepInfo(loss=loss, accepted=False, grad_norm=first["norm"],
                                reason=GATE_REASON)
            loss = self.optimizer.step(loss=loss)
        else:
            loss = self.optimizer.step(closure)
        extra: dict[str, Any] = {"energy": self.optimizer.last_energy}
        gamma = self.optimizer.last_friction
        extra["friction"] = self.optimizer.param_groups[0]["gamma"] if gamma is None else gamma
        if isinstance(self.schedule, GoalBraking):
            extra["phase"] = self.schedule.phase
            extra["smoothed_loss"] = self.schedule.smoothed_loss
        return StepInfo(loss=loss, accepted=True, grad_norm=first.get("norm"), extra=extra)

    @property
    def gates_itself(self) -> bool:  # type: ignore[override]
        """The fixed-step integrators update a finite state by a finite force: the
        finiteness guard looks at the loss and the gradient before the step (host path).
        The ``ode`` flow evaluates the gradient along the way and is undone after."""
        return self.optimizer.integrator != "ode"

    def events(self) -> list[dict[str, float | int]]:
        """The braking events so far (host read; call between steps)."""
        return self.schedule.events() if isinstance(self.schedule, GoalBraking) else []


def make_phb(problem: Problem, lr: float | None = None, **options: Any) -> PortHamiltonianSolver:
    """``--solver phb``: heavy ball with constant friction (options: gamma, mass, a, c,
    integrator, ode_method, rtol, atol)."""
    return PortHamiltonianSolver(problem, lr, name="phb", **options)


def make_phb_goal(problem: Problem, lr: float | None = None, *, r: float = 0.1,
                  events: int = 2, gamma: float = 0.5, brake: float = 10.0,
                  step_factor: float = 1.0, smoothing: float = 0.9,
                  ratios: str | Sequence[float] | None = None,
                  frictions: str | Sequence[float] | None = None,
                  step_factors: str | Sequence[float] | None = None,
                  initial_loss: float | None = None, rule: str = "geometric",
                  window: int | None = None, **options: Any) -> PortHamiltonianSolver:
    """``--solver phb-goal``: goal-oriented braking.

    ``rule="geometric"`` (the default): event k (k = 1..``events``) fires when the EMA loss
    reaches r^k L_0 and sets the friction to gamma brake^k (step h step_factor^k).
    Explicit ``ratios``/``frictions``/``step_factors`` (comma-separated on the command
    line) override the geometric ones. ``window`` replaces the EMA by the mean of the last
    ``window`` batch losses.

    ``rule="paper"``: the single exploration -> exploitation switch of Burghoff et al.
    (module docstring): E_n = mean of the last ``window`` batch losses (default 20; pass the
    batches per epoch for the epoch loss), one goal r L_0 (or the goals in ``ratios``),
    friction gamma until it is met and gamma * brake from then on (gamma brake^k after the
    k-th of several goals). ``events``,
    ``smoothing`` and ``step_factor`` belong to the geometric rule and are not used.
    """
    if rule not in GOAL_RULES:
        raise unknown_name("phb-goal rule", rule, GOAL_RULES)
    if rule == "paper":
        if step_factors is not None:
            raise ConfigError("rule='paper' brakes by friction only: step_factors is not used")
        if not 0 < r < 1:
            raise ConfigError(f"goal ratio r must be in (0, 1), got {r}")
        rs = _as_list(ratios, "ratios") if ratios is not None else [r]
        fs = (_as_list(frictions, "frictions") if frictions is not None
              else [gamma * brake ** k for k in range(len(rs) + 1)])
        sched = GoalBraking(rs, fs, initial_loss=initial_loss,
                            window=PAPER_WINDOW if window is None else window)
        return PortHamiltonianSolver(problem, lr, schedule=sched, name="phb-goal", **options)
    if ratios is None and frictions is None and step_factors is None and window is None:
        sched = GoalBraking.geometric(r, events, gamma, brake, step_factor,
                                      smoothing=smoothing, initial_loss=initial_loss)
    else:
        rs = _as_list(ratios, "ratios") if ratios is not None else [
            r ** (k + 1) for k in range(events)]
        fs = _as_list(frictions, "frictions") if frictions is not None else [
            gamma * brake ** k for k in range(len(rs) + 1)]
        if ratios is None and frictions is None and step_factors is None:
            step_factors = [step_factor ** k for k in range(len(rs) + 1)]
        sched = GoalBraking(rs, fs, step_factors=step_factors, smoothing=smoothing,
                            initial_loss=initial_loss, window=window)
    return PortHamiltonianSolver(problem, lr, schedule=sched, name="phb-goal", **options)


#: the presets of ``--solver phb`` and ``--solver phb-goal`` (sources: PortHamiltonianSolver)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "phb": {"paper": {"integrator": "ode"}},
    "phb-goal": {},
}

register("phb", make_phb,
         "port-Hamiltonian heavy ball with constant friction (symplectic Euler, implicit damping)",
         solver_class=PortHamiltonianSolver, default_lr=0.25, data_parallel=True,
         cost="first-order", options=(PortHamiltonianSolver, PortHamiltonian), fixed=("name",),
         presets=PRESETS["phb"])
register("phb-goal", make_phb_goal,
         "port-Hamiltonian heavy ball with goal-oriented braking (friction raised at loss goals)",
         solver_class=PortHamiltonianSolver, default_lr=0.25, data_parallel=True,
         cost="first-order", options=(make_phb_goal, PortHamiltonianSolver, PortHamiltonian),
         fixed=("name", "schedule"), presets=PRESETS["phb-goal"])
