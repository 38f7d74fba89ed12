"""The batch of a ``step(closure)`` call, for optimizers that need more than gradients.

Hessian-free and natural-gradient steps need the model's inputs (for Gauss-Newton / Fisher
products), which a torch-style closure hides. :class:`InputRecorder` records the inputs and
outputs of the model's last forward pass run with gradients enabled (the closure's).
Targets are not seen; :func:`stand_in_targets` returns targets that give the same
curvature for losses whose output Hessian does not depend on them (cross-entropy without
class weights, MSE, BCE-with-logits without weights): the curvature only uses the outputs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["InputRecorder", "stand_in_targets"]


class InputRecorder:
    """Forward hooks on ``model`` keeping its last ``(inputs, outputs)`` under grad mode;
    removed when ``owner`` is garbage collected."""

    def __init__(self, model: nn.Module, owner: Any) -> None:
        self.inputs: Any = None
        self.outputs: torch.Tensor | None = None
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            rec = ref()
            if rec is not None and torch.is_grad_enabled() and len(args) == 1:
                rec.inputs = args[0].detach() if isinstance(args[0], torch.Tensor) else args[0]
                rec.outputs = output.detach() if isinstance(output, torch.Tensor) else None

        handle = model.register_forward_hook(hook)
        weakref.finalize(owner, handle.remove)

    def batch(self, loss_fn: Any, who: str) -> tuple[Any, torch.Tensor]:
        """``(inputs, stand-in targets)`` of the last recorded forward pass."""
        if self.inputs is None or self.outputs is None:
            raise ValueError(f"{who}: no forward pass of the model was recorded in the "
                             "closure; pass batch=(inputs, targets)")
        return self.inputs, stand_in_targets(loss_fn, self.outputs, who)


def stand_in_targets(loss_fn: Any, outputs: torch.Tensor, who: str) -> torch.Tensor:
    """Targets valid for ``loss_fn`` whose output Hessian does not depend on them."""
    ok = (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None) or \
        isinstance(loss_fn, nn.MSELoss) or \
        (isinstance(loss_fn, nn.BCEWithLogitsLoss) and loss_fn.weight is None
         and loss_fn.pos_weight is None)
    if not ok:
        raise ValueError(f"{who}.step(closure) without batch= works for CrossEntropyLoss, "
                         "MSELoss and BCEWithLogitsLoss without weights (their curvature does "
                         f"not depend on the targets); got {type(loss_fn).__name__}: pass "
                         "batch=(inputs, targets)")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return outputs.argmax(dim=1)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.sigmoid(outputs)
    return outputs.clone()
