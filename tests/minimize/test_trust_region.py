"""Trust-region subproblem solvers against the optimality conditions of the exact step."""

import numpy as np
import pytest
import torch

from curvlab.minimize import minimize
from curvlab.minimize.trust_region import MoreSorensen, solve_exact


def _check_global_step(g, B, radius, p, m, boundary, tol):
    """N&W Thm. 4.1: ``(B + l I) p = -g``, ``l >= 0``, ``l (radius - ||p||) = 0`` and
    ``B + l I`` positive semidefinite; ``m`` is the model value at ``p``."""
    g, B, p = (t.double().numpy() for t in (g, B, p))
    pn = np.linalg.norm(p)
    assert pn <= radius * (1 + tol)
    lam = 0.0 if not boundary else max(0.0, -float(p @ (B @ p + g)) / (pn * pn))
    scale = np.abs(B).max() * radius + np.linalg.norm(g)
    assert np.linalg.norm((B + lam * np.eye(len(g))) @ p + g) <= tol * scale
    assert np.linalg.eigvalsh(B + lam * np.eye(len(g)))[0] >= -tol * np.abs(B).max()
    assert lam * (radius - pn) <= tol * scale * radius
    assert m == pytest.approx(float(g @ p + 0.5 * p @ B @ p), rel=tol, abs=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["positive-definite", "indefinite"])
def test_solve_exact_is_the_global_step(seed, kind, dtype):
    gen = torch.Generator().manual_seed(seed)
    n = 2 + seed
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    B = A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64) if kind == "positive-definite" \
        else A + A.T
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    for radius in (1e-2, 0.5, 1e3):
        p, m, boundary = solve_exact(g.to(dtype), B.to(dtype), radius)
        assert p.dtype == dtype and p.shape == g.shape
        _check_global_step(g, B, radius, p, m, boundary, tol)


def test_solve_exact_hard_case():
    """``g`` orthogonal to the lowest eigenvector and ``||p(-lam_1)|| < radius`` (N&W 4.45):
    the step is ``p(-lam_1) + tau q_1`` on the boundary."""
    B = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    p, m, boundary = solve_exact(g, B, 2.0)
    assert boundary
    assert float(torch.linalg.vector_norm(p)) == pytest.approx(2.0)
    torch.testing.assert_close(p[1:], -g[1:] / torch.tensor([3.0, 4.0], dtype=torch.float64))
    _check_global_step(g, B, 2.0, p, m, boundary, 1e-8)


