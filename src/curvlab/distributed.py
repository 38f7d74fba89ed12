"""torch.distributed helpers shared by curvlab's data-parallel code paths.

curvlab runs on PyTorch's own distributed engine (``torch.distributed``: DDP, FSDP2); this
module only adds the few pieces curvlab needs on top of it:

* :func:`resolve_group` turns the user's ``process_group`` argument (``None``,
  ``"default"`` or a ``ProcessGroup``) into a group or ``None``. Distribution is always
  *explicit*: an :class:`~curvlab.objective.Objective` built without ``process_group``
  is a single-process objective even when ``torch.distributed`` is initialized, so a
  rank never silently averages with others (or waits for them).
* :func:`all_reduce_sum` and :func:`all_reduce_coalesced` (one flat buffer per bucket,
  so many small tensors cost one collective each bucket instead of one each);
  :func:`all_gather_single` (rank-ordered concatenation of equal-sized buffers);
  :func:`gather_rows_to_owners` / :func:`scatter_rows_from_owners` (row-sharded matrices
  assembled on one owner rank each and split back, one all-to-all each).
* :func:`synced_generator`: a ``torch.Generator`` seeded identically on every rank, so
  random probe vectors (Lanczos start vectors, Hutchinson probes) agree and the Krylov
  recurrences of all ranks stay in lockstep.
* :func:`check_same_across_ranks`: a cheap guard (one small all-reduce) that a tensor
  every rank must hold identically really is identical.
* :func:`save_checkpoint` / :func:`load_checkpoint`: a nested state (model and optimizer
  ``state_dict``) through ``torch.distributed.checkpoint`` (DCP: ranks write in parallel,
  replicated tensors once), loadable on any number of ranks without building a template
  first (the nested layout is stored next to the tensors).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "rank", "comm_device", "all_reduce_sum",
           "all_gather_single", "gather_rows_to_owners", "scatter_rows_from_owners",
           "all_reduce_coalesced", "all_reduce_symmetric",
           "broadcast_coalesced", "synced_generator", "check_same_across_ranks",
           "save_checkpoint", "load_checkpoint"]

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket size (25 MiB)


def resolve_group(process_group: Any) -> Any:
    """``None`` -> ``None`` (single process); ``"default"`` -> the default (world) group,
    which must be initialized; a ``ProcessGroup`` -> itself."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(f"process_group must be None, 'default' or a ProcessGroup, got "
                             f"{process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group='default' needs torch.distributed to be "
                             "initialized; call torch.distributed.init_process_group() first "
                             "(torchrun sets up the environment for it)")
        return dist.group.WORLD
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(f"process_group must be None, 'default' or a "
                    f"torch.distributed.ProcessGroup, got {type(process_group).__name__}")


def world_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group: Any) -> int:
    """This process's rank within ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def comm_device(group: Any) -> torch.device:
    """Device for small bookkeeping tensors in a collective: CUDA for nccl, else CPU."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (in place; ``tensor`` is returned).
    A no-op for ``group=None``."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    """Concatenation of every rank's flat ``tensor`` (equal sizes, rank order) into
    ``output`` of ``world_size * tensor.numel()`` elements."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def gather_rows_to_owners(shards: Sequence[torch.Tensor], rows: Sequence[Sequence[int]],
                          owners: Sequence[int], group: Any) -> dict[int, torch.Tensor]:
    """Matrix ``k`` is split by rows over the ranks (``rows[k][r]`` rows on rank ``r``,
    in rank order; this rank's part is ``shards[k]``, 2-D, one dtype): assemble each matrix
    on its owner ``owners[k]`` only, with one all-to-all. Returns ``{k: matrix}`` for the
    matrices this rank owns."""
    world, me = world_size(group), rank(group)
    send = [torch.cat([shards[k].reshape(-1) for k in range(len(shards)) if owners[k] == o]
                      or [shards[0].new_empty(0)]) for o in range(world)]
    cols = [s.shape[1] for s in shards]
    mine = [k for k in range(len(shards)) if owners[k] == me]
    out_splits = [sum(rows[k][r] * cols[k] for k in mine) for r in range(world)]
    recv = shards[0].new_empty(sum(out_splits))
    dist.all_to_all_single(recv, torch.cat(send), out_splits, [t.numel() for t in send],
                           group=group)
    pieces: dict[int, list[torch.Tensor]] = {k: [] for k in mine}
    off = 0
    for r in range(world):
        for k in mine:
            n = rows[k][r] * cols[k]
            pieces[k].append(recv[off:off + n].view(rows[k][r], cols[k]))
            off += n
    return {k: torch.cat(p) for k, p in pieces.items()}


