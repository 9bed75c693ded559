"""ocnet.dynamics: layer stages by hand, vector fields, TimeMesh, explicit Euler, LQ stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ocnet.dynamics import (
    ACTIVATIONS,
    ActivationField,
    AntisymmetricField,
    Conv2d,
    Dense,
    EulerStage,
    Flatten,
    LinearQuadratic,
    Residual,
    TimeMesh,
    VectorField,
    ZeroPad,
    activation,
    euler_stages,
)
from ocnet.ocp import ConfigError, Problem, ShapeError

DT = torch.float64


# ---------------------------------------------------------------- layer stages by hand
def test_dense_residual_conv_flatten_zeropad_by_hand(generator):
    x = torch.randn(4, 3, dtype=DT)
    d = Dense.create(3, 5, "relu", generator=generator, dtype=DT)
    w, b = d.controls
    assert w.shape == (5, 3) and b.shape == (5,)
    assert w.abs().max() <= 1 / math.sqrt(3)  # nn.Linear's initialisation bound
    assert torch.equal(d(x), torch.relu(x @ w.T + b))
    assert (d.in_features, d.out_features) == (3, 5)
    nob = Dense.create(3, 5, bias=False, dtype=DT)
    assert len(nob.controls) == 1 and torch.equal(nob(x), torch.tanh(x @ nob.controls[0].T))

    r = Residual.create(3, h=0.25, activation_name="tanh", generator=generator, dtype=DT)
    rw, rb = r.controls
    assert torch.allclose(r(x), x + 0.25 * torch.tanh(x @ rw.T + rb), rtol=0, atol=1e-15)

    img = torch.randn(2, 1, 8, 8, dtype=DT)
    c = Conv2d.create(1, 3, 3, "tanh", stride=2, padding=1, generator=generator, dtype=DT)
    cw, cb = c.controls
    assert torch.equal(c(img), torch.tanh(F.conv2d(img, cw, cb, stride=2, padding=1)))
    assert c(img).shape == (2, 3, 4, 4)
    assert Flatten()(c(img)).shape == (2, 48)

    z = ZeroPad(3, 5)
    assert torch.equal(z(x)[:, :3], x) and torch.equal(z(x)[:, 3:], torch.zeros(4, 2, dtype=DT))
    assert z.controls == () and (z.in_features, z.out_features) == (3, 5)


def test_layer_stage_construction_errors():
    with pytest.raises(ShapeError, match="2-D"):
        Dense(torch.zeros(3))
    with pytest.raises(ShapeError, match=r"bias \(4,\) does not fit weight \(3, 2\)"):
        Dense(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ShapeError, match="square"):
        Residual(torch.zeros(3, 2))
    with pytest.raises(ShapeError, match="4-D"):
        Conv2d(torch.zeros(3, 3))
    with pytest.raises(ShapeError, match="smaller"):
        ZeroPad(4, 3)
    with pytest.raises(ConfigError, match="valid activations are"):
        Dense.create(2, 2, "swish")


def test_activation_registry():
    x = torch.linspace(-2, 2, 9, dtype=DT)
    assert torch.equal(activation("tanh")(x), torch.tanh(x))
    assert torch.equal(activation("identity")(x), x)
    assert set(ACTIVATIONS) >= {"tanh", "relu", "sigmoid", "softplus", "identity"}
    with pytest.raises(ConfigError) as info:
        activation("nope")
    assert all(name in str(info.value) for name in ACTIVATIONS)


# ---------------------------------------------------------------- vector fields
def test_fields_by_hand(generator):
    x = torch.randn(4, 3, dtype=DT)
    f = ActivationField(3, "tanh")
    k, b = f.init_controls(generator=generator, dtype=DT)
    assert k.shape == (3, 3) and b.shape == (3,) and k.dtype == DT
    assert torch.equal(f(x, (k, b), 0.0), torch.tanh(x @ k.T + b))
    a = AntisymmetricField(3, "identity", gamma=0.1)
    m = k - k.T - 0.1 * torch.eye(3, dtype=DT)
    assert torch.allclose(a(x, (k, b), 0.0), x @ m.T + b, rtol=0, atol=1e-15)
    # the linear part has eigenvalues with real part -gamma: stable forward propagation
    eig = torch.linalg.eigvals(m)
    assert torch.allclose(eig.real, torch.full((3,), -0.1, dtype=DT), atol=1e-12)


# ---------------------------------------------------------------- TimeMesh
def test_time_mesh_uniform_and_nodes():
    m = TimeMesh.uniform(2.0, 4, t0=1.0)
    assert len(m) == 4 and m.lengths == (0.5,) * 4 and m.T == 2.0
    assert m.nodes == [1.0, 1.5, 2.0, 2.5, 3.0]
    n = TimeMesh.from_nodes([0.0, 0.1, 0.35, 1.0])
    assert n.t0 == 0.0 and np.allclose(n.lengths, [0.1, 0.25, 0.65])
    assert np.allclose(n.nodes, [0.0, 0.1, 0.35, 1.0]) and math.isclose(n.T, 1.0)
    assert "N=3" in repr(n)


@pytest.mark.parametrize(
    "marked",
    [[0, 2], [True, False, True], torch.tensor([True, False, True]), np.array([True, False, True]),
     torch.tensor([2, 0]), np.array([0, 2]), [2, 0, 2]],
)
def test_time_mesh_refine_by_indices_and_mask(marked):
    m = TimeMesh([0.5, 0.25, 1.0], t0=0.5)
    fine, parent = m.refine(marked)
    assert fine.lengths == (0.25, 0.25, 0.25, 0.5, 0.5)
    assert parent == [0, 0, 1, 2, 2]
    assert fine.t0 == 0.5 and fine.T == m.T
    assert set(m.nodes) <= set(fine.nodes)


def test_time_mesh_refine_nothing_and_errors():
    m = TimeMesh.uniform(1.0, 3)
    same, parent = m.refine([])
    assert same.lengths == m.lengths and parent == [0, 1, 2]
    with pytest.raises(ShapeError, match="2 flags for a mesh of 3"):
        m.refine([True, False])
    with pytest.raises(ShapeError, match=r"\[3\] are outside 0..2"):
        m.refine([3])
    with pytest.raises(ShapeError, match=r"\[-1\] are outside"):
        m.refine([-1])
    with pytest.raises(ShapeError, match="positive"):
        TimeMesh([0.5, 0.0])
    with pytest.raises(ShapeError, match="positive"):
        TimeMesh.from_nodes([0.0, 0.5, 0.4])
    with pytest.raises(ShapeError, match="at least one interval"):
        TimeMesh([])
    with pytest.raises(ShapeError, match="at least one interval"):
        TimeMesh.from_nodes([0.0])
    with pytest.raises(ShapeError, match="n >= 1"):
        TimeMesh.uniform(1.0, 0)


def _control_function(mesh: TimeMesh, controls: list, t: float) -> tuple[Tensor, ...]:
    """u(t) of piecewise-constant controls: the control of the interval (t_m, t_m+1] holding t."""
    nodes = mesh.nodes
    for m in range(len(mesh)):
        if nodes[m] < t <= nodes[m + 1]:
            return controls[m]
    raise AssertionError(f"t={t} is outside the mesh")


def test_prolongate_keeps_the_control_function(generator):
    mesh = TimeMesh.from_nodes([0.0, 0.1, 0.35, 0.4, 1.0])
    field = ActivationField(3)
    controls = [field.init_controls(generator=generator, dtype=DT) for _ in range(len(mesh))]
    fine, parent = mesh.refine([True, False, True, True])
    fine2, parent2 = fine.refine([0, 5])
    new = TimeMesh.prolongate(TimeMesh.prolongate(controls, parent), parent2)
    assert len(new) == len(fine2) == 9
    for t in np.linspace(0.0, 1.0, 401)[1:] - 1.234e-4:  # off the nodes (rounding)
        for a, b in zip(_control_function(mesh, controls, t), _control_function(fine2, new, t),
                        strict=True):
            assert torch.equal(a, b)
    # copies, not aliases: changing a child does not change its parent or its sibling
    new[0][0].add_(1.0)
    assert not torch.equal(new[0][0], controls[0][0]) and not torch.equal(new[0][0], new[1][0])


# ---------------------------------------------------------------- explicit Euler
class _TimeField(VectorField):
    """F(x, (a,), t) = t x + a: depends on the time, to check the stages' t."""

    width = 2

    def __call__(self, x: Tensor, u: tuple[Tensor, ...], t: float) -> Tensor:
        return t * x + u[0]

    def init_controls(self, *, generator=None, dtype=None, device=None) -> tuple[Tensor, ...]:
        return (torch.randn(2, generator=generator, dtype=dtype, device=device),)


