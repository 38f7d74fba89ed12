"""Known-answer tests for curvlab.minimize: every method against references."""

import math

import numpy as np
import pytest
import scipy.optimize as so
import torch

from curvlab.minimize import METHODS, OptimizeResult, minimize
from curvlab.minimize.problems import logistic_regression, rosenbrock

ALL = sorted(METHODS)
SLOW_ON_ROSENBROCK = {"trust-cauchy"}  # Cauchy steps need ~1.7e4 iterations even at n=2
SLOW_ON_ROSENBROCK_100 = {"trust-cauchy", "gd", "momentum"}


@pytest.fixture(scope="module")
def logreg():
    """The problem and its optimum from an independent NumPy + scipy trust-exact solve."""
    p = logistic_regression()
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0, ddof=1)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    yX = (2.0 * y - 1.0)[:, None] * X
    lam, N = 1e-2, X.shape[0]

    def f(w):
        z = yX @ w
        return np.logaddexp(0, -z).mean() + 0.5 * lam * w @ w

    def g(w):
        s = 1.0 / (1.0 + np.exp(yX @ w))
        return -(yX * s[:, None]).mean(0) + lam * w

    def h(w):
        s = 1.0 / (1.0 + np.exp(yX @ w))
        return (yX * (s * (1 - s))[:, None]).T @ yX / N + lam * np.eye(len(w))

    r = so.minimize(f, np.zeros(X.shape[1]), jac=g, hess=h, method="trust-exact",
                    options=dict(gtol=1e-13))
    assert np.abs(g(r.x)).max() < 1e-10
    return p, float(r.fun)


def _check(res: OptimizeResult, fstar: float):
    assert res.success, res.message
    assert res.status == 0
    assert abs(float(res.fun) - fstar) < 1e-10
    assert res.grad_norm <= 1e-7


@pytest.mark.parametrize("method", [m for m in ALL if m not in SLOW_ON_ROSENBROCK])
def test_rosenbrock_2(method):
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    res = minimize(rosenbrock, x0, method, gtol=1e-7)
    _check(res, 0.0)
    torch.testing.assert_close(res.x, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [m for m in ALL if m not in SLOW_ON_ROSENBROCK_100])
def test_rosenbrock_100(method):
    # from x = 0 the Newton-type methods need ~200-450 iterations (benchmarks/ covers that)
    res = minimize(rosenbrock, torch.full((100,), 0.5, dtype=torch.float64), method, gtol=1e-7)
    _check(res, 0.0)


@pytest.mark.parametrize("method", ALL)
def test_logistic_regression(method, logreg):
    p, fstar = logreg
    res = minimize(p.objective, p.start(), method, gtol=1e-7)
    _check(res, fstar)


def test_newton_one_step_on_quadratic():
    torch.manual_seed(0)
    A = torch.randn(8, 8, dtype=torch.float64)
    A = A @ A.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    res = minimize(lambda x: 0.5 * x @ A @ x - b @ x, torch.zeros(8, dtype=torch.float64),
                   "newton", gtol=1e-9)
    assert res.success and res.nit == 1
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b))


def test_gd_exact_line_search_on_quadratic():
    A = torch.diag(torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64))
    res = minimize(lambda x: 0.5 * x @ A @ x, torch.ones(3, dtype=torch.float64), "gd",
                   line_search="exact", gtol=1e-10, history=True)
    assert res.success
    f = res.history["f"]
    # steepest descent with exact steps: Kantorovich bound (k-1)^2/(k+1)^2 per step
    kappa = 10.0
    bound = ((kappa - 1) / (kappa + 1)) ** 2
    assert all(b <= a * bound * (1 + 1e-9) for a, b in zip(f, f[1:], strict=False))


def test_float32_and_shape_preserved():
    x0 = torch.full((2, 3), 0.5, dtype=torch.float32)
    res = minimize(lambda x: ((x - 2.0) ** 2).sum(), x0, "lbfgs", gtol=1e-4)
    assert res.success and res.x.shape == (2, 3) and res.x.dtype == torch.float32
    torch.testing.assert_close(res.x, torch.full((2, 3), 2.0, dtype=torch.float32))


