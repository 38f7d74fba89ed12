"""Extreme eigenpairs of symmetric operators: power iteration and Lanczos.

Both are matrix-free: they touch the operator only through ``matvec`` (see
:mod:`curvlab.linalg.operator` for what counts as an operator) and report how many
products they used.

Stopping rule (both methods, stated honestly): an eigenpair estimate ``(theta, y)`` with
``||y|| = 1`` is accepted when its residual satisfies

    ||A y - theta y|| <= max(tol * |theta|, atol).

For a symmetric ``A`` there is then an eigenvalue ``lambda`` of ``A`` with
``|lambda - theta| <= ||A y - theta y||`` (Parlett, *The Symmetric Eigenvalue Problem*,
Thm. 4.5.1), so the relative eigenvalue error is at most ``tol`` -- usually far less, since
it is bounded by ``||r||^2 / gap`` (Kato-Temple) as well. That holds for the operator the
products compute: products in a dtype of precision ``eps`` carry errors of about ``eps
||A||`` (bfloat16: ``eps = 7.8e-3``), below which no residual estimate says anything, so a
residual is reported no smaller than ``eps ||A||`` (``||A||`` estimated by the largest
Ritz value or product norm seen), a pair counts as converged once it reaches that floor,
and a warning says so when the floor is above the requested ``tol`` (a bfloat16 Hessian's
top eigenvalue 0.2% off, reported "converged" at ``tol=1e-4`` with residual 0, before). As
with any Krylov method the
guarantee is "an eigenvalue", not "the largest one": a start vector (almost) orthogonal
to the top eigenvector can miss it. This is the criterion ARPACK/``scipy.sparse.linalg.
eigsh`` uses, so ``tol`` means the same thing here as there.

Repeated eigenvalues: the Krylov space of one start vector holds a single direction of each
eigenspace (the start's projection onto it), so Lanczos finds one copy of a repeated
eigenvalue and, asked for ``k >= 2``, reports the next distinct one in place of the others
(a multi-output least-squares Hessian ``I (x) X^T X`` repeats every eigenvalue once per
output: top 2 of ``[10, 10, 9, ...]`` came out ``[10, 9]``, "converged"). :func:`lanczos`
therefore checks, for ``k >= 2``, the operator deflated by the pairs it found, ``(I - Y
Y^T) A (I - Y Y^T)``, from a second random start: an extreme eigenvalue there that belongs
among the ``k`` is a missed copy; it joins them and the check repeats.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from curvlab.linalg.operator import MatvecOperator, as_operator

__all__ = ["EigenResult", "LanczosProcess", "lanczos", "power_iteration"]

log = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "magnitude")


@dataclass
class EigenResult:
    """Eigenpair estimates.

    Attributes:
        eigenvalues: ``(k,)`` float64 CPU tensor (``num_vectors`` entries if that was
            given to :func:`lanczos`), ordered as requested (largest first for
            ``"largest"``/``"magnitude"``, smallest first for ``"smallest"``).
        eigenvectors: ``(n, k)`` unit-norm Ritz vectors in the operator's dtype/device.
        residuals: ``(k,)`` residual norms ``||A y - theta y||`` (for Lanczos the
            standard bound ``|beta_m s_mi|``, exact up to rounding with full
            reorthogonalization).
        num_matvecs: products with the operator this call used.
        num_iters: iterations (Lanczos steps / power steps).
        converged: every requested pair met the stopping rule.
        history: after each iteration, the current estimates of the requested
            eigenvalues (a list of length ``num_iters`` of float lists); iteration ``i``
            had used ``i + 1`` matvecs.
        ritz_values: all Ritz values of the final Krylov space (Lanczos only), ascending.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    num_iters: int
    converged: bool
    which: str = "largest"
    tol: float = 0.0
    history: list[list[float]] = field(default_factory=list, repr=False)
    ritz_values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def relative_residuals(self) -> torch.Tensor:
        """``||r_i|| / |theta_i|``: an upper bound on each relative eigenvalue error."""
        return self.residuals / self.eigenvalues.abs().clamp_min(torch.finfo(torch.float64).tiny)


