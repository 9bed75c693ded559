"""Seconds per step with the finiteness guard and input checks on, as a ratio to off.

Adam and DDPNOpt (issue 16: the guard may cost at most 3 %) on the DIGITS MLP, batch 64;
three copies of each solver (off, guard only, guard and input checks) step in turn on the
same batch, thread CPU time, medians after 50 warm-up rounds.

    python benchmarks/guard_cost.py [--steps 800] [--solvers adam,ddpnopt] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ocnet.bridge import to_problem  # noqa: E402
from ocnet.data import load  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers import make_solver  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--solvers", default="adam,ddpnopt")
    ap.add_argument("--quick", action="store_true", help="60 steps (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, warm = (60, 10) if args.quick else (args.steps, 50)
    ds = load("digits", seed=0)
    x, y = ds.x_train[:64], ds.y_train[:64]
    torch.manual_seed(0)
    net = build_model("mlp", ds.n_features, ds.n_classes)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {steps} rounds")
    print("| solver | off ms | guard ms | guard + checks ms | guard / off | guard + checks / off |")
    print("|---|---|---|---|---|---|")
    for name in args.solvers.split(","):
        modes = {}
        for mode in ("off", "guard", "both"):
            s = make_solver(name, to_problem(copy.deepcopy(net), "cross_entropy", 1e-4))
            s.guard, s.check_inputs = mode != "off", mode == "both"
            modes[mode] = s
        times = {m: [] for m in modes}
        for i in range(steps + warm):
            for m, s in modes.items():
                t0 = time.thread_time()
                float(s.step(x, y).loss)
                if i >= warm:
                    times[m].append(time.thread_time() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"| {name} | {med['off'] * 1e3:.3f} | {med['guard'] * 1e3:.3f} | "
              f"{med['both'] * 1e3:.3f} | {med['guard'] / med['off']:.3f} | "
              f"{med['both'] / med['off']:.3f} |")


if __name__ == "__main__":
    main()
