"""How an optimizer tells a monitor when its step becomes unstable.

On the local quadratic model ``L(theta) ~ 1/2 theta^T H theta`` a preconditioned method
with a fixed preconditioner ``P`` is stable iff

    lr * lambda_max(P^{-1/2} H P^{-1/2}) < threshold,

where ``threshold`` depends only on its momentum rule (2 for gradient descent,
``2 (1 + b1) / (1 - b1)`` for Adam's EMA momentum, ...; Cohen et al., "Gradient descent on
neural networks typically occurs at the edge of stability", ICLR 2021, and "Adaptive
gradient methods at the edge of stability", 2022). An optimizer that knows its own rule
implements ``stability_model() -> StabilityModel``; a monitor calls
:func:`curvlab.diagnostics.stability.stability_model`, which also knows torch's optimizers
and unwraps framework wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["StabilityModel", "ema_samples", "momentum_threshold"]

InvSqrtPreconditioner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StabilityModel:
    """One optimizer's stability rule at its current state.

    Attributes:
        name: the rule's short name ("gd", "heavy_ball", "nesterov", "adam", "shampoo",
            "soap", "kfac", "muon", ...).
        lr: the learning rate the ratio uses.
        threshold: the critical ``lr * preconditioned sharpness``; ``math.inf`` when the
            step has no curvature bound (e.g. a normalized update).
        inv_sqrt_preconditioner: ``(param, v) -> P^{-1/2} v`` for ``param``'s block, ``v``
            shaped like ``param``; None means ``P = I`` (plain sharpness). It returns
            zeros for parameters the rule does not govern, so the monitor measures the
            sharpness of the governed block only.
        note: what the rule approximates (shown in events and reports).
        preconditioner_samples: ``() -> n``, the effective number of gradients the
            preconditioner's statistics average at the current state
            (:func:`ema_samples`); None for a fixed preconditioner. The rule freezes
            ``P``, which holds once the newest gradient is a small part of it: in Adam's
            first steps ``v_hat`` averages one or two gradients, a gradient that doubles
            raises ``P`` by up to 2x at the next step, and the ratio of healthy runs
            measured 70-80000 x the threshold (monitors treat ``n`` below their
            ``settle_samples`` as not settled).
    """

    name: str
    lr: float
    threshold: float
    inv_sqrt_preconditioner: InvSqrtPreconditioner | None = None
    note: str = ""
    preconditioner_samples: Callable[[], float] | None = None
    #: the param groups' own learning rates are folded into ``inv_sqrt_preconditioner``
    #: (:func:`curvlab.diagnostics.stability.stability_model` does it for rules that are not)
    groups_scaled: bool = False

    @property
    def preconditioned(self) -> bool:
        """The rule is on the preconditioned Hessian ``P^-1/2 H P^-1/2`` (``P`` given)."""
        return self.inv_sqrt_preconditioner is not None


def momentum_threshold(momentum: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False,
                       ema: bool = False) -> float:
    """The critical ``lr * lambda`` of a momentum recurrence on a quadratic.

    * gradient descent: 2;
    * heavy ball as in ``torch.optim.SGD`` (``b <- mu b + (1 - d) g``): ``2 (1 + mu) / (1 - d)``;
    * Nesterov as in ``torch.optim.SGD(nesterov=True)``: ``2 (1 + mu) / (1 + 2 mu)``;
    * EMA momentum as in Adam (``m <- b1 m + (1 - b1) g``): ``2 (1 + b1) / (1 - b1)``.

    From the roots of the recurrence's characteristic polynomial (Goh, "Why momentum really
    works", Distill 2017).
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")
    if ema:
        return 2 * (1 + momentum) / (1 - momentum)
    if nesterov:
        return 2 * (1 + momentum) / (1 + 2 * momentum)
    return 2 * (1 + momentum) / (1 - dampening)



def ema_samples(beta: float, step: int | float) -> float:
    """The number of gradients a (bias-corrected) EMA with decay ``beta`` has averaged
    after ``step`` updates, measured as the inverse weight of the newest one:
    ``(1 - beta^t) / (1 - beta)`` (``t`` for a plain sum, ``beta = 1``; 0 before the first
    update). It is ``t`` early on and tends to ``1 / (1 - beta)``."""
    t = float(step)
    if t <= 0:
        return 0.0
    if beta >= 1.0:
        return t
    return -math.expm1(t * math.log(beta)) / (1.0 - beta) if beta > 0 else 1.0