@pytest.mark.parametrize("method", ["bfgs", "newton-cg", "trust-exact", "gd"])
def test_user_supplied_derivatives(method):
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    counts = {"jac": 0, "hessp": 0, "hess": 0}

    def f(x):
        return 0.5 * x @ A @ x - b @ x

    def jac(x):
        counts["jac"] += 1
        return A @ x - b

    def hessp(x, p):
        counts["hessp"] += 1
        return A @ p

    def hess(x):
        counts["hess"] += 1
        return A

    kw = dict(jac=jac)
    if method == "newton-cg":
        kw["hessp"] = hessp
    if method == "trust-exact":
        kw["hess"] = hess
    res = minimize(f, torch.zeros(2, dtype=torch.float64), method, gtol=1e-9, **kw)
    assert res.success
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b))
    assert counts["jac"] == res.ngev
    if method == "newton-cg":
        assert counts["hessp"] == res.nhvp > 0
    if method == "trust-exact":
        assert counts["hess"] == res.nhess > 0


def test_jac_true_returns_value_and_grad():
    def fg(x):
        return ((x - 1) ** 2).sum(), 2 * (x - 1)

    res = minimize(fg, torch.zeros(3, dtype=torch.float64), "lbfgs", jac=True)
    assert res.success
    torch.testing.assert_close(res.x, torch.ones(3, dtype=torch.float64))


def test_counts_are_honest():
    calls = {"n": 0}

    def f(x):
        calls["n"] += 1
        return rosenbrock(x)

    for method in ("lbfgs", "newton-cg", "trust-ncg", "trust-exact", "newton"):
        calls["n"] = 0
        res = minimize(f, torch.tensor([-1.2, 1.0], dtype=torch.float64), method)
        assert res.nfev == calls["n"], method


def test_callback_can_stop_and_sees_iterates():
    seen = []

    def cb(r):
        seen.append(float(r.fun))
        return r.nit >= 3

    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "bfgs",
                   callback=cb)
    assert res.status == 5 and not res.success and res.nit == 3 and len(seen) == 3
    assert "callback" in res.message


def test_history_fields():
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "trust-ncg",
                   history=True)
    h = res.history
    assert len(h["f"]) == res.nit + 1
    assert h["grad_norm"][-1] == pytest.approx(res.grad_norm)
    assert all(math.isfinite(r) for r in h["radius"])
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "newton",
                   history=True)
    assert all(d > 0 for d in res.history["decrement"][1:])


def test_max_iter_failure_says_why():
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "lbfgs",
                   max_iter=3)
    assert not res.success and res.status == 1 and "Maximum number of iterations" in res.message
    assert res.grad_norm > 1e-5


def test_success_only_when_tolerance_holds():
    # float32: grad = 1e3 (exp(x) - c) cannot get below ~1e-4 unless exp rounds exactly
    c = torch.tensor([3.0, 5.0, 7.0], dtype=torch.float32)
    x0 = torch.zeros(3, dtype=torch.float32)
    res = minimize(lambda x: 1e3 * (torch.exp(x) - c * x).sum(), x0, "bfgs",
                   gtol=1e-12, max_iter=40)
    assert res.success == (res.grad_norm <= 1e-12)
    assert not res.success and res.status != 0


def test_non_finite_values_are_backtracked_away():
    # log barrier: f = +inf (nan from log of a negative) beyond x = 1
    def f(x):
        return -torch.log(1.0 - x).sum() + 10.0 * (x ** 2).sum() - 5.0 * x.sum()

    for method in ("gd", "lbfgs", "bfgs", "newton", "newton-cg", "trust-ncg", "trust-exact",
                   "nesterov", "momentum", "sr1", "dogleg"):
        res = minimize(f, torch.full((3,), 0.9, dtype=torch.float64), method, gtol=1e-8)
        assert res.success, (method, res.message)
        assert torch.isfinite(res.fun) and bool((res.x < 1).all())


def test_non_finite_start_reports_status():
    res = minimize(lambda x: torch.log(x).sum(), torch.tensor([-1.0], dtype=torch.float64),
                   "lbfgs")
    assert not res.success and res.status == 4


def test_indefinite_user_hessian_and_wrong_gradient():
    # an indefinite Hessian is made positive definite by the modified Cholesky
    res = minimize(lambda x: (x ** 2).sum(), torch.ones(2, dtype=torch.float64), "newton",
                   jac=lambda x: 2 * x, hess=lambda x: -torch.eye(2, dtype=torch.float64))
    assert res.success
    # a gradient of the wrong sign: every step increases f, the run fails and says why
    res = minimize(lambda x: (x ** 2).sum(), torch.ones(2, dtype=torch.float64), "bfgs",
                   jac=lambda x: -2 * x, max_iter=50)
    assert not res.success and res.status in (1, 2, 6)
    assert float(res.fun) <= 2.0 * (1 + 1e-9)


def test_gradient_clipping_still_converges():
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "nesterov",
                   clip=1.0, gtol=1e-6)
    assert res.success


