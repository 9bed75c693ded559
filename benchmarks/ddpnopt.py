"""DDPNOpt benchmark (REFERENCE.md section 1; issue 3).

(a) test accuracy (mean +- std over seeds) of SGD, momentum, RMSprop, Adam, a Kronecker GN
    baseline (DDPNOpt's kfac base without feedback), DDPNOpt on each base, and vanilla DDP
    (WINE): FCN on WINE, DIGITS and MNIST-1D, CNN on DIGITS;
(b) seconds per step as a ratio to Adam (medians, same run) and the counted matmul FLOPs;
(c) the learning-rate sweep of Fig. 4a: each base against its DDPNOpt twin (same lr);
(d) vanishing gradients: a deep sigmoid FCN on DIGITS with a Max-Mahalanobis-center loss;
(e) the feedback gain / V_hh regularisation sweep at large learning rates.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/ddpnopt.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ocnet import data  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.solvers import ddp as _ddp  # noqa: E402, F401  (registers "ddp")
from ocnet.solvers import ddpnopt as _ddpnopt  # noqa: E402, F401  (registers "ddpnopt")
from ocnet.solvers.base import make_solver  # noqa: E402

BASE_LR = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3, "kfac": 0.05}


def solver_spec(name: str, lr: float | None = None, **extra) -> tuple[str, dict]:
    """(registry name, options) of a benchmark solver label."""
    if name in ("sgd", "momentum", "rmsprop", "adam"):
        return name, {"lr": lr or BASE_LR[name], **extra}
    if name == "kfac":
        return "ddpnopt", {"base": "kfac", "feedback": False, "lr": lr or BASE_LR["kfac"], **extra}
    if name.startswith("ddpnopt-"):
        base = name.split("-", 1)[1]
        return "ddpnopt", {"base": base, "lr": lr or BASE_LR[base], **extra}
    if name == "ddp":
        return "ddp", {"mu": 1e-2, "max_tries": 4, **extra}
    raise ValueError(name)


# ---------------------------------------------------------------- tasks
def fcn(n_in: int, n_out: int, width: int, layers: int, act: str) -> nn.Sequential:
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, width), acts[act]()]
        d = width
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


def cnn(channels: int, n_out: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
    c = 1
    for _ in range(4):
        mods += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
        c = channels
    mods += [nn.Flatten(), nn.Linear(channels * 64, 64), nn.ReLU(), nn.Linear(64, n_out)]
    return nn.Sequential(*mods)


def mmc_centers(k: int, radius: float = 10.0) -> torch.Tensor:
    """Max-Mahalanobis centers: the K vertices of a regular simplex on a sphere (R^K)."""
    e = torch.eye(k, dtype=torch.float64)
    v = e - e.mean(0, keepdim=True)
    return radius * v / v.norm(dim=1, keepdim=True)


class MMCLoss(nn.Module):
    """mean_i |z_i - mu_{y_i}|^2 / 2 with fixed Max-Mahalanobis centers (Pang et al. 2020)."""

    def __init__(self, k: int, radius: float = 10.0) -> None:
        super().__init__()
        self.register_buffer("mu", mmc_centers(k, radius).float())

    def forward(self, z, y):
        return 0.5 * ((z - self.mu[y]) ** 2).sum(1).mean()


def make_task(task: str, seed: int, quick: bool):
    """(dataset, model, loss, batch, epochs) of a benchmark task."""
    if task == "wine":
        ds = data.load("wine", seed=seed)
        return ds, fcn(13, 3, 16, 5, "tanh"), "cross_entropy", 8, 8 if quick else 40
    if task == "digits":
        ds = data.load("digits", seed=seed)
        return ds, fcn(64, 10, 32, 5, "tanh"), "cross_entropy", 32, 4 if quick else 20
    if task == "mnist1d":
        ds = data.load("mnist1d", seed=seed, n_train=2000 if quick else None)
        return ds, fcn(40, 10, 32, 5, "relu"), "cross_entropy", 32, 2 if quick else 10
    if task == "digits-cnn":
        ds = data.load("digits", seed=seed)
        return ds, cnn(8 if quick else 16, 10), "cross_entropy", 128, 3 if quick else 10
    if task == "deep-sigmoid":
        ds = data.load("digits", seed=seed)
        return ds, fcn(64, 10, 32, 10, "sigmoid"), MMCLoss(10), 32, 3 if quick else 30
    raise ValueError(task)


def accuracy(problem, ds, loss) -> float:
    with torch.no_grad():
        out = problem.module(ds.x_test)
        if isinstance(loss, MMCLoss):
            pred = ((out[:, None, :] - loss.mu[None]) ** 2).sum(-1).argmin(1)
        else:
            pred = out.argmax(1)
        return float((pred == ds.y_test).double().mean())


def run(task: str, solver: str, seed: int, quick: bool, lr: float | None = None,
        max_steps: int | None = None, **extra) -> dict:
    """Train once; returns accuracy, per-epoch train loss, median seconds per step."""
    torch.manual_seed(seed)
    ds, model, loss, batch, epochs = make_task(task, seed, quick)
    loss_fn = loss if isinstance(loss, nn.Module) else loss
    problem = to_problem(model, loss_fn)
    reg, opts = solver_spec(solver, lr, **extra)
    s = make_solver(reg, problem, **opts)
    gen = torch.Generator().manual_seed(seed)
    curve, secs, cpu, diverged, steps = [], [], [], False, 0
    for _ in range(epochs):
        losses = []
        for xb, yb in data.batches(ds.x_train, ds.y_train, batch, generator=gen):
            c0 = time.process_time()
            info = s.step(xb, yb)
            cpu.append(time.process_time() - c0)
            secs.append(info.seconds)
            losses.append(float(info.loss))
            steps += 1
            if max_steps and steps >= max_steps:
                break
        ep = sum(losses) / len(losses)
        curve.append(ep)
        if not math.isfinite(ep) or not all(torch.isfinite(p).all() for p in
                                             problem.parameters()):
            diverged = True
            break
        if max_steps and steps >= max_steps:
            break
    acc = float("nan") if diverged else accuracy(problem, ds, loss)
    return {"task": task, "solver": solver, "seed": seed, "lr": opts.get("lr"), "acc": acc,
            "curve": curve, "sec": statistics.median(secs[len(secs) // 10:] or secs),
            "cpu": statistics.median(cpu[len(cpu) // 10:] or cpu),
            "diverged": diverged, "extra": {k: v for k, v in extra.items()}}


def ms(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "diverged"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    bad = len(values) - len(vals)
    return f"{100 * m:.1f} ± {100 * s:.1f}" + (f" ({bad} div.)" if bad else "")


# ---------------------------------------------------------------- FLOPs
def fcn_flops(dims: list[int], B: int, feedback: bool, auto_gain: bool, vxx: bool) -> int:  # noqa: N803
    """Matmul FLOPs of one step (2 per multiply-add); elementwise work is not counted."""
    layer = [2 * B * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    total = sum(layer)  # forward
    total += sum(layer)  # weight gradients
    total += sum(layer[1:])  # input gradients (not needed at the first layer)
    if feedback:
        total += sum(layer)  # the feedback forward pass xhat
        total += sum(layer[1:])  # weighted weight-gradient (dx_0 = 0: none at layer 0)
        if auto_gain:
            total += sum(layer[1:])  # q = a d^T for the gain
        if vxx:
            total += sum(layer[1:])  # r = (pre(xhat) - a) W^T
    return total


# ---------------------------------------------------------------- parts
def part_a(args, out: list[str], results: dict) -> None:
    tasks = args.tasks.split(",")
    solvers = ["sgd", "momentum", "rmsprop", "adam", "kfac", "ddpnopt-sgd", "ddpnopt-momentum",
               "ddpnopt-rmsprop", "ddpnopt-adam", "ddpnopt-kfac", "ddp"]
    if args.solvers:
        solvers = args.solvers.split(",")
    rows = {}
    for task in tasks:
        for solver in solvers:
            if solver == "ddp" and task != "wine":
                continue
            seeds = args.seeds if solver != "ddp" else args.seeds_ddp
            if args.quick and task == "digits-cnn":
                seeds = 1
            rs = [run(task, solver, sd, args.quick) for sd in range(seeds)]
            rows[(task, solver)] = rs
            log(f"(a) {task} {solver}: {ms([r['acc'] for r in rs])}  sec/step "
                f"{statistics.median(r['sec'] for r in rs):.4f}")
    results["a"] = {f"{k[0]}|{k[1]}": v for k, v in rows.items()}
    out.append("## (a) Test accuracy (%), mean ± std over seeds\n")
    out.append(f"seeds: {args.seeds} (vanilla DDP: {args.seeds_ddp}); learning rates: "
               f"{BASE_LR} (DDPNOpt uses its base's); DDPNOpt default options "
               "(gain=auto, vxx_reg=1, trust=0.3, curvature_floor=0.1); DDP mu0=1e-2.\n")
    out.append("| solver | " + " | ".join(tasks) + " |")
    out.append("|---" * (len(tasks) + 1) + "|")
    for solver in solvers:
        cells = [ms([r["acc"] for r in rows[(t, solver)]]) if (t, solver) in rows else "—"
                 for t in tasks]
        out.append(f"| {solver} | " + " | ".join(cells) + " |")
    out.append("")
    # (b) from the same runs
    out.append("## (b) Seconds per step relative to Adam, from the runs of (a)\n")
    out.append("Median CPU time of the process per step (time.process_time around "
               "solver.step), relative to Adam's in the same run. CPU time, not wall time: "
               "with a load of ~11 on 2 cores a step's wall time is dominated by preemption. "
               "See also the interleaved timing table below.\n")
    out.append("| solver | " + " | ".join(tasks) + " |")
    out.append("|---" * (len(tasks) + 1) + "|")
    for solver in solvers:
        cells = []
        for t in tasks:
            if (t, solver) not in rows or (t, "adam") not in rows:
                cells.append("—")
                continue
            mine = statistics.median(r["cpu"] for r in rows[(t, solver)])
            adam = statistics.median(r["cpu"] for r in rows[(t, "adam")])
            cells.append(f"{mine / adam:.2f}")
        out.append(f"| {solver} | " + " | ".join(cells) + " |")
    adam_ms = {t: 1e3 * statistics.median(r["cpu"] for r in rows[(t, "adam")]) for t in tasks
               if (t, "adam") in rows}
    out.append("\nAdam's median CPU time per step (ms): " + ", ".join(
        f"{t} {v:.2f}" for t, v in adam_ms.items()) + "\n")


def part_b(args, out: list[str], results: dict) -> None:
    """Interleaved timing: every solver steps on the same batch in turn (CPU time)."""
    out.append("## (b) Interleaved timing: CPU seconds per step relative to Adam\n")
    out.append("All variants are built on the same initial network and step on the same "
               f"batch in turn ({args.timing_steps} batches, first 10 % dropped), so load "
               "changes hit all alike; median of time.process_time per step.\n")
    variants = [("adam", "adam", {}), ("sgd", "sgd", {}), ("rmsprop", "rmsprop", {}),
                ("ddpnopt-adam literal (gain 1, vxx_reg 0, trust 0)", "ddpnopt-adam",
                 {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.0}),
                ("ddpnopt-adam auto gain, vxx_reg 0", "ddpnopt-adam", {"vxx_reg": 0.0}),
                ("ddpnopt-adam default", "ddpnopt-adam", {}),
                ("ddpnopt-sgd default", "ddpnopt-sgd", {}),
                ("ddpnopt-rmsprop default", "ddpnopt-rmsprop", {}),
                ("kfac (no feedback)", "kfac", {}), ("ddpnopt-kfac default", "ddpnopt-kfac", {})]
    tasks = ["wine", "digits", "mnist1d", "digits-cnn"]
    table: dict = {}
    for task in tasks:
        ds, _, loss, batch, _ = make_task(task, 0, True)
        solvers = []
        for label, name, extra in variants:
            torch.manual_seed(0)
            _, model, _, _, _ = make_task(task, 0, True)
            problem = to_problem(model, loss)
            reg, opts = solver_spec(name, None, **extra)
            solvers.append((label, make_solver(reg, problem, **opts)))
        times: dict = {label: [] for label, _, _ in variants}
        gen = torch.Generator().manual_seed(0)
        n = 0
        while n < args.timing_steps:
            for xb, yb in data.batches(ds.x_train, ds.y_train, batch, generator=gen):
                for label, sv in solvers:
                    c0 = time.process_time()
                    sv.step(xb, yb)
                    times[label].append(time.process_time() - c0)
                n += 1
                if n >= args.timing_steps:
                    break
        for label, v in times.items():
            table[(task, label)] = statistics.median(v[len(v) // 10:])
        log(f"(b) timing {task} done")
    out.append("| solver | " + " | ".join(tasks) + " |")
    out.append("|---" * (len(tasks) + 1) + "|")
    for label, _, _ in variants:
        cells = [f"{table[(t, label)] / table[(t, 'adam')]:.2f}" for t in tasks]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("\nAdam's CPU ms per step: " + ", ".join(
        f"{t} {1e3 * table[(t, 'adam')]:.2f}" for t in tasks) + "\n")
    out.append("Counted matmul FLOPs of one step relative to Adam (FCN, elementwise work "
               "not counted; dx_0 = 0 so the first layer gets no feedback):\n")
    out.append("| network | fixed gain (literal) | auto gain | auto gain + vxx_reg (default) |")
    out.append("|---|---|---|---|")
    for name, dims, B in [("wine FCN", [13, 16, 16, 16, 16, 3], 8),  # noqa: N806
                          ("digits FCN", [64, 32, 32, 32, 32, 10], 32),
                          ("mnist1d FCN", [40, 32, 32, 32, 32, 10], 32)]:
        a = fcn_flops(dims, B, False, False, False)
        f1 = fcn_flops(dims, B, True, False, False) / a
        f2 = fcn_flops(dims, B, True, True, False) / a
        f3 = fcn_flops(dims, B, True, True, True) / a
        out.append(f"| {name} | {f1:.2f} | {f2:.2f} | {f3:.2f} |")
    out.append("")
    results["b"] = {f"{k[0]}|{k[1]}": v for k, v in table.items()}


def part_c(args, out: list[str], results: dict) -> None:
    grid = {"sgd": [0.03, 0.1, 0.3, 1.0, 3.0], "rmsprop": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            "adam": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}
    res = {}
    out.append("## (c) Learning-rate sweep on DIGITS FCN: base vs its DDPNOpt twin "
               "(identical hyper-parameters), test accuracy %\n")
    out.append(f"seeds: {args.seeds_sweep}\n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (base, lrs) in zip(axes, grid.items(), strict=True):
        out.append(f"### base {base}\n")
        out.append("| lr | " + base + " | ddpnopt-" + base + " | difference |")
        out.append("|---|---|---|---|")
        for name in (base, f"ddpnopt-{base}"):
            res[name] = {}
        for lr in lrs:
            a = [run("digits", base, sd, args.quick, lr=lr)["acc"]
                 for sd in range(args.seeds_sweep)]
            b = [run("digits", f"ddpnopt-{base}", sd, args.quick, lr=lr)["acc"]
                 for sd in range(args.seeds_sweep)]
            res[base][lr], res[f"ddpnopt-{base}"][lr] = a, b
            fa = [v for v in a if math.isfinite(v)]
            fb = [v for v in b if math.isfinite(v)]
            diff = (100 * (statistics.mean(fb) - statistics.mean(fa))
                    if fa and fb else float("nan"))
            out.append(f"| {lr:g} | {ms(a)} | {ms(b)} | {diff:+.1f} |")
            log(f"(c) {base} lr={lr:g}: {ms(a)} vs {ms(b)}")
        out.append("")
        for name, style in ((base, "o--"), (f"ddpnopt-{base}", "s-")):
            ys = [statistics.mean([v for v in res[name][lr] if math.isfinite(v)] or [0.0])
                  for lr in lrs]
            ax.semilogx(lrs, ys, style, label=name)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "lr_sweep.png", dpi=120)
    plt.close(fig)
    results["c"] = {k: {str(lr): v for lr, v in d.items()} for k, d in res.items()}


def part_d(args, out: list[str], results: dict) -> None:
    runs = [("sgd", 0.1, {}), ("adam", 1e-3, {}), ("ddpnopt-sgd", 0.1, {}),
            ("ddpnopt-adam", 1e-3, {}),
            ("ddpnopt-sgd", 0.1, {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.0}),
            ("kfac", 0.05, {}), ("ddpnopt-kfac", 0.05, {})]
    out.append("## (d) Vanishing gradients: 10-layer sigmoid FCN (width 32) on DIGITS, "
               "Max-Mahalanobis-center loss (radius 10)\n")
    out.append("Train loss (mean over the epoch's steps) at selected epochs, mean over seeds "
               f"({args.seeds_d}); final test accuracy.\n")
    curves = {}
    for solver, lr, extra in runs:
        label = solver + ("" if not extra else " (literal: gain 1, vxx_reg 0, trust 0)")
        rs = [run("deep-sigmoid", solver, sd, args.quick, lr=lr, **extra)
              for sd in range(args.seeds_d)]
        n = min(len(r["curve"]) for r in rs)
        curves[label] = ([statistics.mean(r["curve"][e] for r in rs) for e in range(n)],
                         ms([r["acc"] for r in rs]), lr)
        log(f"(d) {label}: {curves[label][0][-1]:.3f} {curves[label][1]}")
    n = max(len(c[0]) for c in curves.values())
    marks = sorted({0, 1, n // 4, n // 2, n - 1})
    out.append("| solver | lr | " + " | ".join(f"epoch {e + 1}" for e in marks) +
               " | test acc % |")
    out.append("|---|---|" + "---|" * len(marks) + "---|")
    for label, (c, acc, lr) in curves.items():
        cells = [f"{c[e]:.3f}" if e < len(c) else "—" for e in marks]
        out.append(f"| {label} | {lr:g} | " + " | ".join(cells) + f" | {acc} |")
    out.append("")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (c, _, _) in curves.items():
        ax.semilogy(range(1, len(c) + 1), c, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (MMC)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "vanishing_gradient.png", dpi=120)
    plt.close(fig)
    results["d"] = {k: v[0] for k, v in curves.items()}


def part_e(args, out: list[str], results: dict) -> None:
    cases = [("adam", 1e-2), ("adam", 3e-2), ("rmsprop", 3e-3), ("rmsprop", 1e-2)]
    configs = [("off (= base)", {"feedback": False}),
               ("literal: gain 1, vxx_reg 0, trust 0", {"gain": 1.0, "vxx_reg": 0.0,
                                                        "trust": 0.0}),
               ("gain 0.1, vxx_reg 0, trust 0", {"gain": 0.1, "vxx_reg": 0.0, "trust": 0.0}),
               ("auto, vxx_reg 0, trust 0", {"vxx_reg": 0.0, "trust": 0.0}),
               ("auto, vxx_reg 1, trust 0", {"trust": 0.0}),
               ("gain 1, vxx_reg 0, trust 0.3", {"gain": 1.0, "vxx_reg": 0.0}),
               ("auto, vxx_reg 0, trust 0.3", {"vxx_reg": 0.0}),
               ("auto, vxx_reg 0.1, trust 0.3", {"vxx_reg": 0.1}),
               ("default: auto, vxx_reg 1, trust 0.3", {}),
               ("auto, vxx_reg 10, trust 0.3", {"vxx_reg": 10.0}),
               ("auto, vxx_reg 1, trust 1", {"trust": 1.0}),
               ("auto, vxx_reg 1, trust 0.1", {"trust": 0.1}),
               ("default without curvature floor", {"curvature_floor": 0.0})]
    out.append("## (e) Feedback gain and V_hh regularisation at large learning rates "
               "(DIGITS FCN), test accuracy %\n")
    out.append(f"seeds: {args.seeds_sweep}\n")
    out.append("| configuration | " + " | ".join(f"{b} {lr:g}" for b, lr in cases) + " |")
    out.append("|---" * (len(cases) + 1) + "|")
    res = {}
    for label, opts in configs:
        cells = []
        for base, lr in cases:
            accs = [run("digits", f"ddpnopt-{base}", sd, args.quick, lr=lr, **opts)["acc"]
                    for sd in range(args.seeds_sweep)]
            res[f"{label}|{base}|{lr}"] = accs
            cells.append(ms(accs))
        log(f"(e) {label}: {cells}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    results["e"] = res


LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    LOG.append(msg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (< 5 minutes)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/ddpnopt"))
    ap.add_argument("--parts", default="abcde", help="which parts to run (letters a-e)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--seeds-ddp", type=int, default=None)
    ap.add_argument("--tasks", default="wine,digits,mnist1d,digits-cnn", help="tasks of (a)")
    ap.add_argument("--solvers", default="", help="solvers of (a) (default: all)")
    args = ap.parse_args(argv)
    q = args.quick
    args.seeds = args.seeds or (2 if q else 10)
    args.seeds_ddp = args.seeds_ddp or (1 if q else 2)
    args.seeds_sweep = 1 if q else 3
    args.seeds_d = 1 if q else 3
    args.timing_steps = 40 if q else 300
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()
    out = [f"# DDPNOpt benchmark ({'--quick' if q else 'full'})\n",
           f"Date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; shared "
           "2-core CPU box (about 8 concurrent jobs), float32, torch threads 1. Seeds 0..n-1 "
           "seed data split, initialisation and batch order. Times are ratios measured in "
           "the same run.\n"]
    results: dict = {}
    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d),
                     ("e", part_e)):
        if part in args.parts:
            fn(args, out, results)
            log(f"part {part} done at {time.time() - start:.0f}s")
    out.append(f"Total wall time {time.time() - start:.0f} s.\n")
    text = "\n".join(out)
    print(text)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
