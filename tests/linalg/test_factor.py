"""Modified Cholesky: positive definite for indefinite input, unchanged for SPD input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import modified_cholesky
from curvlab.minimize.problems import rosenbrock

METHODS = ["cheng-higham", "gmw"]


def _sym(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A + A.T + shift * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_indefinite_becomes_positive_definite(method, n, seed):
    A = _sym(n, seed)
    mc = modified_cholesky(A, method=method)
    M = mc.matrix()
    assert float(torch.linalg.eigvalsh(0.5 * (M + M.T)).min()) > 0
    b = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(M @ mc.solve(b), b, rtol=1e-7, atol=1e-8)
    if mc.L is not None:
        torch.testing.assert_close(mc.L @ mc.L.T, A + torch.diag(mc.E), rtol=1e-10, atol=1e-9)
        assert bool((mc.E >= 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_spd_input_is_not_modified(method):
    A = _sym(12, 1, shift=20.0)
    mc = modified_cholesky(A, method=method)
    assert not mc.modified and float(mc.E.abs().max()) == 0.0
    torch.testing.assert_close(mc.matrix(), A)
    b = torch.arange(12, dtype=torch.float64)
    torch.testing.assert_close(mc.solve(b), torch.linalg.solve(A, b))


def test_cheng_higham_keeps_eigenvector_scale():
    # block diagonal: |eigenvalues| are kept, tiny ones are lifted to delta
    A = torch.diag(torch.tensor([4.0, -3.0, 1e-20, -2.0], dtype=torch.float64))
    M = modified_cholesky(A).matrix()
    lam = torch.linalg.eigvalsh(M)
    assert lam.min() > 0
    torch.testing.assert_close(lam[1:], torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))


def test_cheng_higham_well_conditioned_where_gmw_is_not():
    x = torch.full((60,), 0.5, dtype=torch.float64)
    H = torch.func.hessian(rosenbrock)(x)
    assert float(torch.linalg.eigvalsh(H).min()) < 0
    ch = torch.linalg.cond(modified_cholesky(H).matrix())
    assert float(ch) < 1e4


def test_float32_and_errors():
    A = _sym(6, 2).float()
    M = modified_cholesky(A).matrix()
    assert M.dtype == torch.float32 and float(torch.linalg.eigvalsh(M).min()) > 0
    with pytest.raises(ValueError, match="square"):
        modified_cholesky(torch.ones(2, 3))
    with pytest.raises(ValueError, match="method"):
        modified_cholesky(torch.eye(2), method="nope")
    with pytest.raises(ValueError, match="non-finite"):
        modified_cholesky(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
