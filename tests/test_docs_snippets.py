"""Every ```python block of the guides runs (the blocks of one page in order, sharing one
namespace, as a reader would paste them). A block preceded by ``<!-- no-run -->`` is
shown only (it needs a GPU, several processes or a network)."""

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in [*DOCS.glob("*.md"), *DOCS.glob("guides/*.md")]
               if "```python" in p.read_text())
BLOCK = re.compile(r"(<!-- no-run -->\s*)?```python\n(.*?)```", re.S)


def blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


def test_the_extractor_skips_marked_blocks():
    text = "a\n```python\nx = 1\n```\n<!-- no-run -->\n```python\nraise SystemExit\n```\n"
    assert [code for skip, code in BLOCK.findall(text) if not skip] == ["x = 1\n"]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_guide_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # snippets that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page)):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)
