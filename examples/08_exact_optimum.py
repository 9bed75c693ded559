"""What the exact optimum of this training problem looks like.

A small training problem (a 2-8-8-2 tanh MLP, 114 weights, on 80 points of the two
moons, cross-entropy plus weight decay 1e-3) is solved to optimality by IPOPT (Newton's
method with CasADi's exact Hessian; ``ocnet.solvers.ipopt``). From the same starting
weights, gradient descent (``GradientSolver``: heavy-ball momentum and Adam) and, when
they are installed, DDP (``ocnet.solvers.ddp.DDP``) and E-MSA (``ocnet.solvers.msa.EMSA``)
run for a fixed number of full-batch steps. The table shows the objective each reaches,
its gap to IPOPT's optimum J*, the autograd gradient norm there, and the wall time as a
ratio to IPOPT's (same run, same machine). The figure shows the gap over time and the
decision regions of the exact optimum next to those gradient descent reached.

Note: J* is a local optimum (the problem is not convex); the other solvers may end in
another one, with a negative gap.

    OMP_NUM_THREADS=1 python examples/08_exact_optimum.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ocnet.bridge import objective_gradient, to_problem  # noqa: E402
from ocnet.data import load  # noqa: E402
from ocnet.ocp import Problem  # noqa: E402
from ocnet.solvers import GradientSolver, Solver  # noqa: E402
from ocnet.solvers.ipopt import IpoptReference  # noqa: E402

D = torch.float64


def make_problem() -> tuple[Problem, torch.Tensor, torch.Tensor]:
    data = load("moons", seed=0, n_train=80, n_test=20, dtype=D)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                        nn.Linear(8, 2)).to(D)
    return to_problem(net, "cross_entropy", weight_decay=1e-3), data.x_train, data.y_train


def optional(module: str, cls: str) -> type | None:
    """A solver class that another part of ocnet may or may not provide yet."""
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None


def run(solver: Solver, x: torch.Tensor, y: torch.Tensor, steps: int
        ) -> tuple[list[float], list[float]]:
    """Objective after each step and the cumulative wall time."""
    times, values, total = [0.0], [], 0.0
    with torch.no_grad():
        values.append(float(solver.problem.objective(x, y)))
    for _ in range(steps):
        start = time.perf_counter()
        solver.step(x, y)
        total += time.perf_counter() - start
        with torch.no_grad():
            values.append(float(solver.problem.objective(x, y)))
        times.append(total)
    return times, values


def main(quick: bool, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base, x, y = make_problem()
    start = [tuple(u.clone() for u in us) for us in base.controls]
    with torch.no_grad():
        j0 = float(base.objective(x, y))
    print(f"{base}\n{x.shape[0]} points, J(start) = {j0:.6f}")

    def fresh() -> Problem:
        p = copy.deepcopy(base)
        p.set_controls(start)
        return p

    # the exact (local) optimum
    p_ipopt = fresh()
    t0 = time.perf_counter()
    info = IpoptReference(p_ipopt).step(x, y)
    t_ipopt = time.perf_counter() - t0
    j_star = float(info.extra["objective"])
    print(f"IPOPT: {info.extra['status']} after {info.extra['iterations']} iterations, "
          f"J* = {j_star:.12f}, |dJ/du| = {float(info.extra['grad_norm_after']):.1e}")

    steps = 200 if quick else 3000
    runs: dict[str, tuple[Problem, list[float], list[float]]] = {}
    candidates = [
        ("gradient descent (momentum, lr 0.1)", lambda p: GradientSolver(p, "momentum", 0.1),
         steps),
        ("Adam (lr 1e-2)", lambda p: GradientSolver(p, "adam", 1e-2), steps),
    ]
    ddp, emsa = optional("ocnet.solvers.ddp", "DDP"), optional("ocnet.solvers.msa", "EMSA")
    if ddp is not None:
        candidates.append(("DDP", lambda p: ddp(p), 10 if quick else 50))
    else:
        print("DDP is not installed (ocnet.solvers.ddp): skipped")
    if emsa is not None:
        candidates.append(("E-MSA", lambda p: emsa(p), 20 if quick else 200))
    else:
        print("E-MSA is not installed (ocnet.solvers.msa): skipped")
    for name, make, n in candidates:
        p = fresh()
        try:
            times, values = run(make(p), x, y, n)
        except Exception as err:  # another solver's failure must not hide the others
            print(f"{name}: failed ({type(err).__name__}: {err})")
            continue
        runs[name] = (p, times, values)

    rows = ["| solver | steps | J reached | J - J* | abs dJ/du | time / IPOPT time |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| IPOPT | {info.extra['iterations']} it. | {j_star:.10f} | 0 | "
            f"{float(info.extra['grad_norm_after']):.1e} | 1 |"]
    for name, (p, times, values) in runs.items():
        g = float(objective_gradient(p, x, y).norm())
        rows.append(f"| {name} | {len(values) - 1} | {values[-1]:.10f} | "
                    f"{values[-1] - j_star:.2e} | {g:.1e} | {times[-1] / t_ipopt:.2f} |")
    table = "\n".join(rows)
    print(f"\nIPOPT wall time {t_ipopt:.2f} s (shared machine: read ratios only)\n")
    print(table)
    (out / "exact_optimum.md").write_text(table + "\n")

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, (_, times, values) in runs.items():
        gap = [max(v - j_star, 1e-16) for v in values]
        ax.semilogy([t / t_ipopt for t in times], gap, label=name)
    ax.axvline(1.0, color="k", ls=":", label="IPOPT finished (J - J* = 0)")
    ax.set_xlabel("wall time / IPOPT's wall time")
    ax.set_ylabel("J - J*  (clipped at 1e-16)")
    ax.set_title("distance to the exact optimum")
    ax.legend(fontsize=8)
    gd = runs.get("gradient descent (momentum, lr 0.1)", (None,))[0]
    for axis, prob, title in [(bx, p_ipopt, f"exact optimum J* = {j_star:.4f}"),
                              (cx, gd, "gradient descent")]:
        if prob is None:
            axis.set_visible(False)
            continue
        lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
        g0, g1 = torch.meshgrid(torch.linspace(lo[0], hi[0], 200, dtype=D),
                                torch.linspace(lo[1], hi[1], 200, dtype=D), indexing="ij")
        grid = torch.stack([g0.reshape(-1), g1.reshape(-1)], 1)
        with torch.no_grad():
            prob_1 = torch.softmax(prob.rollout(grid).xs[-1], 1)[:, 1].reshape(200, 200)
        axis.contourf(g0, g1, prob_1, levels=20, cmap="RdBu_r", alpha=0.7)
        colors = ["tab:blue" if int(c) == 0 else "tab:red" for c in y]
        axis.scatter(x[:, 0], x[:, 1], c=colors, edgecolors="w", linewidths=0.8, s=22)
        with torch.no_grad():
            j = float(prob.objective(x, y))
        axis.set_title(f"{title} (J = {j:.4f})" if prob is gd else title)
    fig.tight_layout()
    fig.savefig(out / "exact_optimum.png", dpi=120)
    print(f"\nwrote {out / 'exact_optimum.png'} and {out / 'exact_optimum.md'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--out", default="runs/examples/exact_optimum", type=Path)
    args = ap.parse_args()
    main(args.quick, args.out)
