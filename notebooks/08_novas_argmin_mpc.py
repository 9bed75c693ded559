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
# # 8. NOVAS: an argmin layer by adaptive stochastic search, and in MPC
#
# Many models contain an inner optimisation, $y^*(\theta) = \arg\min_y E_\theta(y)$
# (an energy model, a planner, a projection). When $E_\theta$ is non-convex, gradient
# descent on $y$ finds the basin it starts in. **NOVAS** (Exarchos, Pereira, Wang,
# Theodorou 2021) searches with a Gaussian $\mathcal N(\mu, \sigma^2)$ instead: draw samples $Y_j$,
# weight them by a shape function of their energies, e.g.
# $w_j \propto \exp(-\kappa\,\hat E(Y_j))$ (energies normalised per iteration), and move
#
# $$\mu \leftarrow \mu + \alpha \sum_j w_j (Y_j - \mu), \qquad
#   \sigma^2 \leftarrow \sum_j w_j (Y_j - \mu)^2 + \epsilon .$$
#
# Every operation is differentiable, so $y^* \approx \mu_{\text{final}}$ is a layer whose
# gradient with respect to $\theta$ flows through the search. Checked here: NOVAS finds
# the global basin where gradient descent does not; its gradient is the exact derivative
# of the search (central differences with the same noise); and as the inner optimiser of
# model-predictive control it steers around an obstacle that traps gradient-based MPC.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from ocnet.solvers import novas

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64


def double_well(Y, a=0.3):
    return ((Y**2 - 1) ** 2 + a * Y).sum(-1)


roots = np.roots([4.0, 0.0, -4.0, 0.3])
roots = roots[np.isreal(roots)].real
y_star = float(roots[np.argmin((roots**2 - 1) ** 2 + 0.3 * roots)])
print(f"global minimiser y* = {y_star:.6f}")

# %% [markdown]
# ## 1. The global basin, from a start in the wrong one

# %%
mu0 = torch.tensor([[1.5]], dtype=D)
y = mu0.clone()
for _ in range(3000):                       # gradient descent on y
    y = y.requires_grad_(True)
    (gy,) = torch.autograd.grad(double_well(y[:, None]).sum(), y)
    y = (y - 1e-2 * gy).detach()
print(f"gradient descent from 1.5 ends at {float(y):.4f}")
assert abs(float(y) - y_star) > 0.5

hits, ends = 0, []
for seed in range(10):
    res = novas(double_well, mu0, 2.0, n_samples=100, n_iter=200, kappa=5.0, var_floor=1e-14,
                generator=torch.Generator().manual_seed(seed))
    ends.append(float(res.y[0, 0]))
    hits += abs(ends[-1] - y_star) < 1e-3
print(f"NOVAS from the same start: {hits}/10 seeds within 1e-3 of y*")
assert hits >= 9

ys = torch.linspace(-1.8, 1.8, 400, dtype=D)
plt.figure(figsize=(6, 3.5))
plt.plot(ys, double_well(ys[:, None]), label="E(y)")
plt.axvline(float(y), color="tab:orange", ls="--", label="gradient descent")
plt.axvline(y_star, color="tab:green", ls=":", label="NOVAS (10 seeds)")
plt.xlabel("y")
plt.legend()
plt.show()

# %% [markdown]
# ## 2. The argmin layer is differentiable
# $y^*(a) = \arg\min_y (y^2-1)^2 + a\,y$. With the noise fixed, the search is a smooth
# function of $a$, and autograd through it equals central differences. The implicit
# function theorem gives the derivative of the *exact* argmin,
# $dy^*/da = -1/E''(y^*) = -1/(12 y^{*2} - 4)$. The layer's gradient has the same sign but
# not the same size: it is the exact derivative of what the layer computes (a search
# smoothed by a finite $\kappa$ and finitely many samples), not of the exact argmin.

# %%
noise = torch.randn(30, 1, 100, 1, dtype=D, generator=torch.Generator().manual_seed(0))


def layer(a):
    return novas(lambda Y: double_well(Y, a), torch.tensor([[-0.5]], dtype=D), 1.0, noise=noise,
                 kappa=5.0, differentiate="all").y[0, 0]


a = torch.tensor(0.3, dtype=D, requires_grad=True)
(grad,) = torch.autograd.grad(layer(a), a)
eps = 1e-6
with torch.no_grad():
    fd = (layer(a + eps) - layer(a - eps)) / (2 * eps)
ift = -1.0 / (12 * y_star**2 - 4)
print(f"autograd {float(grad):.8f}, central differences {float(fd):.8f}, exact argmin {ift:.4f}")
assert abs(float(grad - fd)) <= 1e-5 * abs(float(fd))
assert np.sign(float(grad)) == np.sign(ift)

