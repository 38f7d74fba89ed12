"""Shared machinery of the structured preconditioners (Shampoo, SOAP; reused by K-FAC).

Pieces, each usable on its own:

* **Blocking** (:func:`plan_blocks`): a parameter is reshaped by dropping size-1 dimensions and
  greedily merging adjacent dimensions while the product stays ``<= max_preconditioner_dim``
  (never merging a multi-dimensional tensor into a single vector: that is the size trap that
  turns a 128x64 weight into one 8192x8192 factor); each dimension is then split into chunks
  of at most ``max_preconditioner_dim``. The Cartesian product of chunks are the blocks.
  1-D tensors, scalars and parameters with more than ``diagonal_threshold`` elements use a
  diagonal method instead (Anil et al. 2020, "Scalable second order optimization", Sec. 4;
  Shi et al. 2023, "Distributed Shampoo", Sec. 3.2).
* **Batched block groups**: blocks of equal shape (in one param group, dtype and device) are
  stacked, so statistics, roots and preconditioning are a handful of batched kernels per
  step no matter how many layers the model has.
* **Kronecker statistics** (:func:`kronecker_statistic`): for an order-k block ``G`` the i-th
  factor statistic is ``G_(i) G_(i)^T`` (mode-i unfolding), accumulated as an EMA
  ``F <- beta F + (1 - beta) S`` or, for ``beta == 1``, as the running sum of Shampoo.
* **Amortization** (:func:`is_due`): expensive refreshes run at ``start, start + f, ...``.
* **Failure policy** (:func:`guarded_batched`): a matrix function that raises
  :class:`~curvlab.linalg.matfuncs.MatrixFunctionError` or returns non-finite values is retried
  block by block; blocks that still fail keep their previous value (counted and logged).
  When the step's gradient magnitude could overflow the statistics' dtype, state updates go
  through :func:`finite_or_keep` (a block whose update is non-finite keeps its old value);
  otherwise they are single in-place kernels. A block whose final direction is non-finite is
  zeroed (counted in ``stats()["nonfinite_block_updates"]``), so parameters stay finite.
* **Non-finite gradients** (:func:`max_abs`): the optimizer either skips the whole step
  (``nonfinite="skip"``, counted, logged; no parameter or state changes) or raises
  ``FloatingPointError`` (``nonfinite="raise"``).
* **Data parallel** (``process_group``): under DDP every rank holds the same averaged
  gradient; blocks get owner ranks by a longest-processing-time schedule. With
  ``distributed_mode="broadcast"`` only the refreshes (roots, eigenbases) are split and
  their results shared at refresh steps; with ``"allgather"`` all block work and the block
  state are split and the directions are shared every step
  (:mod:`curvlab.optim._distributed`). FSDP2 (row-sharded DTensor parameters) needs
  ``"allgather"``: a parameter's blocks share one owner, which receives the gradient's row
  shards (one all-to-all), preconditions the whole blocks and sends every rank its rows of
  the direction (a second all-to-all); diagonal-method parameters are gathered whole on
  every rank. The default ``"broadcast"`` is refused at construction for DTensors.
* **Grafting** (:func:`graft_direction`): the layer-wise step size of a diagonal method
  (SGD, AdaGrad, RMSprop, Adam) applied to the direction of the structured preconditioner,
  per block: ``P * ||D|| / ||P||`` (Agarwal et al. 2020, "Disentangling adaptive gradient
  methods from learning rates").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.linalg.matfuncs import MatrixFunctionError
from curvlab.optim._distributed import (
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

logger = logging.getLogger(__name__)

__all__ = [
    "GRAFTING_METHODS",
    "BlockPlan",
    "plan_blocks",
    "kronecker_statistic",
    "ema_",
    "finite_or_keep",
    "is_due",
    "guarded_batched",
    "max_abs",
    "gradient_bound",
    "mode_product",
    "graft_direction",
    "graft",
    "BlockedPreconditionerOptimizer",
]

GRAFTING_METHODS = ("none", "sgd", "adagrad", "rmsprop", "adam")
_NONFINITE = ("skip", "raise")


# ----------------------------------------------------------------------------- blocking
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


# ----------------------------------------------------------------------------- statistics
def kronecker_statistic(G: Tensor, dim: int) -> Tensor:
    """Mode-``dim`` Gram matrix ``G_(dim) G_(dim)^T`` of a batch of blocks ``G`` (B, *s)."""
    if G.ndim == 3:  # fast path for matrices
        return torch.bmm(G, G.mT) if dim == 0 else torch.bmm(G.mT, G)
    Gi = G.movedim(1 + dim, -1).reshape(G.shape[0], -1, G.shape[1 + dim])
    return torch.bmm(Gi.mT, Gi)


def mode_product(G: Tensor, M: Tensor, dim: int, transpose: bool = False) -> Tensor:
    """Multiply batch of blocks ``G`` (B, *s) along mode ``dim`` by ``M`` (B, d, d).

    Returns ``G x_dim M`` (i.e. ``M @ G`` for dim 0 of a matrix), or with ``M^T`` if
    ``transpose``.
    """
    Mt = M if transpose else M.mT
    if G.ndim == 3:
        if dim == 0:
            return torch.bmm(Mt.mT, G)
        return torch.bmm(G, Mt)
    out = torch.matmul(G.movedim(1 + dim, -1), Mt.unsqueeze(1) if G.ndim > 3 else Mt)
    return out.movedim(-1, 1 + dim)


def ema_(F: Tensor, S: Tensor, beta: float, guard: bool = True) -> None:
    """In place ``F <- beta F + (1 - beta) S``; ``beta == 1`` means the running sum ``F += S``.

    With ``guard``, a block whose new value is non-finite keeps its old value
    (see :func:`finite_or_keep`); without it the update is a single in-place kernel.
    """
    if not guard:
        if beta == 1.0:
            F.add_(S)
        else:
            F.lerp_(S, 1.0 - beta)
        return
    new = F + S if beta == 1.0 else torch.lerp(F, S, 1.0 - beta)
    finite_or_keep(F, new)


def finite_or_keep(old: Tensor, new: Tensor) -> None:
    """``old <- new`` for every leading-dim block of ``new`` that is entirely finite."""
    ok = torch.isfinite(new).flatten(1).all(1) if new.ndim > 1 else torch.isfinite(new)
    ok = ok.view(-1, *([1] * (new.ndim - 1)))
    old.copy_(torch.where(ok, new, old))


def is_due(step: int, start: int, frequency: int) -> bool:
    """Whether an amortized refresh runs at ``step`` (1-based): ``start, start + f, ...``."""
    return step >= start and (step - start) % frequency == 0


def guarded_batched(
    fn: Callable[..., tuple[Tensor, ...]],
    inputs: tuple[Tensor, ...],
    previous: tuple[Tensor, ...],
) -> tuple[tuple[Tensor, ...], int]:
    """Apply a batched matrix function with the keep-previous failure policy.

    ``fn(*inputs)`` maps batches (B, ...) to a tuple of batched outputs and raises
    :class:`MatrixFunctionError` on failure or non-finite output. On failure the batch is
    retried block by block; a block that still fails takes its entry of ``previous``.
    Returns ``(outputs, number_of_failed_blocks)``.
    """
    try:
        return fn(*inputs), 0
    except MatrixFunctionError as err:
        logger.debug("batched matrix function failed (%s); retrying per block", err)
    outs: list[tuple[Tensor, ...]] = []
    failed = 0
    for b in range(inputs[0].shape[0]):
        try:
            outs.append(fn(*(x[b : b + 1] for x in inputs)))
        except MatrixFunctionError as err:
            logger.warning("preconditioner block %d failed (%s); keeping the previous one", b, err)
            outs.append(tuple(p[b : b + 1] for p in previous))
            failed += 1
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True)), failed


def max_abs(tensors: Sequence[Tensor]) -> float:
    """Upper bound on ``max |x|`` over all tensors, finite iff every entry is finite.

    One fused 2-norm per tensor and one host sync; only if that overflows (or meets a
    non-finite entry) the exact infinity norm is taken (slower, rare).
    """
    if not tensors:
        return 0.0
    tensors = list(tensors)
    dev = tensors[0].device
    norms = torch._foreach_norm(tensors)
    if any(n.dtype != norms[0].dtype or n.device != dev for n in norms):
        norms = [n.float().to(dev) for n in norms]
    bound = float(torch.stack(norms).max())
    if math.isfinite(bound):
        return bound
    exact = torch._foreach_norm(tensors, float("inf"))
    return float(torch.stack([n.float().to(dev) for n in exact]).max())


def gradient_bound(name: str, grads: Sequence[Tensor], nonfinite: str,
                   sharded_group: Any = None) -> float | None:
    """:func:`max_abs` of a step's gradients, or ``None`` when the step must be skipped
    (a non-finite entry with ``nonfinite="skip"``, logged; ``"raise"`` raises
    FloatingPointError). With ``sharded_group`` (FSDP2: each rank holds shards) the local
    bounds are max-reduced, so every rank takes the same decision."""
    if any(g.is_sparse for g in grads):
        raise TypeError(f"{name} does not support sparse gradients")
    gmax = max_abs([local_tensor(g) for g in grads])
    if sharded_group is not None:
        both = torch.tensor([gmax], dtype=torch.float64, device=_dist.comm_device(sharded_group))
        torch.distributed.all_reduce(both, torch.distributed.ReduceOp.MAX, group=sharded_group)
        gmax = float(both)
    if math.isfinite(gmax):
        return gmax
    if nonfinite == "raise":
        raise FloatingPointError(f"{name}: non-finite gradient; pass nonfinite='skip' to skip "
                                 "such steps instead")
    logger.warning("%s: non-finite gradient, step skipped", name)
    return None


def _surely_finite(D: Tensor) -> bool:
    """On the CPU, whether every entry of ``D`` is surely finite: its sum is (a NaN or an
    infinity makes the sum non-finite; a sum that merely overflows sends the caller to the
    exact per-block check). One fast reduction, and a host read costs nothing there (the
    infinity norm is 10x slower). Elsewhere ``False`` without looking: the caller's
    per-block ``torch.where`` guard then runs without a device sync."""
    return D.device.type == "cpu" and math.isfinite(D.sum())


# ----------------------------------------------------------------------------- grafting
def graft_direction(
    method: str, m_hat: Tensor, g: Tensor, v: Tensor | None, step: int, beta2: float, eps: float,
    guard: bool = True,
) -> Tensor:
    """Direction of the grafted diagonal method; updates its second moment ``v`` in place.

    sgd: ``m``; adagrad: ``v += g^2``, ``m / (sqrt(v) + eps)``; rmsprop: ``v`` EMA of ``g^2``,
    ``m / (sqrt(v) + eps)``; adam: as rmsprop with bias correction ``v / (1 - beta2^t)``.
    ``m_hat`` is the (bias-corrected) first moment.
    """
    if method == "sgd":
        return m_hat
    assert v is not None
    ema_(v, g * g, 1.0 if method == "adagrad" else beta2, guard)
    if method == "adam":
        denom = (v / (1.0 - beta2**step)).sqrt_().add_(eps)
    else:
        denom = v.sqrt().add_(eps)
    return m_hat / denom


def _block_norm(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X.flatten(1), dim=1).view(-1, *([1] * (X.ndim - 1)))


def graft(P: Tensor, D: Tensor) -> Tensor:
    """Per block, rescale ``P`` to the norm of ``D``: ``P ||D|| / ||P||`` (0 if ``P == 0``)."""
    pn = _block_norm(P)
    scale = torch.where(pn > 0, _block_norm(D) / pn.clamp_min(torch.finfo(P.dtype).tiny),
                        torch.zeros_like(pn))
    return P * scale


# ----------------------------------------------------------------------------- optimizer base
@dataclass
class _Group:
    """Stacked state of the blocks of one shape (or of all diagonal parameters)."""

    group_index: int
    shape: tuple[int, ...]  # block shape; () for the diagonal group
    members: list[tuple[Tensor, BlockPlan, tuple[slice, ...]]] = field(default_factory=list)
    state: dict[str, Tensor] = field(default_factory=dict)
    # row of ``state`` holding each member; -1: held by another rank ("allgather" mode)
    rows: list[int] = field(default_factory=list)

    @property
    def diagonal(self) -> bool:
        return self.shape == ()


class BlockedPreconditionerOptimizer(torch.optim.Optimizer):
    """Base class: blocked, batched, amortized preconditioners with grafting and guards.

    Subclasses implement ``_init_block_state``, ``_block_direction`` and
    ``_diagonal_direction``; this class does blocking, gather/scatter of gradients,
    learning rate, decoupled weight decay, non-finite handling, ``state_dict`` and ``stats``.
    The update is ``p <- (1 - lr wd) p - lr * direction``.
    """

    _layout_keys = ("max_preconditioner_dim", "merge_dims", "diagonal_threshold")

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str = "skip",
                 factor_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float64, process_group: Any = None,
                 distributed_mode: str = "broadcast") -> None:
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if factor_dtype is not None and not factor_dtype.is_floating_point:
            raise TypeError(f"factor_dtype must be a floating dtype, got {factor_dtype}")
        self.nonfinite = nonfinite
        self.factor_dtype = factor_dtype
        self.compute_dtype = compute_dtype
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got "
                             f"{distributed_mode!r}")
        self.process_group = _dist.resolve_group(process_group)
        self.distributed_mode = distributed_mode
        self.timings = Timings(enabled=self.process_group is not None)
        super().__init__(params, defaults)
        dtensors = [p for g in self.param_groups for p in g["params"] if is_dtensor(p)]
        self._fsdp = bool(dtensors)
        if dtensors and (self.process_group is None or distributed_mode != "allgather"):
            raise ValueError(f"{type(self).__name__} got DTensor (FSDP2 fully_shard) "
                             "parameters: pass process_group (the group they are sharded over) "
                             "and distributed_mode='allgather', so that each block is "
                             "preconditioned whole by its owner rank, not shard by shard")
        if dtensors:
            check_row_sharded([p for g in self.param_groups for p in g["params"]],
                              self.process_group, type(self).__name__)
        self._shard_rows: dict = {}  # cache of shard_rows
        self._grads: dict[int, Tensor] = {}  # whole gradients during an FSDP2 step
        for group in self.param_groups:
            self._validate_group(group)
        self._groups: list[_Group] | None = None
        self._steps: list[int] = [0] * len(self.param_groups)
        self._counters = {"refreshes": 0, "failures": 0, "skipped_steps": 0}
        self._nonfinite_blocks = torch.zeros((), dtype=torch.long)
        self._guard = True  # whether state updates need per-block finiteness guards

    # Subclass hooks (all four required):
    #   _init_block_state(group, block_shape, n_blocks, dtype, device) -> dict of stacked state
    #   _init_diagonal_state(group, n_elements, dtype, device) -> dict of flat state
    #   _block_direction(group, state, G (n_blocks, *block_shape), step) -> direction
    #   _diagonal_direction(group, state, g (n_elements,), step) -> direction
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a param group's hyperparameters; raise ValueError naming the bad one."""
        if not group["lr"] >= 0:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if int(group["max_preconditioner_dim"]) < 1:
            raise ValueError("max_preconditioner_dim must be >= 1, got "
                             f"{group['max_preconditioner_dim']}")

    # -- layout -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_groups", None) is not None:
            raise ValueError("add_param_group after the first step is not supported by "
                             f"{type(self).__name__}; create the optimizer with all groups")
        super().add_param_group(param_group)
        if hasattr(self, "_steps"):
            self._validate_group(self.param_groups[-1])
            self._steps.append(0)

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        if self.factor_dtype is not None:
            return self.factor_dtype
        return p.dtype if p.dtype == torch.float64 else torch.float32

    def _build(self) -> list[_Group]:
        if self._groups is not None:
            return self._groups
        groups: dict[tuple, _Group] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"{type(self).__name__} needs real floating parameters, "
                                    f"got {p.dtype}")
                plan = plan_blocks(p.shape, group["max_preconditioner_dim"],
                                   group["merge_dims"], group["diagonal_threshold"])
                dkey = (self._state_dtype(p), p.device)
                if plan.diagonal:
                    key = (gi, (), *dkey)
                    groups.setdefault(key, _Group(gi, ())).members.append((p, plan, ()))
                for bshape, slices in plan.blocks:
                    key = (gi, bshape, *dkey)
                    groups.setdefault(key, _Group(gi, bshape)).members.append((p, plan, slices))
        self._groups = list(groups.values())
        self._owners = self._assign_owners()
        me = _dist.rank(self.process_group)
        for ((gi, _, dtype, device), g), owners_k in zip(groups.items(), self._owners,
                                                        strict=True):
            group = self.param_groups[gi]
            if g.diagonal:
                n = sum(p.numel() for p, _, _ in g.members)
                g.state = self._init_diagonal_state(group, n, dtype, device)
                g.rows = list(range(len(g.members)))
                continue
            held = [o == me or not self._allgather for o in owners_k]  # allgather: own only
            g.rows = [sum(held[:i]) if h else -1 for i, h in enumerate(held)]
            g.state = self._init_block_state(group, g.shape, sum(held), dtype, device)
        return self._groups

    def _assign_owners(self) -> list[list[int]]:
        """Owner rank of every block (per group, per member): LPT over the blocks' refresh
        costs. Under FSDP2 a parameter's blocks share one owner (LPT over parameters), the
        rank that assembles its gradient."""
        groups, world = self._groups, _dist.world_size(self.process_group)
        owners = [[0] * len(g.members) for g in groups]
        slots = [(k, m) for k, g in enumerate(groups) if not g.diagonal
                 for m in range(len(g.members))]
        if self._fsdp:
            params = list(dict.fromkeys(id(groups[k].members[m][0]) for k, m in slots))
            cost = dict.fromkeys(params, 0.0)
            for k, m in slots:
                cost[id(groups[k].members[m][0])] += eigh_cost(groups[k].shape)
            owner = dict(zip(params, lpt_schedule([cost[p] for p in params], world),
                             strict=True))
            for k, m in slots:
                owners[k][m] = owner[id(groups[k].members[m][0])]
            return owners
        for (k, m), r in zip(slots, lpt_schedule([eigh_cost(groups[k].shape) for k, _ in slots],
                                                 world), strict=True):
            owners[k][m] = r
        # blocks of one group cost the same: sorting their owners keeps every rank's load
        # and makes each rank's rows contiguous (refreshed in place through views)
        return [sorted(o) for o in owners]

    def _refresh(self, fn: Callable[[dict[str, Tensor]], None], st: dict[str, Tensor],
                 keys: Sequence[str], reads: Sequence[str] = ()) -> None:
        """Run the in-place refresh ``fn(st)`` of the current block group; with a process
        group each rank refreshes the blocks it owns (``fn`` sees ``reads`` and ``keys``)
        and the new ``keys`` are shared ("broadcast"), or ``st`` already holds only this
        rank's blocks ("allgather")."""
        if self._allgather:
            with self.timings.measure("precondition"):
                fn(st)
            return
        sharded_rows(fn, st, self._row_owners, keys, self.process_group, self.timings, reads)

    @property
    def _allgather(self) -> bool:
        return self.process_group is not None and self.distributed_mode == "allgather"

    def _whole_state(self) -> list[dict[str, Tensor]]:
        """Copy of every group's state for all its members. In "allgather" mode the rows
        live on their owners, so they are assembled on every rank (a collective, and
        temporarily the memory of the whole state)."""
        out = []
        parts: list[tuple[Tensor, list[int]]] = []
        for k, g in enumerate(self._build()):
            if not (self._allgather and not g.diagonal):
                out.append({name: v.clone() for name, v in g.state.items()})
                continue
            held = [i for i, r in enumerate(g.rows) if r >= 0]
            whole = {}
            for name, v in g.state.items():
                t = v.new_empty(len(g.members), *v.shape[1:])
                t[held] = v[[g.rows[i] for i in held]]
                whole[name] = t
                parts.append((t, self._owners[k]))
            out.append(whole)
        share_rows(parts, self.process_group, self.timings)
        return out

    # -- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        gmax = gradient_bound(type(self).__name__, grads, self.nonfinite,
                              self.process_group if self._fsdp else None)
        if gmax is None:
            self._counters["skipped_steps"] += 1
            return loss
        groups = self._build()
        self._gmax = gmax
        for gi in range(len(self.param_groups)):
            self._steps[gi] += 1
        self._grads = self._whole_grads(groups) if self._fsdp else {}
        updates: dict[int, Tensor] = {}
        me = _dist.rank(self.process_group)
        shared: list[tuple[_Group, list[int], Tensor]] = []  # "allgather" directions
        for k, g in enumerate(groups):
            group = self.param_groups[g.group_index]
            step = self._steps[g.group_index]
            present = [i for i, (p, _, _) in enumerate(g.members) if p.grad is not None]
            if not present:
                continue
            with_grad = present
            if self._allgather and not g.diagonal:  # this rank's blocks only
                present = [i for i in present if self._owners[k][i] == me]
            st = g.state
            if present and len(present) < sum(r >= 0 for r in g.rows):  # the members to work on
                idx = torch.tensor([g.rows[i] for i in present],
                                   device=next(iter(st.values())).device)
                st = self._substate(g, present, idx)
            sdtype = next(iter(g.state.values())).dtype
            # Statistics of gradients this small cannot overflow: skip the per-block guards.
            bound = gmax * gmax * (math.prod(g.shape) if g.shape else 1)
            self._guard = not bound < 0.25 * torch.finfo(sdtype).max
            if g.diagonal:
                G = torch.cat([self._grad(g.members[i][0]).reshape(-1)
                               for i in present]).to(sdtype)
                D = self._diagonal_direction(group, st, G, step)
                if not _surely_finite(D):
                    D = torch.where(torch.isfinite(D), D, 0.0)
                self._scatter_diagonal(g, present, D, updates)
            else:
                if present:
                    blocks = [self._grad(g.members[i][0]).reshape(
                        g.members[i][1].merged_shape)[g.members[i][2]] for i in present]
                    # one block: a view of the gradient (read only), no stacking copy
                    G = (blocks[0].unsqueeze(0) if len(blocks) == 1
                         else torch.stack(blocks)).to(sdtype)
                    self._row_owners = [self._owners[k][i] for i in present]
                    D = self._block_direction(group, st, G, step)
                    if not _surely_finite(D):
                        D = self._zero_nonfinite_blocks(D)
                if self._allgather and not self._fsdp:  # owners' rows; others: share_rows
                    full = torch.empty(len(with_grad), *g.shape, dtype=sdtype,
                                       device=next(iter(g.state.values())).device)
                    if present:
                        full[[with_grad.index(i) for i in present]] = D
                    shared.append((g, with_grad, full))
                elif present:
                    self._scatter_blocks(g, present, D, updates)
            if st is not g.state:
                self._write_substate(g, present, idx, st)
        if shared:
            owners = {id(g): self._owners[k] for k, g in enumerate(groups)}
            share_rows([(D, [owners[id(g)][i] for i in with_grad]) for g, with_grad, D in shared],
                       self.process_group, self.timings)
            for g, with_grad, D in shared:
                self._scatter_blocks(g, with_grad, D, updates)
        if self._fsdp:
            updates = self._local_updates(groups, updates)
        self._grads = {}
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in updates]
            if not ps:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            local = [local_tensor(p) for p in ps]
            if wd != 0:
                torch._foreach_mul_(local, 1.0 - lr * wd)
            torch._foreach_add_(local, [updates[id(p)].to(p.dtype) for p in ps], alpha=-lr)
        return loss

    def _zero_nonfinite_blocks(self, D: Tensor) -> Tensor:
        """``D`` with every block that holds a non-finite entry zeroed (counted)."""
        ok = torch.isfinite(D).flatten(1).all(1)
        if self._nonfinite_blocks.device != ok.device:
            self._nonfinite_blocks = self._nonfinite_blocks.to(ok.device)
        self._nonfinite_blocks += ok.numel() - ok.sum()
        return torch.where(ok.view(-1, *([1] * (D.ndim - 1))), D, 0.0)

    # -- FSDP2 (row-sharded DTensor parameters) ------------------------------------------
    def _grad(self, p: Tensor) -> Tensor:
        """The whole gradient of ``p`` (under FSDP2 assembled by :meth:`_whole_grads`)."""
        return self._grads.get(id(p), p.grad)

    def _fsdp_params(self, groups: list[_Group]) -> tuple[list[Tensor], list[Tensor]]:
        """(block parameters, diagonal parameters), each in a rank-independent order."""
        blocks = list({id(p): p for g in groups if not g.diagonal for p, _, _ in g.members
                       if p.grad is not None}.values())
        diag = [p for g in groups if g.diagonal for p, _, _ in g.members if p.grad is not None]
        return blocks, diag

    def _param_owner(self, groups: list[_Group]) -> dict[int, int]:
        return {id(p): self._owners[k][m] for k, g in enumerate(groups) if not g.diagonal
                for m, (p, _, _) in enumerate(g.members)}

    def _whole_grads(self, groups: list[_Group]) -> dict[int, Tensor]:
        """FSDP2: the row shards of each preconditioned parameter's gradient go to its owner
        (one all-to-all), who sees it whole; parameters of the diagonal method are gathered
        on every rank (their state is replicated)."""
        blocks, diag = self._fsdp_params(groups)
        out = {id(p): p.grad.full_tensor() for p in diag}
        if blocks:
            owner = self._param_owner(groups)
            rows = shard_rows(blocks, self.process_group, self._shard_rows)
            local = [local_tensor(p.grad).reshape(-1, math.prod(p.shape[1:])) for p in blocks]
            with self.timings.measure("communication"):
                whole = _dist.gather_rows_to_owners(local, rows, [owner[id(p)] for p in blocks],
                                                    self.process_group)
            out.update({id(blocks[k]): G.view(blocks[k].shape) for k, G in whole.items()})
        return out

    def _local_updates(self, groups: list[_Group], updates: dict[int, Tensor]
                       ) -> dict[int, Tensor]:
        """FSDP2: each rank's rows of the directions (owners send the preconditioned ones in
        one all-to-all; diagonal-method directions are whole on every rank)."""
        blocks, diag = self._fsdp_params(groups)
        rows = shard_rows(blocks + diag, self.process_group, self._shard_rows)
        me = _dist.rank(self.process_group)
        out = {}
        for p, r in zip(diag, rows[len(blocks):], strict=True):
            start = sum(r[:me])
            out[id(p)] = updates[id(p)][start:start + r[me]]
        if blocks:
            owner = self._param_owner(groups)
            owners = [owner[id(p)] for p in blocks]
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

    def _substate(self, g: _Group, present: list[int], idx: Tensor) -> dict[str, Tensor]:
        if g.diagonal:
            sizes = [p.numel() for p, _, _ in g.members]
            offs = [0]
            for s in sizes:
                offs.append(offs[-1] + s)
            ix = torch.cat([torch.arange(offs[i], offs[i + 1]) for i in present]).to(idx.device)
            return {k: v[ix].clone() if v.ndim else v.clone() for k, v in g.state.items()}
        return {k: v[idx].clone() for k, v in g.state.items()}

    def _write_substate(self, g: _Group, present: list[int], idx: Tensor,
                        st: dict[str, Tensor]) -> None:
        if g.diagonal:
            sizes = [p.numel() for p, _, _ in g.members]
            offs = [0]
            for s in sizes:
                offs.append(offs[-1] + s)
            ix = torch.cat([torch.arange(offs[i], offs[i + 1]) for i in present]).to(idx.device)
            for k, v in g.state.items():
                if v.ndim:
                    v[ix] = st[k]
            return
        for k, v in g.state.items():
            v[idx] = st[k]

    def _scatter_diagonal(self, g: _Group, present: list[int], D: Tensor,
                          updates: dict[int, Tensor]) -> None:
        parts = D.split([g.members[i][0].numel() for i in present])
        for i, part in zip(present, parts, strict=True):
            p = g.members[i][0]
            updates[id(p)] = part.view(p.shape)

    def _scatter_blocks(self, g: _Group, present: list[int], D: Tensor,
                        updates: dict[int, Tensor]) -> None:
        j = 0
        while j < len(present):
            p, plan, slices = g.members[present[j]]
            k = len(plan.blocks)
            if k == 1:
                updates[id(p)] = D[j].reshape(p.shape)
                j += 1
                continue
            if (plan.merged_shape[0] == k * g.shape[0] and plan.merged_shape[1:] == g.shape[1:]
                    and present[j : j + k] == list(range(present[j], present[j] + k))):
                # the blocks split only the first dimension and sit consecutively: a view
                updates[id(p)] = D[j : j + k].reshape(p.shape)
                j += k
                continue
            u = updates.get(id(p))
            if u is None:
                u = updates[id(p)] = torch.zeros(p.shape, dtype=D.dtype, device=D.device)
            u.view(plan.merged_shape)[slices] = D[j]
            j += 1

    # -- state --------------------------------------------------------------------------
    def _count_refresh(self, n_blocks: int, failed: int, what: str) -> None:
        self._counters["refreshes"] += 1
        if failed:
            self._counters["failures"] += failed
            logger.warning("%s: %d of %d %s computations failed; previous preconditioner kept",
                           type(self).__name__, failed, n_blocks, what)

    def state_dict(self) -> dict[str, Any]:
        """The whole state on every rank (with ``distributed_mode="allgather"`` a collective:
        call it on every rank), so a checkpoint resumes on any world size."""
        sd = super().state_dict()
        sd["preconditioner"] = {
            "steps": list(self._steps),
            "counters": dict(self._counters),
            "nonfinite_blocks": self._nonfinite_blocks.clone(),
            "groups": self._whole_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pre = state_dict.pop("preconditioner", None)
        if pre is None:
            raise ValueError(f"state_dict was not produced by {type(self).__name__}.state_dict() "
                             "(missing 'preconditioner' entry)")
        super().load_state_dict(state_dict)
        self._groups = None
        groups = self._build()
        if len(pre["groups"]) != len(groups):
            raise ValueError("state_dict has a different blocking layout than this optimizer "
                             "(different parameters or max_preconditioner_dim?)")
        for g, saved in zip(groups, pre["groups"], strict=True):
            if saved.keys() != g.state.keys():
                raise ValueError("state_dict preconditioner state keys do not match")
            held = [i for i, r in enumerate(g.rows) if r >= 0]
            for k, v in g.state.items():
                want = (len(g.members), *v.shape[1:]) if not g.diagonal else tuple(v.shape)
                if tuple(saved[k].shape) != want:
                    raise ValueError(f"state_dict entry {k!r} has shape {tuple(saved[k].shape)}, "
                                     f"expected {want}")
                rows = saved[k] if g.diagonal else saved[k][held]
                v.copy_(rows.to(device=v.device, dtype=v.dtype))
        self._steps = list(pre["steps"])
        self._counters = dict(pre["counters"])
        self._nonfinite_blocks = pre["nonfinite_blocks"].clone()

    def stats(self) -> dict[str, Any]:
        """Preconditioner memory of this rank (bytes), block counts, refresh/failure/skip
        counters."""
        groups = self._build()
        mem = sum(v.numel() * v.element_size() for g in groups for v in g.state.values())
        return {
            "preconditioner_memory_bytes": mem,
            "num_blocks": sum(len(g.members) for g in groups if not g.diagonal),
            "num_block_shapes": sum(1 for g in groups if not g.diagonal),
            "num_diagonal_params": sum(len(g.members) for g in groups if g.diagonal),
            "refreshes": self._counters["refreshes"],
            "failures": self._counters["failures"],
            "skipped_steps": self._counters["skipped_steps"],
            "nonfinite_block_updates": int(self._nonfinite_blocks),
            "steps": list(self._steps),
        }
