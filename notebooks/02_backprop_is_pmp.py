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
# # 2. Backpropagation is the Pontryagin costate sweep
#
# Take the discrete control problem of notebook 1,
# $J(u) = \Phi(x_T) + \sum_{t<T} \ell_t(x_t, u_t)$ subject to $x_{t+1} = f_t(x_t, u_t)$,
# and attach a multiplier $p_{t+1}$ to each constraint:
#
# $$\mathcal L = \Phi(x_T) + \sum_{t<T} \Big[\ell_t(x_t,u_t)
#   - p_{t+1}\cdot\big(x_{t+1} - f_t(x_t,u_t)\big)\Big].$$
#
# With the **Hamiltonian** $H_t(x, p, u) = p\cdot f_t(x, u) - \ell_t(x, u)$, stationarity
# of $\mathcal L$ in the states gives the backward (costate) sweep
#
# $$p_T = -\nabla_x \Phi(x_T), \qquad p_t = \nabla_x H_t(x_t, p_{t+1}, u_t),$$
#
# and, because the states satisfy the dynamics, $\mathcal L = J$ and
#
# $$\nabla_{u_t} J = -\nabla_u H_t(x_t, p_{t+1}, u_t).$$
#
# So $p_t = -\partial J/\partial x_t$: the costate is backpropagation's adjoint with the
# opposite sign (Pontryagin's *maximum* principle convention, used throughout ocnet).
# Below we check all three equations against `torch.autograd` in float64.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from ocnet import to_problem
from ocnet.bridge import flatten_controls, objective_gradient
from ocnet.data import load

T0 = time.perf_counter()
torch.set_num_threads(1)
D = torch.float64


def mlp(act, depth=6, width=32, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).to(D)


data = load("digits", dtype=D)
x, y = data.x_train[:128], data.y_train[:128]
net = mlp(nn.Tanh)
problem = to_problem(net, "cross_entropy", weight_decay=1e-3)
traj = problem.costates(problem.rollout(x), y)   # forward states, backward costates
print(problem.T, "stages; costate shapes:", [tuple(p.shape) for p in traj.ps][:3], "...")

# %% [markdown]
# ## Check 1: the costates are minus the state gradients
# $p_t = -\partial J/\partial x_t$ at every layer.
# The autograd reference runs the same stages keeping every state in the graph.

# %%
xs = [x.clone().requires_grad_(True)]
for t in range(problem.T):
    xs.append(problem.step(t, xs[-1]))
    xs[-1].retain_grad()
J = problem.terminal(xs[-1], y)
for t in range(problem.T):
    c = problem.running_cost(t, xs[t])
    J = J if c is None else J + c
dj_dx = torch.autograd.grad(J, xs, retain_graph=True)
p_err = max(float((p + g).norm() / g.norm()) for p, g in zip(traj.ps, dj_dx, strict=True))
print(f"max_t |p_t + dJ/dx_t| / |dJ/dx_t| = {p_err:.1e}")
assert p_err < 1e-12

# %% [markdown]
# ## Check 2: the gradient is minus the Hamiltonian's, weight by weight
# $\nabla_{u_t} J = -\nabla_u H_t$.
# `Problem.gradients` computes $-\nabla_u H_t$ stage by stage from the sweep;
# `objective_gradient` is plain autograd on $J$.

# %%
g_pmp = flatten_controls(problem.gradients(x, y))
g_autograd = objective_gradient(problem, x, y)
u_err = float((g_pmp - g_autograd).norm() / g_autograd.norm())
print(f"|g_pmp - g_autograd| / |g| = {u_err:.1e}  ({g_pmp.numel()} weights)")
assert u_err < 1e-12

# the sign matters: +dH/du is the ascent direction
dh = []
for t in range(problem.T):
    u = tuple(v.detach().requires_grad_(True) for v in problem.stages[t].controls)
    if u:
        H = problem.hamiltonian(t, traj.xs[t].detach(), traj.ps[t + 1].detach(), u)
        dh += [g.reshape(-1) for g in torch.autograd.grad(H, u)]
dh = torch.cat(dh)
assert torch.allclose(-dh, g_autograd, rtol=1e-10, atol=1e-14)
assert float((dh - g_autograd).norm()) > float(g_autograd.norm())  # the wrong sign is wrong

# %% [markdown]
# ## Check 3: finite differences (independent of autograd)
# $$p_{t}[i,j] \approx
#   -\frac{J(x_t + \varepsilon e_{ij}) - J(x_t - \varepsilon e_{ij})}{2\varepsilon},$$
#
# with $J$ evaluated from layer $t$ on.

# %%


@torch.no_grad()
def cost_from(t, xt):
    total = torch.zeros((), dtype=D)
    for s in range(t, problem.T):
        c = problem.running_cost(s, xt)
        total = total + (0.0 if c is None else c)
        xt = problem.step(s, xt)
    return total + problem.terminal(xt, y)


t, eps = problem.T - 2, 1e-6
g = torch.Generator().manual_seed(0)
worst = 0.0
for _ in range(8):
    i = int(torch.randint(x.shape[0], (1,), generator=g))
    j = int(torch.randint(32, (1,), generator=g))
    e = torch.zeros_like(traj.xs[t])
    e[i, j] = eps
    fd = -(cost_from(t, traj.xs[t] + e) - cost_from(t, traj.xs[t] - e)) / (2 * eps)
    worst = max(worst, abs(float(fd - traj.ps[t][i, j])) / float(traj.ps[t].abs().max()))
print(f"finite differences vs p_{t}: worst relative error {worst:.1e}")
assert worst < 1e-6

# %% [markdown]
# ## Vanishing gradients are a costate decaying backwards in time
# The sweep runs from $t = T$ to $t = 0$. With sigmoid layers each backward step multiplies
# by $W^\top \mathrm{diag}(\sigma')$ with $\sigma' \le 1/4$: the costate shrinks towards the
# input, and so do the gradients of the early layers.

# %%
norms = {}
for name, act in (("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid)):
    pr = to_problem(mlp(act, depth=12), "cross_entropy")
    tr = pr.costates(pr.rollout(x), y)
    norms[name] = [float(p.norm()) for p in tr.ps]
plt.figure(figsize=(6, 4))
for name, v in norms.items():
    plt.semilogy(range(len(v)), v, "o-", label=name)
plt.xlabel("layer t (T = output)")
plt.ylabel("|p_t|")
plt.title("costate norms, 12-layer MLP on DIGITS")
plt.legend()
plt.grid(alpha=0.3, which="both")
plt.show()
decay = {k: v[0] / v[-1] for k, v in norms.items()}
print("|p_0| / |p_T|:", {k: f"{d:.1e}" for k, d in decay.items()})
assert decay["sigmoid"] < 1e-3 * decay["tanh"]  # the sigmoid's costate vanishes

print(f"notebook ran in {time.perf_counter() - T0:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Derive the costate sweep for a running cost that depends on the state,
#    $\ell_t(x_t, u_t) = \tfrac{\beta}{2}|x_t|^2$. Which term appears in $p_t$? Check it
#    with a `FunctionStage` whose `cost` uses `x`.
# 2. Show that $p_t$ carries the factor $1/B$ of the batch mean. What changes in
#    `problem.gradients` if $\Phi$ is a *sum* over the batch?
# 3. Repeat check 1 in float32. Which tolerance is right, and why?
# 4. Replace the sigmoid network by a residual one ($x + h\,\sigma(Wx+b)$). Does the
#    costate still vanish? Relate $\partial x_{t+1}/\partial x_t = I + h\,(\dots)$ to the
#    answer.
