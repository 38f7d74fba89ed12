"""Small deterministic float64 problems shared by the distributed workers and the tests
(the single-process reference is computed on the concatenation of the ranks' shards)."""

from __future__ import annotations

import torch
from torch import nn

# unequal shards and several batches per rank, so n_b / N_global weighting is exercised
SHARD_SIZES = {2: (23, 17), 4: (11, 12, 9, 8)}
BATCH = 8


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def shard(X: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> list:
    """This rank's contiguous shard, cut into batches of ``BATCH``."""
    sizes = SHARD_SIZES[world]
    start = sum(sizes[:rank])
    Xs, ys = X[start:start + sizes[rank]], y[start:start + sizes[rank]]
    return [(Xs[i:i + BATCH], ys[i:i + BATCH]) for i in range(0, len(Xs), BATCH)]


def whole(X: torch.Tensor, y: torch.Tensor) -> list:
    return [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


def mlp(seed: int = 2) -> nn.Module:
    """Three weight matrices of different shapes (so blocks get different owners)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()
