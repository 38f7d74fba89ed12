"""Launch a worker script on ``world_size`` CPU processes (gloo, ``file://`` rendezvous)
and collect what each rank saved.

A worker is run as ``python worker.py RANK WORLD_SIZE INIT_METHOD OUT_DIR [ARGS...]``; it
calls :func:`init` and finishes with :func:`save` (``OUT_DIR/rank{RANK}.pt``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import curvlab

HERE = Path(__file__).resolve().parent
SRC = str(Path(curvlab.__file__).resolve().parent.parent)


def run(worker: str, world_size: int, *args: str, timeout: float = 120.0,
        env: dict[str, str] | None = None) -> list[dict]:
    """Run ``tests/distributed/<worker>`` on ``world_size`` ranks (extra environment
    ``env``); return each rank's dict."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}),
                   PYTHONPATH=os.pathsep.join([SRC, str(HERE), os.environ.get("PYTHONPATH", "")]))
        init = f"file://{tmp}/rendezvous"
        procs = [subprocess.Popen([sys.executable, str(HERE / worker), str(r), str(world_size),
                                   init, tmp, *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for r in range(world_size)]
        errors = []
        for r, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError(f"{worker}: rank {r} timed out after {timeout} s") from None
            if p.returncode != 0:
                errors.append(f"--- rank {r} (exit {p.returncode}) ---\n{err[-4000:]}")
        if errors:
            raise AssertionError(f"{worker} failed:\n" + "\n".join(errors))
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]


def init(argv: list[str]) -> tuple[int, int, str, list[str]]:
    """Worker side: join the gloo group; returns (rank, world_size, out_dir, extra args)."""
    rank, world, init_method, out_dir, *rest = argv[1:]
    dist.init_process_group("gloo", init_method=init_method, rank=int(rank),
                            world_size=int(world))
    torch.set_num_threads(1)
    return int(rank), int(world), out_dir, rest


def save(out_dir: str, rank: int, result: dict) -> None:
    """Worker side: store this rank's results and leave the group."""
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
