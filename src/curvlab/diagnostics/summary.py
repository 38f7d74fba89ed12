"""A one-call curvature summary of a model at its current parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curvlab.linops import HessianOperator

__all__ = ["CurvatureSummary", "curvature_summary"]


@dataclass(frozen=True)
class CurvatureSummary:
    """Scalars of ``curvlab diagnose``; ``max_stable_lr = 2 / lambda_max`` is the largest
    learning rate for which gradient descent on the local quadratic model is stable."""

    num_params: int
    num_samples: int
    loss: float
    grad_norm: float
    lambda_max: float
    trace: float
    trace_stderr: float
    trace_samples: int
    max_stable_lr: float
    num_hvps: int


def curvature_summary(model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                      seed: int = 0, trace_samples: int = 20, tol: float = 1e-4
                      ) -> CurvatureSummary:
    """Loss, gradient norm, lambda_max (Lanczos via scipy ``eigsh`` on the Hessian
    operator), Hutchinson trace estimate ``tr H ~ mean_i z_i^T H z_i`` with Rademacher
    ``z_i`` and its standard error, and ``2 / lambda_max``."""
    from scipy.sparse.linalg import eigsh

    if trace_samples < 2:
        raise ValueError("trace_samples must be at least 2 (for a standard error)")
    op = HessianOperator(model, loss_fn, data, params)
    obj = op.objective
    loss, grads = obj.loss_and_grad()
    grad_norm = float(obj.flatten(grads).norm())
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(op.shape[0])
    lam = float(eigsh(op.to_scipy(), k=1, which="LA", tol=tol, v0=v0,
                      return_eigenvectors=False)[0])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Z = (torch.randint(0, 2, (op.shape[0], trace_samples), generator=gen) * 2 - 1)
    Z = Z.to(dtype=op.dtype, device=op.device)
    quad = (Z * op.matmat(Z)).sum(0)
    trace, stderr = float(quad.mean()), float(quad.std() / math.sqrt(trace_samples))
    return CurvatureSummary(
        num_params=obj.num_params, num_samples=obj.num_samples, loss=float(loss),
        grad_norm=grad_norm, lambda_max=lam, trace=trace, trace_stderr=stderr,
        trace_samples=trace_samples,
        max_stable_lr=2.0 / lam if lam > 0 else math.inf, num_hvps=op.num_matvecs,
    )
