"""The built documentation site in a real browser: every page renders, every image loads,
no console errors, no broken internal links (files and #anchors).

Needs the built site (`make docs` writes build/docs/html; or set $CURVLAB_DOCS_HTML),
Chromium and playwright, as tests/bench/test_report_browser.py; skipped otherwise, so
`make test` stays fast where the docs are not built.
"""

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

SITE = Path(os.environ.get("CURVLAB_DOCS_HTML")
            or Path(__file__).resolve().parents[1] / "build" / "docs" / "html")
CHROMIUM = os.environ.get("CURVLAB_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Links(HTMLParser):
    """hrefs / srcs and element ids of one page."""

    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and tag in ("a", "img", "link", "script"):
                self.refs.append(a[key])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def broken_links(site: Path) -> list[str]:
    """Internal references whose file or #anchor does not exist."""
    pages = sorted(site.rglob("*.html"))
    parsed = {p: _parse(p) for p in pages}
    bad = []
    for page, links in parsed.items():
        for ref in links.refs:
            url = urlsplit(ref)
            if url.scheme or url.netloc or ref.startswith(("mailto:", "javascript:")):
                continue
            target = page if not url.path else (page.parent / unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                bad.append(f"{page.relative_to(site)}: {ref} (no such file)")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(url.fragment) not in ids:
                    bad.append(f"{page.relative_to(site)}: {ref} (no such anchor)")
    return bad


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.html").write_text('<a href="b.html#x">ok</a><a href="b.html#y">bad</a>'
                                     '<a href="c.html">missing</a><img src="i.png">'
                                     '<a href="https://example.org/">external</a>')
    (tmp_path / "b.html").write_text('<h1 id="x">b</h1>')
    assert broken_links(tmp_path) == ["a.html: b.html#y (no such anchor)",
                                      "a.html: c.html (no such file)",
                                      "a.html: i.png (no such file)"]


needs_site = pytest.mark.skipif(not (SITE / "index.html").exists(),
                                reason=f"the documentation is not built ({SITE}; `make docs`)")


@needs_site
def test_no_broken_internal_links():
    assert broken_links(SITE) == []


@needs_site
def test_pages_render_in_headless_chromium():
    playwright = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed")
    pages = [p for p in sorted(SITE.rglob("*.html"))
             if "_modules" not in p.parts and "_sources" not in p.parts]
    assert (SITE / "index.html") in pages and len(pages) >= 20
    errors, blank, bad_images, n_images = [], [], [], 0
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(f"{page.url}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"{page.url}: failed {r.url}"))
        for path in pages:
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            if not page.inner_text("body").strip() or not page.title():
                blank.append(str(path.relative_to(SITE)))
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.src, e.complete, e.naturalWidth])")
            n_images += len(images)
            bad_images += [src for src, done, width in images if not (done and width > 0)]
        browser.close()
    gallery_images = list((SITE / "_images").glob("sphx_glr_plot_*"))
    assert n_images > 0 and len(gallery_images) >= len(list(
        (SITE / "auto_examples").glob("plot_*.html")))
    assert blank == [] and bad_images == [] and errors == []
