"""Data-parallel benchmark (issue 9): 1 against 2 gloo processes on this machine.

For each data-parallel solver: DIGITS (float64), an MLP, a fixed global batch; the same
training steps in 1 process and in 2 processes (each with half of every global batch).
Reported: the agreement of the final controls (max abs difference), the throughput ratio
(global samples per second, 2 processes / 1 process, measured in the same run), and the
communication volume per step: the bytes all-reduced per rank and step as counted by
``Comm.bytes_reduced`` (the payload; a ring all-reduce sends about 2 (N-1)/N times it
per rank on N ranks) and the number of collectives per step (the latency term).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/distributed.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from ocnet.bridge import place, to_problem  # noqa: E402
from ocnet.bridge.distributed import Comm, shard  # noqa: E402
from ocnet.data import load  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers import ddpnopt as _d  # noqa: E402, F401  (registers)
from ocnet.solvers import gradient as _g  # noqa: E402, F401
from ocnet.solvers import msa as _m  # noqa: E402, F401
from ocnet.solvers import port_hamiltonian as _p  # noqa: E402, F401
from ocnet.solvers.base import make_solver  # noqa: E402

SOLVERS: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd", "sgd", {}),
    ("momentum", "momentum", {}),
    ("rmsprop", "rmsprop", {}),
    ("adam", "adam", {}),
    ("ddpnopt-sgd", "ddpnopt", {"base": "sgd"}),
    ("ddpnopt-adam", "ddpnopt", {"base": "adam"}),
    ("ddpnopt-kfac", "ddpnopt", {"base": "kfac"}),
    ("emsa", "emsa", {}),
    ("phb", "phb", {}),
    ("phb-goal", "phb-goal", {"r": 0.9}),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, opts: dict[str, Any], steps: int, warmup: int, batch: int, width: int,
        depth: int, comm: Comm | None) -> dict[str, Any]:
    torch.manual_seed(0)
    ds = load("digits", seed=0, dtype=torch.float64)
    model = build_model("mlp", ds.n_features, ds.n_classes, width=width, depth=depth)
    problem = place(to_problem(model, "cross_entropy", 0.0), "cpu", torch.float64)
    solver = make_solver(name, problem, **opts)
    solver.comm = comm
    gen = torch.Generator().manual_seed(1)
    n = ds.x_train.shape[0]
    b0 = c0 = 0
    t0 = 0.0
    for k in range(warmup + steps):
        if k == warmup:
            if comm is not None:
                comm.barrier()
                b0, c0 = comm.bytes_reduced, comm.calls
            t0 = time.perf_counter()
        idx = torch.randperm(n, generator=gen)[:batch]
        xb, yb = ds.x_train[idx], ds.y_train[idx]
        if comm is not None:
            xb, yb = shard(xb, yb, comm.rank, comm.world_size)
        solver.step(xb, yb)
    if comm is not None:
        comm.barrier()
    seconds = time.perf_counter() - t0
    flat = torch.cat([u.detach().reshape(-1) for u in problem.parameters()])
    return {"params": flat, "seconds": seconds, "n_params": flat.numel(),
            "bytes": 0 if comm is None else (comm.bytes_reduced - b0) / steps,
            "calls": 0 if comm is None else (comm.calls - c0) / steps}


def worker(rank: int, world: int, port: int, out: str, cfg: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    try:
        comm = None
        if world > 1:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
            comm = Comm()
        for label, name, opts in SOLVERS:
            if label in cfg["solvers"]:
                res[label] = run(name, opts, cfg["steps"], cfg["warmup"], cfg["batch"],
                                 cfg["width"], cfg["depth"], comm)
        if comm is not None:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        res["exception"] = traceback.format_exc()
    torch.save(res, Path(out) / f"w{world}_rank{rank}.pt")


def launch(world: int, out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    mp.start_processes(worker, args=(world, free_port(), str(out), cfg), nprocs=world,
                       join=True, start_method="spawn")
    res = torch.load(out / f"w{world}_rank0.pt", weights_only=False)
    if "exception" in res:
        raise RuntimeError(res["exception"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and solvers")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/distributed"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (10 if args.quick else 30)
    labels = ["sgd", "adam", "ddpnopt-adam", "emsa", "phb-goal"] if args.quick else \
        [s[0] for s in SOLVERS]
    cfg = {"solvers": labels, "steps": steps, "warmup": 2, "batch": args.batch,
           "width": args.width, "depth": args.depth}
    one = launch(1, args.out, cfg)
    two = launch(2, args.out, cfg)
    lines = [
        f"# Data-parallel benchmark ({datetime.date.today()})", "",
        f"Shared 2-core CPU box (other jobs running), gloo on loopback, 1 torch thread per "
        f"process. DIGITS float64, MLP width {args.width} depth {args.depth}, global batch "
        f"{args.batch}, {steps} timed steps after 2 warm-up steps, seed 0 (data order 1). "
        f"Command: `python benchmarks/distributed.py{' --quick' if args.quick else ''}`.", "",
        "| solver | controls | max abs diff 2 vs 1 proc | throughput 2/1 procs | "
        "bytes all-reduced / step / rank | collectives / step | bytes / control / step |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for label in labels:
        a, b = one[label], two[label]
        diff = (a["params"] - b["params"]).abs().max().item()
        ratio = a["seconds"] / b["seconds"]
        ratios[label] = ratio
        lines.append(f"| {label} | {a['n_params']} | {diff:.2e} | {ratio:.2f} | "
                     f"{b['bytes']:.0f} | {b['calls']:.0f} | {b['bytes'] / a['n_params']:.1f} |")
    lines += ["", "throughput 2/1 = (seconds of 1 process) / (seconds of 2 processes) for the "
              "same global batches (>1: 2 processes are faster)."]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "results.md").write_text(text)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(list(ratios), list(ratios.values()))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("throughput 2 procs / 1 proc")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)
    print(f"wrote {args.out / 'results.md'} and throughput.png", file=sys.stderr)


if __name__ == "__main__":
    main()
