"""The built documentation site, rendered in a real headless Chromium at 1280 and 1920 px: every page fits its column.

On every page: no code block, table or displayed equation is wider than its column (nothing a reader must scroll
sideways), no asset comes from another host (the site works offline), every equation is typeset (no raw TeX), and
every figure is shown at least at 60 % of its own width (labels drawn at >= 10 px stay readable) and links to its
full-size file. It needs mkdocs (the ``docs`` extra), the ``playwright`` package (``docs`` extra) and Debian's
Chromium (``apt-get install chromium``); it skips without them, unless ``PDMP_REQUIRE_RENDER=1`` (set by CI), where
their absence fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (1280, 1920)
MIN_FIGURE_SCALE = 0.6
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
INSTALL = "pip install -e '.[docs]' and apt-get install chromium"

# what a reader would have to scroll sideways, as a JavaScript function of the page
MEASURE = """() => {
  const wide = (e) => e.scrollWidth > e.clientWidth + 1;
  const text = (e) => (e.innerText || e.textContent || "").trim().slice(0, 60);
  const content = document.querySelector(".md-content") || document.body;
  const out = {overflow: [], raw_tex: [], figures: []};
  for (const e of content.querySelectorAll("pre > code, .md-typeset__scrollwrap, .katex-display")) {
    if (wide(e)) out.overflow.push(`${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth}px in ` +
                                   `${e.clientWidth}px: ${text(e)}`);
  }
  if (content.scrollWidth > content.clientWidth + 1) out.overflow.push(`the page: ${content.scrollWidth}px`);
  for (const e of content.querySelectorAll(".arithmatex")) {
    if (!e.querySelector(".katex")) out.raw_tex.push(text(e));
  }
  for (const img of content.querySelectorAll("img")) {
    const link = img.closest("a");
    out.figures.push({src: img.getAttribute("src"), natural: img.naturalWidth, shown: img.clientWidth,
                      linked: !!link && /\\.(png|svg|jpe?g)$/i.test(link.getAttribute("href") || "")});
  }
  return out;
}"""


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("PDMP_REQUIRE_RENDER") == "1":
        pytest.fail(f"{reason} (PDMP_REQUIRE_RENDER=1); {INSTALL}")
    pytest.skip(f"{reason}; {INSTALL}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """The site built with ``mkdocs build --strict``, served on localhost: (base URL, page paths)."""
    _require(shutil.which("mkdocs") is not None or _importable("mkdocs"), "mkdocs is not installed")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                           capture_output=True, text=True, env=env)  # fmt: skip
    assert build.returncode == 0, build.stderr
    pages = sorted(str(p.relative_to(out).parent) for p in out.rglob("index.html"))
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pages
    server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _require(_importable("playwright"), "playwright is not installed")
    _require(CHROMIUM is not None, "Chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_fits_its_column_works_offline_and_shows_readable_figures(site, browser, width: int) -> None:
    base, pages = site
    page = browser.new_page(viewport={"width": width, "height": 900})  # type: ignore[attr-defined]
    off_site: list[str] = []
    page.route("**/*", lambda route: (off_site.append(route.request.url), route.abort())
               if not route.request.url.startswith(base) else route.continue_())  # fmt: skip
    problems = []
    for path in pages:
        page.goto(f"{base}/{'' if path == '.' else path + '/'}", wait_until="networkidle")
        page.wait_for_timeout(50)  # typesetting finishes after the network is idle
        found = page.evaluate(MEASURE)
        problems += [f"{path}: {item}" for item in found["overflow"]]
        problems += [f"{path}: raw TeX: {item}" for item in found["raw_tex"]]
        for fig in found["figures"]:
            if fig["natural"] and fig["shown"] < MIN_FIGURE_SCALE * fig["natural"]:
                problems.append(f"{path}: figure {fig['src']} squeezed to {fig['shown']}/{fig['natural']} px")
            if not fig["linked"]:
                problems.append(f"{path}: figure {fig['src']} does not link to its full-size file")
    page.close()
    assert not off_site, f"assets from other hosts: {sorted(set(off_site))}"
    assert not problems, f"{len(problems)} problems at {width} px:\n" + "\n".join(problems)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
