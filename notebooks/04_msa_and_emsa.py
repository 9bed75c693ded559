# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Why basic MSA diverges and E-MSA does not
#
# Pontryagin's maximum principle says that at an optimum every control maximises its
# Hamiltonian, $u_t^* = \arg\max_u H_t(x_t^*, p_{t+1}^*, u)$. The **method of successive
# approximations** (MSA) turns this into an iteration: roll out $x$, sweep back $p$, then
# with $x$ and $p$ *frozen* set every $u_t \leftarrow \arg\max_u H_t(x_t, p_{t+1}, u)$.
#
# The trouble: the maximiser may lie far from the current $u_t$, where the frozen $x$ and
# $p$ say nothing about the true states. The **extended MSA** (Li, Chen, Tai, E 2018)
# maximises the augmented Hamiltonian instead,
#
# $$\tilde H_t(u) = H_t(x_t, p_{t+1}, u)
#   - \frac{\rho}{2}\,\big|x_{t+1} - f_t(x_t, u)\big|^2
#   - \frac{\rho}{2}\,\big|p_t - \nabla_x H_t(x_t, p_{t+1}, u)\big|^2,$$
#
# whose penalties vanish at the current $u_t$ and grow when the new control would
# invalidate the frozen states or costates. For $\rho$ large enough the objective $J$
# decreases at every iteration (their Theorem), and by construction each layer's
# $\tilde H_t$ never decreases from the current control (the inner maximiser only
# accepts steps that increase it).

# %%
import time

import matplotlib.pyplot as plt
import torch

from ocnet.dynamics import LinearQuadratic
from ocnet.ocp import Problem
from ocnet.solvers import EMSA, MSA

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64


def lq_problem(seed=0):
    """4 linear stages, cheap controls R = 0.01 I: argmax H overshoots badly."""
    g = torch.Generator().manual_seed(seed)
    n, m, stages = 3, 2, []
    for _ in range(4):
        A = torch.eye(n, dtype=D) + 0.3 * torch.randn(n, n, generator=g, dtype=D)
        B = torch.randn(n, m, generator=g, dtype=D)
        M = torch.randn(n, n, generator=g, dtype=D)
        Q, R = M @ M.T / n + 0.1 * torch.eye(n, dtype=D), 0.01 * torch.eye(m, dtype=D)
        u = 0.3 * torch.randn(m, generator=g, dtype=D)
        stages.append(LinearQuadratic(A, B, u, Q, R))  # convex: the optimum exists
    problem = Problem(stages, lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    return problem, torch.randn(6, n, generator=g, dtype=D), torch.randn(6, n, generator=g, dtype=D)


def history(make_solver, iters):
    problem, x, y = lq_problem()
    solver = make_solver(problem)
    js, steps = [], []
    for _ in range(iters):
        info = solver.step(x, y)
        js.append(float(info.loss.detach()))
        steps.append(info)
        if not js[-1] < 1e12:
            break
    with torch.no_grad():
        js.append(float(problem.objective(x, y)))
    return js, steps


runs = {"basic MSA": history(lambda p: MSA(p), 8)}
for rho in (1.0, 5.0, 10.0):
    runs[f"E-MSA rho={rho:g}"] = history(lambda p, r=rho: EMSA(p, rho=r), 30)
for k, (js, _) in runs.items():
    print(f"{k:14s} J: {js[0]:.4g} -> {js[-1]:.4g}  ({len(js) - 1} iterations)")

# %% [markdown]
# The claims, checked: basic MSA blows up (by orders of magnitude, or to non-finite
# values), so does E-MSA with too small a $\rho$ (here $\rho = 1$), E-MSA with a large
# enough $\rho$ decreases $J$ at every iteration, and in every E-MSA step every
# layer's augmented Hamiltonian is at least what it was at the current controls.

# %%
j0 = runs["basic MSA"][0][0]
assert not runs["basic MSA"][0][-1] < 100 * j0, "basic MSA was expected to diverge here"
assert not runs["E-MSA rho=1"][0][-1] < 100 * j0, "rho = 1 is too small for this problem"
for name in ("E-MSA rho=5", "E-MSA rho=10"):
    js = runs[name][0]
    assert js[-1] < js[0]
    assert all(b <= a + 1e-12 for a, b in zip(js[:-1], js[1:], strict=True)), name
# the price of safety: the larger rho, the shorter the steps
assert runs["E-MSA rho=5"][0][-1] < runs["E-MSA rho=10"][0][-1]
worst = float("inf")
for name in ("E-MSA rho=1", "E-MSA rho=5", "E-MSA rho=10"):
    for info in runs[name][1]:
        before, after = info.extra["htilde_before"], info.extra["htilde_after"]
        if bool(torch.isfinite(before).all()):  # (the diverging run ends in overflow)
            worst = min(worst, float((after - before).min()))
print(f"min over steps and layers of Htilde_after - Htilde_before = {worst:.2e}")
assert worst >= -1e-12

# %%
plt.figure(figsize=(6.5, 4))
for k, (js, _) in runs.items():
    plt.semilogy(range(len(js)), js, "o-" if "basic" in k else "-", label=k)
plt.xlabel("iteration")
plt.ylabel("objective J")
plt.title("linear-quadratic problem, 4 stages, R = 0.01 I")
plt.legend()
plt.grid(alpha=0.3, which="both")
plt.show()

# %%
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. For this LQ problem, $\arg\max_u H_t$ has a closed form. Derive it and show why a
#    small $R$ makes the step huge.
# 2. Find the smallest $\rho$ (roughly) for which E-MSA still decreases $J$ monotonically.
#    How does it scale with $1/R$?
# 3. Use a schedule: `EMSA(problem, rho=10.0, rho_decay=0.9, rho_min=0.5)`. Does it
#    converge faster?
# 4. Iterate E-MSA with $\rho = 5$ until the controls stop moving
#    (`info.extra["control_change"] < 1e-10`) and check that `problem.gradients(x, y)`
#    vanishes there: a fixed point of E-MSA satisfies the Pontryagin conditions. Why is
#    the convergence so slow here (look at the condition number of $R$)?
# 5. Train the DIGITS network of notebook 2 with `make_solver("emsa", problem)`. How
#    does its cost per step compare with Adam's, and why (the inner maximisation)?
