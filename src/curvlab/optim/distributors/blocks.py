"""Distributors of the blocked preconditioners (Shampoo, SOAP): one class per parallelism.

The optimizer (:class:`curvlab.optim.preconditioners.BlockedPreconditionerOptimizer`) asks
its distributor five questions in every step and never branches on the mode itself:

* :meth:`BlockDistributor.assign_owners` / :meth:`~BlockDistributor.holds`: which rank
  owns each block (its refresh, or all its work) and which rows of the stacked state this
  rank allocates;
* :meth:`~BlockDistributor.gradients`: the whole gradients this rank works on (FSDP2:
  assembled from row shards) and the process group the gradient rule must agree over;
* :meth:`~BlockDistributor.members_to_work_on`: the blocks whose direction this rank computes;
* :meth:`~BlockDistributor.refresh`: run a refresh (roots, eigenbases) and share its results;
* :meth:`~BlockDistributor.collect` / :meth:`~BlockDistributor.finish`: put the computed
  directions where every rank needs them, as each rank's local part of every parameter.

The distributors (Shi et al. 2023, "A distributed data-parallel PyTorch implementation of
the distributed Shampoo optimizer", Sec. 4; blocks get owners by an LPT schedule over their
refresh cost, :func:`~curvlab.optim.distributors.collectives.lpt_schedule`):

* :class:`BlockDistributor` -- one process: everything local.
* :class:`BroadcastRefreshes` (``distributed_mode="broadcast"``, the default under DDP):
  every rank keeps the full state and computes the cheap per-step statistics and directions
  itself; only refreshes are split, and their results go to all ranks at refresh steps
  (communication ``~ sum_blocks d^2`` every ``precondition_frequency`` steps). State is
  identical on all ranks.
* :class:`AllGatherDirections` (``"allgather"``): all block work is done by the owner only
  and the directions are all-gathered every step (communication ``~`` number of block
  parameters per step); each rank allocates only the blocks it owns.
* :class:`RowShardedFSDP2` (``"allgather"`` with DTensor parameters): no rank has a whole
  gradient, so a parameter's blocks share one owner, who receives the gradient's row shards
  (one all-to-all), does all block work on the whole matrix and sends each rank its rows of
  the direction (a second all-to-all). Diagonal-method parameters are gathered whole on
  every rank (their state is replicated).

A checkpoint is always the whole state (:meth:`~BlockDistributor.whole_state` assembles it
where rows live on their owners), so it resumes on any world size and in either mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.optim.distributors.collectives import (
    DISTRIBUTED_MODES,
    Timings,
    check_row_sharded,
    eigh_cost,
    is_dtensor,
    local_tensor,
    lpt_schedule,
    shard_rows,
    sharded_rows,
    share_rows,
)
from curvlab.optim.preconditioners.blocking import BlockGroup, scatter_blocks, scatter_diagonal

__all__ = ["BlockDistributor", "BroadcastRefreshes", "AllGatherDirections", "RowShardedFSDP2",
           "block_distributor"]

Refresh = Callable[[dict[str, Tensor]], None]


def block_distributor(process_group: Any, mode: str, params: Sequence[Tensor],
                      name: str) -> BlockDistributor:
    """The distributor for ``process_group`` (resolved; None: one process) and
    ``distributed_mode``; DTensor (FSDP2) parameters need a group and ``"allgather"``."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        if process_group is None or mode != "allgather":
            raise ValueError(f"{name} got DTensor (FSDP2 fully_shard) parameters: pass "
                             "process_group (the group they are sharded over) and "
                             "distributed_mode='allgather', so that each block is "
                             "preconditioned whole by its owner rank, not shard by shard")
        check_row_sharded(params, process_group, name)
        return RowShardedFSDP2(process_group)
    if process_group is None:
        return BlockDistributor()
    return (AllGatherDirections if mode == "allgather" else BroadcastRefreshes)(process_group)


