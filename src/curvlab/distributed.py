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
  ``state_dict``) saved atomically (a kill never destroys the previous checkpoint) as a
  JSON manifest (declared, versioned layout) plus raw tensor bytes, loadable on any
  number of ranks without building a template first and without unpickling anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "rank", "comm_device", "all_reduce_sum",
           "all_gather_single", "gather_rows_to_owners", "scatter_rows_from_owners",
           "all_reduce_coalesced", "all_reduce_symmetric",
           "broadcast_coalesced", "synced_generator", "check_same_across_ranks",
           "save_checkpoint", "load_checkpoint", "CheckpointError"]

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
    optional :class:`curvlab.optim.distributors.collectives.Timings` to charge the
    collective to."""
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


# ---- checkpoints --------------------------------------------------------------------------
CHECKPOINT_FORMAT = "curvlab-checkpoint"
CHECKPOINT_VERSION = 1
_MANIFEST = "manifest.json"
_ALIGN = 64  # tensor offsets in the data file (so each is viewed in place, never copied)
_DATA_NAME = re.compile(r"data-[0-9A-Za-z-]+\.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (incomplete, corrupt, of an unknown format or
    version); the message names the file and what is wrong."""


def _dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ``stride`` lays ``shape`` out without overlaps or gaps (a permutation of the
    dimensions is contiguous), so the tensor's bytes are exactly its elements."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride, strict=True) if n != 1):
        if s != expected:
            return False
        expected *= n
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


_SUPPORTED = ("tensors, dicts (str or int keys), lists, tuples, str, int, float, bool, None "
              "and torch.dtype")


def _encode(obj: Any, tensors: list[tuple[str, torch.Tensor]], path: str) -> Any:
    """The JSON layout of ``obj``: plain JSON for None / bool / int / finite float / str, a
    one-key object for everything else (``{"tensor": i}``, ``{"dict": [[k, v], ...]}``,
    ``{"odict": ...}``, ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"float": "nan"}``,
    ``{"dtype": "float32"}``); tensors are appended to ``tensors``."""
    kind = type(obj)
    if obj is None or kind in (bool, int, str):
        return obj
    if kind is float:
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        tensors.append((path, obj))
        return {"tensor": len(tensors) - 1}
    if isinstance(obj, torch.dtype):
        return {"dtype": _dtype_name(obj)}
    if kind in (list, tuple):
        return {kind.__name__: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if kind in (dict, OrderedDict):
        items = []
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint state{path} has a key {k!r} of type "
                                f"{type(k).__name__}; keys must be str or int")
            items.append([k, _encode(v, tensors, f"{path}[{k!r}]")])
        return {"odict" if kind is OrderedDict else "dict": items}
    raise TypeError(f"checkpoint state{path} is a {kind.__module__}.{kind.__qualname__}; a "
                    f"checkpoint holds {_SUPPORTED}: convert it first (e.g. float(x), "
                    f"x.tolist(), torch.as_tensor(x))")


