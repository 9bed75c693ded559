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
# # 3. DDP on an LQR is the Riccati recursion; then DDPNOpt on a network
#
# **Differential dynamic programming** expands the value function $V_t(x)$ to second order
# around the current trajectory and sweeps backwards:
#
# $$Q_t(\delta x, \delta u) = \ell_t + V_{t+1}\circ f_t \approx
# \tfrac12 \begin{pmatrix}1\\ \delta x\\ \delta u\end{pmatrix}^{\!\top}
# \begin{pmatrix} \cdot & Q_x^\top & Q_u^\top\\ Q_x & Q_{xx} & Q_{xu}\\
#   Q_u & Q_{ux} & Q_{uu}\end{pmatrix}
# \begin{pmatrix}1\\ \delta x\\ \delta u\end{pmatrix},$$
#
# minimised by the feedback policy $\delta u = k_t + K_t\,\delta x$ with
# $k_t = -Q_{uu}^{-1} Q_u$, $K_t = -Q_{uu}^{-1} Q_{ux}$, and
# $V_{xx} = Q_{xx} + Q_{ux}^\top K_t$.
#
# For linear dynamics $x_{t+1} = A_t x_t + B_t u_t$ and quadratic costs
# $\tfrac12 x^\top Q x + \tfrac12 u^\top R u + x^\top S u$, the expansion is exact, so
# $V_{xx}$ obeys the **discrete Riccati recursion**
#
# $$P_T = Q_T,\quad P_t = Q_t + A_t^\top P_{t+1} A_t - (S_t + A_t^\top P_{t+1} B_t)
# (R_t + B_t^\top P_{t+1} B_t)^{-1} (S_t^\top + B_t^\top P_{t+1} A_t),$$
#
# and **one** DDP iteration from *any* controls lands on the optimum. We check exactly
# that against a Riccati solver written here from the formula.

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from ocnet import to_problem
from ocnet.data import batches, load
from ocnet.dynamics import LinearQuadratic
from ocnet.ocp import Problem
from ocnet.solvers import DDP, DDPNOpt, GradientSolver

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64
g = torch.Generator().manual_seed(0)
n, m, T = 4, 2, 12


def spd(k, eps):
    M = torch.randn(k, k, generator=g, dtype=D)
    return M @ M.T / k + eps * torch.eye(k, dtype=D)


mats, stages = [], []
for _ in range(T):
    A = torch.randn(n, n, generator=g, dtype=D)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max()
    B = torch.randn(n, m, generator=g, dtype=D)
    Q, R, S = spd(n, 0.5), spd(m, 0.5), 0.05 * torch.randn(n, m, generator=g, dtype=D)
    mats.append((A, B, Q, R, S))
    u0 = torch.randn(m, generator=g, dtype=D)            # arbitrary starting controls
    stages.append(LinearQuadratic(A, B, u0, Q, R, S))
QT = spd(n, 1.0)
problem = Problem(stages, lambda x, y: 0.5 * ((x @ QT) * x).sum(-1).mean(), name="lqr")
x0 = torch.randn(1, n, generator=g, dtype=D)

# %%


def riccati(mats, QT, x0):
    """Optimal controls from x0 and the optimal cost x0' P_0 x0 / 2."""
    P, gains = QT, []
    for A, B, Q, R, S in reversed(mats):
        Quu, Qux = R + B.T @ P @ B, S.T + B.T @ P @ A
        K = -torch.linalg.solve(Quu, Qux)
        P = Q + A.T @ P @ A + Qux.T @ K
        P = 0.5 * (P + P.T)
        gains.append(K)
    x, us = x0[0], []
    for (A, B, *_), K in zip(mats, reversed(gains), strict=True):
        us.append(K @ x)
        x = A @ x + B @ us[-1]
    return us, float(0.5 * x0[0] @ P @ x0[0])


u_opt, j_opt = riccati(mats, QT, x0)
with torch.no_grad():
    j_start = float(problem.objective(x0))
info = DDP(problem, mu=0.0, eps_v=0.0).step(x0)       # ONE iteration, no regularisation
with torch.no_grad():
    j_ddp = float(problem.objective(x0))
