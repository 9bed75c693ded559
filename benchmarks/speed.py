"""Seconds per step of every registered solver against Adam (issue 17, item 1).

Sections (each prints a markdown table; ``--out FILE.md`` also writes them, and the raw
numbers as JSON beside it, ``FILE.json``):

1. Networks: every registered solver (``ocnet.solvers.solver_names()``) on the DIGITS MLP
   (``ocnet train --data digits --model mlp`` defaults: 2 x 64 tanh, batch 32), the DIGITS
   CNN (``--model cnn``) and a 20-block residual MLP (``--model resnet --depth 20``). Each
   solver is built with its defaults on its own deep copy of the same initial network; the
   solvers take turns, one step each (the order rotated every round), on the same batches,
   so that the load of a shared machine hits all alike. Warm-up rounds are excluded; the
   medians over the timed steps are reported as ms/step and as a ratio to Adam.
2. The NOVAS layer (``ocnet.solvers.NOVAS``, the energy regression of benchmarks/novas.py):
   one training update (forward search + backward + Adam on the energy network) against the
   energy network's own arithmetic (the same number of energy evaluations, one of them
   differentiated, and one Adam step), with DCEM and unrolled gradient descent beside it.
3. Scaling sweep: tanh MLPs on random 64-d inputs, width 32-512, depth 5-40, batch 32-512;
   ratio to Adam per solver, and per solver the log-log slope of seconds per step against
   the network's forward FLOPs.

Columns: ``cpu`` is the thread's CPU time (``time.thread_time``), ``wall`` elapsed time (on
CUDA: the device time between two CUDA events around the step; ``cpu`` is then the host's
launch cost). ``floor`` is the arithmetic floor: the matmul/conv FLOPs of one step of the
solver counted by ``torch.utils.flop_counter`` over those of one Adam step (elementwise work
is not counted). ``peak MiB``: on CPU the peak of the bytes the torch allocator holds during
one step beyond what it held before (torch.profiler memory events); on CUDA
``torch.cuda.max_memory_allocated`` over one step, beyond the memory allocated before it.
With ``--device cuda`` every step runs under ``torch.cuda.set_sync_debug_mode("error")``; a
solver whose step synchronises with the host is reported (and timed without the check).

Usage (one thread, as the tables in benchmarks/results were measured)::

    .venv/bin/python benchmarks/speed.py --out benchmarks/results/speed.md
    .venv/bin/python benchmarks/speed.py --quick                  # CI smoke run, seconds
    .venv/bin/python benchmarks/speed.py --only emsa,ddpnopt --networks mlp --sweep none
    .venv/bin/python benchmarks/speed.py --device cuda --out benchmarks/results/speed_cuda.md

The benchmark uses only public API (``make_solver``, ``solver_names``, ``to_problem``,
``build_model``, ``data.load``, ``solver.step``, ``NOVAS``), so it runs unchanged against an
older tree: ``PYTHONPATH=/path/to/old/tree python benchmarks/speed.py``. Before/after in one
process (issue 13): ``--versus TREE`` loads the ``ocnet`` of the source tree TREE a second
time under another name and steps its solvers (rows ``NAME@versus``) in turn with the current
ones on the same batches; the last column is the current tree's cpu time over TREE's::

    git worktree add /tmp/ocnet-before 6d0ed8a
    .venv/bin/python benchmarks/speed.py --versus /tmp/ocnet-before --sweep issue \
        --out benchmarks/results/speed_after.md
"""

from __future__ import annotations

import os
import sys


