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
# # 6. Dual-weighted residuals: watch the mesh refine where the estimator says
#
# Notebook 5 made a ResNet the explicit-Euler discretisation of a neural ODE on a time
# mesh. Which intervals should be bisected (which layers inserted) to reduce the error in
# the quantity we care about, the training objective $J$? The **dual-weighted residual**
# (DWR) method of Becker and Rannacher answers with the costates: the error of the goal is
# the primal residual weighted by the dual solution,
#
# $$J(\text{ODE}) - J_h \approx \sum_m \eta_m, \qquad
# \eta_m \approx \frac{h_m}{2}\Big(H_m(x_{m+1}) - H_m(x_m)\Big),$$
#
# the costate $p$ weighting the local Euler residual on interval $m$ (docs: *Dual-weighted
# residuals*, with the full estimator including the dual and control residuals).
# **Doerfler marking** then bisects the fewest intervals whose indicators carry a fraction
# $\theta$ of $\sum_m |\eta_m|$; the trained controls are copied to both halves (DG(0)
# prolongation) and training continues (Hintermüller, Hinze, Korolev 2026).
#
# Checked below: the estimator predicts the true Euler error of a fixed network
# (effectivity $\approx 1$), the effectivity stays near 1 on a linear-quadratic problem
# whose exact optimum is known in closed form, and each refinement bisects exactly the
# Doerfler set of the indicators.

# %%
import itertools
import time

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg as sl
import torch

from ocnet.bridge import flatten_controls, objective_gradient, objective_hessian, unflatten_controls
from ocnet.dynamics import TimeMesh
from ocnet.neural_ode import DG0Regularizer, LinearField, NeuralODE, make_field
from ocnet.solvers import DWR, doerfler, indicators

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64

# %% [markdown]
# ## 1. The estimator predicts the Euler error of a fixed network
# With the controls fixed, the true error is $J$ of the exact ODE flow (a tight
# torchdiffeq solve) minus $J$ of the Euler network.

# %%
g = torch.Generator().manual_seed(1)
model = NeuralODE(make_field("activation", 3, "tanh", scale=3.0), TimeMesh.uniform(2.0, 4),
                  in_features=2, out_features=3, generator=g, dtype=D)
x = torch.randn(32, 2, generator=g, dtype=D)
y = torch.randint(0, 3, (32,), generator=g)
rows = []
for _ in range(4):
    model = model.refine(list(range(model.num_layers)))
    p = model.problem("cross_entropy")
    with torch.no_grad():
        true = float(p.terminal(model.integrate(x, rtol=1e-10, atol=1e-12), y) - p.objective(x, y))
    est = float(indicators(model, p, x, y).sum())
    rows.append((model.num_layers, true, est, est / true))
print("| layers | true error | estimate | effectivity |\n|---|---|---|---|")
for n, t, e, r in rows:
    print(f"| {n} | {t:.3e} | {e:.3e} | {r:.3f} |")
assert all(0.8 <= r[3] <= 1.25 for r in rows) and abs(rows[-1][3] - 1) < 0.05

# %% [markdown]
# ## 2. Effectivity on an optimal control problem with a closed-form optimum
# $\dot x = A x + B\theta$, $\min \tfrac12\,\mathrm{mean}_i |x_i(T) - y_i|^2 +
# \tfrac\lambda2\int_0^T|\theta|^2$: the optimum follows from the controllability
# Gramian. The discrete problem is quadratic in $\theta$, so one Newton step solves each
# level exactly, and the estimate can be compared with the true error $J^* - J_h$.

# %%
A = torch.tensor([[-0.5, 3.0], [-3.0, -0.5]], dtype=D)
B = torch.tensor([[0.0], [1.0]], dtype=D)
LAM, T = 0.05, 1.0
g = torch.Generator().manual_seed(0)
x0, y0 = torch.randn(8, 2, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)
a, b = A.numpy(), B.numpy()
big = sl.expm(np.block([[-a, b @ b.T], [np.zeros((2, 2)), a.T]]) * T)
W = big[2:, 2:].T @ big[:2, 2:]
eat = sl.expm(a * T)
gg = np.linalg.solve(np.eye(2) + W / LAM, eat @ x0.numpy().mean(0) - y0.numpy().mean(0))
xT = x0.numpy() @ eat.T - (W @ gg / LAM)[None]
j_exact = float(0.5 * ((xT - y0.numpy()) ** 2).sum(1).mean() + 0.5 * gg @ W @ gg / LAM)


