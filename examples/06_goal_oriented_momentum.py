"""Goal-oriented braking on DIGITS: energy H and loss over training, events marked.

Trains the DIGITS MLP with ``phb`` (constant friction) and ``phb-goal`` (friction raised
x10 when the smoothed loss reaches 0.1 L_0 and 0.01 L_0) and plots, per step, the batch
loss, its moving average, the energy H = a L + |p|^2/(2m) + c|q|^2 (batch loss) and the
friction, with the braking events as vertical lines.

    OMP_NUM_THREADS=1 python examples/06_goal_oriented_momentum.py --out runs/examples/phb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ocnet import data  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers.port_hamiltonian import make_phb, make_phb_goal  # noqa: E402


def run(kind: str, ds: data.Dataset, epochs: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model("mlp", ds.n_features, ds.n_classes)
    problem = to_problem(model, "cross_entropy")
    if kind == "phb-goal":
        solver = make_phb_goal(problem, lr=lr, gamma=0.5, r=0.1, events=2, brake=10.0)
    else:
        solver = make_phb(problem, lr=lr, gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    loss, energy, friction = [], [], []
    for _ in range(epochs):
        for xb, yb in data.batches(ds.x_train, ds.y_train, 64, generator=gen):
            info = solver.step(xb, yb)
            loss.append(info.loss)
            energy.append(info.extra["energy"])
            friction.append(torch.as_tensor(info.extra["friction"]))
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).double().mean())
    # one host read at the end (the steps never waited for the device)
    return {"loss": torch.stack(loss).tolist(), "energy": torch.stack(energy).tolist(),
            "friction": torch.stack(friction).tolist(), "events": solver.events(),
            "acc": acc}


def ema(xs: list[float], beta: float = 0.9) -> list[float]:
    out, e = [], None
    for x in xs:
        e = x if e is None else beta * e + (1 - beta) * x
        out.append(e)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.4, help="time step h")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/examples/goal_oriented_momentum")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = data.load("digits", seed=0)
    runs = {k: run(k, ds, args.epochs, args.lr, args.seed) for k in ("phb", "phb-goal")}

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    colors = {"phb": "tab:blue", "phb-goal": "tab:orange"}
    for kind, r in runs.items():
        steps = range(len(r["loss"]))
        col = colors[kind]
        axes[0].semilogy(steps, r["loss"], alpha=0.25, color=col)
        axes[0].semilogy(steps, ema(r["loss"]), color=col, label=f"{kind} EMA loss (test acc "
                         f"{100 * r['acc']:.1f}%)")
        axes[1].semilogy(steps, r["energy"], color=col, label=f"{kind}: H")
        axes[2].semilogy(steps, r["friction"], color=col, label=f"{kind}: friction gamma")
    l0 = runs["phb-goal"]["loss"][0]
    for k, ratio in enumerate((0.1, 0.01)):
        axes[0].axhline(ratio * l0, color="gray", ls=":", lw=0.8,
                        label="goals r^k L_0" if k == 0 else None)
    for e in runs["phb-goal"]["events"]:
        for ax in axes:
            ax.axvline(e["step"], color="red", ls="--", lw=1)
        axes[0].annotate(f"event {e['event']}", (e["step"], l0), color="red", fontsize=8)
    axes[0].set_ylabel("batch loss")
    axes[1].set_ylabel("H = L + |p|^2/2m")
    axes[2].set_ylabel("friction")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=8)
    axes[0].set_title("DIGITS MLP: goal-oriented braking (red: events)")
    fig.tight_layout()
    fig.savefig(out / "energy_loss_events.png", dpi=120)
    for kind, r in runs.items():
        print(f"{kind}: test acc {100 * r['acc']:.2f}%, final EMA loss {ema(r['loss'])[-1]:.4g}, "
              f"events {[(e['event'], e['step']) for e in r['events']]}")
    print(f"wrote {out / 'energy_loss_events.png'}")


if __name__ == "__main__":
    main()
