"""Run every example (smoke mode by default) and collect the figures they write.

    OMP_NUM_THREADS=1 python examples/run_all.py                 # smoke runs (CI)
    OMP_NUM_THREADS=1 python examples/run_all.py --full --figures docs/figures
    python examples/run_all.py --only 04_msa_divergence,08_exact_optimum

Each example runs as its own process (``sys.executable``) with its working directory set
to ``--out/<example>``, so figures it writes next to itself land there too; every PNG it
writes is then copied to ``--figures`` as ``<example>__<name>.png`` (the docs gallery uses
these names). Examples the table below does not know yet run without arguments and with the
environment variable ``OCNET_SMOKE=1`` in smoke mode (the convention in examples/README.md).
Exit status 1 if any example fails; a markdown summary is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: example stem -> (smoke arguments, full arguments); ``{out}`` is the example's directory
ARGS: dict[str, tuple[list[str], list[str]]] = {
    "01_network_as_control_system": (["--smoke"], []),
    "02_backprop_is_pmp": (["--smoke", "--out", "{out}"], ["--out", "{out}"]),
    "03_ddpnopt_digits": (["--smoke", "--out", "{out}"], ["--out", "{out}"]),
    "05_adaptive_neural_ode": (["--smoke", "--out", "{out}"], ["--out", "{out}"]),
    "08_exact_optimum": (["--quick", "--out", "{out}"], ["--out", "{out}"]),
    "06_goal_oriented_momentum": (["--epochs", "2", "--out", "{out}"], ["--out", "{out}"]),
    "04_msa_divergence": (["--iters", "5", "--out", "{out}/msa_divergence.png"],
                       ["--out", "{out}/msa_divergence.png"]),
    "07_novas_control": (["--smoke"], []),
}
#: the gallery order (examples not listed follow in name order): the issue's sequence
ORDER = ["01_network_as_control_system", "02_backprop_is_pmp", "03_ddpnopt_digits",
         "04_msa_divergence", "05_adaptive_neural_ode", "06_goal_oriented_momentum",
         "07_novas_control", "08_exact_optimum"]


def examples(only: list[str] | None = None) -> list[Path]:
    """The example scripts in gallery order (``only``: these stems)."""
    files = {p.stem: p for p in HERE.glob("*.py") if p.stem not in ("run_all", "__init__")}
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER)
    if only:
        unknown = sorted(set(only) - set(files))
        if unknown:
            raise SystemExit(f"unknown examples {unknown}; valid: {', '.join(names)}")
        names = [n for n in names if n in only]
    return [files[n] for n in names]


def command(script: Path, out: Path, smoke: bool) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that runs ``script`` writing into ``out``."""
    smoke_args, full_args = ARGS.get(script.stem, ([], []))
    args = [a.replace("{out}", str(out)) for a in (smoke_args if smoke else full_args)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    if smoke:
        env["OCNET_SMOKE"] = "1"
    repo = str(HERE.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, str(script), *args], env


def run(script: Path, out: Path, smoke: bool = True, timeout: float = 300.0,
        ) -> dict[str, object]:
    """Run one example; a dict with name, status, seconds, figures and the output's tail."""
    out.mkdir(parents=True, exist_ok=True)
    argv, env = command(script, out, smoke)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True,
                              timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        text, stdout = proc.stdout + proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as err:
        partial = err.stdout or ""
        if isinstance(partial, bytes):  # TimeoutExpired keeps bytes even with text=True
            partial = partial.decode(errors="replace")
        status, text = f"timed out after {timeout:g} s", partial
        stdout = text
    seconds = time.perf_counter() - t0
    figures = sorted(out.rglob("*.png"))
    return {"name": script.stem, "status": status, "seconds": seconds, "figures": figures,
            "output": text[-3000:], "stdout": stdout[-6000:], "argv": argv}


def _doc(script: Path) -> str:
    """The example's module docstring (its description)."""
    import ast

    return ast.get_docstring(ast.parse(script.read_text())) or ""


def write_gallery(results: list[dict[str, object]], page: Path, figures: Path,
                  full: bool) -> Path:
    """A markdown page: per example its docstring, how to run it, and its figures."""
    rel = os.path.relpath(figures, page.parent)
    mode = "full" if full else "smoke (reduced)"
    lines = ["# Examples gallery", "",
             "Every script in `examples/` with the figures it wrote in its last "
             f"{mode} run (`python examples/run_all.py{' --full' if full else ''} "
             "--figures docs/figures --gallery docs/gallery.md` regenerates this page). "
             "Machine: a shared 2-core CPU box.", "",
             "| example | status | seconds |", "|---|---|---|"]
    for r in results:
        lines.append(f"| [{r['name']}](#{r['name']}) | {r['status']} | "
                     f"{r['seconds']:.1f} |")
    lines.append("")
    for r in results:
        script = HERE / f"{r['name']}.py"
        doc = _doc(script)
        lines += [f"## {r['name']}", "", f"`examples/{r['name']}.py`", "",
                  "```text", doc.strip(), "```", ""]
        for fig in r["figures"]:
            name = f"{r['name']}__{fig.name}"
            lines += [f"![{r['name']}: {fig.name}]({rel}/{name})", ""]
        out_lines = [ln for ln in str(r.get("stdout", "")).strip().splitlines()][-25:]
        if out_lines:
            lines += ["Output (last lines):", "", "```text", *out_lines, "```", ""]
        if not r["figures"]:
            lines += ["(This example writes no figure.)", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full runs instead of smoke runs")
    ap.add_argument("--out", type=Path, default=Path("runs/examples_all"),
                    help="working directory; each example gets OUT/<name>")
    ap.add_argument("--figures", type=Path, default=None,
                    help="copy every PNG as <example>__<name>.png into this directory")
    ap.add_argument("--gallery", type=Path, default=None,
                    help="also write this markdown gallery page (needs --figures)")
    ap.add_argument("--only", default=None, help="comma-separated example names")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per example")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    results = []
    for script in examples(only):
        out = (args.out / script.stem).resolve()
        if out.exists():
            shutil.rmtree(out)  # our own working directory: stale figures must not survive
        r = run(script, out, smoke=not args.full, timeout=args.timeout)
        results.append(r)
        print(f"{r['name']:<32} {r['status']:<10} {r['seconds']:6.1f} s  "
              f"{len(r['figures'])} figure(s)", flush=True)
        if r["status"] != "ok":
            print(r["output"], flush=True)
        if args.figures is not None:
            args.figures.mkdir(parents=True, exist_ok=True)
            for fig in r["figures"]:
                shutil.copyfile(fig, args.figures / f"{script.stem}__{fig.name}")
    if args.gallery is not None:
        if args.figures is None:
            raise SystemExit("--gallery needs --figures (the page links the copied PNGs)")
        write_gallery(results, args.gallery, args.figures, full=args.full)
    print("\n| example | status | seconds | figures |\n|---|---|---|---|")
    for r in results:
        figs = ", ".join(f.name for f in r["figures"]) or "-"
        print(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {figs} |")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
