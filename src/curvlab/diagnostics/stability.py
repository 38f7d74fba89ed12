"""Stability of the optimizer on the local quadratic model, and step-size diagnostics.

On ``L(theta) ~ 1/2 theta^T H theta``, gradient descent ``theta <- theta - lr g`` is stable
iff ``lr * lambda_max(H) < 2``; the largest stable learning rate is ``2 / lambda_max``.
Training at that edge is the "edge of stability" (Cohen et al., ICLR 2021). Momentum and
preconditioning move the threshold (:func:`stability_threshold`); for Adam-like
optimizers the relevant curvature is the *preconditioned sharpness*
``lambda_max(P^{-1} H)`` with ``P = diag(sqrt(v_hat) + eps)`` from the optimizer's own
second-moment state (Cohen et al., "Adaptive gradient methods at the edge of
stability", 2022).

Also here: the Newton decrement, the relative update size and the minibatch gradient
noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curvlab.linalg.estimators import quadratic_form
from curvlab.linalg.krylov import EigenResult, lanczos
from curvlab.linalg.operator import MatvecOperator, as_operator
from curvlab.objective import Objective

__all__ = ["stability_threshold", "StabilityReport", "gd_stability", "stability_report",
           "adam_preconditioner", "preconditioned_sharpness", "NewtonDecrement",
           "newton_decrement", "relative_update", "GradientNoise", "gradient_noise"]

ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")


def stability_threshold(optimizer: torch.optim.Optimizer | None = None, *,
                        momentum: float = 0.0, dampening: float = 0.0,
                        nesterov: bool = False, ema_momentum: bool = False) -> float:
    """The critical value ``c`` of ``lr * lambda`` above which the optimizer diverges on a
    quadratic with curvature ``lambda`` (for Adam-like optimizers: of the preconditioned
    curvature).

    * gradient descent: 2;
    * heavy ball as in ``torch.optim.SGD`` (``b <- mu b + (1 - d) g``): ``2 (1 + mu) / (1 - d)``;
    * Nesterov as in ``torch.optim.SGD(nesterov=True)``: ``2 (1 + mu) / (1 + 2 mu)``;
    * EMA momentum as in Adam (``m <- b1 m + (1 - b1) g``): ``2 (1 + b1) / (1 - b1)`` (38
      for ``b1 = 0.9``; Cohen et al. 2022, sec. 2).

    From the roots of the momentum recurrence's characteristic polynomial (Goh, "Why
    momentum really works", Distill 2017). Pass an optimizer to read its settings.
    """
    if optimizer is not None:
        group = optimizer.param_groups[0]
        name = type(optimizer).__name__
        if name in ADAM_LIKE:
            return stability_threshold(momentum=group["betas"][0], ema_momentum=True)
        return stability_threshold(momentum=group.get("momentum", 0.0),
                                   dampening=group.get("dampening", 0.0),
                                   nesterov=group.get("nesterov", False))
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")
    if ema_momentum:
        return 2 * (1 + momentum) / (1 - momentum)
    if nesterov:
        return 2 * (1 + momentum) / (1 + 2 * momentum)
    return 2 * (1 + momentum) / (1 - dampening)


@dataclass
class StabilityReport:
    """``ratio = lr * sharpness``; the step is stable on the quadratic model iff
    ``ratio < threshold``; ``max_stable_lr = threshold / sharpness``."""

    sharpness: float
    lr: float
    threshold: float
    ratio: float
    max_stable_lr: float
    stable: bool
    preconditioned: bool = False
    num_matvecs: int = 0


def gd_stability(sharpness: float, lr: float, threshold: float = 2.0) -> StabilityReport:
    """Stability numbers from a known sharpness (``lambda_max`` or the preconditioned one)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    ratio = lr * sharpness
    max_lr = threshold / sharpness if sharpness > 0 else math.inf
    return StabilityReport(float(sharpness), float(lr), float(threshold), float(ratio),
                           float(max_lr), bool(ratio < threshold))


def _optimizer_lookup(optimizer: torch.optim.Optimizer) -> dict[int, tuple[dict, dict]]:
    return {id(p): (group, optimizer.state.get(p, {}))
            for group in optimizer.param_groups for p in group["params"]}


