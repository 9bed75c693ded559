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
# # 5. Neural ODEs, DG(0) controls and the order of explicit Euler
#
# A **neural ODE** is the continuous-time control system
# $\dot x(t) = F(x(t), \theta(t))$ on $[0, T]$, here with the field
# $F(x, \theta) = \tanh(K x + b)$, $\theta = (K, b)$. On a time mesh
# $0 = t_0 < t_1 < \dots < t_N = T$ with $h_m = t_{m+1} - t_m$ the controls are taken
# **piecewise constant** ($\theta(t) = \theta_m$ on $[t_m, t_{m+1})$: the discontinuous
# Galerkin space of degree 0, DG(0)), and the ODE is marched with explicit Euler,
#
# $$x_{m+1} = x_m + h_m\,F(x_m, \theta_m).$$
#
# That is exactly a residual network with $N$ layers: **refining the mesh inserts
# layers**. Two facts follow and are checked here:
#
# * bisecting intervals and copying $\theta_m$ to both halves leaves the control
#   *function* $\theta(t)$ unchanged (so the refined network approximates the same ODE);
# * the Euler error at $T$ for a fixed $\theta(t)$ is first order: $|x_N - x(T)| = O(h)$,
#   a slope $\approx 1$ on a log-log plot against a high-accuracy ODE solve (torchdiffeq's
#   `dopri5`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from ocnet import make_solver
from ocnet.data import batches, load
from ocnet.dynamics import TimeMesh
from ocnet.neural_ode import NeuralODE, make_field

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64
g = torch.Generator().manual_seed(0)
field = make_field("activation", 3, "tanh", scale=3.0)
coarse = NeuralODE(field, TimeMesh.uniform(2.0, 4), in_features=2, out_features=2,
                   generator=g, dtype=D)
print(coarse.mesh, "->", coarse.num_layers, "Euler layers")

# %% [markdown]
# ## DG(0) controls survive refinement exactly

# %%
fine = coarse.refine([1, 2])           # bisect intervals 1 and 2: 6 layers
ts = torch.linspace(0, 2.0, 801).tolist()
same = all(torch.equal(a[0], b[0]) for a, b in zip(coarse.theta(ts), fine.theta(ts), strict=True))
print("layers:", coarse.num_layers, "->", fine.num_layers, "; theta(t) unchanged:", same)
assert fine.num_layers == 6 and same

k00 = [float(th[0][0, 0]) for th in fine.theta(ts)]
plt.figure(figsize=(6, 2.8))
plt.plot(ts, k00, drawstyle="steps-post")
for t in fine.mesh.nodes:
    plt.axvline(t, color="gray", lw=0.5, ls=":")
plt.xlabel("t")
plt.ylabel("K(t)[0, 0]")
plt.title("a DG(0) control on the refined mesh (dotted: nodes)")
plt.show()

# %% [markdown]
# ## Explicit Euler is first order
# Refine uniformly $k$ times ($N = 4\cdot 2^k$) and compare $x_N$ with torchdiffeq on the
# same piecewise-constant $\theta(t)$.

# %%
x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=D)
ref = coarse.integrate(x, "dopri5", rtol=1e-10, atol=1e-12, return_states=True)[-1]
hs, errs, model = [], [], coarse
for _k in range(1, 8):
    model = model.refine(list(range(model.num_layers)))
    hs.append(model.mesh.lengths[0])
    errs.append(float(torch.linalg.vector_norm(model.states(x)[-1] - ref)))
slope = float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
print("h:", [f"{h:.3g}" for h in hs])
print("error:", [f"{e:.2e}" for e in errs])
print(f"fitted order (log-log slope): {slope:.3f}")
assert abs(slope - 1.0) < 0.15

plt.figure(figsize=(5, 4))
plt.loglog(hs, errs, "o-", label=f"explicit Euler, slope {slope:.2f}")
plt.loglog(hs, [errs[-1] * h / hs[-1] for h in hs], "k--", lw=0.8, label="O(h)")
plt.xlabel("h")
plt.ylabel("|x_N - x(T)|")
plt.legend()
plt.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# ## Training a neural ODE is training a ResNet
# `NeuralODE.problem(loss)` is an ordinary `ocnet.ocp.Problem` (lift, $N$ Euler stages,
# dense head), so any solver trains it.

# %%
data = load("moons", seed=0, n_train=256, n_test=256, dtype=D)
ode = NeuralODE(make_field("activation", 3, "tanh"), TimeMesh.uniform(2.0, 8), in_features=2,
                out_features=2, generator=torch.Generator().manual_seed(0), dtype=D)
problem = ode.problem("cross_entropy")
print(problem)
solver = make_solver("adam", problem, lr=0.03)
gen = torch.Generator().manual_seed(0)
for _epoch in range(30):
    for xb, yb in batches(data.x_train, data.y_train, 64, generator=gen):
        solver.step(xb, yb)
acc = float((ode(data.x_test).argmax(1) == data.y_test).double().mean())
print(f"test accuracy after {solver.steps} Adam steps: {acc:.3f}")
assert acc > 0.9
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Refine only the first half of the mesh several times. Which part of the error
#    decreases? (Notebook 6 lets an estimator decide where to refine.)
# 2. Replace Euler by the midpoint rule in a custom `Stage` and repeat the order plot:
#    which slope do you expect?
# 3. Why does the Euler error stay first order although $\theta(t)$ is discontinuous at
#    the nodes? (Hint: the nodes are mesh points, so each Euler step sees a smooth field.)
# 4. Train the same neural ODE with `make_solver("emsa", problem)`. Do both solvers end
#    at similar accuracy?
