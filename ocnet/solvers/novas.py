r"""NOVAS: argmin layers by differentiable adaptive stochastic search, and two peers.

A layer whose output is ``y* = argmin_y E(y; x, theta)`` for an energy ``E`` that may be
non-convex (Exarchos, Pereira, Wang, Theodorou, ICLR 2021). The search runs over a
diagonal Gaussian ``N(mu, diag sigma^2)`` per batch element, batched over the batch and
over the samples, on the device of its inputs. One iteration (``F = -E``)::

    X_i   = mu + sigma * eps_i,            eps_i ~ N(0, I)       (reparameterised)
    Ft_i  = (F_i - min_j F_j) / (max_j F_j - min_j F_j)          (in [0, 1])
    S     = softmax(kappa * Ft)                                  (shape "exponential")
    S_i   = Ft_i * sigmoid(c (F_i - gamma)) / sum(...)            (shape "soft_ce"; gamma the
                                                                  k-th best F, k = elite_frac N,
                                                                  c = sharpness = 1000)
    mu'   = mu + alpha * sum_i S_i (X_i - mu)
    sigma'= sqrt(sum_i S_i (X_i - mu')^2 + var_floor)             (var_floor = 1e-3 as public)

The output is the final mean. ``differentiate="last"`` (the public code) runs the first
``n_iter - 1`` iterations without a graph and differentiates only the last one: the
gradient of ``y`` with respect to theta is that of one update from the reached
``(mu, sigma)``, and memory does not grow with ``n_iter``. ``differentiate="all"``
keeps the graph of every iteration (the total derivative; memory grows with ``n_iter``).

Convergence tolerance: an element whose mean moved less than ``tol`` (2-norm) is frozen
with a masked update (``torch.where``), so the loop needs no host synchronisation; every
``check_every`` iterations (0: never) the host asks once whether all elements are frozen
and stops early. With ``differentiate="last"`` the differentiated read-out iteration is
applied to every element, frozen or not, so every output carries a gradient.

Peers on the same interface (energy of samples ``(B, N, d) -> (B, N)``):

* DCEM (Amos & Yarats, 2020): the cross-entropy method with the hard top-k replaced by the
  limited multi-label projection ``I = LML_k(-Ez / temperature)`` (``Ez`` the energies
  standardised over the samples)::

      LML_k(z) = argmin_{0 <= p <= 1, 1'p = k} -z'p - H_b(p)  =>  p_i = sigmoid(z_i + nu),
      nu solving sum_i sigmoid(z_i + nu) = k;  dp/dz = diag(h) - h h' / 1'h,  h = p (1 - p)
      mu' = sum_i I_i X_i / k,   sigma' = sqrt(sum_i I_i (X_i - mu')^2 / k + var_floor)

  (The public DCEM code multiplies the standardised energies by ``temp``; with the
  default 1 that is the same.) All iterations are differentiated, as in the public code.
* Unrolled gradient descent: ``y_{k+1} = y_k - lr * dE/dy(y_k)`` for a fixed number of
  steps, differentiated through all steps (the DCEM paper's baseline: 10 steps, lr 0.1).

Every routine accepts a ``generator`` (a ``torch.Generator`` on the inputs' device) or a
fixed ``noise`` tensor of shape ``(n_iter, B, N, d)``, so that finite differences can hold
the sampling noise fixed. Derivation and discussion: ``docs/novas.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..ocp.errors import ConfigError, ShapeError, unknown_name
from . import novas_fused

#: An energy of candidate outputs: ``Y`` of shape ``(B, N, d)`` -> energies ``(B, N)``.
EnergyFn = Callable[[Tensor], Tensor]
#: The module form's energy: ``(x, Y)`` with ``x`` of batch size ``B`` -> ``(B, N)``.
ConditionalEnergy = Callable[[Tensor, Tensor], Tensor]

SHAPES = ("exponential", "soft_ce")
DIFFERENTIATE = ("last", "all")

#: the layers' presets, by class: ``NOVAS(energy, dim, preset="paper")`` (explicit options
#: win). Sources in the class docstrings of :class:`NOVAS` and :class:`DCEM`.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "NOVAS": {"paper": {"mu0": 0.0, "sigma0": 10.0, "n_samples": 100, "n_iter": 10,
                        "shape": "soft_ce", "alpha": 1.0, "sharpness": 1000.0,
                        "var_floor": 1e-3, "tol": 1e-4, "check_every": 1,
                        "differentiate": "last"}},
    "DCEM": {"paper": {"sigma0": 7.0, "n_samples": 100, "n_elite": 10, "n_iter": 10,
                       "temperature": 1.0, "normalize": True}},
}

_Init = TypeVar("_Init", bound=Callable[..., None])


def _takes_presets(layer: str) -> Callable[[_Init], _Init]:
    """Let ``__init__(energy, dim, *, preset=None, **options)`` start from
    ``PRESETS[layer][preset]``, the explicit options winning; an unknown preset is a
    ``ConfigError`` listing the valid ones. The wrapped ``__init__`` receives ``preset``."""

    def wrap(init: _Init) -> _Init:
        @functools.wraps(init)
        def wrapper(self: nn.Module, energy: ConditionalEnergy, dim: int, *,
                    preset: str | None = None, **options: Any) -> None:
            if preset is not None:
                table = PRESETS[layer]
                if preset not in table:
                    raise unknown_name(f"{layer} preset", preset, list(table))
                options = {**table[preset], **options}
            init(self, energy, dim, preset=preset, **options)

        return wrapper  # type: ignore[return-value]

    return wrap

__all__ = [
    "DCEM",
    "NOVAS",
    "PRESETS",
    "SHAPES",
    "SearchResult",
    "UnrolledGD",
    "dcem",
    "bisections",
    "lml",
    "novas",
    "unrolled_gd",
]


@dataclass
class SearchResult:
    """What a search returned: the output ``y = mu`` and the state it ended in.

    ``iterations`` counts, per batch element, the updates applied (tensor, no host sync);
    ``converged`` says whether the element met the tolerance.
    """

    y: Tensor
    sigma: Tensor
    iterations: Tensor
    converged: Tensor


# ----------------------------------------------------------------------------- checks
def _check_mu0(mu0: Tensor) -> None:
    if not isinstance(mu0, Tensor) or mu0.dim() != 2:
        shape = tuple(mu0.shape) if isinstance(mu0, Tensor) else type(mu0).__name__
        raise ShapeError(
            f"the initial mean must be a tensor of shape (batch, dim), got {shape}; "
            "for a single problem use mu0[None] (batch 1), for scalar outputs mu0[:, None]"
        )
    if not mu0.is_floating_point():
        raise ShapeError(f"the initial mean must be floating point, got {mu0.dtype}")


def _sigma(sigma0: float | Tensor, mu: Tensor) -> Tensor:
    if isinstance(sigma0, Tensor):
        try:
            return torch.broadcast_to(sigma0.to(mu), mu.shape).clone()
        except RuntimeError as err:
            raise ShapeError(
                f"sigma0 of shape {tuple(sigma0.shape)} does not broadcast to the mean's shape "
                f"{tuple(mu.shape)}; give a float, a (dim,) or a (batch, dim) tensor"
            ) from err
    if not sigma0 > 0:
        raise ConfigError(f"sigma0 must be positive, got {sigma0}")
    return torch.full_like(mu, float(sigma0))


def _energies(energy: EnergyFn, X: Tensor) -> Tensor:  # noqa: N803
    """Evaluate the energy on samples ``X (B, N, d)`` and check it gave one value each."""
    B, N, _ = X.shape
    E = energy(X)
    if not isinstance(E, Tensor):
        raise ShapeError(f"the energy must return a tensor, got {type(E).__name__}")
    if E.dim() == 3 and E.shape[-1] == 1:
        E = E.squeeze(-1)
    if E.shape != (B, N):
        if E.dim() == 0:
            why = (
                "it returned a single number: it must not reduce over the batch or the "
                "samples (drop the final .sum() or .mean())"
            )
        elif E.shape[0] != B:
            why = (
                f"its first dimension {E.shape[0]} is not the batch size {B}: the energy "
                "must keep the batch dimension of its inputs (did it reduce over the batch "
                "or use inputs of another batch size?)"
            )
        else:
            why = (
                "it must give one value per candidate; reduce over every trailing dimension "
                "(e.g. .sum(-1)) but keep (batch, samples)"
            )
        raise ShapeError(
            f"the energy returned shape {tuple(E.shape)} for candidates of shape "
            f"{tuple(X.shape)} (batch, samples, dim); expected ({B}, {N}) or ({B}, {N}, 1): "
            f"{why}"
        )
    return E


class _Noise:
    """Standard normal draws of shape (B, N, d): fresh from a generator, or a fixed tensor."""

    def __init__(
        self,
        like: Tensor,
        n_samples: int,
        n_iter: int,
        generator: torch.Generator | None,
        noise: Tensor | None,
    ) -> None:
        B, d = like.shape
        self.like, self.shape = like, (B, n_samples, d)
        self.generator, self.noise = generator, noise
        if noise is not None:
            if noise.dim() != 4 or noise.shape[0] < n_iter or noise.shape[1] != B or (
                noise.shape[3] != d
            ):
                raise ShapeError(
                    f"fixed noise must have shape (n_iter, batch, samples, dim) with at least "
                    f"n_iter={n_iter} slices, batch {B} and dim {d}; got {tuple(noise.shape)}"
                )
            self.shape = (B, noise.shape[2], d)
        elif generator is not None and generator.device.type != like.device.type:
            raise ConfigError(
                f"the generator is on {generator.device} but the inputs are on {like.device}; "
                f"make it with torch.Generator(device={str(like.device)!r}).manual_seed(...)"
            )

    @property
    def n_samples(self) -> int:
        return self.shape[1]

    def __call__(self, k: int) -> Tensor:
        if self.noise is not None:
            return self.noise[k].to(self.like)
        return torch.randn(
            self.shape, generator=self.generator, device=self.like.device, dtype=self.like.dtype
        )


def _minmax(F: Tensor) -> Tensor:  # noqa: N803
    """(F - min F) / (max F - min F) over the samples; all-equal values map to 0."""
    lo = F.min(dim=1, keepdim=True).values
    hi = F.max(dim=1, keepdim=True).values
    tiny = torch.finfo(F.dtype).tiny
    return (F - lo) / (hi - lo).clamp_min(tiny)


def _masked(
    active: Tensor, new: tuple[Tensor, Tensor], old: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    a = active[:, None]
    return torch.where(a, new[0], old[0]), torch.where(a, new[1], old[1])


def _check_common(n_iter: int, n_samples: int, tol: float | None, check_every: int) -> None:
    if n_iter < 1:
        raise ConfigError(f"n_iter must be at least 1, got {n_iter}")
    if n_samples < 2:
        raise ConfigError(f"n_samples must be at least 2, got {n_samples}")
    if tol is not None and tol < 0:
        raise ConfigError(f"tol must be non-negative or None (no tolerance), got {tol}")
    if check_every < 0:
        raise ConfigError(f"check_every must be >= 0 (0: never stop early), got {check_every}")


# ----------------------------------------------------------------------------- NOVAS
def novas_weights(
    F: Tensor,  # noqa: N803
    shape: str = "exponential",
    kappa: float = 1.0,
    elite_frac: float = 0.1,
    sharpness: float = 1000.0,
) -> Tensor:
    """The normalised sample weights S (B, N) from the scores ``F = -E`` (B, N)."""
    Ft = _minmax(F)
    if shape == "exponential":
        return torch.softmax(kappa * Ft, dim=1)
    if shape == "soft_ce":
        k = max(1, int(elite_frac * F.shape[1]))
        gamma = F.topk(k, dim=1).values[:, -1:]
        S = Ft * torch.sigmoid(sharpness * (F - gamma))
        return S / S.sum(dim=1, keepdim=True).clamp_min(torch.finfo(F.dtype).tiny)
    raise unknown_name("shape function", shape, SHAPES)


class _Consts:
    """What one search's updates need, fixed per search: the shape, the elite count, alpha,
    and the float options as 0-dim tensors of the search's dtype and device. A Python float
    operand costs each binary op a conversion of the wrapped number to the tensor's dtype
    (about as much as the op itself on the small (B, N) tensors here); a 0-dim tensor of the
    same dtype gives the same values without it."""

    def __init__(self, like: Tensor, n_samples: int, shape: str, kappa: float, alpha: float,
                 elite_frac: float, sharpness: float, var_floor: float,
                 tol: float | None = None) -> None:
        self.shape, self.alpha = shape, float(alpha)
        self.k = max(1, int(elite_frac * n_samples))
        self.tiny = torch.finfo(like.dtype).tiny
        values = [kappa, sharpness, var_floor, 0.0 if tol is None else tol]
        if like.device.type == "cpu":
            t = torch.tensor(values, dtype=like.dtype).unbind()
        else:  # a fill per constant: a host-to-device copy could wait on the device
            t = [torch.full((), v, dtype=like.dtype, device=like.device) for v in values]
        self.kappa = None if kappa == 1.0 else t[0]  # Ft * 1 == Ft: skip the op
        self.sharpness, self.var_floor, self.tol = t[1], t[2], t[3]
        self.dtype, self._tol, self._tol_host = like.dtype, tol, None

    @property
    def tol_host(self) -> float:
        """``tol`` as the tensor comparison sees it (rounded to the dtype), as a Python
        float; read from a CPU tensor at the first host check (no device wait)."""
        if self._tol_host is None:
            self._tol_host = float(torch.tensor(self._tol, dtype=self.dtype))
        return self._tol_host


def _step(
    energy: EnergyFn, mu: Tensor, sigma: Tensor, eps: Tensor, c: _Consts  # noqa: N803
) -> tuple[Tensor, Tensor]:
    """One NOVAS update of ``(mu, sigma)`` of shape (B, 1, d) (the loop's layout: no
    reshapes per iteration) with draws ``eps`` (B, N, d); with or without autograd.

    The module doc's formulas in fewer operations: it works on ``E`` instead of
    ``F = -E`` (``F - min F = max E - E``, ``max F - min F = max E - min E``, the k-th best
    ``F`` is minus the k-th smallest ``E``, taken by ``kthvalue``); for ``soft_ce`` the
    factor ``1 / (max E - min E)`` of ``Ft`` is left out, since the normalisation cancels
    it (a rounding-level difference); the weighted sums over the samples are batched
    matrix products, the mean's with its ``mu +`` folded in (``baddbmm``). In-place
    operations only on temporaries whose old values autograd does not keep."""
    dX = sigma * eps  # noqa: N806
    X = mu + dX  # noqa: N806
    E = _energies(energy, X)  # noqa: N806
    if c.shape == "soft_ce":
        hi = E.amax(dim=1, keepdim=True)
        gamma = E.kthvalue(c.k, dim=1, keepdim=True).values
        S = (hi - E) * (gamma - E).mul_(c.sharpness).sigmoid_()  # noqa: N806
        S = S / S.sum(dim=1, keepdim=True).clamp_min(c.tiny)  # noqa: N806
    else:
        lo, hi = torch.aminmax(E, dim=1, keepdim=True)
        Ft = (hi - E) / (hi - lo).clamp_min(c.tiny)  # noqa: N806
        S = torch.softmax(Ft if c.kappa is None else Ft * c.kappa, dim=1)  # noqa: N806
    S = S.unsqueeze(1)  # noqa: N806  (B, 1, N): the weights as a row per element
    if c.alpha == 1.0:
        mu_new = torch.baddbmm(mu, S, dX)
    else:
        mu_new = torch.baddbmm(mu, S, dX, alpha=c.alpha)
    var = torch.bmm(S, (X - mu_new).square())
    return mu_new, var.add_(c.var_floor).sqrt_()


def novas_step(
    energy: EnergyFn,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    shape: str = "exponential",
    kappa: float = 1.0,
    alpha: float = 1.0,
    elite_frac: float = 0.1,
    sharpness: float = 1000.0,
    var_floor: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """One NOVAS update of ``(mu, sigma)`` (B, d) with standard normal draws ``eps`` (B, N, d)."""
    if shape not in SHAPES:
        raise unknown_name("shape function", shape, SHAPES)
    c = _Consts(mu, eps.shape[1], shape, kappa, alpha, elite_frac, sharpness, var_floor)
    mu_new, sigma_new = _step(energy, mu.unsqueeze(1), sigma.unsqueeze(1), eps, c)
    return mu_new.squeeze(1), sigma_new.squeeze(1)


def novas(
    energy: EnergyFn,
    mu0: Tensor,
    sigma0: float | Tensor = 10.0,
    *,
    n_samples: int = 100,
    n_iter: int = 10,
    shape: str = "exponential",
    kappa: float = 1.0,
    alpha: float = 1.0,
    elite_frac: float = 0.1,
    sharpness: float = 1000.0,
    var_floor: float = 1e-3,
    tol: float | None = None,
    check_every: int = 0,
    differentiate: str = "last",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    fused: bool | None = None,
) -> SearchResult:
    """argmin_y energy(y) by NOVAS from the Gaussian ``N(mu0, sigma0^2)``; see the module doc.

    Args:
        energy: ``Y (B, N, d) -> E (B, N)``; closes over the inputs and parameters theta.
        mu0: initial means ``(B, d)``; sets the device and dtype of the search.
        sigma0: initial standard deviation (float or tensor broadcastable to ``(B, d)``).
        n_samples, n_iter: samples per element and iterations (public code: 100, 10).
        shape: ``"exponential"`` (softmax with ``kappa``) or ``"soft_ce"``.
        alpha: step size of the mean update; ``var_floor`` is added to the variance.
        tol: freeze an element once its mean moves less than this (None: never).
        check_every: every so many iterations stop if all elements are frozen (0: never;
            each check is one host synchronisation).
        differentiate: ``"last"`` (only the last iteration carries a graph) or ``"all"``.
        generator, noise: a ``torch.Generator`` on the inputs' device, or fixed standard
            normal draws ``(n_iter, B, N, d)`` (``n_samples`` is then ``noise.shape[2]``).
        fused: run the iterations as CPU kernels (:mod:`ocnet.solvers.novas_fused`: the
            free iterations and, with ``differentiate="last"``, the read-out one with its
            backward; the same formulas, equal to the tensor path to rounding). None
            (default): where they can run (a float32/float64 CPU search, numba installed);
            False: always the tensor path; True: as None, but a ``ConfigError`` where they
            cannot run.
    """
    _check_mu0(mu0)
    if fused and not novas_fused.usable(mu0):
        raise ConfigError(
            f"fused=True needs a float32 or float64 CPU search and numba "
            f"(installed: {novas_fused.AVAILABLE}); this search is {mu0.dtype} on "
            f"{mu0.device}: pass fused=None (use it where it can run) or fused=False")
    if shape not in SHAPES:
        raise unknown_name("shape function", shape, SHAPES)
    if differentiate not in DIFFERENTIATE:
        raise unknown_name("differentiate option", differentiate, DIFFERENTIATE)
    draw = _Noise(mu0, n_samples, n_iter, generator, noise)
    _check_common(n_iter, draw.n_samples, tol, check_every)
    c = _Consts(mu0, draw.n_samples, shape, kappa, alpha, elite_frac, sharpness, var_floor,
                tol)
    # (B, 1, d) throughout: broadcasts against the samples (B, N, d) without reshapes
    mu, sigma = mu0.unsqueeze(1), _sigma(sigma0, mu0).unsqueeze(1)
    B, d = mu0.shape
    # None: every element active, known on the host (at the start, and after a host check
    # that found all active); then the mask would keep every new value and is skipped
    active: Tensor | None = None
    count: Tensor | None = None  # per-element updates, made when the first mask is applied
    n_all = 0  # updates applied to every element: added to count once, at the end
    n_free = n_iter - 1 if differentiate == "last" else n_iter
    k = 0
    with torch.set_grad_enabled(torch.is_grad_enabled() and differentiate == "all"):
        # the free iterations as two kernels each where they can run (CPU, no graph)
        if fused is not False and not torch.is_grad_enabled() and novas_fused.usable(mu):
            mu, sigma, k, active, count = novas_fused.free_iterations(
                functools.partial(_energies, energy), draw, mu.detach(), sigma.detach(), n_free,
                soft_ce=c.shape == "soft_ce", k=c.k, kappa=kappa, alpha=c.alpha,
                sharpness=sharpness, var_floor=var_floor, tol=tol, check_every=check_every)
            if tol is None:
                active = None
        else:
            while k < n_free:
                mu_new, sigma_new = _step(energy, mu, sigma, draw(k), c)
                k += 1
                # the only host decision of the loop (one sync per check_every iterations)
                check = tol is not None and check_every and k % check_every == 0
                if tol is None:
                    mu, sigma = mu_new, sigma_new
                    n_all += 1
                    continue
                delta = mu_new - mu
                if active is None:  # then active & (moved >= tol) is moved >= tol
                    mu, sigma = mu_new, sigma_new
                    n_all += 1
                    # min(moved) >= tol: every element stays active, no mask to make; for
                    # d = 1 the -inf norm over the batch is that minimum in one reduction
                    # (the 2-norm of one number is its absolute value, exactly)
                    if check and float(
                        torch.linalg.vector_norm(delta.detach(), float("-inf")) if d == 1
                        else torch.linalg.vector_norm(delta.detach(), dim=(1, 2)).amin()
                    ) >= c.tol_host:
                        continue
                    active = torch.linalg.vector_norm(delta, dim=(1, 2)) >= c.tol
                else:
                    moved = torch.linalg.vector_norm(delta, dim=(1, 2))
                    a = active[:, None, None]
                    mu, sigma = torch.where(a, mu_new, mu), torch.where(a, sigma_new, sigma)
                    if count is None:
                        count = torch.zeros(B, dtype=torch.long, device=mu0.device)
                    count.add_(active)  # this loop's own tensor (active: saved by the mask)
                    active = active & (moved >= c.tol)
                if check:  # how many are active; none: the remaining iterations are no-ops
                    n_active = int(active.sum())
                    if n_active == 0:
                        break
                    if n_active == B:
                        active = None
    if differentiate == "last":
        mu, sigma = mu.detach(), sigma.detach()
        moved = None
        if fused is not False and novas_fused.usable(mu):  # only the energies carry a graph
            X, dX = novas_fused.sample(mu, sigma, draw(k))  # noqa: N806
            mu_new, sigma_new, moved = novas_fused.step(
                _energies(energy, X), dX, mu, soft_ce=c.shape == "soft_ce", k=c.k,
                kappa=kappa, alpha=c.alpha, sharpness=sharpness, var_floor=var_floor)
        else:
            mu_new, sigma_new = _step(energy, mu, sigma, draw(k), c)
        if tol is not None:  # on detached values: the test needs no graph
            if moved is None:
                moved = torch.linalg.vector_norm(mu_new.detach() - mu, dim=(1, 2))
            fresh = moved >= c.tol
            active = fresh if active is None else active & fresh
        mu, sigma = mu_new, sigma_new
        n_all += 1
    if count is None:
        count = torch.full((B,), n_all, dtype=torch.long, device=mu0.device)
    elif n_all:
        count = count + n_all
    if tol is None or active is None:  # active is None: the last check found all active
        converged = torch.zeros(B, dtype=torch.bool, device=mu0.device)
    else:
        converged = ~active
    return SearchResult(y=mu.squeeze(1), sigma=sigma.squeeze(1), iterations=count,
                        converged=converged)


# ----------------------------------------------------------------------------- DCEM
class _LML(torch.autograd.Function):
    """Limited multi-label projection; forward by bisection, backward by the implicit formula."""

    @staticmethod
    def forward(ctx, z: Tensor, k: float, n_bisect: int) -> Tensor:  # noqa: ANN001
        N = z.shape[-1]
        if not 0 < k < N:
            # k = N (every sample an elite): p = 1 identically, zero derivative.
            p = torch.ones_like(z) if k >= N else torch.zeros_like(z)
            ctx.save_for_backward(p)
            return p
        shift = torch.logit(torch.tensor(k / N, dtype=z.dtype, device=z.device))
        lo = shift - z.max(dim=-1, keepdim=True).values
        hi = shift - z.min(dim=-1, keepdim=True).values
        for _ in range(n_bisect):  # a fixed count: no host sync
            mid = 0.5 * (lo + hi)
            below = torch.sigmoid(z + mid).sum(dim=-1, keepdim=True) < k
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        p = torch.sigmoid(z + 0.5 * (lo + hi))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        (p,) = ctx.saved_tensors
        h = p * (1 - p)
        hs = h.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        return h * g - h * (h * g).sum(dim=-1, keepdim=True) / hs, None, None


def bisections(dtype: torch.dtype) -> int:
    """The LML bisection count after which more steps change no bit of ``p`` in ``dtype``.

    The bracket for ``nu`` starts as wide as the spread of ``z`` and halves each step; once
    it is below the spacing of the floats near ``z + nu`` (a 2^-mantissa fraction of the
    spread) ``p = sigmoid(z + nu)`` is final. Measured over scales 1e-2..1e4 of ``z`` and
    N = 20..1000: float32 needs at most 30 steps, float64 at most 59 (tests/test_novas.py
    compares with 200); this is the mantissa length plus 10 (33 and 62)."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 10


