"""NOVAS, DCEM and unrolled GD as argmin layers: global search, gradients, memory, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from devices import DEVICES, no_host_sync
from torch import nn

from ocnet.ocp.errors import ConfigError, ShapeError
from ocnet.solvers.novas import (
    DCEM,
    NOVAS,
    UnrolledGD,
    bisections,
    dcem,
    lml,
    novas,
    novas_step,
    unrolled_gd,
)

F64 = torch.float64


def rastrigin(Y):
    return 20 + (Y**2 - 10 * torch.cos(2 * math.pi * Y)).sum(-1)


def double_well(Y):
    return ((Y**2 - 1) ** 2 + 0.3 * Y).sum(-1)


def double_well_min() -> float:
    """The global minimiser, from the real roots of E'(y) = 4y^3 - 4y + 0.3 (numpy)."""
    r = np.roots([4.0, 0.0, -4.0, 0.3])
    r = r[np.isreal(r)].real
    return float(r[np.argmin((r**2 - 1) ** 2 + 0.3 * r)])


def gradient_descent(E, y0, lr, n):
    y = y0.clone()
    for _ in range(n):
        y = y.requires_grad_(True)
        (g,) = torch.autograd.grad(E(y[:, None]).sum(), y)
        y = (y - lr * g).detach()
    return y


@pytest.mark.parametrize(
    "name, energy, mu0, sigma0, lr",
    [
        ("rastrigin", rastrigin, [2.5, -3.3], 5.0, 1e-3),
        ("double_well", double_well, [1.5], 2.0, 1e-2),
    ],
)
def test_global_minimum_where_gradient_descent_fails(name, energy, mu0, sigma0, lr):
    star = torch.zeros(2, dtype=F64) if name == "rastrigin" else torch.tensor([double_well_min()])
    mu0 = torch.tensor([mu0], dtype=F64)
    y_gd = gradient_descent(energy, mu0, lr, 3000)
    assert (y_gd[0] - star).norm() > 0.5, "gradient descent should land in a wrong basin"
    seeds = range(20)
    hits = 0
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        res = novas(
            energy, mu0, sigma0, n_samples=100, n_iter=200, kappa=5.0, var_floor=1e-14,
            generator=g,
        )
        hits += int((res.y[0] - star).norm() < 1e-3)
    assert hits >= 18, f"NOVAS found the global minimum of {name} in only {hits}/20 seeds"


class EnergyNet(nn.Module):
    """E(x, y) = net(concat(x, y)), non-convex in y."""

    def __init__(self, dx=2, dy=2, width=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dx + dy, width), nn.Softplus(), nn.Linear(width, width), nn.Softplus(),
            nn.Linear(width, 1),
        )

    def forward(self, x, Y):
        xs = x[:, None, :].expand(-1, Y.shape[1], -1)
        return self.net(torch.cat([xs, Y], dim=-1)).squeeze(-1) + 0.1 * (Y**2).sum(-1)


def _directional_fd(fn, params, direction, h):
    with torch.no_grad():
        for p, v in zip(params, direction, strict=True):
            p.add_(h * v)
        plus = fn()
        for p, v in zip(params, direction, strict=True):
            p.sub_(2 * h * v)
        minus = fn()
        for p, v in zip(params, direction, strict=True):
            p.add_(h * v)
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
@pytest.mark.parametrize("differentiate", ["all", "last"])
def test_gradient_matches_central_differences_with_fixed_noise(shape, differentiate):
    torch.manual_seed(0)
    net = EnergyNet().to(F64)
    B, N, n_iter, d = 3, 50, 6, 2
    x = torch.randn(B, 2, dtype=F64)
    mu0 = torch.zeros(B, d, dtype=F64)
    noise = torch.randn(n_iter, B, N, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, d, dtype=F64)
    opts = dict(n_iter=n_iter, shape=shape, kappa=3.0, sigma0=2.0)

    def energy(Y):
        return net(x, Y)

    if differentiate == "all":
        def output():
            return novas(energy, mu0, noise=noise, differentiate="all", **opts).y
    else:
        # last-iteration differentiation: the derivative of one update from the reached
        # (mu, sigma), which are held fixed (they carry no graph)
        with torch.no_grad():
            start = novas(energy, mu0, noise=noise, differentiate="all", **{**opts, "n_iter": 5})

        def output():
            return novas_step(
                energy, start.y, start.sigma, noise[5], shape=shape, kappa=3.0
            )[0]

        y_layer = novas(energy, mu0, noise=noise, differentiate="last", **opts).y
        torch.testing.assert_close(y_layer, output(), rtol=0, atol=1e-12)

    params = list(net.parameters())
    loss = (w * novas(energy, mu0, noise=noise, differentiate=differentiate, **opts).y).sum()
    grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = [torch.randn(p.shape, dtype=F64, generator=gen) for p in params]
        exact = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
        fd = _directional_fd(lambda: (w * output()).sum(), params, v, 1e-6)
        assert abs(exact) > 1e-6
        assert abs(float(exact - fd)) <= 1e-5 * abs(float(fd)), (float(exact), float(fd))


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (deduplicated)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_last_iteration_memory_does_not_grow_with_iterations():
    torch.manual_seed(0)
    net = EnergyNet().to(F64)
    x = torch.randn(8, 2, dtype=F64)
    mu0 = torch.zeros(8, 2, dtype=F64)

    def run(n_iter, differentiate):
        g = torch.Generator().manual_seed(0)
        return _saved_bytes(
            lambda: novas(lambda Y: net(x, Y), mu0, n_iter=n_iter, generator=g,
                          differentiate=differentiate).y
        )[0]

    last10, last100 = run(10, "last"), run(100, "last")
    all10, all100 = run(10, "all"), run(100, "all")
    assert last10 > 0 and last10 == last100
    assert all100 > 5 * all10  # the contrast: the full graph grows with the iterations


