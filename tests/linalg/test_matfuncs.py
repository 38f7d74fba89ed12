"""Matrix functions against float64 dense references (numpy eigh / SVD)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg.matfuncs import (
    NS_QUINTIC_COEFFICIENTS,
    MatrixFunctionError,
    coupled_newton_inverse_root,
    eigenbasis_qr_refresh,
    high_precision_matmul,
    matrix_inverse_root,
    newton_schulz,
    symmetric_eigh,
)


def _spd(n, seed, rank=None, scale=1.0):
    g = np.random.default_rng(seed)
    B = g.standard_normal((n, rank or n))
    return scale * (B @ B.T + (0.1 * np.eye(n) if rank is None else 0.0))


def _ref_root(A, p, damping=0.0):
    w, Q = np.linalg.eigh(A + damping * np.eye(len(A)))
    return (Q * w ** (-1.0 / p)) @ Q.T


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), p=st.sampled_from([1, 2, 4, 6]), seed=st.integers(0, 1000),
       damping=st.sampled_from([0.0, 1e-3]))
def test_inverse_root_matches_dense_reference(n, p, seed, damping):
    A = _spd(n, seed)
    R = matrix_inverse_root(torch.tensor(A), p, damping=damping)
    assert R.dtype == torch.float64
    np.testing.assert_allclose(R.numpy(), _ref_root(A, p, damping), rtol=1e-8, atol=1e-10)


def test_inverse_root_float32_input_is_computed_in_float64_and_batched():
    As = np.stack([_spd(6, s) for s in range(3)])
    R = matrix_inverse_root(torch.tensor(As, dtype=torch.float32), 4)
    assert R.dtype == torch.float32 and R.shape == (3, 6, 6)
    for i in range(3):
        np.testing.assert_allclose(R[i].numpy(), _ref_root(As[i].astype(np.float32)
                                                           .astype(np.float64), 4), rtol=1e-5)


def test_pseudo_inverse_root_on_rank_deficient_matrix():
    A = _spd(8, 0, rank=3)
    R = matrix_inverse_root(torch.tensor(A), 1, pseudo_inverse=True)
    np.testing.assert_allclose(R.numpy(), np.linalg.pinv(A, rcond=1e-10), rtol=1e-6, atol=1e-8)
    R2 = matrix_inverse_root(torch.tensor(A), 2, pseudo_inverse=True)
    np.testing.assert_allclose((R2 @ R2).numpy(), np.linalg.pinv(A, rcond=1e-10), atol=1e-6)


def test_inverse_root_of_singular_matrix_without_damping_is_finite():
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[0, 0] = 1.0
    R = matrix_inverse_root(A, 4)
    assert torch.isfinite(R).all()


@pytest.mark.parametrize("p", [1, 2, 4])
def test_coupled_newton_matches_eigh_reference(p):
    A = _spd(7, p, scale=3.0)
    R = coupled_newton_inverse_root(torch.tensor(A), p, damping=1e-4)
    np.testing.assert_allclose(R.numpy(), _ref_root(A, p, 1e-4), rtol=1e-7, atol=1e-9)


def test_coupled_newton_reports_non_convergence():
    A = torch.tensor(_spd(5, 0))
    with pytest.raises(MatrixFunctionError, match="did not reach"):
        coupled_newton_inverse_root(A, 4, max_iters=1)


def test_nonfinite_input_raises_matrix_function_error():
    A = torch.eye(3)
    A[0, 1] = float("nan")
    with pytest.raises(MatrixFunctionError):
        matrix_inverse_root(A, 2)
    with pytest.raises(MatrixFunctionError):
        symmetric_eigh(A)


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        matrix_inverse_root(torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match="p must be positive"):
        matrix_inverse_root(torch.eye(2), 0)
    with pytest.raises(ValueError, match="damping"):
        matrix_inverse_root(torch.eye(2), 2, damping=-1.0)
    with pytest.raises(ValueError, match="positive integer"):
        coupled_newton_inverse_root(torch.eye(2), 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        newton_schulz(torch.ones(3))


def test_qr_refresh_converges_to_the_eigenbasis_and_sorts_descending():
    A = _spd(6, 3)
    w, V = np.linalg.eigh(A)
    At = torch.tensor(A)
    Q = torch.linalg.qr(torch.tensor(V[:, ::-1].copy()) + 0.05 * torch.randn(
        6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    for _ in range(200):
        Q, order = eigenbasis_qr_refresh(At, Q, compute_dtype=torch.float64)
    D = Q.T @ At @ Q
    np.testing.assert_allclose(torch.diagonal(D).numpy(), w[::-1], rtol=1e-8)
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-8 * w.max()
    assert torch.equal(order, torch.arange(6))  # already sorted once converged


def test_qr_refresh_order_permutes_columns_by_estimated_eigenvalue():
    A = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    Q, order = eigenbasis_qr_refresh(A, torch.eye(3, dtype=torch.float64),
                                     compute_dtype=torch.float64)
    assert order.tolist() == [1, 2, 0]
    np.testing.assert_allclose(Q.abs().numpy(), np.eye(3)[:, [1, 2, 0]], atol=1e-12)


def _ns_reference(G, steps, coeffs):
    a, b, c = coeffs
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / max(np.linalg.norm(X), 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6)])
def test_newton_schulz_matches_float64_reference(shape):
    G = np.random.default_rng(1).standard_normal(shape)
    out = newton_schulz(torch.tensor(G), 5, NS_QUINTIC_COEFFICIENTS)
    np.testing.assert_allclose(out.numpy(), _ns_reference(G, 5, NS_QUINTIC_COEFFICIENTS),
                               rtol=1e-10, atol=1e-12)
    # the quintic iteration leaves singular values in a band around 1 rather than at 1
    s = np.linalg.svd(out.numpy(), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.25


def test_cubic_newton_schulz_converges_to_polar_factor():
    G = np.random.default_rng(2).standard_normal((6, 9))
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    out = newton_schulz(torch.tensor(G), 60, (1.5, -0.5, 0.0))
    np.testing.assert_allclose(out.numpy(), U @ Vt, atol=1e-8)


def test_newton_schulz_batched_equals_loop_and_respects_dtype():
    G = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(0))
    batched = newton_schulz(G)
    for i in range(4):
        torch.testing.assert_close(batched[i], newton_schulz(G[i]), rtol=1e-5, atol=1e-6)
    low = newton_schulz(G, dtype=torch.float64)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_iterates_tall_matrices_in_place_of_a_transposed_copy(dtype, gram):
    """A tall G iterates mirrored (A = X^T X, X <- a X + X B) in its own layout: the
    transpose of the wide iteration on G^T to rounding (the same products; BLAS may sum
    them in another order); a tall view of a wide matrix and overwrite=True give the same
    result."""
    G = torch.randn(3, 96, 24, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=5, coefficients="polar_express", dtype=dtype, gram=gram)
    wide = newton_schulz(G.mT.contiguous(), **kwargs)
    tall = newton_schulz(G, **kwargs)
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(tall, wide.mT, rtol=0, atol=atol)
    assert torch.equal(newton_schulz(G.mT.contiguous().mT, **kwargs), wide.mT)  # a view
    scratch = G.to(dtype)
    assert torch.equal(newton_schulz(scratch, **kwargs, overwrite=True).to(tall.dtype), tall)
    # the polar factor, not a transposed or unnormalized one
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert (tall.double() - U @ Vh).norm() / (U @ Vh).norm() < 0.1


def test_high_precision_matmul_restores_settings():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision
    mm.fp32_precision = "tf32"
    try:
        with high_precision_matmul():
            assert mm.fp32_precision == "ieee"
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = before


def test_qr_refresh_batched_equals_per_matrix_and_householder_qr_reference():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    A = B @ B.mT
    Q = torch.linalg.qr(torch.randn(3, 5, 5, generator=g, dtype=torch.float64))[0]
    Qn, order = eigenbasis_qr_refresh(A, Q, compute_dtype=torch.float64)
    for b in range(3):
        Qb, ob = eigenbasis_qr_refresh(A[b], Q[b], compute_dtype=torch.float64)
        assert torch.equal(ob, order[b])
        torch.testing.assert_close(Qb, Qn[b], rtol=0, atol=1e-12)
        # reference: sort by the Rayleigh quotients, then torch.linalg.qr of A Q[:, order]
        est = torch.diagonal(Q[b].T @ A[b] @ Q[b])
        ref_order = torch.argsort(est, descending=True)
        assert torch.equal(ob, ref_order)
        ref = torch.linalg.qr(A[b] @ Q[b][:, ref_order])[0]
        torch.testing.assert_close(Qb, ref, rtol=0, atol=1e-12)
