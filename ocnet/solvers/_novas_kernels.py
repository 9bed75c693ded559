# ruff: noqa: ANN001, ANN202, N803, N806  (numba kernels: the types come from the call)
"""The numba kernels of :mod:`ocnet.solvers.novas_fused` (formulas in its docstring).

Module-level functions so that numba's on-disk cache (``cache=True``) finds them; this
module imports numba, so it is imported at the first fused step, not with ocnet.
"""

from __future__ import annotations

import math

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True)


@jit
def sigmoid(z):  # no overflow for either sign of z
    if z >= 0:
        # beyond 37, 1 + exp(-z) rounds to 1 in float64: the exact value, no exp
        return 1.0 if z > 37.0 else 1.0 / (1.0 + math.exp(-z))
    # below -746, exp(z) underflows to 0 in float64: the exact value, no exp (with the
    # soft-CE sharpness 1000 most samples are here, beyond 0.75 above the threshold)
    if z < -746.0:
        return 0.0
    ez = math.exp(z)
    return ez / (1.0 + ez)


@jit
def kth_smallest(buf, k):
    """The k-th smallest (1-based) of ``buf``, reordering it (quickselect, no allocation)."""
    lo, hi, target = 0, buf.shape[0] - 1, k - 1
    while lo < hi:
        pivot = buf[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return buf[target]


@jit
def weights(e, soft_ce, k, kappa, sharpness, tiny, S, buf):
    """Fill ``S`` with one element's normalised weights from its energies ``e``; return
    (hi, lo, gamma, index of hi, of lo, of gamma, unnormalised total, span)."""
    n = e.shape[0]
    hi, lo, a_hi, a_lo = -np.inf, np.inf, 0, 0
    for i in range(n):
        if e[i] > hi:
            hi, a_hi = e[i], i
        if e[i] < lo:
            lo, a_lo = e[i], i
    total, gamma, a_gamma, span = 0.0, 0.0, 0, 1.0
    if soft_ce:
        for i in range(n):
            buf[i] = e[i]
        gamma = kth_smallest(buf, k)
        for i in range(n):
            if e[i] == gamma:
                a_gamma = i
                break
        for i in range(n):
            S[i] = (hi - e[i]) * sigmoid(sharpness * (gamma - e[i]))
            total += S[i]
    else:
        span = max(hi - lo, tiny)
        top = -np.inf
        for i in range(n):
            S[i] = kappa * ((hi - e[i]) / span)
            top = max(top, S[i])
        for i in range(n):
            S[i] = math.exp(S[i] - top)
            total += S[i]
    total = max(total, tiny)
    for i in range(n):
        S[i] /= total
    return hi, lo, gamma, a_hi, a_lo, a_gamma, total, span


@jit
def forward(E, dX, mu, sigma, soft_ce, k, kappa, alpha, sharpness, var_floor, tiny,
            tol, active, count, mu_out, sigma_out, moved):
    """One iteration for every element; an element not ``active`` keeps its old
    ``(mu, sigma)``; an active one counts the update and stays active while it moves
    by at least ``tol``. Returns the number still active."""
    B, N, d = dX.shape
    n_active = 0
    S, buf = np.empty(N), np.empty(N)
    for b in range(B):
        weights(E[b], soft_ce, k, kappa, sharpness, tiny, S, buf)
        sq = 0.0
        for j in range(d):
            m = 0.0
            for i in range(N):
                m += S[i] * dX[b, i, j]
            mu_out[b, 0, j] = mu[b, 0, j] + alpha * m
            m = mu_out[b, 0, j]
            v = 0.0
            for i in range(N):
                r = mu[b, 0, j] + dX[b, i, j] - m
                v += S[i] * r * r
            sigma_out[b, 0, j] = math.sqrt(v + var_floor)
            step_j = m - mu[b, 0, j]
            sq += step_j * step_j
        moved[b] = math.sqrt(sq)
        if active[b]:
            count[b] += 1
            if moved[b] < tol:
                active[b] = False
            else:
                n_active += 1
        else:
            for j in range(d):
                mu_out[b, 0, j] = mu[b, 0, j]
                sigma_out[b, 0, j] = sigma[b, 0, j]
    return n_active


@jit
def backward(E, dX, mu, mu_out, sigma_out, g_mu, g_sigma, soft_ce, k, kappa,
             alpha, sharpness, tiny, g_E):
    """dL/dE from dL/dmu' and dL/dsigma' (module doc, "Backward")."""
    B, N, d = dX.shape
    S, buf, u = np.empty(N), np.empty(N), np.empty(N)
    for b in range(B):
        e = E[b]
        hi, lo, gamma, a_hi, a_lo, a_gamma, total, span = weights(
            e, soft_ce, k, kappa, sharpness, tiny, S, buf)
        for i in range(N):
            u[i] = 0.0
        for j in range(d):
            m, sd = mu_out[b, 0, j], sigma_out[b, 0, j]
            h = g_sigma[b, 0, j] / (2.0 * sd)  # dL/dV_j, V_j = sum_i S_i r_ij^2
            sr = 0.0
            for i in range(N):
                r = mu[b, 0, j] + dX[b, i, j] - m
                u[i] += h * r * r
                sr += S[i] * r
            g = g_mu[b, 0, j] - 2.0 * h * sr  # dL/dmu'_j through both outputs
            for i in range(N):
                u[i] += alpha * g * dX[b, i, j]
        su = 0.0  # u is dL/dS; the normalisation's Jacobian
        for i in range(N):
            su += S[i] * u[i]
        if soft_ce:  # v = dL/dw, w_i = (hi - E_i) s_i, s_i = sigmoid(c (gamma - E_i))
            t_hi, t_gamma = 0.0, 0.0
            for i in range(N):
                v = (u[i] - su) / total
                s = sigmoid(sharpness * (gamma - e[i]))
                ds = sharpness * (hi - e[i]) * s * (1.0 - s)
                g_E[b, i] = -v * (s + ds)
                t_hi += v * s
                t_gamma += v * ds
            g_E[b, a_hi] += t_hi
            g_E[b, a_gamma] += t_gamma
        else:  # zeta = dL/dz, z_i = kappa (hi - E_i) / span
            t_hi, t_lo = 0.0, 0.0
            for i in range(N):
                zeta = S[i] * (u[i] - su)
                g_E[b, i] = -kappa / span * zeta
                t_hi += zeta * kappa / span
                if hi - lo > tiny:  # the span is not clamped: it depends on hi, lo
                    f = zeta * kappa * (hi - e[i]) / (span * span)
                    t_hi -= f
                    t_lo += f
            g_E[b, a_hi] += t_hi
            g_E[b, a_lo] += t_lo


@jit
def sampler(mu, sigma, eps, X, dX):
    B, N, d = eps.shape
    for b in range(B):
        for i in range(N):
            for j in range(d):
                v = sigma[b, 0, j] * eps[b, i, j]
                dX[b, i, j] = v
                X[b, i, j] = mu[b, 0, j] + v