def test_bad_input_errors():
    f = rosenbrock
    with pytest.raises(TypeError, match="x0"):
        minimize(f, "not a point")  # NumPy-likes are fine (scipy), strings are not
    with pytest.raises(TypeError, match="float32 or float64"):
        minimize(f, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="method"):
        minimize(f, torch.zeros(2), "nope")
    with pytest.raises(ValueError, match="gtol"):
        minimize(f, torch.zeros(2), gtol=0)
    with pytest.raises(TypeError, match="unknown option"):
        minimize(f, torch.zeros(2), "lbfgs", radius=3)
    with pytest.raises(ValueError, match="scalar"):
        minimize(lambda x: x, torch.zeros(2))


@pytest.mark.parametrize("method,options", [
    ("gd", dict(line_search="strong-wolfe")),
    ("momentum", dict(lr=2.0, beta=0.5)),
    ("nesterov", dict(lr=2.0)),
    ("lbfgs", dict(history_size=3, line_search="armijo")),
    ("newton-cg", dict(line_search="strong-wolfe", cg_max_iter=5)),
    ("trust-ncg", dict(initial_radius=0.1, max_radius=10.0, eta=0.1)),
])
def test_method_options(method, options, logreg):
    p, fstar = logreg
    res = minimize(p.objective, p.start(), method, gtol=1e-7, **options)
    _check(res, fstar)


def test_callback_stop_iteration():
    def cb(r):
        raise StopIteration

    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "trust-ncg",
                   callback=cb)
    assert res.status == 5 and res.nit == 1 and not res.success


def test_public_surface():
    import curvlab
    import curvlab.minimize.problems as P

    res = curvlab.minimize(P.rosenbrock, torch.zeros(2, dtype=torch.float64), "bfgs")
    assert isinstance(res, curvlab.OptimizeResult) and res.success
    assert callable(curvlab.least_squares)
    from curvlab.linalg import cg, modified_cholesky, steihaug_cg  # noqa: F401
    from curvlab.optim import LBFGS  # noqa: F401


@pytest.mark.parametrize("n", [7, 5000])
def test_two_loop_equals_dense_lbfgs_matrix(n):
    """H g from the two-loop recursion (NumPy Gram form for small n, torch loop for large
    n) equals the dense L-BFGS matrix built by BFGS updates of gamma I (N&W eq. 7.19)."""
    from curvlab.minimize.quasi_newton import LBFGSMemory, two_loop

    gen = torch.Generator().manual_seed(n)
    k = min(n, 6)
    mem = LBFGSMemory(4)
    pairs = []
    for _ in range(k):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = s + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        if mem.push(s, y, float(s @ y), float(y @ y)):
            pairs.append((s, y))
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    got = two_loop(g, mem)
    kept = pairs[-4:]
    if n > 100:  # dense n x n is too big: apply the updates to g implicitly via recursion
        ref = g.clone()
        alphas = []
        for s, y in reversed(kept):
            a = float(s @ ref) / float(y @ s)
            ref -= a * y
            alphas.append(a)
        ref *= mem.gamma
        for (s, y), a in zip(kept, reversed(alphas), strict=True):
            ref += (a - float(y @ ref) / float(y @ s)) * s
    else:
        H = mem.gamma * torch.eye(n, dtype=torch.float64)
        eye = torch.eye(n, dtype=torch.float64)
        for s, y in kept:
            r = 1.0 / float(y @ s)
            V = eye - r * torch.outer(y, s)
            H = V.T @ H @ V + r * torch.outer(s, s)
        ref = H @ g
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(two_loop(g, mem, -1.0), -ref, rtol=1e-10, atol=1e-12)


def test_two_loop_gram_cache_follows_the_memory():
    """The NumPy Gram cache (window moved through its buffers, oldest pairs dropped,
    memory cleared) gives the recursion of N&W Alg. 7.4 over the pairs currently held."""
    from curvlab.minimize.quasi_newton import LBFGSMemory, two_loop

    gen = torch.Generator().manual_seed(0)
    n = 5
    mem = LBFGSMemory(3)

    def reference(g):
        q, alphas = g.clone(), []
        for s, y, rho in zip(reversed(mem.s), reversed(mem.y), reversed(mem.rho),
                             strict=True):
            a = rho * float(s @ q)
            q -= a * y
            alphas.append(a)
        q *= mem.gamma
        for s, y, rho, a in zip(mem.s, mem.y, mem.rho, reversed(alphas), strict=True):
            q += (a - rho * float(y @ q)) * s
        return q

    for i in range(23):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = s + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        mem.push(s, y, float(s @ y), float(y @ y))
        if i == 11:
            mem.clear()
            continue
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(two_loop(g, mem), reference(g), rtol=1e-10, atol=1e-12)
    assert len(mem.s) == 3
