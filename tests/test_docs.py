"""The documentation site: a strict build, offline math, and a real browser.

* ``mkdocs build --strict`` (broken links, unknown pages in the nav, docstring errors in
  the API reference all fail it); the docs extras are part of ``make test``'s environment,
  so a missing one is a failure here, never a skip.
* The built site needs no network: MathJax is shipped inside it, no page loads a script,
  stylesheet, font or image from another host, and every internal link resolves.
* Headless Chromium (``tools/docs_check.py``; Debian's ``chromium``) opens a few pages
  from a 127.0.0.1 server with the network cut off and finds every formula typeset, every
  image loaded and no console error; the checker itself is shown to catch each kind of
  fault on a small broken site. Only this browser part skips, with its reason, where no
  Chromium is installed; ``make docs-check`` (every page, notebooks executed) fails there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ocnet_docs_check", ROOT / "tools" / "docs_check.py")
docs_check = importlib.util.module_from_spec(_spec)
sys.modules["ocnet_docs_check"] = docs_check
_spec.loader.exec_module(docs_check)

EXTRAS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter",
          "mathjax")
BROWSER = docs_check.find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on this machine (apt-get install -y chromium); "
    "the browser check runs in `make docs-check`, which fails without one")
#: pages the default test run opens (make docs-check opens all of them)
SAMPLE = ["", "optimal_control/", "course/", "notebooks/02_backprop_is_pmp/", "api/solvers/"]


def _missing(name: str) -> bool:
    top = name.split(".")[0]
    return importlib.util.find_spec(top) is None or (
        "." in name and importlib.util.find_spec(name) is None)


def test_docs_extras_are_installed():
    missing = [m for m in EXTRAS if _missing(m)]
    assert not missing, (f"docs extras missing ({', '.join(missing)}): pip install -e '.[docs]' "
                         "(make test installs them)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OCNET_DOCS_EXECUTE": "false"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_mkdocs_build_strict(site):
    assert (site / "index.html").exists()
    api = (site / "api" / "solvers" / "index.html").read_text()
    assert "make_solver" in api  # the API reference was generated from the docstrings
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        page = site / "notebooks" / nb.stem / "index.html"
        assert page.exists(), f"the notebook {nb.name} has no page"
        assert "jupyter-wrapper" in page.read_text()


def test_site_carries_its_own_math_and_needs_no_network(site):
    mj = site / "javascripts" / "mathjax"
    assert (mj / "tex-mml-chtml.js").stat().st_size > 500_000
    assert list((mj / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (mj / "LICENSE").exists()
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert "cdn.jsdelivr" not in text and "cdnjs.cloudflare.com/ajax/libs/mathjax" not in text
        assert "fonts.googleapis" not in text, f"{page} loads web fonts"
    problems, _ = docs_check.static_check(site)
    assert not problems, "\n".join(problems)


def test_every_nav_page_exists():
    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s*([\w/.-]+\.(?:md|py))\s*$", text, flags=re.M)
    assert "index.md" in pages
    missing = [p for p in pages if not ((ROOT / "docs" / p).exists() or (ROOT / p).exists())]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
    listed = {p for p in pages if p.startswith("notebooks/")}
    course = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py")}
    assert listed == course, "every notebook is in the nav, and only those"


def test_static_check_finds_external_resources_and_broken_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "index.html").write_text(
        '<html><body id="top"><script src="https://cdn.example.org/x.js"></script>'
        '<a href="a/">ok</a><a href="missing/">broken</a><a href="a/#nowhere">anchor</a>'
        '<a href="#top">self</a><img src="img.png"><a href="https://example.org">ext</a>'
        '</body></html>')
    (tmp_path / "a" / "index.html").write_text('<html><body><h1 id="here">A</h1></body></html>')
    problems, external = docs_check.static_check(tmp_path)
    text = "\n".join(problems)
    assert "cdn.example.org" in text and "broken link missing/" in text
    assert "a/#nowhere" in text and "img.png does not exist" in text
    assert "#top" not in text and external == 1 and len(problems) == 4


@needs_browser
def test_sample_pages_pass_in_headless_chromium(site, tmp_path):
    problems, records = docs_check.check_pages(site, BROWSER, tmp_path, log=lambda *a: None,
                                               pages=SAMPLE)
    assert not problems, "\n".join(problems)
    assert len(records) == len(SAMPLE)
    by_page = {r["page"]: r for r in records}
    assert by_page["/optimal_control/"]["formulas"] > 50     # typeset by the local MathJax
    assert by_page["/notebooks/02_backprop_is_pmp/"]["formulas"] > 10
    assert (tmp_path / "home.png").stat().st_size > 10_000
    assert (tmp_path / "theory.png").stat().st_size > 10_000


@needs_browser
def test_the_browser_check_catches_each_fault(site, tmp_path):
    """A copy of the site with one broken page per fault: every fault is reported."""
    import shutil

    bad = tmp_path / "site"
    shutil.copytree(site / "javascripts", bad / "javascripts")
    head = ('<html><head><script>window.document$ = {subscribe() {}};</script>'
            '<script src="/javascripts/mathjax.js"></script>'
            '<script src="/javascripts/mathjax/tex-mml-chtml.js"></script></head><body>')
    pages = {  # (the theme's elements all have classes: MathJax reads only arithmatex)
        "rawtex": r'<article class="md-content"><p>left: $\frac{a}{b}$ and \(x\)</p></article>',
        "teXerror": r'<article><span class="arithmatex">\(\frac{a}\)</span></article>',
        "image": '<article><img src="nothere.png"></article>',
        "console": '<article><script>console.error("boom")</script></article>',
        "network": '<article><img src="http://example.org/pixel.png"></article>',
        "good": r'<article><span class="arithmatex">\(x^2\)</span></article>',
    }
    for name, body in pages.items():
        (bad / name).mkdir(parents=True)
        (bad / name / "index.html").write_text(head + body + "</body></html>")
    problems, _ = docs_check.check_pages(bad, BROWSER, None, log=lambda *a: None,
                                         pages=[f"{n}/" for n in pages])
    text = "\n".join(problems)
    assert "/rawtex/: raw TeX" in text
    assert "/teXerror/: TeX error" in text
    assert "/image/: broken image" in text
    assert "/console/: console error: boom" in text
    assert "/network/: request leaves the machine: http://example.org/pixel.png" in text
    assert "/good/" not in text
