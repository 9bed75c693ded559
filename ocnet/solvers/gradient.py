"""The gradient baseline: costate gradients fed to a ``torch.optim`` optimizer.

    g_t = dJ/du_t = -dH_t/du (x_t, p_{t+1}, u_t)      (Problem.value_and_gradients)
    u  <- optimizer(u, g)                              (SGD, heavy ball, RMSprop, Adam)

Weight decay belongs to the problem (a running cost), not to the optimizer.
Data parallel (``comm`` set): J and g are averaged over the ranks before the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError, unknown_name
from ..ocp.problem import Problem
from .base import Solver, StepInfo, grad_norm, register

OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3}


class GradientSolver(Solver):
    """Gradient descent in any ``torch.optim`` flavour, on costate gradients.

    Args:
        problem: the problem to train.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD with momentum 0.9 unless given),
            ``"rmsprop"`` or ``"adam"``.
        lr: the learning rate (default per optimizer: ``DEFAULT_LR``).
        **options: passed to the ``torch.optim`` class (e.g. ``betas``, ``momentum``).
    """

    supports_comm = True

    def __init__(self, problem: Problem, optimizer: str = "adam", lr: float | None = None,
                 **options: Any) -> None:
        super().__init__(problem)
        if optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, list(OPTIMIZERS))
        if lr is not None and not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if optimizer == "momentum":
            options.setdefault("momentum", 0.9)
        self.name = optimizer
        self.lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
        params = problem.parameters()
        if not params:
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.optimizer = OPTIMIZERS[optimizer](params, lr=self.lr, **options)

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        loss, grads, _ = self.problem.value_and_gradients(x0, y)
        loss, grads = self.reduce_grads(loss, grads)  # data parallel: mean over ranks
        for stage, gs in zip(self.problem.stages, grads, strict=True):
            for u, g in zip(stage.controls, gs, strict=True):
                u.grad = g
        self.optimizer.step()
        return StepInfo(loss=loss, accepted=True, grad_norm=grad_norm(grads))


for _name, _summary in [
    ("sgd", "stochastic gradient descent on costate gradients"),
    ("momentum", "heavy-ball momentum (SGD, momentum 0.9) on costate gradients"),
    ("rmsprop", "RMSprop on costate gradients"),
    ("adam", "Adam on costate gradients"),
]:
    register(_name, lambda problem, _o=_name, **kw: GradientSolver(problem, _o, **kw), _summary)
