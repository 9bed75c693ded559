"""The layers of the house: imports only point downward (DESIGN.md, "Layers").

``make lint`` runs the import-linter contract in pyproject.toml (``lint-imports``). These
tests keep the contract honest: every module of ``ocnet`` is in one of its layers, and the
promises the layers make that import-linter cannot see (no data sets below the experiments
layer, no command line inside the library layers) hold.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ocnet"
LIBRARY = ("ocp", "dynamics", "bridge", "neural_ode", "solvers")


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "ocnet"
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract


def _layered_modules() -> list[str]:
    return [m.strip() for layer in _contract()["layers"] for m in layer.replace(":", "|")
            .split("|")]


def _imports(path: Path) -> set[str]:
    """Absolute names of the ocnet modules and top-level packages a file imports."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def test_every_module_of_the_package_is_in_a_layer():
    layered = set(_layered_modules())
    top = {f"ocnet.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__",
                                                                              "__main__")}
    top |= {f"ocnet.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(top - layered)
    assert not missing, f"add {missing} to a layer of [tool.importlinter] in pyproject.toml"
    assert sorted(layered - top) == [], "the contract names modules that do not exist"


def test_the_library_layers_are_in_the_designed_order():
    order = [m for m in _layered_modules() if m.removeprefix("ocnet.") in LIBRARY]
    assert order == [f"ocnet.{m}" for m in reversed(LIBRARY)]
    assert _contract()["layers"][0] == "ocnet.cli"


@pytest.mark.parametrize("sub", LIBRARY)
def test_no_data_sets_and_no_command_line_below_the_experiments_layer(sub):
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        names = _imports(path)
        bad = sorted(n for n in names if n in ("ocnet.data", "click", "sklearn", "mnist1d")
                     or n.startswith(("ocnet.data.", "torch.utils.data", "ocnet.train",
                                      "ocnet.cli")))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: data sets and the command " \
                        "line belong to the experiments layer"
