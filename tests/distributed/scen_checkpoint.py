"""Checkpoint scenario: each optimizer trains 10 steps under DDP on 2 ranks, saves
(model + optimizer) with curvlab.distributed.save_checkpoint, trains 10 more; a fresh model and
optimizer loaded from the checkpoint train the same 10 steps."""

import os
from pathlib import Path

import _problems as P
from scen_optim import DDP_VARIANTS, make, params, train
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlab.distributed import load_checkpoint, save_checkpoint


def fresh(name: str):
    inner = P.mlp()
    return inner, DDP(inner), make(name, inner, "default")


def run(rank: int, world: int) -> dict:
    root = Path(os.environ["CURVLAB_TEST_CHECKPOINTS"])
    res = {}
    for name in DDP_VARIANTS:
        inner, ddp, opt = fresh(name)
        train(name, inner, opt, range(10), rank, world, forward=ddp)
        save_checkpoint({"model": inner.state_dict(), "optim": opt.state_dict()},
                        root / name.replace("/", "-"), "default")
        train(name, inner, opt, range(10, 20), rank, world, forward=ddp)
        res[f"continued/{name}"] = params(inner)
        inner, ddp, opt = fresh(name)
        state = load_checkpoint(root / name.replace("/", "-"), "default")
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        train(name, inner, opt, range(10, 20), rank, world, forward=ddp)
        res[f"resumed/{name}"] = params(inner)
    return res
