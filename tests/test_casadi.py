"""Tests of ocnet.bridge.casadi: CasADi functions in torch and torch functions in CasADi.

Derivative checks are independent of the code they check:
- CasADi in torch: ``torch.autograd.gradcheck`` (torch's finite differences, float64)
  against the backward pass, which is CasADi's reverse mode.
- torch in CasADi: CasADi's own finite differences. A ``TorchCallback`` built with
  ``exact_derivatives=False`` and the CasADi options ``enable_fd=True, fd_method="central"``
  has no derivative of its own, so ``casadi.jacobian`` of it is computed by CasADi's
  central differences; it must agree with ``casadi.jacobian`` of the exact callback (whose
  Jacobian comes from ``torch.func.jacrev``). Reverse mode (``torch.func.vjp``) is checked
  against that finite-difference Jacobian transposed, Hessians (the Jacobian callback's own
  Jacobian) against ``torch.func.hessian`` and against central differences of the exact
  gradient.
"""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest
import torch
from devices import DEVICES, HostSyncError, no_host_sync
from torch import nn

from ocnet.bridge import casadi as cb
from ocnet.bridge.casadi import TorchCallback, casadi_apply, from_numpy, to_numpy
from ocnet.ocp import ShapeError

D = torch.float64


def _casadi_f() -> ca.Function:
    """A matrix, a vector and a scalar in; a matrix, a scalar and a vector out."""
    x = ca.SX.sym("x", 2, 3)
    a = ca.SX.sym("a", 2)
    s = ca.SX.sym("s")
    return ca.Function(
        "f", [x, a, s],
        [ca.sin(x) * a[0] * s + ca.mtimes(a, ca.DM([[1.0, 2.0, 3.0]])),
         ca.sum1(ca.sum2(x * x)) * a[1] + ca.exp(s),
         ca.vertcat(a * s, x[0, 1] * x[1, 2])],
        ["x", "a", "s"], ["y", "z", "v"],
    )


