"""The layout of one Muon param group's step, built once and reused while it holds.

Which parameters Muon orthogonalizes and which AdamW updates, how the matrices batch by
wide shape (``(A, B)`` and ``(B, A)`` together: ``polar(U^T) = polar(U)^T``), each
matrix's owner rank (the distributor's LPT schedule) and the shape-aware scale of each
stored shape depend only on the group's routing settings and on which parameters have a
gradient, with what shape, dtype and device. Recomputing them at every step was most of
Muon's Python overhead on small models; :func:`group_plan` rebuilds a :class:`MuonPlan`
only when that key changes.

A plan also keeps, per wide shape, the buffer the updates of its matrices are written
into (:meth:`MuonPlan.buffer`): a fresh ``(k, n, m)`` tensor per step is returned to the
allocator and faulted in again at the next step on a CPU. A batch whose matrices all have
one orientation is laid out as stored (``(rows, prod(rest))``: contiguous writes;
Newton–Schulz iterates on a tall stack as it is); only a batch mixing ``(A, B)`` and
``(B, A)`` is laid out wide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.optim._step_counts import StepCounts
from curvlab.optim.distributors.matrices import from_wide, wide_shape

__all__ = ["MuonPlan", "group_plan", "muon_scale"]

#: ``(dtype, device)`` of a parameter's storage: a batch key's tail
Where = tuple[torch.dtype, torch.device]


def muon_scale(rule: str, shape: Sequence[int]) -> float:
    """The shape-aware scale ``s(A, B)`` for a weight of logical shape ``(out, in, ...)``
    (see :mod:`curvlab.optim.muon`)."""
    A, B = shape[0], math.prod(shape[1:])
    if rule == "original":
        return math.sqrt(max(1.0, A / B))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return 1.0


@dataclass
class MuonPlan:
    """One group's layout (indices are into :attr:`muon`, in group order)."""

    key: tuple
    muon: list[Tensor]   # orthogonalized, in group order
    adam: list[Tensor]   # updated by AdamW
    by_ns: dict[tuple, list[int]]      # (wide shape, dtype, device) -> matrices
    by_shape: dict[tuple, list[int]]   # (stored shape, dtype, device) -> matrices
    scales: list[float]                # s(A, B) of each by_shape entry, in its order
    owner_of: dict[int, int]           # matrix -> owner rank
    as_stored: dict[tuple, bool]       # by_ns key -> its matrices share one orientation
    adam_uniform: bool = False         # the AdamW parameters share one dtype and device
    #: the AdamW parameters' step counts (their states' ``"step"``), incremented together
    adam_steps: StepCounts = field(default_factory=StepCounts)
    _buffers: dict[tuple, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)

    def buffer(self, key: tuple, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        """This plan's ``(k, ...)`` buffer of ``dtype`` (Newton–Schulz's: the update is
        rounded to it as it is written, not converted in a pass of its own) for the
        matrices of ``by_ns[key]`` and, per matrix, its view into it (what to write its
        update to): shaped as the parameter in a batch of one orientation, else its
        ``(rows, prod(rest))`` matrix."""
        cached = self._buffers.get((key, dtype))
        if cached is None:
            mats = [self.muon[i] for i in self.by_ns[key]]
            shape = ((mats[0].shape[0], math.prod(mats[0].shape[1:])) if self.as_stored[key]
                     else key[0])
            out = torch.empty(len(mats), *shape, dtype=dtype, device=key[2])
            views = [o.view(p.shape) if self.as_stored[key] else o.mT if _tall(p.shape) else o
                     for o, p in zip(out.unbind(0), mats, strict=True)]
            cached = self._buffers[(key, dtype)] = out, views
        return cached

    def unmatrix(self, key: tuple, o: Tensor, shape: Sequence[int]) -> Tensor:
        """Matrix ``o`` of the buffer of ``key`` as a tensor of ``shape``."""
        return o.reshape(shape) if self.as_stored[key] else from_wide(o, shape)


def _tall(shape: Sequence[int]) -> bool:
    return shape[0] > math.prod(shape[1:])


def plan_key(group: dict[str, Any]) -> tuple:
    """What a group's plan depends on: its routing settings and, per parameter, its
    identity (the plan holds the parameter, so the id is not reused meanwhile), whether it
    has a gradient, its shape, dtype and device."""
    return (group["use_muon"], bool(group.get("transposed", False)), group["adjust_lr"],
            tuple((id(p), p.grad is not None, p.shape, p.dtype, p.device)
                  for p in group["params"]))


def group_plan(cache: dict[int, MuonPlan], group: dict[str, Any],
               uses_muon: Callable[[dict[str, Any], Tensor], bool],
               owners: Callable[[list[torch.Size]], list[int]]) -> MuonPlan:
    """The plan of ``group`` from ``cache`` (keyed by the group's identity), rebuilt when
    :func:`plan_key` changed. ``uses_muon(group, p)``: the routing rule; ``owners``: the
    distributor's owner ranks of matrix shapes (in the order given)."""
    key = plan_key(group)
    plan = cache.get(id(group))
    if plan is not None and plan.key == key:
        return plan
    ps = [p for p in group["params"] if p.grad is not None]
    muon = [p for p in ps if uses_muon(group, p)]
    adam = [p for p in ps if not uses_muon(group, p)]
    by_ns: dict[tuple, list[int]] = {}
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(muon):
        by_ns.setdefault((wide_shape(p.shape), p.dtype, p.device), []).append(i)
        by_shape.setdefault((p.shape, p.dtype, p.device), []).append(i)
    order = [i for idx in by_ns.values() for i in idx]
    owner_of = dict(zip(order, owners([muon[i].shape for i in order]), strict=True))
    transposed = bool(group.get("transposed", False))
    scales = [muon_scale(group["adjust_lr"], (s[1], s[0]) if transposed else tuple(s))
              for s, _, _ in by_shape]
    as_stored = {k: len({_tall(muon[i].shape) for i in idx}) == 1 for k, idx in by_ns.items()}
    plan = cache[id(group)] = MuonPlan(key, muon, adam, by_ns, by_shape, scales, owner_of,
                                       as_stored, len({(p.dtype, p.device) for p in adam}) == 1)
    return plan
