"""E-MSA's seconds per step as a ratio to Adam's, beside its arithmetic floor (issue 17, item 2).

Networks: the DIGITS MLP (``ocnet train --data digits --model mlp`` defaults: 64-64-64-10
tanh, batch 32), the DIGITS CNN (``build_model("cnn", 64, 10, image_shape=(1, 8, 8))``) and
a 20-block residual MLP (``--model resnet --depth 20``); then a sweep of tanh MLPs on random
64-d inputs over width, depth and batch (the rows of the issue's table).

Each solver (Adam, E-MSA with its defaults: L-BFGS, 10 inner iterations; and with
``--baseline FILE`` the E-MSA of another ``msa.py``, e.g. a copy of an older version) gets
its own deep copy of the same initial network; they take turns, one step each (the order
rotated every round), on the same batches, so the load of a shared machine hits all alike.
Times are thread CPU time (``time.thread_time``) with one torch thread; the medians over
the timed rounds are reported as ratios to Adam. ``floor`` is E-MSA's arithmetic floor: the
matmul/conv FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` over
those of one Adam step (elementwise work is not counted); ``/floor`` is the measured ratio
over it; ``passes floor`` counts the network passes alone (the FLOPs inside the step's
``value_and_gradients`` and its evaluations; the rest are the batched L-BFGS memory
products). The load average is printed with every table.

Usage::

    .venv/bin/python benchmarks/emsa_speed.py                       # networks and sweep
    .venv/bin/python benchmarks/emsa_speed.py --quick               # seconds
    .venv/bin/python benchmarks/emsa_speed.py --toy --networks "" --sweep none  # the toy
    cp ocnet/solvers/msa.py /tmp/msa_old.py   # (before a change)
    .venv/bin/python benchmarks/emsa_speed.py --baseline /tmp/msa_old.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import count_flops, loadavg  # noqa: E402  (benchmarks/speed.py: one counter)

from ocnet import data  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers import make_solver  # noqa: E402

#: (width, depth, batch) of the sweep: the issue's table
SWEEP = [(32, 5, 32), (128, 5, 32), (512, 5, 32), (32, 20, 32), (128, 20, 32), (128, 5, 256),
         (512, 5, 256)]
SWEEP_QUICK = [(32, 5, 32), (128, 5, 32)]


def count_passes(solver: Any, batch: tuple) -> int:
    """The FLOPs of one E-MSA step's network passes alone: those inside its
    ``value_and_gradients`` and its evaluations (the rest of the step is L-BFGS
    bookkeeping, whose memory products are batched matmuls like the closed-form passes)."""
    total = [0]

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            box: list[Any] = []
            total[0] += count_flops(lambda: box.append(fn(*a, **k)))
            return box[0]
        return run

    prob = solver.problem
    solver.evaluate = counted(solver.evaluate)
    prob.value_and_gradients = counted(prob.value_and_gradients)
    try:
        solver.step(*batch)
    finally:
        del solver.evaluate, prob.value_and_gradients
    return total[0]


def load_msa(path: str) -> Any:
    """Another msa.py as a module (its solvers are not registered)."""
    import ocnet.solvers.base as base

    register = base.register
    base.register = lambda *a, **k: None
    try:
        name = "ocnet.solvers._msa_baseline"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        base.register = register
    return mod


def make_solvers(model: nn.Module, baseline: Any | None) -> dict[str, Any]:
    out = {"adam": make_solver("adam", to_problem(copy.deepcopy(model), "cross_entropy")),
           "emsa": make_solver("emsa", to_problem(copy.deepcopy(model), "cross_entropy"))}
    if baseline is not None:
        out["emsa-before"] = baseline.EMSA(to_problem(copy.deepcopy(model), "cross_entropy"))
    return out


def interleave(solvers: dict[str, Any], batches: list[tuple], rounds: int, warmup: int
               ) -> dict[str, float]:
    """Median thread CPU seconds per step of each solver, stepped in turn."""
    names = list(solvers)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        x, y = batches[r % len(batches)]
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.thread_time()
            solvers[k].step(x, y)
            t1 = time.thread_time()
            if r >= warmup:
                times[k].append(t1 - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def floor(model: nn.Module, batch: tuple) -> tuple[float, float]:
    """FLOPs of one E-MSA step over one Adam step (fresh copies; after one warm-up step):
    all counted, and the network passes alone."""
    s = make_solvers(model, None)
    for v in s.values():
        v.step(*batch)
    e, a = count_flops(lambda: s["emsa"].step(*batch)), count_flops(
        lambda: s["adam"].step(*batch))
    return e / a, count_passes(s["emsa"], batch) / a


def row(label: str, model: nn.Module, batches: list[tuple], args: argparse.Namespace,
        baseline: Any | None) -> dict[str, Any]:
    med = interleave(make_solvers(model, baseline), batches, args.rounds, args.warmup)
    fl, passes = floor(model, batches[0])
    r = {"label": label, "adam_ms": med["adam"] * 1e3, "emsa": med["emsa"] / med["adam"],
         "floor": fl, "passes": passes, "load": loadavg()}
    if "emsa-before" in med:
        r["before"] = med["emsa-before"] / med["adam"]
    print(fmt(r, baseline is not None), flush=True)
    return r


def fmt(r: dict[str, Any], before: bool) -> str:
    cells = [r["label"], f"{r['adam_ms']:.2f}"]
    if before:
        cells.append(f"{r['before']:.1f}")
    cells += [f"{r['emsa']:.1f}", f"{r['floor']:.1f}", f"{r['emsa'] / r['floor']:.2f}",
              f"{r['passes']:.1f}", f"{r['emsa'] / r['passes']:.2f}", r["load"]]
    return "| " + " | ".join(cells) + " |"


def header(first: str, before: bool) -> str:
    cols = [first, "Adam ms/step"] + (["E-MSA before / Adam"] if before else []) + [
        "E-MSA / Adam", "floor", "/floor", "passes floor", "/passes", "load"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def digits_batches(batch_size: int, n: int) -> tuple[Any, list[tuple]]:
    ds = data.load("digits", seed=0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(ds.x_train.shape[0], generator=g)
    out = []
    for i in range(n):
        idx = perm[(i * batch_size) % (perm.numel() - batch_size):][:batch_size]
        out.append((ds.x_train[idx], ds.y_train[idx]))
    return ds, out


def toy_row(args: argparse.Namespace) -> dict[str, Any]:
    """The public toy (``ocnet.reproduce._emsa_toy``: 20 residual layers of width 5, all-zero
    init, full batch 100, MSE + 1e-3/2 |u|^2): E-MSA with the public settings (rho 1,
    reference scaling, 10 inner evaluations; plain, ``preset="paper"`` and with
    ``rho_adapt=True``) and Adam lr
    0.005, each on its own copy of the problem, stepped in turn (issue 15 item 4: <= 15x
    Adam per step)."""
    from ocnet.reproduce import _emsa_toy

    solvers = {}
    for name, opts in (("adam", {"lr": 0.005}),
                       ("emsa", {"rho": 1.0, "scaling": "reference", "inner_iters": 10}),
                       ("emsa paper", {"preset": "paper"}),
                       ("emsa adaptive", {"rho": 1.0, "scaling": "reference",
                                          "inner_iters": 10, "rho_adapt": True})):
        problem, x, y = _emsa_toy()
        solvers[name] = make_solver(name.split()[0], problem, **opts)
    med = interleave(solvers, [(x, y)], args.rounds, args.warmup)
    r = {"adam_ms": med["adam"] * 1e3, "emsa": med["emsa"] / med["adam"],
         "paper": med["emsa paper"] / med["adam"],
         "adaptive": med["emsa adaptive"] / med["adam"], "load": loadavg()}
    print("| public toy 20 x 5, batch 100 | "
          f"{r['adam_ms']:.2f} | {r['emsa']:.1f} | {r['paper']:.1f} | {r['adaptive']:.1f} | "
          f"{r['load']} |", flush=True)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, small sweep")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="another msa.py to time beside")
    ap.add_argument("--networks", default="mlp,cnn,resnet20")
    ap.add_argument("--sweep", default="issue", choices=("issue", "quick", "none"))
    ap.add_argument("--toy", action="store_true",
                    help="also the E-MSA public toy (plain, preset='paper', rho_adapt)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 15)
    torch.set_num_threads(1)
    baseline = load_msa(args.baseline) if args.baseline else None
    before = baseline is not None
    print(f"torch {torch.__version__}, 1 thread, load average {loadavg()}")
    nets = [n for n in args.networks.split(",") if n]
    if nets:
        ds, batches = digits_batches(32, 20)
        print("\nDIGITS networks, batch 32\n")
        print(header("network", before))
        for name in nets:
            torch.manual_seed(0)
            if name == "mlp":
                model = build_model("mlp", ds.n_features, ds.n_classes)
            elif name == "cnn":
                model = build_model("cnn", ds.n_features, ds.n_classes, image_shape=(1, 8, 8))
            elif name.startswith("resnet"):
                model = build_model("resnet", ds.n_features, ds.n_classes,
                                    depth=int(name[6:] or 20))
            else:
                raise SystemExit(f"unknown network {name!r}: mlp, cnn, resnet<depth>")
            row(name, model, batches, args, baseline)
    if args.toy:
        print("\nE-MSA public toy (config.yml 'toy'), interleaved with Adam lr 0.005\n")
        print("| problem | Adam ms/step | E-MSA / Adam | E-MSA paper preset / Adam | "
              "E-MSA rho_adapt / Adam | load |\n|---|---|---|---|---|---|")
        toy_row(args)
    sizes = {"issue": SWEEP, "quick": SWEEP_QUICK, "none": []}[
        "quick" if args.quick and args.sweep == "issue" else args.sweep]
    if sizes:
        print("\nsweep: tanh MLPs on random 64-d inputs (width x depth x batch)\n")
        print(header("width x depth x batch", before))
        for width, depth, batch in sizes:
            torch.manual_seed(0)
            model = build_model("mlp", 64, 10, width=width, depth=depth, activation="tanh")
            g = torch.Generator().manual_seed(1)
            bt = [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,),
                                                                       generator=g))
                  for _ in range(4)]
            rounds = args.rounds if width * batch < 512 * 256 else max(3, args.rounds // 3)
            row(f"{width} x {depth} x {batch}", model, bt,
                argparse.Namespace(**{**vars(args), "rounds": rounds}), baseline)
    print(f"\nload average at the end {loadavg()}")


if __name__ == "__main__":
    main()
