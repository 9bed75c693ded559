"""The control regulariser of a neural ODE, discretised for DG(0) controls.

Continuous:  R(theta) = lam/2 * int_0^T ( alpha |theta(t)|^2 + beta |theta'(t)|^2 ) dt.

For theta piecewise constant (theta_m on interval I_m of length h_m) the discrete form is

    R_h = lam/2 * sum_m alpha h_m |theta_m|^2
        + lam/2 * sum_{m=0}^{N-2} beta |theta_{m+1} - theta_m|^2 / hbar_{m+1/2},
    hbar_{m+1/2} = (h_m + h_{m+1}) / 2.

The first sum is int |theta_h|^2 exactly. The second is int |d/dt Itheta_h|^2 of the
continuous piecewise-linear function Itheta_h through the values theta_m placed at the
interval midpoints: each jump is divided by the distance of the two midpoints. This is
the scaling that is consistent: for theta_m = theta(midpoint of I_m) of a smooth
theta, the jump is ~ theta' hbar, so the sum tends to int |theta'|^2 as h -> 0 (an
unscaled sum of squared jumps would vanish like h, one scaled by 1/h^2 would blow up).
It is the 1/h scaling of interior-penalty DG methods. Bisection with copied controls
keeps theta(t) and the first sum exactly; the jump sum changes only through the
midpoint distances next to a refined interval (a new zero jump adds nothing).

The jump couples neighbouring intervals, so it is not a running cost of one stage: it
is a :class:`JumpPenalty`, a cost of the controls of several stages that the
:class:`~ocnet.ocp.Problem` adds to J (and its gradient to dJ/du) at whatever controls are
evaluated, trial controls included. The alpha term is each Euler stage's running cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..dynamics import TimeMesh
from ..ocp.errors import ConfigError
from ..ocp.problem import ControlCost
from ..ocp.stage import Controls


def _sq(u: Controls, v: Controls | None = None) -> Tensor:
    """sum over tensors of |u - v|^2 (|u|^2 when v is None)."""
    if v is None:
        return sum((a * a).sum() for a in u)  # type: ignore[return-value]
    return sum(((a - b) ** 2).sum() for a, b in zip(u, v, strict=True))  # type: ignore[return-value]


class DG0Regularizer:
    """R_h(theta) = lam/2 sum alpha h_m|theta_m|^2 + lam/2 sum beta |[theta]|^2/hbar (module doc).

    Args:
        lam: overall weight lambda >= 0.
        alpha: weight of the |theta|^2 term (1 in the paper).
        beta: weight of the |dtheta/dt|^2 term (1 in the paper).
    """

    def __init__(self, lam: float = 0.0, alpha: float = 1.0, beta: float = 1.0) -> None:
        for name, v in (("lam", lam), ("alpha", alpha), ("beta", beta)):
            if not v >= 0:
                raise ConfigError(f"DG0Regularizer: {name} must be >= 0, got {v}")
        self.lam, self.alpha, self.beta = float(lam), float(alpha), float(beta)

    @property
    def active(self) -> bool:
        return self.lam > 0 and (self.alpha > 0 or self.beta > 0)

    def pair_weights(self, mesh: TimeMesh) -> list[float]:
        """w_{m,m+1} = lam beta / (h_m + h_{m+1}) for the N-1 interior nodes."""
        h = mesh.lengths
        return [self.lam * self.beta / (h[m] + h[m + 1]) for m in range(len(h) - 1)]

    def value(self, controls: Sequence[Controls], mesh: TimeMesh) -> Tensor:
        """R_h in closed form (differentiable; exact Hessian)."""
        h = mesh.lengths
        ref = controls[0][0]
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        if self.lam == 0:
            return total
        if self.alpha > 0:
            for m, u in enumerate(controls):
                total = total + 0.5 * self.lam * self.alpha * h[m] * _sq(u)
        if self.beta > 0:
            for m, w in enumerate(self.pair_weights(mesh)):
                total = total + w * _sq(controls[m + 1], controls[m])
        return total


class JumpPenalty(ControlCost):
    """C(theta) = sum_m w_{m,m+1} |theta_{m+1} - theta_m|^2, w = lam beta / (h_m + h_{m+1}):
    the jump term of R_h as a cost coupling the Euler stages ``stages`` (in mesh order)."""

    def __init__(self, stages: Sequence[int], weights: Sequence[float]) -> None:
        if len(weights) != len(stages) - 1:
            raise ConfigError(f"JumpPenalty: {len(stages)} stages need {len(stages) - 1} "
                              f"weights, got {len(weights)}")
        self.stages = tuple(stages)
        self.weights = [float(w) for w in weights]

    def value(self, controls: Sequence[Controls]) -> Tensor:
        total = controls[0][0].new_zeros(())
        for m, w in enumerate(self.weights):
            if w:
                total = total + w * _sq(controls[m + 1], controls[m])
        return total

    def __repr__(self) -> str:
        return f"JumpPenalty(stages={self.stages[0]}..{self.stages[-1]})"
