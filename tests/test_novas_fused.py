"""The fused CPU kernels of NOVAS (ocnet.solvers.novas_fused) against the tensor path.

The tensor path is pinned to the formulas by tests/test_novas_formulas.py; here every
output of the fused path (mean, spread, per-element counts, frozen flags, the gradient
with respect to the energy's parameters, through the mean and through the spread) must
agree with it in float64 to rounding, on cases where each piece matters: both shapes,
d = 1 and 3, elements freezing at different iterations, energies with ties at the
soft-CE threshold, a loop stopped early by the check.
"""

from __future__ import annotations

import pytest
import torch
from test_novas import EnergyNet, double_well

from ocnet.ocp.errors import ConfigError
from ocnet.solvers import novas_fused
from ocnet.solvers.novas import NOVAS, _Consts, _step, novas

pytest.importorskip("numba")

F64 = torch.float64


def _both(fn):
    return fn(False), fn(True)


@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("check_every", [0, 1])
def test_free_iterations_agree_with_the_tensor_path(shape, d, check_every):
    mu0 = torch.tensor([[0.9], [1.6], [-0.3], [3.0]], dtype=F64).repeat(1, d)
    noise = torch.randn(40, 4, 30, d, dtype=F64, generator=torch.Generator().manual_seed(3))
    opts = dict(sigma0=0.5, kappa=5.0, var_floor=1e-12, tol=1e-4, shape=shape,
                elite_frac=0.3, n_iter=40, noise=noise, check_every=check_every)
    with torch.no_grad():
        ref, res = _both(lambda f: novas(double_well, mu0, fused=f, **opts))
    assert len(set(ref.iterations.tolist())) > 1  # the elements freeze at different times
    torch.testing.assert_close(res.y, ref.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.sigma, ref.sigma, rtol=1e-12, atol=1e-12)
    assert res.iterations.tolist() == ref.iterations.tolist()
    assert res.converged.tolist() == ref.converged.tolist()


def test_the_check_stops_the_fused_loop_where_the_tensor_loop_stops():
    calls = {False: 0, True: 0}

    def run(fused):
        def energy(Y):  # noqa: N803
            calls[fused] += 1
            return double_well(Y)

        g = torch.Generator().manual_seed(0)
        return novas(energy, torch.tensor([[1.0], [-1.0]], dtype=F64), 0.3, n_iter=500,
                     kappa=5.0, var_floor=1e-12, tol=1e-6, check_every=5, generator=g,
                     fused=fused)

    ref, res = _both(run)
    assert calls[True] == calls[False] < 500 and calls[True] % 5 == 1
    torch.testing.assert_close(res.y, ref.y, rtol=1e-12, atol=1e-12)
    assert res.converged.tolist() == ref.converged.tolist() == [True, True]


@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
@pytest.mark.parametrize("tol", [None, 1e-3])
def test_layer_output_and_parameter_gradient_agree(shape, tol):
    """Through the fused read-out iteration (its backward is a hand-written kernel): the
    gradient of a loss on the mean and on the spread."""
    torch.manual_seed(0)
    net = EnergyNet(dx=2, dy=1).to(F64)
    x = torch.randn(6, 2, dtype=F64)

    def run(fused):
        # alpha != 1: the spread's gradient then also reaches the mean (sum S (X - mu') != 0)
        layer = NOVAS(net, 1, shape=shape, kappa=3.0, alpha=0.7, tol=tol, check_every=1,
                      fused=fused, sigma0=2.0, n_iter=6)
        y = layer(x, generator=torch.Generator().manual_seed(5))
        res = layer.last_result
        loss = (y - x[:, :1]).pow(2).sum() + res.sigma.pow(2).sum()
        net.zero_grad()
        loss.backward()
        return y.detach(), res.sigma.detach(), [p.grad.clone() for p in net.parameters()]

    (y0, s0, g0), (y1, s1, g1) = _both(run)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert any(float(g.abs().max()) > 1e-6 for g in g0)


@pytest.mark.parametrize("seed", range(20))
def test_soft_ce_threshold_with_ties(seed):
    """Energies rounded to one decimal tie at the k-th value; the kernel's selection (a
    quickselect) must give the same threshold as kthvalue, for every k."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (), generator=g))
    k = int(torch.randint(1, n + 1, (), generator=g))
    E = torch.randn(3, n, dtype=F64, generator=g).round(decimals=1)  # noqa: N806
    dX = torch.randn(3, n, 2, dtype=F64, generator=g)  # noqa: N806
    mu = torch.randn(3, 1, 2, dtype=F64, generator=g)
    got = novas_fused.step(E, dX, mu, soft_ce=True, k=k, kappa=1.0, alpha=0.7,
                           sharpness=1000.0, var_floor=1e-3)
    c = _Consts(mu[:, 0], n, "soft_ce", 1.0, 0.7, k / n + 1e-9, 1000.0, 1e-3)
    assert c.k == k
    want = _step(lambda X: E, mu, torch.ones_like(mu), dX, c)  # noqa: N803
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], (want[0] - mu).norm(dim=(1, 2)), rtol=1e-12,
                               atol=1e-12)


def test_the_default_takes_the_kernel_on_cpu_and_can_be_turned_off(monkeypatch):
    calls = []
    for name in ("forward", "backward", "sampler"):
        kernel = novas_fused._get(name)
        monkeypatch.setitem(novas_fused._kernels, name,
                            lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    mu0 = torch.zeros(2, 1)
    novas(double_well, mu0, n_iter=3)
    assert calls.count("forward") == 3 and "backward" not in calls  # no graph to go back
    calls.clear()
    novas(double_well, mu0, n_iter=3, fused=False)
    assert calls == []


def test_fused_true_where_it_cannot_run_says_why():
    with pytest.raises(ConfigError, match="float32 or float64 CPU search"):
        novas(double_well, torch.zeros(2, 1, dtype=torch.bfloat16), n_iter=2, fused=True)


def test_host_view_is_a_view_of_cpu_tensors_only():
    from ocnet.bridge import host_view

    t = torch.zeros(3)
    host_view(t)[1] = 2.0  # writes through: the kernels' outputs are the tensors
    assert t.tolist() == [0.0, 2.0, 0.0]
    with pytest.raises(ConfigError, match="CPU tensors"):
        host_view(torch.empty(2, device="meta"))