@pytest.mark.parametrize("method", ["trust-exact", "newton-cg", "newton", "dogleg"])
def test_user_hessian_needs_no_autograd_graph(method):
    """``jac=True`` with a user ``hess``: ``fun`` need not be differentiable by autograd."""

    def fg(x):
        a, b = x.tolist()
        f = 100 * (b - a * a) ** 2 + (1 - a) ** 2
        g = [-400 * a * (b - a * a) - 2 * (1 - a), 200 * (b - a * a)]
        return torch.tensor(f, dtype=x.dtype), torch.tensor(g, dtype=x.dtype)

    def hess(x):
        a, b = x.tolist()
        return torch.tensor([[1200 * a * a - 400 * b + 2, -400 * a], [-400 * a, 200.0]],
                            dtype=x.dtype)

    res = minimize(fg, torch.tensor([-1.2, 1.0], dtype=torch.float64), method, jac=True,
                   hess=hess)
    assert res.success
    torch.testing.assert_close(res.x, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert res.nhess > 0


@pytest.mark.parametrize("method", ["trust-exact", "trust-ncg"])
def test_rejected_trials_cost_no_gradient(method):
    """A trial rejected on its value is never differentiated: ``ngev`` counts the start and
    the accepted steps only, while every forward pass is in ``nfev``."""
    from curvlab.minimize.problems import mgh_problems

    problem = next(p for p in mgh_problems() if p.name.startswith("Biggs"))
    calls = {"n": 0}

    def f(x):
        calls["n"] += 1
        return problem.objective(x)

    res = minimize(f, problem.start(), method, history=True, max_iter=60)
    fs = res.history["f"]
    accepted = sum(a != b for a, b in zip(fs, fs[1:], strict=False))
    assert res.nfev == calls["n"] == res.nit + 1
    assert accepted < res.nit  # the run has rejected trials
    assert res.ngev == accepted + 1


def _random_subproblem(seed):
    gen = np.random.default_rng(seed)
    n = int(gen.integers(1, 9))
    A = gen.standard_normal((n, n))
    B = A + A.T if seed % 2 else A @ A.T
    if seed % 5 == 0 and n > 1:  # g orthogonal to the lowest eigenvector: (nearly) hard case
        Q = np.linalg.eigh(B)[1]
        g = Q[:, 1:] @ gen.standard_normal(n - 1)
    else:
        g = gen.standard_normal(n)
    return torch.from_numpy(g), torch.from_numpy(B)


@pytest.mark.parametrize("seed", range(40))
def test_more_sorensen_meets_its_stopping_rules(seed):
    """More & Sorensen (1983): ``||p|| <= (1 + k_easy) radius`` and the model value within
    a factor ``1 - k_hard`` of the exact step's (dense ground truth: :func:`solve_exact`,
    itself checked against the optimality conditions above); the interior Newton step is
    exact; radii shrink at the same iterate as after rejected steps."""
    g, B = _random_subproblem(seed)
    ms = MoreSorensen(g, B)
    for radius in (10.0, 2.0, 0.5, 0.1, 0.01):
        p, m, boundary = ms(radius)
        p_ex, m_ex, boundary_ex = solve_exact(g, B, radius)
        assert float(torch.linalg.vector_norm(p)) <= (1 + ms.k_easy) * radius * (1 + 1e-12)
        assert m == pytest.approx(float(g @ p + 0.5 * p @ (B @ p)), rel=1e-10, abs=1e-12)
        assert m <= (1 - ms.k_hard) * m_ex + 1e-12
        if not boundary_ex:
            assert not boundary
            torch.testing.assert_close(p, p_ex, rtol=1e-8, atol=1e-10)


def test_more_sorensen_negative_curvature_at_a_stationary_point():
    """``g = 0`` with ``B`` indefinite: the step goes to the boundary along (nearly) the
    lowest eigenvector, with a negative model value."""
    B = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    g = torch.zeros(3, dtype=torch.float64)
    p, m, boundary = MoreSorensen(g, B)(0.5)
    assert boundary and m < 0
    assert float(torch.linalg.vector_norm(p)) == pytest.approx(0.5)
    assert m <= (1 - 0.2) * (-0.5 * 0.25)


def test_trust_exact_leaves_the_symmetric_saddle_manifold_on_biggs():
    """Biggs EXP6 (MGH 18) from its standard start: the start is symmetric under
    ``(x1, x3) <-> (x5, x6)`` and the exact step keeps the iterates near that manifold,
    where the run crawled (568 evaluations) to a degenerate stationary point at
    ``f = 0.2427``; More-Sorensen's approximate null-vector step leaves it and reaches
    the global minimum ``f = 0`` (MGH)."""
    from curvlab.minimize.problems import mgh_problems

    problem = next(p for p in mgh_problems() if p.name.startswith("Biggs"))
    res = minimize(problem.objective, problem.start(), "trust-exact", gtol=1e-8)
    assert res.success
    assert float(res.fun) < 1e-12


@pytest.mark.parametrize("method", ["trust-exact", "trust-ncg", "newton-cg"])
def test_float32_keeps_dtype_and_shape(method):
    """float32 problems through the float64 More-Sorensen iteration and through CG: the
    result keeps dtype and shape and meets a float32 tolerance."""
    from curvlab.minimize.problems import rosenbrock

    x0 = torch.tensor([[-1.2, 1.0]], dtype=torch.float32)
    res = minimize(lambda x: rosenbrock(x.reshape(-1)), x0, method, gtol=1e-3)
    assert res.success and res.x.dtype == torch.float32 and res.x.shape == (1, 2)
    torch.testing.assert_close(res.x, torch.ones(1, 2), atol=1e-2, rtol=0)
