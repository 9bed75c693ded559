"""The gradient baseline: costate gradients fed to a first-order base optimizer.

    g_t = dJ/du_t = -dH_t/du (x_t, p_{t+1}, u_t)      (Problem.value_and_gradients)
    u  <- u + k,  k = update(g, state)                 (SGD, heavy ball, RMSprop, Adam)

The base optimizers are the curvature objects of :mod:`ocnet.solvers.curvature` (equal to
``torch.optim`` to 1e-12), shared with DDPNOpt. Weight decay belongs to the problem (a
running cost), not to the optimizer. Data parallel (``comm`` set): J and g are averaged
over the ranks before the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import CheckpointError, ConfigError, unknown_name
from ..ocp.problem import Problem
from .base import GATE_REASON, Solver, StepInfo, grad_norm, register, where_tree
from .compiled import compile_mode, maybe_compile
from .curvature import FIRST_ORDER, Curvature, load_state, make_curvature, state_to_dict

#: the base optimizers by name (their torch.optim twins)
OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3}
#: the presets of each gradient solver (see :class:`GradientSolver` for the sources)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sgd": {"paper": {"momentum": 0.0, "dampening": 0.0, "nesterov": False}},
    "momentum": {"paper": {"momentum": 0.9, "dampening": 0.0, "nesterov": False}},
    "rmsprop": {"paper": {"alpha": 0.9, "momentum": 0.0, "centered": False}},
    "adam": {"paper": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}},
}


class GradientSolver(Solver):
    """Gradient descent in any first-order flavour, on costate gradients.

    Args:
        problem: the problem to train.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD with momentum 0.9 unless given),
            ``"rmsprop"`` or ``"adam"``.
        lr: the learning rate (default per optimizer: ``DEFAULT_LR``).
        compile: ``False`` (default), ``True`` or an inductor mode (``"reduce-overhead"``:
            CUDA graphs on a GPU): the base update under ``torch.compile`` (static shapes;
            equal to the eager update to rounding; :mod:`ocnet.solvers.compiled`).
        **options: the base optimizer's options, named as in ``torch.optim``
            (``momentum``, ``dampening``, ``nesterov``; ``alpha``, ``eps``, ``centered``;
            ``betas``, ``eps``, ``amsgrad``).

    Presets (``make_solver(name, problem, preset="paper")``, :data:`PRESETS`):

    - ``adam``: paper = ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False``, the
      "good default settings" of Kingma & Ba, ICLR 2015, Algorithm 1. These are also
      ocnet's (and torch.optim's) defaults.
    - ``rmsprop``: paper = ``alpha=0.9, momentum=0, centered=False``: the moving average of
      the squared gradient with factor 0.9 of Tieleman & Hinton, COURSERA lecture 6.5
      (2012), the method's only source. The lecture gives no ``eps`` and no learning rate, so
      those stay ocnet's (``eps=1e-8``, ``lr=DEFAULT_LR["rmsprop"]``). The default
      ``alpha`` stays torch.optim's 0.99, so that the solver remains torch's twin.
    - ``momentum``: paper = ``momentum=0.9, dampening=0, nesterov=False``: Polyak's heavy
      ball (1964, which fixes no value) with the momentum 0.9 of Krizhevsky, Sutskever &
      Hinton (NeurIPS 2012) and of the practice that followed: a convention more than one
      paper's value. The same as ocnet's default. No paper fixes its learning rate.
    - ``sgd``: paper = ``momentum=0, dampening=0, nesterov=False`` (Robbins & Monro 1951:
      plain stochastic gradient steps); the same as the defaults. No paper fixes its
      learning rate.
    """

    def __init__(self, problem: Problem, optimizer: str = "adam", lr: float | None = None,
                 *, compile: bool | str = False, **options: Any) -> None:
        super().__init__(problem)
        if optimizer not in FIRST_ORDER:
            raise unknown_name("optimizer", optimizer, list(FIRST_ORDER))
        if lr is not None and not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        self.name = optimizer
        self.lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
        self.params = problem.parameters()
        if not self.params:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.curvature: Curvature = make_curvature(optimizer, self.lr, **options)
        self.state = self.curvature.init(self.params)
        self.compile = compile_mode(compile, optimizer)
        self._update = maybe_compile(self.curvature.update, compile, optimizer)

    #: the base update is a finite function of a finite gradient and a finite state, so
    #: the finiteness guard only needs to look at the loss and the gradient before it
    gates_itself = True
    gates_on_device = True

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        loss, grads, _ = self.problem.value_and_gradients(x0, y)
        loss, grads = self.reduce_grads(loss, grads)  # data parallel: mean over ranks
        norm = grad_norm(grads)
        ok = self.finite_gate(loss, norm)
        if ok is False:
            return StepInfo(loss=loss, accepted=False, grad_norm=norm, reason=GATE_REASON)
        flat = [g for gs in grads for g in gs]
        k, state = self._update(flat, self.state)
        if isinstance(ok, Tensor):  # decided on the device: a zero step, the old state
            k = [torch.where(ok, v, 0.0) for v in k]
            state = where_tree(ok, state, self.state)
            ok_accepted: bool | Tensor = ok
        else:
            ok_accepted = True
        self.state = state
        with torch.no_grad():
            torch._foreach_add_(self.params, k)
        return StepInfo(loss=loss, accepted=ok_accepted, grad_norm=norm,
                        reason=GATE_REASON if isinstance(ok, Tensor) else "")

    def functional_state(self) -> dict[str, Any]:
        return self.state

    def set_functional_state(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "curvature": state_to_dict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "curvature" not in state and "optimizer" in state:
            raise CheckpointError(
                f"{self.name}: this checkpoint holds torch.optim state (written by ocnet 0.1); "
                "the base optimizers are now ocnet.solvers.curvature objects, so its moment "
                "estimates cannot be restored exactly. Start a new run (another --out), or "
                "resume it with the ocnet version that wrote it"
            )
        super().load_state_dict(state)
        if "curvature" in state:
            load_state(self.state, state["curvature"])


for _name, _summary in [
    ("sgd", "stochastic gradient descent on costate gradients"),
    ("momentum", "heavy-ball momentum (SGD, momentum 0.9) on costate gradients"),
    ("rmsprop", "RMSprop on costate gradients"),
    ("adam", "Adam on costate gradients"),
]:
    register(_name, lambda problem, _o=_name, **kw: GradientSolver(problem, _o, **kw), _summary,
             solver_class=GradientSolver, default_lr=DEFAULT_LR[_name], data_parallel=True,
             cost="first-order", options=(GradientSolver, FIRST_ORDER[_name]),
             fixed=("optimizer",), presets=PRESETS[_name])
