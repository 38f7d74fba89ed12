"""Collectives and schedules shared by curvlab's distributed optimizers (torch.distributed).

Under DDP every rank holds the same averaged gradient, so what is worth splitting is the
*expensive per-block work* (eigendecompositions and inverse roots of Kronecker factors,
Newton-Schulz orthogonalizations): each block gets an owner rank by a longest-processing-time
(LPT) schedule over its cost (:func:`lpt_schedule`; Graham 1969: sort by cost, give each
block to the least loaded rank; at most 4/3 of the optimal makespan), the owner computes it,
and the results are shared (:func:`share_rows`: each rank packs the rows it owns into one
buffer and a single all-gather per dtype hands every rank all buffers, so each result
crosses the network once per receiving rank, a broadcast's volume, in one collective).
How Shampoo and SOAP use them is one distributor class per kind of parallelism
(:mod:`curvlab.optim.distributors.blocks`); Muon all-gathers its Newton-Schulz results the
same way. K-FAC's factors are per-rank statistics of local activations and gradients, so
they are all-reduced first (weighted by the local sample counts, symmetric factors sent as
their upper triangles, packed into buckets; :func:`curvlab.distributed.all_reduce_symmetric`).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.distributed import all_reduce_symmetric

__all__ = ["Timings", "lpt_schedule", "eigh_cost", "newton_schulz_cost", "share_rows",
           "sharded_rows", "all_reduce_symmetric", "is_dtensor", "local_tensor",
           "check_row_sharded", "shard_rows", "reject_dtensors", "DISTRIBUTED_MODES"]

DISTRIBUTED_MODES = ("broadcast", "allgather")


class Timings(dict):
    """Seconds per phase, accumulated: ``"precondition"`` (the sharded block work: roots,
    eigenbases, Newton-Schulz, factor inverses) and ``"communication"`` (collectives),
    wall clock; ``"<phase>_cpu"`` the CPU time of the calling thread in it (insensitive to
    other processes on the machine; on CUDA it is only the launch cost). On CUDA the
    phases are synchronized before reading the clock. Disabled (``enabled=False``: the
    optimizers' default without a process group) it measures nothing: reading the thread
    CPU clock is a system call, and synchronizing would stall a GPU."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def measure(self, key: str) -> contextlib.AbstractContextManager[None]:
        return self._measure(key) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _measure(self, key: str) -> Iterator[None]:
        sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
        sync()
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            sync()
            self[key] = self.get(key, 0.0) + time.perf_counter() - start
            self[f"{key}_cpu"] = self.get(f"{key}_cpu", 0.0) + time.thread_time() - cpu


_NO_TIMINGS = Timings(enabled=False)


def lpt_schedule(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: longest processing time first, each to the least loaded
    rank (ties to the lower rank, so every rank computes the same schedule)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + float(costs[i]), r))
    return owners


def eigh_cost(block_shape: Sequence[int]) -> float:
    """Flops model of refreshing a Kronecker block: one ``d^3`` factorization per mode."""
    return float(sum(d ** 3 for d in block_shape))


def newton_schulz_cost(shape: Sequence[int]) -> float:
    """Flops model of Newton-Schulz on an ``A x B`` matrix: ``A B min(A, B)`` per iteration."""
    a, b = shape[0], 1
    for d in shape[1:]:
        b *= d
    return float(a * b * min(a, b))