# %% [markdown]
# ## 3. NOVAS inside model-predictive control
# A point mass $(z, v) \in \mathbb R^2 \times \mathbb R^2$ with $z_{k+1} = z_k + \Delta t\, v_k$,
# $v_{k+1} = v_k + \Delta t\, u_k$ must reach the goal $(4, 0)$ from $(0, 0)$; an obstacle
# (a steep bump) sits on the straight line between them. At each step the controller
# minimises the cost of a horizon of $H$ accelerations and applies the first one. The
# start, goal and obstacle are collinear, so the gradient of the horizon cost has no
# sideways component: gradient MPC stays stuck in front of the obstacle, while the
# sampled search picks a side.

# %%
DT, H, GOAL, OBST = 0.2, 15, torch.tensor([4.0, 0.0], dtype=D), torch.tensor([2.0, 0.0], dtype=D)


def rollout_cost(state, U):
    """state (4,), U (..., H, 2) -> cost (...)."""
    z, v = state[:2].expand(*U.shape[:-2], 2), state[2:].expand(*U.shape[:-2], 2)
    cost = torch.zeros(U.shape[:-2], dtype=D)
    for k in range(U.shape[-2]):
        v = v + DT * U[..., k, :]
        z = z + DT * v
        cost = cost + ((z - GOAL) ** 2).sum(-1) + 50 * torch.exp(-((z - OBST) ** 2).sum(-1) / 0.3)
        cost = cost + 0.01 * (U[..., k, :] ** 2).sum(-1)
    return cost + 5 * (v**2).sum(-1)


def step(state, u):
    v = state[2:] + DT * u
    return torch.cat([state[:2] + DT * v, v])


def mpc(plan, steps=30):
    state, path = torch.zeros(4, dtype=D), []
    for _ in range(steps):
        u = plan(state)
        state = step(state, u)
        path.append(state[:2].clone())
    return torch.stack(path)


class NovasPlanner:
    def __init__(self, seed=0):
        self.mean = torch.zeros(1, H * 2, dtype=D)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, state):
        with torch.no_grad():
            res = novas(lambda Y: rollout_cost(state, Y.reshape(*Y.shape[:-1], H, 2)), self.mean,
                        2.0, n_samples=200, n_iter=8, kappa=5.0, generator=self.gen)
        U = res.y.reshape(H, 2)
        self.mean = torch.cat([U[1:], U[-1:]]).reshape(1, -1)   # warm start: shift
        return U[0]


class GradientPlanner:
    def __init__(self):
        self.U = torch.zeros(H, 2, dtype=D)

    def __call__(self, state):
        U = self.U.clone().requires_grad_(True)
        opt = torch.optim.Adam([U], lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            rollout_cost(state, U).backward()
            opt.step()
        U = U.detach()
        self.U = torch.cat([U[1:], U[-1:]])
        return U[0]


paths = {"NOVAS-MPC": mpc(NovasPlanner()), "gradient MPC (Adam)": mpc(GradientPlanner())}
final = {k: float((p[-1] - GOAL).norm()) for k, p in paths.items()}
print({k: f"final distance to the goal {d:.3f}" for k, d in final.items()})
assert final["NOVAS-MPC"] < 0.5
assert final["gradient MPC (Adam)"] > 1.0
assert float(paths["gradient MPC (Adam)"][:, 1].abs().max()) < 1e-9  # never left the line

fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.add_patch(plt.Circle(OBST.tolist(), 0.55, color="gray", alpha=0.4))
for k, p in paths.items():
    ax.plot(p[:, 0], p[:, 1], "o-", ms=3, label=k)
ax.plot(*GOAL.tolist(), "k*", ms=12)
ax.set_aspect("equal")
ax.legend(loc="lower left", fontsize=8)
ax.set_title("closed loop: around the obstacle, or stuck in front of it")
plt.show()
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Replace the exponential shape by `shape="soft_ce"` (a soft elite set). How many
#    samples does part 1 need for 10/10 hits?
# 2. Move the obstacle slightly off the line ($y = 0.05$). Does gradient MPC escape now?
#    Which side does it take, and why?
# 3. Use `ocnet.solvers.NOVAS(energy_net, dim)` as a layer inside a network and train the
#    energy's parameters end to end (tests/test_novas.py shows the pattern).
# 4. The pendulum swing-up example (`examples/07_novas_control.py`) compares NOVAS with
#    the framework's DDP as the MPC optimiser. Why is DDP sensitive to the saturating
#    `tanh` on the torque there?
