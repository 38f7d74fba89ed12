"""Lanczos and power iteration against dense float64 eigendecompositions."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import MatvecOperator, lanczos, power_iteration

from ._problems import matrix_with_spectrum, mlp_hessian


@pytest.fixture(scope="module")
def hessian():
    return mlp_hessian(seed=0)


def true_residuals(H, res):
    V = res.eigenvectors.double()
    return (H @ V - V * res.eigenvalues).norm(dim=0)


def test_lanczos_top5_matches_dense_hessian(hessian):
    op, H = hessian
    ev = torch.linalg.eigvalsh(H)
    res = lanczos(op, 5, tol=1e-9)
    assert res.converged
    rel = (res.eigenvalues - ev.flip(0)[:5]).abs() / ev.flip(0)[:5].abs()
    assert rel.max() < 1e-6
    # the reported residuals are the true ones, and they bound the eigenvalue error
    assert torch.allclose(true_residuals(H, res), res.residuals, atol=1e-10)
    assert (res.relative_residuals <= 1e-9).all()
    assert len(res.history) == res.num_iters
    # num_matvecs counts the check for missed copies of repeated eigenvalues too
    assert res.num_matvecs == op.num_matvecs > res.num_iters
    before = op.num_matvecs
    plain = lanczos(op, 5, tol=1e-9, find_repeated=False)
    assert plain.num_matvecs == op.num_matvecs - before == plain.num_iters
    torch.testing.assert_close(plain.eigenvalues, res.eigenvalues, rtol=1e-9, atol=0)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue(which):
    """One start vector's Krylov space holds one direction per eigenspace: asked for the
    top 3 of [10, 10, 10, 5, ...] Lanczos returned [10, 10, 5] (and [10, 9] for the top 2
    of [10, 10, 9, ...]) with converged=True. The deflated check finds the copies. A
    multi-output least-squares Hessian (I_3 (x) X^T X) repeats every eigenvalue 3 times."""
    sign = -1.0 if which == "smallest" else 1.0
    ev = sign * torch.cat([torch.tensor([10.0, 10.0, 10.0]), torch.linspace(5, 0, 57)])
    A = matrix_with_spectrum(ev, seed=2)
    res = lanczos(A, 4, which=which, tol=1e-8, generator=torch.Generator().manual_seed(0))
    want = sign * torch.tensor([10.0, 10.0, 10.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(true_residuals(A.double(), res), res.residuals, rtol=1e-3,
                               atol=1e-10)
    V = res.eigenvectors.double()
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    G = torch.kron(torch.eye(3, dtype=torch.float64), X.T @ X / 40)
    top = lanczos(G, 4, tol=1e-8, generator=g)
    torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(G).flip(0)[:4],
                               rtol=1e-6, atol=0)


def test_lanczos_bottom_and_magnitude():
    ev = torch.cat([torch.tensor([-7.0, -3.0]), torch.linspace(-1, 5, 98)])
    A = matrix_with_spectrum(ev, seed=1)
    bot = lanczos(A, 3, which="smallest", tol=1e-10)
    assert torch.allclose(bot.eigenvalues, torch.sort(ev).values[:3].double(), rtol=1e-8)
    mag = lanczos(A, 1, which="magnitude", tol=1e-10)
    assert mag.eigenvalues[0] == pytest.approx(-7.0, rel=1e-8)


def test_stopping_rule_is_honest():
    """Stopping at tol: the eigenvalue error is within the residual, which is within tol."""
    ev = torch.cat([torch.tensor([1.0, 0.97, 0.95]), torch.rand(197, generator=torch.Generator(
        ).manual_seed(0)) * 0.9])
    A = matrix_with_spectrum(ev, seed=2)
    for tol in (1e-2, 1e-4, 1e-6):
        res = lanczos(A, 1, tol=tol)
        assert res.converged
        err = abs(float(res.eigenvalues[0]) - 1.0)
        assert err <= float(res.residuals[0]) + 1e-14
        assert float(res.residuals[0]) <= tol * float(res.eigenvalues[0])
        assert float(true_residuals(A, res)[0]) == pytest.approx(float(res.residuals[0]),
                                                                 abs=1e-12)


def test_power_iteration_and_cost_vs_lanczos():
    ev = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-2, 8, 198)])
    A = matrix_with_spectrum(ev, seed=3)
    g = torch.Generator().manual_seed(0)
    pw = power_iteration(A, tol=1e-6, generator=g)
    lz = lanczos(A, 1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    assert pw.converged and lz.converged
    assert float(pw.eigenvalues[0]) == pytest.approx(10.0, rel=1e-6)
    assert abs(float(pw.eigenvalues[0]) - 10.0) <= float(pw.residuals[0])
    assert lz.num_matvecs * 3 <= pw.num_matvecs


def test_warm_start_from_eigenvector_is_cheap(hessian):
    op, H = hessian
    cold = lanczos(op, 1, tol=1e-6)
    warm = lanczos(op, 1, tol=1e-6, v0=cold.eigenvectors)
    assert warm.num_matvecs < cold.num_matvecs
    assert warm.num_matvecs <= 3


def test_not_converged_is_reported():
    A = matrix_with_spectrum(torch.linspace(0, 1, 300), seed=4)
    res = lanczos(A, 1, tol=1e-12, max_iter=5)
    assert not res.converged and res.num_matvecs == 5


def test_float32_operator_and_callable():
    A = matrix_with_spectrum(torch.linspace(1, 2, 50), seed=5).float()
    op = MatvecOperator(lambda v: A @ v, 50, dtype=torch.float32)
    res = lanczos(op, 2, tol=1e-4)
    assert res.eigenvectors.dtype == torch.float32
    assert torch.allclose(res.eigenvalues, torch.tensor([2.0, 2 - 1 / 49], dtype=torch.float64),
                          rtol=1e-4)


def test_exhausted_space_and_invariant_start():
    """A start vector in an invariant subspace breaks down; Lanczos restarts and still
    finds the rest of the spectrum once it exhausts the space."""
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    v0 = torch.zeros(8, dtype=torch.float64)
    v0[0] = 1.0
    res = lanczos(A, 2, tol=1e-10, v0=v0, max_iter=8)
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.tensor([8.0, 7.0], dtype=torch.float64))


def test_bad_arguments():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(A, 0)
    with pytest.raises(ValueError, match="which"):
        lanczos(A, 1, which="top")
    with pytest.raises(ValueError, match="exceeds"):
        lanczos(A, 5)
    with pytest.raises(TypeError, match="MatvecOperator"):
        lanczos(lambda v: v, 1)
    with pytest.raises(ValueError, match="square"):
        power_iteration(torch.ones(3, 4))
    with pytest.raises(ValueError, match="v0"):
        lanczos(A, 1, v0=torch.ones(3, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10_000), k=st.integers(1, 3))
def test_lanczos_random_symmetric(n, seed, k):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = B + B.T
    ev = torch.linalg.eigvalsh(A)
    res = lanczos(A, k, tol=1e-10, generator=g)
    scale = ev.abs().max()
    assert torch.allclose(res.eigenvalues, ev.flip(0)[:k], atol=1e-7 * float(scale))


def test_min_iter_escapes_a_warm_start_on_the_wrong_eigenvector():
    """A start vector that is (almost) the eigenvector of the second eigenvalue passes the
    residual test after one step; with two steps the Krylov space holds the top one."""
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    v0 = torch.zeros(8, dtype=torch.float64)
    v0[6], v0[7] = 1.0, 1e-3
    locked = lanczos(A, 1, tol=1e-2, v0=v0)
    assert locked.converged and locked.num_matvecs == 1
    assert float(locked.eigenvalues[0]) == pytest.approx(7.0, abs=1e-5)
    found = lanczos(A, 1, tol=1e-2, v0=v0, min_iter=2, num_vectors=2)
    assert found.num_matvecs == 2
    assert torch.allclose(found.eigenvalues, torch.tensor([8.0, 7.0], dtype=torch.float64))
    assert found.eigenvectors.shape == (8, 2)


def test_missed_copies_near_zero_use_the_runs_norm_relative_bound():
    """relative_to="norm" (bottom eigenvalues near 0): the copy check converges to the
    first run's bound tol x ||A|| and finds the second copy of -1e-3 (a relative bound at
    -1e-3 would need ~1e-6 accuracy and run to max_iter)."""
    ev = torch.cat([torch.tensor([-1e-3, -1e-3]), torch.linspace(1e-6, 10, 198)])
    A = matrix_with_spectrum(ev, seed=0)
    res = lanczos(A, 3, which="smallest", tol=1e-3, relative_to="norm",
                  generator=torch.Generator().manual_seed(0))
    assert res.eigenvalues[1] < 0 and abs(float(res.eigenvalues[1]) + 1e-3) <= 1e-2
    assert res.num_matvecs < 2 * 200


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_low_precision_products_report_their_rounding_floor(method):
    """A bfloat16 operator's products carry errors of about eps ||A|| (eps = 7.8e-3): its
    Ritz residuals went to 0 and the pairs were "converged" at tol=1e-4 while 0.2% off.
    Residuals are now reported no smaller than eps ||A||, the error is within them, and a
    warning says the requested tol is out of reach; float32 at the same tol is unchanged."""
    spectrum = torch.cat([torch.tensor([10.0, 6.0]), torch.linspace(0.1, 3.0, 48)])
    A = matrix_with_spectrum(spectrum, seed=3)
    A16 = A.to(torch.bfloat16)
    truth = torch.linalg.eigvalsh(A16.double()).flip(0)  # the bfloat16 matrix's own
    eps = torch.finfo(torch.bfloat16).eps
    run = (lambda M: lanczos(M, 2, tol=1e-4, generator=torch.Generator().manual_seed(0))) \
        if method == "lanczos" else \
        (lambda M: power_iteration(M, tol=1e-4, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning, match="computes in torch.bfloat16"):
        res = run(A16)
    assert res.converged
    k = len(res.eigenvalues)
    assert (res.residuals >= eps * 0.5 * 10.0).all()  # ~eps ||A|| (||A|| >= 10 / 2: a bound)
    assert ((res.eigenvalues - truth[:k]).abs() <= 3 * res.residuals).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res32 = run(A.float())
    assert res32.converged
    assert ((res32.eigenvalues - torch.tensor([10.0, 6.0])[:k].double()).abs() <= 1e-4 * 10).all()
