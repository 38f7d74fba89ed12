"""A uniform view of "something that multiplies vectors" for the Krylov methods.

Every routine in :mod:`curvlab.linalg` accepts a curvature operator
(:class:`~curvlab.linops.base.CurvatureOperator`), a square tensor, any object with
``matvec`` and ``shape`` (and optionally ``matmat``, ``dtype``, ``device``), or a
:class:`MatvecOperator` wrapping a bare callable ``matvec(v)``. :func:`as_operator` turns
all of these into a :class:`MatvecOperator`, which counts the products it performs, so a
result can report the matvecs *that call* used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MatvecOperator", "as_operator"]


class MatvecOperator:
    """A symmetric ``n x n`` operator given by ``matvec(v) -> A v`` (tensors of shape (n,)).

    Args:
        matvec: callable ``v -> A v``.
        size: ``n``.
        dtype, device: of the vectors ``matvec`` accepts (default float64, cpu).
        matmat: optional batched product ``V -> A V`` for ``V`` of shape ``(n, k)``;
            without it a block is multiplied column by column.

    ``num_matvecs`` counts products (a ``k``-column block counts ``k``).
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], size: int, *,
                 dtype: torch.dtype = torch.float64, device: Any = "cpu",
                 matmat: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
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


def as_operator(op: Any) -> MatvecOperator:
    """Wrap ``op`` in a fresh counting :class:`MatvecOperator` (see the module docstring)."""
    if isinstance(op, MatvecOperator):
        return MatvecOperator(op._matvec, op.n, dtype=op.dtype, device=op.device,
                              matmat=op._matmat)
    if isinstance(op, torch.Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"op: a tensor operator must be a square matrix, got shape "
                             f"{tuple(op.shape)}")
        return MatvecOperator(lambda v: op @ v, op.shape[0], dtype=op.dtype, device=op.device,
                              matmat=lambda V: op @ V)
    if hasattr(op, "matvec") and hasattr(op, "shape"):
        n, m = op.shape
        if n != m:
            raise ValueError(f"op must be square, got shape {op.shape}")
        dtype = getattr(op, "dtype", torch.float64)
        if not isinstance(dtype, torch.dtype):
            raise TypeError("op has a non-torch dtype (a scipy LinearOperator?); curvlab's "
                            "Krylov methods work on torch operators")
        return MatvecOperator(op.matvec, int(n), dtype=dtype,
                              device=getattr(op, "device", "cpu"),
                              matmat=getattr(op, "matmat", None))
    if callable(op):
        raise TypeError("op is a bare callable; wrap it with "
                        "curvlab.linalg.MatvecOperator(matvec, size=n, dtype=..., device=...)")
    raise TypeError(f"op must be a CurvatureOperator, a square tensor or a MatvecOperator, "
                    f"got {type(op).__name__}")
