"""What a loss averages over: loss terms, their weights, and the normalizer.

A loss with ``reduction="mean"`` is a weighted average of *loss terms*,

    loss = sum_t c_t l_t / sum_t c_t,

and several batches reproduce one big batch only when each batch enters with weight
``n_b / N``, where ``n_b = sum_{t in b} c_t`` is the batch's *normalizer* (what torch divides
by) and ``N = sum_b n_b``. The terms and their weights ``c_t`` follow torch's definitions:

* ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class-index targets: one term per position
  (``targets.shape``), ``c_t = class_weight[y_t]`` (1 without ``weight=``) and ``c_t = 0``
  where ``y_t == ignore_index``;
* ``nn.CrossEntropyLoss`` with class-probability targets: one term per position, ``c_t = 1``;
* element-wise losses (``MSELoss``, ``L1Loss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``BCELoss``, ``BCEWithLogitsLoss``, ``KLDivLoss(reduction="mean")``, ...): one term per
  element of the targets, ``c_t = 1`` (``BCE``'s ``weight``/``pos_weight`` scale the terms but
  not the normalizer);
* ``KLDivLoss(reduction="batchmean")``: one term per sample;
* any other callable: assumed to average over the samples of the batch (one term per
  sample), the only rule that needs nothing but the batch size.

A batch whose normalizer is 0 (every target ignored) contributes exactly nothing: torch's
mean is 0/0 = NaN there, so it is skipped, not multiplied by 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["term_weights", "loss_normalizer", "is_known_mean_loss"]

_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss, nn.BCELoss,
                nn.BCEWithLogitsLoss, nn.KLDivLoss, nn.PoissonNLLLoss, nn.GaussianNLLLoss,
                nn.SoftMarginLoss, nn.MultiLabelSoftMarginLoss)


def _batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    raise TypeError("cannot infer the batch size: targets must be a batched tensor")


def is_known_mean_loss(loss_fn: Any) -> bool:
    """Whether :func:`term_weights` knows ``loss_fn``'s terms exactly (else: per sample)."""
    return isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss, *_ELEMENTWISE))


def term_weights(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """The weights ``c_t`` of the loss terms of one batch, shaped like the terms.

    Class-index targets of cross-entropy / NLL give one weight per position (``0`` where
    ignored, the class weight otherwise); element-wise losses one ``1`` per element; any
    other loss one ``1`` per sample (see the module docstring).
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and isinstance(
            targets, torch.Tensor) and not torch.is_floating_point(targets):
        valid = targets != loss_fn.ignore_index
        weight = getattr(loss_fn, "weight", None)
        if weight is None:
            return valid.to(torch.get_default_dtype())
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        return weight.to(targets.device)[safe] * valid
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # class probabilities along dim 1
        if targets.dim() < 2:
            raise ValueError("CrossEntropyLoss with probability targets needs (B, C, ...) targets")
        shape = (targets.shape[0], *targets.shape[2:])
        return torch.ones(shape, dtype=targets.dtype, device=targets.device)
    if isinstance(loss_fn, nn.KLDivLoss) and loss_fn.reduction == "batchmean":
        return torch.ones(_batch_size(targets), device=targets.device)
    if isinstance(loss_fn, _ELEMENTWISE) and isinstance(targets, torch.Tensor):
        return torch.ones(targets.shape, dtype=torch.get_default_dtype(), device=targets.device)
    return torch.ones(_batch_size(targets))


def loss_normalizer(loss_fn: Any, targets: Any) -> float:
    """``n_b = sum_t c_t``: what ``loss_fn(outputs, targets)`` with ``reduction="mean"``
    divides the summed terms by (number of valid targets, sum of their class weights,
    number of elements, or the batch size for an unknown loss)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor to weight the batch, got "
                        f"{type(targets).__name__}")
    return float(term_weights(loss_fn, targets).sum())
