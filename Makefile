# Two commands on a fresh machine: `make demo` and `make test` (the docs build
# `mkdocs build --strict` runs inside the tests, tests/test_docs.py).
# The library leaves torch open (pyproject.toml); the development environment pins it here.
# Override e.g. `make test TORCH_SPEC=torch==2.14.1` or `make test VENV=/tmp/venv`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ocnet-installed

.PHONY: setup demo test test-slow lint docs examples clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,docs]"
	@touch $(STAMP)

demo: setup
	$(PY) -m ocnet demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check ocnet tests examples benchmarks

test: setup lint
	$(PY) -m pytest -q -m "not slow"

docs: setup
	$(VENV)/bin/mkdocs build --strict

examples: setup
	$(PY) examples/run_all.py

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache build dist
