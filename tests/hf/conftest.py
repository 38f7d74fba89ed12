"""Tiny Hugging Face models built from configs (random weights, no hub): importable as
``_hf_models`` (pytest's importlib mode does not put test folders on sys.path)."""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
