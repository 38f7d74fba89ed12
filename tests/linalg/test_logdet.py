"""log det(A + damping I): exact (dense, Kronecker) and stochastic (SLQ) with its error bar."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.linalg import MatvecOperator, kronecker_logdet, logdet, quadratic_form
from curvlab.linops import KFACOperator

from ._problems import matrix_with_spectrum


def _true(ev, damping):
    return float(torch.log(ev.double() + damping).sum())


def test_dense_is_exact():
    ev = torch.logspace(-4, 2, 80, dtype=torch.float64)
    A = matrix_with_spectrum(ev, seed=0)
    for damping in (0.0, 1e-3, 2.5):
        r = logdet(A, damping)
        assert r.method == "dense" and r.stderr == 0.0
        assert r.value == pytest.approx(_true(ev, damping), abs=1e-10)
    op = MatvecOperator(lambda v: A @ v, 80, matmat=lambda V: A @ V)
    r = logdet(op, 0.1, method="dense")
    assert r.value == pytest.approx(_true(ev, 0.1), abs=1e-10)
    assert r.num_matvecs == 80 + 2  # the columns, plus the symmetry test of a user matvec


def test_not_positive_definite_is_an_error():
    A = matrix_with_spectrum(torch.tensor([-1.0, 1.0, 2.0, 3.0]), seed=1)
    for method in ("dense", "slq"):
        with pytest.raises(ValueError, match="positive definite"):
            logdet(A, 0.5, method)
    assert logdet(A, 1.5).value == pytest.approx(_true(torch.tensor([-1.0, 1, 2, 3]), 1.5))
    with pytest.raises(ValueError, match="method"):
        logdet(A, 1.5, "cholesky")


def _kfac(bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    model = model.double()
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    return KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")


def test_kfac_closed_form_matches_dense():
    op = _kfac()
    D = op.to_dense()
    for damping in (1e-3, 0.3):
        exact = logdet(op, damping)
        assert exact.method == "exact" and exact.num_matvecs == 0
        ref = float(torch.linalg.slogdet(D + damping * torch.eye(D.shape[0],
                                                                 dtype=D.dtype))[1])
        assert exact.value == pytest.approx(ref, abs=1e-10)
        assert logdet(op, damping, "dense").value == pytest.approx(ref, abs=1e-10)
    op.damping = 0.2  # the operator's own damping adds to the argument
    assert logdet(op, 0.1).value == pytest.approx(logdet(D, 0.3).value, abs=1e-10)


def test_kronecker_logdet_errors():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))  # singular factor
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping > 0"):
        kronecker_logdet([(A, G)], 0.0)
    assert kronecker_logdet([(A, G)], 0.5) == pytest.approx(3 * (math.log(1.5) + math.log(0.5)))
    with pytest.raises(ValueError, match="cover"):
        kronecker_logdet([(A, G)], 0.5, size=7)


def test_gauss_and_gauss_radau_bracket_the_quadratic_form():
    """For log on [a, inf): the Gauss rule is above the exact value, Gauss-Radau with the
    node a below, at every step (Golub & Meurant 2010, Thm. 6.4)."""
    ev = torch.logspace(-2, 1, 200, dtype=torch.float64)
    A = matrix_with_spectrum(ev, seed=2)
    v = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam, Q = torch.linalg.eigh(A)
    exact = float((Q.T @ v) ** 2 @ torch.log(lam))
    for steps in (2, 5, 10, 20):
        q = quadratic_form(A, v, np.log, tol=0.0, max_iter=steps, lower_bound=0.005)
        assert q.bracketed and q.num_matvecs == steps
        assert abs(q.value - exact) <= q.error * (1 + 1e-9)
        assert q.error > 0
    q = quadratic_form(A, v, np.log, tol=1e-10, max_iter=200, lower_bound=0.01)
    assert q.converged and abs(q.value - exact) <= max(q.error, 1e-9 * abs(exact))
    with pytest.raises(ValueError, match="not a lower bound"):
        quadratic_form(A, v, np.log, max_iter=20, lower_bound=0.5)
    with pytest.raises(ValueError, match="not finite"):
        quadratic_form(A, v, np.log, max_iter=20, lower_bound=0.0)


def test_slq_error_bar_and_coverage():
    """The 95% interval covers the exact value in at least 11 of 12 seeded trials (the
    100-trial version: benchmarks/bench_logdet_coverage.py); the quadrature part of the
    bar is negligible at the default tolerance."""
    ev = torch.logspace(-2, 0, 60, dtype=torch.float64)
    A = matrix_with_spectrum(ev, seed=3)
    op = MatvecOperator(lambda v: A @ v, 60, matmat=lambda V: A @ V)
    true = _true(ev, 0.05)
    covered = 0
    for seed in range(12):
        r = logdet(op, 0.05, "slq", num_probes=10, lower_bound=0.0,
                   generator=torch.Generator().manual_seed(seed))
        assert r.method == "slq" and r.converged and r.num_samples == 10
        assert r.quadrature_error < 1e-3 * r.stderr
        lo, hi = r.confidence_interval(0.95)
        covered += lo <= true <= hi
    assert covered >= 11
    counted = MatvecOperator(lambda v: A @ v, 60, check_symmetry=False)
    r = logdet(counted, 0.05, "slq", num_probes=4, generator=torch.Generator().manual_seed(0))
    assert 4 < r.num_matvecs <= 4 * 60


def test_slq_not_converged_widens_the_bar():
    """Too few Lanczos steps: converged=False and the quadrature error enters the bar."""
    ev = torch.logspace(-4, 1, 300, dtype=torch.float64)
    A = matrix_with_spectrum(ev, seed=4)
    r = logdet(A, 1e-3, "slq", num_probes=6, num_steps=4, lower_bound=0.0,
               generator=torch.Generator().manual_seed(0))
    assert not r.converged and r.quadrature_error > 0
    assert r.stderr >= r.quadrature_error
    assert abs(r.value - _true(ev, 1e-3)) <= 3 * r.stderr


def test_auto_chooses_dense_for_small_and_slq_for_large():
    ev = torch.linspace(1, 2, 50, dtype=torch.float64)
    A = matrix_with_spectrum(ev, seed=5)
    op = MatvecOperator(lambda v: A @ v, 50, check_symmetry=False)
    assert logdet(op).method == "dense"
    r = logdet(op, num_probes=2, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert r.method == "slq"
    assert abs(r.value - _true(ev, 0.0)) <= 4 * r.stderr