def lml(z: Tensor, k: float, n_bisect: int | None = None) -> Tensor:
    """The limited multi-label projection of ``z`` (..., N) onto ``{0<=p<=1, sum p = k}``.

    ``n_bisect``: bisection steps for the multiplier ``nu`` (a fixed count: no host
    synchronisation); ``None`` takes :func:`bisections` of ``z``'s dtype, after which more
    steps change nothing."""
    if n_bisect is None:
        n_bisect = bisections(z.dtype)
    elif n_bisect < 1:
        raise ConfigError(f"n_bisect must be at least 1 (or None: enough for the dtype), "
                          f"got {n_bisect}")
    return _LML.apply(z, float(k), int(n_bisect))


def dcem(
    energy: EnergyFn,
    mu0: Tensor,
    sigma0: float | Tensor = 7.0,
    *,
    n_samples: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    temperature: float = 1.0,
    normalize: bool = True,
    var_floor: float = 1e-10,
    n_bisect: int | None = None,
    tol: float | None = None,
    check_every: int = 0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> SearchResult:
    """argmin_y energy(y) by the differentiable cross-entropy method; see the module doc.

    Defaults are the DCEM paper's regression settings (100 samples, 10 elites, 10
    iterations, sigma0 7, temperature 1). ``var_floor`` keeps the square root's derivative
    finite when the elites coincide. ``n_bisect`` is the LML bisection count (``None``: as
    many as the dtype resolves, :func:`bisections`; the public code bisects to a tolerance,
    which needs a host read per step). Every iteration is differentiated.
    """
    _check_mu0(mu0)
    draw = _Noise(mu0, n_samples, n_iter, generator, noise)
    _check_common(n_iter, draw.n_samples, tol, check_every)
    if not 0 < n_elite <= draw.n_samples:
        raise ConfigError(f"n_elite must be in 1..n_samples={draw.n_samples}, got {n_elite}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    mu, sigma = mu0, _sigma(sigma0, mu0)
    B = mu0.shape[0]
    active = torch.ones(B, dtype=torch.bool, device=mu0.device)
    count = torch.zeros(B, dtype=torch.long, device=mu0.device)
    for k in range(n_iter):
        X = mu[:, None, :] + sigma[:, None, :] * draw(k)
        E = _energies(energy, X)
        if normalize:
            E = (E - E.mean(dim=1, keepdim=True)) / (E.std(dim=1, keepdim=True) + 1e-6)
        if n_elite == 1:
            I = torch.softmax(-E / temperature, dim=1)
        else:
            I = lml(-E / temperature, n_elite, n_bisect)
        I = I[..., None]
        mu_new = (I * X).sum(dim=1) / n_elite
        var = (I * (X - mu_new[:, None, :]) ** 2).sum(dim=1) / n_elite
        sigma_new = torch.sqrt(var + var_floor)
        if tol is not None:
            moved = torch.linalg.vector_norm(mu_new - mu, dim=1)
            mu, sigma = _masked(active, (mu_new, sigma_new), (mu, sigma))
            count = count + active.long()
            active = active & (moved >= tol)
            # One host sync per check_every iterations: stop once every element is frozen.
            if check_every and (k + 1) % check_every == 0 and not bool(active.any()):
                break
        else:
            mu, sigma, count = mu_new, sigma_new, count + 1
    converged = ~active if tol is not None else torch.zeros_like(active)
    return SearchResult(y=mu, sigma=sigma, iterations=count, converged=converged)


# ----------------------------------------------------------------------------- unrolled GD
def unrolled_gd(
    energy: EnergyFn,
    y0: Tensor,
    *,
    n_iter: int = 10,
    lr: float = 0.1,
) -> SearchResult:
    """``n_iter`` steps of ``y <- y - lr dE/dy`` from ``y0`` (B, d), differentiated through all.

    The energy is called on ``Y`` of shape ``(B, 1, d)``. Under ``torch.no_grad`` the steps
    still take dE/dy (locally enabling autograd) but keep no graph.
    """
    _check_mu0(y0)
    if n_iter < 0:
        raise ConfigError(f"n_iter must be non-negative, got {n_iter}")
    keep = torch.is_grad_enabled()
    with torch.enable_grad():
        y = y0 if y0.requires_grad else y0.detach().clone().requires_grad_(True)
        for _ in range(n_iter):
            E = _energies(energy, y[:, None, :])
            (g,) = torch.autograd.grad(E.sum(), y, create_graph=keep)
            y = y - lr * g
            if not keep:
                y = y.detach().requires_grad_(True)
    if not keep:
        y = y.detach()
    B = y0.shape[0]
    count = torch.full((B,), n_iter, dtype=torch.long, device=y0.device)
    return SearchResult(
        y=y, sigma=torch.zeros_like(y), iterations=count,
        converged=torch.zeros(B, dtype=torch.bool, device=y0.device),
    )


# ----------------------------------------------------------------------------- modules
class _ArgminLayer(nn.Module):
    """Common module form: ``forward(x) = argmin_y energy(x, y)``, y in R^dim."""

    def __init__(self, energy: ConditionalEnergy, dim: int, mu0: float | Tensor = 0.0) -> None:
        super().__init__()
        if dim < 1:
            raise ConfigError(f"dim (the size of the output y) must be >= 1, got {dim}")
        self.energy = energy  # an nn.Module energy registers its parameters (theta) here
        self.dim = int(dim)
        if isinstance(mu0, Tensor):
            self.register_buffer("mu0", mu0.detach().clone())
        else:
            self.mu0 = float(mu0)
        self.last_result: SearchResult | None = None

    def _start(self, x: Tensor, mu0: Tensor | None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ShapeError("the input x must be a tensor whose first dimension is the batch")
        B = x.shape[0]
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        if mu0 is None:
            mu0 = self.mu0
        if isinstance(mu0, Tensor):
            try:
                return torch.broadcast_to(mu0.to(device=x.device, dtype=dtype), (B, self.dim))
            except RuntimeError as err:
                raise ShapeError(
                    f"mu0 of shape {tuple(mu0.shape)} does not broadcast to (batch, dim) = "
                    f"({B}, {self.dim})"
                ) from err
        return torch.full((B, self.dim), float(mu0), device=x.device, dtype=dtype)

    def _bind(self, x: Tensor) -> EnergyFn:
        return lambda Y: self.energy(x, Y)  # noqa: N803


class _SearchLayer(_ArgminLayer):
    """A layer searching with a Gaussian from ``mu0``/``sigma0`` (NOVAS, DCEM)."""

    sigma0: float | Tensor
    options: dict[str, object]

    #: the search routine (:func:`novas` or :func:`dcem`), set by each concrete layer
    _search: Callable[..., SearchResult]

    def forward(
        self,
        x: Tensor,
        mu0: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        **overrides: object,
    ) -> Tensor:
        """The argmin for each element of the batch ``x``; ``overrides`` replace options."""
        opts = {**self.options, **overrides}
        res = self._search(
            self._bind(x), self._start(x, mu0), self.sigma0, generator=generator, noise=noise,
            **opts,
        )
        self.last_result = res
        return res.y


class NOVAS(_SearchLayer):
    """``y = argmin_y energy(x, y)`` by NOVAS (see :func:`novas` for the options).

    ``energy(x, Y)`` takes the layer input ``x`` (batch first) and candidates ``Y`` of shape
    ``(B, N, dim)`` and returns ``(B, N)``; if it is an ``nn.Module`` its parameters are
    this layer's parameters. Defaults are the public code's (mu0 0, sigma0 10, 100 samples,
    10 iterations, exponential shape, kappa 1, last iteration differentiated).

    Presets (``preset="paper"``, :data:`PRESETS`; explicit options win): ``paper`` = the
    public NOVAS regression script (iexarchos/NOVAS; REFERENCE.md section 5,
    docs/novas.md): ``mu0=0, sigma0=10, n_samples=100, n_iter=10, shape="soft_ce",
    alpha=1, sharpness=1000, var_floor=1e-3, differentiate="last"`` and its early stop at a
    mean step below 1e-4 as ``tol=1e-4, check_every=1``. Not the same: the public code
    stops the whole batch on the norm of the whole batch's step, here each element freezes
    on its own step (and the loop stops once all are frozen). ``elite_frac`` (the soft-CE
    quantile) is 0.1 in both (the public ``SPEN/adaptive_stochastic_search.py`` takes
    ``elite = int(0.1 * n_sample)``). The default is not
    this preset: ``tol`` with ``check_every=1`` is one host synchronisation per
    iteration, which a layer on a GPU should not pay unless asked, and the shape stays the
    public code's default (exponential, kappa 1); the rest of the defaults are the public
    regression setting's.

    ``fused`` (default None: where it can run): on a float32/float64 CPU search every
    iteration without a graph, and the differentiated last one, run as numba kernels
    (:mod:`ocnet.solvers.novas_fused`; equal to the tensor path to rounding, about 0.05 of
    the public code's time per update faster on its regression); ``False``: the tensor path.
    """

    _search = staticmethod(novas)

    @_takes_presets("NOVAS")
    def __init__(
        self,
        energy: ConditionalEnergy,
        dim: int,
        *,
        preset: str | None = None,
        mu0: float | Tensor = 0.0,
        sigma0: float | Tensor = 10.0,
        n_samples: int = 100,
        n_iter: int = 10,
        shape: str = "exponential",
        kappa: float = 1.0,
        alpha: float = 1.0,
        elite_frac: float = 0.1,
        sharpness: float = 1000.0,
        var_floor: float = 1e-3,
        tol: float | None = None,
        check_every: int = 0,
        differentiate: str = "last",
        fused: bool | None = None,
    ) -> None:
        super().__init__(energy, dim, mu0)
        if shape not in SHAPES:
            raise unknown_name("shape function", shape, SHAPES)
        if differentiate not in DIFFERENTIATE:
            raise unknown_name("differentiate option", differentiate, DIFFERENTIATE)
        self.sigma0 = sigma0
        self.options = dict(
            n_samples=n_samples, n_iter=n_iter, shape=shape, kappa=kappa, alpha=alpha,
            elite_frac=elite_frac, sharpness=sharpness, var_floor=var_floor, tol=tol,
            check_every=check_every, differentiate=differentiate, fused=fused,
        )
        self.preset = preset



class DCEM(_SearchLayer):
    """``y = argmin_y energy(x, y)`` by the differentiable cross-entropy method (:func:`dcem`).

    Presets (``preset="paper"``, :data:`PRESETS`; explicit options win): ``paper`` = the
    regression setting of the DCEM paper and its public code (Amos & Yarats, ICML 2020;
    facebookresearch/dcem; REFERENCE.md section 5): ``sigma0=7, n_samples=100,
    n_elite=10, n_iter=10, temperature=1, normalize=True`` (energies standardised over
    the samples). These are also the defaults. ``var_floor`` (1e-10, only to keep the
    square root differentiable) and ``mu0`` are ocnet's.
    """

    _search = staticmethod(dcem)

    @_takes_presets("DCEM")
    def __init__(
        self,
        energy: ConditionalEnergy,
        dim: int,
        *,
        preset: str | None = None,
        mu0: float | Tensor = 0.0,
        sigma0: float | Tensor = 7.0,
        n_samples: int = 100,
        n_elite: int = 10,
        n_iter: int = 10,
        temperature: float = 1.0,
        normalize: bool = True,
        var_floor: float = 1e-10,
        tol: float | None = None,
        check_every: int = 0,
    ) -> None:
        super().__init__(energy, dim, mu0)
        self.sigma0 = sigma0
        self.options = dict(
            n_samples=n_samples, n_elite=n_elite, n_iter=n_iter, temperature=temperature,
            normalize=normalize, var_floor=var_floor, tol=tol, check_every=check_every,
        )
        self.preset = preset


class UnrolledGD(_ArgminLayer):
    """``y`` = ``n_iter`` unrolled gradient steps on ``energy(x, .)`` from ``mu0`` (default 0)."""

    def __init__(
        self,
        energy: ConditionalEnergy,
        dim: int,
        *,
        mu0: float | Tensor = 0.0,
        n_iter: int = 10,
        lr: float = 0.1,
    ) -> None:
        super().__init__(energy, dim, mu0)
        self.options = dict(n_iter=n_iter, lr=lr)

    def forward(
        self,
        x: Tensor,
        mu0: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        **overrides: object,
    ) -> Tensor:
        """``generator`` and ``noise`` are accepted for a common interface and unused."""
        opts = {**self.options, **overrides}
        res = unrolled_gd(self._bind(x), self._start(x, mu0), **opts)
        self.last_result = res
        return res.y