class BlockDistributor:
    """One process: every block is computed here, nothing is communicated."""

    #: whether rows of the block state live on their owners only
    partial_state = False

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.rank = _dist.rank(process_group)
        self.world_size = _dist.world_size(process_group)
        # per-phase clocks only with a process group (reading the thread CPU clock is a
        # system call, measured at up to milliseconds on a loaded machine)
        self.timings = Timings(enabled=process_group is not None)
        self.owners: list[list[int]] = []

    # -- layout --------------------------------------------------------------------------
    def assign_owners(self, groups: list[BlockGroup]) -> list[list[int]]:
        """Owner rank of every member of every block group (kept as :attr:`owners`)."""
        self.owners = [self._owners(groups, k) for k in range(len(groups))]
        return self.owners

    def _owners(self, groups: list[BlockGroup], k: int) -> list[int]:
        return [0] * len(groups[k].members)

    def holds(self, owner: int) -> bool:
        """Whether this rank allocates the state of a block owned by ``owner``."""
        return True

    # -- a step --------------------------------------------------------------------------
    def gradient_group(self) -> Any:
        """The process group whose ranks must agree on the gradient rule (each sees only a
        part of the gradient), or None when every rank sees the same gradient."""
        return None

    def gradients(self, groups: list[BlockGroup]) -> dict[int, Tensor]:
        """``id(p) -> `` whole gradient, where ``p.grad`` is not (FSDP2)."""
        return {}

    def members_to_work_on(self, k: int, g: BlockGroup, with_grad: list[int]) -> list[int]:
        """The members of block group ``k`` (with gradients) whose direction this rank
        computes."""
        return with_grad

    def refresh(self, fn: Refresh, st: dict[str, Tensor], row_owners: Sequence[int],
                keys: Sequence[str], reads: Sequence[str] = ()) -> None:
        """Run the in-place refresh ``fn(st)`` of the stacked blocks ``st`` (owned by
        ``row_owners``) so that every rank holding them ends with the new ``keys``."""
        fn(st)

    def collect(self, k: int, g: BlockGroup, with_grad: list[int], worked: list[int],
                D: Tensor | None, updates: dict[int, Tensor]) -> None:
        """Record the directions ``D`` of members ``worked`` (None: none here)."""
        if D is None:
            return
        (scatter_diagonal if g.diagonal else scatter_blocks)(g, worked, D, updates)

    def finish(self, groups: list[BlockGroup], updates: dict[int, Tensor]) -> dict[int, Tensor]:
        """``id(p) ->`` this rank's part of the direction of every parameter stepped."""
        return updates

    # -- state ---------------------------------------------------------------------------
    def whole_state(self, groups: list[BlockGroup]) -> list[dict[str, Tensor]]:
        """Copy of every group's state for all its members (a collective where rows live
        on their owners: temporarily the memory of the whole state)."""
        return [{name: v.clone() for name, v in g.state.items()} for g in groups]


class BroadcastRefreshes(BlockDistributor):
    """DDP: refreshes split over the ranks by LPT, results shared at refresh steps."""

    def _owners(self, groups: list[BlockGroup], k: int) -> list[int]:
        if k == 0:  # one schedule over every block of every group
            slots = [(j, m) for j, g in enumerate(groups) if not g.diagonal
                     for m in range(len(g.members))]
            self._schedule = dict(zip(slots, lpt_schedule(
                [eigh_cost(groups[j].shape) for j, _ in slots], self.world_size), strict=True))
        owners = [self._schedule.get((k, m), 0) for m in range(len(groups[k].members))]
        # blocks of one group cost the same: sorting their owners keeps every rank's load
        # and makes each rank's rows contiguous (refreshed in place through views)
        return owners if groups[k].diagonal else sorted(owners)

    def refresh(self, fn: Refresh, st: dict[str, Tensor], row_owners: Sequence[int],
                keys: Sequence[str], reads: Sequence[str] = ()) -> None:
        sharded_rows(fn, st, row_owners, keys, self.process_group, self.timings, reads)


class AllGatherDirections(BroadcastRefreshes):
    """DDP: all block work split over the ranks, directions all-gathered every step."""

    partial_state = True

    def holds(self, owner: int) -> bool:
        return owner == self.rank

    def members_to_work_on(self, k: int, g: BlockGroup, with_grad: list[int]) -> list[int]:
        if g.diagonal:
            return with_grad
        return [i for i in with_grad if self.owners[k][i] == self.rank]

    def refresh(self, fn: Refresh, st: dict[str, Tensor], row_owners: Sequence[int],
                keys: Sequence[str], reads: Sequence[str] = ()) -> None:
        with self.timings.measure("precondition"):  # ``st`` holds this rank's blocks only
            fn(st)

    def gradients(self, groups: list[BlockGroup]) -> dict[int, Tensor]:
        self._shared: list[tuple[int, BlockGroup, list[int], Tensor]] = []
        return {}

    def collect(self, k: int, g: BlockGroup, with_grad: list[int], worked: list[int],
                D: Tensor | None, updates: dict[int, Tensor]) -> None:
        if g.diagonal:
            super().collect(k, g, with_grad, worked, D, updates)
            return
        ref = next(iter(g.state.values()))
        full = torch.empty(len(with_grad), *g.shape, dtype=ref.dtype, device=ref.device)
        if D is not None:  # this rank's rows; the others arrive in finish()
            full[[with_grad.index(i) for i in worked]] = D
        self._shared.append((k, g, with_grad, full))

    def finish(self, groups: list[BlockGroup], updates: dict[int, Tensor]) -> dict[int, Tensor]:
        share_rows([(D, [self.owners[k][i] for i in with_grad])
                    for k, _, with_grad, D in self._shared], self.process_group, self.timings)
        for _, g, with_grad, D in self._shared:
            scatter_blocks(g, with_grad, D, updates)
        self._shared = []
        return updates

    def whole_state(self, groups: list[BlockGroup]) -> list[dict[str, Tensor]]:
        out = []
        parts: list[tuple[Tensor, list[int]]] = []
        for k, g in enumerate(groups):
            if g.diagonal:
                out.append({name: v.clone() for name, v in g.state.items()})
                continue
            held = [i for i, r in enumerate(g.rows) if r >= 0]
            whole = {}
            for name, v in g.state.items():
                t = v.new_empty(len(g.members), *v.shape[1:])
                t[held] = v[[g.rows[i] for i in held]]
                whole[name] = t
                parts.append((t, self.owners[k]))
            out.append(whole)
        share_rows(parts, self.process_group, self.timings)
        return out


