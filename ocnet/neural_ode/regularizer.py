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

The jump couples neighbouring intervals, but a running cost of the ``Problem``
interface may only depend on its own stage's controls. :class:`JumpCoupling` therefore
gives stage m the cost

    l_m(u) = lam alpha h_m/2 |u|^2
           + sum_{n = m +- 1} w_mn ( |u - rbar_n|^2 - |rbar_m - rbar_n|^2 / 2 ),
    w_mn = lam beta / (h_m + h_n),

where ``rbar`` are the *reference* controls (the live controls, read without a graph).
At u = rbar_m the costs sum to R_h exactly (each jump is counted half from each side),
and dl_m/du = lam alpha h_m u + sum_n 2 w_mn (u - rbar_n) is exactly dR_h/dtheta_m: so J and
every dJ/du_m of the costate sweep are exact. Moving one stage alone also changes J
exactly by l_m (what a stage-wise Hamiltonian maximisation sees). Only the Hessian's
off-diagonal blocks (-2 w_mn I) are not represented; ``NeuralODEProblem.objective``
adds R_h in closed form instead, so autograd Hessians through ``objective`` are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..dynamics import TimeMesh
from ..ocp.errors import ConfigError
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


class JumpCoupling:
    """Per-stage running costs whose sum and gradients equal R_h (see the module doc).

    ``reference`` returns the controls the neighbours are read from (by default the live
    field controls of the model); :meth:`using` swaps in other controls for one
    evaluation, :meth:`split` switches the stage costs to the alpha term only (the
    caller then adds the coupling in closed form).
    """

    def __init__(self, reg: DG0Regularizer, mesh: TimeMesh,
                 reference: Callable[[], Sequence[Controls]]) -> None:
        self.reg, self.mesh = reg, mesh
        self._reference = reference
        self._override: Sequence[Controls] | None = None
        self._alpha_only = False
        self._w = reg.pair_weights(mesh)

    @contextmanager
    def using(self, controls: Sequence[Controls]) -> Iterator[None]:
        """Read the neighbours from ``controls`` inside the block."""
        old, self._override = self._override, controls
        try:
            yield
        finally:
            self._override = old

    @contextmanager
    def split(self) -> Iterator[None]:
        """Stage costs without the coupling term inside the block."""
        old, self._alpha_only = self._alpha_only, True
        try:
            yield
        finally:
            self._alpha_only = old

    def stage_cost(self, m: int) -> Callable[[Tensor, Controls], Tensor]:
        """l_m(x, u) of interval m (independent of x)."""

        def cost(x: Tensor, u: Controls) -> Tensor:
            reg, h = self.reg, self.mesh.lengths[m]
            total = torch.zeros((), dtype=u[0].dtype, device=u[0].device)
            if reg.alpha > 0:
                total = total + 0.5 * reg.lam * reg.alpha * h * _sq(u)
            if reg.beta > 0 and not self._alpha_only:
                ref = self._override if self._override is not None else self._reference()
                own = tuple(v.detach() for v in ref[m])
                for n, w in ((m - 1, self._w[m - 1] if m > 0 else 0.0),
                             (m + 1, self._w[m] if m < len(self._w) else 0.0)):
                    if w == 0.0:
                        continue
                    nb = tuple(v.detach() for v in ref[n])
                    total = total + w * (_sq(u, nb) - 0.5 * _sq(own, nb))
            return total

        return cost
