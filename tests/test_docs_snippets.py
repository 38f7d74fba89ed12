"""The guides' ```python blocks run: ``make docs`` runs every page (docs/_snippets.py);
here the extractor is tested, and CURVLAB_DOC_SNIPPETS=1 runs the pages under pytest too
(they take tens of seconds, so `make test` leaves them to `make docs`)."""

import importlib.util
import os
import sys
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
spec = importlib.util.spec_from_file_location("curvlab_docs_snippets", DOCS / "_snippets.py")
_snippets = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = _snippets
spec.loader.exec_module(_snippets)


def test_the_extractor_skips_marked_blocks():
    text = ("a\n```python\nx = 1\n```\n<!-- no-run -->\n```python\nraise SystemExit\n```\n"
            "```bash\nls\n```\n")
    assert _snippets.blocks(text) == ["x = 1\n"]


def test_a_failing_block_fails_naming_the_page(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```python\nx = 1\n```\n```python\nassert x == 2\n```\n")
    cwd = os.getcwd()
    with pytest.raises(AssertionError) as err:
        _snippets.run_page(page)
    files = [frame.filename for frame in traceback.extract_tb(err.value.__traceback__)]
    assert "p.md[python block 1]" in files
    assert os.getcwd() == cwd   # the page ran in a temporary folder, and came back


PAGES = _snippets.pages(DOCS)


@pytest.mark.skipif(os.environ.get("CURVLAB_DOC_SNIPPETS") != "1",
                    reason="set CURVLAB_DOC_SNIPPETS=1 (make docs runs them)")
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_guide_snippets_run(page, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _snippets.run_page(page)