def _tensor_bytes(t: torch.Tensor, path: str) -> tuple[torch.Tensor, list[int]]:
    """``t`` on the CPU as contiguous bytes, and the strides to restore on load."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta or type(t).__name__ == "DTensor":
        raise TypeError(f"checkpoint state{path} is a {type(t).__name__} with layout "
                        f"{t.layout}; save_checkpoint takes plain dense tensors (for DTensor "
                        "model states use torch.distributed.checkpoint directly)")
    t = t.detach()
    stride = list(t.stride()) if t.numel() and _dense(t.shape, t.stride()) else None
    t = t.to("cpu").resolve_conj().resolve_neg().contiguous()
    if stride is None:
        stride = list(t.stride())
    return t.reshape(-1).view(torch.uint8), stride


def _write_checkpoint(state: dict[str, Any], root: Path) -> None:
    """Tensor bytes to a new ``data-<token>.bin``, then the manifest (layout, tensor table,
    size and SHA-256 of the data file) to a temporary sibling renamed over
    ``manifest.json``: a kill at any point leaves either the old or the new manifest, each
    naming a complete data file. Files of the replaced or interrupted saves go last."""
    tensors: list[tuple[str, torch.Tensor]] = []
    layout = _encode(state, tensors, "")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"checkpoint_id {root} is a file; a checkpoint is a folder")
    root.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    data_name = f"data-{token}.bin"
    digest, table, offset = hashlib.sha256(), [], 0
    with open(root / data_name, "xb") as fh:
        for path, t in tensors:
            raw, stride = _tensor_bytes(t, path)
            pad = bytes(-offset % _ALIGN)
            fh.write(pad)
            digest.update(pad)
            offset += len(pad)
            view = raw.numpy().data
            fh.write(view)
            digest.update(view)
            table.append({"dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                          "stride": stride, "offset": offset, "nbytes": raw.numel()})
            offset += raw.numel()
        fh.flush()
        os.fsync(fh.fileno())
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "data": data_name,
                "bytes": offset, "sha256": digest.hexdigest(), "torch": torch.__version__,
                "tensors": table, "layout": layout}
    tmp = root / f"{_MANIFEST}.tmp-{token}"
    with open(tmp, "x", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, allow_nan=False))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / _MANIFEST)
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for p in root.iterdir():
        stale = ((_DATA_NAME.fullmatch(p.name) and p.name != data_name)
                 or p.name.startswith(f"{_MANIFEST}.tmp-"))
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def save_checkpoint(state: dict[str, Any], checkpoint_id: str | Path,
                    process_group: Any = None) -> None:
    """Save ``state`` (e.g. ``{"model": model.state_dict(), "optim": opt.state_dict()}``)
    to the folder ``checkpoint_id``, atomically: until the new checkpoint is complete the
    previous one stays loadable, whatever kills the process.

    The folder holds ``manifest.json`` (format, version, the nested layout as JSON, a table
    of tensor dtypes / shapes / strides / offsets, the data file's size and SHA-256) and one
    data file of raw tensor bytes; nothing is pickled. With ``process_group`` every rank
    calls this and group rank 0 writes: tensors must be plain (replicated) tensors, which
    curvlab's optimizers keep identical on every rank, so any world size can resume. For
    DTensor (FSDP2) model states use ``torch.distributed.checkpoint`` directly. One writer
    per folder at a time."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    group = resolve_group(process_group)
    root = Path(checkpoint_id)
    if group is None:
        _write_checkpoint(state, root)
        return
    error: BaseException | None = None
    if rank(group) == 0:
        try:
            _write_checkpoint(state, root)
        except Exception as err:  # reported to every rank below, re-raised here
            error = err
    failed = torch.tensor([error is not None], dtype=torch.int32, device=comm_device(group))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"rank 0 failed to write the checkpoint {root} (see its error)")


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / _MANIFEST
    if not root.exists():
        raise FileNotFoundError(f"no checkpoint at {root}")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; a checkpoint written by save_checkpoint is "
                              "a folder")
    if not path.is_file():
        if (root / ".metadata").exists():
            raise CheckpointError(
                f"{root} is a torch.distributed.checkpoint folder (written by an older "
                "curvlab); its layout is pickled, so curvlab does not load it: if you trust "
                "the file, read it with torch.distributed.checkpoint.load and save it again")
        raise CheckpointError(f"{root} holds no complete checkpoint ({_MANIFEST} is missing: "
                              "the first save was interrupted, or the folder was not written "
                              "by curvlab.distributed.save_checkpoint)")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a curvlab checkpoint manifest (format {fmt!r})")
    version = manifest.get("version")
    if type(version) is not int or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this curvlab reads "
                              f"versions 1..{CHECKPOINT_VERSION} (upgrade curvlab)")
    return manifest