def test_shape_errors_name_the_cause():
    mu0 = torch.zeros(4, 2)
    with pytest.raises(ShapeError, match="batch size 4"):
        novas(lambda Y: rastrigin(Y).mean(0, keepdim=True), mu0, n_iter=2)
    with pytest.raises(ShapeError, match="one value per candidate"):
        novas(lambda Y: Y**2, mu0, n_iter=2)
    with pytest.raises(ShapeError, match="single number"):
        dcem(lambda Y: rastrigin(Y).sum(), mu0, n_iter=2)
    with pytest.raises(ShapeError, match="batch size 4"):
        unrolled_gd(lambda Y: rastrigin(Y)[:1], mu0, n_iter=2)
    with pytest.raises(ShapeError, match=r"\(batch, dim\)"):
        novas(rastrigin, torch.zeros(2), n_iter=2)
    with pytest.raises(ShapeError, match="fixed noise"):
        novas(rastrigin, mu0, n_iter=3, noise=torch.zeros(2, 4, 10, 2))
    with pytest.raises(ConfigError, match="exponential, soft_ce"):
        novas(rastrigin, mu0, shape="softmax")
    with pytest.raises(ConfigError, match="all, last"):
        novas(rastrigin, mu0, differentiate="first")
    layer = NOVAS(lambda x, Y: rastrigin(Y), dim=2, mu0=torch.zeros(3))
    with pytest.raises(ShapeError, match=r"\(batch, dim\) = \(5, 2\)"):
        layer(torch.zeros(5, 1))


