"""Matrix functions for preconditioners: inverse p-th roots, eigenbases, orthogonalization.

All functions accept a single matrix ``(n, n)`` or a batch ``(..., n, n)`` and work on any
device. Symmetric functions compute in ``compute_dtype`` (float64 by default) and return the
input's dtype. Inside the symmetric functions float32 matmul precision is forced to
``"highest"`` so TF32 cannot corrupt eigenbases; Newton–Schulz is deliberately left alone
(it is an approximate iteration that is routinely run in bfloat16).

A computation that fails (``torch.linalg.LinAlgError``) or produces non-finite output raises
:class:`MatrixFunctionError`; callers that want a keep-the-previous-value policy catch it
(see :mod:`curvlab.optim.preconditioners`).

References:
    Gupta, Koren, Singer (2018), Shampoo, Alg. 1 (inverse 4th roots of Kronecker factors).
    Guo, Higham (2006), "A Schur-Newton method for the matrix p-th root and its inverse",
    SIAM J. Matrix Anal. Appl. 28(3), eq. (2.6): coupled Newton iteration.
    Vyas et al. (2024), SOAP, Alg. 4 (one power-iteration step + QR to refresh an eigenbasis).
    Jordan et al. (2024), Muon: quintic Newton–Schulz with coefficients (3.4445, -4.7750, 2.0315).
    Amsel, Persson, Musco, Gower (2025), "The Polar Express: Optimal Matrix Sign Methods and
    Their Application to the Muon Algorithm", arXiv:2505.16932, Alg. 1 (per-iteration
    coefficients).
    Zhang, Amsel, Chen, Dao (2026), "Gram Newton-Schulz" (Dao AI Lab; iterating on the Gram
    matrix, with restarts).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "MatrixFunctionError",
    "high_precision_matmul",
    "symmetric_eigh",
    "matrix_inverse_root",
    "coupled_newton_inverse_root",
    "eigenbasis_qr_refresh",
    "newton_schulz",
    "ns_schedule",
    "coefficients_problem",
    "gram_restart_indices",
    "NS_QUINTIC_COEFFICIENTS",
    "NS_POLAR_EXPRESS_COEFFICIENTS",
    "NS_COEFFICIENT_SETS",
]

NS_QUINTIC_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025): the authors' optimal_composition(l=1e-3, num_iters=8,
# safety_factor_eps=1e-2, cushion=0.02), as printed in the paper's Alg. 1 listing and in
# their polar_express/basic.py; every polynomial but the last is then evaluated at x / 1.01
# (a / 1.01, b / 1.01^3, c / 1.01^5), and the input is normalized by 1.01 ||G||_F. Later
# iterations repeat the last polynomial (numerically the limit (15/8, -10/8, 3/8)).
# NVIDIA's Emerging-Optimizers ships the same numbers. modded-nanogpt, nanochat and Dion
# run a neighbouring set optimized for exactly 5 iterations with safety 1.02 (first
# polynomial 8.1566 instead of 8.2052; normalization 1.02 ||G||_F).
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
NS_POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + (_POLAR_EXPRESS_RAW[-1],)

#: name -> (per-iteration (a, b, c) tuples, normalization factor s): ``X_0 = G / (s ||G||_F)``
NS_COEFFICIENT_SETS: dict[str, tuple[tuple[tuple[float, float, float], ...], float]] = {
    "quintic": ((NS_QUINTIC_COEFFICIENTS,), 1.0),
    "polar_express": (NS_POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY),
}


class MatrixFunctionError(RuntimeError):
    """A matrix function failed to converge or produced non-finite values."""


@functools.cache
def _precision_backends() -> tuple:
    """Backends with the per-backend ``fp32_precision`` switch (torch >= 2.9)."""
    mods = [getattr(torch.backends.cuda, "matmul", None),
            getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    return tuple(m for m in mods if m is not None and hasattr(m, "fp32_precision"))


_HIGH_PRECISION_DEPTH = [0]  # nesting depth: inner contexts cost nothing


@contextlib.contextmanager
def high_precision_matmul() -> Iterator[None]:
    """Force IEEE float32 matmuls (no TF32 / bf16 reduced precision) inside the block.

    Re-entrant: a nested context is free, so a caller can wrap a loop of matrix functions
    once instead of paying the switch per call. Inside a region ``torch.compile`` traces it
    does nothing (dynamo cannot trace the switch): the caller of the compiled function makes
    the switch around the call (``high_precision_step`` of the blocked preconditioners), and
    the compiled matmuls (aten kernels) read it when they run.
    """
    if _HIGH_PRECISION_DEPTH[0] or torch.compiler.is_compiling():
        yield
        return
    backends = _precision_backends()
    _HIGH_PRECISION_DEPTH[0] += 1
    try:
        if backends:
            prev = [m.fp32_precision for m in backends]
            for m in backends:
                m.fp32_precision = "ieee"
            try:
                yield
            finally:
                for m, v in zip(backends, prev, strict=True):
                    m.fp32_precision = v
            return
        prev_legacy = torch.get_float32_matmul_precision()  # pragma: no cover - torch < 2.9
        torch.set_float32_matmul_precision("highest")  # pragma: no cover
        try:  # pragma: no cover
            yield
        finally:  # pragma: no cover
            torch.set_float32_matmul_precision(prev_legacy)
    finally:
        _HIGH_PRECISION_DEPTH[0] -= 1


def _check_square(A: Tensor, name: str = "A") -> None:
    if not isinstance(A, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square (..., n, n); got shape {tuple(A.shape)}")


def _check_finite(X: Tensor, what: str) -> None:
    # one reduction and one host read: NaN/inf propagate into the sum (a finite sum that
    # overflows is rejected too, which errs on the safe side)
    if not math.isfinite(float(X.sum())):
        raise MatrixFunctionError(f"{what} produced non-finite values")


def symmetric_eigh(A: Tensor, compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``A = Q diag(w) Q^T`` of the symmetrized input in ``compute_dtype``.

    Returns ``(w, Q)`` in ``compute_dtype`` with ascending eigenvalues.
    Raises :class:`MatrixFunctionError` on failure or non-finite input/output.
    """
    _check_square(A)
    with high_precision_matmul():
        Ac = A.to(compute_dtype)
        _check_finite(Ac, "eigh input")
        Ac = 0.5 * (Ac + Ac.mT)
        try:
            w, Q = torch.linalg.eigh(Ac)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise MatrixFunctionError(f"eigh failed: {err}") from err
    _check_finite(w.sum() + Q.sum(), "eigh")
    return w, Q


