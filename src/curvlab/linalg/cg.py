"""Conjugate gradients for symmetric systems and the Steihaug-CG trust-region solver.

* :func:`cg` solves ``A x = b`` for symmetric positive-definite ``A`` given only products
  ``v -> A v`` (Hestenes & Stiefel 1952; N&W Alg. 5.2, preconditioned Alg. 5.3). It stops
  when ``||r|| <= max(rtol ||b||, atol)``, after ``max_iter`` iterations, or as soon as a
  direction of non-positive curvature ``p^T A p <= 0`` is met (reported, with ``p``), which
  is what truncated-Newton methods need (N&W Alg. 7.1).
* :func:`steihaug_cg` approximately minimizes the model ``g^T p + 1/2 p^T B p`` subject to
  ``||p|| <= radius`` (Steihaug 1983; N&W Alg. 7.2): CG from ``p = 0`` until convergence,
  negative curvature or the boundary, the last two ending on the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["cg", "steihaug_cg", "boundary_roots", "CGResult", "SteihaugResult", "as_matvec"]


def as_matvec(A: Any, name: str = "A") -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> A v`` for a callable, a square tensor or an object with ``matvec``."""
    if isinstance(A, torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
        return lambda v: A @ v
    if hasattr(A, "matvec"):
        return A.matvec
    if callable(A):
        return A
    raise TypeError(f"{name} must be a tensor, a callable v -> {name} v or an operator with "
                    f".matvec, got {type(A).__name__}")


@dataclass
class CGResult:
    """``x``: the iterate; ``iterations``: products with ``A`` used; ``converged``: the
    residual tolerance holds; ``negative_curvature``: stopped at a direction ``direction``
    with ``p^T A p <= 0`` (``x`` is the iterate before it); ``residual_norm``: ``||b - A x||``."""

    x: torch.Tensor
    iterations: int
    converged: bool
    negative_curvature: bool
    residual_norm: float
    direction: torch.Tensor | None = None


def cg(A: Any, b: torch.Tensor, x0: torch.Tensor | None = None, *, rtol: float = 1e-5,
       atol: float = 0.0, max_iter: int | None = None,
       M: Any = None) -> CGResult:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients.

    ``A``: symmetric positive-definite operator (callable, tensor or ``.matvec``); ``M``:
    optional preconditioner applying ``M^{-1} r`` (same forms). ``max_iter`` defaults to
    ``2 * len(b)``. The iteration (N&W Alg. 5.3), with ``z = M^{-1} r``:
    ``alpha = r^T z / p^T A p``, ``x += alpha p``, ``r -= alpha A p``,
    ``beta = r_new^T z_new / r^T z``, ``p = z_new + beta p``.
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        raise ValueError("b must be a 1-D tensor")
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got {rtol}, {atol}")
    matvec = as_matvec(A)
    precond = None if M is None else as_matvec(M, "M")
    n = b.numel()
    max_iter = 2 * n if max_iter is None else int(max_iter)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    bnorm = float(torch.linalg.vector_norm(b))
    tol = max(rtol * bnorm, atol)
    rnorm = float(torch.linalg.vector_norm(r))
    it = 0
    if rnorm <= tol:
        return CGResult(x, 0, True, False, rnorm)
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = float(torch.dot(r, z))
    while it < max_iter:
        Ap = matvec(p)
        it += 1
        pAp = float(torch.dot(p, Ap))
        if not pAp > 0:
            return CGResult(x, it, False, True, rnorm, p)
        alpha = rz / pAp
        x = torch.add(x, p, alpha=alpha)
        r = torch.add(r, Ap, alpha=-alpha)
        if precond is None:
            z = r
            rz_new = float(torch.dot(r, r))
            rnorm = math.sqrt(rz_new)
        else:
            z = precond(r)
            rz_new, rr = torch.stack((torch.dot(r, z), torch.dot(r, r))).tolist()
            rnorm = math.sqrt(rr)
        if rnorm <= tol:
            return CGResult(x, it, True, False, rnorm)
        p = torch.add(z, p, alpha=rz_new / rz)
        rz = rz_new
    return CGResult(x, it, False, False, rnorm)


@dataclass
class SteihaugResult:
    """``p``: the step; ``iterations``: products with ``B``; ``hit_boundary``: ``||p|| =
    radius``; ``negative_curvature``: met ``d^T B d <= 0``; ``residual_norm``: model
    gradient norm ``||g + B p||`` at the last interior iterate; ``model_value``:
    ``g^T p + 1/2 p^T B p`` (tracked without extra products)."""

    p: torch.Tensor
    iterations: int
    hit_boundary: bool
    negative_curvature: bool
    residual_norm: float
    model_value: float


def boundary_roots(zz: float, zd: float, dd: float, radius: float) -> tuple[float, float]:
    """Both roots ``tau`` of ``||z + tau d|| = radius`` (smallest first) from the dot
    products ``z^T z``, ``z^T d``, ``d^T d``, in the cancellation-free form
    ``q = -(zd + sign(zd) sqrt(zd^2 - dd (zz - radius^2)))``, roots ``q / dd`` and
    ``(zz - radius^2) / q``."""
    c = zz - radius * radius
    disc = math.sqrt(max(zd * zd - dd * c, 0.0))
    q = -(zd + math.copysign(disc, zd)) if zd != 0 else disc
    if q == 0:
        return 0.0, 0.0
    r1, r2 = q / dd, c / q
    return (r1, r2) if r1 <= r2 else (r2, r1)


def _to_boundary(z: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[float, float]:
    """:func:`boundary_roots` of tensors (one host read for the three dot products)."""
    dd, zd, zz = torch.stack((torch.dot(d, d), torch.dot(z, d), torch.dot(z, z))).tolist()
    return boundary_roots(zz, zd, dd, radius)


def steihaug_cg(B: Any, g: torch.Tensor, radius: float, *, rtol: float = 1e-5,
                atol: float = 0.0, max_iter: int | None = None) -> SteihaugResult:
    """Steihaug-CG for ``min_p g^T p + 1/2 p^T B p`` s.t. ``||p|| <= radius`` (N&W Alg. 7.2).

    ``B`` may be indefinite. Stops when ``||g + B p|| <= max(rtol ||g||, atol)``; on
    negative curvature it moves along ``d`` to the boundary root with the lower model
    value; when a CG step leaves the region it stops at the boundary crossing.
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    matvec = as_matvec(B, "B")
    n = g.numel()
    max_iter = 2 * n if max_iter is None else int(max_iter)
    z = torch.zeros_like(g)
    r = g.clone()
    rr = float(torch.dot(r, r))
    tol = max(rtol * math.sqrt(rr), atol)
    if math.sqrt(rr) <= tol or rr == 0:
        return SteihaugResult(z, 0, False, False, math.sqrt(rr), 0.0)

    def model(z: torch.Tensor, r: torch.Tensor) -> float:
        return 0.5 * float(torch.dot(g + r, z))

    d = -r
    it = 0
    while it < max_iter:
        Bd = matvec(d)
        it += 1
        dBd, rd = torch.stack((torch.dot(d, Bd), torch.dot(r, d))).tolist()
        if not dBd > 0:
            # model change along d from z: tau r^T d + tau^2 dBd / 2
            tau = min(_to_boundary(z, d, radius), key=lambda t: t * rd + 0.5 * t * t * dBd)
            m = model(z, r) + tau * rd + 0.5 * tau * tau * dBd
            return SteihaugResult(torch.add(z, d, alpha=tau), it, True, True, math.sqrt(rr), m)
        alpha = rr / dBd
        z_new = torch.add(z, d, alpha=alpha)
        if float(torch.linalg.vector_norm(z_new)) >= radius:
            tau = _to_boundary(z, d, radius)[1]
            m = model(z, r) + tau * rd + 0.5 * tau * tau * dBd
            return SteihaugResult(torch.add(z, d, alpha=tau), it, True, False, math.sqrt(rr), m)
        z = z_new
        r = torch.add(r, Bd, alpha=alpha)
        rr_new = float(torch.dot(r, r))
        if math.sqrt(rr_new) <= tol:
            return SteihaugResult(z, it, False, False, math.sqrt(rr_new), model(z, r))
        d = torch.add(-r, d, alpha=rr_new / rr)
        rr = rr_new
    return SteihaugResult(z, it, False, False, math.sqrt(rr), model(z, r))