def _torch_f(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same function in torch, one sample (the independent reference for values)."""
    y = torch.sin(x) * a[0] * s + a[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)
    z = (x * x).sum() * a[1] + torch.exp(s)
    v = torch.cat([a * s, (x[0, 1] * x[1, 2]).reshape(1)])
    return y, z, v


@pytest.mark.parametrize("device", DEVICES)
def test_conversions_restore_device_and_dtype(device: str) -> None:
    t = torch.randn(3, 4, dtype=torch.float32, device=device)
    a = to_numpy(t)
    assert a.dtype == np.float64 and a.shape == (3, 4)
    back = from_numpy(a, t)
    assert back.dtype == torch.float32 and back.device == t.device
    assert torch.equal(back, t)
    dm = from_numpy(ca.DM(a), t)
    assert torch.equal(dm, t)


def test_no_host_sync_helper_catches_reads_on_cpu() -> None:
    """tests/devices.py: the CPU emulation flags what would synchronise on a GPU."""
    t = torch.randn(4, dtype=D)
    with no_host_sync("cpu", emulate_on_cpu=True):
        torch.where(t > 0, t, -t).sum()  # stays a tensor: allowed
        with pytest.raises(HostSyncError, match="item"):
            t.sum().item()
        with pytest.raises(HostSyncError, match="__bool__"):
            bool(t.sum() > 0)
        with pytest.raises(HostSyncError, match="numpy"):
            to_numpy(t)  # the bridge converts: it must stay out of solver sweeps
    assert t.sum().item() == float(t.sum())  # restored afterwards
    with no_host_sync("cpu"):  # without emulation a no-op on the CPU
        t.sum().item()


def test_casadi_apply_values_single_and_batched() -> None:
    f = _casadi_f()
    x, a, s = torch.randn(2, 3, dtype=D), torch.randn(2, dtype=D), torch.randn((), dtype=D)
    for got, want in zip(casadi_apply(f, x, a, s), _torch_f(x, a, s), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    # a batch of x and s, a shared: the map evaluates each sample
    xb, sb = torch.randn(5, 2, 3, dtype=D), torch.randn(5, dtype=D)
    outs = casadi_apply(f, xb, a, sb)
    for k in range(5):
        for got, want in zip(outs, _torch_f(xb[k], a, sb[k]), strict=True):
            torch.testing.assert_close(got[k], want, rtol=1e-14, atol=1e-14)


def test_casadi_apply_gradcheck() -> None:
    f = _casadi_f()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    a = torch.randn(2, dtype=D, requires_grad=True)
    s = torch.randn((), dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *i: casadi_apply(f, *i), (x, a, s))
    # batched: the shared input's adjoint is summed over the batch (reduce_in)
    xb = torch.randn(4, 2, 3, dtype=D, requires_grad=True)
    sb = torch.randn(4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *i: casadi_apply(f, *i), (xb, a, sb))
    # and agrees with autograd through the torch twin
    outs = casadi_apply(f, xb, a, sb)
    loss = sum((o ** 2).sum() for o in outs)
    g = torch.autograd.grad(loss, (xb, a, sb))
    ref = 0
    for k in range(4):
        ref = ref + sum((o ** 2).sum() for o in _torch_f(xb[k], a, sb[k]))
    g_ref = torch.autograd.grad(ref, (xb, a, sb))
    for u, v in zip(g, g_ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_casadi_apply_caches_built_functions() -> None:
    cb.clear_cache()
    f = _casadi_f()
    a, s = torch.randn(2, dtype=D), torch.randn(3, dtype=D)
    for _ in range(3):
        casadi_apply(f, torch.randn(3, 2, 3, dtype=D), a, s)
    info = cb._built.cache_info()
    assert info.misses == 1 and info.hits == 2
    casadi_apply(f, torch.randn(4, 2, 3, dtype=D), a, torch.randn(4, dtype=D))
    assert cb._built.cache_info().misses == 2  # a new batch size is a new map


def test_casadi_apply_shape_errors() -> None:
    f = _casadi_f()
    with pytest.raises(ShapeError, match="input 1"):
        casadi_apply(f, torch.randn(2, 3, dtype=D), torch.randn(3, dtype=D), torch.randn(()))
    with pytest.raises(ShapeError, match="batch size"):
        casadi_apply(f, torch.randn(3, 2, 3, dtype=D), torch.randn(2, dtype=D),
                     torch.randn(4, dtype=D))
    with pytest.raises(ShapeError, match="takes 3 inputs"):
        casadi_apply(f, torch.randn(2, 3, dtype=D))


# ------------------------------------------------------------------ torch inside CasADi
def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _torch_g(net: nn.Module):  # noqa: ANN202
    def g(v: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net(v) * torch.tanh(m).sum(), m @ m.T + v[:2, None] * m

    return g


def _callbacks() -> tuple[TorchCallback, TorchCallback, nn.Module]:
    net = _net()
    exact = TorchCallback("g", _torch_g(net), [(3,), (2, 2)])
    fd = TorchCallback("g_fd", _torch_g(net), [(3,), (2, 2)], exact_derivatives=False,
                       opts={"enable_fd": True, "fd_method": "central"})
    return exact, fd, net


def test_callback_values() -> None:
    exact, _, net = _callbacks()
    v, m = np.random.randn(3), np.random.randn(2, 2)
    o0, o1 = exact(v, m)
    w0, w1 = _torch_g(net)(torch.tensor(v), torch.tensor(m))
    np.testing.assert_allclose(np.asarray(o0).ravel(), w0.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(o1), w1.detach().numpy(), rtol=1e-14)


def test_callback_jacobian_matches_casadi_finite_differences(record_error) -> None:  # noqa: ANN001
    exact, fd, _ = _callbacks()
    v, m = ca.MX.sym("v", 3), ca.MX.sym("m", 2, 2)

    def jacobians(fun: TorchCallback) -> ca.Function:
        y0, y1 = fun(v, m)
        return ca.Function("J", [v, m], [ca.jacobian(y0, v), ca.jacobian(y0, m),
                                         ca.jacobian(y1, v), ca.jacobian(y1, m)])

    j_exact, j_fd = jacobians(exact), jacobians(fd)
    worst = 0.0
    for _ in range(3):
        vv, mm = np.random.randn(3), np.random.randn(2, 2)
        for a, b in zip(j_exact(vv, mm), j_fd(vv, mm), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape
            worst = max(worst, np.abs(a - b).max())
    record_error("TorchCallback jacobian vs CasADi central FD", worst)
    assert worst < 1e-7
    # an exactly known block: d(m m^T + v[:2] m)/dm, in CasADi's column-major vec order
    ms = ca.MX.sym("ms", 2, 2)
    sym = ca.Function("s", [v, ms], [ca.jacobian(ca.mtimes(ms, ms.T) + ms * ca.repmat(
        v[:2], 1, 2), ms)])
    vv, mm = np.random.randn(3), np.random.randn(2, 2)
    np.testing.assert_allclose(np.asarray(j_exact(vv, mm)[3]), np.asarray(sym(vv, mm)),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("nadj", [1, 2])
def test_callback_reverse_mode(nadj: int) -> None:
    exact, fd, _ = _callbacks()
    rev = exact.reverse(nadj)  # torch.func.vjp behind it
    vv, mm = np.random.randn(3), np.random.randn(2, 2)
    seeds0, seeds1 = np.random.randn(2, nadj), np.random.randn(2, 2 * nadj)
    adj_v, adj_m = rev(vv, mm, 0, 0, seeds0, seeds1)
    v, m = ca.MX.sym("v", 3), ca.MX.sym("m", 2, 2)
    y0, y1 = fd(v, m)
    jac = ca.Function("J", [v, m], [ca.jacobian(ca.vertcat(y0, ca.vec(y1)),
                                                ca.vertcat(v, ca.vec(m)))])
    big_j = np.asarray(jac(vv, mm))  # CasADi central differences
    for d in range(nadj):
        seed = np.concatenate([seeds0[:, d], seeds1[:, 2 * d:2 * d + 2].ravel(order="F")])
        want = big_j.T @ seed
        got = np.concatenate([np.asarray(adj_v)[:, d],
                              np.asarray(adj_m)[:, 2 * d:2 * d + 2].ravel(order="F")])
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)


def test_callback_hessian_is_exact() -> None:
    exact, _, net = _callbacks()
    v, m = ca.MX.sym("v", 3), ca.MX.sym("m", 2, 2)
    y0, y1 = exact(v, m)
    obj = ca.sumsqr(y0) + ca.sumsqr(y1)
    z = ca.vertcat(v, ca.vec(m))
    hess = ca.Function("H", [v, m], [ca.hessian(obj, z)[0]])
    grad = ca.Function("g", [v, m], [ca.gradient(obj, z)])
    vv, mm = np.random.randn(3), np.random.randn(2, 2)
    h = np.asarray(hess(vv, mm))

    def torch_obj(zz: torch.Tensor) -> torch.Tensor:
        tv, tm = zz[:3], zz[3:].reshape(2, 2).T  # column-major vec, as CasADi
        a, b = _torch_g(net)(tv, tm)
        return (a ** 2).sum() + (b ** 2).sum()

    zz = torch.tensor(np.concatenate([vv, mm.ravel(order="F")]))
    np.testing.assert_allclose(h, torch.func.hessian(torch_obj)(zz).detach().numpy(), rtol=1e-11,
                               atol=1e-11)
    eps, fd = 1e-6, np.zeros((7, 7))  # central differences of the exact gradient
    for k in range(7):
        e = np.zeros(7)
        e[k] = eps
        zp, zm = zz.numpy() + e, zz.numpy() - e
        gp = np.asarray(grad(zp[:3], zp[3:].reshape(2, 2, order="F"))).ravel()
        gm = np.asarray(grad(zm[:3], zm[3:].reshape(2, 2, order="F"))).ravel()
        fd[:, k] = (gp - gm) / (2 * eps)
    np.testing.assert_allclose(h, fd, rtol=1e-6, atol=1e-7)


def test_trained_network_inside_an_ipopt_problem() -> None:
    """min_v |net(v) - target|^2 + 0.01 |v|^2 with the network evaluated by torch."""
    net = _net()
    call = TorchCallback("net", net, [(3,)])
    v = ca.MX.sym("v", 3)
    target = np.array([0.3, -0.2])
    obj = ca.sumsqr(call(v) - target) + 0.01 * ca.sumsqr(v)
    solver = ca.nlpsol("s", "ipopt", {"x": v, "f": obj},
                       {"print_time": False, "ipopt.print_level": 0, "ipopt.sb": "yes",
                        "ipopt.tol": 1e-12})
    sol = solver(x0=np.zeros(3))
    assert solver.stats()["success"]
    tv = torch.tensor(np.asarray(sol["x"]).ravel(), requires_grad=True)
    loss = ((net(tv) - torch.tensor(target)) ** 2).sum() + 0.01 * (tv ** 2).sum()
    (g,) = torch.autograd.grad(loss, tv)
    assert g.norm() < 1e-8
    assert abs(float(loss.detach()) - float(sol["f"])) < 1e-14


def test_torch_through_casadi_back_to_torch_gradcheck() -> None:
    """A TorchCallback inside a CasADi Function applied to torch tensors: both adapters."""
    net = _net()
    call = TorchCallback("net", net, [(3,)])
    v = ca.MX.sym("v", 3)
    f = ca.Function("wrapped", [v], [ca.sin(call(v))])
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    torch.testing.assert_close(casadi_apply(f, x), torch.sin(net(x)), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: casadi_apply(f, t), (x,))
