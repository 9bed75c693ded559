"""ocnet.bridge: to_problem's structure and errors, placement, torch.func helpers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ocnet.bridge import (
    ModuleStage,
    flatten_controls,
    objective_gradient,
    objective_hessian,
    place,
    resolve_device,
    resolve_loss,
    stage_jacobians,
    to_device,
    to_problem,
    unflatten_controls,
)
from ocnet.dynamics import Dense, LinearQuadratic, Residual
from ocnet.models import PadFeatures, ResidualBlock, build_model
from ocnet.ocp import ConfigError, Problem, ShapeError
from ocnet.solvers import GradientSolver

DT = torch.float64


def _ce_batch(b: int = 6, n: int = 4, k: int = 3, dtype: torch.dtype = DT):
    return torch.randn(b, n, dtype=dtype), torch.randint(0, k, (b,))


# ---------------------------------------------------------------- controls are parameters
def test_controls_are_the_module_parameters():
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    problem = to_problem(module, "cross_entropy")
    params = list(module.parameters())
    assert len(problem.parameters()) == len(params)
    assert all(u is p for u, p in zip(problem.parameters(), params, strict=True))
    assert problem.module is module
    assert [len(s.controls) for s in problem.stages] == [2, 2]
    assert problem.stages[0].controls[0] is module[0].weight


def test_stepping_a_solver_changes_the_module():
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    problem = to_problem(module, "cross_entropy")
    x, y = _ce_batch()
    before = module(x).detach().clone()
    GradientSolver(problem, "sgd", lr=0.5).step(x, y)
    after = module(x).detach()
    assert not torch.allclose(before, after)
    assert torch.equal(after, problem.rollout(x).xs[-1])


# ---------------------------------------------------------------- grouping
def _layer_types(stage: ModuleStage) -> list[str]:
    return [type(m).__name__ for m in stage.layers]


def test_grouping_of_parameter_free_layers():
    module = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(128, 16), nn.Tanh()),  # nested Sequential is flattened
        nn.Linear(16, 10),
    )
    problem = to_problem(module, "cross_entropy")
    groups = [_layer_types(s) for s in problem.stages]
    assert groups == [
        ["Unflatten", "Conv2d", "ReLU"],
        ["Conv2d", "ReLU", "Flatten"],
        ["Linear", "Tanh"],
        ["Linear"],
    ]
    first = problem.stages[0]
    assert [type(m).__name__ for m in first.before] == ["Unflatten"]
    assert isinstance(first.parametric, nn.Conv2d)
    assert [type(m).__name__ for m in first.after] == ["ReLU"]
    # the static sizes are known only where the layers around a Linear are elementwise
    assert (problem.stages[2].in_features, problem.stages[2].out_features) == (128, 16)
    assert problem.stages[0].in_features is None
    x = torch.randn(3, 64)
    assert torch.allclose(problem.rollout(x).xs[-1], module(x), rtol=0, atol=0)

    flat_first = to_problem(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "cross_entropy")
    assert _layer_types(flat_first.stages[0]) == ["Flatten", "Linear"]
    assert flat_first.stages[0].in_features is None and flat_first.stages[0].out_features == 10


def test_custom_parametric_layers_go_through_functional_call():
    module = build_model("resnet", 2, 3, width=4, depth=2)
    problem = to_problem(module, "cross_entropy")
    assert [type(s.parametric) for s in problem.stages] == [ResidualBlock, ResidualBlock,
                                                             nn.Linear]
    assert isinstance(problem.stages[0].before[0], PadFeatures)
    x = torch.randn(5, 2)
    assert torch.allclose(problem.rollout(x).xs[-1], module(x), rtol=0, atol=0)


# ---------------------------------------------------------------- frozen parameters
def test_frozen_parameters_are_not_controls():
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                           nn.Linear(5, 3)).to(DT)
    module[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    for p in module[2].parameters():  # a whole frozen layer is a parameter-free layer
        p.requires_grad_(False)
    problem = to_problem(module, "cross_entropy", weight_decay=1e-2)
    assert problem.T == 2
    assert _layer_types(problem.stages[0]) == ["Linear", "Tanh", "Linear", "Tanh"]
    assert problem.stages[0].controls == (module[0].bias,)
    assert all(u.requires_grad for u in problem.parameters())
    x, y = _ce_batch()
    grads = problem.gradients(x, y)
    loss = nn.functional.cross_entropy(module(x), y)
    loss = loss + 0.5e-2 * sum((p * p).sum() for p in module.parameters() if p.requires_grad)
    loss.backward()
    assert torch.allclose(grads[0][0], module[0].bias.grad, rtol=1e-12, atol=0)
    assert torch.allclose(grads[1][0], module[4].weight.grad, rtol=1e-12, atol=0)
    frozen = module[0].weight.clone(), module[2].weight.clone()
    solver = GradientSolver(problem, "adam", lr=0.1)
    for _ in range(3):
        solver.step(x, y)
    assert torch.equal(frozen[0], module[0].weight) and torch.equal(frozen[1], module[2].weight)


# ---------------------------------------------------------------- placement
def test_place_moves_to_float64_keeping_identity():
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    problem = to_problem(module, "cross_entropy")
    ids = [id(p) for p in module.parameters()]
    assert problem.dtype == torch.float32
    assert place(problem, "cpu", DT) is problem
    assert problem.dtype == DT and problem.device == torch.device("cpu")
    assert [id(p) for p in module.parameters()] == ids
    assert all(u is p for u, p in zip(problem.parameters(), module.parameters(), strict=True))
    assert all(p.dtype == DT for p in module.parameters())
    x, y = _ce_batch()
    assert torch.equal(module(x), problem.rollout(x).xs[-1])
    # an optimizer built after placement trains the module
    GradientSolver(problem, "sgd", lr=0.1).step(x, y)
    assert torch.equal(module(x), problem.rollout(x).xs[-1])


def test_place_moves_stage_buffers_and_to_device(device):
    n, m = 2, 1
    eye = torch.eye(n)
    stages = [LinearQuadratic(eye, torch.ones(n, m), torch.zeros(m), eye, torch.eye(m))]
    problem = place(Problem(stages, lambda x, y: (x * x).sum()), device, DT)
    assert all(b.dtype == DT and b.device.type == device for b in stages[0].buffers())
    assert problem.dtype == DT
    x, idx = to_device(torch.randn(3, n), torch.arange(3), device=device, dtype=DT)
    assert x.dtype == DT and idx.dtype == torch.int64 and x.device.type == device
    problem.objective(x)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- errors
class _BlockWithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.linear(x))


@pytest.mark.parametrize(
    "module, words",
    [
        (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)),
         ["layer 1", "BatchNorm1d", "batch statistics", "LayerNorm"]),
        (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)),
         ["layer 1", "Dropout", "random"]),
        (nn.Sequential(nn.Linear(3, 3), _BlockWithDropout()),
         ["layer 1.drop", "Dropout", "random"]),
        (nn.Linear(3, 2), ["nn.Sequential", "got Linear"]),
        (nn.Sequential(nn.Tanh(), nn.Flatten()), ["no layer with trainable parameters"]),
        (nn.Sequential(nn.Linear(3, 3).requires_grad_(False)),
         ["no layer with trainable parameters"]),
    ],
)
def test_modules_that_cannot_be_converted(module, words):
    with pytest.raises(ConfigError) as info:
        to_problem(module, "cross_entropy")
    for w in words:
        assert w in str(info.value)


def test_shared_parameters_and_bad_options_are_refused():
    lin = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="layer 2 shares a parameter with layer 0"):
        to_problem(nn.Sequential(lin, nn.Tanh(), lin), "mse")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight_decay must be a finite number >= 0"):
            to_problem(nn.Sequential(nn.Linear(3, 3)), "mse", weight_decay=bad)
    with pytest.raises(ConfigError, match="weight_decay must be a finite number >= 0"):
        to_problem(nn.Sequential(nn.Linear(3, 3)), "mse", weight_decay=-1.0)
    with pytest.raises(ConfigError, match="valid losses are: cross_entropy, mse"):
        resolve_loss("l1")
    with pytest.raises(ConfigError, match="callable"):
        resolve_loss(3)
    with pytest.raises(ShapeError, match="outputs 32 features but .*expects 16"):
        to_problem(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(16, 10)), "mse")


def test_weight_decay_is_a_running_cost():
    module = nn.Sequential(nn.Linear(3, 2)).to(DT)
    problem = to_problem(module, "cross_entropy", weight_decay=0.3)
    st = problem.stages[0]
    assert st.has_cost and st.weight_decay == 0.3
    w, b = module[0].weight, module[0].bias
    assert torch.allclose(st.cost(None, st.controls), 0.15 * ((w * w).sum() + (b * b).sum()))
    assert not to_problem(module, "cross_entropy").stages[0].has_cost


# ---------------------------------------------------------------- derivative helpers
def test_flatten_and_unflatten_controls():
    like = [(torch.zeros(2, 3), torch.zeros(3)), (), (torch.zeros(4),)]
    v = torch.arange(13.0)
    parts = unflatten_controls(v, like)
    assert [tuple(p.shape for p in ps) for ps in parts] == [((2, 3), (3,)), (), ((4,),)]
    assert torch.equal(flatten_controls(parts), v)
    with pytest.raises(ValueError, match="14 entries, the controls 13"):
        unflatten_controls(torch.zeros(14), like)


def test_stage_jacobians_equal_autograd():
    g = torch.Generator().manual_seed(0)
    stage = Residual.create(3, h=0.5, generator=g, dtype=DT)
    x = torch.randn(4, 3, dtype=DT)
    fx, (fw, fb) = stage_jacobians(stage, x)
    assert fx.shape == (4, 3, 3) and fw.shape == (4, 3, 3, 3) and fb.shape == (4, 3, 3)
    w, b = stage.controls
    for i in range(4):
        jx, jw, jb = torch.autograd.functional.jacobian(
            lambda xi, wi, bi: stage.f(xi[None], (wi, bi))[0], (x[i], w, b))
        assert torch.allclose(fx[i], jx, rtol=1e-14, atol=1e-15)
        assert torch.allclose(fw[i], jw, rtol=1e-14, atol=1e-15)
        assert torch.allclose(fb[i], jb, rtol=1e-14, atol=1e-15)


def test_objective_hessian_of_a_quadratic_problem():
    """For an LQ problem J is quadratic in u: g(u + d) - g(u) = H d exactly (up to rounding)."""
    n, m, T = 2, 2, 3  # noqa: N806
    A = torch.tensor([[1.0, 0.2], [-0.1, 0.9]], dtype=DT)  # noqa: N806
    B = torch.randn(n, m, dtype=DT)  # noqa: N806
    Q, R = torch.eye(n, dtype=DT), 0.5 * torch.eye(m, dtype=DT)  # noqa: N806
    S = 0.1 * torch.randn(n, m, dtype=DT)  # noqa: N806
    stages = [LinearQuadratic(A, B, torch.randn(m, dtype=DT), Q, R, S) for _ in range(T)]
    problem = Problem(stages, lambda x, y: 0.5 * (x * x).sum(-1).mean())
    x0 = torch.randn(5, n, dtype=DT)
    H = objective_hessian(problem, x0)  # noqa: N806
    assert H.shape == (T * m, T * m)
    assert torch.allclose(H, H.T, rtol=0, atol=1e-13)
    assert torch.linalg.eigvalsh(H).min() > 0  # R > 0 and small S: convex
    g0 = objective_gradient(problem, x0)
    d = torch.randn(T * m, dtype=DT)
    u0 = flatten_controls(problem.controls).clone()
    problem.set_controls(unflatten_controls(u0 + d, problem.controls))
    g1 = flatten_controls(problem.gradients(x0))
    assert torch.allclose(g1 - g0, H @ d, rtol=1e-11, atol=1e-13)


def test_dense_stage_problem_with_module_free_controls():
    """Stages not made from modules have no problem.module; place still works."""
    problem = Problem([Dense.create(3, 2, "identity")], nn.CrossEntropyLoss())
    assert problem.module is None
    place(problem, dtype=DT)
    x, y = _ce_batch(n=3, k=2)
    assert problem.objective(x, y).dtype == DT


def test_a_layer_instance_used_twice_is_not_dropped():
    """nn.Sequential runs a repeated module twice; named_children() would list it once."""
    act = nn.Tanh()
    module = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2)).to(DT)
    problem = to_problem(module, "cross_entropy")
    assert [_layer_types(s) for s in problem.stages] == [["Linear", "Tanh"], ["Linear", "Tanh"],
                                                         ["Linear"]]
    x = torch.randn(5, 3, dtype=DT)
    assert torch.equal(problem.rollout(x).xs[-1], module(x))


def test_resolve_device_errors():
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available.*'cpu' or 'auto'"):
            resolve_device("cuda")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
