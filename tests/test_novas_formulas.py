"""NOVAS pinned to its update formulas (ocnet/solvers/novas.py, module docstring).

Every expected number below is computed from the formula itself, independently of the
implementation: literal numbers where the case is small enough to do by hand, otherwise
explicit Python loops over batch elements, samples and coordinates with ``math`` scalars.

    Ft_i  = (F_i - min_j F_j) / (max_j F_j - min_j F_j)
    S     = softmax(kappa * Ft)                                  (shape "exponential")
    S_i   = Ft_i * sigmoid(c (F_i - gamma)) / sum(...)            (shape "soft_ce"; gamma the
                                                                  k-th best F, k = elite_frac N)
    X_i   = mu + sigma * eps_i,  F = -E
    mu'   = mu + alpha * sum_i S_i (X_i - mu)
    sigma'= sqrt(sum_i S_i (X_i - mu')^2 + var_floor)
"""

from __future__ import annotations

import math

import pytest
import torch

from ocnet.solvers.novas import novas, novas_step, novas_weights

F64 = torch.float64


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), rtol=tol, atol=tol)


# ----------------------------------------------------------------- reference formulas (loops)
def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def ref_weights(F, shape, kappa=1.0, elite_frac=0.1, sharpness=1000.0):
    """The docstring's S for a list of rows of scores, by loops."""
    out = []
    for row in F:
        lo, hi = min(row), max(row)
        ft = [(f - lo) / (hi - lo) for f in row]
        if shape == "exponential":
            e = [math.exp(kappa * v) for v in ft]
        else:
            k = max(1, int(elite_frac * len(row)))
            gamma = sorted(row, reverse=True)[k - 1]  # the k-th best (largest) score
            e = [v * _sigmoid(sharpness * (f - gamma)) for v, f in zip(ft, row, strict=True)]
        total = sum(e)
        out.append([v / total for v in e])
    return out


def ref_step(energy_scalar, mu, sigma, eps, shape, kappa=1.0, alpha=1.0, elite_frac=0.1,
             sharpness=1000.0, var_floor=1e-3):
    """One update of the docstring by loops; ``energy_scalar(b, point)`` -> float."""
    mus, sigmas = [], []
    for b in range(len(mu)):
        d = len(mu[b])
        X = [[mu[b][j] + sigma[b][j] * e[j] for j in range(d)] for e in eps[b]]
        F = [-energy_scalar(b, x) for x in X]
        S = ref_weights([F], shape, kappa, elite_frac, sharpness)[0]
        m_new = [mu[b][j] + alpha * sum(s * (x[j] - mu[b][j]) for s, x in zip(S, X, strict=True))
                 for j in range(d)]
        s_new = [math.sqrt(sum(s * (x[j] - m_new[j]) ** 2 for s, x in zip(S, X, strict=True))
                           + var_floor) for j in range(d)]
        mus.append(m_new)
        sigmas.append(s_new)
    return mus, sigmas


CENTRES = [[1.0, -2.0], [-0.5, 0.25]]
SCALES = [[1.0, 3.0], [2.0, 0.5]]


def quad_scalar(b, x):
    """E_b(y) = sum_j s_bj (y_j - c_bj)^2 + 0.3 y_0 y_1 (anisotropic, coupled)."""
    c, s = CENTRES[b], SCALES[b]
    return sum(s[j] * (x[j] - c[j]) ** 2 for j in range(2)) + 0.3 * x[0] * x[1]


def quad(Y):
    c = torch.tensor(CENTRES, dtype=Y.dtype)[:, None, :]
    s = torch.tensor(SCALES, dtype=Y.dtype)[:, None, :]
    return (s * (Y - c) ** 2).sum(-1) + 0.3 * Y[..., 0] * Y[..., 1]


def _case(seed=3, N=8):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([[0.4, -0.3], [1.2, 0.7]], dtype=F64)
    sigma = torch.tensor([[0.8, 1.5], [0.6, 2.0]], dtype=F64)  # per-coordinate sigma
    eps = torch.randn(2, N, 2, generator=g, dtype=F64)
    return mu, sigma, eps


