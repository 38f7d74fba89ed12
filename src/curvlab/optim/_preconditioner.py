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
  :class:`~curvlab.linalg.matfuncs.MatrixFunctionError` or returns values that are not finite
  in the state's dtype is retried block by block; blocks that still fail keep their previous
  value (counted in ``stats()["refresh_failures"]`` and logged); the same refresh failing in
  ``max_refresh_failures`` consecutive steps raises. A block whose final direction is
  non-finite is zeroed (counted in ``stats()["nonfinite_block_updates"]``).
* **Bad gradients**: the contract's rule (:mod:`curvlab.optim.base`): a non-finite
  gradient, or one whose squares would overflow the statistics, skips the whole step
  (``nonfinite="skip"``, counted; no parameter or state changes) or raises. Statistics of
  the gradients that pass cannot overflow, so state updates are single in-place kernels
  (``ema_(..., guard=False)``; :func:`finite_or_keep` remains for callers that need it).
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
from curvlab.optim.adam import AdamConfig, adam_moments_, adam_preconditioner
from curvlab.optim.base import (
    CurvlabOptimizer,
    factorization_dtype,
    finite_nonnegative,
    finite_positive,
    optional,
    positive_int,
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
    "mode_product",
    "graft_direction",
    "graft",
    "BlockedPreconditionerOptimizer",
]

GRAFTING_METHODS = ("none", "sgd", "adagrad", "rmsprop", "adam")
_LOGGED_RATIOS: set = set()
_SMALL_FACTORS = 1 << 20  # factor elements never worth a diagonal fallback (4 MiB float32)


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
    def checked(*xs: Tensor) -> tuple[Tensor, ...]:
        out = fn(*xs)  # finiteness in the dtype the result is stored in (after any cast)
        if not all(bool(torch.isfinite(o).all()) for o in out):
            raise MatrixFunctionError("non-finite result in the state's dtype")
        return out

    try:
        return checked(*inputs), 0
    except MatrixFunctionError as err:
        logger.debug("batched matrix function failed (%s); retrying per block", err)
    outs: list[tuple[Tensor, ...]] = []
    failed = 0
    for b in range(inputs[0].shape[0]):
        try:
            outs.append(checked(*(x[b : b + 1] for x in inputs)))
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
    if method == "adam":  # the one Adam (curvlab.optim.adam); the first moment is m_hat
        config = AdamConfig((0.0, beta2), eps)
        adam_moments_(None, v, g, config)
        return m_hat / adam_preconditioner(v, step, config)
    ema_(v, g * g, 1.0 if method == "adagrad" else beta2, guard)
    return m_hat / v.sqrt().add_(eps)


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


