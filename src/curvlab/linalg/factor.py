"""Modified Cholesky factorization for (possibly indefinite) symmetric matrices.

Algorithm: Gill, Murray & Wright, *Practical Optimization* (1981), Sec. 4.4.2.2, in the
LDL^T form of Nocedal & Wright, *Numerical Optimization* (2nd ed.), Alg. 3.4 (no
pivoting). Column by column,

    c_jj = a_jj - sum_{s<j} d_s l_js^2,     c_ij = a_ij - sum_{s<j} d_s l_is l_js  (i > j)
    theta_j = max_{i>j} |c_ij|,             d_j = max(|c_jj|, (theta_j / beta)^2, delta)
    l_ij = c_ij / d_j,

with ``beta^2 = max(gamma, xi / sqrt(n^2 - 1), eps)`` (``gamma``/``xi`` the largest
diagonal/off-diagonal magnitudes) and ``delta = eps * max(gamma + xi, 1)``. The result is
``A + E = L L^T`` with ``E`` diagonal, ``E >= 0`` and ``L`` lower triangular with a positive
diagonal, so ``A + E`` is positive definite. When ``A`` already admits a Cholesky
factorization it is returned unmodified (``E = 0``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["modified_cholesky", "ModifiedCholesky"]


class ModifiedCholesky(NamedTuple):
    """``L`` (lower triangular, ``A + diag(E) = L L^T``) and the diagonal shift ``E``."""

    L: torch.Tensor
    E: torch.Tensor

    @property
    def modified(self) -> bool:
        return bool((self.E > 0).any())


def modified_cholesky(A: torch.Tensor, *, delta: float | None = None,
                      beta: float | None = None) -> ModifiedCholesky:
    """Gill-Murray-Wright modified Cholesky of the symmetric matrix ``A`` (see module doc).

    ``delta`` (smallest allowed pivot) and ``beta`` (bound on ``|l_ij| sqrt(d_j)``) default
    to the GMW choices above. Stays on ``A``'s device, no host syncs in the GMW loop.
    """
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square 2-D tensor, got {getattr(A, 'shape', A)}")
    if not A.is_floating_point():
        raise TypeError(f"A must be floating point, got {A.dtype}")
    A = 0.5 * (A + A.T)
    n = A.shape[0]
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return ModifiedCholesky(L, torch.zeros(n, dtype=A.dtype, device=A.device))
    eps = torch.finfo(A.dtype).eps
    diag = A.diagonal()
    gamma = diag.abs().max()
    off = (A - torch.diag(diag)).abs().max() if n > 1 else torch.zeros((), dtype=A.dtype,
                                                                       device=A.device)
    nu = max(1.0, math.sqrt(n * n - 1.0))
    if beta is None:
        beta2 = torch.clamp(torch.maximum(gamma, off / nu), min=eps)
    else:
        beta2 = torch.as_tensor(beta * beta, dtype=A.dtype, device=A.device)
    if delta is None:
        delta_t = eps * torch.clamp(gamma + off, min=1.0)
    else:
        delta_t = torch.as_tensor(delta, dtype=A.dtype, device=A.device)
    Lu = torch.zeros_like(A)  # unit lower triangular
    d = torch.zeros(n, dtype=A.dtype, device=A.device)
    for j in range(n):
        Lj = Lu[j, :j]
        c = A[j:, j] - Lu[j:, :j] @ (d[:j] * Lj)
        theta = c[1:].abs().max() if j < n - 1 else torch.zeros((), dtype=A.dtype,
                                                                device=A.device)
        dj = torch.maximum(torch.maximum(c[0].abs(), theta * theta / beta2), delta_t)
        d[j] = dj
        Lu[j, j] = 1.0
        Lu[j + 1:, j] = c[1:] / dj
    L = Lu * d.sqrt()
    E = torch.clamp((Lu * Lu * d).sum(1) - diag, min=0.0)  # d_j - c_jj >= 0
    return ModifiedCholesky(L, E)
