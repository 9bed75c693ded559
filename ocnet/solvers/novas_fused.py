r"""NOVAS iterations in CPU kernels (numba): the search's free iterations and the
differentiated read-out, each as two calls instead of about 20 tensor operations.

Given the energies ``E (B, N)`` of the samples ``X = mu + dX`` (``dX = sigma * eps``,
``(B, N, d)``) and the mean ``mu (B, 1, d)``, the update kernel computes per batch element,
in one pass over its ``N`` samples, what :func:`ocnet.solvers.novas._step` computes::

    soft_ce:      w_i = (max_j E_j - E_i) s_i,  s_i = sigmoid(c (gamma - E_i)),
                  gamma = k-th smallest E (quickselect)
    exponential:  w_i = exp(z_i - max z),  z_i = kappa (max E - E_i) / (max E - min E)
    S_i           = w_i / max(sum_j w_j, tiny)
    mu'           = mu + alpha sum_i S_i dX_i
    sigma'        = sqrt(sum_i S_i (mu + dX_i - mu')^2 + var_floor)
    moved         = ||mu' - mu||_2

and, in the free iterations, freezes an element once ``moved < tol`` (it keeps its
``(mu, sigma)`` from then on and stops counting updates), as the tensor path's masks do.
A sampling kernel makes ``X`` and ``dX`` from the draws in one pass.

Backward (the read-out iteration of ``differentiate="last"``, where only ``E`` carries a
graph): with ``g = dL/dmu'`` and ``h = dL/dsigma'``, ``V_j = sigma'_j^2 - var_floor`` and
``r_ij = mu_j + dX_ij - mu'_j``::

    dL/dV_j  = h_j / (2 sigma'_j)
    g~_j     = g_j - 2 dL/dV_j sum_i S_i r_ij            (sigma' depends on mu' too)
    u_i      = dL/dS_i = alpha g~ . dX_i + sum_j dL/dV_j r_ij^2
    soft_ce: v_i = (u_i - S . u) / sum w,   ds_i = c (max E - E_i) s_i (1 - s_i)
             dL/dE_i = -v_i (s_i + ds_i),  plus sum_i v_i s_i at argmax E and
             sum_i v_i ds_i at the k-th smallest (kthvalue's index)
    exponential: zeta_i = S_i (u_i - S . u),   span = max E - min E
             dL/dE_i = -kappa zeta_i / span,  plus sum_i zeta_i kappa (1/span - (max E -
             E_i)/span^2) at argmax E and sum_i zeta_i kappa (max E - E_i)/span^2 at argmin
             E (no span terms where the span is floored at tiny)

Ties at the max, min or k-th value send their share to one index (torch's ``amax`` would
split it evenly); random samples do not tie.

Why kernels: with the public regression's sizes (10 x 100 samples, d = 1) each tensor
operation costs its dispatch, and it runs right after the energy network has evicted the
caches, where each costs 5-8 times its warm time (docs/novas.md, "Speed"). The formulas
are the same, accumulated in float64, so the results agree with the tensor path to the
rounding of the search's dtype (tests/test_novas_fused.py: 1e-12 in float64), not bit for
bit; two rounding shortcuts are exact in float64 (``sigmoid(z) = 1`` for ``z > 37``, ``0``
for ``z < -746``). Only for float32/float64 CPU tensors: CUDA searches and
``differentiate="all"`` with a graph stay on the tensor path. numba compiles the kernels
at their first call (about 10 s) and caches them on disk (later processes: about 1 s).
"""

# ruff: noqa: ANN001, ANN205, N803, N806  (autograd.Function signatures; tensor names)
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..bridge.placement import host_view

#: numba is a dependency; without it the search uses the tensor path. Imported at the
#: first fused step, not with ocnet (it costs about half a second).
AVAILABLE = importlib.util.find_spec("numba") is not None

__all__ = ["AVAILABLE", "free_iterations", "sample", "step", "usable"]

_kernels: dict[str, object] = {}


def usable(like: Tensor) -> bool:
    """Whether the fused step can run on searches like ``like``: numba present, a CPU
    tensor of float32 or float64."""
    return AVAILABLE and like.device.type == "cpu" and like.dtype in (torch.float32,
                                                                      torch.float64)


def _get(name: str):
    if not _kernels:
        from . import _novas_kernels

        _kernels.update(forward=_novas_kernels.forward, backward=_novas_kernels.backward,
                        sampler=_novas_kernels.sampler)
    return _kernels[name]


