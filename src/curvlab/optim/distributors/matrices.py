"""Distributors of Muon's Newton-Schulz work: one class per kind of parallelism.

Muon has no statistics to share: its per-step work is orthogonalizing each matrix's update.
Each matrix gets an owner rank by an LPT schedule over ``A B min(A, B)`` (the cost of one
iteration, :func:`~curvlab.optim.distributors.collectives.newton_schulz_cost`), the owner
orthogonalizes it, and the results reach the ranks that need them:

* :class:`MatrixDistributor` -- whole matrices on every rank (one process, or DDP): the
  owners' results are all-gathered (:func:`~curvlab.optim.distributors.collectives.
  share_rows`; communication ``~`` number of matrix parameters per step).
* :class:`RowShardedMatrices` -- FSDP2 (row-sharded DTensors): each matrix's row shards go
  to its owner only (one all-to-all for all matrices), the owner orthogonalizes the whole
  matrix and sends every rank its rows of the result (a second all-to-all), so no rank
  materializes matrices it does not own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.optim.distributors.collectives import (
    Timings,
    check_row_sharded,
    is_dtensor,
    local_tensor,
    lpt_schedule,
    newton_schulz_cost,
    shard_rows,
    share_rows,
)

__all__ = ["MatrixDistributor", "RowShardedMatrices", "matrix_distributor", "wide_shape"]

# (indices of matrices of one wide shape, their stacked wide updates) -> orthogonalized
Orthogonalize = Callable[[list[int], Tensor], Tensor]


def wide_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D shape Newton–Schulz iterates on for a ``shape`` parameter: its
    ``(rows, prod(rest))`` matrix, transposed if tall (see :func:`as_wide`)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (min(rows, cols), max(rows, cols))


def as_wide(t: Tensor) -> Tensor:
    """``t`` as a wide matrix: ``(rows, prod(rest))``, transposed if it has more rows than
    columns (a view where possible); :func:`from_wide` undoes it."""
    m = t.reshape(t.shape[0], -1)
    return m.mT if m.shape[0] > m.shape[1] else m


def from_wide(o: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`as_wide` for a tensor of ``shape``."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (o.mT if rows > cols else o).reshape(shape)


def matrix_distributor(process_group: Any, params: Sequence[Tensor],
                       name: str) -> MatrixDistributor:
    """The distributor for ``process_group`` (resolved; None: one process); DTensor
    (FSDP2) parameters need the group they are sharded over."""
    if any(is_dtensor(p) for p in params):
        if process_group is None:
            raise ValueError(f"{name} got DTensor (FSDP2 fully_shard) parameters: pass "
                             "process_group (the group they are sharded over) so that "
                             "Newton–Schulz runs on whole matrices, not on local shards")
        check_row_sharded(params, process_group, name)
        return RowShardedMatrices(process_group)
    return MatrixDistributor(process_group)


class MatrixDistributor:
    """Whole matrices on every rank (one process or DDP): owners orthogonalize, every rank
    receives the results (one all-gather)."""

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.rank = _dist.rank(process_group)
        self.world_size = _dist.world_size(process_group)
        self.timings = Timings(enabled=process_group is not None)

    def gradient_group(self) -> Any:
        """The group whose ranks must agree on the gradient rule (None: every rank sees the
        whole gradient)."""
        return None

    def owners(self, shapes: Sequence[torch.Size]) -> list[int]:
        """Owner rank of each matrix (LPT over the Newton-Schulz cost)."""
        return lpt_schedule([newton_schulz_cost(s) for s in shapes], self.world_size)

    def directions(self, ps: list[Tensor], upd: list[Tensor], owner_of: dict[int, int],
                   by_shape: dict[tuple, list[int]], orthogonalize: Orthogonalize
                   ) -> dict[int, Tensor]:
        """``i ->`` this rank's part of the orthogonalized update of ``ps[i]``;
        ``by_shape``: the matrices of each wide shape (:func:`wide_shape`), stacked."""
        parts = []
        for (wide, _, _), idx in by_shape.items():
            mine = [j for j, i in enumerate(idx) if owner_of[i] == self.rank]
            if len(mine) == len(idx):  # all ours (one process): no rows to share
                O = orthogonalize(idx, torch.stack([as_wide(upd[i]) for i in idx]))
            else:
                O = torch.empty(len(idx), *wide, dtype=ps[idx[0]].dtype,
                                device=upd[idx[0]].device)
                if mine:
                    O[mine] = orthogonalize([idx[j] for j in mine],
                                            torch.stack([as_wide(upd[idx[j]]) for j in mine]))
            parts.append((O, idx))
        share_rows([(O, [owner_of[i] for i in idx]) for O, idx in parts], self.process_group,
                   self.timings)
        return {i: from_wide(o, ps[i].shape) for O, idx in parts
                for i, o in zip(idx, O.unbind(0), strict=True)}

    def local_rows(self, p: Tensor) -> slice:
        """The rows of ``p`` (dim 0) that this rank's :meth:`directions` hold: all."""
        return slice(None)

    def whole_row_sums(self, ps: Sequence[Tensor], sums: Sequence[Tensor],
                       rows_sharded: bool) -> list[Tensor]:
        """Sums over whole rows of the directions of ``ps`` from this rank's parts:
        ``sums[k]`` has shape ``(n, R)``, ``n`` matrices of ``ps[k]``'s shape. Whole
        matrices here: ``sums`` as they are."""
        return list(sums)


