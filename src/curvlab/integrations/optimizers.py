"""One curvlab optimizer for a whole model, with the parameter routing each one needs.

``build_optimizer(model, name, lr=..., **kwargs)`` is what the training-loop adapters call
(the HF Trainer's optimizer factory, ``LightningModule.configure_optimizers``):

* ``"soap"``, ``"shampoo"``: every trainable parameter; ``weight_decay`` on matrices and
  higher-rank weights only (biases and norm scales, the tensors with < 2 dimensions, get
  none: the usual transformer convention);
* ``"muon"``: :func:`curvlab.optim.muon_param_groups` (hidden matrices, HF ``Conv1D`` in
  its logical orientation, by Muon; embeddings, the (tied) output head, biases and norms
  by AdamW with ``adamw_lr``, ``adamw_weight_decay``);
* ``"kfac"``: :class:`curvlab.optim.KFAC` on the model (it hooks the model's layers, so it
  needs the model, not a parameter list).

NaturalGradient, HessianFree and LBFGS are refused: they need ``step(closure)`` or
``step(batch=...)`` with the loss, which the Hugging Face Trainer does not give.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from curvlab.objective import unwrap_model
from curvlab.optim import KFAC, SOAP, Muon, Shampoo, muon_param_groups

__all__ = ["OPTIMIZERS", "build_optimizer", "unwrap_model"]

OPTIMIZERS = {"soap": SOAP, "shampoo": Shampoo, "muon": Muon, "kfac": KFAC}
_NEED_CLOSURE = ("naturalgradient", "natural_gradient", "hessianfree", "hessian_free", "lbfgs")


def _name(name: Any) -> str:
    if isinstance(name, type):
        for key, cls in OPTIMIZERS.items():
            if name is cls:
                return key
        name = name.__name__
    if not isinstance(name, str):
        raise TypeError(f"name must be one of {sorted(OPTIMIZERS)} or the class, got "
                        f"{type(name).__name__}")
    key = name.lower()
    if key in _NEED_CLOSURE:
        raise ValueError(f"{name} needs step(closure) / step(batch=...) with the loss, which "
                         "the Hugging Face Trainer does not give; train it with its own loop "
                         f"(see its docstring), or use one of {sorted(OPTIMIZERS)} here")
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {sorted(OPTIMIZERS)}")
    return key


def build_optimizer(model: nn.Module, name: Any, *, lr: float, weight_decay: float = 0.0,
                    **kwargs: Any) -> Any:
    """``name`` (``"soap"``, ``"shampoo"``, ``"muon"``, ``"kfac"`` or the class) for all
    trainable parameters of ``model``, routed as in the module docstring. ``lr`` is required
    (a training loop's own learning-rate setting does not reach the optimizer); other
    keyword arguments go to the optimizer (for Muon also ``adamw_lr``,
    ``adamw_weight_decay`` and ``head`` of :func:`~curvlab.optim.muon_param_groups`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    key = _name(name)
    model = unwrap_model(model)
    if key == "kfac":
        return KFAC(model, lr=lr, weight_decay=weight_decay, **kwargs)
    if key == "muon":
        route = {k: kwargs.pop(k) for k in ("adamw_lr", "adamw_weight_decay", "head")
                 if k in kwargs}
        return Muon(muon_param_groups(model, lr=lr, weight_decay=weight_decay, **route),
                    lr=lr, **kwargs)
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:  # tied weights once
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": ps, "weight_decay": wd}
              for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return OPTIMIZERS[key](groups, lr=lr, **kwargs)