def test_generator_and_fixed_noise_give_the_same_search():
    mu0 = torch.full((3, 2), 1.5, dtype=F64)
    g = torch.Generator().manual_seed(7)
    a = novas(rastrigin, mu0, n_iter=4, generator=g).y
    g = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.randn(3, 100, 2, generator=g, dtype=F64) for _ in range(4)])
    b = novas(rastrigin, mu0, n_iter=4, noise=noise).y
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tolerance_freezes_each_element_at_its_own_iteration():
    """The masked run equals, element by element, the plain run stopped at its count."""
    mu0 = torch.tensor([[0.9], [1.6], [-0.3], [3.0]], dtype=F64)
    n_iter = 40
    noise = torch.randn(n_iter, 4, 30, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    opts = dict(sigma0=0.5, kappa=5.0, var_floor=1e-12, differentiate="all")
    res = novas(double_well, mu0, n_iter=n_iter, noise=noise, tol=1e-4, **opts)
    assert bool(res.converged.all())
    counts = res.iterations.tolist()
    assert max(counts) < n_iter and len(set(counts)) > 1
    for b, c in enumerate(counts):
        ref = novas(double_well, mu0, n_iter=c, noise=noise, **opts).y
        torch.testing.assert_close(res.y[b], ref[b], rtol=0, atol=0)


def test_check_every_stops_the_loop_early():
    calls = []

    def energy(Y):
        calls.append(1)
        return double_well(Y)

    mu0 = torch.tensor([[1.0], [-1.0]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    res = novas(energy, mu0, 0.3, n_iter=500, kappa=5.0, var_floor=1e-12, tol=1e-6,
                check_every=5, generator=g)
    assert bool(res.converged.all())
    n_calls = len(calls)
    assert n_calls < 500 and n_calls % 5 == 1  # 5k no-graph iterations + the last one


@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
@pytest.mark.parametrize("d", [1, 2])
def test_host_checks_change_nothing_but_the_work(d, shape):
    """Checking every iteration (the preset) skips masks and stops early, but gives the same
    outputs, counts and flags as never checking (every update masked on the device). With
    differentiate="all": in "last" mode the final update runs after the stop, on the next
    noise slice, by design."""
    mu0 = torch.tensor([[0.9], [1.6], [-0.3], [3.0]], dtype=F64).repeat(1, d)
    n_iter = 40
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(n_iter, 4, 30, d, dtype=F64, generator=g)
    opts = dict(sigma0=0.5, kappa=5.0, var_floor=1e-12, tol=1e-4, shape=shape,
                elite_frac=0.3, differentiate="all")
    ref = novas(double_well, mu0, n_iter=n_iter, noise=noise, check_every=0, **opts)
    assert len(set(ref.iterations.tolist())) > 1  # the elements freeze at different times
    for every in (1, 3):
        res = novas(double_well, mu0, n_iter=n_iter, noise=noise, check_every=every, **opts)
        torch.testing.assert_close(res.y, ref.y, rtol=0, atol=0)
        torch.testing.assert_close(res.sigma, ref.sigma, rtol=0, atol=0)
        assert res.iterations.tolist() == ref.iterations.tolist()
        assert res.converged.tolist() == ref.converged.tolist()


@pytest.mark.parametrize("shape", ["exponential", "soft_ce"])
def test_equal_energies_keep_the_mean_and_floor_the_spread(shape):
    # all-equal scores: every weight is 0 (min-max maps them to 0), so the mean stays and
    # sigma' = sqrt(var_floor)
    mu0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=F64)
    step = novas_step(lambda Y: torch.zeros(Y.shape[:2], dtype=Y.dtype), mu0,
                      torch.ones_like(mu0), torch.randn(2, 10, 2, dtype=F64), shape=shape,
                      var_floor=0.25)
    if shape == "soft_ce":
        torch.testing.assert_close(step[0], mu0, rtol=0, atol=0)
        torch.testing.assert_close(step[1], torch.full_like(mu0, 0.5), rtol=0, atol=0)
    else:  # softmax of all-zero scores: uniform weights, a finite update
        assert bool(torch.isfinite(step[0]).all() and torch.isfinite(step[1]).all())


def test_updates_with_and_without_autograd_are_the_same_numbers():
    """The tensor path's no-graph iterations and differentiated ones run the same operations
    (the fused CPU kernel agrees with them to rounding: tests/test_novas_fused.py)."""
    torch.manual_seed(0)
    net = EnergyNet(dx=2, dy=1).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    noise = torch.randn(4, 5, 40, 1, dtype=F64, generator=torch.Generator().manual_seed(4))
    opts = dict(n_iter=4, shape="soft_ce", tol=1e-4, check_every=1, noise=noise, fused=False)
    with torch.no_grad():
        free = novas(lambda Y: net(x, Y), torch.zeros(5, 1, dtype=F64), **opts)
    graph = novas(lambda Y: net(x, Y), torch.zeros(5, 1, dtype=F64), differentiate="all",
                  **opts)
    assert graph.y.requires_grad
    torch.testing.assert_close(graph.y.detach(), free.y, rtol=0, atol=0)
    torch.testing.assert_close(graph.sigma.detach(), free.sigma, rtol=0, atol=0)


def test_lml_is_the_projection_and_its_gradient_is_right():
    z = torch.randn(4, 12, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    p = lml(z, 3)
    torch.testing.assert_close(p.sum(-1), torch.full((4,), 3.0, dtype=F64), atol=1e-10, rtol=0)
    # stationarity: logit(p) - z is one multiplier nu per row
    nu = torch.logit(p) - z
    assert float((nu - nu.mean(-1, keepdim=True)).abs().max()) < 1e-8
    assert torch.autograd.gradcheck(lambda t: lml(t, 3), (z.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lml_default_bisections_are_converged_to_the_last_bit(dtype):
    """The dtype's default count gives the same bits as 200 bisections, over scales of z
    and sample counts; a count well below it does not (so the default is not arbitrary)."""
    g = torch.Generator().manual_seed(3)
    n = bisections(dtype)
    assert n == {torch.float32: 33, torch.float64: 62}[dtype]
    short_differs = False
    for scale in (0.01, 1.0, 100.0, 1e4):
        for N, k in ((100, 10), (20, 5), (1000, 3)):
            z = (torch.randn(32, N, generator=g, dtype=F64) * scale).to(dtype)
            ref = lml(z, k, 200)
            assert torch.equal(lml(z, k), ref), (scale, N, k)
            short_differs |= not torch.equal(lml(z, k, n // 2), ref)
    assert short_differs
    with pytest.raises(ConfigError, match="n_bisect"):
        lml(z, 3, 0)


def test_dcem_and_unrolled_gd_gradients_match_central_differences():
    torch.manual_seed(1)
    net = EnergyNet().to(F64)
    B, N, n_iter, d = 3, 40, 4, 2
    x = torch.randn(B, 2, dtype=F64)
    mu0 = torch.zeros(B, d, dtype=F64)
    noise = torch.randn(n_iter, B, N, d, dtype=F64, generator=torch.Generator().manual_seed(4))
    w = torch.randn(B, d, dtype=F64)
    outputs = {
        "dcem": lambda: dcem(lambda Y: net(x, Y), mu0, 2.0, n_elite=5, n_iter=n_iter,
                             noise=noise).y,
        "gd": lambda: unrolled_gd(lambda Y: net(x, Y), mu0, n_iter=10, lr=0.1).y,
    }
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(5)
    for name, out in outputs.items():
        # the energy's output bias does not move dE/dy: unused by unrolled GD
        grads = torch.autograd.grad((w * out()).sum(), params, materialize_grads=True)
        v = [torch.randn(p.shape, dtype=F64, generator=gen) for p in params]
        exact = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
        fd = _directional_fd(lambda out=out: (w * out()).sum(), params, v, 1e-6)
        assert abs(float(exact - fd)) <= 1e-5 * abs(float(fd)), (name, float(exact), float(fd))


def test_unrolled_gd_is_gradient_descent_and_respects_no_grad():
    mu0 = torch.tensor([[1.5]], dtype=F64)
    ref = gradient_descent(double_well, mu0, 0.05, 7)
    with torch.no_grad():
        y = unrolled_gd(double_well, mu0, n_iter=7, lr=0.05).y
    assert not y.requires_grad
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [NOVAS, DCEM, UnrolledGD])
def test_modules_register_energy_parameters_and_train(cls):
    torch.manual_seed(0)
    net = EnergyNet(dx=2, dy=1)
    layer = cls(net, dim=1)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in net.parameters()}
    x = torch.randn(16, 2)
    y = layer(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == (16, 1) and y.dtype == torch.float32 and y.device == x.device
    y.pow(2).mean().backward()
    # (unrolled GD sees only dE/dy, so the output bias gets no gradient there)
    grads = [p.grad for p in net.parameters()][:-1]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_dcem_finds_the_double_well_minimum():
    """The peer on its own terms: with a wide start it finds the global basin too."""
    star = double_well_min()
    mu0 = torch.tensor([[1.5]], dtype=F64)
    hits = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        y = dcem(double_well, mu0, 2.0, n_iter=60, generator=g).y
        hits += int(abs(float(y[0, 0]) - star) < 1e-3)
    assert hits >= 8


@pytest.mark.parametrize("device", DEVICES)
def test_searches_stay_on_the_device_without_host_sync(device):
    """With a tolerance but no early-exit checks, no loop reads a tensor on the host."""
    torch.manual_seed(0)
    net = EnergyNet(dx=2, dy=1).to(device)
    x = torch.randn(8, 2, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    fused = None if device != "cpu" else False  # the emulation checks the path a GPU runs
    layers = [
        NOVAS(net, 1, n_iter=5, tol=1e-3, fused=fused),
        NOVAS(net, 1, n_iter=5, tol=1e-3, differentiate="all", shape="soft_ce", fused=fused),
        DCEM(net, 1, n_iter=5, tol=1e-3),
        UnrolledGD(net, 1, n_iter=5),
    ]
    for layer in layers:
        layer(x, generator=gen)  # warm-up
        with no_host_sync(device, emulate_on_cpu=True):
            y = layer(x, generator=gen)
            res = layer.last_result
        assert y.device == x.device and res.iterations.device == x.device
        assert bool(torch.isfinite(y).all())