def _read_tensors(root: Path, manifest: dict[str, Any], device: Any) -> list[torch.Tensor]:
    mpath = root / _MANIFEST
    name, size, sha = manifest.get("data"), manifest.get("bytes"), manifest.get("sha256")
    table = manifest.get("tensors")
    if not (isinstance(name, str) and _DATA_NAME.fullmatch(name) and type(size) is int
            and isinstance(sha, str) and isinstance(table, list)):
        raise CheckpointError(f"{mpath} lacks a valid 'data', 'bytes', 'sha256' or 'tensors' "
                              "entry")
    data = root / name
    try:
        buf = bytearray(data.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{data}, named by {mpath}, is missing") from None
    if len(buf) != size:
        raise CheckpointError(f"{data} has {len(buf)} bytes, {mpath} says {size}: the file "
                              "was truncated or replaced")
    if hashlib.sha256(buf).hexdigest() != sha:
        raise CheckpointError(f"{data} does not match the SHA-256 in {mpath}: the file is "
                              "corrupt")
    flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    out = []
    for i, rec in enumerate(table):
        ok = isinstance(rec, dict)
        dtype = _dtype(rec.get("dtype")) if ok else None
        shape, stride = (rec.get("shape"), rec.get("stride")) if ok else (None, None)
        offset, nbytes = (rec.get("offset"), rec.get("nbytes")) if ok else (None, None)
        ok = (dtype is not None and isinstance(shape, list) and isinstance(stride, list)
              and len(shape) == len(stride)
              and all(type(n) is int and n >= 0 for n in shape)
              and all(type(s) is int and s >= 0 for s in stride)
              and type(offset) is int and type(nbytes) is int and offset >= 0)
        if ok:
            itemsize = torch.empty((), dtype=dtype).element_size()
            ok = (nbytes == math.prod(shape) * itemsize and offset % itemsize == 0
                  and offset + nbytes <= size and _dense(shape, stride))
        if not ok:
            raise CheckpointError(f"{mpath}: tensor entry {i} is not valid ({rec!r})")
        values = flat[offset:offset + nbytes].view(dtype).view(shape)
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        out.append(t.copy_(values))
    return out


def _decode(node: Any, tensors: list[torch.Tensor], path: str, where: Path) -> Any:
    if node is None or type(node) in (bool, int, float, str):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "tensor" and type(value) is int and 0 <= value < len(tensors):
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == "dtype" and _dtype(value) is not None:
            return _dtype(value)
        if tag in ("list", "tuple") and isinstance(value, list):
            items = [_decode(v, tensors, f"{path}[{i}]", where) for i, v in enumerate(value)]
            return items if tag == "list" else tuple(items)
        if tag in ("dict", "odict") and isinstance(value, list) and all(
                isinstance(kv, list) and len(kv) == 2 and type(kv[0]) in (str, int)
                for kv in value):
            kind = dict if tag == "dict" else OrderedDict
            return kind((k, _decode(v, tensors, f"{path}[{k!r}]", where)) for k, v in value)
    raise CheckpointError(f"{where}: the layout entry state{path} is not valid "
                          f"({str(node)[:80]})")


def load_checkpoint(checkpoint_id: str | Path, process_group: Any = None,
                    device: Any = "cpu") -> dict[str, Any]:
    """Load what :func:`save_checkpoint` saved (tensors on ``device``, with their saved
    strides); pass the parts to ``model.load_state_dict`` / ``opt.load_state_dict``.

    Any number of ranks may load (each reads the files itself; ``process_group`` is only
    validated). Nothing is unpickled: the manifest is JSON and the tensors raw bytes,
    checked against the manifest's size and SHA-256. A missing folder raises
    FileNotFoundError; an incomplete, corrupt or unknown checkpoint raises
    :class:`CheckpointError` (a ValueError) naming the file and the problem."""
    resolve_group(process_group)
    root = Path(checkpoint_id)
    manifest = _read_manifest(root)
    tensors = _read_tensors(root, manifest, device)
    try:
        state = _decode(manifest.get("layout"), tensors, "", root / _MANIFEST)
    except RecursionError:
        raise CheckpointError(f"{root / _MANIFEST}: the layout is nested too deeply") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{root / _MANIFEST}: the layout is not a dict")
    return state
