"""Modified Cholesky factorizations for (possibly indefinite) symmetric matrices.

Both return a factorization of a positive-definite ``A + E`` with ``E = 0`` whenever ``A``
admits a plain Cholesky factorization (checked first with ``cholesky_ex``).

* ``method="cheng-higham"`` (default): Cheng & Higham, "A modified Cholesky algorithm
  based on a symmetric indefinite factorization", SIMAX 19 (1998). ``P A P^T = L D L^T``
  by Bunch-Kaufman (LAPACK ``sytrf``, 1x1 and 2x2 pivot blocks), then every eigenvalue
  ``lam`` of every block of ``D`` is replaced by ``max(|lam|, delta)``,
  ``delta = sqrt(eps) ||A||_inf``. Cheng & Higham use ``max(lam, delta)``; the absolute
  value (N&W Sec. 3.4, eq. 3.41) keeps negative-curvature directions at their natural
  scale, which gives better Newton steps. ``L`` stays bounded, so ``A + E`` is well
  conditioned when ``A`` is.
* ``method="gmw"``: Gill, Murray & Wright, *Practical Optimization* (1981), Sec. 4.4.2.2,
  in the LDL^T form of N&W Alg. 3.4 (no pivoting): ``d_j = max(|c_jj|, (theta_j / beta)^2,
  delta)``, ``l_ij = c_ij / d_j`` with ``beta^2 = max(gamma, xi / sqrt(n^2 - 1), eps)``,
  ``delta = sqrt(eps) * max(gamma + xi, 1)``; ``A + diag(E) = L L^T``. The book's
  ``delta = eps * max(gamma + xi, 1)`` leaves ``L L^T`` singular to working precision
  whenever ``c_jj`` cancels exactly (e.g. ``[[0.19, -0.85], [-0.85, 2.45]]``, where
  ``beta^2 = a_22`` and ``c_22 = 0``), so the floor is ``sqrt(eps)`` relative, as for
  Cheng-Higham. The bound on ``E`` does not bound the conditioning of ``L`` (on the
  Rosenbrock Hessian at ``x = 0.5``, n = 100, it is poor), which is why it is not the
  default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["modified_cholesky", "ModifiedCholesky", "MODIFIED_CHOLESKY_METHODS"]

MODIFIED_CHOLESKY_METHODS = ("cheng-higham", "gmw")


@dataclass
class ModifiedCholesky:
    """A factorization of the positive-definite ``A + E``.

    ``L`` is set when ``A + E = L L^T`` (plain Cholesky or GMW; ``E`` is then the
    diagonal shift as a vector); for Cheng-Higham ``LD``/``pivots`` hold the modified
    compact ``sytrf`` factorization. ``modified`` tells whether ``E != 0``.
    """

    A: torch.Tensor
    modified: bool
    L: torch.Tensor | None = None
    E: torch.Tensor | None = None
    LD: torch.Tensor | None = None
    pivots: torch.Tensor | None = None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``(A + E)^{-1} b`` for a vector or a matrix of columns."""
        B = b.unsqueeze(-1) if b.dim() == 1 else b
        if self.L is not None:
            X = torch.cholesky_solve(B, self.L)
        else:
            X = torch.linalg.ldl_solve(self.LD, self.pivots, B, hermitian=True)
        return X.squeeze(-1) if b.dim() == 1 else X

    def matrix(self) -> torch.Tensor:
        """The positive-definite ``A + E`` (dense)."""
        if self.L is not None:
            return self.L @ self.L.T
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        inv = self.solve(eye)
        return torch.linalg.inv(0.5 * (inv + inv.T))


def _check(A: torch.Tensor) -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square 2-D tensor, got {getattr(A, 'shape', A)}")
    if not A.is_floating_point():
        raise TypeError(f"A must be floating point, got {A.dtype}")
    if not bool(torch.isfinite(A).all()):
        raise ValueError("A has non-finite entries")
    return 0.5 * (A + A.T)


def modified_cholesky(A: torch.Tensor, *, method: str = "cheng-higham",
                      delta: float | None = None) -> ModifiedCholesky:
    """Factor a positive-definite modification ``A + E`` of the symmetric ``A``.

    ``method``: ``"cheng-higham"`` (default) or ``"gmw"`` (see the module doc); ``delta``
    overrides the smallest allowed eigenvalue (CH) / pivot (GMW).
    """
    if method not in MODIFIED_CHOLESKY_METHODS:
        raise ValueError(f"method must be one of {MODIFIED_CHOLESKY_METHODS}, got {method!r}")
    A = _check(A)
    n = A.shape[0]
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return ModifiedCholesky(A, False, L=L, E=torch.zeros(n, dtype=A.dtype, device=A.device))
    if method == "gmw":
        return _gmw(A, delta)
    return _cheng_higham(A, delta)


def _cheng_higham(A: torch.Tensor, delta: float | None) -> ModifiedCholesky:
    eps = torch.finfo(A.dtype).eps
    if delta is None:
        delta = math.sqrt(eps) * max(float(A.abs().sum(1).max()), 1e-300)
    LD, piv, _ = torch.linalg.ldl_factor_ex(A, hermitian=True)
    LD = LD.clone()
    p = piv.tolist()
    n = A.shape[0]
    k = 0
    while k < n:
        if p[k] > 0:  # 1x1 block
            LD[k, k] = torch.clamp(LD[k, k].abs(), min=delta)
            k += 1
            continue
        blk = torch.stack((torch.stack((LD[k, k], LD[k + 1, k])),
                           torch.stack((LD[k + 1, k], LD[k + 1, k + 1]))))
        lam, V = torch.linalg.eigh(blk)
        new = (V * torch.clamp(lam.abs(), min=delta)) @ V.T
        LD[k, k], LD[k + 1, k], LD[k + 1, k + 1] = new[0, 0], new[1, 0], new[1, 1]
        k += 2
    return ModifiedCholesky(A, True, LD=LD, pivots=piv)


def _gmw(A: torch.Tensor, delta: float | None) -> ModifiedCholesky:
    n = A.shape[0]
    eps = torch.finfo(A.dtype).eps
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    diag = A.diagonal()
    gamma = diag.abs().max()
    off = (A - torch.diag(diag)).abs().max() if n > 1 else zero
    beta2 = torch.clamp(torch.maximum(gamma, off / max(1.0, math.sqrt(n * n - 1.0))), min=eps)
    delta_t = (math.sqrt(eps) * torch.clamp(gamma + off, min=1.0) if delta is None
               else torch.as_tensor(delta, dtype=A.dtype, device=A.device))
    Lu = torch.zeros_like(A)  # unit lower triangular
    d = torch.zeros(n, dtype=A.dtype, device=A.device)
    for j in range(n):
        c = A[j:, j] - Lu[j:, :j] @ (d[:j] * Lu[j, :j])
        theta = c[1:].abs().max() if j < n - 1 else zero
        dj = torch.maximum(torch.maximum(c[0].abs(), theta * theta / beta2), delta_t)
        d[j] = dj
        Lu[j, j] = 1.0
        Lu[j + 1:, j] = c[1:] / dj
    E = torch.clamp((Lu * Lu * d).sum(1) - diag, min=0.0)  # d_j - c_jj >= 0
    return ModifiedCholesky(A, True, L=Lu * d.sqrt(), E=E)