def sample(mu: Tensor, sigma: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``(X, dX) = (mu + sigma * eps, sigma * eps)`` in one pass (the rounding of the
    tensor path: one product and one sum in the inputs' dtype)."""
    X = torch.empty(eps.shape, dtype=mu.dtype)
    dX = torch.empty_like(X)
    _get("sampler")(host_view(mu), host_view(sigma), host_view(eps), host_view(X), host_view(dX))
    return X, dX


def free_iterations(evaluate: Callable[[Tensor], Tensor], draw: Callable[[int], Tensor],
                    mu: Tensor, sigma: Tensor, n_iter: int, *, soft_ce: bool, k: int,
                    kappa: float, alpha: float, sharpness: float, var_floor: float,
                    tol: float | None, check_every: int
                    ) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
    """The search's iterations without a graph, each one sampling kernel, the energies
    ``evaluate(X)`` and one update kernel that also freezes the elements moving less than
    ``tol`` (2-norm of the mean's step; None: never) and every ``check_every`` iterations
    stops once all are frozen (on the CPU a plain read, no synchronisation). Returns
    ``(mu, sigma, iterations run, active (B,) bool, updates per element (B,) long)``."""
    B = mu.shape[0]
    active = torch.ones(B, dtype=torch.bool)
    count = torch.zeros(B, dtype=torch.long)
    # tol as the kernel's comparison in the search's dtype sees it (rounded to that dtype)
    limit = -math.inf if tol is None else float(np.asarray(tol, dtype=host_view(mu).dtype))
    tiny = float(torch.finfo(mu.dtype).tiny)
    # the state lives in numpy views of CPU buffers, swapped between iterations: no tensor
    # is made per iteration but the samples handed to the energy
    act, cnt = host_view(active), host_view(count)
    m, s = host_view(mu).copy(), host_view(sigma).copy()
    m_next, s_next = np.empty_like(m), np.empty_like(s)
    moved = np.empty(B, dtype=m.dtype)
    forward, sampler = _get("forward"), _get("sampler")
    it = 0
    while it < n_iter:
        eps = host_view(draw(it))
        X = torch.empty(eps.shape, dtype=mu.dtype)  # noqa: N806  (fresh: the energy may keep it)
        dX = np.empty_like(eps)  # noqa: N806
        sampler(m, s, eps, host_view(X), dX)
        n_active = forward(host_view(evaluate(X)), dX, m, s, soft_ce, k, float(kappa),
                           float(alpha), float(sharpness), float(var_floor), tiny, limit,
                           act, cnt, m_next, s_next, moved)
        m, m_next, s, s_next = m_next, m, s_next, s
        it += 1
        if tol is not None and check_every and it % check_every == 0 and n_active == 0:
            break
    return torch.from_numpy(m), torch.from_numpy(s), it, active, count


def step(E: Tensor, dX: Tensor, mu: Tensor, *, soft_ce: bool, k: int,
         kappa: float, alpha: float, sharpness: float, var_floor: float
         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(mu', sigma', moved)`` of one NOVAS iteration (module doc) for every element from
    the energies ``E (B, N)``, the steps ``dX (B, N, d)`` and the mean ``mu (B, 1, d)``; CPU
    tensors of one dtype (see :func:`usable`), ``mu`` and ``dX`` without a graph. ``mu'``
    and ``sigma'`` have ``mu``'s shape, ``moved`` (the 2-norm of the mean's step) is
    ``(B,)``. If ``E`` requires grad, so do ``mu'`` and ``sigma'`` (the backward is one
    kernel too)."""
    opts = (soft_ce, k, float(kappa), float(alpha), float(sharpness))
    if E.requires_grad:
        return _Step.apply(E, dX, mu, opts, float(var_floor))
    return _forward(E, dX, mu, opts, float(var_floor))


def _forward(E: Tensor, dX: Tensor, mu: Tensor, opts: tuple,
             var_floor: float) -> tuple[Tensor, Tensor, Tensor]:
    soft_ce, k, kappa, alpha, sharpness = opts
    B = mu.shape[0]
    mu_out = torch.empty(mu.shape, dtype=mu.dtype)
    sigma_out = torch.empty_like(mu_out)
    moved = torch.empty(B, dtype=mu.dtype)
    active = np.ones(B, dtype=np.bool_)
    # all elements active: the spread's slot (kept by frozen elements only) is never read
    _get("forward")(host_view(E), host_view(dX), host_view(mu), host_view(mu), soft_ce, k,
                    kappa, alpha, sharpness,
                    var_floor, float(torch.finfo(mu.dtype).tiny), -math.inf, active,
                    np.zeros(B, dtype=np.int64), host_view(mu_out), host_view(sigma_out),
                    host_view(moved))
    return mu_out, sigma_out, moved


class _Step(torch.autograd.Function):
    """The fused iteration with the energies differentiable (``mu``, ``dX`` held fixed: the
    read-out iteration of ``differentiate="last"``)."""

    @staticmethod
    def forward(ctx, E, dX, mu, opts, var_floor):
        mu_out, sigma_out, moved = _forward(E, dX, mu, opts, var_floor)
        ctx.opts = opts
        ctx.save_for_backward(E, dX, mu, mu_out, sigma_out)
        ctx.mark_non_differentiable(moved)
        return mu_out, sigma_out, moved

    @staticmethod
    def backward(ctx, g_mu, g_sigma, _g_moved):
        E, dX, mu, mu_out, sigma_out = ctx.saved_tensors
        soft_ce, k, kappa, alpha, sharpness = ctx.opts
        g_E = torch.empty(E.shape, dtype=E.dtype)
        zero = torch.zeros(mu_out.shape, dtype=mu_out.dtype)
        _get("backward")(host_view(E), host_view(dX), host_view(mu), host_view(mu_out),
                         host_view(sigma_out),
                         host_view(zero if g_mu is None else g_mu),
                         host_view(zero if g_sigma is None else g_sigma), soft_ce, k, kappa, alpha,
                         sharpness, float(torch.finfo(E.dtype).tiny), host_view(g_E))
        return g_E, None, None, None, None
