"""DDPNOpt (DDP feedback on Adam's curvature) against plain Adam on DIGITS.

The network is the comparison's ``mlp-digits`` setting (64-64-64-10 tanh MLP, cross
entropy, batch 32). DDPNOpt with ``base="adam"`` takes Adam's step k_t and adds the
layer-wise DDP feedback gamma_t d_t, which reacts to how the earlier layers' update
already moved this layer's input (docs/ddp.md). Both start from the same weights and
see the same batches, at two learning rates (Adam's default 1e-3 and a larger 1e-2);
the figure shows the full-training-set loss per epoch on a log scale and the test
accuracy, and the seconds per step of DDPNOpt as a ratio to Adam's in the same run.

    python examples/03_ddpnopt_digits.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ocnet import make_solver, to_problem  # noqa: E402
from ocnet.compare import SETTINGS, build_setting  # noqa: E402
from ocnet.data import batches  # noqa: E402

LRS = (1e-3, 1e-2)
SOLVERS = {"adam": {}, "ddpnopt": {"base": "adam"}}


@torch.no_grad()
def _evaluate(problem, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = problem.rollout(x).xs[-1]
    loss = float(torch.nn.functional.cross_entropy(out, y))
    return loss, float((out.argmax(1) == y).double().mean())


def run(solver: str, lr: float, epochs: int, seed: int, n_train: int | None) -> dict:
    """Train one (solver, lr); loss/accuracy per epoch and mean seconds per step."""
    model, loss, ds = build_setting(SETTINGS["mlp-digits"], seed, n_train)
    problem = to_problem(model, loss)
    sol = make_solver(solver, problem, lr=lr, **SOLVERS[solver])
    gen = torch.Generator().manual_seed(seed)
    curve = [_evaluate(problem, ds.x_train, ds.y_train)[0]]
    acc, secs, steps = [], 0.0, 0
    for _ in range(epochs):
        for xb, yb in batches(ds.x_train, ds.y_train, 32, generator=gen):
            t0 = time.perf_counter()
            sol.step(xb, yb)
            secs += time.perf_counter() - t0
            steps += 1
        curve.append(_evaluate(problem, ds.x_train, ds.y_train)[0])
        acc.append(_evaluate(problem, ds.x_test, ds.y_test)[1])
    return {"curve": curve, "acc": acc, "sec_per_step": secs / steps}


def main(smoke: bool = False, out: Path = Path("runs/examples/03_ddpnopt_digits"),
         seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    epochs, n_train = (2, 512) if smoke else (25, None)
    res = {(s, lr): run(s, lr, epochs, seed, n_train) for lr in LRS for s in SOLVERS}
    ref = {lr: res[("adam", lr)]["sec_per_step"] for lr in LRS}
    print(f"DIGITS mlp-digits, {epochs} epochs, seed {seed}"
          + (f", {n_train} training images" if n_train else ""))
    print("| solver | lr | final train loss | best train loss | test accuracy "
          "| seconds/step vs adam |")
    print("|---|---|---|---|---|---|")
    for (s, lr), r in res.items():
        print(f"| {s} | {lr:g} | {r['curve'][-1]:.4g} | {min(r['curve']):.4g} | "
              f"{r['acc'][-1]:.4f} | {r['sec_per_step'] / ref[lr]:.2f} |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"adam": "tab:blue", "ddpnopt": "tab:orange"}
    for (s, lr), r in res.items():
        style = "-" if lr == LRS[0] else "--"
        label = f"{s}{' (base adam)' if s == 'ddpnopt' else ''}, lr {lr:g}"
        axes[0].semilogy(range(len(r["curve"])), r["curve"], style, color=colors[s],
                         label=label)
        axes[1].plot(range(1, len(r["acc"]) + 1), r["acc"], style, color=colors[s],
                     label=label)
    axes[0].set(xlabel="epoch", ylabel="training loss (full set)",
                title="DIGITS, 3-layer MLP: training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ddpnopt_vs_adam.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds' version for CI")
    ap.add_argument("--out", type=Path, default=Path("runs/examples/03_ddpnopt_digits"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.smoke or os.environ.get("OCNET_SMOKE") == "1", a.out, a.seed)
