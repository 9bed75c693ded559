"""E-MSA benchmark (REFERENCE.md section 2; issue 4).

(a) the reference toy problem: fit sin(x) on [-pi, pi] with 20 residual dense layers x 5
    nodes (tanh, residual step 0.25; input repeated to 5 features, output = feature sum as
    in the reference code), weight decay 1e-3, batch 100: loss per iteration and per
    second of E-MSA against SGD and Adam (learning-rate sweeps) and basic MSA;
(b) DIGITS and MNIST-1D, a 5-layer FCN (width 32): test accuracy over seeds of Adam and
    SGD (best of a small lr sweep), E-MSA and DDPNOpt (when ``ocnet.solvers.ddpnopt`` exists);
(c) seconds per step as a ratio to Adam measured in the same run, per inner iteration,
    against DDPNOpt, and the counted matmul FLOPs.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/emsa.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ocnet import data  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.models import emsa_toy_problem  # noqa: E402
from ocnet.solvers import gradient as _gradient  # noqa: E402, F401  (registers sgd, adam)
from ocnet.solvers import msa as _msa  # noqa: E402, F401  (registers msa, emsa)
from ocnet.solvers.base import make_solver  # noqa: E402

try:  # another helper's solver; compared against when it has landed
    from ocnet.solvers import ddpnopt as _ddpnopt  # noqa: F401

    HAVE_DDPNOPT = True
except ImportError:  # pragma: no cover - depends on the tree
    HAVE_DDPNOPT = False

INNER_ITERS = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- (a) toy problem
def toy_problem(seed: int, init_std: float = 0.1):
    """The public toy's problem (``ocnet.models.emsa_toy_problem``: the 20 layers are the
    stages, x repeated over the 5 nodes, the loss sums the features) with W ~ N(0, init_std^2)."""
    torch.manual_seed(seed)
    problem = emsa_toy_problem(1e-3)
    for m in problem.module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    g = torch.Generator().manual_seed(1000 + seed)
    x = (torch.rand(100, 1, generator=g) * 2 - 1) * math.pi
    return problem, x.repeat(1, 5), torch.sin(x)


TOY_SOLVERS = {
    # label: (registry name, options)
    "msa": ("msa", {"inner_iters": INNER_ITERS}),
    "emsa (reference scaling, rho=1)": ("emsa", {"rho": 1.0, "scaling": "reference",
                                                 "inner_iters": INNER_ITERS}),
    "emsa (mean scaling, rho=10)": ("emsa", {"rho": 10.0, "inner_iters": INNER_ITERS}),
    "emsa (mean scaling, rho=100)": ("emsa", {"rho": 100.0, "inner_iters": INNER_ITERS}),
}


def run_toy(label: str, name: str, opts: dict, seed: int, iters: int) -> dict:
    problem, x, y = toy_problem(seed)
    s = make_solver(name, problem, **opts)
    losses, secs = [], []
    for _ in range(iters):
        info = s.step(x, y)
        losses.append(float(info.loss))
        secs.append(info.seconds)
        if not math.isfinite(losses[-1]):
            break
    with torch.no_grad():
        losses.append(float(problem.objective(x, y)))  # after the last step
    return {"label": label, "seed": seed, "losses": losses, "secs": secs}


def part_a(args, out: list[str], results: dict) -> None:
    iters = 50 if args.quick else 200
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    sweeps = {"sgd": [0.03, 0.1, 0.3] if args.quick else [0.01, 0.03, 0.1, 0.3],
              "adam": [1e-3, 5e-3, 2e-2] if args.quick else [1e-3, 5e-3, 2e-2, 5e-2]}
    runs: dict[str, list[dict]] = {}
    for base, lrs in sweeps.items():
        for lr in lrs:
            label = f"{base} (lr={lr:g})"
            runs[label] = [run_toy(label, base, {"lr": lr}, s, iters) for s in seeds]
            log(f"(a) {label}: loss@50 {runs[label][0]['losses'][min(50, iters)]:.4g}")
    for label, (name, opts) in TOY_SOLVERS.items():
        runs[label] = [run_toy(label, name, opts, s, iters) for s in seeds]
        log(f"(a) {label}: loss@50 {runs[label][0]['losses'][min(50, iters)]:.4g}")
    results["a"] = runs

    def med(label: str, k: int) -> float:
        vals = [r["losses"][min(k, len(r["losses"]) - 1)] for r in runs[label]]
        return statistics.median(vals)

    def med_sec(label: str) -> float:
        return statistics.median(sec for r in runs[label] for sec in r["secs"][2:])

    budget = 2.0  # seconds of wall time
    out.append(f"## (a) toy problem: sin(x), 20 residual layers x 5, batch 100, "
               f"{iters} iterations, seeds {seeds}\n")
    out.append(f"Median over seeds of the objective J (MSE + weight decay 1e-3/2 |u|^2) after k "
               f"iterations; `J @ {budget:g} s` is J at the last iterate within {budget:g} s "
               "of wall time (see the loss-per-second plot).\n")
    cols = [k for k in (1, 10, 50, 100, iters) if k <= iters]
    cols = sorted(set(cols))
    out.append("| solver | " + " | ".join(f"J @ it {k}" for k in cols)
               + f" | J @ {budget:g} s | s/step |")
    out.append("|---" * (len(cols) + 3) + "|")
    for label in runs:
        at_budget = []
        for r in runs[label]:
            t = 0.0
            j = r["losses"][0]
            for sec, loss in zip(r["secs"], r["losses"][1:], strict=False):
                t += sec
                if t > budget:
                    break
                j = loss
            at_budget.append(j)
        out.append(f"| {label} | " + " | ".join(f"{med(label, k):.4g}" for k in cols)
                   + f" | {statistics.median(at_budget):.4g} | {med_sec(label):.4f} |")
    best = {}
    for base in sweeps:
        labels = [lab for lab in runs if lab.startswith(base + " ")]
        best[base] = min(labels, key=lambda lab: med(lab, 50) if math.isfinite(med(lab, 50))
                         else math.inf)
    k50 = min(50, iters)
    em = "emsa (reference scaling, rho=1)"
    out.append("")
    out.append(f"Target: E-MSA's J after {k50} iterations below Adam's and SGD's at their best "
               f"learning rates: E-MSA (reference scaling) {med(em, k50):.4g}, "
               f"E-MSA (mean, rho=10) {med('emsa (mean scaling, rho=10)', k50):.4g}; "
               f"best Adam {best['adam']} {med(best['adam'], k50):.4g}; "
               f"best SGD {best['sgd']} {med(best['sgd'], k50):.4g}.\n")
    results["a_best"] = best
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    show = [best["sgd"], best["adam"], "msa", *[lab for lab in TOY_SOLVERS if lab != "msa"]]
    for label in show:
        r = runs[label][0]
        ls = r["losses"]
        axes[0].semilogy(range(len(ls)), ls, label=label)
        t = [0.0]
        for sec in r["secs"]:
            t.append(t[-1] + sec)
        axes[1].semilogy(t[:len(ls)], ls[:len(t)], label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time [s] (shared 2-core CPU)")
    for ax in axes:
        ax.set_ylabel("J")
        ax.set_ylim(top=1e3)
    axes[0].legend(fontsize=7)
    fig.suptitle("toy sin(x) fit, seed 0")
    fig.tight_layout()
    fig.savefig(args.out / "toy_loss.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- (b) classification
def fcn(n_in: int, n_out: int, width: int = 32, layers: int = 5, act: str = "tanh"):
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, width), acts[act]()]
        d = width
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


def cls_task(task: str, seed: int, quick: bool):
    if task == "digits":
        return data.load("digits", seed=seed), "tanh", 32, 3 if quick else 10
    if task == "mnist1d":
        ds = data.load("mnist1d", seed=seed, n_train=2000 if quick else None)
        return ds, "tanh", 32, 2 if quick else 5
    raise ValueError(task)


def cls_solvers(quick: bool) -> dict[str, tuple[str, dict]]:
    solvers = {}
    for lr in ([3e-3, 1e-2] if quick else [1e-3, 3e-3, 1e-2]):
        solvers[f"adam (lr={lr:g})"] = ("adam", {"lr": lr})
    for lr in ([0.1, 0.3] if quick else [0.03, 0.1, 0.3]):
        solvers[f"sgd (lr={lr:g})"] = ("sgd", {"lr": lr})
    if quick:
        solvers["emsa (rho=1)"] = ("emsa", {"rho": 1.0, "inner_iters": INNER_ITERS})
    solvers["emsa (rho=10)"] = ("emsa", {"rho": 10.0, "inner_iters": INNER_ITERS})
    if HAVE_DDPNOPT:
        solvers["ddpnopt-adam (lr=0.003)"] = ("ddpnopt", {"base": "adam", "lr": 3e-3})
    return solvers


def run_cls(task: str, label: str, name: str, opts: dict, seed: int, quick: bool) -> dict:
    ds, act, batch, epochs = cls_task(task, seed, quick)
    torch.manual_seed(seed)
    model = fcn(ds.n_features, ds.n_classes, act=act)
    problem = to_problem(model, "cross_entropy", weight_decay=1e-4)
    s = make_solver(name, problem, **opts)
    gen = torch.Generator().manual_seed(seed)
    secs, curve, ok = [], [], True
    for _ in range(epochs):
        losses = []
        for xb, yb in data.batches(ds.x_train, ds.y_train, batch, generator=gen):
            info = s.step(xb, yb)
            secs.append(info.seconds)
            losses.append(float(info.loss))
        curve.append(sum(losses) / len(losses))
        if not math.isfinite(curve[-1]):
            ok = False
            break
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).double().mean()) if ok else math.nan
    return {"task": task, "label": label, "seed": seed, "acc": acc, "curve": curve,
            "sec": statistics.median(secs[len(secs) // 10:])}


def mean_std(vals: list[float]) -> str:
    v = [x for x in vals if math.isfinite(x)]
    if not v:
        return "diverged"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    bad = f" ({len(vals) - len(v)} diverged)" if len(v) < len(vals) else ""
    return f"{100 * statistics.mean(v):.2f} +- {100 * sd:.2f}{bad}"


def part_b(args, out: list[str], results: dict) -> None:
    seeds = list(range(args.seeds or (2 if args.quick else 10)))
    solvers = cls_solvers(args.quick)
    results["b"] = {}
    for task in ("digits", "mnist1d"):
        rows = {}
        for label, (name, opts) in solvers.items():
            rows[label] = [run_cls(task, label, name, opts, s, args.quick) for s in seeds]
            log(f"(b) {task} {label}: acc {mean_std([r['acc'] for r in rows[label]])}")
        results["b"][task] = rows
        _, _, batch, epochs = cls_task(task, 0, args.quick)
        out.append(f"## (b) {task}: FCN 5 x 32 tanh, batch {batch}, {epochs} epochs, "
                   f"weight decay 1e-4, seeds {seeds}\n")
        out.append("| solver | test accuracy % (mean +- std) | final train loss | s/step |")
        out.append("|---|---|---|---|")
        for label, rs in rows.items():
            fl = statistics.median(r["curve"][-1] for r in rs)
            sec = statistics.median(r["sec"] for r in rs)
            out.append(f"| {label} | {mean_std([r['acc'] for r in rs])} | {fl:.4f} | "
                       f"{sec:.4f} |")
        out.append("")


# ---------------------------------------------------------------------------- (c) cost
def fcn_flops(dims: list[int], batch: int, inner: int) -> tuple[int, int]:
    """Matmul FLOPs of one Adam step and of one E-MSA step of an FCN (dims d_0..d_L).

    Adam: forward x W^T (all layers), backward dW (all) and dx (all but the first).
    E-MSA: the same sweep with p_0 (dx also at layer 0), then per inner evaluation and layer:
    forward x W^T, dH/dx = (s'*p) W, and the double backward: dW from the state and costate
    penalties' pre-activation cotangent (one (B,o)x(B,i) product), W q (through s'') and
    v q^T (the costate penalty through W^T) -> 5 products; the last (linear) layer has no s''
    path -> 4.
    """
    mm = [2 * batch * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    adam = sum(mm) + sum(mm) + sum(mm[1:])
    outer = 3 * sum(mm)
    evals = sum(5 * m for m in mm[:-1]) + 4 * mm[-1]
    return adam, outer + inner * evals


def _timed_problem(task: str):
    """(problem, x, y, fcn dims or None) of a timing task, float32."""
    if task == "toy sin(x)":
        problem, x, y = toy_problem(0)
        return problem, x, y, None
    ds, act, batch, _ = cls_task(task, 0, True)
    torch.manual_seed(0)
    model = fcn(ds.n_features, ds.n_classes, act=act)
    problem = to_problem(model, "cross_entropy", weight_decay=1e-4)
    return (problem, ds.x_train[:batch], ds.y_train[:batch],
            [ds.n_features, 32, 32, 32, 32, ds.n_classes])


def part_c(args, out: list[str], results: dict) -> None:
    rounds = 15 if args.quick else 40
    out.append("## (c) seconds per step, as ratios measured in the same run\n")
    out.append(f"The solvers take turns, one step each, for {rounds} rounds on the same batch "
               f"(each on its own copy of the problem); medians per step. E-MSA: rho=10, "
               f"L-BFGS inner solver, K = {INNER_ITERS} inner iterations (evaluations). "
               "`wall` is elapsed time, `cpu` the thread's CPU time: on this shared box a "
               "step longer than a scheduler slice is often preempted, which inflates the wall "
               "time of long steps (E-MSA) more than that of short ones (Adam).\n")
    out.append("| task | Adam ms/step (cpu) | E-MSA ms/step (cpu) | E-MSA / Adam wall | "
               "E-MSA / Adam cpu | (E-MSA / K) / Adam cpu | FLOP ratio (E-MSA / K) / Adam | "
               "DDPNOpt / Adam cpu | E-MSA / DDPNOpt cpu |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for task in ("toy sin(x)", "digits", "mnist1d"):
        specs = {"adam": ("adam", {"lr": 1e-3}),
                 "emsa": ("emsa", {"rho": 10.0, "inner_iters": INNER_ITERS})}
        if HAVE_DDPNOPT:
            specs["ddpnopt"] = ("ddpnopt", {"base": "adam", "lr": 1e-3})
        solvers, data_ = {}, None
        for key, (name, opts) in specs.items():
            problem, x, y, dims = _timed_problem(task)
            solvers[key] = make_solver(name, problem, **opts)
            data_ = (x, y, dims)
        x, y, dims = data_
        wall: dict[str, list[float]] = {k: [] for k in solvers}
        cpu: dict[str, list[float]] = {k: [] for k in solvers}
        for r in range(rounds + 2):
            for key, s in solvers.items():
                c0, w0 = time.thread_time(), time.perf_counter()
                s.step(x, y)
                c1, w1 = time.thread_time(), time.perf_counter()
                if r >= 2:
                    wall[key].append(w1 - w0)
                    cpu[key].append(c1 - c0)
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in solvers}
        if dims is None:  # toy: 20 residual 5x5 layers + bias, batch 100
            mm = [2 * x.shape[0] * 5 * 5] * 20
            fa = 2 * sum(mm) + sum(mm[1:])
            fe = 3 * sum(mm) + INNER_ITERS * 5 * sum(mm)
        else:
            fa, fe = fcn_flops(dims, x.shape[0], INNER_ITERS)
        rows.append((task, med, fa, fe))
        log(f"(c) {task}: " + ", ".join(f"{k} {1e3 * v[1]:.2f} ms cpu" for k, v in med.items()))
    for task, med, fa, fe in rows:
        (aw, ac), (ew, ec) = med["adam"], med["emsa"]
        dd = f"{med['ddpnopt'][1] / ac:.2f}" if "ddpnopt" in med else "n/a"
        ed = f"{ec / med['ddpnopt'][1]:.1f}" if "ddpnopt" in med else "n/a"
        out.append(f"| {task} | {1e3 * ac:.2f} | {1e3 * ec:.1f} | {ew / aw:.1f} | {ec / ac:.1f} | "
                   f"{ec / INNER_ITERS / ac:.2f} | {fe / INNER_ITERS / fa:.2f} | {dd} | {ed} |")
    out.append("")
    out.append("Target: (E-MSA / K) / Adam within 2.5. The FLOP column is the ideal ratio from "
               "the matmul count (`fcn_flops`, docs/msa.md section 5); on layers this small the "
               "measured ratio is set by per-operation overhead (autograd graph construction "
               "and the batched L-BFGS vector operations) rather than by FLOPs.\n")
    results["c"] = [(t, m) for t, m, _, _ in rows]


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (< 5 minutes)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/emsa"))
    ap.add_argument("--parts", default="abc", help="which parts to run (letters of a, b, c)")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()
    out = [
        f"# E-MSA benchmark ({'quick' if args.quick else 'full'} run)\n",
        f"Date {datetime.date.today()}, torch {torch.__version__}, float32, CPU. The machine is "
        "a shared 2-core CPU box running several jobs at once: absolute times are noisy, only "
        "ratios within this run mean anything.\n",
        f"DDPNOpt available: {HAVE_DDPNOPT}.\n",
    ]
    results: dict = {}
    if "a" in args.parts:
        part_a(args, out, results)
    if "b" in args.parts:
        part_b(args, out, results)
    if "c" in args.parts:
        part_c(args, out, results)
    out.append(f"Total wall time {time.time() - start:.0f} s.")
    text = "\n".join(out)
    print(text)
    (args.out / "emsa.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