def adam_preconditioner(op: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The flat diagonal ``P = sqrt(v / (1 - b2^t)) + eps`` that an Adam-like optimizer
    divides its step by, in the operator's parameter order (from ``optimizer.state``)."""
    objective = getattr(op, "objective", None)
    if objective is None:
        raise TypeError("op must be a curvature operator built on the optimizer's model "
                        "parameters (e.g. HessianOperator(model, loss_fn, batch))")
    if type(optimizer).__name__ not in ADAM_LIKE:
        raise TypeError(f"optimizer must be Adam-like ({', '.join(ADAM_LIKE)}), got "
                        f"{type(optimizer).__name__}")
    lookup = _optimizer_lookup(optimizer)
    pieces = []
    for name, p in objective.params.items():
        if id(p) not in lookup:
            raise ValueError(f"parameter {name!r} is not managed by the optimizer")
        group, state = lookup[id(p)]
        if "exp_avg_sq" not in state:
            raise ValueError("the optimizer has no second-moment state yet; take at least one "
                             "optimizer step first")
        step = float(state["step"])
        v = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        v_hat = v / (1 - group["betas"][1] ** step)
        pieces.append((v_hat.sqrt() + group["eps"]).reshape(-1))
    return torch.cat(pieces).to(dtype=objective.dtype)


def preconditioned_sharpness(op: Any, preconditioner: torch.Tensor | torch.optim.Optimizer, *,
                             tol: float = 1e-3, v0: torch.Tensor | None = None,
                             max_iter: int | None = None, num_vectors: int | None = None,
                             min_iter: int = 1,
                             generator: torch.Generator | None = None) -> EigenResult:
    """``lambda_max(P^{-1} H)`` for a positive diagonal ``P`` (a flat tensor, or an
    Adam-like optimizer whose state defines it, see :func:`adam_preconditioner`).

    Computed as the top eigenpair of the symmetric ``P^{-1/2} H P^{-1/2}`` (same
    eigenvalues); the returned eigenvectors are of that symmetric operator. ``v0``,
    ``num_vectors`` and ``min_iter`` are passed to :func:`~curvlab.linalg.lanczos` (warm
    starts).
    """
    if isinstance(preconditioner, torch.optim.Optimizer):
        preconditioner = adam_preconditioner(op, preconditioner)
    A = as_operator(op)
    if preconditioner.shape != (A.n,):
        raise ValueError(f"preconditioner has shape {tuple(preconditioner.shape)}, expected "
                         f"({A.n},)")
    if not (preconditioner > 0).all():
        raise ValueError("preconditioner must be positive")
    s = preconditioner.to(dtype=A.dtype, device=A.device).rsqrt()
    # D A D with A already checked symmetric by as_operator: no second check
    S = MatvecOperator(lambda v: s * A.matvec(s * v), A.n, dtype=A.dtype, device=A.device,
                       matmat=lambda V: s[:, None] * A.matmat(s[:, None] * V),
                       check_symmetry=False)
    return lanczos(S, 1, tol=tol, v0=v0, max_iter=max_iter, num_vectors=num_vectors,
                   min_iter=min_iter, generator=generator)


def stability_report(op: Any, optimizer: torch.optim.Optimizer, *, tol: float = 1e-3,
                     generator: torch.Generator | None = None) -> StabilityReport:
    """Sharpness, ``lr x sharpness`` and the largest stable learning rate for ``optimizer``
    (its first param group's ``lr`` and momentum settings). Adam-like optimizers use the
    preconditioned sharpness."""
    lr = float(optimizer.param_groups[0]["lr"])
    threshold = stability_threshold(optimizer)
    pre = type(optimizer).__name__ in ADAM_LIKE
    res = (preconditioned_sharpness(op, optimizer, tol=tol, generator=generator) if pre
           else lanczos(op, 1, tol=tol, generator=generator))
    rep = gd_stability(float(res.eigenvalues[0]), lr, threshold)
    rep.preconditioned, rep.num_matvecs = pre, res.num_matvecs
    return rep


@dataclass
class NewtonDecrement:
    """``value = sqrt(g^T (H + damping I)^{-1} g)``; the Newton step decreases the
    quadratic model by ``value^2 / 2`` (Boyd & Vandenberghe, *Convex Optimization*,
    sec. 9.5.1). ``value / ||g||`` near ``1 / sqrt(lambda)`` says along which curvature
    the gradient points."""

    value: float
    predicted_decrease: float
    grad_norm: float
    num_matvecs: int
    converged: bool


def newton_decrement(op: Any, grad: torch.Tensor | None = None, *, damping: float = 0.0,
                     tol: float = 1e-6, max_iter: int = 100) -> NewtonDecrement:
    """Newton decrement by Lanczos quadrature of ``f(x) = 1 / (x + damping)`` (the Krylov
    equivalent of solving with CG). ``grad`` defaults to the objective's full gradient.

    Raises ValueError if ``H + damping I`` shows a non-positive Ritz value: the decrement
    is then undefined (use a Gauss-Newton operator or more damping).
    """
    if grad is None:
        objective = getattr(op, "objective", None)
        if objective is None:
            raise TypeError("pass grad=..., or an operator built on an Objective")
        grad = objective.flat_grad(getattr(op, "point", None))
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    q = quadratic_form(op, grad, lambda t: 1.0 / (t + damping), tol=tol, max_iter=max_iter)
    if q.ritz_values.size and float(np.min(q.ritz_values)) + damping <= 0:
        raise ValueError(f"H + damping I is not positive definite (a Ritz value "
                         f"{float(np.min(q.ritz_values)):.3g} + damping {damping} <= 0); "
                         "increase damping or use a Gauss-Newton operator")
    value = math.sqrt(max(q.value, 0.0))
    return NewtonDecrement(value, 0.5 * value ** 2, float(grad.double().norm()),
                           q.num_matvecs, q.converged)


def _as_flat(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1)
    if isinstance(x, Mapping):
        x = x.values()
    if isinstance(x, torch.nn.Module):
        x = x.parameters()
    if isinstance(x, Iterable):
        parts = [t.detach().reshape(-1) for t in x]
        if parts:
            return torch.cat(parts)
    raise TypeError("expected a tensor, a dict or an iterable of tensors, or a module")


def relative_update(before: Any, after: Any) -> float:
    """``||theta_after - theta_before|| / ||theta_before||`` (tensors, dicts, iterables of
    tensors or modules). Values around 1e-3 are typical of healthy training; sudden
    jumps precede instabilities."""
    a, b = _as_flat(before), _as_flat(after)
    if a.shape != b.shape:
        raise ValueError(f"before and after have {a.numel()} and {b.numel()} entries")
    den = float(a.double().norm())
    return float((b - a).double().norm()) / den if den > 0 else math.inf


@dataclass
class GradientNoise:
    """Minibatch-vs-full-batch gradient gap.

    ``relative_gap = mean ||g_B - g|| / ||g||``; ``noise_scale = B tr(Sigma) / ||g||^2``
    with ``tr(Sigma) ~ B mean ||g_B - g||^2`` is the "simple noise scale" ``B_simple``
    (McCandlish et al., "An empirical model of large-batch training", 2018, eq. 2.8):
    batch sizes well below it are noise dominated.
    """

    grad_norm: float
    minibatch_grad_norm: float
    mean_gap: float
    relative_gap: float
    noise_scale: float
    batch_size: int
    num_batches: int


def gradient_noise(model: Any, loss_fn: Any = None, data: Any = None, *, batch_size: int = 32,
                   num_batches: int = 10, params: Any = None,
                   generator: torch.Generator | None = None) -> GradientNoise:
    """Compare ``num_batches`` random minibatch gradients (size ``batch_size``, drawn
    without replacement within a batch) with the full-batch gradient on ``data``, one
    ``(inputs, targets)`` pair of tensors."""
    if isinstance(model, Objective):
        model, loss_fn, data, params = model.model, model.loss_fn, model.data[0], model.params
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError("data must be one (inputs, targets) pair of tensors")
    X, y = data
    N = X.shape[0]
    if not 1 <= batch_size <= N:
        raise ValueError(f"batch_size must be in [1, {N}], got {batch_size!r}")
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an int >= 2, got {num_batches!r}")
    names = list(params) if isinstance(params, Mapping) else params
    full = Objective(model, loss_fn, (X, y), names).flat_grad()
    gaps, norms = [], []
    for _ in range(num_batches):
        idx = torch.randperm(N, generator=generator)[:batch_size].to(X.device)
        gb = Objective(model, loss_fn, (X[idx], y[idx]), names).flat_grad()
        gaps.append(float((gb - full).double().norm()))
        norms.append(float(gb.double().norm()))
    gn = float(full.double().norm())
    mean_gap = sum(gaps) / len(gaps)
    mean_sq = sum(g * g for g in gaps) / len(gaps)
    # without replacement: E||g_B - g||^2 = tr(Sigma) / B * (N - B) / (N - 1)
    fpc = (N - batch_size) / (N - 1) if N > 1 else 1.0
    tr_sigma = batch_size * mean_sq / fpc if fpc > 0 else 0.0
    return GradientNoise(gn, sum(norms) / len(norms), mean_gap,
                         mean_gap / gn if gn > 0 else math.inf,
                         tr_sigma / gn ** 2 if gn > 0 else math.inf, batch_size, num_batches)
