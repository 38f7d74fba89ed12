"""torch.distributed helpers shared by curvlab's data-parallel code paths.

curvlab runs on PyTorch's own distributed engine (``torch.distributed``: DDP, FSDP2); this
module only adds the few pieces curvlab needs on top of it:

* :func:`resolve_group` turns the user's ``process_group`` argument (``None``,
  ``"default"`` or a ``ProcessGroup``) into a group or ``None``. Distribution is always
  *explicit*: an :class:`~curvlab.objective.Objective` built without ``process_group``
  is a single-process objective even when ``torch.distributed`` is initialized, so a
  rank never silently averages with others (or waits for them).
* :func:`all_reduce_sum` and :func:`all_reduce_coalesced` (one flat buffer per bucket,
  so many small tensors cost one collective each bucket instead of one each).
* :func:`synced_generator`: a ``torch.Generator`` seeded identically on every rank, so
  random probe vectors (Lanczos start vectors, Hutchinson probes) agree and the Krylov
  recurrences of all ranks stay in lockstep.
* :func:`check_same_across_ranks`: a cheap guard (one small all-reduce) that a tensor
  every rank must hold identically really is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "rank", "comm_device", "all_reduce_sum",
           "all_reduce_coalesced", "broadcast_coalesced", "synced_generator",
           "check_same_across_ranks"]

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