# ----------------------------------------------------------------- weights: literal numbers
def test_exponential_weights_two_samples_literal():
    # Ft = (0, 1) whatever the scores; kappa = ln 3 gives S = (1/4, 3/4).
    F = torch.tensor([[-4.0, 0.0], [7.0, 2.0]], dtype=F64)
    S = novas_weights(F, "exponential", kappa=math.log(3.0))
    close(S, [[0.25, 0.75], [0.75, 0.25]])


def test_exponential_weights_four_samples_literal():
    # F = (0, 1, 2, 4): Ft = (0, 1/4, 1/2, 1); kappa = 4 ln 2: exp(kappa Ft) = (1, 2, 4, 16).
    F = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=F64)
    S = novas_weights(F, "exponential", kappa=4 * math.log(2.0))
    close(S, [[1 / 23, 2 / 23, 4 / 23, 16 / 23]])


def test_exponential_weights_are_affine_invariant_in_the_scores():
    # the min-max normalisation: S(a F + b) = S(F) for a > 0
    F = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=F64)
    S = novas_weights(3.0 * F - 11.0, "exponential", kappa=4 * math.log(2.0))
    close(S, [[1 / 23, 2 / 23, 4 / 23, 16 / 23]])


def test_soft_ce_weights_hard_threshold_literal():
    # N = 4, elite_frac 0.5: k = 2, gamma = 2 (the 2nd best). Ft = (0, 1/4, 1/2, 1); at
    # sharpness 1000 sigmoid(c (F - gamma)) = (0, 0, 1/2, 1): S ~ (0, 0, 1/4, 1) = (0, 0, .2, .8)
    F = torch.tensor([[0.0, 1.0, 2.0, 4.0], [4.0, 2.0, 1.0, 0.0]], dtype=F64)
    S = novas_weights(F, "soft_ce", elite_frac=0.5)
    close(S, [[0.0, 0.0, 0.2, 0.8], [0.8, 0.2, 0.0, 0.0]])


def test_soft_ce_weights_finite_sharpness_literal():
    # sharpness ln 3: sigmoid(ln3 * (F - 2)) = (1/10, 1/4, 1/2, 9/10) for F = (0, 1, 2, 4);
    # S ~ Ft * that = (0, 1/16, 1/4, 9/10), total 97/80
    F = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=F64)
    S = novas_weights(F, "soft_ce", elite_frac=0.5, sharpness=math.log(3.0))
    close(S, [[0.0, (1 / 16) / (97 / 80), (1 / 4) / (97 / 80), (9 / 10) / (97 / 80)]])


def test_soft_ce_elite_count_truncates_and_is_at_least_one():
    F = torch.tensor([[0.0, 1.0, 2.0, 4.0, 3.0, 5.0, 6.0, 9.0, 7.0, 8.0]], dtype=F64)
    # elite_frac 0.35 of 10: k = int(3.5) = 3, gamma = 7: elites 9, 8 (and 7 at one half)
    S = novas_weights(F, "soft_ce", elite_frac=0.35)
    w = [0.0] * 10
    w[7], w[9], w[8] = 9 / 9, 8 / 9, 0.5 * 7 / 9
    total = sum(w)
    close(S, [[v / total for v in w]])
    # elite_frac 0.01 of 10: k = max(1, 0) = 1, gamma = 9: only the best, at one half -> 1
    S = novas_weights(F, "soft_ce", elite_frac=0.01)
    close(S, [[1.0 if i == 7 else 0.0 for i in range(10)]])


# ----------------------------------------------------------------- weights: loops, random F
@pytest.mark.parametrize(
    "shape, opts",
    [
        ("exponential", dict(kappa=2.7)),
        ("exponential", dict(kappa=0.4)),
        ("soft_ce", dict(elite_frac=0.3, sharpness=1.7)),
        ("soft_ce", dict(elite_frac=0.25, sharpness=1000.0)),
    ],
)
def test_weights_match_the_formula_by_loops(shape, opts):
    g = torch.Generator().manual_seed(7)
    F = 3.0 * torch.randn(3, 12, generator=g, dtype=F64) + 1.0
    S = novas_weights(F, shape, **opts)
    close(S, ref_weights(F.tolist(), shape, **opts))
    close(S.sum(1), [1.0, 1.0, 1.0])


# ----------------------------------------------------------------- the step: literal numbers
def _one_d(y):
    return ((y - 1.0) ** 2).sum(-1)  # E(y) = (y - 1)^2