def _random_vector(A: MatvecOperator, generator: torch.Generator | None) -> torch.Tensor:
    v = torch.randn(A.n, generator=generator, dtype=torch.float64)
    return v.to(dtype=A.dtype, device=A.device)


def _start_vector(A: MatvecOperator, v0: Any, generator: torch.Generator | None) -> torch.Tensor:
    if v0 is None:
        return _random_vector(A, generator)
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a tensor of shape ({A.n},) or ({A.n}, j), got "
                        f"{type(v0).__name__}")
    if v0.dim() == 2 and v0.shape[0] == A.n:
        cols = v0 / v0.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v0.dtype).tiny)
        v0 = cols.sum(dim=1)
    if v0.dim() != 1 or v0.shape[0] != A.n:
        raise ValueError(f"v0 has shape {tuple(v0.shape)}, expected ({A.n},) or ({A.n}, j)")
    v0 = v0.detach().to(dtype=A.dtype, device=A.device)
    if not torch.isfinite(v0).all() or v0.norm() == 0:
        raise ValueError("v0 must be finite and nonzero")
    return v0


class LanczosProcess:
    """The symmetric Lanczos recurrence with full reorthogonalization.

    After ``m`` calls of :meth:`step` (one matvec each), ``Q[:m]`` (rows) is an
    orthonormal basis of the Krylov space ``K_m(A, v0)`` and ``T_m = tridiag(beta,
    alpha, beta)`` is ``Q A Q^T``: ``A Q_m^T = Q_m^T T_m + beta_m q_{m+1} e_m^T``
    (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, Alg. 10.1.1). Each new
    vector is orthogonalized against the whole basis twice (classical Gram-Schmidt
    with reorthogonalization, "CGS2"), which keeps the basis orthogonal to working
    precision and removes the spurious copies of converged Ritz values that plain
    Lanczos produces. On breakdown (``beta = 0``: an invariant subspace was found) the
    process continues from a random vector orthogonal to the basis.
    """

    def __init__(self, A: MatvecOperator, v0: torch.Tensor,
                 generator: torch.Generator | None = None) -> None:
        self.A = A
        self.generator = generator
        self._Q = torch.empty((min(A.n, 32), A.n), dtype=A.dtype, device=A.device)
        self._Q[0] = v0 / v0.norm()
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self._scale = 0.0

    @property
    def m(self) -> int:
        """Lanczos steps taken so far (the dimension of the Krylov space)."""
        return len(self.alpha)

    @property
    def exhausted(self) -> bool:
        """The Krylov space is the whole space (``m >= n``): no further step is possible."""
        return self.m >= self.A.n

    @property
    def Q(self) -> torch.Tensor:
        """The ``(m, n)`` orthonormal basis (rows)."""
        return self._Q[: self.m]

    def _orthogonalize(self, w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        Q = self._Q[:rows]
        h = Q @ w
        w = w - h @ Q
        h2 = Q @ w
        return w - h2 @ Q, h + h2

    def step(self) -> None:
        """Extend the Krylov space by one vector (one matvec)."""
        if self.exhausted:
            raise RuntimeError("the Lanczos basis already spans the whole space")
        j = self.m
        w = self.A.matvec(self._Q[j])
        w, h = self._orthogonalize(w, j + 1)
        self.alpha.append(float(h[j]))
        beta = float(w.norm())
        self._scale = max(self._scale, abs(self.alpha[-1]), beta)
        if j + 1 >= self.A.n:
            self.beta.append(0.0)
            return
        if j + 1 >= self._Q.shape[0]:
            grown = torch.empty((min(self.A.n, 2 * self._Q.shape[0]), self.A.n),
                                dtype=self.A.dtype, device=self.A.device)
            grown[: j + 1] = self._Q[: j + 1]
            self._Q = grown
        eps = torch.finfo(self.A.dtype).eps
        if beta <= 10 * eps * max(self._scale, 1e-300) * np.sqrt(j + 1):
            self.beta.append(0.0)
            for _ in range(3):  # a random restart vector, made orthogonal to the basis
                w, _ = self._orthogonalize(_random_vector(self.A, self.generator), j + 1)
                if w.norm() > 0.5 * eps:
                    break
            self._Q[j + 1] = w / w.norm()
            return
        self.beta.append(beta)
        self._Q[j + 1] = w / beta

    def tridiagonal(self) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha, beta)``: diagonal (m,) and off-diagonal (m-1,) of ``T_m`` (float64)."""
        return np.asarray(self.alpha), np.asarray(self.beta[: self.m - 1])

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors ``S`` of ``T_m`` and residual norms
        ``|beta_m S[m-1, i]|``."""
        a, b = self.tridiagonal()
        if self.m == 1:
            theta, S = a.copy(), np.ones((1, 1))
        else:
            theta, S = eigh_tridiagonal(a, b)
        return theta, S, np.abs(self.beta[-1] * S[-1, :])


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _check_common(k: int, tol: float, atol: float, which: str | None = None,
                  relative_to: str = "eigenvalue") -> None:
    if relative_to not in ("eigenvalue", "norm"):
        raise ValueError(f"relative_to must be 'eigenvalue' or 'norm', got {relative_to!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not tol >= 0 or not atol >= 0:
        raise ValueError(f"tol and atol must be >= 0, got tol={tol!r}, atol={atol!r}")
    if which is not None and which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def lanczos(op: Any, k: int = 1, *, which: str = "largest", tol: float = 1e-6,
            atol: float = 0.0, relative_to: str = "eigenvalue", max_iter: int | None = None,
            v0: torch.Tensor | None = None, num_vectors: int | None = None,
            min_iter: int = 1, generator: torch.Generator | None = None,
            find_repeated: bool = True) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by Lanczos with full
    reorthogonalization (see :class:`LanczosProcess`).

    Args:
        op: the operator (curvature operator, square tensor, :class:`MatvecOperator`).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraic; top-k), ``"smallest"`` (algebraic; bottom-k) or
            ``"magnitude"``.
        tol, atol: stop once every requested Ritz pair has residual
            ``<= max(tol * |theta|, atol)`` (see the module docstring); use ``atol`` (e.g.
            ``tol * ||A||``) for eigenvalues near zero, where a relative test is hopeless.
        max_iter: at most this many Lanczos steps = matvecs (default
            ``min(n, 100 + 20 k)``); the basis needs ``max_iter * n`` memory.
        v0: start vector ``(n,)``; a block ``(n, j)`` (e.g. previous eigenvectors, for a
            warm start) is combined into one start vector.
        num_vectors: return this many leading Ritz pairs (``>= k``, default ``k``); only
            the first ``k`` are tested for convergence (the rest come with their
            residuals). The extra Ritz vectors are useful to warm-start the next call:
            tracking two vectors survives the top two eigenvalues swapping places.
        min_iter: take at least this many steps before testing convergence. A warm
            start that is an accurate eigenvector of a *different* eigenvalue passes the
            residual test after one step; two steps from ``y1 + a y2`` (previous top two
            Ritz vectors) already span both directions.
        generator: for the random start vector.
        find_repeated: for ``k >= 2``, look for copies of repeated eigenvalues the Krylov
            space missed (module docstring; a Lanczos run on the deflated operator, usually
            a few dozen more matvecs). False skips it (where a missed copy only costs
            accuracy elsewhere, e.g. the deflation of a stochastic estimate).

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_iter`` ran out first.
    """
    _check_common(k, tol, atol, which, relative_to)
    A = as_operator(op)
    if k > A.n:
        raise ValueError(f"k={k} exceeds the operator size n={A.n}")
    max_iter = min(A.n, 100 + 20 * k) if max_iter is None else int(max_iter)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    max_iter = min(max_iter, A.n)
    num_vectors = k if num_vectors is None else int(num_vectors)
    if not k <= num_vectors <= A.n:
        raise ValueError(f"num_vectors must be in [k, n] = [{k}, {A.n}], got {num_vectors}")
    proc = LanczosProcess(A, _start_vector(A, v0, generator), generator)
    history: list[list[float]] = []
    converged = False
    eps = torch.finfo(A.dtype).eps
    while True:
        proc.step()
        theta, S, res = proc.ritz()
        floor = eps * max(proc._scale, float(np.abs(theta).max()))  # the products'
        # rounding, eps ||A|| (module docstring)
        res = np.maximum(res, floor)
        idx = _order(theta, which)[:k]
        history.append(theta[idx].tolist())
        scale = np.abs(theta[idx]) if relative_to == "eigenvalue" else np.abs(theta).max()
        bound = np.maximum(np.maximum(tol * scale, atol), floor)
        if len(idx) == k:
            converged = bool(np.all(res[idx] <= bound)) or proc.exhausted
        converged = converged and proc.m >= min(min_iter, A.n)
        if converged or proc.m >= max_iter:
            break
    if not converged:
        log.info("lanczos: %d of %d pairs converged after %d matvecs",
                 int(np.sum(res[idx] <= bound)), k,
                 A.num_matvecs)
    _warn_if_floored(A.dtype, float(floor), np.maximum(tol * scale, atol), tol)
    idx = _order(theta, which)[:num_vectors]
    Sk = torch.as_tensor(S[:, idx], dtype=A.dtype, device=A.device)
    vecs = proc.Q.T @ Sk
    values, vecs, residuals = theta[idx], vecs / vecs.norm(dim=0, keepdim=True), res[idx]
    if find_repeated and converged and k >= 2 and not proc.exhausted:
        # the residual bound of the first run: relative to each eigenvalue or to ||A||
        atol_run = atol if relative_to == "eigenvalue" else max(atol, tol * np.abs(theta).max())
        tol_run = tol if relative_to == "eigenvalue" else 0.0
        head = _add_missed_copies(A, values[:k], vecs[:, :k], residuals[:k], which, tol_run,
                                  atol_run, max_iter, generator)
        values = np.concatenate([head[0], values[k:]])
        vecs = torch.cat([head[1], vecs[:, k:]], dim=1)
        residuals = np.concatenate([head[2], residuals[k:]])
        keep = _order(values, which)[:num_vectors]
        values, vecs, residuals = values[keep], vecs[:, keep], residuals[keep]
    return EigenResult(
        eigenvalues=torch.as_tensor(values, dtype=torch.float64),
        eigenvectors=vecs,
        residuals=torch.as_tensor(residuals, dtype=torch.float64),
        num_matvecs=A.num_matvecs, num_iters=proc.m, converged=converged, which=which,
        tol=tol, history=history, ritz_values=torch.as_tensor(theta, dtype=torch.float64))


def _warn_if_floored(dtype: torch.dtype, floor: float, requested: Any, tol: float) -> None:
    """Warn when the products' rounding floor exceeds the requested residual bound."""
    if floor > 0 and np.any(np.asarray(requested) < floor):
        warnings.warn(f"the operator computes in {dtype} (eps {torch.finfo(dtype).eps:.1e}): "
                      f"its eigenvalues are accurate to about eps ||A|| = {floor:.2e}, above "
                      f"the requested tol={tol:g} (relative); the residuals report that "
                      "floor. Compute in a wider dtype for more digits", stacklevel=3)


