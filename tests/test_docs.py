"""The documentation site builds with ``mkdocs build --strict`` (broken links, unknown
pages in the nav, docstring errors in the API reference all fail it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
           if importlib.util.find_spec(m.split(".")[0]) is None
           or (m.count(".") and importlib.util.find_spec(m) is None)]


@pytest.mark.skipif(bool(MISSING), reason=f"docs extras not installed ({', '.join(MISSING)}): "
                    "pip install -e '.[docs]'")
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "solvers" / "index.html").read_text()
    assert "make_solver" in api  # the API reference was generated from the docstrings


def test_every_nav_page_exists():
    import re

    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s*([\w/]+\.md)\s*$", text, flags=re.M)
    assert "index.md" in pages
    missing = [p for p in pages if not (ROOT / "docs" / p).exists()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
