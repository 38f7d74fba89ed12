"""How curvlab's optimizers split their work over ``torch.distributed`` ranks.

:mod:`~curvlab.optim.distributors.collectives` holds the schedules and collectives;
:mod:`~curvlab.optim.distributors.blocks` one distributor class per kind of parallelism of
the blocked preconditioners (one process, DDP with shared refreshes, DDP with all-gathered
directions, FSDP2); :mod:`~curvlab.optim.distributors.matrices` those of Muon's Newton-Schulz
work (whole matrices, FSDP2).
"""

from curvlab.optim.distributors.blocks import (
    AllGatherDirections,
    BlockDistributor,
    BroadcastRefreshes,
    RowShardedFSDP2,
    block_distributor,
)
from curvlab.optim.distributors.collectives import DISTRIBUTED_MODES, Timings
from curvlab.optim.distributors.matrices import (
    MatrixDistributor,
    RowShardedMatrices,
    matrix_distributor,
)

__all__ = ["BlockDistributor", "BroadcastRefreshes", "AllGatherDirections", "RowShardedFSDP2",
           "block_distributor", "MatrixDistributor", "RowShardedMatrices", "matrix_distributor",
           "DISTRIBUTED_MODES", "Timings"]
