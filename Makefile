# Two commands on a fresh machine: `make demo` and `make test` (the docs build
# `mkdocs build --strict` runs inside the tests, tests/test_docs.py).
# The library leaves torch open (pyproject.toml); the development environment pins it here.
# Override e.g. `make test TORCH_SPEC=torch==2.14.1` or `make test VENV=/tmp/venv`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# pytest workers (pytest-xdist): the suite is independent per test; 2 = this machine's cores
PYTEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ocnet-installed

.PHONY: setup demo test test-slow lint docs examples clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,docs,tensorboard]"
	@touch $(STAMP)

demo: setup
	$(PY) -m ocnet demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check ocnet tests examples benchmarks notebooks tools
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS)

docs: setup
	$(VENV)/bin/mkdocs build --strict

examples: setup
	$(PY) examples/run_all.py

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache build dist

# ---------------------------------------------------------------- docs in a browser, wheel
# `make docs-check`: strict build (notebooks executed), then every page opened in headless
# Chromium (Debian's `chromium`) from a 127.0.0.1 server with the network cut off; fails on
# raw TeX, broken images/links, console errors or any request leaving the machine.
# Screenshots and report.json: build/docs-check/.
.PHONY: docs-check wheel-check
docs-check: setup
	OMP_NUM_THREADS=1 $(PY) tools/docs_check.py --out build/docs-check

# `make wheel-check`: build wheel + sdist, install the wheel into a fresh venv outside the
# checkout, run `ocnet demo --quick`, a notebook and the README's Python example there.
WHEEL_TORCH_SPEC ?= $(TORCH_SPEC)
wheel-check: setup
	TORCH_SPEC="$(WHEEL_TORCH_SPEC)" PYTHON="$(PYTHON)" bash tools/wheel_check.sh
