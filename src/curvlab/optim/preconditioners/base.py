"""The blocked preconditioner optimizer: the base Shampoo and SOAP implement.

A preconditioner implements the interface of :class:`BlockedPreconditionerOptimizer` in one
file (see Shampoo, SOAP, and ``examples/diagonal_fisher_optimizer.py``):

* ``_init_block_state`` / ``_init_diagonal_state``: the zero state of a stack of equal
  blocks / of the concatenated diagonal-method parameters;
* ``_update_statistics``: fold the stacked gradient blocks into the statistics;
* ``_refresh_blocks``: the amortized expensive work (roots, eigenbases), run when due
  (:func:`~curvlab.optim.preconditioners.block_math.is_due`) through :meth:`_refresh`, so
  that the distributor can split it over ranks;
* ``_precondition``: the direction of the stacked blocks;
* ``_diagonal_direction``: statistics and direction of the diagonal-method elements.

The base owns everything else: the blocking (:mod:`~curvlab.optim.preconditioners.blocking`:
which parameters get blocks, and the state-size rule that sends thin or huge ones to the
diagonal method), the stacked state and its views in ``self.state[p]``, gathering gradients
into stacks and directions back into parameters, the contract of
:class:`~curvlab.optim.base.CurvlabOptimizer` (gradient rule, validation, decoupled weight
decay, ``stats()``, state-dict layout), the refresh failure policy (a refresh that fails
``max_refresh_failures`` steps in a row raises), and data parallelism, which it delegates to
one distributor object (:mod:`curvlab.optim.distributors.blocks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.linalg.matfuncs import high_precision_matmul
from curvlab.optim.base import (
    CurvlabOptimizer,
    apply_update_,
    factorization_dtype,
    finite_nonnegative,
    finite_positive,
    optional,
    positive_int,
)
from curvlab.optim.distributors import blocks as _distributors
from curvlab.optim.distributors.collectives import local_tensor
from curvlab.optim.preconditioners.block_math import is_due, surely_finite
from curvlab.optim.preconditioners.blocking import (
    BlockGroup,
    BlockPlan,
    gather_rows,
    plan_blocks,
    write_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["BlockedPreconditionerOptimizer"]

_LOGGED_RATIOS: set = set()
_DIAGONAL_HOOKS = ("_init_diagonal_state", "_diagonal_direction")
_BLOCK_HOOKS = ("_init_block_state", "_update_statistics", "_refresh_blocks", "_precondition")
_SMALL_FACTORS = 1 << 20  # factor elements never worth a diagonal fallback (4 MiB float32)


class BlockedPreconditionerOptimizer(CurvlabOptimizer):
    """Base class: blocked, batched, amortized preconditioners (see the module docstring).

    One step: the contract's gradient rule; per block group (blocks of one shape), the
    stacked gradient blocks go through ``_update_statistics`` (after ``_precondition`` with
    ``statistics_after_precondition``: KL-Shampoo's step ``t`` uses the statistics of steps
    ``< t``), ``_refresh_blocks`` when due (before ``_precondition``, or after it with
    ``refresh_after_precondition``: SOAP's step ``t`` uses the eigenbasis of steps ``< t``)
    and ``_precondition``; the diagonal-method
    elements through ``_diagonal_direction``; a block whose direction is not finite is
    zeroed (counted). The update is ``p <- (1 - lr wd) p - lr d``.
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
    compilable = True
    #: the compiled step compiles :meth:`_diagonal_direction` whole (False: it stays eager,
    #: e.g. PSGD-Kron's, whose segment sums inductor's CPU code generation cannot compile)
    compile_diagonal_direction = True
    #: the compiled per-step update runs inside ``high_precision_matmul`` (IEEE float32
    #: matmuls), for hooks that switch to it themselves in the eager step
    high_precision_step = False

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str = "skip",
                 factor_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float64, process_group: Any = None,
                 distributed_mode: str = "broadcast") -> None:
        name = type(self).__name__
        hooks = _DIAGONAL_HOOKS if self.diagonal_only else _DIAGONAL_HOOKS + _BLOCK_HOOKS
        missing = [h for h in hooks
                   if getattr(type(self), h) is getattr(BlockedPreconditionerOptimizer, h)]
        if missing:
            raise TypeError(f"{name} does not implement the preconditioner interface: "
                            f"{', '.join(missing)} (a purely diagonal method sets "
                            "diagonal_only = True and implements the diagonal hooks only)")
        if factor_dtype is not None and factorization_dtype(factor_dtype) is not None:
            raise ValueError(f"{name}: factor_dtype={factor_dtype} "
                             f"{factorization_dtype(factor_dtype)}")
        if factorization_dtype(compute_dtype) is not None:
            raise ValueError(f"{name}: compute_dtype={compute_dtype} "
                             f"{factorization_dtype(compute_dtype)}")
        self.factor_dtype = factor_dtype
        self.compute_dtype = compute_dtype
        self.process_group = _dist.resolve_group(process_group)
        self.distributed_mode = distributed_mode
        self._groups: list[BlockGroup] | None = None
        self._steps: list[int] = []
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.distributor = _distributors.block_distributor(
            self.process_group, distributed_mode,
            [p for g in self.param_groups for p in g["params"]], type(self).__name__)
        self.timings = self.distributor.timings
        self._grads: dict[int, Tensor] = {}  # whole gradients the distributor assembled
        self._nonfinite_blocks = torch.zeros((), dtype=torch.long)
        self._failure_streak: dict[Any, int] = {}
        self._guard = False  # the gradient rule keeps statistics finite: no per-block guards

    # -- the preconditioner interface (implemented by each optimizer) -------------------------
    #: run ``_refresh_blocks`` after ``_precondition`` (the direction of step t uses the
    #: refresh of steps < t), instead of before it
    refresh_after_precondition = False
    #: run ``_update_statistics`` after ``_precondition`` (the direction of step t uses the
    #: statistics of steps < t; KL-Shampoo), instead of before it
    statistics_after_precondition = False

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Zero state of ``n`` stacked blocks of ``shape`` (each entry's first dim is ``n``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _init_block_state")

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        """Zero state of ``n`` concatenated diagonal-method elements (flat entries)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _init_diagonal_state")

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        """Fold the stacked gradient blocks ``G`` (n, *shape) into the statistics ``st``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _update_statistics")

    def _refresh_blocks(self, group: dict, st: dict[str, Tensor], step: int) -> None:
        """The amortized work on the stacked blocks ``st`` (roots, eigenbases), through
        :meth:`_refresh` so that the distributor can split it; runs when due."""
        raise NotImplementedError(f"{type(self).__name__} must implement _refresh_blocks")

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        """The direction of the stacked gradient blocks ``G`` (n, *shape)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _precondition")

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        """Update the statistics of the diagonal-method elements ``g`` (flat) and return
        their direction."""
        raise NotImplementedError(f"{type(self).__name__} must implement _diagonal_direction")

    def _block_direction(self, group: dict, st: dict[str, Tensor], G: Tensor,
                         step: int) -> Tensor:
        """Statistics, refresh when due, direction of the stacked blocks ``G`` (in the
        order the two ``*_after_precondition`` flags choose; a step without refresh compiled
        after :meth:`compile_step`)."""
        due = is_due(step, group["start_preconditioning_step"], group["precondition_frequency"])
        if not due and self._step_compiler is not None:
            fn = self._step_compiler(type(self)._statistics_and_direction,
                                     ("blocks", tuple(G.shape), G.dtype, G.device))
            with high_precision_matmul() if self.high_precision_step else nullcontext():
                return fn(self, group, st, G, step)
        if not self.statistics_after_precondition:
            self._update_statistics(group, st, G, step)
        if due and not self.refresh_after_precondition:
            self._refresh_blocks(group, st, step)
        D = self._precondition(group, st, G, step)
        if self.statistics_after_precondition:
            self._update_statistics(group, st, G, step)
        if due and self.refresh_after_precondition:
            self._refresh_blocks(group, st, step)
        return D

    def _statistics_and_direction(self, group: dict, st: dict[str, Tensor], G: Tensor,
                                  step: int) -> Tensor:
        """The per-step part of :meth:`_block_direction` (no refresh): what
        :meth:`compile_step` compiles."""
        if self.statistics_after_precondition:
            D = self._precondition(group, st, G, step)
            self._update_statistics(group, st, G, step)
            return D
        self._update_statistics(group, st, G, step)
        return self._precondition(group, st, G, step)

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

    def _build(self) -> list[BlockGroup]:
        if self._groups is not None:
            return self._groups
        groups: dict[tuple, BlockGroup] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"{type(self).__name__} needs real floating parameters, "
                                    f"got {p.dtype}")
                plan = self._plan(p, group)
                dkey = (self._state_dtype(p), p.device)
                if plan.diagonal:
                    key = (gi, (), *dkey)
                    groups.setdefault(key, BlockGroup(gi, ())).members.append((p, plan, ()))
                for bshape, slices in plan.blocks:
                    key = (gi, bshape, *dkey)
                    groups.setdefault(key, BlockGroup(gi, bshape)).members.append((p, plan, slices))
        self._groups = list(groups.values())
        owners = self.distributor.assign_owners(self._groups)
        for ((gi, _, dtype, device), g), owners_k in zip(groups.items(), owners, strict=True):
            group = self.param_groups[gi]
            if g.diagonal:
                n = sum(p.numel() for p, _, _ in g.members)
                g.state = self._init_diagonal_state(group, n, dtype, device)
                g.rows = list(range(len(g.members)))
                continue
            held = [self.distributor.holds(o) for o in owners_k]
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

    def _refresh(self, fn: Callable[[dict[str, Tensor]], None], st: dict[str, Tensor],
                 keys: Sequence[str], reads: Sequence[str] = ()) -> None:
        """Run the in-place refresh ``fn(st)`` of the current stacked blocks through the
        distributor (with a process group each rank refreshes the blocks it owns; ``fn``
        sees ``reads`` and ``keys``, and the new ``keys`` reach every rank that holds them)."""
        self.distributor.refresh(fn, st, self._row_owners, keys, reads)

    def _whole_state(self) -> list[dict[str, Tensor]]:
        """Copy of every block group's state for all its members (a collective where the
        distributor keeps rows on their owners)."""
        return self.distributor.whole_state(self._build())

    # -- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        dist = self.distributor
        loss, gmax = self._begin_step(closure, process_group=dist.gradient_group())
        if gmax is None:
            return loss
        groups = self._build()
        self._gmax = gmax
        self._counters["steps"] += 1
        for gi in range(len(self.param_groups)):
            self._steps[gi] += 1
        self._step_tensor.copy_(torch.tensor(self._steps, dtype=torch.float32))
        self._grads = dist.gradients(groups)
        updates: dict[int, Tensor] = {}
        for k, g in enumerate(groups):
            with_grad = [i for i, (p, _, _) in enumerate(g.members) if p.grad is not None]
            if not with_grad:
                continue
            work = dist.members_to_work_on(k, g, with_grad)
            D = self._group_direction(k, g, work) if work else None
            dist.collect(k, g, with_grad, work, D, updates)
        updates = dist.finish(groups, updates)
        self._grads = {}
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in updates]
            if not ps:
                continue
            apply_update_([local_tensor(p) for p in ps], [updates[id(p)] for p in ps],
                          group["lr"], group["weight_decay"], self._step_compiler)
        return loss

    def _group_direction(self, k: int, g: BlockGroup, work: list[int]) -> Tensor:
        """Direction of members ``work`` of block group ``k`` (statistics updated; a
        subset of the held rows works on a copy of their state, written back)."""
        group = self.param_groups[g.group_index]
        step = self._steps[g.group_index]
        st = g.state
        sdtype = next(iter(st.values())).dtype
        subset = len(work) < sum(r >= 0 for r in g.rows)
        if subset:
            idx = torch.tensor([g.rows[i] for i in work], device=next(iter(st.values())).device)
            st = gather_rows(g, work, idx)
        if g.diagonal:
            G = torch.cat([self._grad(g.members[i][0]).reshape(-1) for i in work]).to(sdtype)
            if self._step_compiler is not None and self.compile_diagonal_direction:
                fn = self._step_compiler(type(self)._diagonal_direction,
                                         ("diagonal", G.numel(), G.dtype, G.device))
                D = fn(self, group, st, G, step)
            else:
                D = self._diagonal_direction(group, st, G, step)
            if not surely_finite(D):
                D = torch.where(torch.isfinite(D), D, 0.0)
        else:
            blocks = [self._grad(g.members[i][0]).reshape(g.members[i][1].merged_shape)
                      [g.members[i][2]] for i in work]
            # one block: a view of the gradient (read only), no stacking copy
            G = (blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)).to(sdtype)
            self._row_owners = [self.distributor.owners[k][i] for i in work]
            D = self._block_direction(group, st, G, step)
            if not surely_finite(D):
                D = self._zero_nonfinite_blocks(D)
        if subset:
            write_rows(g, work, idx, st)
        return D

    def _zero_nonfinite_blocks(self, D: Tensor) -> Tensor:
        """``D`` with every block that holds a non-finite entry zeroed (counted)."""
        ok = torch.isfinite(D).flatten(1).all(1)
        if self._nonfinite_blocks.device != ok.device:
            self._nonfinite_blocks = self._nonfinite_blocks.to(ok.device)
        self._nonfinite_blocks += ok.numel() - ok.sum()
        return torch.where(ok.view(-1, *([1] * (D.ndim - 1))), D, 0.0)

    def _grad(self, p: Tensor) -> Tensor:
        """The whole gradient of ``p`` (under FSDP2 assembled by the distributor)."""
        return self._grads.get(id(p), p.grad)

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
        if self.distributor.partial_state:
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
