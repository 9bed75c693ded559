"""DDPNOpt's two claims on the paper's protocol, exact and fast model, 10 seeds (issue 14).

(a) Fig. 4a shape: each base optimizer (SGD, RMSprop, Adam) against its DDPNOpt twins with
    identical hyper-parameters (learning rate, seed, initialisation, batch order) over a
    learning-rate sweep that reaches where the base degrades. Twins: the fast outer-product
    model at its defaults (``vxx="outer"``) and the exact per-sample model (``vxx="exact"``,
    its defaults: gain 1, eps_v 0.1, no cap). DIGITS FCN 64-32x4-10 tanh, batch 32,
    cross-entropy. Cells: test accuracy and final training loss, mean +- std over seeds;
    the twin's difference to its base and how many seeds it wins.
(d) why (b) looks as it does: per layer of the deep sigmoid net, at steps 0 and 40 of an
    exact second-order DDPNOpt-SGD run, the gradient norm, the base step |k_t|, the state
    change |dx_t| / |x_t| that the feedback sees and the feedback's size |gamma d_t| / |k_t|.
(c) cost: seconds per step of each DDPNOpt configuration as a ratio to Adam, interleaved
    (every configuration steps in turn on the same batch, order rotated; thread CPU time,
    median of the per-round ratios) on the protocol's FCN and on the networks of
    benchmarks/speed.py (DIGITS MLP, CNN, 20-block residual MLP).
(b) vanishing gradients (Fig. 6): 10 sigmoid layers of width 32 on DIGITS with the
    Max-Mahalanobis-center loss (radius 10), batch 32: training loss over epochs for SGD,
    its DDPNOpt twins (fast; exact; exact with the second-order dynamics terms, the
    paper's "fully expanded" case; exact with the gradient-outer-product terminal Hessian,
    an ablation) and the Kronecker base; the size of the applied update relative to SGD's
    (Fig. 6b).

    OMP_NUM_THREADS=1 nice python benchmarks/ddpnopt_claims.py [--quick] [--parts ab]
        [--seeds 10] [--jobs 1] [--out runs/bench/ddpnopt_claims]

Writes ``claims.json``, ``claims.md``, ``lr_sweep.png`` and ``vanishing_gradient.png`` to
``--out`` (atomically); the full run's markdown is kept in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from ddpnopt import accuracy, make_task, solver_spec  # noqa: E402
from speed import digits_batches, digits_networks  # noqa: E402

from ocnet import data  # noqa: E402
from ocnet._atomic import atomic_write  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers.base import make_solver  # noqa: E402

#: the twins of part (a): label -> DDPNOpt options beside the base's (same lr)
TWINS_A: dict[str, dict[str, Any]] = {
    "default": {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.3},
    "old default": {"gain": "auto", "vxx_reg": 1.0, "trust": 0.3},
    "auto, trust 1": {"gain": "auto", "vxx_reg": 1.0, "trust": 1.0},
    "auto, no cap": {"gain": "auto", "vxx_reg": 1.0, "trust": 0.0},
    "gain 1, vxx_reg 1": {"gain": 1.0, "vxx_reg": 1.0, "trust": 0.3},
    "gain 1, vxx_reg 1, no cap": {"gain": 1.0, "vxx_reg": 1.0, "trust": 0.0},
    "literal, no cap": {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.0},
    "exact": {"vxx": "exact"},
}
GRID_A = {"sgd": [0.1, 0.3, 1.0, 2.0, 3.0],
          "rmsprop": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
          "adam": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
#: part (b): (label, solver label, lr, options)
RUNS_B: list[tuple[str, str, float, dict[str, Any]]] = [
    ("sgd", "sgd", 0.1, {}),
    ("ddpnopt-sgd fast (old default)", "ddpnopt-sgd", 0.1,
     {"gain": "auto", "vxx_reg": 1.0, "trust": 0.3}),
    ("ddpnopt-sgd exact", "ddpnopt-sgd", 0.1, {"vxx": "exact"}),
    ("ddpnopt-sgd exact, 2nd-order dynamics", "ddpnopt-sgd", 0.1,
     {"vxx": "exact", "second_order": True}),
    ("ddpnopt-sgd exact, 2nd-order, DDP V_x (vx=ddp)", "ddpnopt-sgd", 0.1,
     {"vxx": "exact", "second_order": True, "vx": "ddp"}),
    ("ddpnopt-sgd exact, outer terminal Hessian", "ddpnopt-sgd", 0.1,
     {"vxx": "exact", "terminal_hessian": "outer"}),
    ("kfac (Kronecker base)", "kfac", 0.05, {}),
    ("ddpnopt-kfac exact", "ddpnopt-kfac", 0.05, {"vxx": "exact"}),
]


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def train(task: str, solver: str, seed: int, lr: float, epochs: int,
          options: dict[str, Any], track_update: bool = False,
          max_steps: int | None = None) -> dict[str, Any]:
    """One seeded run: the same seed gives the same data split, initialisation and batch
    order to a base and its twins. Returns test accuracy, the per-epoch mean training loss,
    cap/clip rates, CPU seconds per step and (``track_update``) the mean update norm."""
    torch.manual_seed(seed)
    ds, model, loss, batch, _ = make_task(task, seed, quick=False)
    problem = to_problem(model, loss)
    name, opts = solver_spec(solver, lr, **options)
    s = make_solver(name, problem, **opts)
    if hasattr(s, "diagnostics"):
        s.diagnostics = False  # the exact mode's eigenvalue report; no effect on the step
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    upd: list[float] = []
    caps: list[float] = []
    clips: list[float] = []
    cpu: list[float] = []
    diverged = False
    steps = 0
    for _ in range(epochs):
        losses, norms = [], []
        for xb, yb in data.batches(ds.x_train, ds.y_train, batch, generator=gen):
            if max_steps is not None and steps >= max_steps:
                break
            steps += 1
            before = [p.detach().clone() for p in problem.parameters()] if track_update else []
            c0 = time.process_time()
            info = s.step(xb, yb)
            cpu.append(time.process_time() - c0)
            losses.append(float(info.loss))
            if track_update:
                norms.append(math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in
                                           zip(problem.parameters(), before, strict=True))))
            for key, acc in (("cap_rate", caps), ("clip_rate", clips)):
                if key in info.extra:
                    acc.append(float(info.extra[key]))
        curve.append(sum(losses) / len(losses))
        if norms:
            upd.append(statistics.mean(norms))
        if not math.isfinite(curve[-1]) or not all(torch.isfinite(p).all()
                                                   for p in problem.parameters()):
            diverged = True
            break
    acc = float("nan") if diverged else accuracy(problem, ds, loss)
    return {"task": task, "solver": solver, "seed": seed, "lr": lr, "options": options,
            "acc": acc, "curve": curve, "update_norm": upd, "diverged": diverged,
            "cap_rate": statistics.mean(caps) if caps else None,
            "clip_rate": statistics.mean(clips) if clips else None,
            "cpu": statistics.median(cpu[len(cpu) // 10:] or cpu)}


def _job(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    return train(*args)


def mean_std(values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    vals = [scale * v for v in values if math.isfinite(v)]
    if not vals:
        return "diverged"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    bad = len(values) - len(vals)
    return f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}" + (f" ({bad} div.)" if bad else "")


def _final(r: dict[str, Any]) -> float:
    return r["curve"][-1] if not r["diverged"] else float("nan")


def _key(job: tuple) -> str:
    return json.dumps(list(job), sort_keys=True, default=str)


def run_jobs(jobs: list[tuple], n_jobs: int, cache: Path | None = None) -> list[dict[str, Any]]:
    """Run the jobs (``n_jobs`` processes); each finished run is appended to ``cache`` (one
    JSON line) and a rerun with the same cache only runs what is missing, so an
    interrupted sweep loses at most the runs in flight."""
    done: dict[str, dict[str, Any]] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            done[rec["key"]] = rec["result"]
    todo = [j for j in jobs if _key(j) not in done]
    if len(todo) < len(jobs):
        log(f"  {len(jobs) - len(todo)} runs from {cache}, {len(todo)} to run")

    def keep(job: tuple, result: dict[str, Any]) -> None:
        done[_key(job)] = result
        if cache is not None:
            with cache.open("a") as fh:
                fh.write(json.dumps({"key": _key(job), "result": result}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    if n_jobs <= 1:
        for i, j in enumerate(todo):
            keep(j, _job(j))
            if (i + 1) % 10 == 0:
                log(f"  {i + 1}/{len(todo)} runs")
    else:
        with ProcessPoolExecutor(n_jobs) as pool:
            for i, (j, r) in enumerate(zip(todo, pool.map(_job, todo, chunksize=1),
                                           strict=True)):
                keep(j, r)
                if (i + 1) % 10 == 0:
                    log(f"  {i + 1}/{len(todo)} runs")
    return [done[_key(j)] for j in jobs]


# ---------------------------------------------------------------- (a)
def part_a(args: argparse.Namespace, out: list[str], results: dict[str, Any]) -> None:
    grid = {b: lrs[:2] + lrs[-1:] for b, lrs in GRID_A.items()} if args.quick else GRID_A
    twins = {k: v for k, v in TWINS_A.items()
             if not args.twins or k in [t.strip() for t in args.twins.split(";")]}
    seeds = range(args.seeds)
    jobs, keys = [], []
    for base, lrs in grid.items():
        for lr in lrs:
            for label, opts in [("base", {})] + list(twins.items()):
                solver = base if label == "base" else f"ddpnopt-{base}"
                for sd in seeds:
                    job = ("digits", solver, sd, lr, args.epochs_a, opts)
                    jobs.append(job + (False, args.max_steps) if args.max_steps else job)
                    keys.append((base, lr, label, sd))
    log(f"(a) {len(jobs)} runs")
    res: dict[tuple, dict[str, Any]] = dict(zip(keys, run_jobs(jobs, args.jobs,
                                                               args.out / "runs.jsonl"),
                                                strict=True))
    out.append("## (a) Learning-rate sweep: base vs its DDPNOpt twins, identical "
               "hyper-parameters\n")
    out.append(f"DIGITS FCN 64-32x4-10 tanh, batch 32, cross-entropy, {args.epochs_a} epochs, "
               f"seeds 0..{args.seeds - 1} (the same seed gives base and twins the same split, "
               "initialisation and batch order). Twins, all `ddpnopt` with the base's lr: "
               "default = the fast (outer-product) model's defaults: gain 1, vxx_reg 0, "
               "trust 0.3 (the paper's literal step in a trust region of 0.3 |k|); "
               "old default = gain auto, vxx_reg 1, trust 0.3 (the default before this "
               "benchmark); auto, trust 1 / auto, no cap = the old default with the cap at "
               "|k| / without it; gain 1, vxx_reg 1 [, no cap] = the paper's gain with the "
               "V_hh term; literal, no cap = gain 1, vxx_reg 0, trust 0 (Alg. 3 on the "
               "factorised model); exact = `vxx=\"exact\"` at its defaults (gain 1, "
               "vxx_reg 0.1, no cap). Test accuracy % and final training loss (mean of the "
               "last epoch's batches), mean ± std; Δ = twin − base (accuracy points), wins = "
               "seeds where the twin's test accuracy is higher (ties count half).\n")
    fig, axes = plt.subplots(1, len(grid), figsize=(4.4 * len(grid), 3.6))
    table: dict[str, Any] = {}
    labels = ["base", *twins]
    for ax, (base, lrs) in zip(axes, grid.items(), strict=True):
        acc_rows, loss_rows, rate_rows = [], [], []
        for lr in lrs:
            runs = {lab: [res[(base, lr, lab, sd)] for sd in seeds] for lab in labels}
            accs = {lab: [r["acc"] for r in rs] for lab, rs in runs.items()}
            loss = {lab: [_final(r) for r in rs] for lab, rs in runs.items()}
            cells = [f"{lr:g}", mean_std(accs["base"], 100)]
            for lab in twins:
                pairs = [(a, b) for a, b in zip(accs[lab], accs["base"], strict=True)
                         if math.isfinite(a) and math.isfinite(b)]
                diff = (100 * statistics.mean(a - b for a, b in pairs) if pairs
                        else float("nan"))
                wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
                cells.append(f"{mean_std(accs[lab], 100)} ({diff:+.1f}; {wins:g}/{len(pairs)})")
            acc_rows.append("| " + " | ".join(cells) + " |")
            loss_rows.append(f"| {lr:g} | " + " | ".join(mean_std(loss[lab], 1, ".3f")
                                                        for lab in labels) + " |")
            rc = []
            for lab in twins:
                cr = [r["cap_rate"] for r in runs[lab] if r["cap_rate"] is not None]
                cl = [r["clip_rate"] for r in runs[lab] if r["clip_rate"] is not None]
                rc.append(f"{statistics.mean(cr):.2f} / {statistics.mean(cl):.2f}"
                          if cr and cl else "—")
            rate_rows.append(f"| {lr:g} | " + " | ".join(rc) + " |")
            table[f"{base}|{lr:g}"] = {lab: {"acc": accs[lab], "loss": loss[lab]}
                                      for lab in accs}
            log(f"(a) {base} lr={lr:g}: " + ", ".join(f"{lab} {mean_std(a, 100)}"
                                                    for lab, a in accs.items()))
        head = "| lr | " + " | ".join(labels) + " |"
        rule = "|---|" + "---|" * len(labels)
        out += [f"### base {base}: test accuracy % (Δ to base; wins)\n", head, rule, *acc_rows,
                "", f"### base {base}: final training loss\n", head, rule, *loss_rows, "",
                f"### base {base}: cap rate / clip rate of the twins\n",
                "| lr | " + " | ".join(twins) + " |", "|---|" + "---|" * len(twins),
                *rate_rows, ""]
        styles = ("o--", "s-", "d-", "v-", "p-", "x:", "h-", "*-", "^-")
        for lab, style in zip(labels, styles[:len(labels)], strict=True):
            ys = [statistics.mean([v for v in table[f"{base}|{lr:g}"][lab]["acc"]
                                   if math.isfinite(v)] or [0.0]) for lr in lrs]
            ax.semilogx(lrs, [100 * y for y in ys], style,
                        label=base if lab == "base" else f"ddpnopt {lab}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"base {base}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "lr_sweep.png", dpi=120)
    plt.close(fig)
    cpu: dict[str, list[float]] = {}
    for (base, _, lab, _), r in res.items():
        cpu.setdefault(f"{base}|{lab}", []).append(r["cpu"])
    out.append("CPU seconds per step, median over the runs of each (base, model), relative to "
               "the base's (runs in separate processes; the interleaved table of "
               "`benchmarks/speed.py` is the one to quote for speed):\n")
    out.append("| base | " + " | ".join(f"{lab} / base" for lab in twins) + " |")
    out.append("|---|" + "---|" * len(twins))
    for base in grid:
        b = statistics.median(cpu[f"{base}|base"])
        out.append(f"| {base} | " + " | ".join(f"{statistics.median(cpu[f'{base}|{lab}']) / b:.2f}"
                                              for lab in twins) + " |")
    out.append("")
    results["a"] = table


# ---------------------------------------------------------------- (b)
def part_b(args: argparse.Namespace, out: list[str], results: dict[str, Any]) -> None:
    seeds = range(args.seeds)
    jobs, keys = [], []
    runs_b = [r for r in RUNS_B
              if not args.runs_b or r[0] in [t.strip() for t in args.runs_b.split(";")]]
    for label, solver, lr, opts in runs_b:
        for sd in seeds:
            job = ("deep-sigmoid", solver, sd, lr, args.epochs_b, opts, True)
            jobs.append(job + (args.max_steps,) if args.max_steps else job)
            keys.append((label, sd))
    log(f"(b) {len(jobs)} runs")
    res = dict(zip(keys, run_jobs(jobs, args.jobs, args.out / "runs.jsonl"), strict=True))
    out.append("## (b) Vanishing gradients: 10 sigmoid layers of width 32, MMC loss "
               "(radius 10), DIGITS\n")
    out.append(f"Batch 32, {args.epochs_b} epochs, seeds 0..{args.seeds - 1}; the twins use "
               "their base's learning rate. Training loss = mean of the epoch's batch losses "
               "(mean ± std over seeds); update = mean over steps of |u_after − u_before| "
               "(all controls), relative to SGD's in the same epoch (Fig. 6b).\n")
    n = args.epochs_b
    marks = sorted({0, min(1, n - 1), n // 4, n // 2, n - 1})
    out.append("| solver | lr | " + " | ".join(f"epoch {e + 1}" for e in marks) +
               " | test acc % | update / SGD's (last epoch) |")
    out.append("|---|---|" + "---|" * len(marks) + "---|---|")
    curves: dict[str, Any] = {}
    sgd_upd = [res[("sgd", sd)]["update_norm"] if ("sgd", sd) in res else []
               for sd in seeds]
    for label, _, lr, _ in runs_b:
        rs = [res[(label, sd)] for sd in seeds]
        cells = []
        for e in marks:
            vals = [r["curve"][e] if e < len(r["curve"]) else float("nan") for r in rs]
            cells.append(mean_std(vals, 1, ".3f"))
        ratio = [r["update_norm"][-1] / s[-1] for r, s in zip(rs, sgd_upd, strict=True)
                 if r["update_norm"] and s and len(r["update_norm"]) == len(s)]
        out.append(f"| {label} | {lr:g} | " + " | ".join(cells) +
                   f" | {mean_std([r['acc'] for r in rs], 100)} | "
                   f"{mean_std(ratio, 1, '.2f') if ratio else '—'} |")
        m = min(len(r["curve"]) for r in rs)
        curves[label] = {"mean": [statistics.mean(r["curve"][e] for r in rs) for e in range(m)],
                         "runs": [r["curve"] for r in rs], "acc": [r["acc"] for r in rs],
                         "update_norm": [r["update_norm"] for r in rs]}
        log(f"(b) {label}: final {curves[label]['mean'][-1]:.3f}")
    out.append("")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, c in curves.items():
        ax.semilogy(range(1, len(c["mean"]) + 1), c["mean"], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (MMC), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "vanishing_gradient.png", dpi=120)
    plt.close(fig)
    results["b"] = curves


def part_d(args: argparse.Namespace, out: list[str], results: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ds, model, loss, batch, _ = make_task("deep-sigmoid", 0, quick=False)
    problem = to_problem(model, loss)
    s = make_solver("ddpnopt", problem, base="sgd", lr=0.1, vxx="exact", second_order=True)
    s.debug = True
    gen = torch.Generator().manual_seed(0)
    marks = (0, 3 if args.quick else 40)
    out.append("## (d) The vanishing-gradient mechanism: sizes per layer\n")
    out.append("10 sigmoid layers of width 32, MMC loss, DIGITS, batch 32, seed 0; "
               "`ddpnopt` SGD 0.1 `vxx=\"exact\", second_order=True`. Per layer t (input "
               "first): ‖dJ/du_t‖, the base step ‖k_t‖, the state change the feedback sees "
               "‖x̂_t − x_t‖ / ‖x_t‖, and the applied feedback ‖γ d_t‖ / ‖k_t‖ (layer 0 "
               "gets none: x̂_0 = x_0).\n")
    rows: dict[str, Any] = {}

    def norm(ts: Any) -> float:
        return float(torch.sqrt(sum((v.detach() ** 2).sum() for v in ts)))

    for i, (xb, yb) in enumerate(data.batches(ds.x_train, ds.y_train, batch, generator=gen)):
        if i > marks[-1]:
            break
        J, grads, traj = problem.value_and_gradients(xb, yb)
        s.step(xb, yb)
        if i not in marks:
            continue
        fb = {r["t"]: r for r in s.last_debug}
        ks = [norm(s.last_backward[t]["k"]) for t in range(problem.T)]
        rec = {"loss": float(J), "grad": [norm(g) for g in grads], "k": ks,
               "dx": [float(fb[t]["dx"].norm() / traj.xs[t].norm()) if t in fb else None
                      for t in range(problem.T)],
               "feedback": [norm(fb[t]["d"]) / ks[t] if t in fb else None
                            for t in range(problem.T)]}
        rows[str(i)] = rec
        out.append(f"Step {i} (batch loss {rec['loss']:.3f}):\n")
        out.append("| quantity | " + " | ".join(f"layer {t}" for t in range(problem.T)) + " |")
        out.append("|---|" + "---|" * problem.T)
        for key, name in (("grad", "‖dJ/du_t‖"), ("k", "‖k_t‖"), ("dx", "‖δx_t‖ / ‖x_t‖"),
                          ("feedback", "‖γ d_t‖ / ‖k_t‖")):
            out.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.1e}"
                                                   for v in rec[key]) + " |")
        out.append("")
    results["d"] = rows


#: part (c): label -> (registry name, options); the exact mode only on dense networks
COST_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("adam", {}),
    "ddpnopt default (gain 1, vxx_reg 0, trust 0.3)": ("ddpnopt", {}),
    "literal, no cap (gain 1, vxx_reg 0, trust 0)": ("ddpnopt", {"trust": 0.0}),
    "old default (auto, vxx_reg 1, trust 0.3)": ("ddpnopt", {"gain": "auto",
                                                              "vxx_reg": 1.0}),
    "auto, vxx_reg 1, no cap": ("ddpnopt", {"gain": "auto", "vxx_reg": 1.0, "trust": 0.0}),
    "gain 1, vxx_reg 1, trust 0.3": ("ddpnopt", {"vxx_reg": 1.0}),
    "exact": ("ddpnopt", {"vxx": "exact"}),
    "exact, 2nd-order dynamics": ("ddpnopt", {"vxx": "exact", "second_order": True}),
}


#: part (c)'s second table: these alone, in turn
PAIR_CONFIGS = ("adam", "ddpnopt default (gain 1, vxx_reg 0, trust 0.3)",
                "literal, no cap (gain 1, vxx_reg 0, trust 0)")


def part_c(args: argparse.Namespace, out: list[str], results: dict[str, Any]) -> None:
    torch.manual_seed(0)
    nets = {"fcn": (build_model("mlp", 64, 10, width=32, depth=4, activation="tanh"),
                    "protocol FCN 64-32x4-10 tanh")}
    for name, (m, desc) in digits_networks([] if args.quick else ["mlp", "cnn", "resnet20"],
                                           False, torch.device("cpu")).items():
        nets[name] = (m, desc.split(" (")[0])
    batches = digits_batches(torch.device("cpu"), 32, 64)
    rounds = 10 if args.quick else args.cost_steps
    out.append("## (c) Cost: CPU seconds per step relative to Adam, interleaved\n")
    out.append(f"Batch 32, {rounds} rounds after 5 warm-up rounds; each round every "
               "configuration steps once on the same batch (order rotated); cell = median "
               "over rounds of (configuration's thread CPU time / Adam's in that round). "
               f"Load average at start {os.getloadavg()[0]:.2f}.\n")
    cols = list(nets)

    def interleave(labels: list[str], model: torch.nn.Module, n: int) -> dict[str, list[float]]:
        solvers = {}
        for label in labels:
            name, opts = COST_CONFIGS[label]
            problem = to_problem(copy.deepcopy(model), "cross_entropy", 0.0)
            solvers[label] = make_solver(name, problem, **opts)
        times: dict[str, list[float]] = {k: [] for k in solvers}
        for r in range(n + 5):
            x, y = batches[r % len(batches)]
            keys = list(solvers)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in keys:
                t0 = time.thread_time()
                solvers[k].step(x, y)
                if r >= 5:
                    times[k].append(time.thread_time() - t0)
        return times

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(t / a for t, a in zip(v, times["adam"], strict=True))
                for k, v in times.items()}

    table: dict[str, dict[str, float]] = {k: {} for k in COST_CONFIGS}
    pair: dict[str, dict[str, float]] = {k: {} for k in PAIR_CONFIGS}
    adam_ms: dict[str, float] = {}
    for net, (model, _) in nets.items():
        labels = [k for k, (_, o) in COST_CONFIGS.items()
                  if not (o.get("vxx") == "exact" and net not in ("fcn", "mlp"))
                  and not (o.get("second_order") and net != "fcn")]
        times = interleave(labels, model, rounds)
        adam_ms[net] = 1e3 * statistics.median(times["adam"])
        for k, v in ratios(times).items():
            table[k][net] = v
        log(f"(c) {net}: " + ", ".join(f"{k} {v[net]:.2f}" for k, v in table.items()
                                       if net in v))
        for k, v in ratios(interleave(list(PAIR_CONFIGS), model, 2 * rounds)).items():
            pair[k][net] = v
    out.append("| configuration | " + " | ".join(f"{nets[c][1]}" for c in cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for k, row in table.items():
        out.append(f"| {k} | " + " | ".join(f"{row[c]:.2f}" if c in row else "—"
                                           for c in cols) + " |")
    out.append("| Adam ms/step | " + " | ".join(f"{adam_ms[c]:.2f}" for c in cols) + " |")
    out.append(f"\nThe same, with only Adam, the default and the literal step stepping in turn "
               f"({2 * rounds} rounds; the exact configurations above slow Adam's small steps "
               "more than the others', so this is the stricter ratio):\n")
    out.append("| configuration | " + " | ".join(f"{nets[c][1]}" for c in cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for k, row in pair.items():
        out.append(f"| {k} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    out.append(f"\nLoad average at the end {os.getloadavg()[0]:.2f}.\n")
    results["c"] = {"ratios": table, "adam_ms": adam_ms, "pairwise": pair}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1-2 epochs")
    ap.add_argument("--parts", default="abdc", help="which parts to run (letters a-d)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 10)")
    ap.add_argument("--epochs-a", type=int, default=None, help="epochs of (a) (default 10)")
    ap.add_argument("--epochs-b", type=int, default=None, help="epochs of (b) (default 20)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    ap.add_argument("--twins", default="", help="semicolon-separated labels of (a)'s twins "
                    f"(default all: {', '.join(TWINS_A)})")
    ap.add_argument("--runs-b", default="", help="semicolon-separated labels of (b)'s runs "
                    "(default all)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop every run of (a) and (b) after so many steps (smoke tests)")
    ap.add_argument("--cost-steps", type=int, default=150, help="timed rounds of (c)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/ddpnopt_claims"))
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 10)
    args.epochs_a = args.epochs_a or (1 if args.quick else 10)
    args.epochs_b = args.epochs_b or (2 if args.quick else 20)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = ["# DDPNOpt's claims: learning-rate sweep and vanishing gradients (issue 14)\n",
           f"`python benchmarks/ddpnopt_claims.py {' '.join(argv or sys.argv[1:])}` "
           f"({datetime.date.today()}, torch {torch.__version__}, CPU, float32, 1 thread "
           f"per process, {args.jobs} process(es); load average at start "
           f"{os.getloadavg()[0]:.2f}).\n"]
    results: dict[str, Any] = {}
    if "a" in args.parts:
        part_a(args, out, results)
    if "b" in args.parts:
        part_b(args, out, results)
    if "d" in args.parts:
        part_d(args, out, results)
    if "c" in args.parts:
        part_c(args, out, results)
    out.append(f"Run time: {time.time() - t0:.0f} s.")
    atomic_write(args.out / "claims.md", "\n".join(out) + "\n")
    atomic_write(args.out / "claims.json", json.dumps(results, indent=1, default=str))
    print("\n".join(out))


if __name__ == "__main__":
    main()
