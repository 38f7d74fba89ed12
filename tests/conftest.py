"""Make the models shared by tests in several folders (``_shared_models``) importable: the
suite runs in pytest's importlib mode, which does not put test folders on sys.path."""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
