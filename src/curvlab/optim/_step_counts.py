"""Per-parameter step counts kept as views of one tensor, so a step costs one kernel.

Adam's bias corrections need each parameter's step count, stored as torch's optimizers
store it: ``state["step"]``, a 0-d float32 tensor (what their state dicts and tooling
expect). Incrementing twenty of them one by one costs ~80 us per step on a CPU (each a
dispatched kernel on a wrapped scalar), reading them twenty host reads. :class:`StepCounts`
makes them views of one 1-D tensor: one ``add_`` and one ``tolist()`` per step. The views
are made again from the stored values whenever a state no longer holds them (a loaded
state dict, a new parameter), so nothing outside needs to know.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepCounts"]


class StepCounts:
    """The ``"step"`` entries of a list of per-parameter states, incremented together."""

    def __init__(self) -> None:
        self._counts: Tensor | None = None
        self._views: list[Tensor] = []

    def increment(self, states: Sequence[dict[str, Any]]) -> list[int]:
        """Add 1 to every ``state["step"]`` (created at 0 if absent); the new counts."""
        if len(states) != len(self._views) or any(
                st.get("step") is not v for st, v in zip(states, self._views, strict=False)):
            self._counts = torch.tensor([float(st.get("step", 0)) for st in states],
                                        dtype=torch.float32)
            self._views = list(self._counts.unbind(0))
            for st, v in zip(states, self._views, strict=True):
                st["step"] = v
        assert self._counts is not None
        self._counts.add_(1)
        return [int(c) for c in self._counts.tolist()]