def matrix_inverse_root(
    A: Tensor,
    p: float,
    *,
    damping: float = 0.0,
    pseudo_inverse: bool = False,
    rank_rtol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Inverse p-th root ``(A + damping I)^{-1/p}`` of a symmetric PSD matrix via ``eigh``.

    With ``pseudo_inverse=True`` eigenvalues ``<= rank_rtol * max(w)`` (default
    ``n * eps(compute_dtype)``) are treated as zero and get a zero inverse root (the
    Moore–Penrose pseudo-inverse root), instead of being inflated by ``damping``; otherwise
    eigenvalues are clamped at ``damping`` (plus a tiny floor) so roundoff-negative
    eigenvalues cannot produce NaN.
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    w, Q = symmetric_eigh(A, compute_dtype)
    w = w + damping
    tiny = torch.finfo(compute_dtype).tiny
    if pseudo_inverse:
        rtol = rank_rtol if rank_rtol is not None else A.shape[-1] * torch.finfo(compute_dtype).eps
        wmax = w.abs().amax(-1, keepdim=True)
        keep = w > rtol * wmax
        inv = torch.where(keep, w.clamp_min(tiny).pow(-1.0 / p), torch.zeros_like(w))
    else:
        inv = w.clamp_min(max(damping, tiny)).pow(-1.0 / p)
    with high_precision_matmul():
        R = (Q * inv.unsqueeze(-2)) @ Q.mT
    _check_finite(R, "inverse root")
    return R.to(A.dtype)


def coupled_newton_inverse_root(
    A: Tensor,
    p: int,
    *,
    damping: float = 0.0,
    max_iters: int = 100,
    tol: float = 1e-10,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Inverse p-th root of an SPD matrix by the coupled Newton iteration (Guo & Higham 2006).

    With ``c = (2 ||A||_F / (p+1))^{1/p}``, ``X_0 = I / c``, ``M_0 = A / c^p`` iterate
    ``T = ((p+1) I - M) / p``, ``X <- X T``, ``M <- T^p M`` until ``||M - I||_max < tol``;
    then ``X -> A^{-1/p}``. Eigendecomposition-free (only matmuls). Raises
    :class:`MatrixFunctionError` when it does not converge in ``max_iters``.
    """
    _check_square(A)
    if int(p) != p or p < 1:
        raise ValueError(f"p must be a positive integer for the Newton iteration, got {p}")
    p = int(p)
    with high_precision_matmul():
        Ac = A.to(compute_dtype)
        _check_finite(Ac, "Newton input")
        n = Ac.shape[-1]
        eye = torch.eye(n, dtype=compute_dtype, device=A.device)
        Ac = 0.5 * (Ac + Ac.mT) + damping * eye
        norm = torch.linalg.matrix_norm(Ac, keepdim=True).clamp_min(torch.finfo(compute_dtype).tiny)
        c = (2.0 * norm / (p + 1)).pow(1.0 / p)
        X = eye / c
        M = Ac / c.pow(p)
        for _ in range(max_iters):
            T = ((p + 1) * eye - M) / p
            X = X @ T
            M = torch.linalg.matrix_power(T, p) @ M
            err = (M - eye).abs().amax()
            if not bool(torch.isfinite(err)):
                raise MatrixFunctionError("coupled Newton iteration diverged")
            if err < tol:
                break
        else:
            raise MatrixFunctionError(
                f"coupled Newton iteration did not reach tol={tol} in {max_iters} iterations"
            )
    _check_finite(X, "coupled Newton iteration")
    return X.to(A.dtype)


def eigenbasis_qr_refresh(
    A: Tensor, Q: Tensor, compute_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    r"""One power-iteration step with QR to refresh an approximate eigenbasis (SOAP, Alg. 4).

    ``A`` is symmetric (a Kronecker factor; ``A = A^T`` is assumed, not checked). Estimates
    eigenvalues ``d = diag(Q^T A Q)``, sorts columns of ``Q`` by decreasing ``d``,
    and returns ``(Q_new, order)`` with ``Q_new = qr(A Q[:, order]).Q`` (column signs as LAPACK
    returns them; SOAP's update does not depend on them). ``order`` lets the caller permute
    per-coordinate statistics (e.g. Adam's second moment) to the new basis. The Q factor is
    formed from the Householder reflectors directly (``geqrf`` + ``householder_product``,
    the same LAPACK calls as ``torch.linalg.qr`` without forming R).
    """
    _check_square(A)
    _check_square(Q, "Q")
    if _HIGH_PRECISION_DEPTH[0]:  # already inside (e.g. a refresh loop): skip the switch
        return _qr_refresh(A, Q, compute_dtype)
    with high_precision_matmul():
        return _qr_refresh(A, Q, compute_dtype)


def _qr_refresh(A: Tensor, Q: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    d = A.shape[-1]
    # (few torch calls on purpose: SOAP runs this per mode and block shape at every refresh)
    Qt = (Q if Q.dtype == compute_dtype else Q.to(compute_dtype)).mT
    # rows of (A Q)^T = Q^T A are the columns of A Q: permuting them is one row gather
    # (index_select is a plain copy; gather along the last dim is many times slower)
    AQt = Qt @ (A if A.dtype == compute_dtype else A.to(compute_dtype))  # non-finite A -> Qn
    order = torch.argsort(torch.linalg.vecdot(AQt, Qt), dim=-1, descending=True)  # diag(Q^T A Q)
    if AQt.ndim == 2 or (AQt.ndim == 3 and AQt.shape[0] == 1):
        P = AQt.index_select(-2, order.view(-1)).mT
    else:  # one row gather over the whole batch: row offsets of the matrices
        rows = order.reshape(-1, d)
        rows = rows + d * torch.arange(rows.shape[0], device=rows.device).unsqueeze(-1)
        P = AQt.reshape(-1, d).index_select(0, rows.view(-1)).view(AQt.shape).mT
    try:  # Q from the reflectors (no R); for small matrices linalg.qr has less overhead
        Qn = (torch.linalg.qr(P)[0] if d < 32
              else torch.linalg.householder_product(*torch.geqrf(P)))
    except RuntimeError as err:
        raise MatrixFunctionError(f"QR failed: {err}") from err
    _check_finite(Qn, "QR refresh")
    return (Qn if Qn.dtype == Q.dtype else Qn.to(Q.dtype)), order


def _addmm(C: Tensor, A: Tensor, B: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta C + alpha A @ B`` as one fused kernel for 2-D and 3-D inputs."""
    if C.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    if C.ndim == 3:
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    return beta * C + alpha * (A @ B)


Coefficients = tuple[float, float, float]


def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _triple(c: object) -> bool:
    return isinstance(c, (tuple, list)) and len(c) == 3 and all(_real(x) for x in c)


def ns_schedule(coefficients: str | Sequence, steps: int) -> tuple[list[Coefficients], float]:
    """The per-iteration ``(a, b, c)`` of ``steps`` Newton–Schulz iterations and the
    normalization factor ``s`` (``X_0 = G / (s ||G||_F)``).

    ``coefficients`` is a name of :data:`NS_COEFFICIENT_SETS` (a named set shorter than
    ``steps`` repeats its last tuple, as its authors do), one ``(a, b, c)`` used at every
    iteration (``s = 1``), or a sequence of at least ``steps`` tuples, of which the first
    ``steps`` are used (``s = 1``). Anything else is a ``ValueError`` naming the argument.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    why = coefficients_problem(coefficients)
    if why is not None:
        raise ValueError(f"ns_coefficients={coefficients!r} {why}")
    if isinstance(coefficients, str):
        tuples, scale = NS_COEFFICIENT_SETS[coefficients]
        tuples = list(tuples[:steps]) + [tuples[-1]] * max(0, steps - len(tuples))
        return tuples, scale
    if _triple(coefficients):
        return [tuple(float(x) for x in coefficients)] * steps, 1.0  # type: ignore[union-attr]
    if len(coefficients) < steps:
        raise ValueError(f"ns_coefficients has {len(coefficients)} per-iteration (a, b, c) "
                         f"tuples but {steps} steps are asked for; give at least {steps} "
                         "tuples or one tuple to reuse at every iteration")
    return [tuple(float(x) for x in c) for c in coefficients[:steps]], 1.0


def coefficients_problem(coefficients: object) -> str | None:
    """None if ``coefficients`` is a valid ``ns_coefficients`` (whatever the step count),
    else what it must be."""
    if isinstance(coefficients, str):
        return None if coefficients in NS_COEFFICIENT_SETS else (
            f"is not a named set; choose from {sorted(NS_COEFFICIENT_SETS)} or pass "
            "(a, b, c) tuples")
    if _triple(coefficients) or (isinstance(coefficients, (tuple, list)) and coefficients
                                 and all(_triple(c) for c in coefficients)):
        return None
    return (f"must be a name ({sorted(NS_COEFFICIENT_SETS)}), one (a, b, c) tuple of finite "
            "numbers, or a non-empty sequence of such tuples (one per iteration)")


def _is_index(i: object) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 1


def gram_restart_indices(gram_restarts: int | Sequence[int], steps: int) -> tuple[int, ...]:
    """The (0-based) iterations before which Gram Newton–Schulz restarts: ``k`` (an int)
    means every ``k`` iterations (``k, 2k, ... < steps``); a tuple lists them (its authors'
    form: ``(2,)`` restarts once, before the third iteration)."""
    if _is_index(gram_restarts):
        return tuple(range(gram_restarts, steps, gram_restarts))  # type: ignore[arg-type]
    if isinstance(gram_restarts, (tuple, list)) and all(_is_index(i) for i in gram_restarts):
        return tuple(sorted(set(gram_restarts)))
    raise ValueError(f"gram_restarts={gram_restarts!r} must be a period k >= 1 (restart every "
                     "k iterations) or a tuple of 0-based iteration indices >= 1")


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "quintic",
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    gram: bool = False,
    gram_restarts: int | Sequence[int] = 2,
    out_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Tensor:
    r"""Approximate orthogonalization ``U V^T`` of ``G = U S V^T`` by Newton–Schulz.

    ``X_0 = G / max(s ||G||_F, eps)``, then for ``t = 1..steps``: ``A = X X^T``,
    ``X <- a_t X + (b_t A + c_t A^2) X`` (a tall ``X``: the transpose, ``A = X^T X``), i.e. every
    singular value goes through the odd quintic ``p_t(x) = a_t x + b_t x^3 + c_t x^5``.
    ``coefficients`` (see :func:`ns_schedule`):

    * ``"quintic"`` / ``(3.4445, -4.7750, 2.0315)`` (Jordan et al. 2024, Muon; ``s = 1``)
      trades exact convergence for speed: singular values land roughly in [0.7, 1.2].
    * ``"polar_express"`` (Amsel, Persson, Musco, Gower 2025, Alg. 1 and the authors' code):
      a different minimax-optimal quintic per iteration for singular values in
      ``[1e-3, 1]``, each but the last evaluated at ``x / 1.01`` and ``s = 1.01`` (their
      safety factor against rounding); converges to ``U V^T``.
    * any ``(a, b, c)``: the cubic ``(1.5, -0.5, 0)`` converges to ``U V^T``.

    ``gram=True``: Gram Newton–Schulz (Zhang, Amsel, Chen, Dao 2026), the same polynomials
    applied through the small ``n x n`` Gram matrix of the wide ``n x m`` iterate: with
    ``R = X X^T``, ``Z_t = b_t R + c_t R^2``, ``X_t = Q_t X`` where ``Q <- Q (a_t I + Z_t)`` and
    ``R <- (a_t I + Z_t) R (a_t I + Z_t)`` (all are polynomials in ``R_0``, so they commute),
    so an iteration costs ``O(n^3)`` instead of ``O(n^2 m)``. At each restart
    (:func:`gram_restart_indices`; default every 2 iterations) the iterate is formed,
    ``X <- Q X``, and ``R = X X^T`` recomputed: the Gram recursion's rounding errors are not
    self-corrected as the plain iteration's are, and without restarts it diverges in
    bfloat16. The authors restart once, before the third of 5 iterations (``(2,)``), in
    float16; in bfloat16 (3 fewer mantissa bits) that leaves errors up to 0.7 above the
    plain iteration's on ill-conditioned inputs, restarting every 2 iterations keeps them
    within 0.1 of it (spectral error vs ``U V^T`` over the random suite of
    ``benchmarks/bench_newton_schulz.py``). Equal to the plain iteration in exact
    arithmetic. Multiply-adds of 5 iterations, restarts every 2: ``6 n^2 m + 11 n^3``
    (authors' ``(2,)``: ``4 n^2 m + 14 n^3``), both fewer than the plain iteration's
    ``10 n^2 m + 5 n^3`` when ``m > 1.5 n``.

    Works on batches ``(..., m, n)``; computes in ``dtype`` (default: ``G.dtype``) and
    returns ``out_dtype`` (default: ``G.dtype``; ``out_dtype=dtype`` skips the conversion
    back when the caller can use the iteration's result as it is). ``overwrite=True``: ``G``
    is a scratch buffer, normalized in place when it is already the iterate (saves a pass
    over it); its values afterwards are unspecified.
    """
    if G.ndim < 2:
        raise ValueError(f"G must have at least 2 dimensions, got shape {tuple(G.shape)}")
    schedule, scale = ns_schedule(coefficients, steps)
    restarts = gram_restart_indices(gram_restarts, steps)
    # the iteration runs in the orientation G is stored in: a tall X (m > n) iterates
    # mirrored, A = X^T X and X <- a X + X (b A + c A^2) (A is symmetric: the transpose of
    # the wide iteration), so no transposed copy is made (a transposed copy of a 512 x 128
    # bfloat16 matrix costs ~4x a contiguous one on a CPU); a tall view of a wide
    # contiguous matrix iterates on that matrix
    flip = G.shape[-2] > G.shape[-1] and G.mT.is_contiguous() and not G.is_contiguous()
    Gs = G.mT if flip else G
    tall = Gs.shape[-2] > Gs.shape[-1]
    # a conversion makes the iterate contiguous as it copies, and it is then normalized in
    # place (without autograd)
    X = Gs.to(dtype, memory_format=torch.contiguous_format) if dtype is not None else Gs
    copied = (X is not Gs or overwrite) and not (torch.is_grad_enabled() and X.requires_grad)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if scale != 1.0:
        norm = norm * scale
    X = X.div_(norm.clamp_min(eps)) if copied else X / norm.clamp_min(eps)
    if gram:
        X = _gram_iteration(X, schedule, restarts, tall)
    else:
        X = _plain_iteration(X, schedule, tall)
    if flip:
        X = X.mT
    return X.to(out_dtype or G.dtype)


def _plain_iteration(X: Tensor, schedule: list[Coefficients], tall: bool = False) -> Tensor:
    """``X <- a X + (b A + c A^2) X``, ``A = X X^T`` (``tall``: ``X <- a X + X (b A + c A^2)``,
    ``A = X^T X``), for each ``(a, b, c)``. Without autograd, on 2-D / 3-D inputs, in three
    buffers allocated once (reallocating them at every iteration cost ~6% of the iteration
    on a CPU, bfloat16, 128 x 512 blocks)."""
    if X.ndim not in (2, 3) or (torch.is_grad_enabled() and X.requires_grad):
        for a, b, c in schedule:
            A = X.mT @ X if tall else X @ X.mT
            B = _addmm(A, A, A, beta=b, alpha=c)
            X = _addmm(X, X, B, beta=a, alpha=1.0) if tall else \
                _addmm(X, B, X, beta=a, alpha=1.0)
        return X
    if X.ndim == 3 and X.shape[0] == 1:  # one matrix: the 2-D kernels (on a CPU the
        return _plain_iteration(X[0], schedule, tall).unsqueeze(0)  # batched: ~3% more)
    mm, addmm = (torch.mm, torch.addmm) if X.ndim == 2 else (torch.bmm, torch.baddbmm)
    X = X.contiguous()
    n = X.shape[-1] if tall else X.shape[-2]
    A = X.new_empty(*X.shape[:-2], n, n)
    B, C = torch.empty_like(A), torch.empty_like(X)
    for a, b, c in schedule:
        if tall:
            mm(X.mT, X, out=A)
        else:
            mm(X, X.mT, out=A)
        addmm(A, A, A, beta=b, alpha=c, out=B)
        if tall:
            addmm(X, X, B, beta=a, alpha=1.0, out=C)
        else:
            addmm(X, B, X, beta=a, alpha=1.0, out=C)
        X, C = C, X
    return X


def _gram_iteration(X: Tensor, schedule: list[Coefficients], restarts: tuple[int, ...],
                    tall: bool = False) -> Tensor:
    """Gram Newton–Schulz on a normalized ``X`` (see :func:`newton_schulz`); ``tall``: on a
    tall ``X``, mirrored (``R = X^T X``, ``X_t = X Q_t^T``)."""
    if not schedule:
        return X

    def gram(X: Tensor) -> Tensor:
        return X.mT @ X if tall else X @ X.mT

    def apply(Q: Tensor, X: Tensor) -> Tensor:  # (X Q^T: bitwise the wide iteration's
        return X @ Q.mT if tall else Q @ X       # transpose; Q is symmetric up to rounding)

    n = X.shape[-1] if tall else X.shape[-2]
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    R = gram(X)
    Q: Tensor | None = None
    last = len(schedule) - 1
    for t, (a, b, c) in enumerate(schedule):
        if t in restarts:  # form the iterate and its Gram matrix afresh
            X = apply(Q, X)  # type: ignore[arg-type]  # t >= 1: Q exists
            R = gram(X)
            Q = None
        Z = _addmm(R, R, R, beta=b, alpha=c)  # b R + c R^2
        Q = Z + a * eye if Q is None else _addmm(Q, Q, Z, beta=a, alpha=1.0)  # Q (a I + Z)
        if t < last and t + 1 not in restarts:
            RZ = _addmm(R, R, Z, beta=a, alpha=1.0)  # R (a I + Z)
            R = _addmm(RZ, Z, RZ, beta=a, alpha=1.0)  # (a I + Z) R (a I + Z)
    return apply(Q, X)  # type: ignore[arg-type]
