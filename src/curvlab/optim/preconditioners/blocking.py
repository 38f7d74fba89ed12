"""How parameters become stacks of equal blocks, and directions go back to parameters.

A parameter is reshaped by dropping size-1 dimensions and greedily merging adjacent
dimensions while the product stays ``<= max_preconditioner_dim`` (never merging a
multi-dimensional tensor into a single vector: that is the size trap that turns a 128x64
weight into one 8192x8192 factor); each dimension is then split into chunks of at most
``max_preconditioner_dim``. The Cartesian product of chunks are the blocks
(:func:`plan_blocks`). 1-D tensors, scalars and parameters with more than
``diagonal_threshold`` elements use a diagonal method instead (Anil et al. 2020, "Scalable
second order optimization", Sec. 4; Shi et al. 2023, "Distributed Shampoo", Sec. 3.2).

Blocks of equal shape (in one param group, dtype and device) form a :class:`BlockGroup`
whose state entries are stacked along a leading block dimension; all diagonal-method
parameters of a group are concatenated into one flat group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BlockPlan", "plan_blocks", "BlockGroup", "scatter_blocks", "scatter_diagonal",
           "gather_rows", "write_rows"]


@dataclass(frozen=True)
class BlockPlan:
    """How one parameter is preconditioned.

    ``merged_shape`` is a reshape of the parameter; ``blocks`` lists ``(block_shape, slices)``
    into the merged tensor. ``diagonal`` parameters have no blocks.
    """

    merged_shape: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, ...], tuple[slice, ...]], ...]
    diagonal: bool


def plan_blocks(
    shape: Sequence[int],
    max_preconditioner_dim: int,
    merge_dims: bool = True,
    diagonal_threshold: int | None = None,
) -> BlockPlan:
    """Blocking plan of a tensor of ``shape`` (see module docstring for the rules)."""
    if max_preconditioner_dim < 1:
        raise ValueError(f"max_preconditioner_dim must be >= 1, got {max_preconditioner_dim}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    dims = [s for s in shape if s != 1]
    if len(dims) < 2 or (diagonal_threshold is not None and numel > diagonal_threshold):
        return BlockPlan((numel,), (), True)
    if merge_dims:
        merged = [dims[0]]
        for d in dims[1:]:
            if merged[-1] * d <= max_preconditioner_dim:
                merged[-1] *= d
            else:
                merged.append(d)
        if len(merged) == 1:  # never collapse a matrix into a vector (size trap)
            merged = [dims[0], math.prod(dims[1:])]
        dims = merged
    chunks = [
        [slice(a, min(a + max_preconditioner_dim, d)) for a in range(0, d, max_preconditioner_dim)]
        for d in dims
    ]
    blocks: list[tuple[tuple[int, ...], tuple[slice, ...]]] = [((), ())]
    for dim_chunks in chunks:
        blocks = [
            (bs + (sl.stop - sl.start,), sls + (sl,)) for bs, sls in blocks for sl in dim_chunks
        ]
    return BlockPlan(tuple(dims), tuple(blocks), False)


@dataclass
class BlockGroup:
    """Stacked state of the blocks of one shape (or of all diagonal parameters)."""

    group_index: int
    shape: tuple[int, ...]  # block shape; () for the diagonal group
    members: list[tuple[Tensor, BlockPlan, tuple[slice, ...]]] = field(default_factory=list)
    state: dict[str, Tensor] = field(default_factory=dict)
    # row of ``state`` holding each member; -1: held by another rank
    rows: list[int] = field(default_factory=list)

    @property
    def diagonal(self) -> bool:
        return self.shape == ()

    def flat_index(self, members: Sequence[int], device: torch.device) -> Tensor:
        """Diagonal group: the flat positions of ``members`` in the concatenated state."""
        offs = [0]
        for p, _, _ in self.members:
            offs.append(offs[-1] + p.numel())
        return torch.cat([torch.arange(offs[i], offs[i + 1]) for i in members]).to(device)


def gather_rows(g: BlockGroup, members: list[int], idx: Tensor) -> dict[str, Tensor]:
    """Copy of the state of ``members`` (``idx``: their rows)."""
    if g.diagonal:
        ix = g.flat_index(members, idx.device)
        return {k: v[ix].clone() if v.ndim else v.clone() for k, v in g.state.items()}
    return {k: v[idx].clone() for k, v in g.state.items()}


def write_rows(g: BlockGroup, members: list[int], idx: Tensor, st: dict[str, Tensor]) -> None:
    """Write back the state :func:`gather_rows` copied out."""
    if g.diagonal:
        ix = g.flat_index(members, idx.device)
        for k, v in g.state.items():
            if v.ndim:
                v[ix] = st[k]
        return
    for k, v in g.state.items():
        v[idx] = st[k]


def scatter_diagonal(g: BlockGroup, members: list[int], D: Tensor,
                     updates: dict[int, Tensor]) -> None:
    """``updates[id(p)]``: the parts of the flat direction ``D`` of ``members``."""
    parts = D.split([g.members[i][0].numel() for i in members])
    for i, part in zip(members, parts, strict=True):
        p = g.members[i][0]
        updates[id(p)] = part.view(p.shape)


def scatter_blocks(g: BlockGroup, members: list[int], D: Tensor,
                   updates: dict[int, Tensor]) -> None:
    """``updates[id(p)]``: the directions of the stacked blocks ``D`` of ``members``
    assembled into their parameters (views where the blocks are consecutive rows)."""
    j = 0
    while j < len(members):
        p, plan, slices = g.members[members[j]]
        k = len(plan.blocks)
        if k == 1:
            updates[id(p)] = D[j].reshape(p.shape)
            j += 1
            continue
        if (plan.merged_shape[0] == k * g.shape[0] and plan.merged_shape[1:] == g.shape[1:]
                and members[j : j + k] == list(range(members[j], members[j] + k))):
            # the blocks split only the first dimension and sit consecutively: a view
            updates[id(p)] = D[j : j + k].reshape(p.shape)
            j += k
            continue
        u = updates.get(id(p))
        if u is None:
            u = updates[id(p)] = torch.zeros(p.shape, dtype=D.dtype, device=D.device)
        u.view(plan.merged_shape)[slices] = D[j]
        j += 1
