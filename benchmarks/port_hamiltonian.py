"""Goal-oriented braking (phb-goal) against SGD, heavy ball and Adam.

Settings: DIGITS MLP, MNIST-1D MLP, DIGITS CNN. Protocol: for every optimizer a small
learning-rate sweep on seeds 0 and 1, training on the first 80 % of the training split
and selecting by the mean accuracy on the last 20 % (validation; a diverged run scores 0,
ties go to the lower validation loss); then ``--seeds`` seeds (model
initialisation and batch order; the data split is fixed, data seed 0) on the full
training split with the chosen rate; report the final full-training-set loss and the
test accuracy (mean +- std over seeds) and the paired per-seed differences.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/port_hamiltonian.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ocnet import data
from ocnet.bridge import to_problem
from ocnet.models import build_model
from ocnet.solvers import make_solver
from ocnet.solvers import port_hamiltonian as _ph  # noqa: F401  (registers phb, phb-goal)


@dataclass
class Setting:
    name: str
    dataset: str
    model: str
    epochs: int
    batch: int = 64
    n_train: int | None = None


SETTINGS = {
    "digits-mlp": Setting("digits-mlp", "digits", "mlp", 40),
    "mnist1d-mlp": Setting("mnist1d-mlp", "mnist1d", "mlp", 40),
    "digits-cnn": Setting("digits-cnn", "digits", "cnn", 25),
}
OPTIMIZERS = ["sgd", "momentum", "adam", "phb", "phb-goal"]
LR_GRID = {
    "sgd": [0.03, 0.1, 0.3, 1.0],
    "momentum": [0.003, 0.01, 0.03, 0.1],
    "adam": [3e-4, 1e-3, 3e-3, 1e-2],
    "phb": [0.1, 0.2, 0.4, 0.8],
    "phb-goal": [0.1, 0.2, 0.4, 0.8],
}
QUICK_LR_GRID = {
    "sgd": [0.1, 0.3],
    "momentum": [0.01, 0.03],
    "adam": [1e-3, 3e-3],
    "phb": [0.2, 0.4],
    "phb-goal": [0.2, 0.4],
}
# the port-Hamiltonian settings: friction 0.5 throughout (phb), and for phb-goal the same
# exploration friction raised x10 at each goal (EMA loss <= 0.1^k L_0, k = 1, 2)
PHB_OPTIONS = {"gamma": 0.5}
GOAL_OPTIONS = {"gamma": 0.5, "r": 0.1, "events": 2, "brake": 10.0, "smoothing": 0.9}


@dataclass
class RunResult:
    train_loss: float
    test_acc: float
    eval_loss: float = float("nan")
    seconds: float = 0.0
    events: list[int] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)


def _solver(opt: str, problem, lr: float):
    if opt.startswith("phb-goal:"):  # design study: "phb-goal:r=0.03,brake=3"
        kw = {**GOAL_OPTIONS, **{k: (int(v) if k == "events" else float(v)) for k, v in
                                 (kv.split("=") for kv in opt.split(":", 1)[1].split(","))}}
        return make_solver("phb-goal", problem, lr=lr, **kw)
    if opt == "phb":
        return make_solver("phb", problem, lr=lr, **PHB_OPTIONS)
    if opt == "phb-goal":
        return make_solver("phb-goal", problem, lr=lr, **GOAL_OPTIONS)
    return make_solver(opt, problem, lr=lr)


def train_one(setting: Setting, ds: data.Dataset, opt: str, lr: float, seed: int,
              x_tr, y_tr, x_ev, y_ev, epochs: int) -> RunResult:
    torch.manual_seed(seed)
    model = build_model(setting.model, ds.n_features, ds.n_classes, image_shape=ds.image_shape)
    problem = to_problem(model, "cross_entropy")
    solver = _solver(opt, problem, lr)
    gen = torch.Generator().manual_seed(1000 + seed)
    start = time.perf_counter()
    curve = []
    for _ in range(epochs):
        losses = [solver.step(xb, yb).loss for xb, yb in
                  data.batches(x_tr, y_tr, setting.batch, generator=gen)]
        curve.append(float(torch.stack(losses).mean()))  # host read once per epoch
        if not math.isfinite(curve[-1]):
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = float(problem.objective(x_tr, y_tr))
        out = model(x_ev)
        acc = float((out.argmax(1) == y_ev).double().mean())
        eval_loss = float(torch.nn.functional.cross_entropy(out, y_ev))
    if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
        acc = eval_loss = float("nan")
    events = [e["step"] for e in solver.events()] if opt.startswith("phb-goal") else []
    return RunResult(train_loss, acc, eval_loss=eval_loss, seconds=seconds, events=events,
                     curve=curve)


def sweep(setting: Setting, ds: data.Dataset, opt: str, grid: list[float], epochs: int,
          sweep_seeds: int, log) -> tuple[float, list[tuple[float, float, float]]]:
    """Mean validation accuracy over seeds 0..sweep_seeds-1 per lr (a diverged run counts
    as accuracy 0), ties broken by the mean validation loss; returns the chosen lr."""
    n = ds.x_train.shape[0]
    n_fit = int(0.8 * n)
    rows = []
    for lr in grid:
        accs, losses = [], []
        for seed in range(sweep_seeds):
            r = train_one(setting, ds, opt, lr, seed, ds.x_train[:n_fit], ds.y_train[:n_fit],
                          ds.x_train[n_fit:], ds.y_train[n_fit:], epochs)
            accs.append(r.test_acc if math.isfinite(r.test_acc) else 0.0)
            losses.append(r.eval_loss if math.isfinite(r.eval_loss) else math.inf)
            log(f"  sweep {setting.name} {opt} lr={lr:g} seed {seed}: val acc {r.test_acc:.4f} "
                f"val loss {r.eval_loss:.4g} ({r.seconds:.1f}s)")
        rows.append((lr, statistics.fmean(accs), statistics.fmean(losses)))
    best = max(rows, key=lambda row: (row[1], -row[2]))[0]
    return best, rows


def _fmt(xs: list[float], digits: int = 4, pct: bool = False) -> str:
    """mean +- std; for accuracies a diverged run (nan) counts as 0, for losses it is left
    out (the table's ``diverged`` column counts such runs)."""
    xs = [(x if math.isfinite(x) else 0.0) for x in xs] if pct else [
        x for x in xs if math.isfinite(x)]
    if not xs:
        return "diverged"
    s = 100.0 if pct else 1.0
    m = statistics.fmean(xs) * s
    sd = (statistics.stdev(xs) * s) if len(xs) > 1 else 0.0
    return f"{m:.2f} +- {sd:.2f}" if pct else f"{m:.{digits}g} +- {sd:.2g}"


def _acc0(acc: float) -> float:
    return acc if math.isfinite(acc) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, 2-point sweeps, fewer epochs")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--sweep-seeds", type=int, default=2,
                    help="seeds of the lr sweep (validation split); a diverged run scores 0")
    ap.add_argument("--out", default="runs/bench/port_hamiltonian")
    ap.add_argument("--goal-options", default="",
                    help="override phb-goal options, e.g. 'r=0.01,events=1,brake=10'")
    ap.add_argument("--schedule-study", action="store_true",
                    help="only the goal-schedule design study (seed 0, validation split)")
    args = ap.parse_args(argv)
    if args.goal_options:
        for kv in args.goal_options.split(","):
            k, v = kv.split("=")
            GOAL_OPTIONS[k] = int(v) if k == "events" else float(v)
    if args.schedule_study:
        return schedule_study(args)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = 3 if args.quick else args.seeds
    grids = QUICK_LR_GRID if args.quick else LR_GRID
    opts = args.optimizers.split(",")
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def emit(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.perf_counter()
    emit(f"# port-Hamiltonian benchmark ({'quick' if args.quick else 'full'})\n")
    emit(f"seeds 0..{seeds - 1}; lr sweep on seeds 0..{args.sweep_seeds - 1} with a "
         "validation split (last 20 % of the training split): mean validation accuracy "
         "(diverged = 0), ties by mean validation loss; phb options "
         f"{PHB_OPTIONS}; phb-goal options {GOAL_OPTIONS}\n")
    curves: dict[str, dict[str, list[float]]] = {}
    for sname in args.settings.split(","):
        setting = SETTINGS[sname]
        epochs = max(3, setting.epochs // 3) if args.quick else setting.epochs
        ds = data.load(setting.dataset, seed=0)
        emit(f"## {sname}: {setting.dataset}, model {setting.model}, {epochs} epochs, "
             f"batch {setting.batch}, train {ds.x_train.shape[0]}, test {ds.x_test.shape[0]}\n")
        chosen, sweep_rows = {}, {}
        for opt in opts:
            chosen[opt], sweep_rows[opt] = sweep(setting, ds, opt, grids[opt], epochs,
                                                 args.sweep_seeds, log)
        emit("| optimizer | lr | train loss | test acc % | diverged | mean val acc per lr (sweep) "
             "| s/run |")
        emit("|---|---|---|---|---|---|---|")
        results: dict[str, list[RunResult]] = {}
        for opt in opts:
            results[opt] = []
            for seed in range(seeds):
                r = train_one(setting, ds, opt, chosen[opt], seed, ds.x_train, ds.y_train,
                              ds.x_test, ds.y_test, epochs)
                results[opt].append(r)
                log(f"  {sname} {opt} seed {seed}: acc {r.test_acc:.4f} loss "
                    f"{r.train_loss:.4g} events {r.events}")
            rs = results[opt]
            sw = ", ".join(f"{lr:g}:{acc * 100:.1f}" for lr, acc, _ in sweep_rows[opt])
            emit(f"| {opt} | {chosen[opt]:g} | {_fmt([r.train_loss for r in rs])} | "
                 f"{_fmt([r.test_acc for r in rs], pct=True)} | "
                 f"{sum(not math.isfinite(r.test_acc) for r in rs)}/{len(rs)} | {sw} | "
                 f"{statistics.fmean(r.seconds for r in rs):.1f} |")
            curves.setdefault(sname, {})[opt] = [
                statistics.fmean(c) for c in zip(*[r.curve for r in rs], strict=False)]
        emit("")
        if "phb-goal" in results:
            ev = [r.events for r in results["phb-goal"]]
            steps_per_epoch = math.ceil(ds.x_train.shape[0] / setting.batch)
            emit(f"phb-goal events (step of event 1, 2 per seed; {steps_per_epoch} steps/epoch): "
                 + "; ".join(str(e) for e in ev) + "\n")
            for base in ("sgd", "phb", "momentum", "adam"):
                if base not in results:
                    continue
                diffs = [_acc0(g.test_acc) - _acc0(b.test_acc) for g, b in
                         zip(results["phb-goal"], results[base], strict=True)]
                wins = sum(d > 0 for d in diffs)
                emit(f"- phb-goal - {base}: test acc {_fmt(diffs, pct=True)} points "
                     f"(paired over seeds; phb-goal better on {wins}/{len(diffs)} seeds)")
            emit("")
    emit(f"total wall time {time.perf_counter() - t0:.0f} s (shared 2-core CPU, "
         "OMP_NUM_THREADS=1)")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(curves, out)
    return 0


SCHEDULES = ["r=0.1,brake=10", "r=0.1,brake=3", "r=0.03,brake=3", "r=0.01,events=1,brake=10",
             "r=0.1,brake=10,step_factor=3.1623"]


def schedule_study(args) -> int:
    """Goal-schedule variants of phb-goal (lr 0.4) and phb, on the validation split (the
    last 20 % of the training split), seeds 0..sweep_seeds-1: for choosing a schedule
    without looking at the test set."""
    torch.set_num_threads(1)
    print("| setting | variant | mean val acc % | mean train loss (80 % split) | events (steps) |")
    print("|---|---|---|---|---|")
    means: dict[str, list[float]] = {}
    for sname in args.settings.split(","):
        setting = SETTINGS[sname]
        ds = data.load(setting.dataset, seed=0)
        n_fit = int(0.8 * ds.x_train.shape[0])
        for variant in ["phb"] + [f"phb-goal:{v}" for v in SCHEDULES]:
            rs = [train_one(setting, ds, variant, 0.4, seed, ds.x_train[:n_fit],
                            ds.y_train[:n_fit], ds.x_train[n_fit:], ds.y_train[n_fit:],
                            setting.epochs) for seed in range(args.sweep_seeds)]
            acc = statistics.fmean(_acc0(r.test_acc) for r in rs)
            means.setdefault(variant, []).append(acc)
            loss = statistics.fmean(r.train_loss for r in rs)
            print(f"| {sname} | {variant} | {100 * acc:.2f} | {loss:.4g} | "
                  f"{[r.events for r in rs]} |", flush=True)
    print("\n| variant | mean val acc % over settings |\n|---|---|")
    for variant, accs in means.items():
        print(f"| {variant} | {100 * statistics.fmean(accs):.2f} |")
    return 0


def _plot(curves: dict[str, dict[str, list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (sname, per_opt) in zip(axes[0], curves.items(), strict=True):
        for opt, c in per_opt.items():
            ax.semilogy(range(1, len(c) + 1), c, label=opt)
        ax.set_title(sname)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training batch loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
