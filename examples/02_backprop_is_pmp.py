"""Backpropagation is the Pontryagin costate sweep (and which way the signs go).

A tanh MLP on DIGITS is a discrete control system x_{t+1} = f_t(x_t, u_t) with cost
J = Phi(x_T) + sum_t l_t (batch means). The maximum principle's Hamiltonian is
H_t = p_{t+1} . f_t(x_t, u_t) - l_t(x_t, u_t), the costates run backwards from
p_T = -dPhi/dx_T by p_t = dH_t/dx_t, and the gradient is dJ/du_t = -dH_t/du_t.
So p_t = -dJ/dx_t: the costate IS backprop's adjoint, with the opposite sign.

The script checks, in float64 against torch.autograd on the same objective:
  * p_t = -dJ/dx_t at every layer (autograd through a retained forward pass),
  * -dH_t/du_t = dJ/du_t for every weight (and +dH/du is exactly the wrong sign),
  * p_t = -dJ/dx_t by central finite differences (independent of autograd),
and draws (a) the costate norms |p_t| per layer for a deep tanh and a deep sigmoid
network (the sigmoid's costate shrinks towards the input: vanishing gradients are a
costate decaying backwards in time), (b) -dH/du against autograd's dJ/du.

    python examples/02_backprop_is_pmp.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ocnet import to_problem  # noqa: E402
from ocnet.data import load  # noqa: E402


def _net(act: type[nn.Module], depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).double()


def check(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """Costates, Hamiltonian gradients and autograd's on one batch."""
    problem = to_problem(net, "cross_entropy")
    traj = problem.costates(problem.rollout(x), y)  # the PMP backward sweep
    # autograd reference: a forward pass through the same stages keeping every state
    xs = [x.clone().requires_grad_(True)]
    for t in range(problem.T):
        xs.append(problem.step(t, xs[-1]))
        xs[-1].retain_grad()
    J = problem.terminal(xs[-1], y)
    for t in range(problem.T):
        c = problem.running_cost(t, xs[t])
        if c is not None:
            J = J + c
    params = problem.parameters()
    grads = torch.autograd.grad(J, [*xs, *params])
    dj_dx, dj_du = grads[: len(xs)], grads[len(xs):]
    # dJ/du_t = -dH_t/du_t with H_t(x_t, p_{t+1}, u_t) = p_{t+1}.f_t - l_t
    dh_du = []
    for t in range(problem.T):
        u = tuple(v.detach().requires_grad_(True) for v in problem.stages[t].controls)
        if not u:
            continue
        h = problem.hamiltonian(t, traj.xs[t].detach(), traj.ps[t + 1].detach(), u)
        dh_du += list(torch.autograd.grad(h, u))
    p_err = max(float((p + g).norm() / g.norm().clamp_min(1e-300))
                for p, g in zip(traj.ps, dj_dx, strict=True))
    flat_h = torch.cat([g.reshape(-1) for g in dh_du])
    flat_j = torch.cat([g.reshape(-1) for g in dj_du])
    u_err = float((-flat_h - flat_j).norm() / flat_j.norm())
    fd_err = _finite_difference_check(problem, traj, y)
    return {"p_norms": [float(p.norm()) for p in traj.ps], "p_err": p_err, "u_err": u_err,
            "fd_err": fd_err, "dh_du": flat_h, "dj_du": flat_j, "J": float(J.detach())}


@torch.no_grad()
def _finite_difference_check(problem, traj, y: torch.Tensor, n: int = 6,
                             eps: float = 1e-5) -> float:
    """Independent of autograd: p_t[i, j] = -(J(x_t + eps e_ij) - J(x_t - eps e_ij)) / 2 eps,
    J from layer t = T - 2 on (central differences, a few random entries)."""

    def cost_from(t: int, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=x.dtype)
        for s in range(t, problem.T):
            c = problem.running_cost(s, x)
            total = total + (0.0 if c is None else c)
            x = problem.step(s, x)
        return total + problem.terminal(x, y)

    t = problem.T - 2  # large costates: central differences are far above round-off
    x, p = traj.xs[t], traj.ps[t]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(n):
        i = int(torch.randint(x.shape[0], (1,), generator=g))
        j = int(torch.randint(x.shape[1], (1,), generator=g))
        e = torch.zeros_like(x)
        e[i, j] = eps
        fd = -(cost_from(t, x + e) - cost_from(t, x - e)) / (2 * eps)
        worst = max(worst, abs(float(fd - p[i, j])) / float(p.abs().max()))
    return worst


def main(smoke: bool = False, out: Path = Path("runs/examples/02_backprop_is_pmp")) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = load("digits", dtype=torch.float64)
    n = 64 if smoke else 512
    x, y = data.x_train[:n], data.y_train[:n]
    depth = 6 if smoke else 12
    runs = {name: check(_net(act, depth, 32, seed=0), x, y)
            for name, act in (("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid))}
    for name, r in runs.items():
        print(f"{name:<8} depth {depth}: J = {r['J']:.4f}; max_t |p_t + dJ/dx_t|/|dJ/dx_t| = "
              f"{r['p_err']:.1e}; |-dH/du - dJ/du|/|dJ/du| = {r['u_err']:.1e}; "
              f"finite differences vs p_(T-2): {r['fd_err']:.1e} (of max |p|)")
        print("         |p_t|, t = 0..T: " + " ".join(f"{v:.1e}" for v in r["p_norms"]))
        assert r["p_err"] < 1e-10 and r["u_err"] < 1e-10, "the costate sweep is not backprop"
        assert r["fd_err"] < 1e-5, "the costates disagree with finite differences"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for name, r in runs.items():
        ax.semilogy(range(len(r["p_norms"])), r["p_norms"], "o-", label=f"{name}")
    ax.set_xlabel("layer t (time step; T = output)")
    ax.set_ylabel(r"$\|p_t\| = \|\partial J/\partial x_t\|$")
    ax.set_title(f"costate norms, {depth}-layer MLP, batch {n}\n"
                 "(the sweep runs right to left: p_T = -dPhi/dx_T)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    r = runs["tanh"]
    gj, gh = r["dj_du"].numpy(), r["dh_du"].numpy()
    lim = float(abs(gj).max()) * 1.05
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6, label="y = x")
    ax.plot(gj, -gh, ".", ms=2, alpha=0.5, label=r"$-\partial H_t/\partial u_t$ (PMP)")
    ax.plot(gj, gh, ".", ms=2, alpha=0.3, color="tab:red",
            label=r"$+\partial H_t/\partial u_t$ (wrong sign)")
    ax.set_xlabel(r"autograd $\partial J/\partial u$ (every weight)")
    ax.set_ylabel("Hamiltonian gradient")
    ax.set_title(f"tanh net: rel. error {r['u_err']:.1e} (float64)")
    ax.legend(loc="upper left", markerscale=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "backprop_is_pmp.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return runs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds' version for CI")
    ap.add_argument("--out", type=Path, default=Path("runs/examples/02_backprop_is_pmp"))
    a = ap.parse_args()
    main(a.smoke or os.environ.get("OCNET_SMOKE") == "1", a.out)