def _preparse_threads(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


if "torch" not in sys.modules:  # the OpenMP pool is sized when torch is first imported
    _t = _preparse_threads(sys.argv[1:])
    os.environ["OMP_NUM_THREADS"] = _t
    os.environ["MKL_NUM_THREADS"] = _t

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ocnet  # noqa: E402
from ocnet import data  # noqa: E402
from ocnet.bridge import to_problem  # noqa: E402
from ocnet.models import build_model  # noqa: E402
from ocnet.solvers import NOVAS, make_solver, solver_names  # noqa: E402

BASELINE = "adam"
#: the sweep of issue 17's table, then depth 10/40 and batch 512 (one factor at a time)
SWEEP_ISSUE = [(32, 5, 32), (128, 5, 32), (512, 5, 32), (32, 20, 32), (128, 20, 32),
               (128, 5, 256), (512, 5, 256)]
SWEEP_FULL = SWEEP_ISSUE + [(32, 10, 32), (32, 40, 32), (128, 40, 32), (128, 5, 512)]
#: small enough for CI, large enough that ddp and ipopt refuse them (they solve to the end)
SWEEP_QUICK = [(32, 2, 16), (64, 2, 16)]


@dataclass
class Tree:
    """The ocnet whose solvers are timed: the imported one, or a second copy (``--versus``)
    loaded under another package name, so that two versions run interleaved in one process."""

    suffix: str
    pkg: Any

    def __getattr__(self, name: str) -> Any:  # solvers, bridge, models
        return getattr(self.pkg, name)


def load_versus(path: Path, alias: str = "ocnet_versus") -> Tree:
    """The ``ocnet`` package of the source tree ``path`` imported as ``alias`` (its imports
    are relative, so it and the current tree have separate registries)."""
    import importlib
    import importlib.util

    init = Path(path) / "ocnet" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--versus {path}: no ocnet/__init__.py there (give a source tree, "
                         "e.g. a git worktree of the old commit)")
    spec = importlib.util.spec_from_file_location(
        alias, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    for sub in ("solvers", "bridge", "models"):
        setattr(mod, sub, importlib.import_module(f"{alias}.{sub}"))
    return Tree("@versus", mod)


def same_weights(model: nn.Module, like: nn.Module) -> nn.Module:
    """``model`` with ``like``'s initial weights (when the two trees name them alike)."""
    try:
        model.load_state_dict(like.state_dict())
    except (RuntimeError, KeyError):  # different layouts: both were seeded alike anyway
        pass
    return model


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


# ----------------------------------------------------------------------------- measuring
class _NoModuleTracker:
    """Stands in for FlopCounterMode's module tracker: its backward hooks break
    ``torch.autograd.grad`` on leaves (which the solvers use), and only the total is needed."""

    parents = {"Global"}

    def __enter__(self) -> _NoModuleTracker:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv FLOPs (torch.utils.flop_counter's registry) of running ``fn`` once."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes held by torch's allocator while ``fn`` runs, beyond those held before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


@contextmanager
def sync_check(device: torch.device, enabled: bool) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` inside (CUDA only)."""
    if device.type != "cuda" or not enabled:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def timed(fn: Callable[[], Any], device: torch.device, check: bool) -> tuple[float, float, Any]:
    """(thread CPU s, wall s, result) of ``fn()``; on CUDA wall is the CUDA-event time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.thread_time()
        start.record()
        with sync_check(device, check):
            out = fn()
        end.record()
        c1 = time.thread_time()
        torch.cuda.synchronize(device)
        return c1 - c0, start.elapsed_time(end) / 1e3, out
    c0, w0 = time.thread_time(), time.perf_counter()
    out = fn()
    w1, c1 = time.perf_counter(), time.thread_time()
    return c1 - c0, w1 - w0, out


def _first_line(err: BaseException, n: int = 160) -> str:
    msg = f"{type(err).__name__}: {err}".splitlines()[0]
    return msg if len(msg) <= n else msg[: n - 3] + "..."


@dataclass
class Entry:
    """One contestant: ``step(r)`` performs one update on round ``r``'s batch."""

    name: str
    step: Callable[[int], Any] | None
    status: str = "ok"
    host_sync: str | None = None
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    flops: int | None = None
    peak: int | None = None
    loss: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.step is not None and self.status == "ok"

    def med(self, which: str) -> float:
        v = getattr(self, which)
        return statistics.median(v) if v else math.nan


def _loss_of(out: Any) -> float | None:
    loss = getattr(out, "loss", out)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss)
    return None


class StepTimeout(Exception):
    """A step ran past ``--max-step-seconds``."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the main thread after ``seconds`` (Unix; else no limit).
    Code in a C extension (IPOPT) is interrupted only when it returns to Python."""
    if not seconds or not hasattr(signal, "setitimer") or (
            threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise StepTimeout(f"a step ran past --max-step-seconds={seconds:g}")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def interleave(entries: list[Entry], steps: int, warmup: int, device: torch.device,
               flops: bool = True, memory: bool = True, max_step_s: float | None = None) -> None:
    """Step the entries in turn (order rotated each round), then count FLOPs and memory.

    An entry whose step fails, or takes longer than ``max_step_s``, is dropped with the
    reason in its status."""
    rounds = warmup + steps
    for r in range(rounds):
        live = [e for e in entries if e.ok]
        k = r % len(live) if live else 0
        order = live[k:] + live[:k]
        if r % 2:  # each neighbour (a solver and its --versus twin) goes first as often
            order.reverse()
        for e in order:
            try:
                with time_limit(max_step_s):
                    cpu, wall, out = timed(lambda e=e, r=r: e.step(r), device, e.host_sync is None)
            except StepTimeout as err:
                e.status = f"dropped at round {r}: {err}"
                continue
            except RuntimeError as err:
                if device.type == "cuda" and "synchroniz" in str(err).lower():
                    e.host_sync = _first_line(err)  # timed from now on without the check
                    continue
                e.status = f"failed at round {r}: {_first_line(err)}"
                continue
            except Exception as err:  # noqa: BLE001 - a solver's failure is reported, not fatal
                e.status = f"failed at round {r}: {_first_line(err)}"
                continue
            if max_step_s and wall > max_step_s:
                e.status = f"dropped at round {r}: a step took {wall:.1f} s > --max-step-seconds"
            if r >= warmup:
                e.cpu.append(cpu)
                e.wall.append(wall)
            if r == warmup or r == rounds - 1:
                loss = _loss_of(out)
                if loss is not None:
                    e.loss.append(loss)
    for e in entries:
        if not e.ok:
            continue
        if e.name.endswith("+compile"):  # the same arithmetic as its eager twin's row
            continue
        limit = 5 * max_step_s if max_step_s else None  # counting slows a step down
        try:
            with time_limit(limit):
                if flops:
                    e.flops = count_flops(lambda e=e: e.step(rounds))
                if memory:
                    e.peak = peak_bytes(lambda e=e: e.step(rounds + 1), device)
        except (Exception, StepTimeout) as err:  # noqa: BLE001
            e.status = f"ok (counting failed: {_first_line(err)})"
        if e.loss and not all(math.isfinite(v) for v in e.loss):
            e.status = f"ok (loss not finite: {e.loss[-1]})"


# ----------------------------------------------------------------------------- solvers
def selected_solvers(only: str | None) -> list[str]:
    names = solver_names()
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise SystemExit(f"unknown solver(s) {unknown}; registered: {', '.join(names)}")
        names = [s for s in names if s in wanted]
    return [BASELINE] + [s for s in names if s != BASELINE]


def solver_entries(names: list[str], model: nn.Module, batch: Callable[[int], tuple],
                   loss: str = "cross_entropy", tree: Tree | None = None,
                   compiled: bool = False) -> list[Entry]:
    """One entry per solver, each on its own deep copy of ``model``; refusals are kept.
    With ``tree`` (``--versus``) the solvers come from that tree, named ``solver@versus``;
    with ``compiled`` (``--compile``) every solver that takes ``compile=`` gets a second
    entry ``solver+compile`` (its compiled path; the warm-up rounds absorb the compilation)."""
    make, problem_of, suffix = make_solver, to_problem, ""
    if tree is not None and tree.suffix:
        make, problem_of, suffix = tree.solvers.make_solver, tree.bridge.to_problem, tree.suffix
        names = [n for n in names if n in tree.solvers.solver_names()]
    entries = []
    for base_name in names:
        name = base_name + suffix
        try:
            problem = problem_of(copy.deepcopy(model), loss, 0.0)
            solver = make(base_name, problem)
        except Exception as err:  # noqa: BLE001 - ddp/ipopt refuse large networks by design
            entries.append(Entry(name, None, status=f"skipped: {_first_line(err, 240)}"))
            continue

        def step(r: int, solver: Any = solver) -> Any:
            x, y = batch(r)
            return solver.step(x, y)

        entries.append(Entry(name, step))
        if compiled and tree is None:
            try:
                twin = make(base_name, problem_of(copy.deepcopy(model), loss, 0.0),
                            compile=True)
            except Exception:  # noqa: BLE001 - the solver has no compiled path
                continue

            def step_c(r: int, solver: Any = twin) -> Any:
                x, y = batch(r)
                return solver.step(x, y)

            entries.append(Entry(name + "+compile", step_c))
    return entries


def _ms(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{1e3 * v:.3g}" if v < 0.1 else f"{1e3 * v:.0f}"


def _ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return "-"
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.1f}"


def _twins(entries: list[Entry], base: Entry) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """(the baseline of each entry's tree, each current entry's ``@versus`` twin)."""
    by_name = {e.name: e for e in entries}
    bases, twins = {}, {}
    for e in entries:
        versus = e.name.endswith("@versus")
        bases[e.name] = by_name.get(base.name + "@versus", base) if versus else base
        if not versus and e.name + "@versus" in by_name:
            twins[e.name] = by_name[e.name + "@versus"]
    return bases, twins


def _paired_ratio(e: Entry, twin: Entry) -> float:
    """Median over rounds of e's cpu time over its twin's in the same round (the two ran
    next to each other, so a load spike hits both); ratio of medians if rounds were lost."""
    if e.cpu and len(e.cpu) == len(twin.cpu):
        return statistics.median(a / b for a, b in zip(e.cpu, twin.cpu, strict=True))
    return e.med("cpu") / twin.med("cpu") if e.cpu and twin.cpu else math.nan


def entry_rows(entries: list[Entry], base: Entry) -> tuple[list[str], list[dict]]:
    """Table rows; ratios are to the baseline of the entry's own tree. With ``--versus`` a
    last column gives the current tree's cpu time over the other tree's, solver by solver
    (the median over rounds of the paired ratio)."""
    lines, records = [], []
    bases, twins = _twins(entries, base)
    for e in entries:
        base = bases[e.name]
        floor = (e.flops / base.flops) if (e.flops and base.flops) else math.nan
        rc, rw = e.med("cpu"), e.med("wall")
        cpu_ratio = rc / base.med("cpu") if e.cpu and base.cpu else math.nan
        note = e.status if e.status != "ok" else ""
        if e.host_sync:
            note = (note + "; " if note else "") + f"host sync: {e.host_sync}"
        lines.append(
            f"| {e.name} | {_ms(rc)} | {_ms(rw)} | {_ratio(rc, base.med('cpu'))} | "
            f"{_ratio(rw, base.med('wall'))} | {_ratio(floor, 1.0)} | "
            f"{_ratio(cpu_ratio, floor)} | "
            f"{'-' if e.peak is None else f'{e.peak / 2**20:.2f}'} | {note} |"
            + (f" {_ratio(_paired_ratio(e, twins[e.name]), 1.0) if e.name in twins else ''} |"
               if twins else "")
        )
        records.append(dict(
            solver=e.name, status=e.status, host_sync=e.host_sync, cpu_s=e.cpu, wall_s=e.wall,
            median_cpu_s=rc, median_wall_s=rw, flops=e.flops, floor=floor,
            peak_bytes=e.peak, loss_first_last=e.loss,
            cpu_over_versus=(_paired_ratio(e, twins[e.name]) if e.name in twins else None),
        ))
    return lines, records


def table_head(versus: bool, base: str = "Adam", first: str = "solver") -> list[str]:
    head = [h.replace("Adam", base).replace("| solver |", f"| {first} |") for h in TABLE_HEAD]
    if versus:
        head = [head[0] + " cpu / versus |", head[1] + "---|"]
    return head


TABLE_HEAD = [
    "| solver | cpu ms/step | wall ms/step | cpu / Adam | wall / Adam | floor (FLOPs / Adam) | "
    "cpu ratio / floor | peak MiB | note |",
    "|---|---|---|---|---|---|---|---|---|",
]


# ----------------------------------------------------------------------------- networks
def digits_networks(names: list[str], quick: bool, device: torch.device,
                    build: Callable[..., nn.Module] = build_model
                    ) -> dict[str, tuple[nn.Module, str]]:
    ds = data.load("digits", seed=0)
    nets: dict[str, tuple[nn.Module, str]] = {}
    for name in names:
        torch.manual_seed(0)
        if name == "mlp":
            m = build("mlp", ds.n_features, ds.n_classes)
            desc = "DIGITS MLP (`--model mlp` defaults: 64-64-64-10, tanh)"
        elif name == "cnn":
            m = build("cnn", ds.n_features, ds.n_classes, image_shape=ds.image_shape)
            desc = "DIGITS CNN (`--model cnn`: 2 x conv 3x3 x16 relu, dense 64, dense 10)"
        elif name.startswith("resnet"):
            depth = int(name[len("resnet"):] or 20)
            m = build("resnet", ds.n_features, ds.n_classes, depth=depth)
            desc = (f"DIGITS residual MLP (`--model resnet --depth {depth}`: dense lift 64->32 "
                    f"tanh, {depth} blocks x + 0.5 tanh(Wx + b) of width 32, dense 10)")
        else:
            continue
        nets[name] = (m.to(device), desc)
    return nets


def digits_batches(device: torch.device, batch_size: int, n: int) -> list[tuple]:
    """``n`` training batches of DIGITS (a seeded permutation, cycled)."""
    ds = data.load("digits", seed=0)
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    g = torch.Generator().manual_seed(0)
    out, perm, k = [], torch.randperm(x.shape[0], generator=g), 0
    for _ in range(n):
        if k + batch_size > x.shape[0]:
            perm, k = torch.randperm(x.shape[0], generator=g), 0
        idx = perm[k:k + batch_size].to(device)
        out.append((x[idx], y[idx]))
        k += batch_size
    return out


def _paired(entries: list[Entry]) -> list[Entry]:
    """Each solver followed by its ``@versus`` twin (the baseline first)."""
    order = {e.name: i for i, e in enumerate(entries) if not e.name.endswith("@versus")}
    return sorted(entries, key=lambda e: (order.get(e.name.removesuffix("@versus"), 1 << 30),
                                          e.name.endswith("@versus")))


def section_networks(args, solvers: list[str], device: torch.device, results: dict
                     ) -> list[str]:
    names = [n for n in args.networks.split(",") if n != "novas"]
    nets = digits_networks(names, args.quick, device)
    vnets = (digits_networks(names, args.quick, device, args.versus_tree.models.build_model)
             if args.versus_tree else {})
    rounds = args.warmup + args.steps + 2
    batches = digits_batches(device, args.batch, rounds)
    out = ["## Networks: seconds per step, every solver against Adam", "",
           f"Batch {args.batch} of DIGITS (the same batches for every solver), each solver's "
           f"defaults, {args.warmup} warm-up + {args.steps} timed steps, interleaved; medians.",
           ""]
    results["networks"] = {}
    for net, (model, desc) in nets.items():
        la0 = loadavg()
        log(f"network {net}: {len(solvers)} solvers, load {la0}")
        entries = solver_entries(solvers, model, lambda r: batches[r % len(batches)],
                                 compiled=args.compile)
        if net in vnets:
            entries += solver_entries(solvers, same_weights(vnets[net][0], model),
                                      lambda r: batches[r % len(batches)],
                                      tree=args.versus_tree)
            entries = _paired(entries)
        interleave(entries, args.steps, args.warmup, device, max_step_s=args.max_step_seconds)
        la1 = loadavg()
        base = entries[0]
        lines, records = entry_rows(entries, base)
        n_params = sum(p.numel() for p in model.parameters())
        out += [f"### {net}: {desc}, {n_params} parameters", "",
                f"load average (1/5/15 min) before {la0}, after {la1}", "",
                *table_head(bool(vnets)), *lines, ""]
        results["networks"][net] = dict(description=desc, params=n_params, load_before=la0,
                                        load_after=la1, solvers=records)
        print("\n".join(out[-(len(lines) + 7):]), flush=True)
    return out


# ----------------------------------------------------------------------------- NOVAS
class EnergyNet(nn.Module):
    """concat(x, y) -> 3 x (Linear hidden + Softplus) -> Linear 1 (benchmarks/novas.py)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
        xs = x[:, None, :].expand(-1, Y.shape[1], -1)
        return self.net(torch.cat([xs, Y], -1)).squeeze(-1)


def section_novas(args, device: torch.device, results: dict) -> list[str]:
    from ocnet.solvers import DCEM, UnrolledGD

    hidden, samples, iters, batch = (16, 20, 3, 16) if args.quick else (128, 100, 10, 32)
    torch.manual_seed(0)
    x = (torch.rand(batch, 1) * 2 * math.pi).to(device)
    y = x * torch.sin(x)
    init = EnergyNet(hidden).to(device)

    def update(make: Callable[[nn.Module], Callable[[torch.Generator], torch.Tensor]]
               ) -> Callable[[int], torch.Tensor]:
        net = copy.deepcopy(init)
        layer = make(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator(device=device).manual_seed(0)

        def step(r: int) -> torch.Tensor:
            loss = (layer(gen) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            return loss.detach()

        return step

    def arithmetic(net: nn.Module) -> Callable[[torch.Generator], torch.Tensor]:
        """The energy evaluations a NOVAS update makes: n_iter - 1 without a graph, one with."""

        def run(gen: torch.Generator) -> torch.Tensor:
            with torch.no_grad():
                for _ in range(iters - 1):
                    Y = torch.randn(batch, samples, 1, generator=gen, device=device)  # noqa: N806
                    net(x, Y)
            Y = torch.randn(batch, samples, 1, generator=gen, device=device)  # noqa: N806
            E = net(x, Y)  # noqa: N806
            return torch.softmax(-E, dim=1)[..., None].mul(Y).sum(1)

        return run

    def layer(module: nn.Module) -> Callable[[torch.Generator], torch.Tensor]:
        return lambda gen: module(x, generator=gen)

    layers = {
        "energy net only (Adam)": arithmetic,
        "NOVAS (last iteration differentiated)": lambda net: layer(NOVAS(
            net, 1, mu0=0.0, sigma0=10.0, n_samples=samples, n_iter=iters)),
        "NOVAS (all iterations)": lambda net: layer(NOVAS(
            net, 1, mu0=0.0, sigma0=10.0, n_samples=samples, n_iter=iters,
            differentiate="all")),
        "DCEM": lambda net: layer(DCEM(net, 1, mu0=0.0, sigma0=7.0, n_samples=samples,
                                       n_elite=max(2, samples // 10), n_iter=iters)),
        "unrolled GD": lambda net: layer(UnrolledGD(net, 1, mu0=0.0, n_iter=iters, lr=0.1)),
    }
    entries = [Entry(k, update(fn)) for k, fn in layers.items()]
    if args.versus_tree is not None:
        vs = args.versus_tree.solvers
        vlayers = {
            "NOVAS (last iteration differentiated)": lambda net: layer(vs.NOVAS(
                net, 1, mu0=0.0, sigma0=10.0, n_samples=samples, n_iter=iters)),
            "DCEM": lambda net: layer(vs.DCEM(net, 1, mu0=0.0, sigma0=7.0, n_samples=samples,
                                              n_elite=max(2, samples // 10), n_iter=iters)),
        }
        entries = _paired(entries + [Entry(k + "@versus", update(fn))
                                     for k, fn in vlayers.items()])
    la0 = loadavg()
    log(f"NOVAS layer: load {la0}")
    interleave(entries, args.steps, args.warmup, device, max_step_s=args.max_step_seconds)
    la1 = loadavg()
    lines, records = entry_rows(entries, entries[0])
    head = table_head(args.versus_tree is not None, "arith.", "layer")
    out = ["## NOVAS layer: seconds per training update", "",
           f"Energy regression y = x sin x (benchmarks/novas.py): energy net {hidden} wide, "
           f"batch {batch}, {samples} samples, {iters} inner iterations; one update = layer "
           "forward, MSE, backward, grad clip 1.0, Adam step. The baseline row is the energy "
           f"network's own arithmetic: {iters - 1} evaluations on (batch, samples) candidates "
           "without a graph, one with, a softmax-weighted mean, backward and the Adam step. "
           "Ratios are to that row.", "",
           f"load average (1/5/15 min) before {la0}, after {la1}", "",
           *head, *lines, ""]
    results["novas"] = dict(hidden=hidden, samples=samples, iters=iters, batch=batch,
                            load_before=la0, load_after=la1, layers=records)
    print("\n".join(out), flush=True)
    return out


# ----------------------------------------------------------------------------- sweep
def _base_of(name: str) -> str:
    return BASELINE + "@versus" if name.endswith("@versus") else BASELINE


def section_sweep(args, solvers: list[str], device: torch.device, results: dict) -> list[str]:
    sizes = {"issue": SWEEP_ISSUE, "full": SWEEP_FULL, "quick": SWEEP_QUICK}[args.sweep]
    steps = args.sweep_steps
    rows: list[dict] = []
    la0 = loadavg()
    for width, depth, batch in sizes:
        torch.manual_seed(0)
        model = build_model("mlp", 64, 10, width=width, depth=depth, activation="tanh").to(device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 64, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        with torch.no_grad():
            fwd = count_flops(lambda model=model, x=x: model(x))
        log(f"sweep width {width} depth {depth} batch {batch}: load {loadavg()}")
        entries = solver_entries(solvers, model, lambda r, x=x, y=y: (x, y))
        if args.versus_tree is not None:
            torch.manual_seed(0)
            vmodel = args.versus_tree.models.build_model(
                "mlp", 64, 10, width=width, depth=depth, activation="tanh").to(device)
            entries = _paired(entries + solver_entries(
                solvers, same_weights(vmodel, model), lambda r, x=x, y=y: (x, y),
                tree=args.versus_tree))
        interleave(entries, steps, args.sweep_warmup, device, flops=not args.quick, memory=False,
                   max_step_s=args.max_step_seconds)
        rows.append(dict(width=width, depth=depth, batch=batch, forward_flops=fwd,
                         load=loadavg(), entries=entries))
    la1 = loadavg()
    names = [e.name for e in rows[0]["entries"]
             if any(ee.ok for r in rows for ee in r["entries"] if ee.name == e.name)]
    others = [n for n in names if n not in (BASELINE, BASELINE + "@versus")]
    skipped = {e.name: e.status for r in rows for e in r["entries"] if not e.ok}

    def cell(r: dict, name: str, which: str, with_floor: bool) -> str:
        es = {e.name: e for e in r["entries"]}
        e, base = es[name], es[_base_of(name)]
        if not e.ok or not e.cpu:
            return "-"
        s = _ratio(e.med(which), base.med(which))
        if with_floor and e.flops and base.flops:
            s += f" ({_ratio(e.flops, base.flops)})"
        return s

    out = ["## Scaling sweep: ratio to Adam as the network grows", "",
           f"tanh MLPs 64 -> width x depth -> 10 on random inputs (one fixed batch), each "
           f"solver's defaults, {args.sweep_warmup} warm-up + {steps} timed steps, interleaved; "
           "medians. Cells: cpu-time ratio to Adam at the same size (the FLOP floor in "
           "parentheses).", "",
           f"load average (1/5/15 min) before {la0}, after {la1}", ""]
    if skipped:
        out += ["Not run: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), ""]
    out += ["| width | depth | batch | forward MFLOP | Adam ms/step (cpu) | "
            + " | ".join(others) + " |",
            "|---|---|---|---|---|" + "---|" * len(others)]
    for r in rows:
        base = {e.name: e for e in r["entries"]}[BASELINE]
        out.append(f"| {r['width']} | {r['depth']} | {r['batch']} | "
                   f"{r['forward_flops'] / 1e6:.3g} | {_ms(base.med('cpu'))} | "
                   + " | ".join(cell(r, n, "cpu", True) for n in others) + " |")
    out += ["", "The same, wall-time ratios:", "",
            "| width | depth | batch | Adam ms/step (wall) | " + " | ".join(others) + " |",
            "|---|---|---|---|" + "---|" * len(others)]
    for r in rows:
        base = {e.name: e for e in r["entries"]}[BASELINE]
        out.append(f"| {r['width']} | {r['depth']} | {r['batch']} | {_ms(base.med('wall'))} | "
                   + " | ".join(cell(r, n, "wall", False) for n in others) + " |")
    out += ["", "Log-log slope of seconds per step against the network's forward FLOPs "
            "(least squares over the sizes; 1 = cost proportional to the network's arithmetic; "
            "'ratio slope' = the solver's slope minus Adam's: > 0 means its ratio to Adam grows "
            "with size):", "",
            "| solver | slope (cpu) | slope (wall) | ratio slope (cpu) |", "|---|---|---|---|"]
    slopes: dict[str, dict[str, float]] = {}
    for n in names:
        sl = {}
        for which in ("cpu", "wall"):
            pts = [(r["forward_flops"], {e.name: e for e in r["entries"]}[n].med(which))
                   for r in rows]
            pts = [(f, s) for f, s in pts if math.isfinite(s) and s > 0]
            sl[which] = (float(np.polyfit(np.log([p[0] for p in pts]),
                                          np.log([p[1] for p in pts]), 1)[0])
                         if len({p[0] for p in pts}) >= 2 else math.nan)
        slopes[n] = sl
    for n in names:
        rs = slopes[n]["cpu"] - slopes[_base_of(n)]["cpu"]
        out.append(f"| {n} | {slopes[n]['cpu']:.2f} | {slopes[n]['wall']:.2f} | {rs:+.2f} |")
    out.append("")
    results["sweep"] = dict(load_before=la0, load_after=la1, slopes=slopes, sizes=[
        {k: v for k, v in r.items() if k != "entries"}
        | {"solvers": entry_rows(r["entries"], {e.name: e for e in r["entries"]}[BASELINE])[1]}
        for r in rows])
    print("\n".join(out), flush=True)
    return out


# ----------------------------------------------------------------------------- main
def _provenance(pkg: Any = ocnet) -> dict[str, Any]:
    root = Path(pkg.__file__).resolve().parents[1]
    info: dict[str, Any] = {"ocnet": str(Path(pkg.__file__).resolve())}
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or "n/a"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "ocnet"],
            capture_output=True, text=True, timeout=10).stdout
        info["modified_files_in_ocnet"] = len([ln for ln in dirty.splitlines() if ln.strip()])
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "n/a"
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated solvers (Adam, the baseline, is always run)")
    ap.add_argument("--networks", help="comma-separated: mlp, cnn, resnet20 (resnetN: N "
                    "blocks), novas, or none (default: mlp,cnn,resnet20,novas; --quick: "
                    "mlp,resnet2,novas)")
    ap.add_argument("--sweep", choices=("none", "issue", "full", "quick"),
                    help="scaling sweep sizes (default full; --quick: quick)")
    ap.add_argument("--steps", type=int, help="timed steps per solver (default 30; quick 2)")
    ap.add_argument("--warmup", type=int, help="untimed first rounds (default 3; quick 1)")
    ap.add_argument("--sweep-steps", type=int, help="timed steps per size (default 6; quick 2)")
    ap.add_argument("--sweep-warmup", type=int, default=1, help="untimed rounds per size "
                    "(default 1)")
    ap.add_argument("--batch", type=int, default=32, help="DIGITS batch size (default 32)")
    ap.add_argument("--quick", action="store_true", help="tiny configuration for CI (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--max-step-seconds", type=float, help="drop a solver whose step takes "
                    "longer (default 60; quick 10; 0: no limit)")
    ap.add_argument("--versus", type=Path, metavar="TREE", help="also time the solvers of the "
                    "ocnet source tree TREE (e.g. a git worktree of the old commit), interleaved "
                    "with the current ones in the same process: rows 'NAME@versus' and a column "
                    "'cpu / versus' (current over TREE: median of the per-round ratios)")
    ap.add_argument("--compile", action="store_true", help="also time each solver's compiled "
                    "path (compile=True; rows 'NAME+compile') on the networks")
    ap.add_argument("--out", type=Path, help="write the tables to FILE.md and JSON to FILE.json")
    args = ap.parse_args(argv)
    q = args.quick
    args.networks = args.networks or ("mlp,resnet2,novas" if q else "mlp,cnn,resnet20,novas")
    args.sweep = args.sweep or ("quick" if q else "full")
    args.steps = args.steps if args.steps is not None else (2 if q else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.sweep_steps = args.sweep_steps if args.sweep_steps is not None else (2 if q else 6)
    if args.max_step_seconds is None:
        args.max_step_seconds = 10.0 if q else 60.0
    if args.steps < 1 or args.warmup < 0 or args.sweep_steps < 1 or args.sweep_warmup < 0:
        ap.error("need --steps >= 1, --sweep-steps >= 1, --warmup >= 0, --sweep-warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    solvers = selected_solvers(args.only)
    t0 = time.perf_counter()
    prov = _provenance()
    args.versus_tree = load_versus(args.versus) if args.versus else None
    if args.versus_tree is not None:
        prov["versus"] = _provenance(args.versus_tree.pkg)
    cmd = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        "# Solver speed: seconds per step against Adam", "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- command: `{cmd.strip()}`",
        f"- ocnet: `{prov['ocnet']}` (commit {prov.get('commit', 'n/a')}, "
        f"{prov.get('modified_files_in_ocnet', 'n/a')} modified files under ocnet/)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {args.threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"),
        f"- solvers: {', '.join(solvers)}",
        *([f"- versus: `{prov['versus']['ocnet']}` (commit {prov['versus'].get('commit')}, "
           f"{prov['versus'].get('modified_files_in_ocnet')} modified files under ocnet/), "
           "its solvers in the rows NAME@versus, stepped in turn with the current ones"]
          if "versus" in prov else []),
        f"- load average at start (1/5/15 min): {loadavg()} on {os.cpu_count()} CPUs",
        "",
        "cpu = thread CPU time, wall = elapsed" + (" (CUDA events)" if device.type == "cuda"
                                                    else "") + "; floor = counted matmul/conv "
        "FLOPs of one step over one Adam step's; cpu ratio / floor = how far above its "
        "arithmetic the solver runs; peak MiB = extra memory of one step.", "",
    ]
    print("\n".join(header), flush=True)
    results: dict[str, Any] = dict(args={k: str(v) for k, v in vars(args).items()
                                         if k != "versus_tree"},
                                   provenance=prov, device=str(device), solvers=solvers)
    out = list(header)

    def save(final: bool) -> None:  # after every section, so a cut-short run keeps its tables
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out + ([] if final else ["(run in progress)", ""])))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))

    nets = [n for n in args.networks.split(",") if n and n != "none"]
    if any(n != "novas" for n in nets):
        out += section_networks(args, solvers, device, results)
        save(False)
    if "novas" in nets:
        out += section_novas(args, device, results)
        save(False)
    if args.sweep != "none":
        out += section_sweep(args, solvers, device, results)
    elapsed = time.perf_counter() - t0
    out += [f"Total {elapsed:.0f} s; load average at the end: {loadavg()}", ""]
    results["seconds"], results["load_end"] = elapsed, loadavg()
    log(f"done in {elapsed:.0f} s")
    save(True)
    if args.out is not None:
        log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main()
