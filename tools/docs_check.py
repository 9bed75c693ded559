"""Check the documentation site in a real browser, with no network.

    python tools/docs_check.py                      # build (notebooks executed), then check
    python tools/docs_check.py --site build/site    # check an already built site
    python tools/docs_check.py --no-execute         # build without running the notebooks

1. ``mkdocs build --strict`` (with ``OCNET_DOCS_EXECUTE=true``: the notebook pages carry
   their outputs), unless ``--site`` is given.
2. A static pass over every HTML file: no script, stylesheet, font, image or frame may
   come from another host (the site must work offline), every internal link and image
   must point at a file of the site, and every ``#anchor`` at an id of its page.
3. The site is served from 127.0.0.1 and every page is opened in headless Chromium
   (Debian's ``chromium``; no browser is downloaded) through the DevTools protocol, with
   every other host unreachable (a dead proxy and a resolver that finds nothing). A page
   fails on a request that leaves the machine, a failed or >= 400 response, a console
   error or uncaught exception, an image that did not load, a formula MathJax did not
   typeset (raw TeX such as ``\\(``, ``$$`` or ``\\frac`` left in the text) or typeset
   with an error.
4. Screenshots of the home page, a theory page and a notebook page go to ``--out``.

Exit status 0 when every page passes; the report names each failure and its page.
Needs only the standard library (and mkdocs for the build).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import html.parser
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: pages photographed for review (site-relative directories)
SCREENSHOTS = {"home": "", "theory": "optimal_control/",
               "notebook": "notebooks/02_backprop_is_pmp/"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ----------------------------------------------------------------------------- static pass
class _Refs(html.parser.HTMLParser):
    """Resources (that a browser fetches), links and ids of one HTML page."""

    RESOURCE = {("script", "src"), ("img", "src"), ("source", "src"), ("iframe", "src"),
                ("audio", "src"), ("video", "src"), ("embed", "src"), ("object", "data")}

    def __init__(self) -> None:
        super().__init__()
        self.resources: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        for t, attr in self.RESOURCE:
            if tag == t and a.get(attr):
                self.resources.append(a[attr])
        if tag == "link" and a.get("href"):
            rel = a.get("rel", "").split()
            if {"stylesheet", "icon", "preload", "modulepreload", "manifest"} & set(rel):
                self.resources.append(a["href"])
            elif not {"canonical", "alternate"} & set(rel):
                self.links.append(a["href"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _target(site: Path, page: Path, ref: str) -> tuple[Path | None, str]:
    """The file an internal reference points at (None: external) and its fragment."""
    parts = urllib.parse.urlsplit(ref)
    if parts.scheme or parts.netloc:
        return None, ""
    path = urllib.parse.unquote(parts.path)
    if not path:
        return page, parts.fragment
    base = site if path.startswith("/") else page.parent
    target = (base / path.lstrip("/")).resolve()
    if target.is_dir() or path.endswith("/"):
        target = target / "index.html"
    return target, parts.fragment


def static_check(site: Path) -> tuple[list[str], int]:
    """Problems found without a browser, and the number of external links (not fetched)."""
    problems: list[str] = []
    parsed: dict[Path, _Refs] = {}
    pages = sorted(site.rglob("*.html"))
    for p in pages:
        refs = _Refs()
        refs.feed(p.read_text(encoding="utf-8", errors="replace"))
        parsed[p.resolve()] = refs
    external_links = 0
    for p in pages:
        refs, rel = parsed[p.resolve()], p.relative_to(site).as_posix()
        for r in refs.resources:
            if r.startswith(("data:", "blob:")):
                continue
            target, _ = _target(site, p, r)
            if target is None:
                problems.append(f"{rel}: loads {r} from another host (the site must work "
                                "offline: ship it inside the site)")
            elif not target.exists():
                problems.append(f"{rel}: resource {r} does not exist in the site")
        for r in refs.links:
            if r.startswith(("mailto:", "javascript:", "data:", "tel:")):
                continue
            target, frag = _target(site, p, r)
            if target is None:
                external_links += 1
                continue
            if not target.exists():
                problems.append(f"{rel}: broken link {r}")
            elif frag and target.suffix == ".html":
                ids = parsed.get(target.resolve())
                if ids is not None and urllib.parse.unquote(frag) not in ids.ids:
                    problems.append(f"{rel}: link {r} names an anchor that does not exist")
    return problems, external_links


# ----------------------------------------------------------------------------- the server
class _Quiet(http.server.SimpleHTTPRequestHandler):
    misses: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        type(self).misses.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


@contextlib.contextmanager
def serve(site: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``site`` on 127.0.0.1 (a free port); yields the base URL and the 4xx/5xx list."""
    handler = type("Handler", (_Quiet,), {"misses": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.misses
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- DevTools
class WebSocket:
    """The smallest client the DevTools protocol needs (RFC 6455 text frames, masked)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the websocket: {head[:200]!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str, opcode: int = 1) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server does not mask
            if opcode == 8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode == 9:
                self.send(payload.decode(errors="replace"), opcode=10)
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class DevTools:
    """Commands to one page target, with the events that arrive meanwhile kept in order."""

    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"DevTools did not answer {method} within {timeout:g} s")

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e["method"] == event:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == event:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {event} within {timeout:g} s")


def find_browser() -> str | None:
    """``$CHROMIUM`` or the first Chromium/Chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def browser(binary: str) -> Iterator[str]:
    """Start headless Chromium with the network cut off; yields the DevTools HTTP base."""
    profile = tempfile.mkdtemp(prefix="ocnet-chromium-")
    argv = [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", f"--user-data-dir={profile}",
            # nothing leaves the machine: unknown hosts resolve to nothing, and anything
            # that is not loopback goes to a proxy port where nobody listens
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
            "--disable-features=Translate,OptimizationHints,MediaRouter,"
            "DialMediaRouteProvider,AutofillServerCommunication", "about:blank"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{binary} exited ({proc.returncode}): {err[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{binary} did not open its DevTools port in 60 s")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


#: runs in each page once it has loaded: waits for MathJax and the images, then reports
PAGE_PROBE = r"""
(async () => {
  for (const img of document.images) { if (img.loading === "lazy") img.loading = "eager"; }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
    if (MathJax.typesetPromise) await MathJax.typesetPromise();
  }
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r);
                         setTimeout(r, 10000); })));
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
                                     .map(i => i.getAttribute("src").slice(0, 120));
  const arith = [...document.querySelectorAll(".arithmatex")];
  const untypeset = arith.filter(e => !e.querySelector("mjx-container"))
                         .map(e => e.textContent.slice(0, 80));
  const errors = [...document.querySelectorAll("mjx-merror")]
                   .map(e => (e.getAttribute("data-mjx-error") || e.textContent).slice(0, 120));
  const copy = document.body.cloneNode(true);  // the article, the navigation, the TOC
  copy.querySelectorAll("pre, code, script, style, textarea, mjx-container, .highlight")
      .forEach(e => e.remove());
  const text = copy.textContent;
  const commands = "frac|sum|nabla|partial|begin|mathbb|mathcal|mathrm|tilde|hat|alpha|" +
    "rho|sigma|theta|gamma|approx|top|cdot|le|ge|int|ell|Phi|varepsilon|lambda|delta";
  const pattern = new RegExp("\\\\\\(|\\\\\\[|\\$\\$|\\\\(" + commands + ")(?![a-zA-Z])|" +
                             "\\$[^$\\s][^$\\n]{0,200}\\$", "g");
  const raw = [];
  let m;
  while ((m = pattern.exec(text)) !== null && raw.length < 5) {
    raw.push(text.slice(Math.max(0, m.index - 30), m.index + 50).replace(/\s+/g, " "));
  }
  return JSON.stringify({
    title: document.title, formulas: document.querySelectorAll("mjx-container").length,
    mathjax: !!(window.MathJax && MathJax.version), version: window.MathJax && MathJax.version,
    broken, untypeset, errors, raw, images: document.images.length,
    height: document.documentElement.scrollHeight,
  });
})()
"""


def check_pages(site: Path, binary: str, out: Path | None, log: Any = print,
                pages: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Open every page (or these site-relative ``pages``, e.g. ``"optimal_control/"``);
    problems (each naming its page) and one record per page."""
    if pages is None:
        pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
        pages = [p[: -len("index.html")] if p.endswith("index.html") else p for p in pages]
        pages = [p for p in pages if p != "404.html"]
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    with serve(site) as (base, misses), browser(binary) as devtools:
        with urllib.request.urlopen(f"{devtools}/json/list", timeout=30) as r:  # noqa: S310
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        page_ws = targets[0]["webSocketDebuggerUrl"]
        cdp = DevTools(page_ws)
        for domain in ("Page", "Runtime", "Network", "Log"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                 deviceScaleFactor=1, mobile=False)
        origin = base.rstrip("/")
        for rel in pages:
            url = base + rel
            cdp.events.clear()
            misses.clear()
            t0 = time.perf_counter()
            cdp.call("Page.navigate", url=url)
            cdp.wait_for("Page.loadEventFired", timeout=60)
            res = cdp.call("Runtime.evaluate", expression=PAGE_PROBE, awaitPromise=True,
                           returnByValue=True, timeout=90)
            if "exceptionDetails" in res:
                problems.append(f"/{rel}: the page probe failed: {res['exceptionDetails']}")
                continue
            info = json.loads(res["result"]["value"])
            time.sleep(0.05)
            with contextlib.suppress(TimeoutError, socket.timeout):
                cdp.call("Runtime.evaluate", expression="1", timeout=5)  # flush events
            page_problems = []
            for e in cdp.events:
                m, p = e["method"], e.get("params", {})
                if m == "Network.requestWillBeSent":
                    u = p["request"]["url"]
                    if not (u.startswith(origin) or u.startswith(("data:", "blob:", "about:"))):
                        page_problems.append(f"request leaves the machine: {u[:160]}")
                elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
                    page_problems.append(f"HTTP {p['response']['status']}: "
                                         f"{p['response']['url'][:160]}")
                elif m == "Network.loadingFailed" and not p.get("canceled"):
                    page_problems.append(f"a load failed: {p.get('errorText')}")
                elif m == "Runtime.exceptionThrown":
                    d = p["exceptionDetails"]
                    desc = d.get("exception", {}).get("description") or d.get("text")
                    page_problems.append(f"uncaught exception: {str(desc)[:200]}")
                elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    args = " ".join(str(a.get("value", a.get("description", "")))
                                    for a in p.get("args", []))
                    page_problems.append(f"console error: {args[:200]}")
                elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                    page_problems.append(f"console error: {p['entry'].get('text', '')[:200]} "
                                         f"({p['entry'].get('url', '')[:120]})")
            page_problems += [f"server answered {m}" for m in misses]
            page_problems += [f"broken image: {s}" for s in info["broken"]]
            page_problems += [f"formula not typeset: {s}" for s in info["untypeset"]]
            page_problems += [f"TeX error: {s}" for s in info["errors"]]
            page_problems += [f"raw TeX in the text: ...{s}..." for s in info["raw"]]
            if (info["formulas"] or info["untypeset"]) and not info["mathjax"]:
                page_problems.append("MathJax did not load")
            info.update(page="/" + rel, seconds=round(time.perf_counter() - t0, 2),
                        problems=page_problems)
            records.append(info)
            problems += [f"/{rel}: {p}" for p in dict.fromkeys(page_problems)]
            log(f"{'FAIL' if page_problems else 'ok  '} /{rel:<48} {info['formulas']:4d} "
                f"formulas {info['images']:3d} images  {info['seconds']:.1f} s")
            for name, shot in SCREENSHOTS.items():
                if out is not None and rel == shot:
                    out.mkdir(parents=True, exist_ok=True)
                    height = min(int(info["height"]), 2400)
                    png = cdp.call("Page.captureScreenshot", format="png",
                                   captureBeyondViewport=True,
                                   clip={"x": 0, "y": 0, "width": 1280, "height": height,
                                         "scale": 1})
                    path = out / f"{name}.png"
                    path.write_bytes(base64.b64decode(png["data"]))
                    log(f"     screenshot {path}")
        cdp.ws.close()
    return problems, records


def build(site: Path, execute: bool) -> None:
    env = dict(os.environ, OCNET_DOCS_EXECUTE="true" if execute else "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    print("$", " ".join(cmd), f"(OCNET_DOCS_EXECUTE={env['OCNET_DOCS_EXECUTE']})", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=None, help="check this built site "
                    "(default: build one into build/docs-check/site)")
    ap.add_argument("--no-execute", action="store_true", help="do not run the notebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "docs-check",
                    help="screenshots and report.json go here")
    args = ap.parse_args(argv)
    site = args.site
    if site is None:
        site = args.out / "site"
        if site.exists():
            shutil.rmtree(site)
        build(site, execute=not args.no_execute)
    binary = find_browser()
    if binary is None:
        print("docs-check: no Chromium found (set CHROMIUM or install Debian's: "
              "apt-get install -y chromium)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    problems, external = static_check(site)
    print(f"static pass: {len(list(site.rglob('*.html')))} HTML files, {len(problems)} "
          f"problems, {external} links to other sites (listed, not fetched)")
    browser_problems, records = check_pages(site, binary, args.out)
    problems += browser_problems
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(
        {"problems": problems, "pages": records}, indent=1))
    n_formulas = sum(r["formulas"] for r in records)
    versions = sorted({str(r["version"]) for r in records if r["version"]})
    print(f"{len(records)} pages opened in {Path(binary).name} with the network cut off, "
          f"{n_formulas} formulas typeset by the site's own MathJax {', '.join(versions)}, "
          f"{time.perf_counter() - t0:.0f} s")
    if problems:
        print(f"\n{len(problems)} problems:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("docs-check: every page passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
