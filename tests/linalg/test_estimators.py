"""Trace, diagonal, quadrature and density estimators against dense float64 truth."""

import pytest
import torch

from curvlab.linalg import diagonal, hutchinson, hutchpp, quadratic_form, slq

from ._problems import matrix_with_spectrum, mlp_hessian


@pytest.fixture(scope="module")
def trained_hessian():
    return mlp_hessian(seed=0, hidden=16, train_steps=150)


def test_hutchpp_confidence_interval_coverage(trained_hessian):
    """Acceptance: the true trace lies in the reported 95% interval in >= 95% of 200
    seeded trials (on the dense Hessian of a small trained MLP)."""
    _, H = trained_hessian
    tr = float(torch.trace(H))
    hits, errors = 0, []
    for seed in range(200):
        est = hutchpp(H, 30, generator=torch.Generator().manual_seed(seed))
        lo, hi = est.confidence_interval(0.95)
        hits += lo <= tr <= hi
        errors.append(abs(est.estimate - tr))
    assert hits >= 190
    assert sum(errors) / len(errors) < 0.1 * abs(tr)


def test_hutchinson_unbiased_and_hutchpp_better():
    ev = torch.cat([torch.linspace(30, 5, 8), 0.2 * torch.randn(
        192, generator=torch.Generator().manual_seed(0))])
    A = matrix_with_spectrum(ev, seed=1)
    tr = float(ev.sum())
    h = [hutchinson(A, 30, generator=torch.Generator().manual_seed(s)) for s in range(100)]
    p = [hutchpp(A, 30, generator=torch.Generator().manual_seed(s)) for s in range(100)]
    mean_h = sum(e.estimate for e in h) / len(h)
    spread = (sum((e.estimate - mean_h) ** 2 for e in h) / len(h)) ** 0.5
    assert abs(mean_h - tr) < 4 * spread / len(h) ** 0.5
    err_h = sum(abs(e.estimate - tr) for e in h) / len(h)
    err_p = sum(abs(e.estimate - tr) for e in p) / len(p)
    assert err_p < 0.5 * err_h
    assert all(e.num_matvecs == 30 for e in h + p)


def test_hutchpp_exact_for_low_rank():
    ev = torch.zeros(60)
    ev[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    A = matrix_with_spectrum(ev, seed=2)
    est = hutchpp(A, 18, generator=torch.Generator().manual_seed(0))
    assert est.estimate == pytest.approx(15.0, abs=1e-9)
    assert est.stderr < 1e-9


def test_diagonal_estimate():
    D = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    exact = diagonal(D, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(exact.estimate, torch.diag(D))  # z * Dz = diag(D) for +-1 probes
    A = matrix_with_spectrum(torch.linspace(-1, 3, 40), seed=3)
    est = diagonal(A, 2000, block_size=200, generator=torch.Generator().manual_seed(1))
    z = (est.estimate - torch.diag(A)) / est.stderr
    assert (z.abs() < 5).all()
    assert (est.estimate - torch.diag(A)).abs().max() < 0.15


def test_quadratic_form_inverse_matches_solve():
    A = matrix_with_spectrum(torch.logspace(-2, 1, 80), seed=4)
    v = torch.randn(80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = float(v @ torch.linalg.solve(A, v))
    q = quadratic_form(A, v, lambda t: 1.0 / t, tol=1e-10)
    assert q.converged and q.num_matvecs <= 80
    assert q.value == pytest.approx(exact, rel=1e-7)
    assert q.ritz_values.min() >= 1e-2 - 1e-10  # Ritz values lie inside the spectrum


def test_slq_density_integrates_to_one_and_matches_moments(trained_hessian):
    """Acceptance: the density integrates to 1 and its first 4 moments are within 5% of
    the exact spectrum's (small trained MLP, dense float64 eigenvalues)."""
    _, H = trained_hessian
    ev = torch.linalg.eigvalsh(H)
    dens = slq(H, num_probes=20, num_steps=30, deflate=10,
               generator=torch.Generator().manual_seed(0))
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(dens.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for p in range(1, 5):
        exact = float((ev ** p).mean())
        assert dens.moment(p) == pytest.approx(exact, rel=0.05), p
    # the top of the measure is the exact top of the spectrum (deflated eigenvalues)
    assert float(dens.nodes.max()) == pytest.approx(float(ev.max()), rel=1e-8)


def test_slq_full_steps_recovers_spectrum_support():
    ev = torch.tensor([-2.0, -1.0, 0.5, 3.0, 4.0])
    A = matrix_with_spectrum(ev, seed=5)
    dens = slq(A, num_probes=4, num_steps=5, generator=torch.Generator().manual_seed(0))
    for lam in ev:
        assert (dens.nodes - lam).abs().min() < 1e-8
    assert float(dens.weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_estimator_arguments():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson(A, 1)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp(A, 3)
    with pytest.raises(ValueError, match="deflate"):
        slq(A, deflate=5)
    est = hutchinson(A, 10)
    with pytest.raises(ValueError, match="level"):
        est.confidence_interval(1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hutchpp_of_a_16_bit_operator(dtype):
    """A bfloat16 model's Hessian operator is bfloat16: QR has no 16-bit CPU kernel, so
    Hutch++ raised NotImplementedError (``curvlab diagnose`` on a bfloat16 GPT-2). Its basis
    is now float32. With ``m / 3 >= n`` the basis spans everything and the estimate is the
    trace, to 16-bit rounding."""
    from curvlab.linops import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).to(dtype)
    X, y = torch.randn(16, 3).to(dtype), torch.randint(0, 2, (16,))
    op = HessianOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
    dense = op.to_dense().double()
    est = hutchpp(op, 3 * op.shape[0], generator=torch.Generator().manual_seed(1))
    scale = float(torch.linalg.matrix_norm(dense, "nuc"))
    assert abs(est.estimate - float(dense.trace())) <= 4 * torch.finfo(dtype).eps * scale
