"""Paper presets: ``make_solver(name, problem, preset="paper")`` and the NOVAS/DCEM layers.

Every registered solver has made a decision (``DECISIONS``): a ``paper`` preset, built here
and checked against the solver's attributes, or none, refused with a clear error. A solver
registered without a decision fails ``test_every_registered_solver_has_decided``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ocnet.bridge import place, to_problem
from ocnet.cli import cli
from ocnet.ocp.errors import ConfigError
from ocnet.solvers import (
    DCEM,
    EMSA,
    MSA,
    NOVAS,
    make_solver,
    register,
    solver_entry,
    solver_names,
    solver_presets,
    solver_records,
    unregister,
)
from ocnet.solvers.gradient import GradientSolver
from ocnet.solvers.novas import PRESETS as LAYER_PRESETS

#: each solver's decision: the presets it has (empty: it has none, for the reason its
#: docstring gives). A new solver must be added here.
DECISIONS: dict[str, tuple[str, ...]] = {
    "sgd": ("paper",), "momentum": ("paper",), "rmsprop": ("paper",), "adam": ("paper",),
    "ddp": ("paper",), "ddpnopt": ("paper",), "msa": ("paper",), "emsa": ("paper",),
    "phb": ("paper",), "phb-goal": (), "ipopt": (),
}

#: per solver with a preset: an explicit option given beside it, and a value it is not in
#: the preset
OVERRIDES: dict[str, tuple[str, Any]] = {
    "sgd": ("dampening", 0.5), "momentum": ("momentum", 0.5), "rmsprop": ("alpha", 0.99),
    "adam": ("eps", 1e-6), "ddp": ("mu", 1e-3), "ddpnopt": ("trust", 0.3),
    "msa": ("inner_iters", 3), "emsa": ("rho", 2.0), "phb": ("integrator", "verlet"),
}


def _problem(zero: bool = False):  # noqa: ANN202
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    if zero:  # the public E-MSA toy starts at zero weights
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
    problem = place(to_problem(net, "cross_entropy", 1e-3), "cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return problem, x, y


def _value(solver: Any, key: str) -> Any:
    """The value a solver took for option ``key`` (its attribute, its curvature's or its
    torch.optim optimizer's)."""
    for obj in (solver, getattr(solver, "curvature", None), getattr(solver, "optimizer", None)):
        if obj is not None and hasattr(obj, key):
            value = getattr(obj, key)
            return value(0) if callable(value) else value  # E-MSA's rho(step)
    optimizer = getattr(solver, "optimizer", None)
    if optimizer is not None and key in optimizer.param_groups[0]:
        return optimizer.param_groups[0][key]
    raise AssertionError(f"{type(solver).__name__} keeps no attribute for option {key!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


# ----------------------------------------------------------------------------- the registry
def test_every_registered_solver_has_decided():
    undecided = sorted(set(solver_names()) - set(DECISIONS))
    assert not undecided, (f"solvers without a preset decision: {undecided}; give them "
                           "presets={'paper': {...}} or presets={} and add them to DECISIONS")
    for record in solver_records():
        assert tuple(sorted(record.presets)) == DECISIONS[record.name], record.name
        assert solver_presets(record.name) == {k: dict(v) for k, v in record.presets.items()}


@pytest.mark.parametrize("name", sorted(DECISIONS))
def test_paper_preset_builds_with_its_values_or_is_refused(name: str) -> None:
    if name not in solver_names():
        pytest.skip(f"{name} is not registered here")
    problem, x, y = _problem()
    presets = solver_presets(name)
    if "paper" not in presets:
        with pytest.raises(ConfigError, match=rf"solver '{name}' has no presets.*explicitly"):
            make_solver(name, problem, preset="paper")
        return
    solver = make_solver(name, problem, preset="paper")
    for key, value in presets["paper"].items():
        assert _same(_value(solver, key), value), (name, key, _value(solver, key), value)
    assert torch.isfinite(solver.step(x, y).loss)


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_an_explicit_option_beside_the_preset_wins(name: str) -> None:
    key, value = OVERRIDES[name]
    paper = solver_presets(name)["paper"]
    assert key not in paper or not _same(paper[key], value), "pick a value the preset lacks"
    solver = make_solver(name, _problem()[0], preset="paper", **{key: value})
    assert _same(_value(solver, key), value)
    for other, v in paper.items():  # the rest of the preset still applies
        if other != key:
            assert _same(_value(solver, other), v), (name, other)


def test_an_explicit_lr_wins_over_the_presets_lr_and_lr_none_keeps_it():
    problem = _problem()[0]
    assert solver_presets("adam")["paper"]["lr"] == 1e-3
    assert make_solver("adam", problem, preset="paper", lr=0.02).lr == 0.02
    assert make_solver("adam", problem, preset="paper", lr=None).lr == 1e-3


def test_an_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown adam preset 'nope'; valid adam presets are: "
                                          "paper"):
        make_solver("adam", _problem()[0], preset="nope")


def test_no_preset_leaves_the_defaults():
    problem = _problem()[0]
    assert make_solver("ddp", problem).mu == 1e-6
    assert make_solver("ddp", problem, preset="paper").mu == 1.0



@pytest.mark.parametrize("bad, message", [
    ({"momentum": 2.0}, r"sgd: need 0 <= momentum < 1"),  # the solver's own check
    ({"momentum": "abc"}, r"option momentum='abc' is text"),  # the registry's type check
    ({"nonsense": 1}, r"does not take these options: nonsense"),  # an unknown option
])
def test_preset_values_are_checked_like_explicit_options(temp_names, bad, message):
    temp_names.append("_bad_preset")
    register("_bad_preset",
             lambda problem, lr=None, **kw: GradientSolver(problem, "sgd", lr=lr, **kw),
             "sgd with a broken preset", solver_class=GradientSolver,
             options=(GradientSolver, solver_entry("sgd").options[1]), fixed=("optimizer",),
             presets={"paper": bad})
    with pytest.raises(ConfigError, match=message):
        make_solver("_bad_preset", _problem()[0], preset="paper")


def test_record_presets_are_a_copy():
    mine = {"paper": {"momentum": 0.5}}
    record = register("_copy", lambda problem, lr=None: GradientSolver(problem, "sgd", lr=lr),
                      "copy", solver_class=GradientSolver, presets=mine)
    try:
        mine["paper"]["momentum"] = 0.7
        assert record.presets["paper"]["momentum"] == 0.5
    finally:
        unregister("_copy")


def test_cli_solvers_lists_the_presets():
    r = CliRunner().invoke(cli, ["solvers"], catch_exceptions=False)
    assert r.exit_code == 0
    lines = {line.split()[0]: line for line in r.output.strip().splitlines()}
    for name, presets in DECISIONS.items():
        if name in lines:
            want = "presets: " + ", ".join(presets) if presets else "no presets"
            assert want in lines[name], lines[name]


def test_preset_passes_through_solver_options():
    """``--solver-opt preset=paper`` reaches make_solver's ``preset``."""
    solver = make_solver("ddpnopt", _problem()[0], lr=None, **{"preset": "paper"})
    assert solver.vxx == "exact" and solver.gain == 1.0 and solver.trust == 0.0


# ----------------------------------------------------------------------------- E-MSA perturb_init
def test_perturbation_is_seeded_uniform_of_the_given_size():
    problem = _problem()[0]
    like = torch.zeros(20000, dtype=torch.float64)
    a = EMSA(problem, perturb_init=0.005, perturb_seed=3)
    b = EMSA(problem, perturb_init=0.005, perturb_seed=3)
    c = EMSA(problem, perturb_init=0.005, perturb_seed=4)
    na, nb, nc = a.perturbation(like), b.perturbation(like), c.perturbation(like)
    assert torch.equal(na, nb) and not torch.equal(na, nc)
    assert not torch.equal(a.perturbation(like), na), "a fresh draw at every step"
    assert na.dtype == like.dtype and na.abs().max() <= 0.005
    assert na.abs().max() > 0.0049  # U(-a, a): it reaches the bound
    assert abs(na.std().item() / (0.005 / math.sqrt(3)) - 1) < 0.03
    assert abs(na.mean().item()) < 1e-4


def test_emsa_starts_the_inner_solver_at_the_perturbed_controls():
    problem, x, y = _problem()
    solver = EMSA(problem, rho=1.0, inner_iters=3, perturb_init=0.01, perturb_seed=7)
    z0 = solver.layout.flatten(problem.controls).detach().clone()
    seen: list[torch.Tensor] = []
    evaluate = solver.evaluate

    def spy(z, fr, need_grad=True, **kw):  # noqa: ANN202
        seen.append(z.detach().clone())
        return evaluate(z, fr, need_grad, **kw)

    solver.evaluate = spy
    info = solver.step(x, y)
    noise = EMSA(problem, perturb_init=0.01, perturb_seed=7).perturbation(z0)
    torch.testing.assert_close(seen[0], z0 + noise, rtol=0, atol=1e-15)
    assert info.extra["evaluations"] == 4  # the start costs one evaluation
    assert torch.all(info.extra["htilde_after"] >= info.extra["htilde_before"] - 1e-12)


def _run_emsa(steps: int, **options: Any) -> tuple[list[torch.Tensor], int]:
    problem, x, y = _problem(zero=True)
    solver = EMSA(problem, rho=1.0, inner_iters=4, **options)
    for _ in range(steps):
        solver.step(x, y)
    return [p.detach().clone() for p in problem.parameters()], solver.evaluations


def test_perturbed_emsa_is_deterministic_and_zero_is_a_no_op():
    plain, n_plain = _run_emsa(3)
    zero, n_zero = _run_emsa(3, perturb_init=0.0, perturb_seed=5)
    assert n_zero == n_plain and all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))
    one, n_one = _run_emsa(3, perturb_init=0.005, perturb_seed=1)
    two, _ = _run_emsa(3, perturb_init=0.005, perturb_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert n_one == n_plain + 3
    assert any(not torch.equal(a, b) for a, b in zip(one, plain, strict=True))


def test_the_noise_generator_is_checkpointed():
    problem, x, y = _problem()
    a = EMSA(problem, inner_iters=2, perturb_init=0.005, perturb_seed=2)
    a.step(x, y)
    b = EMSA(problem, inner_iters=2, perturb_init=0.005, perturb_seed=2)
    b.load_state_dict(a.state_dict())
    like = torch.zeros(50, dtype=torch.float64)
    assert torch.equal(a.perturbation(like), b.perturbation(like))


@pytest.mark.parametrize("cls", [EMSA, MSA])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), "abc"])
def test_a_bad_perturb_init_is_refused(cls, bad):
    with pytest.raises(ConfigError, match="perturb_init"):
        cls(_problem()[0], perturb_init=bad)


