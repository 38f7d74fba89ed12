"""Sharpness: the top Hessian eigenvalue and SAM-style epsilon-sharpness.

* ``lambda_max`` -- the largest eigenvalue of the loss Hessian (the curvature along the
  sharpest direction), by Lanczos.
* epsilon-sharpness -- ``max_{||delta|| <= rho} L(theta + delta) - L(theta)`` (Keskar et
  al., ICLR 2017, eq. 4, with a Euclidean ball as in SAM, Foret et al., ICLR 2021, eq. 1).
  For small ``rho`` it is about ``rho ||g|| + rho^2 lambda_max / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from curvlab.diagnostics.spectrum import top_eigenvalues
from curvlab.linalg.krylov import EigenResult
from curvlab.objective import Objective

__all__ = ["lambda_max", "epsilon_sharpness", "EpsilonSharpness"]


def lambda_max(op: Any, *, tol: float = 1e-3, v0: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> EigenResult:
    """The top Hessian eigenpair (``.eigenvalues[0]``) to relative tolerance ``tol``
    (Lanczos; see :func:`curvlab.diagnostics.top_eigenvalues`)."""
    return top_eigenvalues(op, 1, tol=tol, v0=v0, generator=generator)


@dataclass
class EpsilonSharpness:
    """``value = L(theta + delta) - L(theta)`` for the best ``delta`` found, a lower bound
    on the true maximum over the ball (ascent finds a local maximizer).

    ``keskar`` is Keskar et al.'s normalization ``100 * value / (1 + L(theta))``.
    """

    value: float
    loss: float
    perturbed_loss: float
    rho: float
    delta: torch.Tensor
    keskar: float
    num_grads: int


def _objective(model: Any, loss_fn: Any, data: Any, params: Any) -> Objective:
    if isinstance(model, Objective):
        return model
    return Objective(model, loss_fn, data, params)


def epsilon_sharpness(model: Any, loss_fn: Any = None, data: Any = None, *, rho: float = 0.05,
                      steps: int = 5, params: Any = None) -> EpsilonSharpness:
    """SAM-style epsilon-sharpness within the Euclidean ball of radius ``rho``.

    Step 1 is SAM's first-order maximizer ``delta = rho g / ||g||`` (Foret et al. 2021,
    eq. 2); each further step is the fixed-point update for a maximizer on the sphere,
    ``delta <- rho grad L(theta + delta) / ||grad L(theta + delta)||`` (its KKT condition).
    The best perturbation seen is kept. Costs ``steps + 1`` full gradients.

    Accepts an :class:`~curvlab.objective.Objective` or ``(model, loss_fn, data)``.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    obj = _objective(model, loss_fn, data, params)
    theta = obj.param_tensors()
    flat = obj.flatten(theta)
    loss, g = obj.loss_and_grad(theta)
    base = float(loss)
    best_val, best_delta = base, torch.zeros_like(flat)
    gflat = obj.flatten(g)
    for _ in range(steps):
        gn = gflat.norm()
        if gn == 0:
            break
        delta = rho * gflat / gn
        val, gp = obj.loss_and_grad(obj.unflatten(flat + delta))
        if float(val) > best_val:
            best_val, best_delta = float(val), delta
        gflat = obj.flatten(gp)
    value = best_val - base
    return EpsilonSharpness(value, base, best_val, rho, best_delta, 100 * value / (1 + base),
                            1 + steps)
