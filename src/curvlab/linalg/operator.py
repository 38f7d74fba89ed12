"""A uniform view of "something that multiplies vectors" for the Krylov methods.

Every routine in :mod:`curvlab.linalg` accepts a curvature operator
(:class:`~curvlab.linops.base.CurvatureOperator`), a square tensor, any object with
``matvec`` and ``shape`` (and optionally ``matmat``, ``dtype``, ``device``), or a
:class:`MatvecOperator` wrapping a bare callable ``matvec(v)``. :func:`as_operator` turns
all of these into a :class:`MatvecOperator`, which counts the products it performs, so a
result can report the matvecs *that call* used.

Every method here assumes a *symmetric* operator, so a user's operator is checked once, where
it enters (:func:`as_operator`); a non-symmetric one raises ValueError instead of giving a
wrong number (Lanczos on ``[[1, 100], [0, 2]]`` "finds" an eigenvalue of 10.3):

* a dense tensor exactly: ``||A - A^T||_F <= tol ||A||_F``;
* a matvec (a :class:`MatvecOperator` or an object with ``matvec``/``shape``) by one
  random test: ``|<u, A v> - <A u, v>| <= tol (||u|| ||A v|| + ||A u|| ||v||) / (2 sqrt(n))``
  for two Gaussian vectors (one block product of two columns, counted in ``num_matvecs``).
  ``u^T (A - A^T) v`` has standard deviation ``||A - A^T||_F`` and the right-hand side is
  about ``tol ||A||_F``, so both tests measure the same relative asymmetry; the random one
  misses an asymmetry of relative size ``r`` with probability about ``tol / r``.

``tol = sqrt(eps)`` of the operator's dtype (1.5e-8 in float64, 3.5e-4 in float32): far
above rounding, and an asymmetry below it moves eigenvalues and traces by less than that
relative amount. curvlab's own operators (classes defined in curvlab: the curvature
operators, which are symmetric by construction) are not checked; a symmetric-up-to-noise
matvec (e.g. resampled at each product) can opt out with
``MatvecOperator(..., check_symmetry=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MatvecOperator", "as_operator", "symmetry_tolerance"]


class MatvecOperator:
    """A symmetric ``n x n`` operator given by ``matvec(v) -> A v`` (tensors of shape (n,)).

    Args:
        matvec: callable ``v -> A v``.
        size: ``n``.
        dtype, device: of the vectors ``matvec`` accepts (default float64, cpu).
        matmat: optional batched product ``V -> A V`` for ``V`` of shape ``(n, k)``;
            without it a block is multiplied column by column.
        check_symmetry: test symmetry once, the first time the operator is used (see the
            module docstring); pass False for a matvec that is symmetric only up to noise.

    ``num_matvecs`` counts products (a ``k``-column block counts ``k``).
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], size: int, *,
                 dtype: torch.dtype = torch.float64, device: Any = "cpu",
                 matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 check_symmetry: bool = True) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self._matvec = matvec
        self._matmat = matmat
        self.n = size
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0
        self.check_symmetry = bool(check_symmetry)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.n, self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(n,)``; counted in ``num_matvecs``."""
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``(n, k)``."""
        self.num_matvecs += V.shape[1]
        if self._matmat is not None:
            return self._matmat(V)
        return torch.stack([self._matvec(V[:, i]) for i in range(V.shape[1])], dim=1)

    def __repr__(self) -> str:
        return f"MatvecOperator(n={self.n}, dtype={self.dtype}, num_matvecs={self.num_matvecs})"


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the relative asymmetry :func:`as_operator` accepts."""
    return math.sqrt(torch.finfo(dtype).eps)


def _asymmetry_error(rel: float, tol: float, what: str) -> ValueError:
    return ValueError(
        f"op is not symmetric: {what} is {rel:.3g} relative (tolerance {tol:.2g}). curvlab's "
        "Krylov methods and estimators (Lanczos, SLQ, trace and log-det estimators) assume a "
        "symmetric operator and would return wrong numbers; pass the symmetric part "
        "(A + A^T) / 2, or, if the matvec is symmetric up to noise (e.g. resampled at each "
        "product), wrap it as MatvecOperator(matvec, size=n, check_symmetry=False)")


def check_symmetric_matrix(A: torch.Tensor) -> None:
    """Raise ValueError unless ``||A - A^T||_F <= sqrt(eps) ||A||_F`` (see the module)."""
    A = A.detach()
    norm2, asym2 = 0.0, 0.0
    for i in range(0, A.shape[0], 1024):  # row blocks: no n x n float64 copy
        rows = A[i:i + 1024].double()
        norm2 += float(rows.square().sum())
        asym2 += float((rows - A[:, i:i + 1024].T.double()).square().sum())
    norm, asym = math.sqrt(norm2), math.sqrt(asym2)
    if not math.isfinite(norm) or not math.isfinite(asym):
        raise ValueError("op: the matrix has non-finite entries")
    tol = symmetry_tolerance(A.dtype)
    if asym > tol * norm:
        raise _asymmetry_error(asym / norm, tol, "||A - A^T||_F / ||A||_F")


def check_symmetric_matvec(A: MatvecOperator) -> None:
    """One random test ``<u, A v> = <A u, v>`` (see the module docstring); two products,
    counted on ``A``. The test vectors come from a fixed seed, not the caller's generator."""
    gen = torch.Generator().manual_seed(0x5EED)
    UV = torch.randn(A.n, 2, generator=gen, dtype=torch.float64)
    AUV = A.matmat(UV.to(dtype=A.dtype, device=A.device)).detach().double().cpu()
    u, v, Au, Av = UV[:, 0], UV[:, 1], AUV[:, 0], AUV[:, 1]
    diff = abs(float(u @ Av) - float(Au @ v))
    scale = float(u.norm() * Av.norm() + Au.norm() * v.norm()) / (2 * math.sqrt(A.n))
    if not math.isfinite(diff):
        raise ValueError("op: the matvec returned non-finite values for a random vector")
    tol = symmetry_tolerance(A.dtype)
    if diff > tol * scale:
        raise _asymmetry_error(diff / max(scale, 1e-300), tol,
                               "|<u, A v> - <A u, v>| for random u, v")


