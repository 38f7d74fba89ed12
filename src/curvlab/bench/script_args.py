"""The output options shared by the benchmark scripts built on :mod:`curvlab.bench.runner`:
``--out FOLDER`` (the records, ``results.jsonl``, and ``summary.json``; a path ending in
``.json`` names the summary file, the records go to the folder of the same name without
``.json``), ``--resume`` and ``--overwrite`` (as for ``curvlab bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_output_arguments", "output_paths"]


def add_output_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--out", default=str(default),
                        help=f"output folder (default {default}; a path ending in .json: the "
                             "summary file, the records beside it in the folder of its name)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the runs recorded in OUT/results.jsonl")
    again.add_argument("--overwrite", action="store_true",
                       help="delete earlier results in OUT (default: moved to OUT/earlier-*)")


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """``(records folder, summary file)`` for an ``--out`` value."""
    out = Path(out)
    if out.suffix == ".json":
        return out.with_suffix(""), out
    return out, out / "summary.json"
