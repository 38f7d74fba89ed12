"""Structured preconditioners: the blocked base Shampoo and SOAP implement, and its parts.

:mod:`~curvlab.optim.preconditioners.blocking` (how parameters become stacks of equal
blocks), :mod:`~curvlab.optim.preconditioners.block_math` (batched Kronecker statistics,
amortized refreshes with a failure policy, grafting), and
:class:`~curvlab.optim.preconditioners.base.BlockedPreconditionerOptimizer` (the interface a
new preconditioner implements in one file; ``examples/diagonal_fisher_optimizer.py`` is the
smallest).
"""

from curvlab.optim.preconditioners.base import BlockedPreconditionerOptimizer
from curvlab.optim.preconditioners.block_math import (
    GRAFTING_METHODS,
    ema_,
    graft,
    graft_direction,
    guarded_batched,
    is_due,
    kronecker_statistic,
    max_abs,
    mode_product,
)
from curvlab.optim.preconditioners.blocking import BlockPlan, plan_blocks

__all__ = ["BlockedPreconditionerOptimizer", "BlockPlan", "plan_blocks", "GRAFTING_METHODS",
           "kronecker_statistic", "mode_product", "ema_", "is_due", "guarded_batched",
           "max_abs", "graft_direction", "graft"]
