"""Collectives scenario: :func:`share_rows` with uneven ownership, several parts and two
dtypes; every rank fills only the rows it owns (the rest hold garbage)."""

import torch

from curvlab.optim._distributed import Timings, share_rows

OWNERS = ([0, 1, 1, 1, 0], [1, 1], [0, 0, 0])


def expected() -> list[torch.Tensor]:
    """Row ``i`` of part ``j`` is ``100 j + i`` everywhere (what every rank must end with)."""
    shapes = ((5, 3, 2), (2, 4), (3,))
    dtypes = (torch.float64, torch.float32, torch.float64)
    return [(100 * j + torch.arange(s[0], dtype=dt)).view(-1, *[1] * (len(s) - 1)).expand(s)
            .clone() for j, (s, dt) in enumerate(zip(shapes, dtypes, strict=True))]


def run(rank: int, world: int) -> dict:
    parts = []
    for want, owners in zip(expected(), OWNERS, strict=True):
        t = torch.full_like(want, float("nan"))  # garbage in the rows of other ranks
        mine = [i for i, o in enumerate(owners) if o == rank]
        t[mine] = want[mine]
        parts.append((t, owners))
    timings = Timings()
    share_rows(parts, torch.distributed.group.WORLD, timings)
    return {"parts": [t for t, _ in parts], "timings": dict(timings)}
