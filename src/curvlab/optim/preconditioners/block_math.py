"""Batched block math of the structured preconditioners (Shampoo, SOAP; reused by K-FAC).

Every function works on a *stack* of equal blocks (leading dimension = block index), so a
model's many layers cost a handful of batched kernels per step.

* **Kronecker statistics** (:func:`kronecker_statistic`): for an order-k block ``G`` the i-th
  factor statistic is ``G_(i) G_(i)^T`` (mode-i unfolding), accumulated as an EMA
  ``F <- beta F + (1 - beta) S`` or, for ``beta == 1``, as the running sum of Shampoo
  (:func:`ema_`).
* **Amortization** (:func:`is_due`): expensive refreshes run at ``start, start + f, ...``.
* **Failure policy** (:func:`guarded_batched`): a matrix function that raises
  :class:`~curvlab.linalg.matfuncs.MatrixFunctionError` or returns values that are not finite
  in the state's dtype is retried block by block; blocks that still fail keep their previous
  value (the optimizer counts them, and raises after ``max_refresh_failures`` failing
  refreshes in a row).
* **Grafting** (:func:`graft_direction`, :func:`graft`): the layer-wise step size of a
  diagonal method (SGD, AdaGrad, RMSprop, Adam) applied to the direction of the structured
  preconditioner, per block: ``P * ||D|| / ||P||`` (Agarwal et al. 2020, "Disentangling
  adaptive gradient methods from learning rates").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab.linalg.matfuncs import MatrixFunctionError
from curvlab.optim.adam import AdamConfig, adam_moments_, adam_preconditioner

logger = logging.getLogger(__name__)

__all__ = ["GRAFTING_METHODS", "kronecker_statistic", "mode_product", "ema_", "finite_or_keep",
           "is_due", "guarded_batched", "max_abs", "surely_finite", "graft_direction", "graft"]

#: Grafting: the norm of the preconditioned direction is replaced, per block, by that of
#: this simpler method's direction (``"none"``: no grafting); Agarwal et al. 2020,
#: "Disentangling adaptive gradient methods from learning rates".
GRAFTING_METHODS = ("none", "sgd", "adagrad", "rmsprop", "adam")


# ----------------------------------------------------------------------------- statistics
def kronecker_statistic(G: Tensor, dim: int) -> Tensor:
    """Mode-``dim`` Gram matrix ``G_(dim) G_(dim)^T`` of a batch of blocks ``G`` ``(B, *s)``."""
    if G.ndim == 3:  # fast path for matrices
        return torch.bmm(G, G.mT) if dim == 0 else torch.bmm(G.mT, G)
    Gi = G.movedim(1 + dim, -1).reshape(G.shape[0], -1, G.shape[1 + dim])
    return torch.bmm(Gi.mT, Gi)


def mode_product(G: Tensor, M: Tensor, dim: int, transpose: bool = False) -> Tensor:
    """Multiply batch of blocks ``G`` ``(B, *s)`` along mode ``dim`` by ``M`` (B, d, d).

    Returns ``G x_dim M`` (i.e. ``M @ G`` for dim 0 of a matrix), or with ``M^T`` if
    ``transpose``.
    """
    Mt = M if transpose else M.mT
    if G.ndim == 3:
        if dim == 0:
            return torch.bmm(Mt.mT, G)
        return torch.bmm(G, Mt)
    # M broadcasts over the other modes: (B, 1, ..., 1, d, d)
    out = torch.matmul(G.movedim(1 + dim, -1), Mt.view(Mt.shape[0], *[1] * (G.ndim - 3),
                                                       *Mt.shape[1:]))
    return out.movedim(-1, 1 + dim)


def ema_(F: Tensor, S: Tensor, beta: float, guard: bool = True) -> None:
    """In place ``F <- beta F + (1 - beta) S``; ``beta == 1`` means the running sum ``F += S``.

    With ``guard``, a block whose new value is non-finite keeps its old value
    (see :func:`finite_or_keep`); without it the update is a single in-place kernel.
    """
    if not guard:
        if beta == 1.0:
            F.add_(S)
        else:
            F.lerp_(S, 1.0 - beta)
        return
    new = F + S if beta == 1.0 else torch.lerp(F, S, 1.0 - beta)
    finite_or_keep(F, new)


def finite_or_keep(old: Tensor, new: Tensor) -> None:
    """``old <- new`` for every leading-dim block of ``new`` that is entirely finite."""
    ok = torch.isfinite(new).flatten(1).all(1) if new.ndim > 1 else torch.isfinite(new)
    ok = ok.view(-1, *([1] * (new.ndim - 1)))
    old.copy_(torch.where(ok, new, old))


def is_due(step: int, start: int, frequency: int) -> bool:
    """Whether an amortized refresh runs at ``step`` (1-based): ``start, start + f, ...``."""
    return step >= start and (step - start) % frequency == 0


def guarded_batched(
    fn: Callable[..., tuple[Tensor, ...]],
    inputs: tuple[Tensor, ...],
    previous: tuple[Tensor, ...],
) -> tuple[tuple[Tensor, ...], int]:
    """Apply a batched matrix function with the keep-previous failure policy.

    ``fn(*inputs)`` maps batches (B, ...) to a tuple of batched outputs and raises
    :class:`MatrixFunctionError` on failure or non-finite output. On failure the batch is
    retried block by block; a block that still fails takes its entry of ``previous``.
    Returns ``(outputs, number_of_failed_blocks)``.
    """
    def checked(*xs: Tensor) -> tuple[Tensor, ...]:
        out = fn(*xs)  # finiteness in the dtype the result is stored in (after any cast)
        if not all_finite([o for o in out if o.is_floating_point()]):
            raise MatrixFunctionError("non-finite result in the state's dtype")
        return out

    try:
        return checked(*inputs), 0
    except MatrixFunctionError as err:
        logger.debug("batched matrix function failed (%s); retrying per block", err)
    outs: list[tuple[Tensor, ...]] = []
    failed = 0
    for b in range(inputs[0].shape[0]):
        try:
            outs.append(checked(*(x[b : b + 1] for x in inputs)))
        except MatrixFunctionError as err:
            logger.warning("preconditioner block %d failed (%s); keeping the previous one", b, err)
            outs.append(tuple(p[b : b + 1] for p in previous))
            failed += 1
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True)), failed


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry is finite: one sum per tensor (NaN / inf propagate into it) in
    at least float32 and one host read, not an elementwise ``isfinite`` tensor and its
    ``all()`` (SOAP on the digits MLP: 6% of a step). A finite sum that overflows float32
    (entries ~1e34) counts as non-finite, which errs on the safe side."""
    if not tensors:
        return True
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            for t in tensors]
    return math.isfinite(float(sum(sums)) if len(sums) > 1 else float(sums[0]))


