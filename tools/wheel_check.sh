#!/usr/bin/env bash
# Install ocnet as users do and use it there (`make wheel-check`):
#   1. build the wheel and the sdist (python -m build),
#   2. install the wheel into a fresh virtual environment outside the checkout (no system
#      site packages; pip takes torch from the local wheel folder/cache as `make setup` does),
#   3. from a directory outside the checkout run `ocnet demo --quick`, one course notebook
#      (as the script a percent-format notebook is) and the README's Python example.
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0),
# WHEEL_CHECK_DIR (default $TMPDIR/ocnet-wheel-check, outside the checkout; the venv is
# kept there for a faster re-run).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="${WHEEL_CHECK_DIR:-${TMPDIR:-/tmp}/ocnet-wheel-check}"
BUILD_PY="${BUILD_PY:-$ROOT/.venv/bin/python}"   # has `build` (the dev extra)
[ -x "$BUILD_PY" ] || BUILD_PY="$PYTHON"
NOTEBOOK="${NOTEBOOK:-02_backprop_is_pmp}"

step() { printf '\n== %s\n' "$*"; }
case "$WORK" in "$ROOT"|"$ROOT"/*|/) echo "WHEEL_CHECK_DIR=$WORK must be outside the checkout" >&2; exit 2;; esac
rm -rf "$WORK/dist" "$WORK/run"
mkdir -p "$WORK/dist" "$WORK/run"

step "python -m build (wheel + sdist)"
"$BUILD_PY" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/ocnet-*.whl)"
SDIST="$(ls "$WORK"/dist/ocnet-*.tar.gz)"
"$BUILD_PY" - "$WHEEL" "$SDIST" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
tops = sorted({n.split("/")[0] for n in names})
assert all(t == "ocnet" or t.endswith(".dist-info") for t in tops), tops
assert "ocnet/solvers/ddp.py" in names and any(n.endswith("entry_points.txt") for n in names)
members = tarfile.open(sdist).getnames()
for need in ("pyproject.toml", "README.md", "ocnet/__init__.py", "notebooks/02_backprop_is_pmp.py",
             "CITATION.cff", "CHANGELOG.md"):
    assert any(m.endswith("/" + need) for m in members), f"the sdist lacks {need}"
print(f"wheel: {len(names)} files, top level {tops}; sdist: {len(members)} members")
PY

step "a fresh venv outside the checkout: $WORK/venv"
if [ ! -x "$WORK/venv/bin/python" ]; then "$PYTHON" -m venv "$WORK/venv"; fi
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VPY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL" 2>&1 | grep -v "is ignored" || true
"$VPY" -m pip install --quiet "$TORCH_SPEC" "$WHEEL" 2>&1 | grep -v "is ignored" || true
cd "$WORK/run"   # nothing of the checkout is importable from here
"$VPY" - "$ROOT" <<'PY'
import os, sys, ocnet
here, root = os.path.realpath(ocnet.__file__), os.path.realpath(sys.argv[1])
print(f"ocnet {ocnet.__version__} from {here}")
assert "site-packages" in here and not here.startswith(root + os.sep), here
PY
test -x "$WORK/venv/bin/ocnet"

step "ocnet demo --quick"
start=$SECONDS
OMP_NUM_THREADS=1 MPLBACKEND=Agg "$WORK/venv/bin/ocnet" demo --quick --no-progress --out demo \
  > demo.log 2>&1 || { tail -40 demo.log; exit 1; }
tail -15 demo.log
ls demo | head -20
echo "(demo: $((SECONDS - start)) s)"

step "notebook $NOTEBOOK, run top to bottom as a script"
cp "$ROOT/notebooks/$NOTEBOOK.py" .
start=$SECONDS
OMP_NUM_THREADS=1 MPLBACKEND=Agg "$VPY" -W ignore::UserWarning "$NOTEBOOK.py"
echo "(notebook: $((SECONDS - start)) s)"

step "the README's Python example"
"$VPY" - "$ROOT/README.md" > readme_example.py <<'PY'
import re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1]).read(), flags=re.S)
assert blocks, "README.md has no python example"
# the first block trains; the second inspects the trained problem (it uses its x, y)
print("\n".join(blocks[:2]))
print('print(f"README example: loss {float(info.loss.detach()):.4f}, '
      '{len(traj.xs)} states, {len(grads)} stages of gradients, H = {float(H.detach()):.4g}")')
PY
start=$SECONDS
OMP_NUM_THREADS=1 "$VPY" readme_example.py
echo "(README example: $((SECONDS - start)) s)"

step "wheel-check passed: $(basename "$WHEEL"), $(basename "$SDIST")"