def scatter_rows_from_owners(full: dict[int, torch.Tensor], rows: Sequence[Sequence[int]],
                             owners: Sequence[int], cols: Sequence[int], group: Any,
                             dtype: torch.dtype, device: Any) -> list[torch.Tensor]:
    """The inverse of :func:`gather_rows_to_owners`: every owner splits its matrices
    ``full[k]`` by ``rows[k]`` and each rank receives its rows of every matrix (one
    all-to-all). Returns this rank's ``(rows[k][me], cols[k])`` part of every matrix."""
    world, me = world_size(group), rank(group)
    mine = sorted(full)
    starts = {k: [sum(rows[k][:r]) for r in range(world)] for k in mine}
    send = [full[k][starts[k][r]:starts[k][r] + rows[k][r]].reshape(-1)
            for r in range(world) for k in mine]
    in_splits = [sum(rows[k][r] * cols[k] for k in mine) for r in range(world)]
    out_splits = [sum(rows[k][me] * cols[k] for k in range(len(owners)) if owners[k] == o)
                  for o in range(world)]
    recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
    send_flat = torch.cat(send) if send else recv.new_empty(0)
    dist.all_to_all_single(recv, send_flat, out_splits, in_splits, group=group)
    out: list[torch.Tensor | None] = [None] * len(owners)
    off = 0
    for o in range(world):
        for k in range(len(owners)):
            if owners[k] == o:
                n = rows[k][me] * cols[k]
                out[k] = recv[off:off + n].view(rows[k][me], cols[k])
                off += n
    return out  # type: ignore[return-value]


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive index runs of equal dtype/device, each at most ``bucket_bytes`` (a
    tensor larger than a bucket gets a bucket of its own)."""
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        prev = tensors[out[-1][-1]] if out else None
        if (prev is None or prev.dtype != t.dtype or prev.device != t.device
                or size + nbytes > bucket_bytes):
            out.append([i])
            size = nbytes
        else:
            out[-1].append(i)
            size += nbytes
    return out


def all_reduce_coalesced(tensors: Sequence[torch.Tensor], group: Any, *,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum every tensor of ``tensors`` over ``group`` in place, packed into flat buckets
    of at most ``bucket_bytes`` (one collective per bucket)."""
    if group is None or not tensors:
        return
    for idx in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n


def all_reduce_symmetric(mats: Sequence[torch.Tensor], group: Any,
                         timings: Any = None) -> None:
    """Sum symmetric matrices over ``group`` in place, sending only upper triangles
    (``d (d + 1) / 2`` numbers instead of ``d^2``), packed into buckets. ``timings``: an
    optional :class:`curvlab.optim._distributed.Timings` to charge the collective to."""
    if group is None or not mats:
        return
    packed, rows = [], []
    for M in mats:
        iu = torch.triu_indices(M.shape[-1], M.shape[-1], device=M.device)
        rows.append(iu)
        packed.append(M[..., iu[0], iu[1]].contiguous())
    with timings.measure("communication") if timings is not None else contextlib.nullcontext():
        all_reduce_coalesced(packed, group)
    for M, iu, u in zip(mats, rows, packed, strict=True):
        M[..., iu[0], iu[1]] = u
        M[..., iu[1], iu[0]] = u


