"""Adaptive neural ODE: where to insert layers, by the dual-weighted residual (DWR).

A ResNet x_{k+1} = x_k + h_k sigma(W_k x_k + b_k) is explicit Euler (a DG(0) method) of
the neural ODE x' = sigma(W(t) x + b(t)) on a time mesh 0 = t_0 < ... < t_N = T, so a
layer is a mesh interval. After training on the current mesh, the DWR estimator
eta_k ~ |h_k/2 (H_k(x_{k+1}) - H_k(x_k))| (the costate p weighting the local Euler
residual, docs/dwr.md) says how much each interval contributes to the error of the
goal (the training loss); Doerfler marking bisects the fewest intervals that carry a
fraction theta of the total, the trained weights are prolongated to the new mesh and
training continues. The uniform arm bisects every interval from the same coarse start.
Caveat: every level trains the same number of Adam steps, so at equal layer count the
adaptive arm (more, smaller refinements) has been trained for more steps in total.

Figures: ``mesh.png`` (the adaptive mesh over refinements, red = marked),
``accuracy.png`` (test accuracy against the number of layers, adaptive vs uniform),
``trajectories.png`` (the points' paths through the final adaptive network).

    python examples/05_adaptive_neural_ode.py [--smoke] [--data swissroll] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ocnet.adapt import run_adapt, write_outputs


def main(smoke: bool = False, data: str = "swissroll",
         out: Path = Path("runs/examples/05_adaptive_neural_ode"), seed: int = 0) -> dict:
    opts = (dict(n0=2, max_layers=8, max_levels=3, steps=40, lr=0.02, n_train=256, n_test=256)
            if smoke else dict(n0=4, max_layers=32, max_levels=8, steps=300, lr=0.01))
    result = run_adapt(data, seed=seed, theta=0.5, **opts)
    write_outputs(result, out)
    s = result["settings"]
    print(f"{data}: width {s['width']}, T = {s['T']}, {s['field']} field, {s['steps']} Adam "
          f"steps per level, Doerfler theta {s['theta']}, seed {seed}")
    print("| arm | layers | training objective | DWR estimate | test accuracy |")
    print("|---|---|---|---|---|")
    for arm in ("adaptive", "uniform"):
        for lev in result[arm].history:
            print(f"| {arm} | {lev.n_layers} | {lev.objective:.4g} | {lev.estimate:.3g} | "
                  f"{lev.test_accuracy:.4f} |")
    final = result["adaptive"].history[-1]
    print("final adaptive mesh nodes:", " ".join(f"{t:.3g}" for t in final.nodes))
    print(f"wrote {out / 'mesh.png'}, {out / 'accuracy.png'}, {out / 'trajectories.png'}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds' version for CI")
    ap.add_argument("--data", default="swissroll", help="a 2-D data set (swissroll, spirals, "
                    "donut, peaks, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/examples/05_adaptive_neural_ode"))
    a = ap.parse_args()
    main(a.smoke or os.environ.get("OCNET_SMOKE") == "1", a.data, a.out, a.seed)