def newton(problem, x, y):
    H = objective_hessian(problem, x, y)
    step = torch.linalg.solve(H, objective_gradient(problem, x, y))
    v = flatten_controls(problem.controls) - step
    problem.set_controls(unflatten_controls(v, problem.controls))


lq = NeuralODE(LinearField(A, B), TimeMesh.uniform(T, 8), lift="none", head="none",
               reg=DG0Regularizer(LAM, 1.0, 0.0))
hist = DWR(lq, "mse", inner=newton, max_layers=10_000, max_levels=4, estimator="full").run(x0, y0)
eff = [lev.estimate / (j_exact - lev.objective) for lev in hist]
print(f"J* = {j_exact:.8f}")
for lev, e in zip(hist, eff, strict=True):
    print(f"{lev.n_layers:4d} layers: J_h = {lev.objective:.8f}, "
          f"error {j_exact - lev.objective:.2e}, "
          f"estimate {lev.estimate:.2e}, effectivity {e:.3f}")
assert all(0.8 <= e <= 1.25 for e in eff), eff

# %% [markdown]
# ## 3. Adaptive layer insertion on a classification problem

# %%
g = torch.Generator().manual_seed(0)
xc = torch.randn(192, 2, generator=g, dtype=D)
yc = (xc.norm(dim=1) > 1.1).long()
net = NeuralODE(make_field("activation", 3), TimeMesh.uniform(3.0, 3), in_features=2,
                out_features=2, generator=g, dtype=D, reg=DG0Regularizer(1e-3))
dwr = DWR(net, inner="adam", lr=0.05, steps=40, theta=0.5, max_layers=14, max_levels=6)
levels = dwr.run(xc, yc, xc, yc)
for a_lev, b_lev, mod in zip(levels[:-1], levels[1:], dwr.models[:-1], strict=True):
    assert a_lev.marked == sorted(doerfler(a_lev.eta, 0.5))            # the Doerfler set ...
    assert np.allclose(b_lev.nodes, mod.mesh.refine(a_lev.marked)[0].nodes)  # ... is bisected
    assert b_lev.n_layers == a_lev.n_layers + len(a_lev.marked)
# Doerfler's set is the smallest one that carries theta of the total
eta = np.abs(levels[0].eta)
smallest = min(k for k in range(1, len(eta) + 1) for s in itertools.combinations(range(len(eta)), k)
               if eta[list(s)].sum() >= 0.5 * eta.sum() - 1e-12)
assert len(levels[0].marked) == smallest
print("layers per level:", [lev.n_layers for lev in levels])

fig, ax = plt.subplots(figsize=(7, 3.5))
for k, lev in enumerate(levels):
    nodes = lev.nodes
    for m in range(lev.n_layers):
        col = "tab:red" if m in lev.marked else "tab:blue"
        ax.plot([nodes[m], nodes[m + 1]], [k, k], color=col, lw=6, solid_capstyle="butt")
    ax.plot(nodes, [k] * len(nodes), "k|", ms=12)
ax.set(xlabel="t", ylabel="refinement level", yticks=range(len(levels)),
       title="the mesh per level (red: marked for bisection)")
ax.invert_yaxis()
plt.show()
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Change $\theta$ to 0.9 and to 0.2. How many levels does the budget of 14 layers
#    allow, and where do the layers go?
# 2. Compare with `strategy="uniform"` and `strategy="random"` at equal layer counts
#    (the `adapt` command does this: `ocnet adapt --data swissroll`).
# 3. In part 2 use `estimator="primal"`. Which residuals does it leave out, and how does
#    the effectivity change?
# 4. Show that the indicator of interval $m$ vanishes when $F$ does not change along the
#    Euler step. Why does that make sense for a first-order method?