def broadcast_coalesced(tensors: Sequence[torch.Tensor], src: int, group: Any, *,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Broadcast ``tensors`` (in place) from group rank ``src``, packed into buckets."""
    if group is None or not tensors:
        return
    src_global = dist.get_global_rank(group, src)
    for idx in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.broadcast(flat, src=src_global, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n


def synced_generator(seed: int | None = None, group: Any = None,
                     device: Any = "cpu") -> torch.Generator:
    """A generator seeded identically on all ranks of ``group``: with ``seed`` given, from
    it; otherwise from fresh entropy drawn on rank 0 and broadcast."""
    group = resolve_group(group)
    gen = torch.Generator(device=device)
    if seed is None:
        seed = gen.seed() % 2 ** 62  # fresh entropy (the global RNG is left untouched)
        if group is None:
            return gen
        value = torch.tensor([seed if rank(group) == 0 else 0], dtype=torch.int64,
                             device=comm_device(group))
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        seed = int(value)
    gen.manual_seed(seed)
    return gen


def check_same_across_ranks(tensor: torch.Tensor, group: Any, name: str) -> None:
    """Raise ValueError if ``tensor`` differs between the ranks of ``group`` (compared by
    its min and max over ranks of a weighted checksum; one all-reduce of 2 numbers)."""
    if group is None:
        return
    flat = tensor.detach().reshape(-1).to(torch.float64)
    weights = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
    c = torch.nan_to_num(torch.dot(flat, weights))
    both = torch.stack([c, -c])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if bool(both[0] != -both[1]):
        raise ValueError(f"{name} differs across ranks; every rank must pass the same "
                         f"{name} (seed random probes identically, e.g. with "
                         f"curvlab.distributed.synced_generator)")


@dataclass(frozen=True)
class _TensorSlot:
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # kept: BLAS rounds differently on transposed layouts
    dtype: torch.dtype


def _skeleton(obj: Any) -> Any:
    """``obj`` with every tensor replaced by its shape and dtype."""
    if isinstance(obj, torch.Tensor):
        return _TensorSlot(tuple(obj.shape), tuple(obj.stride()), obj.dtype)
    if isinstance(obj, dict):
        return type(obj)((k, _skeleton(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_skeleton(v) for v in obj)
    return obj


def _materialize(obj: Any, device: Any) -> Any:
    if isinstance(obj, _TensorSlot):
        return torch.empty_strided(obj.shape, obj.stride, dtype=obj.dtype, device=device)
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, device) for v in obj)
    return obj


def save_checkpoint(state: dict[str, Any], checkpoint_id: str | Path,
                    process_group: Any = None) -> None:
    """Save ``state`` (e.g. ``{"model": model.state_dict(), "optim": opt.state_dict()}``)
    with ``torch.distributed.checkpoint.save`` on all ranks of ``process_group``.

    Tensors must be plain (replicated) tensors: curvlab's optimizers keep their state
    identical on every rank, so any world size can resume from it. For DTensor (FSDP2)
    model states use ``torch.distributed.checkpoint`` with the model's own
    ``state_dict()`` as the load template."""
    import torch.distributed.checkpoint as dcp

    group = resolve_group(process_group)
    layout = pickle.dumps(_skeleton(state))
    with _single_process_note(group):
        dcp.save({"state": state, "layout": layout}, checkpoint_id=str(checkpoint_id),
                 process_group=group, no_dist=group is None)


def load_checkpoint(checkpoint_id: str | Path, process_group: Any = None,
                    device: Any = "cpu") -> dict[str, Any]:
    """Load what :func:`save_checkpoint` saved, on any number of ranks (tensors on
    ``device``); pass the parts to ``model.load_state_dict`` / ``opt.load_state_dict``."""
    import torch.distributed.checkpoint as dcp

    group = resolve_group(process_group)
    head: dict[str, Any] = {"layout": b""}
    with _single_process_note(group):
        dcp.load(head, checkpoint_id=str(checkpoint_id), process_group=group,
                 no_dist=group is None)
        state = _materialize(pickle.loads(head["layout"]), device)
        dcp.load({"state": state}, checkpoint_id=str(checkpoint_id), process_group=group,
                 no_dist=group is None)
    return state


@contextlib.contextmanager
def _single_process_note(group: Any) -> Iterator[None]:
    """Silence DCP's "assuming the intent is to ... in a single process" warning when the
    single process is what the caller asked for (``process_group=None``)."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
