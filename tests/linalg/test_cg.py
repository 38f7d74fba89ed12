"""cg and steihaug_cg against dense float64 solutions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import cg, steihaug_cg


def _spd(n, seed, cond=100.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (Q * lam) @ Q.T


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_cg_matches_dense_solve(n, seed):
    A = _spd(n, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    res = cg(A, b, rtol=1e-12, max_iter=10 * n)
    assert res.converged and not res.negative_curvature
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert res.residual_norm <= 1e-12 * float(b.norm()) * 10


def test_cg_callable_preconditioner_and_budget():
    A = _spd(40, 0, cond=1e4)
    b = torch.ones(40, dtype=torch.float64)
    plain = cg(lambda v: A @ v, b, rtol=1e-10, max_iter=400)
    jacobi = cg(A, b, rtol=1e-10, max_iter=400, M=lambda r: r / A.diagonal())
    exact = cg(A, b, rtol=1e-10, max_iter=400, M=torch.linalg.inv(A))
    for r in (plain, jacobi, exact):
        assert r.converged
        torch.testing.assert_close(r.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)
    assert exact.iterations <= 2
    short = cg(A, b, rtol=1e-12, max_iter=3)
    assert short.iterations == 3 and not short.converged


def test_cg_reports_negative_curvature():
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    res = cg(A, torch.ones(3, dtype=torch.float64), rtol=1e-12)
    assert res.negative_curvature and not res.converged
    assert float(res.direction @ A @ res.direction) <= 0


def test_cg_float32_and_errors():
    A = _spd(10, 3).float()
    b = torch.ones(10, dtype=torch.float32)
    res = cg(A, b, rtol=1e-5)
    assert res.x.dtype == torch.float32 and res.converged
    with pytest.raises(ValueError, match="square"):
        cg(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(TypeError, match="A must be"):
        cg("A", torch.ones(2))


def _model(g, B, p):
    return float(g @ p + 0.5 * p @ B @ p)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 20), seed=st.integers(0, 10_000), radius=st.floats(0.01, 100.0))
def test_steihaug_spd(n, seed, radius):
    B = _spd(n, seed, cond=50.0)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    res = steihaug_cg(B, g, radius, rtol=1e-10, max_iter=10 * n)
    pn = float(res.p.norm())
    newton = -torch.linalg.solve(B, g)
    assert pn <= radius * (1 + 1e-9)
    if float(newton.norm()) < radius * 0.999:
        assert not res.hit_boundary
        torch.testing.assert_close(res.p, newton, rtol=1e-6, atol=1e-8)
    if res.hit_boundary:
        assert pn == pytest.approx(radius, rel=1e-9)
    # never worse than the Cauchy point (Steihaug's first iterate), model value exact
    gBg = float(g @ B @ g)
    t = min(float(g @ g) / gBg, radius / float(g.norm()))
    assert _model(g, B, res.p) <= _model(g, B, -t * g) + 1e-10
    assert res.model_value == pytest.approx(_model(g, B, res.p), rel=1e-8, abs=1e-10)


def test_steihaug_negative_curvature_goes_to_boundary():
    B = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
    g = torch.tensor([1.0, 0.1], dtype=torch.float64)
    res = steihaug_cg(B, g, 3.0)
    assert res.hit_boundary
    assert float(res.p.norm()) == pytest.approx(3.0)
    assert res.model_value == pytest.approx(_model(g, B, res.p))
    assert res.model_value < 0
    with pytest.raises(ValueError, match="radius"):
        steihaug_cg(B, g, 0.0)