u_err = max(float((s.controls[0] - u).abs().max())
            for s, u in zip(problem.stages, u_opt, strict=True))
print(f"J: start {j_start:.6f}, after one DDP iteration {j_ddp:.12f}, Riccati {j_opt:.12f}")
print(f"max |u_DDP - u_Riccati| = {u_err:.1e}")
assert bool(info.accepted)
assert u_err < 1e-8 and abs(j_ddp - j_opt) < 1e-8
assert j_start > j_opt + 1e-3                           # it really had something to do

# %% [markdown]
# ## DDPNOpt: DDP's feedback on a network, at the price of a first-order method
# For a network the exact $Q_{uu}$ is far too large. **DDPNOpt** (Liu, Chen, Theodorou
# 2021) replaces $Q_{uu}$ by the curvature $M_t/\eta$ of a standard optimizer (identity:
# SGD; the adaptive diagonal: RMSprop/Adam; Kronecker factors: KFAC), so the open-loop
# part $k_t$ *is* that optimizer's step, and adds the layer-wise feedback $K_t\,\delta x_t$
# that reacts to how the earlier layers' update already moved this layer's input. Two
# consequences we check: without the feedback DDPNOpt **is** its base optimizer (to
# round-off), and with it the updates change.

# %%
data = load("digits", dtype=D, n_train=512)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                    nn.Linear(32, 10)).to(D)
base = to_problem(net, "cross_entropy", weight_decay=1e-4)
p_adam, p_nofb, p_fb = (copy.deepcopy(base) for _ in range(3))
runs = {"adam": GradientSolver(p_adam, "adam", lr=1e-2),
        "ddpnopt, no feedback": DDPNOpt(p_nofb, lr=1e-2, base="adam", feedback=False),
        "ddpnopt (adam base)": DDPNOpt(p_fb, lr=1e-2, base="adam")}
curves = {k: [] for k in runs}
gen = torch.Generator().manual_seed(0)
for _epoch in range(3):
    for xb, yb in batches(data.x_train, data.y_train, 32, generator=gen):
        for k, solver in runs.items():
            curves[k].append(float(solver.step(xb, yb).loss.detach()))


def gap(a, b):
    return max(float((u - v).abs().max())
               for u, v in zip(a.parameters(), b.parameters(), strict=True))


print(f"|adam - ddpnopt(no feedback)| = {gap(p_adam, p_nofb):.1e}")
print(f"|adam - ddpnopt(feedback)|    = {gap(p_adam, p_fb):.1e}")
assert gap(p_adam, p_nofb) < 1e-12
assert gap(p_adam, p_fb) > 1e-6
for k, p in (("adam", p_adam), ("ddpnopt (adam base)", p_fb)):
    with torch.no_grad():
        acc = float((p.rollout(data.x_test).xs[-1].argmax(1) == data.y_test).double().mean())
    print(f"{k:22s} final batch loss {curves[k][-1]:.3f}, test accuracy {acc:.3f}")
    assert curves[k][-1] < 0.5 * curves[k][0] and acc > 0.8

plt.figure(figsize=(6, 4))
for k in ("adam", "ddpnopt (adam base)"):
    plt.semilogy(curves[k], label=k, alpha=0.8)
plt.xlabel("step")
plt.ylabel("batch loss")
plt.legend()
plt.title("DIGITS, 3-layer tanh MLP, lr 1e-2")
plt.show()
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Run `DDP(problem, mu=1.0)` on the LQR: how many iterations does it now need? What does
#    the regularisation $\mu$ do to $Q_{uu}$?
# 2. Make one stage non-linear (a `FunctionStage` with `torch.tanh`). Is one DDP iteration
#    still enough? Plot $J$ over five iterations.
# 3. Compare `DDPNOpt(..., base="sgd")` with `GradientSolver(..., "sgd")` at a large
#    learning rate (e.g. 0.5). The paper reports that the feedback helps most when the
#    learning rate is large: do you see it here?
# 4. Derive $K_t$ for a dense layer $x_{t+1} = \sigma(W x_t + b)$ under the Gauss-Newton
#    approximation and show that $K_t\,\delta x$ needs only $\delta x$ and the layer's
#    pre-activation derivative (docs: *DDP and DDPNOpt*).