class RowShardedMatrices(MatrixDistributor):
    """FSDP2 (row-sharded DTensors): a matrix's update is assembled on its owner only,
    orthogonalized there, and every rank gets its rows of the result back."""

    def __init__(self, process_group: Any) -> None:
        super().__init__(process_group)
        self._shard_rows: dict = {}  # cache of shard_rows

    def gradient_group(self) -> Any:
        return self.process_group

    def directions(self, ps: list[Tensor], upd: list[Tensor], owner_of: dict[int, int],
                   by_shape: dict[tuple, list[int]], orthogonalize: Orthogonalize
                   ) -> dict[int, Tensor]:
        pg, me = self.process_group, self.rank
        order = [i for idx in by_shape.values() for i in idx]
        local = {i: upd[i].to_local().reshape(-1, math.prod(ps[i].shape[1:])) for i in order}
        rows = shard_rows([ps[i] for i in order], pg, self._shard_rows)
        xdtype = functools.reduce(torch.promote_types, (local[i].dtype for i in order))
        with self.timings.measure("communication"):
            full = _dist.gather_rows_to_owners([local[i].to(xdtype) for i in order], rows,
                                               [owner_of[i] for i in order], pg)
        results: dict[int, Tensor] = {}
        for idx in by_shape.values():
            mine = [i for i in idx if owner_of[i] == me]
            if mine:
                U = torch.stack([as_wide(full[order.index(i)]) for i in mine])
                O = orthogonalize(mine, U)
                results.update({order.index(i): from_wide(o, full[order.index(i)].shape)
                                .to(xdtype) for i, o in zip(mine, O.unbind(0), strict=True)})
        with self.timings.measure("communication"):
            shards = _dist.scatter_rows_from_owners(results, rows,
                                                    [owner_of[i] for i in order],
                                                    [local[i].shape[1] for i in order], pg,
                                                    xdtype, local[order[0]].device)
        return {i: sh.to(ps[i].dtype).view_as(local_tensor(ps[i]))
                for i, sh in zip(order, shards, strict=True)}

    def local_rows(self, p: Tensor) -> slice:
        """The rows of ``p`` (dim 0) in this rank's shard (contiguous, in rank order)."""
        counts = shard_rows([p], self.process_group, self._shard_rows)[0]
        start = sum(counts[:self.rank])
        return slice(start, start + counts[self.rank])

    def whole_row_sums(self, ps: Sequence[Tensor], sums: Sequence[Tensor],
                       rows_sharded: bool) -> list[Tensor]:
        """Sums over whole rows from this rank's shards, ``sums[k]`` of shape ``(n, R)``:
        ``rows_sharded`` (the rows summed are rows of the stored matrix): complete sums of
        this rank's rows, placed at their offsets of ``(n, rows)`` zeros; otherwise (rows
        along a dimension the shards do not split, e.g. the logical rows of an ``(in, out)``
        weight) partial sums of every row. Either way one all-reduce (for all of
        ``sums``) gives every rank the whole sums."""
        whole = []
        for p, s in zip(ps, sums, strict=True):
            if rows_sharded:
                full = s.new_zeros(s.shape[0], p.shape[0])
                full[:, self.local_rows(p)] = s
                s = full
            whole.append(s.contiguous())
        with self.timings.measure("communication"):
            _dist.all_reduce_coalesced(whole, self.process_group)
        return whole
