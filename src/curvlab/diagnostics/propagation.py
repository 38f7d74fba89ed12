"""Signal propagation through depth and the rank of weight gradients.

* Singular values of the input-output Jacobian ``d h_l / d x`` of the first ``l`` layers
  of a sequential network, per sample: exploding/vanishing products of layer Jacobians
  show up as singular values growing or shrinking with depth; "dynamical isometry" is all
  of them near 1 (Pennington, Schoenholz & Ganguli, NeurIPS 2017).
* Effective rank of a weight gradient ``G``: ``exp(H(p))`` with ``p_i = s_i / sum_j s_j``
  over its singular values ``s`` (Roy & Vetterli, EUSIPCO 2007). Low values mean the
  update is dominated by a few directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import jacrev

__all__ = ["JacobianSpectrum", "jacobian_singular_values", "effective_rank",
           "gradient_effective_rank"]


@dataclass
class JacobianSpectrum:
    """Per depth ``l`` (the name of the last module applied): singular values of
    ``d h_l / d x`` for each sample, shape ``(num_samples, min(dim h_l, dim x))``."""

    singular_values: dict[str, torch.Tensor]

    def summary(self) -> dict[str, dict[str, float]]:
        """Largest, smallest, and geometric mean singular value per depth (over samples)."""
        out = {}
        for name, s in self.singular_values.items():
            pos = s[s > 0]
            out[name] = {"max": float(s.max()), "min": float(s.min()),
                         "geomean": float(pos.log().mean().exp()) if pos.numel() else 0.0}
        return out


def jacobian_singular_values(model: nn.Sequential, inputs: torch.Tensor, *,
                             num_samples: int = 16) -> JacobianSpectrum:
    """Singular values of the Jacobian of every prefix of ``model`` (an ``nn.Sequential``)
    with respect to its input, at the first ``num_samples`` rows of ``inputs``.
    Modules without parameters (activations) are included as depths too."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("inputs must be a batched tensor (batch, ...)")
    x = inputs[:num_samples].detach()
    names = [name for name, _ in model.named_children()]
    out: dict[str, torch.Tensor] = {}
    was = model.training
    model.eval()
    try:
        for depth in range(1, len(names) + 1):
            prefix = model[:depth]

            def f(xi: torch.Tensor, prefix: nn.Module = prefix) -> torch.Tensor:
                return prefix(xi.unsqueeze(0)).reshape(-1)

            # one sample at a time: vmap over the samples of jacrev (itself a vmap) batches
            # some kernels wrongly without an error (torch 2.13, nn.PReLU: wrong singular
            # values when the number of samples equals the layer width)
            J = torch.stack([jacrev(f)(xi) for xi in x]).reshape(x.shape[0], -1, x[0].numel())
            out[f"{depth - 1}:{type(model[depth - 1]).__name__}"] = torch.linalg.svdvals(
                J.detach())
    finally:
        model.train(was)
    return JacobianSpectrum(out)


def effective_rank(matrix: torch.Tensor) -> float:
    """``exp(-sum p_i log p_i)`` with ``p = s / sum(s)`` over the singular values (1 for a
    rank-one matrix, ``min(m, n)`` for equal singular values, 0 for a zero matrix)."""
    if matrix.dim() < 2:
        raise ValueError("effective_rank needs a matrix (dim >= 2)")
    s = torch.linalg.svdvals(matrix.detach().reshape(matrix.shape[0], -1).double())
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def gradient_effective_rank(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Effective rank of each weight gradient with ``dim >= 2`` (from ``param.grad`` of a
    module after ``backward()``, or a dict name -> gradient)."""
    if isinstance(source, nn.Module):
        grads: Mapping[str, Any] = {k: p.grad for k, p in source.named_parameters()}
    elif isinstance(source, Mapping):
        grads = source
    else:
        raise TypeError("source must be a module or a dict of gradients")
    return {k: effective_rank(g) for k, g in grads.items()
            if isinstance(g, torch.Tensor) and g.dim() >= 2}