def _is_curvlab_operator(op: Any) -> bool:
    return type(op).__module__.split(".")[0] == "curvlab"


def as_operator(op: Any) -> MatvecOperator:
    """Wrap ``op`` in a fresh counting :class:`MatvecOperator` (see the module docstring),
    checking a user's operator for symmetry the first time it is seen."""
    if isinstance(op, MatvecOperator):
        A = MatvecOperator(op._matvec, op.n, dtype=op.dtype, device=op.device,
                           matmat=op._matmat, check_symmetry=False)
        if op.check_symmetry:
            check_symmetric_matvec(A)
            op.check_symmetry = False  # checked once; wrappers of it are trusted
        return A
    if isinstance(op, torch.Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"op: a tensor operator must be a square matrix, got shape "
                             f"{tuple(op.shape)}")
        check_symmetric_matrix(op)
        return MatvecOperator(lambda v: op @ v, op.shape[0], dtype=op.dtype, device=op.device,
                              matmat=lambda V: op @ V, check_symmetry=False)
    if hasattr(op, "matvec") and hasattr(op, "shape"):
        n, m = op.shape
        if n != m:
            raise ValueError(f"op must be square, got shape {op.shape}")
        dtype = getattr(op, "dtype", torch.float64)
        if not isinstance(dtype, torch.dtype):
            raise TypeError("op has a non-torch dtype (a scipy LinearOperator?); curvlab's "
                            "Krylov methods work on torch operators")
        A = MatvecOperator(op.matvec, int(n), dtype=dtype, device=getattr(op, "device", "cpu"),
                           matmat=getattr(op, "matmat", None), check_symmetry=False)
        if not _is_curvlab_operator(op):
            check_symmetric_matvec(A)
        return A
    if callable(op):
        raise TypeError("op is a bare callable; wrap it with "
                        "curvlab.linalg.MatvecOperator(matvec, size=n, dtype=..., device=...)")
    raise TypeError(f"op must be a CurvatureOperator, a square tensor or a MatvecOperator, "
                    f"got {type(op).__name__}")
