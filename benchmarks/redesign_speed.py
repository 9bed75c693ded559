"""Seconds per step of every solver, old code against new, interleaved in one process.

The old code is a checkout of an earlier commit (``--old DIR``, e.g. made with
``git worktree add /tmp/ocnet-before 6d0ed8a``); its package is imported side by side
under the name ``ocnet_old`` (the package uses relative imports only). Each solver is
built twice on deep copies of the same network, from the old and the new code, and the
two step in turn on the same batches, so load hits both alike. The table gives the
median thread-CPU seconds per step of each and the ratio new / old (the redesign may not
make a solver slower by more than 5 %), plus each one's ratio to its own Adam.

    python benchmarks/redesign_speed.py --old /tmp/ocnet-before [--steps 60] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def _load_old(path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "ocnet_old", path / "ocnet" / "__init__.py",
        submodule_search_locations=[str(path / "ocnet")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ocnet_old"] = mod
    spec.loader.exec_module(mod)
    return mod


SOLVERS = {
    "sgd": {}, "momentum": {}, "rmsprop": {}, "adam": {}, "ddpnopt": {}, "msa": {},
    "emsa": {}, "phb": {}, "phb-goal": {},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the old commit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 solvers, 8 steps (a smoke test)")
    ap.add_argument("--only", default=None, help="comma-separated solver names")
    ap.add_argument("--no-guard", action="store_true",
                    help="new solvers without the finiteness guard and input checks")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = _load_old(args.old)
    import ocnet_old.bridge  # noqa: F401
    import ocnet_old.models  # noqa: F401
    import ocnet_old.solvers  # noqa: F401

    import ocnet
    from ocnet.bridge import to_problem
    from ocnet.data import load
    from ocnet.models import build_model

    ds = load("digits", seed=0)
    x, y = ds.x_train[:64], ds.y_train[:64]
    torch.manual_seed(0)
    net = build_model("mlp", ds.n_features, ds.n_classes)
    solvers = {"adam": {}, "sgd": {}, "ddpnopt": {}} if args.quick else SOLVERS
    if args.only:
        names = ["adam"] + [n for n in args.only.split(",") if n != "adam"]
        solvers = {n: SOLVERS.get(n, {}) for n in names}
    steps, warm = (8, 2) if args.quick else (args.steps, args.warmup)
    built = {}
    for name, opts in solvers.items():
        p_new = to_problem(copy.deepcopy(net), "cross_entropy", 1e-4)
        p_old = old.bridge.to_problem(copy.deepcopy(net), "cross_entropy", 1e-4)
        new = ocnet.solvers.make_solver(name, p_new, **opts)
        if args.no_guard:
            new.guard, new.check_inputs = False, False
        built[name] = (old.solvers.make_solver(name, p_old, **opts), new)
    times = {name: ([], []) for name in built}
    for i in range(steps + warm):
        for name, (s_old, s_new) in built.items():
            for k, s in enumerate((s_old, s_new)):
                t0 = time.thread_time()
                info = s.step(x, y)
                float(info.loss)
                dt = time.thread_time() - t0
                if i >= warm:
                    times[name][k].append(dt)
    med = {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in times.items()}
    load_avg = os.getloadavg()
    lines = [
        f"Seconds per step, old ({args.old}) vs new code, DIGITS MLP, batch 64, "
        f"{steps} steps after {warm} warm-up, thread CPU time, {args.threads} thread(s), "
        f"new code {'without' if args.no_guard else 'with'} the finiteness guard and input "
        "checks, "
        f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}",
        "",
        "| solver | old ms/step | new ms/step | new / old | old / old adam | new / new adam |",
        "|---|---|---|---|---|---|",
    ]
    a_old, a_new = med["adam"]
    for n, (o, w) in med.items():
        lines.append(f"| {n} | {o * 1e3:.3f} | {w * 1e3:.3f} | {w / o:.3f} | {o / a_old:.2f} | "
                     f"{w / a_new:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