@pytest.mark.parametrize("alpha, mu1, var", [(1.0, 0.5, 0.75), (0.5, 0.25, 0.8125)])
def test_step_two_samples_literal(alpha, mu1, var):
    # mu 0, sigma 2, eps (-1/2, 1/2): X = (-1, 1), E = (4, 0), Ft = (0, 1), kappa ln 3:
    # S = (1/4, 3/4); mu' = alpha (1/4 (-1) + 3/4 (1)) = alpha / 2;
    # var = 1/4 (-1 - mu')^2 + 3/4 (1 - mu')^2  (about the NEW mean); sigma' = sqrt(var + 0.01)
    mu = torch.zeros(1, 1, dtype=F64)
    sigma = torch.full((1, 1), 2.0, dtype=F64)
    eps = torch.tensor([[[-0.5], [0.5]]], dtype=F64)
    m, s = novas_step(_one_d, mu, sigma, eps, kappa=math.log(3.0), alpha=alpha, var_floor=0.01)
    close(m, [[mu1]])
    assert var == pytest.approx(0.25 * (-1 - mu1) ** 2 + 0.75 * (1 - mu1) ** 2)
    close(s, [[math.sqrt(var + 0.01)]])


def test_step_soft_ce_literal():
    # mu 1, sigma 1, eps (-2, -1, 0, 2): X = (-1, 0, 1, 3); E(y) = -y, so F = X and
    # Ft = (0, 1/4, 1/2, 1); elite_frac 0.5: k = 2, gamma = 1 (the 2nd best); hard
    # threshold: S ~ (0, 0, 1/2 * 1/2, 1) = (0, 0, .2, .8)
    # mu' = 1 + .2 (1 - 1) + .8 (3 - 1) = 2.6; var = .2 (1 - 2.6)^2 + .8 (3 - 2.6)^2 = 0.64
    mu = torch.ones(1, 1, dtype=F64)
    sigma = torch.ones(1, 1, dtype=F64)
    eps = torch.tensor([[[-2.0], [-1.0], [0.0], [2.0]]], dtype=F64)
    m, s = novas_step(lambda Y: -Y.sum(-1), mu, sigma, eps, shape="soft_ce", elite_frac=0.5,
                      var_floor=0.36)
    close(m, [[2.6]])
    close(s, [[1.0]])  # sqrt(0.64 + 0.36)


# ----------------------------------------------------------------- the step: loops
@pytest.mark.parametrize(
    "shape, opts",
    [
        ("exponential", dict(kappa=1.0)),
        ("exponential", dict(kappa=3.5, alpha=0.6, var_floor=0.05)),
        ("soft_ce", dict(elite_frac=0.25)),
        ("soft_ce", dict(elite_frac=0.375, sharpness=0.8, alpha=1.3, var_floor=0.2)),
    ],
)
def test_step_matches_the_formula_by_loops(shape, opts):
    mu, sigma, eps = _case()
    m, s = novas_step(quad, mu, sigma, eps, shape=shape, **opts)
    em, es = ref_step(quad_scalar, mu.tolist(), sigma.tolist(), eps.tolist(), shape, **opts)
    close(m, em)
    close(s, es)


@pytest.mark.parametrize("differentiate", ["last", "all"])
@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
def test_search_is_the_composition_of_steps_on_the_fixed_noise(shape, differentiate):
    # novas(): sigma0 broadcast to (B, d), step k uses noise[k], the output is the last mean
    n_iter, N = 3, 8
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(n_iter, 2, N, 2, generator=g, dtype=F64)
    mu0 = torch.tensor([[0.4, -0.3], [1.2, 0.7]], dtype=F64)
    opts = dict(kappa=2.0, alpha=0.8, elite_frac=0.25, var_floor=0.01)
    res = novas(quad, mu0, 1.5, n_iter=n_iter, shape=shape, differentiate=differentiate,
                noise=noise, **opts)
    mu, sigma = mu0.tolist(), [[1.5, 1.5], [1.5, 1.5]]
    for k in range(n_iter):
        mu, sigma = ref_step(quad_scalar, mu, sigma, noise[k].tolist(), shape, **opts)
    close(res.y, mu)
    close(res.sigma, sigma)
    assert res.iterations.tolist() == [n_iter, n_iter]