def _key(theta: np.ndarray | float, which: str) -> np.ndarray | float:
    """Larger means earlier in the order of ``which``."""
    return theta if which == "largest" else -theta if which == "smallest" else np.abs(theta)


def _add_missed_copies(A: MatvecOperator, values: np.ndarray, vecs: torch.Tensor,
                       residuals: np.ndarray, which: str, tol: float, atol: float,
                       max_iter: int, generator: torch.Generator | None
                       ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """The ``k`` converged pairs of :func:`lanczos` (``values`` in ``which`` order,
    ``vecs`` their unit columns) and the copies of repeated eigenvalues its Krylov space
    missed (module docstring), in ``which`` order (more than ``k`` pairs when some were
    found). Lanczos runs on ``P A P``, ``P = I - Y Y^T`` over the pairs found so far, from a
    random start in ``range(P)``; its extreme Ritz value, once converged, is the extreme
    eigenvalue of ``A`` outside the span of ``Y`` (to the same tolerance and under the same
    random-start assumption as the first run). If it comes before the ``k``-th value by more
    than that value's error bound, it is a missed eigenvalue: it joins the pairs (its
    residual ``||A y - theta y||`` from one product) and the check runs again."""
    k = len(values)
    while True:
        kth = values[_order(values, which)[k - 1]]
        margin = max(tol * abs(kth), atol, float(residuals.max()))
        Y = torch.linalg.qr(vecs.double())[0].to(vecs.dtype)  # (no 16-bit QR kernels)
        if A.n - Y.shape[1] < 1:
            break

        def deflated(v: torch.Tensor, Y: torch.Tensor = Y) -> torch.Tensor:
            w = A.matvec(v - Y @ (Y.T @ v))
            return w - Y @ (Y.T @ w)

        D = MatvecOperator(deflated, A.n, dtype=A.dtype, device=A.device,
                           check_symmetry=False)
        start = _random_vector(A, generator)
        proc = LanczosProcess(D, start - Y @ (Y.T @ start), generator)
        found = None
        while proc.m < min(max_iter, A.n - Y.shape[1]):
            proc.step()
            theta, S, res = proc.ritz()
            top = _order(theta, which)[0]
            if res[top] <= max(tol * abs(theta[top]), atol):
                if _key(theta[top], which) > _key(kth, which) + margin:
                    found = (float(theta[top]), S[:, top])
                break
        if found is None:
            break
        y = proc.Q.T @ torch.as_tensor(found[1], dtype=A.dtype, device=A.device)
        y = y - Y @ (Y.T @ y)
        y = y / y.norm()
        values = np.append(values, found[0])
        residuals = np.append(residuals, float((A.matvec(y) - found[0] * y).norm()))
        vecs = torch.cat([vecs, y[:, None]], dim=1)
        log.info("lanczos: a missed copy of a repeated eigenvalue, %.6g", found[0])
    order = _order(values, which)
    return values[order], vecs[:, order], residuals[order]


def power_iteration(op: Any, *, tol: float = 1e-6, atol: float = 0.0, max_iter: int = 1000,
                    v0: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> EigenResult:
    """The dominant (largest-magnitude) eigenpair by power iteration.

    ``v <- A v / ||A v||``; the estimate is the Rayleigh quotient ``theta = v^T A v``.
    Stops when ``||A v - theta v|| <= max(tol |theta|, atol)`` (module docstring); the
    residual comes free with each product. The error decays like
    ``|lambda_2 / lambda_1|^i`` (eigenvalue: squared), so it is slow when the top of the
    spectrum is clustered -- prefer :func:`lanczos`. One matvec per iteration.
    """
    _check_common(1, tol, atol)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    A = as_operator(op)
    v = _start_vector(A, v0, generator)
    v = v / v.norm()
    history: list[list[float]] = []
    theta, res, converged = 0.0, float("inf"), False
    eps, norm_seen = torch.finfo(A.dtype).eps, 0.0
    for _ in range(max_iter):
        w = A.matvec(v)
        theta = float(v @ w)
        norm_seen = max(norm_seen, float(w.norm()))
        floor = eps * norm_seen  # the products' rounding (module docstring)
        res = max(float((w - theta * v).norm()), floor)
        history.append([theta])
        if res <= max(tol * abs(theta), atol, floor):
            converged = True
            break
        v = w / w.norm()  # w != 0 here: w = 0 gives res = 0 and stops above
    _warn_if_floored(A.dtype, floor, max(tol * abs(theta), atol), tol)
    return EigenResult(
        eigenvalues=torch.tensor([theta], dtype=torch.float64), eigenvectors=v.unsqueeze(1),
        residuals=torch.tensor([res], dtype=torch.float64), num_matvecs=A.num_matvecs,
        num_iters=len(history), converged=converged, which="magnitude", tol=tol,
        history=history)
