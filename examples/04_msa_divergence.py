"""Basic MSA diverges where E-MSA converges (Li, Chen, Tai, E 2018).

Basic MSA sets every layer's control to the maximiser of its Hamiltonian H_t with the
states x and costates p frozen. When that maximiser lies far away, x and p at the new
controls are nothing like the frozen ones and the loss explodes. E-MSA maximises the
augmented Hamiltonian instead,

    Htilde_t(u) = H_t(u) - rho/(2B) sum_i |x_{t+1}^i - f_t(x_t^i, u)|^2
                         - rho B/2  sum_i |p_t^i - dH_t/dx^i(u)|^2,

whose penalties keep the new controls where the frozen x and p are still valid.

Left: a 4-stage linear-quadratic problem with a small control cost R (argmax H = R^-1 ...
overshoots). Right: the sin(x) toy network of the E-MSA paper.

    OMP_NUM_THREADS=1 python examples/04_msa_divergence.py [--out msa_divergence.png]
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ocnet.dynamics import LinearQuadratic  # noqa: E402
from ocnet.models import emsa_toy_problem  # noqa: E402
from ocnet.ocp import Problem  # noqa: E402
from ocnet.solvers.msa import EMSA, MSA  # noqa: E402


def lq_problem(seed: int = 0):
    """x+ = x A' + u B', cost mean x'Qx/2 + u'Ru/2 + x'Su, Phi = mean |x_T - y|^2/2."""
    g = torch.Generator().manual_seed(seed)
    n, m, dt = 3, 2, torch.float64
    stages = []
    for _ in range(4):
        A = torch.eye(n, dtype=dt) + 0.3 * torch.randn(n, n, generator=g, dtype=dt)  # noqa: N806
        B = torch.randn(n, m, generator=g, dtype=dt)  # noqa: N806
        M = torch.randn(n, n, generator=g, dtype=dt)  # noqa: N806
        Q = M @ M.T / n + 0.1 * torch.eye(n, dtype=dt)  # noqa: N806
        R = 0.01 * torch.eye(m, dtype=dt)  # noqa: N806  - cheap controls: argmax H overshoots
        u = 0.3 * torch.randn(m, generator=g, dtype=dt)
        stages.append(LinearQuadratic(A, B, u, Q, R, 0.2 * torch.randn(n, m, generator=g,
                                                                        dtype=dt)))
    problem = Problem(stages, lambda x, y: 0.5 * ((x - y) ** 2).sum(-1).mean())
    x0 = torch.randn(6, n, generator=g, dtype=dt)
    return problem, x0, torch.randn(6, n, generator=g, dtype=dt)


def toy_problem(seed: int = 0):
    """The public toy (ocnet.models.emsa_toy_problem: its 20 layers are the stages; x is
    repeated over the 5 nodes and the loss sums them) with W ~ N(0, 0.1^2)."""
    torch.manual_seed(seed)
    problem = emsa_toy_problem(1e-3)
    for mod in problem.module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.1)
            nn.init.zeros_(mod.bias)
    g = torch.Generator().manual_seed(1000 + seed)
    x = (torch.rand(100, 1, generator=g) * 2 - 1) * math.pi
    return problem, x.repeat(1, 5), torch.sin(x)


def history(make, solver_factory, iters: int) -> list[float]:
    problem, x, y = make()
    solver = solver_factory(problem)
    out = []
    for _ in range(iters):
        out.append(float(solver.step(x, y).loss))
        if not out[-1] < 1e12:
            break
    with torch.no_grad():
        out.append(float(problem.objective(x, y)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="msa_divergence.png")
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [
        ("linear-quadratic, 4 stages, R = 0.01 I", lq_problem, [
            ("basic MSA", lambda p: MSA(p)),
            ("E-MSA rho=1", lambda p: EMSA(p, rho=1.0)),
            ("E-MSA rho=3", lambda p: EMSA(p, rho=3.0)),
            ("E-MSA rho=10", lambda p: EMSA(p, rho=10.0)),
        ]),
        ("sin(x) toy network (20 residual layers)", toy_problem, [
            ("basic MSA", lambda p: MSA(p)),
            ("E-MSA rho=1 (reference scaling)", lambda p: EMSA(p, rho=1.0, scaling="reference")),
            ("E-MSA rho=10", lambda p: EMSA(p, rho=10.0)),
        ]),
    ]
    for ax, (title, make, solvers) in zip(axes, panels, strict=True):
        for label, factory in solvers:
            h = history(make, factory, args.iters)
            print(f"{title:45s} {label:32s} J: start {h[0]:.4g}  end {h[-1]:.4g}")
            ax.semilogy(range(len(h)), h, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel("objective J")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
