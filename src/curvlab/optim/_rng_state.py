"""Checkpointing of an optimizer's private random generator.

Optimizers that sample (Monte-Carlo Fisher labels, random curvature subsets) keep a
``torch.Generator`` in ``self._generator`` and optimizer-wide counters in
``self.state[self._global_key]``. Resuming bit-for-bit needs the generator's state in the
checkpoint: it is stored next to those counters under ``"rng"``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GeneratorStateMixin"]


class GeneratorStateMixin:
    """``state_dict`` / ``load_state_dict`` that also save and restore ``_generator``."""

    _generator: torch.Generator
    _global_key: str

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        key = self._global_key
        sd["state"][key] = {**sd["state"][key], "rng": self._generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        glob = dict(state_dict["state"][self._global_key])
        rng = glob.pop("rng", None)
        state_dict["state"][self._global_key] = glob
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if rng is not None:
            self._generator.set_state(rng)
