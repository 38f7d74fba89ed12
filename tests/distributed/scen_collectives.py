"""Collectives scenario: :func:`share_rows` with uneven ownership, several parts and two
dtypes (every rank fills only the rows it owns, the rest hold garbage); row-sharded
matrices gathered on their owners and scattered back (uneven shards, an empty one)."""

import torch

from curvlab.distributed import gather_rows_to_owners, scatter_rows_from_owners
from curvlab.optim.distributors.collectives import Timings, share_rows

# matrix k: rows on rank 0 / rank 1, columns, owner
MATRICES = (((3, 2), 4, 1), ((0, 5), 3, 0), ((2, 2), 1, 1), ((1, 0), 2, 0))


def matrix(k: int) -> torch.Tensor:
    (r0, r1), cols, _ = MATRICES[k]
    return torch.arange((r0 + r1) * cols, dtype=torch.float64).view(r0 + r1, cols) + 1000 * k

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
    rows = [list(r) for r, _, _ in MATRICES]
    owners = [o for _, _, o in MATRICES]
    shards = [matrix(k)[sum(rows[k][:rank]):sum(rows[k][:rank + 1])] for k in range(len(rows))]
    full = gather_rows_to_owners(shards, rows, owners, torch.distributed.group.WORLD)
    back = scatter_rows_from_owners({k: 2 * m for k, m in full.items()}, rows, owners,
                                    [c for _, c, _ in MATRICES], torch.distributed.group.WORLD,
                                    torch.float64, "cpu")
    return {"parts": [t for t, _ in parts], "timings": dict(timings), "gathered": full,
            "shards": shards, "scattered": back}