def test_euler_stages_use_the_intervals_h_and_t(generator):
    mesh = TimeMesh([0.1, 0.4, 0.05, 0.45], t0=0.5)
    field = _TimeField()
    stages = euler_stages(field, mesh, generator=generator, dtype=DT)
    assert len(stages) == 4 and all(isinstance(s, EulerStage) for s in stages)
    assert [s.h for s in stages] == list(mesh.lengths)
    assert [s.t for s in stages] == mesh.nodes[:-1]
    x = torch.randn(3, 2, dtype=DT)
    xs = [x]
    for h, t, s in zip(mesh.lengths, mesh.nodes, stages, strict=False):
        (a,) = s.controls
        xs.append(xs[-1] + h * (t * xs[-1] + a))  # explicit Euler by hand
    traj = Problem(stages, lambda x, y: x.sum()).rollout(x)
    for got, want in zip(traj.xs, xs, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-15)
    assert all(not s.has_cost for s in stages)


def test_euler_stages_controls_and_running_cost(generator):
    mesh = TimeMesh.from_nodes([0.0, 0.2, 0.5, 1.0])
    field = ActivationField(2)
    controls = [field.init_controls(generator=generator, dtype=DT) for _ in range(3)]
    rate_calls = []

    def rate(x: Tensor, u: tuple[Tensor, ...]) -> Tensor:
        rate_calls.append(1)
        return (x**2).sum(-1).mean()

    stages = euler_stages(field, mesh, controls, running_cost=rate)
    assert all(s.controls[0] is c[0] for s, c in zip(stages, controls, strict=True))
    x = torch.randn(4, 2, dtype=DT)
    for s in stages:  # stage m costs h_m l(x, u): the left-point rule of the integral
        assert s.has_cost
        assert torch.allclose(s.cost(x, s.controls), s.h * (x**2).sum(-1).mean(), rtol=1e-15)
    with pytest.raises(ShapeError, match="2 control sets for 3 intervals"):
        euler_stages(field, mesh, controls[:2])


