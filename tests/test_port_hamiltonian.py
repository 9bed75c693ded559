"""Port-Hamiltonian optimizer: energy behaviour of the integrators, the overdamped limit,
goal-oriented braking events, torch.optim drop-in use, checkpoints and the solver adapter."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ocnet.bridge import to_problem
from ocnet.ocp.errors import ConfigError
from ocnet.solvers.base import make_solver, solver_names
from ocnet.solvers.port_hamiltonian import (
    GoalBraking,
    PortHamiltonian,
    PortHamiltonianSolver,
)

F64 = torch.float64


def _quadratic(lams: torch.Tensor):
    """L(q) = 1/2 sum lam_i q_i^2: a closure factory (gradient in closed form, fast)."""

    def make_closure(q: torch.Tensor):
        def closure():
            with torch.no_grad():
                q.grad = lams * q
                return 0.5 * (lams * q * q).sum()

        return closure

    return make_closure


# ---------------------------------------------------------------- energy, gamma = 0


@pytest.mark.parametrize("integrator", ["symplectic_euler", "verlet"])
def test_symplectic_energy_bounded_no_drift_vs_explicit_euler(integrator):
    torch.manual_seed(0)
    lams = torch.linspace(0.2, 1.0, 5, dtype=F64)
    q0 = torch.randn(5, dtype=F64)
    m, a, c, h, n = 2.0, 1.5, 0.1, 0.05, 10_000
    k = a * lams + 2 * c                      # stiffness per mode; omega^2 = k / m
    w2 = k / m
    h0 = 0.5 * (k * q0 * q0).sum()

    q = q0.clone().requires_grad_(True)
    opt = PortHamiltonian([q], lr=h, gamma=0.0, mass=m, a=a, c=c, integrator=integrator,
                          track_energy=True)
    closure = _quadratic(lams)(q)
    energy, shadow = [], []
    for _ in range(n):
        opt.step(closure)
        energy.append(opt.last_energy)
        if integrator == "symplectic_euler":
            p = opt.state[q]["momentum"]  # (q_n, p_n) -> the pair after the step
            qn = q.detach()
            # the shadow energy of the map: exactly conserved on a quadratic
            shadow.append((p * p / (2 * m) + 0.5 * k * qn * qn - h * k * qn * p / (2 * m)).sum())
    e = torch.stack(energy)
    rel = (e - h0).abs() / h0
    # bounded: the oscillation is O(h omega), no growth over 10^4 steps
    bound = 2 * h * float(w2.max().sqrt())
    assert float(rel.max()) < bound, (float(rel.max()), bound)
    # no drift: the last 1000 steps oscillate within the same band as the first 1000
    assert float(rel[-1000:].max()) <= 1.05 * float(rel[:1000].max()) + 1e-12
    if integrator == "symplectic_euler":
        s = torch.stack(shadow)
        assert float(((s - s[0]).abs() / s[0]).max()) < 1e-11

    # explicit Euler on the same problem: energy multiplies by exactly (1 + h^2 omega^2)
    qe = q0.clone().requires_grad_(True)
    ope = PortHamiltonian([qe], lr=h, gamma=0.0, mass=m, a=a, c=c,
                          integrator="explicit_euler", track_energy=True)
    closure = _quadratic(lams)(qe)
    ee = []
    for _ in range(n):
        ope.step(closure)
        ee.append(ope.last_energy)
    ee = torch.stack(ee)
    steps = torch.arange(n, dtype=F64)[:, None]
    exact = (0.5 * k * q0 * q0 * (1 + h * h * w2) ** steps).sum(1)
    torch.testing.assert_close(ee, exact, rtol=1e-9, atol=0)
    assert float(ee[-1] / h0) > 10.0           # drift: grows by e^{sum h^2 w^2 n}
    assert float(ee[-1] / h0) > 100 * float(e[-1] / h0)


def test_verlet_shadow_energy_exactly_conserved():
    torch.manual_seed(1)
    lams = torch.linspace(0.3, 2.0, 4, dtype=F64)
    q0 = torch.randn(4, dtype=F64)
    m, h, n = 1.5, 0.1, 10_000
    k, w2 = lams, lams / m
    q = q0.clone().requires_grad_(True)
    opt = PortHamiltonian([q], lr=h, gamma=0.0, mass=m, integrator="verlet",
                          track_energy=True)
    closure = _quadratic(lams)(q)
    for _ in range(n):
        qn = q.detach().clone()
        opt.step(closure)
    # the last step started at (q_n, p_n) and stored p_{n+1/2} = p_n - h/2 k q_n
    p_half = opt.state[q]["momentum"]
    p_n = p_half + 0.5 * h * k * qn
    shadow_end = (p_n ** 2 / (2 * m) + 0.5 * k * qn ** 2 * (1 - h * h * w2 / 4)).sum()
    shadow_0 = (0.5 * k * q0 ** 2 * (1 - h * h * w2 / 4)).sum()
    assert abs(float(shadow_end / shadow_0) - 1) < 1e-11


# ---------------------------------------------------------------- continuous flow


def test_ode_flow_energy_never_increases_and_balances_dissipation():
    torch.manual_seed(2)
    target = torch.randn(3, dtype=F64)

    q = torch.tensor([1.5, -0.7, 0.3], dtype=F64, requires_grad=True)

    def closure():
        q.grad = None
        # non-convex: a double well per coordinate plus a coupling
        loss = ((q * q - 1) ** 2).sum() + torch.sin(q[0] * q[1]) + ((q - target) ** 2).sum()
        loss.backward()
        return loss

    gamma, m, h, c = 0.7, 1.3, 0.05, 0.05
    opt = PortHamiltonian([q], lr=h, gamma=gamma, mass=m, c=c, integrator="ode",
                          rtol=1e-11, atol=1e-13, track_energy=True)
    opt.state[q]["momentum"] = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    opt.state[q]["half"] = False
    energies, moms = [], []
    for _ in range(120):
        moms.append(opt.state[q]["momentum"].clone())
        opt.step(closure)
        energies.append(opt.last_energy)
    e = torch.stack(energies)
    de = e[1:] - e[:-1]
    assert float(de.max()) <= 1e-10 * float(e[0])     # never increases
    assert float(e[-1]) < 0.9 * float(e[0])
    # dH/dt = -gamma |p/m|^2: trapezoid rule on each [0, h], error O(h^3)
    p = torch.stack(moms)
    rate = gamma * (p * p).sum(1) / m ** 2
    predicted = -0.5 * h * (rate[1:] + rate[:-1])
    assert float((de - predicted).abs().max()) < 5 * h ** 3 * float(rate.max() + 1)


def test_ode_needs_closure():
    q = torch.zeros(2, requires_grad=True)
    opt = PortHamiltonian([q], integrator="ode")
    q.grad = torch.ones(2)
    with pytest.raises(ConfigError, match="closure"):
        opt.step()


# ---------------------------------------------------------------- overdamped limit


@pytest.mark.parametrize("integrator", ["symplectic_euler", "verlet"])
def test_overdamped_limit_is_gradient_descent(integrator):
    torch.manual_seed(3)
    d = 6
    r = torch.randn(d, d, dtype=F64)
    amat = r @ r.T / d + 0.2 * torch.eye(d, dtype=F64)
    b = torch.randn(d, dtype=F64)
    q0 = torch.randn(d, dtype=F64)
    eta, n = 0.2, 100

    def grad(x):
        return amat @ x - b

    gd = [q0.clone()]
    for _ in range(n):
        gd.append(gd[-1] - eta * grad(gd[-1]))
    gd = torch.stack(gd)

    errors = []
    gammas = [10.0, 30.0, 100.0]
    for gamma in gammas:
        q = q0.clone().requires_grad_(True)
        # overdamped scaling: q' = -grad L / gamma, so the GD step eta is h / gamma
        opt = PortHamiltonian([q], lr=eta * gamma, gamma=gamma, mass=1.0, integrator=integrator)
        traj = [q0.clone()]
        for _ in range(n):
            q.grad = grad(q.detach())
            opt.step()
            traj.append(q.detach().clone())
        errors.append(float((torch.stack(traj) - gd).abs().max()))
    scale = float(gd.abs().max())
    # predicted error O(m / (eta gamma^2)) relative to the trajectory scale
    for gamma, err in zip(gammas, errors, strict=True):
        assert err <= 4.0 * scale / (eta * gamma ** 2), (gamma, err)
    assert errors[-1] < 2e-3 * scale
    slope = math.log(errors[-1] / errors[0]) / math.log(gammas[-1] / gammas[0])
    assert -2.3 < slope < -1.7, slope


# ---------------------------------------------------------------- heavy ball equivalence


def test_symplectic_euler_is_torch_heavy_ball():
    torch.manual_seed(4)
    model_a = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model_b = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model_b.load_state_dict(model_a.state_dict())
    x, y = torch.randn(32, 3, dtype=F64), torch.randn(32, 2, dtype=F64)
    h, gamma, m, c = 0.3, 0.8, 1.7, 0.01
    beta = 1 / (1 + gamma * h / m)
    opt_a = PortHamiltonian(model_a.parameters(), lr=h, gamma=gamma, mass=m, c=c)
    # c |q|^2 has gradient 2 c q: torch's weight_decay 2c
    opt_b = torch.optim.SGD(model_b.parameters(), lr=beta * h * h / m, momentum=beta,
                            weight_decay=2 * c)
    for _ in range(30):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- goal-oriented braking


def _reference_events(losses, ratios, beta, l0=None):
    ema, fired = None, [None] * len(ratios)
    for n, loss in enumerate(losses):
        ema = loss if ema is None else beta * ema + (1 - beta) * loss
        ref = losses[0] if l0 is None else l0
        for k, r in enumerate(ratios):
            if fired[k] is None and ema <= r * ref:
                fired[k] = n
    return fired


def test_events_fire_at_first_step_goal_met_unsmoothed():
    losses = [10.0, 9.0, 6.0, 5.0001, 5.0, 7.0, 4.0, 3.2, 3.0, 8.0, 2.0]
    sched = GoalBraking([0.5, 0.3], [0.1, 1.0, 10.0], step_factors=[1.0, 0.5, 0.25],
                        smoothing=0.0)
    frictions, factors, phases = [], [], []
    for loss in losses:
        g, s = sched.observe(torch.tensor(loss, dtype=F64))
        frictions.append(float(g))
        factors.append(float(s))
        phases.append(int(sched.phase))
    # goal 1 = 5.0 met first (<=) at index 4, never at 3 (5.0001); goal 2 = 3.0 at index 8
    assert [e["step"] for e in sched.events()] == [4, 8]
    assert frictions == [0.1] * 4 + [1.0] * 4 + [10.0] * 3
    assert factors == [1.0] * 4 + [0.5] * 4 + [0.25] * 3
    assert phases == [0] * 4 + [1] * 4 + [2] * 3   # the loss rising again does not undo
    assert sched.events()[0]["target"] == pytest.approx(5.0)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_events_match_reference_with_smoothing(beta):
    g = torch.Generator().manual_seed(5)
    n = 400
    t = torch.arange(n, dtype=F64)
    losses = (2.3 * torch.exp(-t / 60) * (1 + 0.3 * torch.rand(n, generator=g, dtype=F64)))
    losses = losses.tolist()
    ratios = [0.5, 0.1, 0.02]
    sched = GoalBraking(ratios, [0.2, 2.0, 20.0, 200.0], smoothing=beta)
    gammas = []
    for loss in losses:
        gammas.append(float(sched.observe(torch.tensor(loss, dtype=F64))[0]))
    expected = _reference_events(losses, ratios, beta)
    assert all(e is not None for e in expected)
    assert [e["step"] for e in sched.events()] == expected
    for k, step in enumerate(expected):       # friction switches exactly at the event step
        assert gammas[step] >= [2.0, 20.0, 200.0][k]
        assert gammas[step - 1] < [2.0, 20.0, 200.0][k]


def test_two_goals_met_in_one_step_both_fire():
    sched = GoalBraking([0.5, 0.2], [0.0, 1.0, 2.0], smoothing=0.0, initial_loss=1.0)
    for loss in [0.9, 0.1, 0.05]:
        sched.observe(torch.tensor(loss))
    assert [e["step"] for e in sched.events()] == [1, 1]


def test_goal_braking_validates():
    with pytest.raises(ConfigError, match="decreasing"):
        GoalBraking([0.1, 0.5], [1, 2, 3])
    with pytest.raises(ConfigError, match="frictions"):
        GoalBraking([0.5], [1.0])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        GoalBraking([0.5], [1.0, 2.0], smoothing=1.0)
    assert GoalBraking("0.1,0.01", "1,2,3").ratios == [0.1, 0.01]


def test_schedule_in_optimizer_needs_loss():
    q = torch.zeros(2, requires_grad=True)
    opt = PortHamiltonian([q], schedule=GoalBraking([0.5], [0.1, 1.0]))
    q.grad = torch.ones(2)
    with pytest.raises(ConfigError, match="needs the loss"):
        opt.step()


# ---------------------------------------------------------------- drop-in + checkpoints


def _toy(seed: int):
    torch.manual_seed(seed)
    x = torch.randn(128, 4)
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    return model, x, y


@pytest.mark.parametrize("integrator", ["symplectic_euler", "verlet", "ode"])
def test_drop_in_training_loop(integrator):
    model, x, y = _toy(6)
    sched = GoalBraking([0.7], [0.5, 5.0], smoothing=0.5)
    opt = PortHamiltonian(model.parameters(), lr=0.5, integrator=integrator, schedule=sched,
                          ode_method="rk4", ode_options={"step_size": 0.25})
    loss_fn = nn.CrossEntropyLoss()
    first = None
    for _ in range(150):
        if integrator == "ode":
            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
        else:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step(loss=loss)
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) < 0.5 * first
    assert sched.events() and sched.events()[0]["step"] > 0


@pytest.mark.parametrize("integrator", ["symplectic_euler", "verlet"])
def test_state_dict_round_trip(integrator):
    model, x, y = _toy(7)
    loss_fn = nn.CrossEntropyLoss()

    def make(m):
        return PortHamiltonian(m.parameters(), lr=0.4, integrator=integrator,
                               schedule=GoalBraking([0.8, 0.6], [0.3, 3.0, 30.0]),
                               track_energy=True)

    def train(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            opt.step(loss=loss)

    opt = make(model)
    train(model, opt, 20)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 40)

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2, _, _ = _toy(99)
    model2.load_state_dict(ck["model"])
    opt2 = make(model2)
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, 40)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.schedule.events() == opt2.schedule.events()

    opt3 = PortHamiltonian(model2.parameters(), integrator=integrator)
    with pytest.raises(ConfigError, match="schedule"):
        opt3.load_state_dict(ck["opt"])


# ---------------------------------------------------------------- solver adapter


def test_solver_adapter_matches_optimizer_on_module():
    assert {"phb", "phb-goal"} <= set(solver_names())
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(40, 3, dtype=F64), torch.randint(0, 3, (40,))
    solver = make_solver("phb-goal", to_problem(net, "cross_entropy"), lr=0.5, gamma=0.3,
                         r=0.95, events=2, brake=4.0, smoothing=0.0, integrator="verlet")
    assert isinstance(solver, PortHamiltonianSolver)
    opt = PortHamiltonian(ref.parameters(), lr=0.5, integrator="verlet",
                          schedule=GoalBraking.geometric(0.95, 2, 0.3, 4.0, smoothing=0.0))
    for _ in range(60):
        info = solver.step(x, y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        opt.step(loss=loss)
        torch.testing.assert_close(info.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert [e["step"] for e in solver.events()] == [e["step"] for e in opt.schedule.events()]
    assert len(solver.events()) == 2
    assert int(info.extra["phase"]) == 2 and float(info.extra["friction"]) == pytest.approx(4.8)
    assert info.extra["energy"] is not None and info.grad_norm is not None

    state = solver.state_dict()
    fresh = make_solver("phb-goal", to_problem(net, "cross_entropy"), lr=0.5, gamma=0.3,
                        r=0.95, events=2, brake=4.0, smoothing=0.0, integrator="verlet")
    fresh.load_state_dict(state)
    assert fresh.steps == 60 and fresh.events() == solver.events()


def test_solver_rejects_bad_options():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="integrator"):
        make_solver("phb", to_problem(net, "cross_entropy"), integrator="rk45")
    with pytest.raises(ConfigError, match="does not take"):
        make_solver("phb", to_problem(net, "cross_entropy"), friction=2.0)


@pytest.mark.parametrize("integrator", ["symplectic_euler", "verlet", "explicit_euler"])
def test_step_never_reads_tensors_on_host(integrator, monkeypatch):
    """The braking decision and the update stay on device: no bool/float/item of a tensor."""
    model, x, y = _toy(9)
    opt = PortHamiltonian(model.parameters(), lr=0.4, integrator=integrator,
                          schedule=GoalBraking([0.9, 0.5], [0.3, 3.0, 30.0], smoothing=0.5),
                          track_energy=True)
    losses = []
    for i in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if i == 1:  # from now on any host read of a tensor fails
            def refuse(*args, **kwargs):
                raise AssertionError("host read of a tensor inside the step")

            for name in ("__bool__", "__float__", "__int__", "item", "tolist", "numpy", "cpu"):
                monkeypatch.setattr(torch.Tensor, name, refuse)
        opt.step(loss=loss)
        losses.append(loss.detach())
    monkeypatch.undo()
    assert len(opt.schedule.events()) >= 1
    assert float(torch.stack(losses)[-1]) < float(losses[0])


# ---------------------------------------------------------------- the paper rule (one switch)


def _window_reference(losses: list[float], window: int, ratio: float) -> int | None:
    """Pure-Python reference of rule='paper': the first n with mean(L[n-w+1..n]) <= r L_0."""
    target = ratio * losses[0]
    for n in range(len(losses)):
        recent = losses[max(0, n - window + 1):n + 1]
        if sum(recent) / len(recent) <= target:
            return n
    return None


def test_paper_rule_fires_exactly_when_the_window_mean_reaches_the_goal():
    # L_0 = 2, goal 0.25 L_0 = 0.5; window means of 3: 2, 1.75, 1.5, 1.1, 0.767, 0.533, 0.333
    # -> the event is at step 6, although single losses are <= 0.5 from step 4 on
    losses = [2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.9, 0.9]
    sched = GoalBraking([0.25], [0.3, 3.0], window=3)
    frictions, smoothed = [], []
    for loss in losses:
        g, s = sched.observe(torch.tensor(loss, dtype=F64))
        frictions.append(float(g))
        smoothed.append(float(sched.smoothed_loss))
        assert float(s) == 1.0
    assert [e["step"] for e in sched.events()] == [6] == [_window_reference(losses, 3, 0.25)]
    assert frictions == [0.3] * 6 + [3.0] * 4        # braked from the event on, never undone
    assert smoothed[:7] == pytest.approx([2.0, 1.75, 1.5, 1.1, 2.3 / 3, 1.6 / 3, 1.0 / 3])


@pytest.mark.parametrize("window", [1, 7, 40])
def test_paper_rule_matches_reference_on_a_noisy_sequence(window):
    g = torch.Generator().manual_seed(11)
    n = 300
    t = torch.arange(n, dtype=F64)
    losses = (2.3 * torch.exp(-t / 50) * (1 + 0.8 * torch.rand(n, generator=g, dtype=F64)))
    losses = losses.tolist()
    expected = _window_reference(losses, window, 0.1)
    assert expected is not None
    net = nn.Sequential(nn.Linear(2, 2))
    solver = make_solver("phb-goal", to_problem(net, "cross_entropy"), rule="paper", r=0.1,
                         gamma=0.2, brake=25.0, window=window)
    sched = solver.schedule
    assert sched.ratios == [0.1] and sched.frictions == [0.2, 5.0] and sched.window == window
    gammas = [float(sched.observe(torch.tensor(v, dtype=F64))[0]) for v in losses]
    assert [e["step"] for e in sched.events()] == [expected]
    assert gammas == [0.2] * expected + [5.0] * (n - expected)
    if window > 1:  # the averaging matters: single losses reach the goal earlier
        assert min(i for i, v in enumerate(losses) if v <= 0.1 * losses[0]) < expected


def test_paper_rule_options_and_errors():
    problem = to_problem(nn.Sequential(nn.Linear(2, 2)), "cross_entropy")
    sched = make_solver("phb-goal", problem, rule="paper").schedule
    assert (sched.ratios, sched.frictions, sched.window) == ([0.1], [0.5, 5.0], 20)
    sched = make_solver("phb-goal", problem, rule="paper", ratios="0.3,0.03",
                        brake=4.0).schedule
    assert sched.ratios == [0.3, 0.03] and sched.frictions == [0.5, 2.0, 8.0]
    default = make_solver("phb-goal", problem).schedule  # the geometric default is unchanged
    assert (default.ratios, default.frictions, default.window) == (
        pytest.approx([0.1, 0.01]), pytest.approx([0.5, 5.0, 50.0]), None)
    with pytest.raises(ConfigError, match="rule"):
        make_solver("phb-goal", problem, rule="papers")
    with pytest.raises(ConfigError, match="window"):
        make_solver("phb-goal", problem, rule="paper", window=0)
    with pytest.raises(ConfigError, match="step_factors"):
        make_solver("phb-goal", problem, rule="paper", step_factors="1,0.5")
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        make_solver("phb-goal", problem, rule="paper", r=1.5)


def test_paper_rule_step_never_reads_tensors_on_host(monkeypatch):
    model, x, y = _toy(9)
    opt = PortHamiltonian(model.parameters(), lr=0.4,
                          schedule=GoalBraking([0.9], [0.3, 3.0], window=5), track_energy=True)
    for i in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if i == 1:
            def refuse(*args, **kwargs):
                raise AssertionError("host read of a tensor inside the step")

            for name in ("__bool__", "__float__", "__int__", "item", "tolist", "numpy", "cpu"):
                monkeypatch.setattr(torch.Tensor, name, refuse)
        opt.step(loss=loss)
    monkeypatch.undo()
    assert len(opt.schedule.events()) == 1
    sd = opt.state_dict()  # the window and its buffer survive a checkpoint
    opt2 = PortHamiltonian(model.parameters(), lr=0.4,
                           schedule=GoalBraking([0.9], [0.3, 3.0], window=5))
    opt2.load_state_dict(sd)
    assert opt2.schedule.window == 5
    assert torch.equal(opt2.schedule._state["buf"], opt.schedule._state["buf"])
