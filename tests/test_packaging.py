"""Packaging as users meet it: the citation file, the changelog, and (slow) the wheel.

``test_wheel_installs_and_runs_outside_the_checkout`` runs ``tools/wheel_check.sh`` (the
``make wheel-check`` target): build wheel and sdist, install the wheel into a fresh
virtual environment, run ``ocnet demo --quick``, a notebook and the README example there.
It takes minutes, so it is marked slow (``make test-slow``).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.M).group(1)


def test_citation_names_the_project_and_the_seed_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["title"].startswith("ocnet") and cff["authors"] and cff["message"]
    assert str(cff["version"]) == _version()
    titles = " | ".join(r["title"] for r in cff["references"])
    for paper in ("DDPNOpt", "Who Breaks Early", "Layerwise goal-oriented adaptivity",
                  "NOVAS", "Maximum Principle Based Algorithms"):
        assert paper in titles, f"CITATION.cff does not cite {paper}"
    for ref in cff["references"]:
        assert ref["type"] and ref["authors"] and int(ref["year"]) > 2000


def test_changelog_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog") and "## [Unreleased]" in text
    assert f"## [{_version()}]" in text


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = dict(os.environ, WHEEL_CHECK_DIR=str(tmp_path / "wheel-check"), PYTHON="python3")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "wheel_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "wheel-check passed" in proc.stdout
    assert "README example: loss" in proc.stdout
