"""The HTML report in a real browser: renders, every image loads, no console errors.

Runs when Chromium (/usr/bin/chromium, or $CURVLAB_CHROMIUM) and playwright are installed;
`make test` installs both where the machine allows.
"""

import os
import shutil

import pytest

from curvlab.bench.report import write_report
from curvlab.bench.runner import run_tasks

CHROMIUM = os.environ.get("CURVLAB_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(tmp_path, toy):
    _problem, _tasks = toy
    problem = _problem(steps=20)
    records = run_tasks(_tasks(problem, lrs=(0.1,)) + _tasks(problem, lrs=(0.01,),
                                                              method="torch.AdamW"), tmp_path)
    page_path = write_report(records, tmp_path)
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        title = page.title()
        rows = page.eval_on_selector_all("table.summary tbody tr", "els => els.length")
        page.screenshot(path=str(os.environ.get("CURVLAB_SCREENSHOT", tmp_path / "report.png")),
                        full_page=True)
        browser.close()
    assert title == "curvlab bench report"
    assert rows == 2
    assert len(images) == page_path.read_text().count("<img") >= 1
    assert all(done and w > 100 and h > 100 for done, w, h in images), images
    assert errors == []