def max_abs(tensors: Sequence[Tensor]) -> float:
    """Upper bound on ``max |x|`` over all tensors, finite iff every entry is finite.

    One fused 2-norm per tensor and one host sync; only if that overflows (or meets a
    non-finite entry) the exact infinity norm is taken (slower, rare).
    """
    if not tensors:
        return 0.0
    tensors = list(tensors)
    dev = tensors[0].device
    norms = torch._foreach_norm(tensors)
    if any(n.dtype != norms[0].dtype or n.device != dev for n in norms):
        norms = [n.float().to(dev) for n in norms]
    bound = float(torch.stack(norms).max())
    if math.isfinite(bound):
        return bound
    exact = torch._foreach_norm(tensors, float("inf"))
    return float(torch.stack([n.float().to(dev) for n in exact]).max())


def surely_finite(D: Tensor) -> bool:
    """On the CPU, whether every entry of ``D`` is surely finite: its sum is (a NaN or an
    infinity makes the sum non-finite; a sum that merely overflows sends the caller to the
    exact per-block check). One fast reduction, and a host read costs nothing there (the
    infinity norm is 10x slower). Elsewhere ``False`` without looking: the caller's
    per-block ``torch.where`` guard then runs without a device sync."""
    return D.device.type == "cpu" and math.isfinite(D.sum())


# ----------------------------------------------------------------------------- grafting
def graft_direction(
    method: str, m_hat: Tensor, g: Tensor, v: Tensor | None, step: int, beta2: float, eps: float,
    guard: bool = True,
) -> Tensor:
    """Direction of the grafted diagonal method; updates its second moment ``v`` in place.

    sgd: ``m``; adagrad: ``v += g^2``, ``m / (sqrt(v) + eps)``; rmsprop: ``v`` EMA of ``g^2``,
    ``m / (sqrt(v) + eps)``; adam: as rmsprop with bias correction ``v / (1 - beta2^t)``.
    ``m_hat`` is the (bias-corrected) first moment.
    """
    if method == "sgd":
        return m_hat
    assert v is not None
    if method == "adam":  # the one Adam (curvlab.optim.adam); the first moment is m_hat
        config = AdamConfig((0.0, beta2), eps)
        adam_moments_(None, v, g, config)
        return m_hat / adam_preconditioner(v, step, config)
    ema_(v, g * g, 1.0 if method == "adagrad" else beta2, guard)
    return m_hat / v.sqrt().add_(eps)


def _block_norm(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X.flatten(1), dim=1).view(-1, *([1] * (X.ndim - 1)))


def graft(P: Tensor, D: Tensor) -> Tensor:
    """Per block, rescale ``P`` to the norm of ``D``: ``P ||D|| / ||P||`` (0 if ``P == 0``)."""
    pn = _block_norm(P)
    scale = torch.where(pn > 0, _block_norm(D) / pn.clamp_min(torch.finfo(P.dtype).tiny),
                        torch.zeros_like(pn))
    return P * scale
