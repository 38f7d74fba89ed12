"""The optimizers ``curvlab bench`` compares, each with a declared learning-rate grid.

Every entry builds an optimizer for a model at a learning rate; entries whose package is
not installed report why and are skipped with a one-line notice. Grids are declared here,
not tuned per run, and every optimizer gets the same step and time budget.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerSpec", "REGISTRY", "available"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Callable[[nn.Module, float], Any]
    lrs: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    family: str  # "baseline", "curvlab" or "peer"
    requires: str | None = None  # importable module the entry needs

    def missing(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.name}: '{self.requires}' is not installed (pip install -e '.[bench]')"
        return None


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


REGISTRY: dict[str, OptimizerSpec] = {
    spec.name: spec for spec in [
        OptimizerSpec("torch.SGD", _sgd, (0.03, 0.1, 0.3), (0.1,), "baseline"),
        OptimizerSpec("torch.AdamW", _adamw, (1e-3, 3e-3, 1e-2), (3e-3,), "baseline"),
    ]
}


def available(names: list[str] | None = None) -> tuple[list[OptimizerSpec], list[str]]:
    """The installed entries among ``names`` (default all) and notices for the others."""
    specs, notices = [], []
    for name in names or list(REGISTRY):
        if name not in REGISTRY:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(REGISTRY)}")
        spec = REGISTRY[name]
        reason = spec.missing()
        (notices.append(reason) if reason else specs.append(spec))
    return specs, notices
