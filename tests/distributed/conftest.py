"""Make the launcher and the shared problems importable: the suite runs in pytest's
importlib mode, which does not put test folders on sys.path."""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Where the workers save their checkpoints (kept for the resume tests)."""
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="session")
def ranks(checkpoints):
    """Results of every scenario on 2 gloo ranks: a list (per rank) of dicts (per
    scenario), from one launch of ``worker.py``."""
    from _launch import run

    return run("worker.py", 2, env={"CURVLAB_TEST_CHECKPOINTS": str(checkpoints)})
