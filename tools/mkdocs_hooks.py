"""mkdocs hooks (``hooks:`` in mkdocs.yml): the course notebooks and offline math.

* **Notebooks.** ``notebooks/NN_*.py`` (jupytext percent files, kept outside ``docs/``) are
  added to the site's files as ``notebooks/NN_*.py`` before mkdocs-jupyter looks for them,
  so the plugin renders them as pages (executed when ``OCNET_DOCS_EXECUTE=true``).
* **Math without a network.** MathJax 3 is shipped inside the site: its files are taken
  at build time from an installed Python package (``django-static-mathjax``, MathJax 3.2.2
  under the Apache-2.0 licence; no Django needed) or from ``$OCNET_MATHJAX_DIR`` (any
  MathJax 3 ``es5`` folder, e.g. from ``npm pack mathjax@3``), and written to
  ``javascripts/mathjax/``. The CDN script that nbconvert's template puts on notebook pages
  (MathJax 2 with its own configuration) is removed, so one local MathJax typesets every
  page (``docs/javascripts/mathjax.js`` configures it).

A build without a MathJax source fails with the cause and both fixes.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
#: where the MathJax files land in the site (mkdocs.yml's extra_javascript names the entry)
MATHJAX_DEST = "javascripts/mathjax"
MATHJAX_ENTRY = "tex-mml-chtml.js"
#: parts of MathJax's es5 folder the CHTML output needs (not the speech engine, not SVG)
MATHJAX_PARTS = ("input/tex/extensions", "output/chtml", "ui", "a11y")
#: the block nbconvert's base/mathjax.html.j2 macro writes (a CDN MathJax 2 + its config)
_NB_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->",
                         re.S)


def mathjax_dir() -> Path:
    """The MathJax 3 ``es5`` folder to ship: ``$OCNET_MATHJAX_DIR`` or the Python package."""
    env = os.environ.get("OCNET_MATHJAX_DIR")
    candidates = [Path(env)] if env else []
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "static" / "mathjax" / "es5")
    for c in candidates:
        if (c / MATHJAX_ENTRY).is_file():
            return c
    raise PluginError(
        "the docs ship their own MathJax (the site must render math offline), but no MathJax "
        f"3 was found (looked in: {', '.join(map(str, candidates)) or 'nothing'}). Fix: "
        "pip install -e '.[docs]' (it brings django-static-mathjax), or point "
        "OCNET_MATHJAX_DIR at a MathJax 3 'es5' folder (e.g. from `npm pack mathjax@3`)."
    )


def _static(src_dir: Path, rel: str, config: MkDocsConfig, dest: str | None = None) -> File:
    return File(rel, str(src_dir), config["site_dir"], config["use_directory_urls"],
                dest_uri=dest)


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns notebooks into pages
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")):
        files.append(File(f"notebooks/{nb.name}", str(ROOT), config["site_dir"],
                          config["use_directory_urls"]))
    es5 = mathjax_dir()
    rels = [MATHJAX_ENTRY] + [p.relative_to(es5).as_posix() for part in MATHJAX_PARTS
                              for p in sorted((es5 / part).rglob("*")) if p.is_file()]
    for rel in rels:
        files.append(_static(es5, rel, config, dest=f"{MATHJAX_DEST}/{rel}"))
    licence = es5.parent / "LICENSE"
    if licence.is_file():
        files.append(_static(es5.parent, "LICENSE", config, dest=f"{MATHJAX_DEST}/LICENSE"))
    return files


def on_post_page(output: str, page: Page, config: MkDocsConfig) -> str:
    """Drop the CDN MathJax of notebook pages (the site's own MathJax typesets them)."""
    if page.file.src_uri.startswith("notebooks/"):
        output = _NB_MATHJAX.sub("", output)
    return output
