"""Adaptive (DWR + Doerfler) against uniform layer insertion for neural ODE classifiers.

For each data set (swissroll, peaks, donut, spirals) and seed: one coarse NeuralODE,
refined adaptively and uniformly from the same trained-from-scratch start, each level
warm-started and retrained with the same inner solver and number of steps. Reports

- layers needed to reach the test accuracy of the finest uniform mesh (per seed;
  strict, and within 0.5 percentage points),
- test accuracy at equal layer budgets (the uniform levels' layer counts; adaptive at its
  largest level not above the budget),
- the goal discretisation error |J_ODE - J_Euler| (test loss, same trained controls, the
  ODE solved by torchdiffeq) at those budgets: what the DWR estimator is built to reduce,

and writes plots (mesh over refinements, accuracy against layers, trajectories).

    python benchmarks/dwr.py --quick        # < 5 min
    python benchmarks/dwr.py                # 5 seeds, the literature's sizes
    python benchmarks/dwr.py --sensitivity  # + the SensLI arm (ocnet.solvers.dwr.sensitivities)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ocnet.adapt import plot_accuracy, plot_mesh, plot_trajectories, run_adapt

DATASETS = ("swissroll", "peaks", "donut", "spirals")


def _acc_at_budget(hist, budget):
    ok = [lev for lev in hist if lev.n_layers <= budget]
    return ok[-1].test_accuracy if ok else float("nan")


def _layers_to_reach(hist, target):
    for lev in hist:
        if lev.test_accuracy >= target - 1e-12:
            return lev.n_layers
    return None


def _disc_error(model, x, y):
    """|test loss of the ODE (dopri5, same controls) - test loss of the Euler network|."""
    import torch.nn.functional as F  # noqa: N812

    with torch.no_grad():
        ode = F.cross_entropy(model.integrate(x, "dopri5", rtol=1e-6, atol=1e-7), y)
        return abs(float(ode - F.cross_entropy(model(x), y)))


def _at_budget(hist, budget, attr):
    ok = [lev for lev in hist if lev.n_layers <= budget]
    return getattr(ok[-1], attr) if ok else float("nan")


def _goal_error(model, problem, x, y):
    """J(ODE) - J(Euler) on (x, y) with the same controls (R_h cancels: same theta)."""
    with torch.no_grad():
        ode = problem.terminal(model.integrate(x, "dopri5", rtol=1e-7, atol=1e-8), y)
        return float(ode - problem.terminal(model(x), y))


def frozen_study(datasets, seeds, n0, max_layers, steps, n_train, lam=1e-3):
    """Refinement at frozen controls (no retraining): the estimator's own job. A coarse
    model is trained once; then adaptive (DWR + Doerfler) and uniform bisection to the
    budget, measuring the true goal error J(ODE) - J(Euler) (train objective, dopri5) and
    the effectivity sum(eta) / true error at every adaptive level."""
    from ocnet.adapt import PRESETS, build_model
    from ocnet.data import load
    from ocnet.solvers.dwr import DWR, doerfler, indicators

    rows, eff_rows = [], []
    for name in datasets:
        pre = PRESETS[name]
        per = []
        for seed in range(seeds):
            ds = load(name, seed=seed, n_train=n_train)
            x, y = ds.x_train.double(), ds.y_train
            model = build_model(ds.n_features, ds.n_classes, width=pre["width"], T=pre["T"],
                                n0=n0, field=pre["field"], lam=lam, seed=seed,
                                dtype=torch.float64)
            DWR(model, "cross_entropy", lr=0.02, steps=steps).train(model, x, y)
            curves = {"adaptive": [], "uniform": []}
            effs = []
            for kind in curves:
                m = model
                while True:
                    p = m.problem("cross_entropy")
                    true = _goal_error(m, p, x, y)
                    curves[kind].append((len(m.mesh), abs(true)))
                    if len(m.mesh) >= max_layers:
                        break
                    if kind == "uniform":
                        m = m.refine(list(range(len(m.mesh))))
                        continue
                    eta = indicators(m, p, x, y)
                    effs.append(float(eta.sum()) / true)
                    marked = doerfler(eta.abs().tolist(), 0.5)
                    room = max_layers - len(m.mesh)
                    if len(marked) > room:
                        a = eta.abs().tolist()
                        marked = sorted(sorted(marked, key=lambda i: -a[i])[:room])
                    m = m.refine(marked)
            per.append((curves, effs))
            print(f"  frozen {name} seed {seed}: adaptive "
                  f"{[(n, f'{e:.1e}') for n, e in curves['adaptive']]}; uniform "
                  f"{[(n, f'{e:.1e}') for n, e in curves['uniform']]}; eff "
                  f"{[round(e, 2) for e in effs]}", file=sys.stderr, flush=True)
        for b in [n for n, _ in per[0][0]["uniform"]]:
            ea = [[e for n, e in c["adaptive"] if n <= b][-1] for c, _ in per]
            eu = [[e for n, e in c["uniform"] if n <= b][-1] for c, _ in per]
            wins = sum(a < u for a, u in zip(ea, eu, strict=True))
            rows.append(f"| {name} | {b} | {statistics.median(ea):.2e} | "
                        f"{statistics.median(eu):.2e} | {wins}/{seeds} |")
        allf = [e for _, effs in per for e in effs]
        eff_rows.append(f"| {name} | {len(allf)} | {min(allf):.3f} | "
                        f"{statistics.median(allf):.3f} | {max(allf):.3f} |")
    print("\n## Frozen controls: refinement without retraining\n")
    print("A coarse model trained once, then bisected adaptively (DWR + Doerfler 0.5) or "
          "uniformly with theta(t) unchanged. |J(ODE) - J(Euler)| on the training objective "
          "(dopri5 rtol 1e-7), median over seeds; 'wins' = seeds with adaptive below uniform.\n")
    print("| data | layer budget | adaptive | uniform | wins |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nEffectivity sum(eta) / (J(ODE) - J(Euler)) of the primal estimator at every "
          "adaptive level of every seed (trained networks, float64):\n")
    print("| data | levels | min | median | max |")
    print("|---|---|---|---|---|")
    print("\n".join(eff_rows))


def _fmt(v):
    return "-" if v is None else str(v)


def _sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run, < 5 minutes")
    ap.add_argument("--out", default="runs/bench/dwr")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--steps", type=int, default=None, help="inner adam steps per level")
    ap.add_argument("--max-layers", type=int, default=None)
    ap.add_argument("--n0", type=int, default=None)
    ap.add_argument("--estimator", default="primal", choices=["primal", "full"])
    ap.add_argument("--frozen", action="store_true",
                    help="only the frozen-controls study (refinement without retraining)")
    ap.add_argument("--lam", type=float, default=1e-3, help="regulariser weight lambda")
    ap.add_argument("--sensitivity", action="store_true",
                    help="add the SensLI arm (as many marks as Doerfler, largest sensitivity)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    seeds = args.seeds or (1 if quick else 5)
    steps = args.steps or (60 if quick else 150)
    max_layers = args.max_layers or (16 if quick else 32)
    n0 = args.n0 or (2 if quick else 4)
    n_train = 300 if quick else 500
    n_test = 500 if quick else None
    if args.frozen:
        t0 = time.perf_counter()
        print(f"# DWR frozen-controls study ({'quick' if quick else 'full'}): seeds {seeds}, "
              f"n0 {n0}, max_layers {max_layers}, coarse training {steps} adam steps, "
              f"n_train {n_train}, lam {args.lam}\n")
        frozen_study(args.datasets, seeds, n0, max_layers, steps, n_train, args.lam)
        print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s (shared 2-core CPU box)")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(seeds=seeds, steps=steps, max_layers=max_layers, n0=n0, n_train=n_train,
                    n_test=n_test, solver="adam", lr=0.02, theta=0.5, lam=args.lam,
                    estimator=args.estimator)
    print(f"# DWR benchmark ({'quick' if quick else 'full'})\n")
    print(f"settings: {json.dumps(settings)}\n")
    rows, budget_rows, disc_rows, raw = [], [], [], {}
    start_all = time.perf_counter()
    arms = ("adaptive", "random") + (("sensitivity",) if args.sensitivity else ()) + ("uniform",)
    inserting = arms[:-1]
    for name in args.datasets:
        per_seed = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            res = run_adapt(name, seed=seed, n0=n0, max_layers=max_layers, max_levels=12,
                            steps=steps, lr=0.02, theta=0.5, lam=args.lam, n_train=n_train,
                            n_test=n_test, estimator=args.estimator, arms=arms)
            per_seed.append({k: res[k].history for k in arms})
            ds = res["data"]
            budgets = [lv.n_layers for lv in res["uniform"].history]
            for k in arms:  # goal discretisation error at the levels the tables use
                for b in budgets:
                    i = max(j for j, lv in enumerate(res[k].history) if lv.n_layers <= b)
                    lev = res[k].history[i]
                    if getattr(lev, "disc_error", None) is None:
                        lev.disc_error = _disc_error(res[k].models[i], ds.x_test, ds.y_test)
            ad = res["adaptive"]
            if seed == 0:
                d = out / name
                d.mkdir(exist_ok=True)
                plot_mesh(ad.history, d / "mesh.png", f"{name}: adaptive mesh (seed 0)")
                plot_trajectories(ad.model, res["data"].x_test, res["data"].y_test,
                                  d / "trajectories.png",
                                  title=f"{name}: adaptive, {ad.model.num_layers} layers")
            msg = "; ".join(f"{k} {[lv.n_layers for lv in res[k].history]} acc "
                            f"{[round(lv.test_accuracy, 3) for lv in res[k].history]}"
                            for k in arms)
            print(f"  {name} seed {seed}: {msg} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        raw[name] = [{k: [{**lv.as_dict(), "disc_error": getattr(lv, "disc_error", None)}
                          for lv in s[k]] for k in arms} for s in per_seed]
        curves = {}
        for kind in arms:
            layers = sorted({lv.n_layers for s in per_seed for lv in s[kind]})
            curves[kind] = [(b, statistics.mean(_acc_at_budget(s[kind], b) for s in per_seed))
                            for b in layers]
        plot_accuracy(curves, out / name / "accuracy.png",
                      f"{name}: mean test accuracy over {seeds} seeds")
        finest = per_seed[0]["uniform"][-1].n_layers
        cells = []
        for kind in inserting:
            need, need_tol, wins = [], [], 0
            for s in per_seed:
                target = s["uniform"][-1].test_accuracy
                n_strict = _layers_to_reach(s[kind], target)
                need.append(n_strict)
                need_tol.append(_layers_to_reach(s[kind], target - 0.005))
                wins += int(n_strict is not None and n_strict <= finest // 2)
            cells += [" ".join(_fmt(v) for v in need), " ".join(_fmt(v) for v in need_tol),
                      f"{wins}/{seeds}"]
        uni_acc = statistics.mean(s["uniform"][-1].test_accuracy for s in per_seed)
        steps_used = " / ".join(
            str(round(statistics.mean(len(s[k]) for s in per_seed) * steps)) for k in arms)
        rows.append(f"| {name} | {finest} | {uni_acc:.3f} | {' | '.join(cells)} | {steps_used} |")
        for lev in per_seed[0]["uniform"]:
            b = lev.n_layers
            accs = [[_acc_at_budget(s[k], b) for s in per_seed] for k in arms]
            budget_rows.append(f"| {name} | {b} | "
                               + " | ".join(f"{statistics.mean(a):.3f} +- {_sd(a):.3f}"
                                            for a in accs) + " |")
            errs = [[_at_budget(s[k], b, "disc_error") for s in per_seed] for k in arms]
            a_u = sum(ea < eu for ea, eu in zip(errs[0], errs[-1], strict=True))
            a_r = sum(ea < er for ea, er in zip(errs[0], errs[1], strict=True))
            disc_rows.append(f"| {name} | {b} | "
                             + " | ".join(f"{statistics.median(e):.2e}" for e in errs)
                             + f" | {a_u}/{seeds} | {a_r}/{seeds} |")
    print("## Layers needed to reach the finest uniform mesh's test accuracy\n")
    print("Per seed (seed 0 first); '-' = not reached within the budget; 'wins' = seeds where "
          "it was reached with at most half the finest uniform mesh's layers. 'random' marks as "
          "many intervals as Doerfler would, chosen at random (same levels, layers and training "
          "steps as adaptive: it isolates *where* the layers go).\n")
    print("| data | finest uniform layers | its mean test acc | "
          + " | ".join(f"{k} (strict) | {k} (within 0.5 pp) | {k} wins" for k in inserting)
          + f" | mean inner steps {' / '.join(arms)} |")
    print("|---" * (4 + 3 * len(inserting)) + "|")
    print("\n".join(rows))
    print("\n## Test accuracy at equal layer budgets (mean +- std over seeds)\n")
    print("Inserting arms: the last level with at most that many layers.\n")
    print("| data | layer budget | " + " | ".join(arms) + " |")
    print("|---" * (2 + len(arms)) + "|")
    print("\n".join(budget_rows))
    print("\n## Goal discretisation error at equal layer budgets\n")
    print("|test cross-entropy of the ODE with the trained controls (torchdiffeq dopri5, rtol "
          "1e-6) - that of the Euler network|: what the DWR estimator targets. Median over "
          "seeds; 'a<u', 'a<r': seeds where adaptive's error is below uniform's / random's.\n")
    print("| data | layer budget | " + " | ".join(arms) + " | a<u | a<r |")
    print("|---" * (4 + len(arms)) + "|")
    print("\n".join(disc_rows))
    print(f"\ntotal wall time {time.perf_counter() - start_all:.0f} s (shared 2-core CPU box)")
    (out / "raw.json").write_text(json.dumps({"settings": settings, "runs": raw}, indent=1))
    print(f"\nplots and raw.json in {out}/")


if __name__ == "__main__":
    main()
