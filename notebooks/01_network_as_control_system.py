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
# # 1. A network is a control system
#
# A residual network with layers $f_0, \dots, f_{T-1}$ maps an input $x_0$ to an output
# by the recursion
#
# $$x_{t+1} = f_t(x_t, u_t) = x_t + h\,\tanh(W_t x_t + b_t), \qquad t = 0, \dots, T-1,$$
#
# where $u_t = (W_t, b_t)$ are layer $t$'s weights. Read as control theory: $x_t$ is the
# **state** at time $t$, $u_t$ the **control** applied at that time, $f_t$ the
# **dynamics**. Training chooses the controls so that the final states $x_T$ of all
# training points land where the loss $\Phi(x_T, y)$ is small:
#
# $$\min_u\; J(u) = \frac1B\sum_{i=1}^B \Phi(x_T^i, y^i) + \sum_{t<T} \ell_t(u_t)
# \quad\text{s.t.}\quad x_{t+1}^i = f_t(x_t^i, u_t).$$
#
# In ocnet this is literal: `to_problem(module, loss)` turns an `nn.Sequential` into an
# `ocnet.ocp.Problem` whose stages are the layers and whose controls are views of the
# module's own weight tensors. This notebook trains a 2-D residual network on the two
# moons and draws the *trajectories* of the points through the layers.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

import ocnet
from ocnet import make_solver, to_problem
from ocnet.data import batches, load

T0 = time.perf_counter()
torch.manual_seed(0)
torch.set_num_threads(1)


class ResBlock(nn.Module):
    """x + h tanh(W x + b): one explicit-Euler step of dx/dt = tanh(W x + b)."""

    def __init__(self, width: int, h: float) -> None:
        super().__init__()
        self.linear, self.h = nn.Linear(width, width), h

    def forward(self, x):
        return x + self.h * torch.tanh(self.linear(x))


data = load("moons", seed=0, n_train=400, n_test=200)
depth, h = 10, 0.5
net = nn.Sequential(*[ResBlock(2, h) for _ in range(depth)], nn.Linear(2, 2))
problem = to_problem(net, "cross_entropy", weight_decay=1e-4)
print(problem)
print("stages:", problem.T, " scalar controls:", problem.num_controls())

# %% [markdown]
# The problem has one stage per layer, and its controls *are* the module's parameters
# (no copies): a solver that updates the controls trains the network.

# %%
assert problem.T == depth + 1
assert problem.num_controls() == sum(p.numel() for p in net.parameters())
module_params = {p.data_ptr() for p in net.parameters()}
assert all(u.data_ptr() in module_params for u in problem.parameters())

x, y = data.x_train, data.y_train
traj = problem.rollout(x)                  # states x_0 .. x_T
assert len(traj.xs) == problem.T + 1
with torch.no_grad():
    assert torch.allclose(traj.xs[-1], net(x), atol=1e-6)  # the rollout IS the forward pass

# %% [markdown]
# ## Training = choosing the controls
# Any ocnet solver steps the problem through one interface, `solver.step(x, y)`. Here it is
# Adam on the costate gradients (notebook 2 shows that these gradients are
# backpropagation's).

# %%
solver = make_solver("adam", problem, lr=0.02)
with torch.no_grad():
    j_start = float(problem.objective(x, y))
gen = torch.Generator().manual_seed(0)
for _epoch in range(60):
    for xb, yb in batches(x, y, 50, generator=gen):
        info = solver.step(xb, yb)
with torch.no_grad():
    j_end = float(problem.objective(x, y))
    acc = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
print(f"J: {j_start:.3f} -> {j_end:.3f};  test accuracy {acc:.3f};  {solver.steps} steps")
assert j_end < 0.5 * j_start
assert acc > 0.95

# %% [markdown]
# ## The points' trajectories through the layers
# Each training point is a particle; the layers are time steps that move it. Training has
# chosen a flow that pulls the two moons apart so that a *linear* read-out (the last
# layer) separates them.

# %%
traj = problem.rollout(x)
xs = torch.stack([s.detach() for s in traj.xs[: depth + 1]])  # (T+1, B, 2)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for c, col in ((0, "tab:blue"), (1, "tab:red")):
    idx = (y == c).nonzero().squeeze(1)[:60]
    for i in idx:
        axes[0].plot(xs[:, i, 0], xs[:, i, 1], color=col, alpha=0.25, lw=0.8)
    axes[0].scatter(xs[0, idx, 0], xs[0, idx, 1], s=8, color=col)
    axes[0].scatter(xs[-1, idx, 0], xs[-1, idx, 1], s=14, color=col, marker="x")
axes[0].set_title("trajectories x_0 (dots) -> x_T (crosses)")
spread = [float((s[y == 0].mean(0) - s[y == 1].mean(0)).norm()) for s in xs]
axes[1].plot(range(depth + 1), spread, "o-")
axes[1].set(xlabel="layer t", ylabel="distance of the class means",
            title="the flow separates the classes")
fig.tight_layout()
plt.show()
assert spread[-1] > spread[0]  # the classes end further apart than they started

# %%
seconds = time.perf_counter() - T0
print(f"ocnet {ocnet.__version__}: notebook ran in {seconds:.1f} s")

# %% [markdown]
# ## Exercises
# 1. Make the network deeper with a smaller step (`depth=40, h=0.125`, same $T h$). Do the
#    trajectories change much? (Notebook 5: a ResNet is explicit Euler of an ODE.)
# 2. Replace `tanh` by ReLU in `ResBlock`. What happens to the trajectories near the
#    origin?
# 3. Train with `make_solver("ddpnopt", problem, lr=0.02, base="adam")` or
#    `make_solver("emsa", problem)` instead of Adam: the problem does not change, only
#    the solver. Compare the final objective.
# 4. Replace the moons by two concentric rings (`load("donut")`). Why can no flow of the
#    plane (a width-2 network with small steps is close to one) make them *linearly*
#    separable, and why does widening the state to 3 dimensions fix it? (A flow is a
#    continuous deformation that cannot move the inner ring out through the outer one.)
