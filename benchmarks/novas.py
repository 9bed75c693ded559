"""NOVAS vs DCEM vs unrolled gradient descent (REFERENCE.md section 5).

Sections (each prints a markdown table):

1. Global search: 2-D Rastrigin and a 1-D double well from an initial mean where gradient
   descent lands in a wrong basin; success rate (|y - y*| < 1e-3) over independent seeds.
2. Gradient check: the layer's derivative along random parameter directions against
   central finite differences with the sampling noise held fixed (float64).
3. Graph memory: bytes autograd saves for backward at 10 and 100 inner iterations
   (counted with torch.autograd.graph.saved_tensors_hooks, deduplicated by storage).
4. Energy regression y = x sin x (both public protocols): test MSE mean +- std over seeds,
   training time, saved-graph bytes of one training step; the inner-iteration ablation
   (train with 10, test with 1..30) as a table and a PNG plot.

Usage: python benchmarks/novas.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocnet.solvers.novas import DCEM, NOVAS, UnrolledGD, dcem, novas, novas_step  # noqa: E402

F64 = torch.float64


# ----------------------------------------------------------------------------- 1. search
def rastrigin(Y):
    return 20 + (Y**2 - 10 * torch.cos(2 * math.pi * Y)).sum(-1)


def double_well(Y):
    return ((Y**2 - 1) ** 2 + 0.3 * Y).sum(-1)


def double_well_min():
    r = np.roots([4.0, 0.0, -4.0, 0.3])
    r = r[np.isreal(r)].real
    return float(r[np.argmin((r**2 - 1) ** 2 + 0.3 * r)])


def gradient_descent(E, y0, lr, n):
    y = y0.clone()
    for _ in range(n):
        y = y.requires_grad_(True)
        (g,) = torch.autograd.grad(E(y[:, None]).sum(), y)
        y = (y - lr * g).detach()
    return y


def global_search(n_seeds):
    problems = [
        ("Rastrigin 2-D", rastrigin, [2.5, -3.3], 5.0, 1e-3, torch.zeros(2, dtype=F64)),
        ("double well 1-D", double_well, [1.5], 2.0, 1e-2,
         torch.tensor([double_well_min()], dtype=F64)),
    ]
    methods = [
        ("NOVAS exp kappa=1", dict(kappa=1.0)),
        ("NOVAS exp kappa=3", dict(kappa=3.0)),
        ("NOVAS exp kappa=5", dict(kappa=5.0)),
        ("NOVAS exp kappa=10", dict(kappa=10.0)),
        ("NOVAS soft-CE", dict(shape="soft_ce")),
        ("DCEM (10/100 elites)", None),
    ]
    lines = [
        f"### Global search: success rate over {n_seeds} seeds (|y - y*| < 1e-3)",
        "",
        "NOVAS: 100 samples, 200 iterations, alpha 1, var_floor 1e-14 (the public 1e-3 floor "
        "keeps sigma >= 0.03, which limits the precision of the mean to ~1e-2). "
        "DCEM: 100 samples, 10 elites, 200 iterations, temperature 1. "
        "Gradient descent: 3000 steps from the same initial mean (deterministic).",
        "",
        "| problem | initial mean | sigma0 | GD end point (wrong basin) | "
        + " | ".join(m for m, _ in methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for name, E, mu0, s0, lr, star in problems:
        m0 = torch.tensor([mu0], dtype=F64)
        y_gd = gradient_descent(E, m0, lr, 3000)[0]
        gd_ok = float((y_gd - star).norm()) < 1e-3
        rates = []
        for _, opts in methods:
            hits = 0
            for seed in range(n_seeds):
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    if opts is None:
                        y = dcem(E, m0, s0, n_iter=200, generator=g).y[0]
                    else:
                        y = novas(E, m0, s0, n_iter=200, var_floor=1e-14, generator=g,
                                  **opts).y[0]
                hits += int(float((y - star).norm()) < 1e-3)
            rates.append(f"{hits}/{n_seeds}")
        gd = ", ".join(f"{v:.4f}" for v in y_gd.tolist()) + (" (global!)" if gd_ok else "")
        lines.append(f"| {name} | {mu0} | {s0} | ({gd}) | " + " | ".join(rates) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. gradients
class SmallEnergy(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Softplus(), nn.Linear(width, width),
                                 nn.Softplus(), nn.Linear(width, 1))

    def forward(self, x, Y):
        xs = x[:, None, :].expand(-1, Y.shape[1], -1)
        return self.net(torch.cat([xs, Y], -1)).squeeze(-1) + 0.1 * (Y**2).sum(-1)


def _fd(fn, params, v, h=1e-6):
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.add_(h * d)
        a = fn()
        for p, d in zip(params, v, strict=True):
            p.sub_(2 * h * d)
        b = fn()
        for p, d in zip(params, v, strict=True):
            p.add_(h * d)
    return (a - b) / (2 * h)


def gradient_check():
    torch.manual_seed(0)
    net = SmallEnergy().to(F64)
    B, N, K, d = 3, 50, 6, 2
    x = torch.randn(B, 2, dtype=F64)
    mu0 = torch.zeros(B, d, dtype=F64)
    noise = torch.randn(K, B, N, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, d, dtype=F64)

    def E(Y):
        return net(x, Y)

    with torch.no_grad():
        start = {s: novas(E, mu0, 2.0, n_iter=K - 1, noise=noise, shape=s, kappa=3.0,
                          differentiate="all") for s in ("exponential", "soft_ce")}
    cases = {}
    for s in ("exponential", "soft_ce"):
        cases[f"NOVAS {s}, all iterations"] = (
            lambda s=s: novas(E, mu0, 2.0, n_iter=K, noise=noise, shape=s, kappa=3.0,
                              differentiate="all").y,
            None,
        )
        cases[f"NOVAS {s}, last iteration"] = (
            lambda s=s: novas(E, mu0, 2.0, n_iter=K, noise=noise, shape=s, kappa=3.0,
                              differentiate="last").y,
            lambda s=s: novas_step(E, start[s].y, start[s].sigma, noise[K - 1], shape=s,
                                   kappa=3.0)[0],
        )
    cases["DCEM"] = (lambda: dcem(E, mu0, 2.0, n_elite=5, n_iter=K, noise=noise).y, None)
    params = list(net.parameters())
    lines = [
        "### Gradient of the layer output vs central differences (float64, noise fixed)",
        "",
        "Loss w.y over a batch of 3, y in R^2, 50 samples, 6 iterations; 3 random "
        "directions in parameter space, h = 1e-6. For last-iteration differentiation the "
        "finite differences are of the one differentiated update from the reached "
        "(mu, sigma) (held fixed, as the layer's graph does).",
        "",
        "| layer | max relative error over 3 directions |",
        "|---|---|",
    ]
    for name, (out, fd_out) in cases.items():
        fd_out = fd_out or out
        grads = torch.autograd.grad((w * out()).sum(), params, materialize_grads=True)
        gen = torch.Generator().manual_seed(2)
        worst = 0.0
        for _ in range(3):
            v = [torch.randn(p.shape, dtype=F64, generator=gen) for p in params]
            exact = float(sum((g * vi).sum() for g, vi in zip(grads, v, strict=True)))
            fd = float(_fd(lambda f=fd_out: (w * f()).sum(), params, v))
            worst = max(worst, abs(exact - fd) / abs(fd))
        lines.append(f"| {name} | {worst:.2e} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. memory
def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs, each storage view counted once."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = (
            t.numel() * t.element_size()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def memory_table():
    torch.manual_seed(0)
    net = EnergyNet()
    x = torch.linspace(0, 2 * math.pi, 64)[:, None]
    rows = []
    for name, make in [
        ("NOVAS, last iteration", lambda k: NOVAS(net, 1, n_iter=k)),
        ("NOVAS, all iterations", lambda k: NOVAS(net, 1, n_iter=k, differentiate="all")),
        ("DCEM", lambda k: DCEM(net, 1, n_iter=k)),
        ("unrolled GD", lambda k: UnrolledGD(net, 1, n_iter=k)),
    ]:
        vals = []
        for k in (10, 100):
            layer = make(k)
            b, _ = saved_bytes(lambda layer=layer: layer(x, generator=torch.Generator()))
            vals.append(b)
        rows.append(f"| {name} | {vals[0] / 2**20:.2f} | {vals[1] / 2**20:.2f} | "
                    f"{vals[1] / vals[0]:.2f} |")
    return "\n".join([
        "### Saved autograd graph of one forward pass (MiB; batch 64, 100 samples, float32)",
        "",
        "Measured by counting the bytes of every tensor autograd saves for backward "
        "(torch.autograd.graph.saved_tensors_hooks), deduplicated by storage view. On a CPU "
        "this is the activation memory a backward pass needs; it excludes transient "
        "buffers freed during the forward pass.",
        "",
        "| layer | 10 iterations | 100 iterations | ratio |",
        "|---|---|---|---|",
        *rows,
    ])


# ----------------------------------------------------------------------------- 4. regression
class EnergyNet(nn.Module):
    """concat(x, y) -> 3 x (Linear 128 + Softplus) -> Linear 1 (the DCEM/NOVAS energy net)."""

    def __init__(self, hidden=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, 1),
        )

    def forward(self, x, Y):
        xs = x[:, None, :].expand(-1, Y.shape[1], -1)
        return self.net(torch.cat([xs, Y], -1)).squeeze(-1)


def make_layer(method, net):
    if method == "NOVAS":
        return NOVAS(net, 1, mu0=0.0, sigma0=10.0, n_samples=100, n_iter=10)
    if method == "DCEM":
        return DCEM(net, 1, mu0=0.0, sigma0=7.0, n_samples=100, n_elite=10, n_iter=10)
    return UnrolledGD(net, 1, mu0=0.0, n_iter=10, lr=0.1)


def protocol_data(protocol, seed):
    """P200: 200 points on [0, 2pi], a random 25% held out (train 150 / test 50);
    P100: 100 points used both to train and to test. Points on a linspace (public code)."""
    n = 200 if protocol == "P200" else 100
    x = torch.linspace(0.0, 2 * math.pi, n)
    if protocol == "P200":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))
        n_val = math.ceil(0.25 * n)
        xt, xv = x[perm[n_val:]], x[perm[:n_val]]
    else:
        xt = xv = x
    return xt[:, None], (xt * torch.sin(xt))[:, None], xv[:, None], (xv * torch.sin(xv))[:, None]


def evaluate(layer, x, y, seed, **overrides):
    with torch.no_grad():
        g = torch.Generator().manual_seed(10_000 + seed)
        return float((layer(x, generator=g, **overrides) - y).pow(2).mean())


def train_one(method, protocol, seed, steps, batch, iters_grid):
    torch.manual_seed(seed)
    xt, yt, xv, yv = protocol_data(protocol, seed)
    net = EnergyNet()
    layer = make_layer(method, net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.5, patience=5)
    g = torch.Generator().manual_seed(seed)
    mem, _ = saved_bytes(lambda: layer(xt[:batch], generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randperm(xt.shape[0], generator=g)[:batch]
        pred = layer(xt[idx], generator=g)
        loss = (pred - yt[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:  # plateau schedule on the held-out MSE, every 50 steps
            sched.step(evaluate(layer, xv, yv, seed))
    seconds = time.perf_counter() - t0
    test = evaluate(layer, xv, yv, seed)
    ablation = [evaluate(layer, xv, yv, seed, n_iter=k) for k in iters_grid]
    return dict(test=test, seconds=seconds, mem=mem, ablation=ablation)


def regression(seeds, steps, batch, iters_grid, out_dir, protocols=("P200", "P100")):
    methods = ("NOVAS", "DCEM", "unrolled GD")
    tables, results = [], {}
    for protocol in protocols:
        for m in methods:
            runs = []
            for s in seeds:
                r = train_one(m, protocol, s, steps, batch, iters_grid)
                runs.append(r)
                print(f"  [{protocol} {m} seed {s}] test MSE {r['test']:.4f} "
                      f"({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
            results[(protocol, m)] = runs
        base = np.mean([r["seconds"] for r in results[(protocol, "NOVAS")]])
        desc = ("P200: 200 points on a linspace of [0, 2pi], 25% random validation split "
                "(train 150, test = the 50 held out)" if protocol == "P200" else
                "P100: 100 points on a linspace of [0, 2pi], used both to train and to test")
        lines = [
            f"### Energy regression, protocol {desc}",
            "",
            f"{len(seeds)} seeds, {steps} Adam steps (lr 1e-3, minibatch {batch}, grad clip "
            "1.0, ReduceLROnPlateau factor 0.5 patience 5 on the held-out MSE every 50 "
            "steps), 10 inner iterations. Test MSE with 10 inner iterations (the training "
            "value). Time: training wall time (ratio to NOVAS in the same run). Graph: "
            "bytes autograd saves in one training forward pass.",
            "",
            "| method | test MSE (mean +- std) | train time s | time / NOVAS | graph MiB |",
            "|---|---|---|---|---|",
        ]
        for m in methods:
            runs = results[(protocol, m)]
            te = np.array([r["test"] for r in runs])
            sec = np.mean([r["seconds"] for r in runs])
            lines.append(
                f"| {m} | {te.mean():.4f} +- {te.std():.4f} | {sec:.1f} | {sec / base:.2f} | "
                f"{runs[0]['mem'] / 2**20:.2f} |"
            )
        lines += ["", f"Inner-iteration ablation ({protocol}; trained with 10, test MSE mean "
                  "over seeds):", "",
                  "| inner iterations | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for j, k in enumerate(iters_grid):
            vals = [np.mean([r["ablation"][j] for r in results[(protocol, m)]]) for m in methods]
            lines.append(f"| {k} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        off = [j for j, k in enumerate(iters_grid) if k != 10]
        means = {m: np.mean([[r["ablation"][j] for j in off] for r in results[(protocol, m)]])
                 for m in methods}
        lines += ["", "Mean test MSE over the off-training iteration counts: "
                  + ", ".join(f"{m} {v:.4f}" for m, v in means.items())]
        tables.append("\n".join(lines))
    plot_ablation(results, iters_grid, out_dir, protocols)
    return "\n\n".join(tables)


def timing_table(repeats, batch=32):
    """Per-training-step wall time, methods interleaved round-robin so that the load of a
    shared machine hits all of them alike; the median over repeats."""
    torch.manual_seed(0)
    xt, yt, _, _ = protocol_data("P200", 0)
    x, y = xt[:batch], yt[:batch]
    setups = {}
    for m in ("NOVAS", "DCEM", "unrolled GD"):
        net = EnergyNet()
        setups[m] = (make_layer(m, net), torch.optim.Adam(net.parameters(), lr=1e-3), net)
    times = {m: [] for m in setups}
    g = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        for m, (layer, opt, net) in setups.items():
            t0 = time.perf_counter()
            loss = (layer(x, generator=g) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            times[m].append(time.perf_counter() - t0)
    base = float(np.median(times["NOVAS"]))
    lines = [
        f"### Training-step time, interleaved (minibatch {batch}, median of {repeats})",
        "",
        "| method | ms / step | ratio to NOVAS |",
        "|---|---|---|",
    ]
    for m, ts in times.items():
        med = float(np.median(ts))
        lines.append(f"| {m} | {1000 * med:.1f} | {med / base:.2f} |")
    return "\n".join(lines)


def plot_ablation(results, iters_grid, out_dir, protocols):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, protocol in zip(axes, protocols, strict=True):
        for m in ("NOVAS", "DCEM", "unrolled GD"):
            a = np.array([r["ablation"] for r in results[(protocol, m)]])
            mean, std = a.mean(0), a.std(0)
            ax.plot(iters_grid, mean, marker="o", ms=3, label=m)
            ax.fill_between(iters_grid, np.maximum(mean - std, 1e-6), mean + std, alpha=0.2)
        ax.axvline(10, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("inner iterations at test (trained with 10)")
        ax.set_title(protocol)
    axes[0].set_ylabel("test MSE")
    axes[0].legend()
    fig.tight_layout()
    path = Path(out_dir) / f"ablation_{'_'.join(protocols)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"(plot: {path})", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings, < 5 minutes")
    ap.add_argument("--out", default="runs/bench/novas")
    ap.add_argument("--sections", default="search,grad,memory,timing,regression",
                    help="comma-separated subset of search,grad,memory,timing,regression")
    ap.add_argument("--protocols", default="P200,P100", help="regression protocols to run")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.quick:
        n_seeds, seeds, steps, batch = 10, [0, 1], 50, 32
        grid = [1, 2, 5, 10, 20, 30]
    else:
        n_seeds, seeds, steps, batch = 100, [0, 1, 2, 3, 4], 300, 32
        grid = [1, 2, 3, 5, 7, 10, 12, 15, 20, 25, 30]
    steps = args.steps or steps
    sections = set(args.sections.split(","))
    protocols = tuple(args.protocols.split(","))
    t0 = time.perf_counter()
    parts = [
        f"## NOVAS benchmark ({'quick' if args.quick else 'full'}; sections "
        f"{args.sections}); torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        "shared 2-core CPU box",
    ]
    if "search" in sections:
        parts.append(global_search(n_seeds))
    if "grad" in sections:
        parts.append(gradient_check())
    if "memory" in sections:
        parts.append(memory_table())
    if "timing" in sections:
        parts.append(timing_table(10 if args.quick else 40))
    if "regression" in sections:
        parts.append(regression(seeds, steps, batch, grid, out, protocols))
    text = "\n\n".join(parts) + f"\n\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    name = "results.md" if len(sections) == 5 else f"results_{'_'.join(sorted(sections))}.md"
    (out / name).write_text(text)


if __name__ == "__main__":
    main()