def test_msa_takes_perturb_init_and_its_preset():
    solver = make_solver("msa", _problem()[0], preset="paper")
    assert isinstance(solver, MSA) and solver.perturb_init == 0.005 and solver.rho() == 0.0
    # the public maxiter 10 counts L-BFGS-B iterations, not evaluations
    assert solver.inner_budget == "iterations" and solver.inner_iters == 10
    emsa = make_solver("emsa", _problem()[0], preset="paper")
    assert emsa.inner_budget == "iterations" and emsa.scaling == "reference"
    assert make_solver("emsa", _problem()[0]).inner_budget == "evaluations"


# ------------------------------------------------------------------------ NOVAS and DCEM layers
def _energy(x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return ((Y - x[:, None, :1]) ** 2).sum(-1)


def test_novas_paper_preset_is_the_public_regression_setting():
    layer = NOVAS(_energy, 1, preset="paper")
    assert layer.preset == "paper" and layer.mu0 == 0.0 and layer.sigma0 == 10.0
    want = {"n_samples": 100, "n_iter": 10, "shape": "soft_ce", "alpha": 1.0,
            "sharpness": 1000.0, "var_floor": 1e-3, "tol": 1e-4, "check_every": 1,
            "differentiate": "last"}
    assert {k: layer.options[k] for k in want} == want
    default = NOVAS(_energy, 1)
    assert default.preset is None and default.options["shape"] == "exponential"
    assert default.options["tol"] is None
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    y = layer(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == (5, 1) and torch.all(torch.isfinite(y))


def test_dcem_paper_preset_is_the_public_regression_setting():
    layer = DCEM(_energy, 1, preset="paper")
    assert layer.sigma0 == 7.0
    want = {"n_samples": 100, "n_elite": 10, "n_iter": 10, "temperature": 1.0,
            "normalize": True}
    assert {k: layer.options[k] for k in want} == want
    default = DCEM(_energy, 1)
    assert {k: default.options[k] for k in want} == want, "DCEM's defaults are the paper's"


def test_layer_presets_explicit_options_win_and_unknown_names_are_refused(monkeypatch):
    layer = NOVAS(_energy, 1, preset="paper", n_iter=3, sigma0=2.0)
    assert layer.options["n_iter"] == 3 and layer.sigma0 == 2.0
    assert layer.options["shape"] == "soft_ce"
    assert DCEM(_energy, 1, preset="paper", n_elite=5).options["n_elite"] == 5
    with pytest.raises(ConfigError, match="unknown NOVAS preset 'nope'; valid NOVAS presets "
                                          "are: paper"):
        NOVAS(_energy, 1, preset="nope")
    with pytest.raises(ConfigError, match="unknown DCEM preset"):
        DCEM(_energy, 1, preset="nope")
    monkeypatch.setitem(LAYER_PRESETS["NOVAS"], "broken", {"shape": "nope"})
    with pytest.raises(ConfigError, match="unknown shape function 'nope'"):
        NOVAS(_energy, 1, preset="broken")