def share_rows(parts: Sequence[tuple[Tensor, Sequence[int]]], group: Any,
               timings: Timings = _NO_TIMINGS) -> None:
    """In place, for every ``(tensor, owners)`` of ``parts``: row ``i`` (leading dimension)
    of ``tensor`` takes its value on rank ``owners[i]``.

    Each rank packs the rows it owns (of all parts) into one buffer, padded to the largest
    rank's share, and one all-gather per dtype delivers every rank's buffer: a rank sends
    only its own rows (``(w - 1) / w`` of the data, half of what summing zero-filled copies
    in an all-reduce moves)."""
    if group is None or not parts:
        return
    world, me = _dist.world_size(group), _dist.rank(group)
    by_dtype: dict[tuple, list[tuple[Tensor, Sequence[int]]]] = {}
    for t, owners in parts:
        if len(owners) != t.shape[0]:
            raise ValueError(f"share_rows: {len(owners)} owners for {t.shape[0]} rows")
        by_dtype.setdefault((t.dtype, t.device), []).append((t, owners))
    for (dtype, device), items in by_dtype.items():
        rows = [[[i for i, o in enumerate(owners) if o == r] for r in range(world)]
                for _, owners in items]  # rows[part][rank]
        sizes = [sum(len(rows[j][r]) * (t.numel() // max(t.shape[0], 1))
                     for j, (t, _) in enumerate(items)) for r in range(world)]
        chunk = max(sizes)
        if chunk == 0:
            continue
        send = torch.zeros(chunk, dtype=dtype, device=device)
        off = 0
        for j, (t, _) in enumerate(items):
            if rows[j][me]:
                block = t[rows[j][me]].reshape(-1)
                send[off:off + block.numel()] = block
                off += block.numel()
        recv = torch.empty(world * chunk, dtype=dtype, device=device)
        with timings.measure("communication"):
            _dist.all_gather_single(recv, send, group)
        for r in range(world):
            if r == me:
                continue
            off = r * chunk
            for j, (t, _) in enumerate(items):
                if rows[j][r]:
                    n = len(rows[j][r]) * (t.numel() // t.shape[0])
                    t[rows[j][r]] = recv[off:off + n].view(len(rows[j][r]), *t.shape[1:])
                    off += n


def sharded_rows(fn: Callable[[dict[str, Tensor]], None], state: dict[str, Tensor],
                 owners: Sequence[int], keys: Sequence[str], group: Any,
                 timings: Timings = _NO_TIMINGS, reads: Sequence[str] = ()) -> None:
    """Run the in-place refresh ``fn`` on the rows of the stacked ``state`` this rank owns
    (``fn`` sees the entries ``reads`` and ``keys`` only), then give every rank the owners'
    new values of ``keys`` (see :func:`share_rows`). Without a group, ``fn(state)``."""
    if group is None:
        with timings.measure("precondition"):
            fn(state)
        return
    me = _dist.rank(group)
    mine = [i for i, o in enumerate(owners) if o == me]
    if mine:
        with timings.measure("precondition"):
            if mine == list(range(mine[0], mine[-1] + 1)):  # contiguous rows: views
                rows: Any = slice(mine[0], mine[-1] + 1)
            else:
                rows = torch.tensor(mine, device=next(iter(state.values())).device)
            before = {k: state[k][rows] for k in dict.fromkeys((*reads, *keys))}
            sub = dict(before)
            fn(sub)
            for k in keys:  # copies (index rows) or entries fn replaced need writing back
                if not (isinstance(rows, slice) and sub[k] is before[k]):
                    state[k][rows] = sub[k]
    share_rows([(state[k], owners) for k in keys], group, timings)


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 / tensor-parallel shard)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor this rank stores: a DTensor's local shard (shares its storage)."""
    return t.to_local() if is_dtensor(t) else t


def check_row_sharded(params: Sequence[Tensor], group: Any, name: str) -> None:
    """FSDP2 parameters must all be DTensors sharded along dim 0 over ``group`` on a 1-D
    mesh (the ``fully_shard`` default); other layouts, or DTensors mixed with regular
    tensors, are refused (TypeError / ValueError)."""
    if not all(is_dtensor(p) for p in params):
        raise TypeError(f"{name} got DTensor (FSDP2) parameters mixed with regular tensors; "
                        "shard every parameter (fully_shard the whole model) or none")
    for p in params:
        _check_row_sharded(p, group)


def _check_row_sharded(p: Tensor, group: Any) -> None:
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise TypeError(f"DTensor parameters must be sharded along dim 0 on a 1-D mesh "
                        f"(fully_shard's default); got a mesh of {mesh.ndim} dims and "
                        f"placements {tuple(p.placements)}")
    if mesh.size() != _dist.world_size(group):
        raise ValueError(f"the DTensor parameters are sharded over {mesh.size()} ranks but "
                         f"process_group has {_dist.world_size(group)}: pass the group the "
                         "parameters are sharded over")


def shard_rows(params: Sequence[Tensor], group: Any, cache: dict) -> list[list[int]]:
    """``rows[k][r]``: rows of parameter ``k``'s shard on rank ``r`` (row-sharded DTensors;
    one all-gather the first time, then from ``cache``)."""
    key = tuple(id(p) for p in params)
    if key not in cache:
        world = _dist.world_size(group)
        mine = torch.tensor([local_tensor(p).shape[0] if p.ndim else 1 for p in params],
                            dtype=torch.int64, device=_dist.comm_device(group))
        every = torch.empty(world * len(params), dtype=torch.int64, device=mine.device)
        _dist.all_gather_single(every, mine, group)
        cache[key] = [[int(n) for n in col] for col in every.view(world, len(params)).T.tolist()]
    return cache[key]


def reject_dtensors(params: Any, name: str, hint: str) -> None:
    """Raise TypeError at construction if any parameter is a DTensor (FSDP2 shard):
    ``name`` would otherwise precondition the local shard as if it were the matrix."""
    for p in params:
        if is_dtensor(p):
            raise TypeError(f"{name} does not support DTensor parameters (FSDP2 "
                            f"fully_shard): preconditioning a shard as if it were the whole "
                            f"matrix is wrong math. {hint}")