# ---------------------------------------------------------------- linear-quadratic stage
def test_linear_quadratic_dynamics_and_cost_by_hand():
    A = torch.tensor([[1.0, 0.1], [0.0, 0.9]], dtype=DT)  # noqa: N806
    B = torch.tensor([[0.0], [0.5]], dtype=DT)  # noqa: N806
    Q = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT)  # noqa: N806
    R = torch.tensor([[3.0]], dtype=DT)  # noqa: N806
    S = torch.tensor([[1.0], [-1.0]], dtype=DT)  # noqa: N806
    u = torch.tensor([2.0], dtype=DT)
    st = LinearQuadratic(A, B, u, Q, R, S)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.0]], dtype=DT)
    # x+ = A x + B u per sample
    assert torch.equal(st(x), torch.tensor([[1.2, 2.8], [-1.0, 1.0]], dtype=DT))
    # sample 1: x'Qx/2 = (2 + 4)/2 = 3, x'Su = (1 - 2) * 2 = -2  -> 1
    # sample 2: x'Qx/2 = 2/2 = 1,       x'Su = (-1) * 2 = -2      -> -1
    # mean = 0; plus u'Ru/2 = 3 * 4 / 2 = 6
    assert st.cost(x, st.controls).item() == pytest.approx(6.0, abs=1e-14)
    assert st.has_cost and st.controls == (u,) and len(st.buffers()) == 5
    no_s = LinearQuadratic(A, B, u, Q, R)
    assert torch.equal(no_s.S, torch.zeros(2, 1, dtype=DT))
    assert no_s.cost(x, no_s.controls).item() == pytest.approx(2.0 + 6.0, abs=1e-14)
    with pytest.raises(ShapeError, match="need A"):
        LinearQuadratic(A, B, torch.zeros(2, dtype=DT), Q, R)
    with pytest.raises(ShapeError, match=r"need S \(n,m\) = \(2,1\), got \(1, 2\)"):
        LinearQuadratic(A, B, u, Q, R, S.T)
