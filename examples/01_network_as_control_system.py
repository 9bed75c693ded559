"""A network as a control system: layers are time steps, weights are controls.

Trains a small tanh MLP on DIGITS with Adam driven by the costate gradients of the
discrete Pontryagin sweep, then checks that those gradients are backpropagation's.

    python examples/01_network_as_control_system.py [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ocnet import make_solver, to_problem
from ocnet.bridge import flatten_controls, objective_gradient
from ocnet.data import batches, load


def main(smoke: bool = False) -> float:
    torch.manual_seed(0)
    data = load("digits")
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 10))
    problem = to_problem(net, "cross_entropy", weight_decay=1e-4)  # 3 stages, weights = controls
    print(problem)

    # Backpropagation is the costate sweep: p_t = -dJ/dx_t, dJ/du_t = -dH_t/du.
    x, y = data.x_train[:64], data.y_train[:64]
    traj = problem.costates(problem.rollout(x), y)
    print("costate norms p_0..p_T:", [f"{float(p.norm()):.2e}" for p in traj.ps])
    g_pmp = flatten_controls(problem.gradients(x, y))
    g_autograd = objective_gradient(problem, x, y)
    rel = float((g_pmp - g_autograd).norm() / g_autograd.norm())
    print(f"|g_pmp - g_autograd| / |g| = {rel:.1e}")

    solver = make_solver("adam", problem, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(2 if smoke else 20):
        for xb, yb in batches(data.x_train, data.y_train, 32, generator=gen):
            info = solver.step(xb, yb)
    with torch.no_grad():
        acc = (net(data.x_test).argmax(1) == data.y_test).float().mean()
    print(f"after {solver.steps} steps: last batch loss {float(info.loss):.4f}, "
          f"test accuracy {float(acc):.3f}")
    return float(acc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds' version for CI")
    main(parser.parse_args().smoke)