class RowShardedFSDP2(AllGatherDirections):
    """FSDP2 (row-sharded DTensor parameters): each parameter's blocks have one owner, who
    assembles its gradient and sends every rank its rows of the direction."""

    def __init__(self, process_group: Any) -> None:
        super().__init__(process_group)
        self._shard_rows: dict = {}  # cache of shard_rows

    def _owners(self, groups: list[BlockGroup], k: int) -> list[int]:
        if k == 0:  # LPT over parameters: a parameter's blocks share one owner
            slots = [(j, m) for j, g in enumerate(groups) if not g.diagonal
                     for m in range(len(g.members))]
            params = list(dict.fromkeys(id(groups[j].members[m][0]) for j, m in slots))
            cost = dict.fromkeys(params, 0.0)
            for j, m in slots:
                cost[id(groups[j].members[m][0])] += eigh_cost(groups[j].shape)
            self._param_owner = dict(zip(params, lpt_schedule([cost[p] for p in params],
                                                              self.world_size), strict=True))
        return [self._param_owner.get(id(p), 0) for p, _, _ in groups[k].members]

    def gradient_group(self) -> Any:
        return self.process_group

    @staticmethod
    def _params(groups: list[BlockGroup]) -> tuple[list[Tensor], list[Tensor]]:
        """(block parameters, diagonal parameters) with gradients, in a rank-independent
        order."""
        blocks = list({id(p): p for g in groups if not g.diagonal for p, _, _ in g.members
                       if p.grad is not None}.values())
        diag = [p for g in groups if g.diagonal for p, _, _ in g.members if p.grad is not None]
        return blocks, diag

    def gradients(self, groups: list[BlockGroup]) -> dict[int, Tensor]:
        """The row shards of each preconditioned parameter's gradient go to its owner (one
        all-to-all); diagonal-method parameters are gathered on every rank."""
        super().gradients(groups)
        blocks, diag = self._params(groups)
        out = {id(p): p.grad.full_tensor() for p in diag}
        if blocks:
            rows = shard_rows(blocks, self.process_group, self._shard_rows)
            local = [local_tensor(p.grad).reshape(-1, math.prod(p.shape[1:])) for p in blocks]
            with self.timings.measure("communication"):
                whole = _dist.gather_rows_to_owners(
                    local, rows, [self._param_owner[id(p)] for p in blocks], self.process_group)
            out.update({id(blocks[k]): G.view(blocks[k].shape) for k, G in whole.items()})
        return out

    def collect(self, k: int, g: BlockGroup, with_grad: list[int], worked: list[int],
                D: Tensor | None, updates: dict[int, Tensor]) -> None:
        BlockDistributor.collect(self, k, g, with_grad, worked, D, updates)

    def finish(self, groups: list[BlockGroup], updates: dict[int, Tensor]) -> dict[int, Tensor]:
        """Each rank's rows of the directions (owners send the preconditioned ones in one
        all-to-all; diagonal-method directions are whole on every rank)."""
        blocks, diag = self._params(groups)
        rows = shard_rows(blocks + diag, self.process_group, self._shard_rows)
        me = self.rank
        out = {}
        for p, r in zip(diag, rows[len(blocks):], strict=True):
            start = sum(r[:me])
            out[id(p)] = updates[id(p)][start:start + r[me]]
        if blocks:
            owners = [self._param_owner[id(p)] for p in blocks]
            dtype = next(iter(groups[0].state.values())).dtype
            mine = {k: updates[id(p)].reshape(-1, math.prod(p.shape[1:])).to(dtype)
                    for k, p in enumerate(blocks) if owners[k] == me}
            with self.timings.measure("communication"):
                shards = _dist.scatter_rows_from_owners(
                    mine, rows[:len(blocks)], owners, [math.prod(p.shape[1:]) for p in blocks],
                    self.process_group, dtype, local_tensor(blocks[0]).device)
            for p, sh in zip(blocks, shards, strict=True):
                out[id(p)] = sh.view(local_tensor(p).shape)
        return out
