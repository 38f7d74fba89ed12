"""A one-call curvature summary of a model at its current parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from curvlab.diagnostics.spectrum import top_eigenvalues, trace
from curvlab.linops import HessianOperator

__all__ = ["CurvatureSummary", "curvature_summary"]


@dataclass(frozen=True)
class CurvatureSummary:
    """Scalars of ``curvlab diagnose``; ``max_stable_lr = 2 / lambda_max`` is the largest
    learning rate for which gradient descent on the local quadratic model is stable.
    ``trace_samples`` is the number of Hessian-vector products the trace estimate used."""

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
                      seed: int = 0, trace_samples: int = 30, tol: float = 1e-4
                      ) -> CurvatureSummary:
    """Loss, gradient norm, lambda_max (:func:`~curvlab.diagnostics.top_eigenvalues`,
    Lanczos to relative residual ``tol``), the Hutch++ trace estimate (Meyer et al. 2021;
    :func:`~curvlab.diagnostics.trace`) from ``trace_samples`` Hessian-vector products with
    its standard error, and ``2 / lambda_max``."""
    if not isinstance(trace_samples, int) or trace_samples < 6:
        raise ValueError("trace_samples must be an int >= 6 (Hutch++ splits its products "
                         f"into three groups of at least two), got {trace_samples!r}")
    op = HessianOperator(model, loss_fn, data, params)
    obj = op.objective
    loss, grads = obj.loss_and_grad()
    grad_norm = float(obj.flatten(grads).norm())
    gen = torch.Generator().manual_seed(seed)
    lam = float(top_eigenvalues(op, 1, tol=tol, generator=gen).eigenvalues[0])
    before = op.num_matvecs
    est = trace(op, trace_samples, method="hutch++", generator=gen)
    return CurvatureSummary(
        num_params=obj.num_params, num_samples=obj.num_samples, loss=float(loss),
        grad_norm=grad_norm, lambda_max=lam, trace=est.estimate, trace_stderr=est.stderr,
        trace_samples=op.num_matvecs - before,
        max_stable_lr=2.0 / lam if lam > 0 else math.inf, num_hvps=op.num_matvecs,
    )
