"""Run the ```python blocks of the documentation pages (``make docs`` does, from conf.py).

The blocks of one page run in order in one namespace, in a temporary folder, as a reader
would paste them (what they print is discarded); a block right after ``<!-- no-run -->``
is shown only (it needs a GPU, several processes, a network or a peer library).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

BLOCK = re.compile(r"(<!-- no-run -->\s*)?```python\n(.*?)```", re.S)


def blocks(text: str) -> list[str]:
    """The runnable python blocks of a Markdown text."""
    return [code for skip, code in BLOCK.findall(text) if not skip]


def pages(docs: Path) -> list[Path]:
    """The documentation pages that have python blocks."""
    return sorted(p for p in [*docs.glob("*.md"), *docs.glob("guides/*.md")]
                  if "```python" in p.read_text())


def run_page(page: Path) -> None:
    """Run a page's blocks; an exception propagates, naming the page and block."""
    namespace = {"__name__": "__docs__"}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        os.chdir(tmp)
        try:
            for i, code in enumerate(blocks(page.read_text())):
                exec(compile(code, f"{page.name}[python block {i}]", "exec"), namespace)  # noqa: S102
        finally:
            os.chdir(cwd)
