"""Convert the course notebooks (jupytext percent ``.py`` files in ``notebooks/``) and run them.

    python tools/notebooks.py                        # run every notebook, print a table
    python tools/notebooks.py --only 02_backprop_is_pmp --out build/notebooks

Each notebook is converted with jupytext into a fresh temporary directory and executed
there with nbclient (the ``python3`` kernel of this interpreter), so it can use nothing
of the checkout but the installed ``ocnet`` package. A failing ``assert`` in a notebook (a
claim it teaches that does not hold) makes the run fail. ``tests/test_notebooks.py`` uses
these functions; ``--out`` keeps the executed ``.ipynb`` files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
#: seconds one notebook may take on the shared 2-core machine (the target is < 30 s)
BUDGET = 30.0


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The notebook sources in course order (``only``: these stems)."""
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    if only:
        unknown = sorted(set(only) - {p.stem for p in found})
        if unknown:
            raise SystemExit(f"unknown notebooks {unknown}; valid: "
                             f"{', '.join(p.stem for p in found)}")
        found = [p for p in found if p.stem in only]
    return found


def to_notebook(source: Path) -> Any:  # an nbformat.NotebookNode
    """The jupytext percent file as a notebook (no outputs)."""
    import jupytext

    return jupytext.read(source, fmt="py:percent")


def execute(source: Path, workdir: Path | None = None, timeout: float = 300.0
            ) -> tuple[Any, float]:
    """Run one notebook top to bottom in ``workdir`` (a new temporary directory by default).

    Returns ``(executed notebook, seconds)``; raises ``nbclient.exceptions.CellExecutionError``
    naming the cell and the error when a cell fails (e.g. a notebook's claim does not hold).
    """
    from nbclient import NotebookClient

    nb = to_notebook(source)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it; models are tiny
    with tempfile.TemporaryDirectory(prefix=f"ocnet-{source.stem}-") as tmp:
        cwd = Path(workdir) if workdir is not None else Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd)}})
        # the kernel inherits the environment: a non-interactive MPLBACKEND (CI sets Agg)
        # would keep the figures out of the notebook, so the kernel gets the inline backend
        saved = os.environ.get("MPLBACKEND")
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        try:
            start = time.perf_counter()
            client.execute()
            return nb, time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("MPLBACKEND", None)
            else:
                os.environ["MPLBACKEND"] = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated notebook stems")
    ap.add_argument("--out", type=Path, default=None, help="keep the executed .ipynb here")
    args = ap.parse_args(argv)
    import nbformat
    from nbclient.exceptions import CellExecutionError

    failed = 0
    print("| notebook | seconds | status |\n|---|---|---|")
    for src in notebooks([s for s in args.only.split(",") if s] or None):
        try:
            nb, seconds = execute(src)
            status = "ok" if seconds <= BUDGET else f"ok, over the {BUDGET:g} s budget"
        except CellExecutionError as err:
            failed += 1
            print(f"| {src.stem} | - | FAILED |\n{err}", file=sys.stderr)
            print(f"| {src.stem} | - | FAILED |")
            continue
        print(f"| {src.stem} | {seconds:.1f} | {status} |", flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.out / f"{src.stem}.ipynb")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
