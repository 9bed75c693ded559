"""Exact DDPNOpt against the fast (outer-product) model, and how often caps bind (issue 14).

DIGITS FCN protocol (``ocnet.data.load("digits")``, ``build_model("mlp", 64, 10, width=32,
depth=4, activation="tanh")`` = 64-32-32-32-32-10, batch 32, cross-entropy):

(a) fast vs exact on the same step. The network is trained with the exact model
    (``vxx="exact"``, its defaults). At every ``--every``-th step, from the same state
    (deep copies of the problem and of the base optimizer's state), one step of each model
    is taken; per feedback layer t (stage 0 gets none) the applied feedback
    f = gamma_t d_t of the fast model (its defaults: gain 1, vxx_reg 0, trust 0.3; the old
    defaults gain auto, vxx_reg 1, trust 0.3; and
    the literal policy gain 1, vxx_reg 0, trust 0) is compared with the exact one:
    cos(f_fast, f_exact) and |f_fast| / |f_exact|. Both apply the same base step k.
(b) caps and clips at the defaults: the fraction of feedback stage-steps where the trust
    cap bound (``cap_rate``) and where the auto gain was clipped at 0 or gain_max
    (``clip_rate``), over 60 steps, Adam 1e-3 / 1e-2 and SGD 0.5, for the fast defaults
    and the exact defaults (no cap, gain 1), with the exact model's smallest eigenvalue
    of Vhat_xx and the CPU seconds per step relative to Adam's.

    OMP_NUM_THREADS=1 nice python benchmarks/ddpnopt_exact.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ocnet import data
from ocnet.bridge import to_problem
from ocnet.models import build_model
from ocnet.ocp import Problem
from ocnet.solvers.base import make_solver
from ocnet.solvers.ddpnopt import DDPNOpt

FAST = {"fast default": {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.3},
        "fast old default": {"gain": "auto", "vxx_reg": 1.0, "trust": 0.3},
        "fast literal": {"gain": 1.0, "vxx_reg": 0.0, "trust": 0.0}}
CONFIGS = [("adam", 1e-3), ("adam", 1e-2), ("sgd", 0.5)]


def make_problem(seed: int, depth: int) -> Problem:
    """The DIGITS FCN: ``depth`` hidden tanh layers of width 32."""
    torch.manual_seed(seed)
    return to_problem(build_model("mlp", 64, 10, width=32, depth=depth, activation="tanh"),
                      "cross_entropy")


def stream(seed: int, batch: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of the DIGITS training split, epoch after epoch (seeded)."""
    ds = data.load("digits", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from data.batches(ds.x_train, ds.y_train, batch, generator=gen)


def feedback_of(solver: DDPNOpt) -> dict[int, torch.Tensor]:
    """The applied feedback gamma_t d_t per stage of the solver's last step (flat)."""
    return {r["t"]: torch.cat([(r["gamma"] * v).reshape(-1) for v in r["d"]])
            for r in solver.last_debug}


def compare_step(problem: Problem, solver: DDPNOpt, x: torch.Tensor, y: torch.Tensor
                 ) -> dict[str, dict[int, tuple[float, float]]]:
    """One step of the exact solver (it trains on) and, from the same state, of each fast
    variant (on copies): {variant: {t: (cosine, |f_fast| / |f_exact|)}}."""
    fast = {}
    for name, opts in FAST.items():
        p = copy.deepcopy(problem)
        s = DDPNOpt(p, lr=solver.lr, base=solver.base, vxx="outer", **opts)
        s.load_state_dict(copy.deepcopy(solver.state_dict()))
        s.debug = True
        s.step(x, y)
        fast[name] = feedback_of(s)
    solver.debug = True
    solver.step(x, y)
    solver.debug = False
    exact = feedback_of(solver)
    out: dict[str, dict[int, tuple[float, float]]] = {"exact vs k": {}}
    for r in solver.last_debug:  # |f_exact| / |k|: the exact feedback against the base step
        k = torch.cat([v.reshape(-1) for v in r["k"]])
        out["exact vs k"][r["t"]] = (float("nan"), float(exact[r["t"]].norm() / k.norm()))
    for name, fb in fast.items():
        out[name] = {}
        for t, fe in exact.items():
            ff = fb[t]
            ne, nf = float(fe.norm()), float(ff.norm())
            cos = float(ff @ fe) / (nf * ne) if nf > 0 and ne > 0 else float("nan")
            out[name][t] = (cos, nf / ne if ne > 0 else float("nan"))
    return out


def part_a(args: argparse.Namespace, lines: list[str]) -> None:
    steps, every = (4, 2) if args.quick else (args.steps, args.every)
    configs = [("adam", 1e-2)] if args.quick else CONFIGS
    lines.append("## (a) Fast vs exact feedback on the same step\n")
    lines.append(
        f"DIGITS FCN 64-{'-'.join(['32'] * args.depth)}-10 tanh, batch 32, seed {args.seed}; "
        f"trained with the exact model at its defaults (gain 1, vxx_reg "
        f"{DDPNOpt(make_problem(0, args.depth), vxx='exact').vxx_reg:g}, vx=backprop, "
        "c_B=1/B, exact terminal Hessian, no cap); every "
        f"{every} steps both models step from the same state. Cell: cosine / norm ratio "
        "|f_fast|/|f_exact| of the applied feedback gamma d of layer t (stage 0 gets none). "
        "The fast model's dx comes from its own cascade (each model's feedback changes "
        "the states the later layers see).\n")
    for base, lr in configs:
        problem = make_problem(args.seed, args.depth)
        solver = make_solver("ddpnopt", problem, base=base, lr=lr, vxx="exact")
        batches = stream(args.seed)
        rows: dict[str, list[tuple[int, dict[int, tuple[float, float]]]]] = {n: [] for n in FAST}
        kref: list[tuple[int, dict[int, tuple[float, float]]]] = []
        for step in range(steps):
            x, y = next(batches)
            if step % every == 0 or step == steps - 1:
                res = compare_step(problem, solver, x, y)
                for name in FAST:
                    rows[name].append((step, res[name]))
                kref.append((step, res["exact vs k"]))
            else:
                solver.step(x, y)
        layers = sorted(rows["fast default"][0][1])
        ratio = {t: statistics.median(r[t][1] for _, r in kref) for t in layers}
        lines.append(f"**{base} lr {lr:g}**: size of the exact feedback, median over the "
                     "logged steps of |f_exact| / |k| per layer: " + ", ".join(
                         f"layer {t}: {ratio[t]:.3g}" for t in layers) + "\n")
        for name in FAST:
            desc = ", ".join(f"{k} {v}" for k, v in FAST[name].items())
            lines.append(f"**{base} lr {lr:g}, {name}** ({desc})\n")
            lines.append("| step | " + " | ".join(f"layer {t}" for t in layers) + " |")
            lines.append("|---" * (len(layers) + 1) + "|")
            for step, res in rows[name]:
                lines.append(f"| {step} | " + " | ".join(
                    f"{res[t][0]:.3f} / {res[t][1]:.3g}" for t in layers) + " |")
            cells = []
            for t in layers:
                cs = [r[t][0] for _, r in rows[name] if math.isfinite(r[t][0])]
                rs = [r[t][1] for _, r in rows[name] if math.isfinite(r[t][1])]
                cells.append(f"**{statistics.mean(cs):.3f} / {statistics.median(rs):.3g}**"
                             if cs and rs else "—")
            lines.append("| mean cos / median ratio | " + " | ".join(cells) + " |\n")
            log(f"(a) {base} {lr:g} {name}: " + " ".join(cells))


def part_b(args: argparse.Namespace, lines: list[str]) -> None:
    steps = 4 if args.quick else args.cap_steps
    configs = [("adam", 1e-2)] if args.quick else CONFIGS
    depths = [args.depth] if args.quick else sorted({args.depth, 3})
    lines.append("## (b) How often caps and clips bind at the defaults\n")
    lines.append(
        f"{steps} steps, batch 32, seed {args.seed}; rates are fractions of the feedback "
        "stage-steps (count in brackets): cap_rate = the trust cap |gamma d| <= trust |k| "
        "bound, clip_rate = the auto gain was clipped at 0 or gain_max. Exact: its defaults "
        "(no cap, gain 1, so both are 0 by construction); min eig = the smallest eigenvalue "
        "of Vhat_xx over the stages t >= 1, samples and steps; final loss = mean batch loss "
        "of the last 10 steps. CPU s/step relative to the base's (median), "
        "steps interleaved on the same batches.\n")
    lines.append("| net | base, lr | model | cap_rate | clip_rate | final loss | "
                 "min eig Vhat_xx | CPU s/step vs Adam |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for depth in depths:
        for base, lr in configs:
            problems = {m: make_problem(args.seed, depth) for m in ("adam", "fast", "exact")}
            solvers = {"adam": make_solver(base, problems["adam"], lr=lr),
                       "fast": make_solver("ddpnopt", problems["fast"], base=base, lr=lr),
                       "exact": make_solver("ddpnopt", problems["exact"], base=base, lr=lr,
                                            vxx="exact")}
            caps: dict[str, list[float]] = {"fast": [], "exact": []}
            clips: dict[str, list[float]] = {"fast": [], "exact": []}
            cpu: dict[str, list[float]] = {m: [] for m in solvers}
            loss: dict[str, list[float]] = {}
            eig = math.inf
            batches = stream(args.seed)
            for _ in range(steps):
                x, y = next(batches)
                for m, s in solvers.items():
                    c0 = time.process_time()
                    info = s.step(x, y)
                    cpu[m].append(time.process_time() - c0)
                    loss.setdefault(m, []).append(float(info.loss))
                    if m != "adam":
                        caps[m].append(float(info.extra["cap_rate"]))
                        clips[m].append(float(info.extra["clip_rate"]))
                    if m == "exact":
                        eig = min(eig, float(info.extra["vxx_min_eig"][1:].min()))
            per = depth  # feedback stages per step: depth + 1 layers, stage 0 gets none
            t_adam = statistics.median(cpu["adam"])
            net = f"64-{'-'.join(['32'] * depth)}-10"
            for m in ("fast", "exact"):
                cap, clip = statistics.mean(caps[m]), statistics.mean(clips[m])
                n = per * steps
                final = statistics.mean(loss[m][-10:])
                eig_cell = f"{eig:.3g}" if m == "exact" else "—"
                lines.append(
                    f"| {net} | {base} {lr:g} | {m} default | {cap:.3f} ({round(cap * n)}/{n})"
                    f" | {clip:.3f} ({round(clip * n)}/{n}) | {final:.3f} | {eig_cell} | "
                    f"{statistics.median(cpu[m]) / t_adam:.2f} |")
                log(f"(b) {net} {base} {lr:g} {m}: cap {cap:.3f} clip {clip:.3f} "
                    f"loss {final:.3f}")
            lines.append(f"| {net} | {base} {lr:g} | base ({base}) | — | — | "
                         f"{statistics.mean(loss['adam'][-10:]):.3f} | — | 1.00 |")
    lines.append("")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (a few seconds)")
    ap.add_argument("--steps", type=int, default=60, help="(a) training steps")
    ap.add_argument("--every", type=int, default=10, help="(a) compare every N steps")
    ap.add_argument("--cap-steps", type=int, default=60, help="(b) steps per configuration")
    ap.add_argument("--depth", type=int, default=4, help="hidden layers (4: 64-32x4-10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddpnopt_exact.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = ["# Exact DDPNOpt vs the fast model; caps at the defaults\n",
             f"`python benchmarks/ddpnopt_exact.py{' --quick' if args.quick else ''}` "
             f"({datetime.date.today()}, torch {torch.__version__}, CPU, float32).\n"]
    part_a(args, lines)
    part_b(args, lines)
    lines.append(f"Run time: {time.perf_counter() - start:.0f} s.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    log(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