class BlockedPreconditionerOptimizer(CurvlabOptimizer):
    """Base class: blocked, batched, amortized preconditioners with grafting and guards.

    A preconditioner implements four methods (one file per optimizer; see Shampoo and SOAP):
    :meth:`_init_block_state` / :meth:`_init_diagonal_state` (the state of a stack of equal
    blocks / of the concatenated diagonal parameters), :meth:`_block_direction` (update the
    statistics, refresh when due through :meth:`_refresh`, return the preconditioned
    direction) and :meth:`_diagonal_direction`. This class does the blocking, the gathering
    and scattering of gradients, the gradient rule, the learning rate and decoupled weight
    decay, the distributed modes, the state (views of the stacked state in
    ``self.state[p]``) and :meth:`stats`. The update is ``p <- (1 - lr wd) p - lr d``.
    """

    _layout_keys = ("max_preconditioner_dim", "merge_dims", "diagonal_threshold",
                    "max_state_ratio")
    hyperparameters = {"lr": finite_nonnegative, "weight_decay": finite_nonnegative,
                       "max_preconditioner_dim": positive_int,
                       "precondition_frequency": positive_int,
                       "start_preconditioning_step": positive_int,
                       "diagonal_threshold": optional(lambda n: None if isinstance(n, int)
                                                      and n >= 0 else "must be an integer >= 0"),
                       "max_state_ratio": optional(finite_positive)}
    #: consecutive failed refreshes of a block group after which the step raises
    max_refresh_failures = 5
    #: True for a purely diagonal method: every parameter uses the diagonal hooks
    diagonal_only = False

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str = "skip",
                 factor_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float64, process_group: Any = None,
                 distributed_mode: str = "broadcast") -> None:
        name = type(self).__name__
        if factor_dtype is not None and factorization_dtype(factor_dtype) is not None:
            raise ValueError(f"{name}: factor_dtype={factor_dtype} "
                             f"{factorization_dtype(factor_dtype)}")
        if factorization_dtype(compute_dtype) is not None:
            raise ValueError(f"{name}: compute_dtype={compute_dtype} "
                             f"{factorization_dtype(compute_dtype)}")
        self.factor_dtype = factor_dtype
        self.compute_dtype = compute_dtype
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got "
                             f"{distributed_mode!r}")
        self.process_group = _dist.resolve_group(process_group)
        self.distributed_mode = distributed_mode
        self.timings = Timings(enabled=self.process_group is not None)
        self._groups: list[_Group] | None = None
        self._steps: list[int] = []
        super().__init__(params, defaults, nonfinite=nonfinite)
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
        self._nonfinite_blocks = torch.zeros((), dtype=torch.long)
        self._failure_streak: dict[Any, int] = {}
        self._guard = False  # the gradient rule keeps statistics finite: no per-block guards

    # -- the preconditioner interface (implemented by each optimizer) -------------------------
    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Zero state of ``n`` stacked blocks of ``shape`` (each entry's first dim is ``n``)."""
        raise NotImplementedError

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        """Zero state of ``n`` concatenated diagonal-method elements (flat entries)."""
        raise NotImplementedError

    def _block_direction(self, group: dict, st: dict[str, Tensor], G: Tensor,
                         step: int) -> Tensor:
        """Update the statistics of the stacked blocks ``G`` (n, *shape), refresh if due
        (through :meth:`_refresh`) and return their direction."""
        raise NotImplementedError

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        """Direction of the diagonal-method elements ``g`` (flat)."""
        raise NotImplementedError

    # -- layout -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; after the first step its state is allocated at the next step (the
        existing state is kept)."""
        super().add_param_group(param_group)
        self._steps.append(0)
        if self._groups is not None:  # rebuild the stacks with the new group, state kept
            self._rebuild()

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
                plan = self._plan(p, group)
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
        self._bind_state_views()
        return self._groups

    def _plan(self, p: Tensor, group: dict[str, Any]) -> BlockPlan:
        """:func:`plan_blocks`, then the state-size rule: a parameter whose Kronecker factors
        would hold more than ``max_state_ratio`` times its number of elements *and* more
        than ``2^20`` elements (a thin matrix such as (20000, 2), or a vocabulary-sized
        embedding split into (1024, 64) blocks) uses the diagonal method instead (a
        warning, once per shape). With ``max_state_ratio=None`` it keeps its blocks and the
        warning says what they cost (beyond 8x)."""
        if self.diagonal_only:
            return BlockPlan((p.numel(),), (), True)
        plan = plan_blocks(p.shape, group["max_preconditioner_dim"], group["merge_dims"],
                           group["diagonal_threshold"])
        if plan.diagonal:
            return plan
        ratio = group.get("max_state_ratio")
        factors = sum(d * d for shape, _ in plan.blocks for d in shape)
        if factors <= (ratio or 8.0) * p.numel() or factors <= _SMALL_FACTORS:
            return plan
        key = (type(self).__name__, tuple(p.shape), ratio)
        if key not in _LOGGED_RATIOS:
            _LOGGED_RATIOS.add(key)
            logger.warning("%s: a parameter of shape %s would hold %.0fx its size in "
                           "Kronecker factors (%d elements)%s", type(self).__name__,
                           tuple(p.shape), factors / p.numel(), factors,
                           "" if ratio is None else
                           f" > max_state_ratio={ratio:g}; it uses the diagonal method")
        return plan if ratio is None else BlockPlan((p.numel(),), (), True)

    def _bind_state_views(self) -> None:
        """``self.state[p]``: views of ``p``'s rows of the stacked state, named ``key`` (one
        block) or ``key.j`` (block ``j`` of several), plus its group's ``step``. Rows held
        by other ranks ("allgather") have no view here."""
        self.state.clear()
        steps = self._step_tensor = torch.tensor(self._steps, dtype=torch.float32)
        for g in self._groups or []:
            if g.diagonal:
                offset = 0
                for p, _, _ in g.members:
                    n = p.numel()
                    st = self.state[p]
                    for k, v in g.state.items():
                        st[k] = v[offset:offset + n].view(p.shape)
                    offset += n
                continue
            for (p, plan, slices), row in zip(g.members, g.rows, strict=True):
                if row < 0:
                    continue
                st = self.state[p]
                suffix = "" if len(plan.blocks) == 1 else \
                    f".{[sl for _, sl in plan.blocks].index(slices)}"
                for k, v in g.state.items():
                    st[k + suffix] = v[row]
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.state[p]["step"] = steps[gi]

    def _state_layout(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """Every state entry of ``p`` and its shape, whichever rank holds it (one pass over
        the block groups, cached while the stacks stay the same)."""
        groups = self._build()
        cache = getattr(self, "_layout_cache", None)
        if cache is None or cache[0] is not groups:
            layouts: dict[int, dict[str, tuple[int, ...]]] = {}
            for g in groups:
                for q, plan, slices in g.members:
                    out = layouts.setdefault(id(q), {"step": ()})
                    if g.diagonal:
                        out.update({k: tuple(q.shape) for k in g.state})
                        continue
                    suffix = "" if len(plan.blocks) == 1 else \
                        f".{[sl for _, sl in plan.blocks].index(slices)}"
                    out.update({k + suffix: tuple(v.shape[1:]) for k, v in g.state.items()})
            plans = {id(q): (gi, self._plan(q, group))
                     for gi, group in enumerate(self.param_groups) for q in group["params"]}
            cache = self._layout_cache = (groups, layouts, plans)
        return cache[1].get(id(p), {"step": ()})

    def _param_plan(self, p: Tensor) -> tuple[int, BlockPlan]:
        """``(param group index, blocking plan)`` of ``p`` (cached with the layout)."""
        self._state_layout(p)
        return self._layout_cache[2][id(p)]

    def _rebuild(self) -> None:
        """New stacks (after ``add_param_group``), the existing state copied over."""
        saved = self._full_param_state()
        self._groups = None
        self._build()
        for p, st in saved.items():
            self._copy_param_state(p, st)

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
        loss, gmax = self._begin_step(closure,
                                      process_group=self.process_group if self._fsdp else None)
        if gmax is None:
            return loss
        groups = self._build()
        self._gmax = gmax
        self._counters["steps"] += 1
        for gi in range(len(self.param_groups)):
            self._steps[gi] += 1
        self._step_tensor.copy_(torch.tensor(self._steps, dtype=torch.float32))
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
    def _count_refresh(self, n_blocks: int, failed: int, what: str,
                       shape: tuple[int, ...] = ()) -> None:
        """Count a refresh of ``n_blocks`` blocks (factors of ``shape``) of which ``failed``
        kept their previous value. The refresh of one kind of factor failing in
        ``max_refresh_failures`` consecutive optimizer steps is an error: a preconditioner
        that can never be computed is not a fallback."""
        self._count_refresh_base(failed)
        key = (what, tuple(shape))
        if not failed:
            self._failure_streak.pop(key, None)
            return
        logger.warning("%s: %d of %d %s computations failed; previous preconditioner kept",
                       type(self).__name__, failed, n_blocks, what)
        step = self._counters["steps"]
        last, streak = self._failure_streak.get(key, (None, 0))
        if last == step:
            return
        streak += 1
        self._failure_streak[key] = (step, streak)
        if streak >= self.max_refresh_failures:
            raise RuntimeError(
                f"{type(self).__name__}: the {what} computation of {tuple(shape)} factors "
                f"failed in {streak} refreshes in a row ({failed} of {n_blocks} blocks the "
                "last time); their preconditioner is stale. Raise eps (damping), use float64 "
                "compute_dtype, or lower the learning rate")

    def _count_refresh_base(self, failed: int) -> None:
        CurvlabOptimizer._count_refresh(self, 1, failed)

    def _full_param_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """Every parameter's whole state (copies; with "allgather" a collective that
        assembles the rows from their owners)."""
        groups = self._build()
        whole = self._whole_state()
        out: dict[Tensor, dict[str, Tensor]] = {}
        for g, st in zip(groups, whole, strict=True):
            if g.diagonal:
                offset = 0
                for p, _, _ in g.members:
                    n = p.numel()
                    out.setdefault(p, {}).update(
                        {k: v[offset:offset + n].view(p.shape).clone() for k, v in st.items()})
                    offset += n
                continue
            for i, (p, plan, slices) in enumerate(g.members):
                suffix = "" if len(plan.blocks) == 1 else \
                    f".{[sl for _, sl in plan.blocks].index(slices)}"
                out.setdefault(p, {}).update({k + suffix: v[i].clone() for k, v in st.items()})
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                out.setdefault(p, {})["step"] = torch.tensor(float(self._steps[gi]))
        return out

    def _copy_param_state(self, p: Tensor, saved: dict[str, Any]) -> None:
        """Write one parameter's saved state into the stacks (the rows this rank holds)."""
        st = self.state[p]
        for k, v in saved.items():
            if k == "step":
                continue
            if k in st:
                st[k].copy_(v.to(device=st[k].device, dtype=st[k].dtype))

    # -- state dict ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-parameter state as torch lays it out (``state[i]``: views of the stacks, no
        copy). With ``distributed_mode="allgather"`` a collective (call it on every rank):
        the rows held by other ranks are assembled, so a checkpoint resumes on any world
        size."""
        self._build()
        sd = super().state_dict()
        if self._allgather:
            index = {id(p): i for i, p in enumerate(
                p for g in self.param_groups for p in g["params"])}
            for p, st in self._full_param_state().items():
                sd["state"][index[id(p)]] = st
        return sd

    def _global_state(self) -> dict[str, Any]:
        return {"nonfinite_blocks": int(self._nonfinite_blocks)}

    def _state_template(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return self._state_layout(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from curvlab.optim._convert import convert_blocked_state_dict

        super().load_state_dict(convert_blocked_state_dict(self, state_dict))

    def _load_param_state(self, p: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        if self._groups is None:
            self._build()
        self._copy_param_state(p, saved)
        return self.state[p]

    def _before_param_state_load(self, saved_state: dict[Any, dict[str, Any]],
                                 index: dict[Any, Tensor]) -> None:
        steps = list(self._steps)
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for pid, st in saved_state.items():
            if "step" in st:
                steps[group_of[id(index[pid])]] = int(float(st["step"]))
        self._steps = steps
        self._groups = None
        self._build()

    def _load_global_state(self, state: dict[str, Any]) -> None:
        self._nonfinite_blocks = torch.tensor(int(state.get("nonfinite_blocks", 0)))

    def _extra_stats(self) -> dict[str, Any]:
        """Preconditioner block counts and non-finite block directions zeroed."""
        groups = self._build()
        return {
            "num_blocks": sum(len(g.members) for g in groups if not g.diagonal),
            "num_block_shapes": sum(1 for g in groups if not g.diagonal),
            "num_diagonal_params": sum(len(g.members) for g in groups if g.diagonal),
            "nonfinite_block_updates": int(self._nonfinite_blocks),
            "group_steps": list(self._steps),
        }
