"""scipy.optimize's own minimize tests that apply to curvlab (ported, scipy's tolerances),
the robustness rules (no exception from inside a solver, never worse than x0, no repeated
evaluation) and scipy's calling conventions (NumPy in/out, options, callbacks, fields)."""

import numpy as np
import pytest
import scipy.optimize as so
import torch

from curvlab.minimize import METHODS, minimize
from curvlab.minimize.problems import rosenbrock
from curvlab.minimize.trust_region import MoreSorensen, solve_exact

F = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 0, 0]], dtype=np.float64)
K = np.array([1.0, 0.3, 0.5])
SOLUTION = np.array([0.0, -0.524869316, 0.487525860])


class Entropy:
    """scipy's CheckOptimize problem (maximum entropy, Berger et al. 1996), counting calls
    and recording every point passed to ``func``; NumPy or torch."""

    def __init__(self, torch_mode=False):
        self.funccalls = self.gradcalls = 0
        self.trace = []
        self.torch_mode = torch_mode

    def func(self, x):
        self.funccalls += 1
        if self.torch_mode:
            self.trace.append(x.detach().clone().numpy())
            Ft, Kt = torch.from_numpy(F), torch.from_numpy(K)
            return torch.logsumexp(Ft @ x, 0) - Kt @ x
        self.trace.append(np.copy(x))
        log_pdot = F @ x
        return np.log(np.sum(np.exp(log_pdot))) - K @ x

    def grad(self, x):
        self.gradcalls += 1
        log_pdot = F @ x
        p = np.exp(log_pdot - np.log(np.sum(np.exp(log_pdot))))
        return F.T @ p - K


ALL = sorted(METHODS)


@pytest.mark.parametrize("method", ALL)
def test_no_increase(method):
    # scipy's test_no_increase: a wrong gradient makes line searches fail; the returned
    # point must not be worse than x0 and fun must be f at the returned x
    def func(x):
        return ((x - 1) ** 2).sum()

    def bad_grad(x):
        return 2 * (x - 1) * (-1) - 2

    x0 = torch.tensor([2.0], dtype=torch.float64)
    res = minimize(func, x0, method, jac=bad_grad, options={"maxiter": 20})
    assert float(func(res.x)) == float(res.fun)
    assert float(res.fun) <= float(func(x0))


@pytest.mark.parametrize("method", ALL)
def test_duplicate_evaluations(method):
    # scipy's test_duplicate_evaluations, torch objective (autodiff derivatives)
    prob = Entropy(torch_mode=True)
    minimize(prob.func, torch.zeros(3, dtype=torch.float64), method)
    for a, b in zip(prob.trace, prob.trace[1:]):
        assert not np.array_equal(a, b), f"duplicate evaluation by {method}"


@pytest.mark.parametrize("method", ALL)
def test_unbounded_below_ends_with_a_status(method):
    res = minimize(lambda x: -torch.exp(-x).sum(), torch.zeros(2, dtype=torch.float64),
                   method, max_iter=3000)
    assert not res.success and res.status != 0


@pytest.mark.parametrize("method", ["trust-exact", "dogleg", "newton", "sr1", "trust-ncg"])
def test_nondifferentiable_point_zero_tensor(method):
    # |x| has an efficient ZeroTensor Hessian; trust-exact used to crash converting it
    res = minimize(lambda x: x.abs().sum(), torch.ones(2, dtype=torch.float64), method)
    assert isinstance(res.status, int) and float(res.fun) <= 2.0


def test_minimize_l_bfgs_b_entropy():
    # scipy's test_minimize_l_bfgs_b: exact gradient, njev = gradient calls; finite
    # differences ('2-point', '3-point') count every function call in nfev
    prob = Entropy()
    r = minimize(prob.func, np.zeros(3), "L-BFGS-B", jac=prob.grad, options={"maxiter": 1000})
    np.testing.assert_allclose(prob.func(r.x), prob.func(SOLUTION), atol=1e-6)
    assert prob.gradcalls == r.njev and isinstance(r.x, np.ndarray)
    for jac in (None, "3-point"):
        prob = Entropy()
        ra = minimize(prob.func, np.zeros(3), "L-BFGS-B", jac=jac, options={"maxiter": 1000})
        assert prob.funccalls == ra.nfev
        np.testing.assert_allclose(prob.func(ra.x), prob.func(SOLUTION), atol=1e-6)


def _fun(x, p=2.0):
    return 1.0 / p * (x[0] ** p + x[1] ** p)


def _jac(x, p=2.0):
    return x ** (p - 1)


def test_minimize_l_bfgs_b_bounds():
    # scipy's TestLBFGSBBounds
    bounds = ((1, None), (None, None))
    res = minimize(_fun, [0, -1], method="L-BFGS-B", jac=_jac, bounds=bounds)
    assert res["success"], res["message"]
    np.testing.assert_allclose(res.x, (1, 0), atol=1e-6)
    for jac in ("2-point", "3-point", None):
        for args in ((2.0,), ()):
            res = minimize(_fun, [0, -1], args=args, method="L-BFGS-B", jac=jac,
                           bounds=bounds)
            assert res["success"], res["message"]
            np.testing.assert_allclose(res.x, (1, 0), atol=1e-6)


@pytest.mark.parametrize("bounds", [[(10, 1), (1, 10)], [(1, 10), (10, 1)],
                                    [(10, 1), (10, 1)]])
def test_minimize_l_bfgs_b_incorrect_bounds(bounds):
    with pytest.raises(ValueError, match=".*bound.*"):
        minimize(_fun, [0, -1], method="L-BFGS-B", jac=_jac, bounds=bounds)


def test_minimize_with_scalar():
    res = minimize(lambda x: np.sum(x ** 2), 17, bounds=[(-100, 100)], method="l-bfgs-b")
    assert res.success
    np.testing.assert_allclose(res.x, [0.0], atol=1e-5)


def test_l_bfgs_b_maxiter_and_callback():
    # scipy's test_minimize_l_bfgs_b maxiter/callback check
    seen = []

    def cb(intermediate_result):
        seen.append((intermediate_result.x, intermediate_result.fun))

    res = minimize(so.rosen, [0.0, 0.0], method="l-bfgs-b", callback=cb,
                   options={"maxiter": 5})
    assert res.nit == 5 and res.status == 1 and res.success is False
    np.testing.assert_allclose(res.x, seen[-1][0])
    np.testing.assert_allclose(res.fun, seen[-1][1])


def test_lbfgsb_matches_scipy_on_bounded_rosenbrock():
    n = 10
    lb, ub = np.full(n, -2.0), np.full(n, 0.8)
    x0 = torch.full((n,), -1.2, dtype=torch.float64)
    ours = minimize(rosenbrock, x0, "L-BFGS-B", bounds=(lb, ub))
    ref = so.minimize(so.rosen, x0.numpy(), jac=so.rosen_der, method="L-BFGS-B",
                      bounds=list(zip(lb, ub)), options=dict(ftol=1e-15, gtol=1e-8))
    assert ours.success and ours.projected_grad_norm <= 1e-5
    np.testing.assert_allclose(ours.x.numpy(), ref.x, atol=1e-5)


def test_scipy_user_script_runs_unchanged():
    seen, legacy = [], []
    res = minimize(so.rosen, np.array([-1.2, 1.0]), method="BFGS", jac=so.rosen_der,
                   tol=1e-8, options={"maxiter": 500, "disp": False},
                   callback=lambda intermediate_result: seen.append(intermediate_result.fun))
    assert isinstance(res.x, np.ndarray) and isinstance(res.fun, float)
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-6)
    assert res.njev >= 1 and res.nhev == 0 and isinstance(res.hess_inv, np.ndarray)
    assert isinstance(res.jac, np.ndarray) and seen and isinstance(seen[0], float)
    for method in ("CG", "L-BFGS-B", "trust-krylov", "Newton-CG", "trust-exact"):
        kw = dict(hess=so.rosen_hess) if method in ("trust-krylov", "Newton-CG",
                                                    "trust-exact") else {}
        r = minimize(so.rosen, np.array([-1.2, 1.0]), method=method, jac=so.rosen_der,
                     callback=lambda xk: legacy.append(xk), **kw)
        assert r.success, (method, r.message)
        np.testing.assert_allclose(r.x, [1.0, 1.0], atol=1e-4)
    assert isinstance(legacy[0], np.ndarray)
    with pytest.raises(ValueError, match="Nelder-Mead|method"):
        minimize(so.rosen, np.zeros(2), method="Nelder-Mead")


def test_newton_cg_without_hessian_uses_finite_differences_of_the_gradient_as_scipy():
    """scipy's Newton-CG approximates ``H p`` by ``(g(x + eps p) - g(x)) / eps`` when neither
    ``hess`` nor ``hessp`` is given; curvlab refused the NumPy call. The other second-order
    methods need them in both libraries."""
    x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2])
    ours = minimize(so.rosen, x0, method="Newton-CG", jac=so.rosen_der)
    theirs = so.minimize(so.rosen, x0, method="Newton-CG", jac=so.rosen_der)
    assert ours.success and theirs.success  # scipy stops on its xtol, ~3e-4 from 1
    np.testing.assert_allclose(theirs.x, np.ones(5), atol=1e-3)
    np.testing.assert_allclose(ours.x, np.ones(5), atol=1e-6)
    shifted = minimize(lambda x, a: float(((x - a) ** 2).sum()), np.zeros(3), args=(2.0,),
                       method="Newton-CG", jac=lambda x, a: 2 * (x - a), options={"eps": 1e-6})
    np.testing.assert_allclose(shifted.x, [2.0, 2.0, 2.0], atol=1e-6)
    with pytest.raises(ValueError, match="hess= or hessp="):
        minimize(so.rosen, x0, method="trust-ncg", jac=so.rosen_der)


def test_max_nfev_budget():
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "lbfgs",
                   max_nfev=15)
    assert res.status == 7 and not res.success and res.nfev <= 15
    assert float(rosenbrock(res.x)) == float(res.fun)
    # a NumPy function without jac: the finite-difference evaluations count, as scipy's
    # maxfun (they did not: maxfun=20 reported nfev=80 after 16 iterations; scipy 24 after 4)
    x0 = np.array([-1.2, 1.0, 0.5])
    ours = minimize(so.rosen, x0, method="L-BFGS-B", options={"maxfun": 20})
    theirs = so.minimize(so.rosen, x0, method="L-BFGS-B", options={"maxfun": 20})
    assert ours.status == 7 and ours.nfev <= 20 <= theirs.nfev <= 20 + 4
    assert abs(ours.nit - theirs.nit) <= 1


@pytest.mark.parametrize("method", ["cg", "lbfgs", "bfgs", "gd", "nesterov", "trust-ncg"])
def test_float32_paths(method):
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0]), method, gtol=1e-3, max_iter=50000)
    assert res.x.dtype == torch.float32 and res.success, res.message
    torch.testing.assert_close(res.x, torch.ones(2), atol=2e-2, rtol=0)


def test_lbfgsb_float32_and_tensor_bounds():
    x0 = torch.full((5,), 3.0)
    res = minimize(rosenbrock, x0, "lbfgs", bounds=(torch.zeros(5), torch.full((5,), 0.5)),
                   gtol=1e-4)
    assert res.success and res.x.dtype == torch.float32
    assert bool((res.x >= 0).all() and (res.x <= 0.5).all())


def test_cg_matches_scipy_on_rosenbrock():
    ours = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "cg")
    ref = so.minimize(so.rosen, [-1.2, 1.0], jac=so.rosen_der, method="CG")
    assert ours.success
    np.testing.assert_allclose(ours.x.numpy(), ref.x, atol=1e-4)


def _model(g, H, p):
    return float(g @ p + 0.5 * p @ (H @ p))


def test_trust_exact_subproblem_scipy_cases():
    # scipy's test_trustregion_exact cases: easy case, hard case, interior, zero gradient
    H = torch.tensor([[10, 2, 3, 4], [2, 1, 7, 1], [3, 7, 1, 7], [4, 1, 7, 2]],
                     dtype=torch.float64)
    g = torch.ones(4, dtype=torch.float64)
    p, _, hit = solve_exact(g, H, 1.0, rtol=1e-10)
    np.testing.assert_array_almost_equal(p.numpy(), [0.00393332, -0.55260862, 0.67065477,
                                                     -0.49480341])
    assert hit
    g_hard = torch.tensor([6.4852641521327437, 1, 1, 1], dtype=torch.float64)
    lam1 = float(torch.linalg.eigvalsh(H)[0])
    assert lam1 == pytest.approx(-8.2151519874416614)
    for solver in (lambda: solve_exact(g_hard, H, 1.0), lambda: MoreSorensen(
            g_hard, H, k_easy=1e-10, k_hard=1e-10)(1.0)):
        p, m, hit = solver()
        # the hard case: lambda = -lambda_1 and ||p|| = radius; the model value is optimal
        assert hit and float(p.norm()) == pytest.approx(1.0, abs=1e-6)
        p_ex = solve_exact(g_hard, H, 1.0, rtol=1e-12)[0]
        assert _model(g_hard, H, p) <= _model(g_hard, H, p_ex) + 1e-8
    H5 = torch.tensor([[1.812159, 0.82687265, 0.21838879, -0.52487006, 0.25436988],
                       [0.82687265, 2.66380283, 0.31508988, -0.40144163, 0.08811588],
                       [0.21838879, 0.31508988, 2.38020726, -0.3166346, 0.27363867],
                       [-0.52487006, -0.40144163, -0.3166346, 1.61927182, -0.42140166],
                       [0.25436988, 0.08811588, 0.27363867, -0.42140166, 1.33243101]],
                      dtype=torch.float64)
    g5 = torch.tensor([0.75798952, 0.01421945, 0.33847612, 0.83725004, -0.47909534],
                      dtype=torch.float64)
    p, _, hit = MoreSorensen(g5, H5)(1.1)
    np.testing.assert_array_almost_equal(p.numpy(), [-0.68585435, 0.1222621, -0.22090999,
                                                     -0.67005053, 0.31586769])
    assert not hit
    Hz = torch.tensor([[0.88547534, 2.90692271, 0.98440885, -0.78911503, -0.28035809],
                       [2.90692271, -0.04618819, 0.32867263, -0.83737945, 0.17116396],
                       [0.98440885, 0.32867263, -0.87355957, -0.06521957, -1.43030957],
                       [-0.78911503, -0.83737945, -0.06521957, -1.645709, -0.33887298],
                       [-0.28035809, 0.17116396, -1.43030957, -0.33887298, -1.68586978]],
                      dtype=torch.float64)
    expected = np.array([0.06910534, -0.01432721, -0.65311947, -0.23815972, -0.84954934])
    for gz in ([0, 0, 0, 0, 0], [0, 0, 0, 0, 1e-15]):
        gz = torch.tensor(gz, dtype=torch.float64)
        p, _, hit = solve_exact(gz, Hz, 1.1)
        assert hit  # the lowest eigenvector (either sign) scaled to the boundary
        np.testing.assert_array_almost_equal(np.abs(p.numpy()), np.abs(expected))


def test_lbfgs_optimizer_closure_without_backward():
    from curvlab.optim import LBFGS

    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LBFGS([w])
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: (w ** 2).sum())


def test_nesterov_no_repeated_point():
    xs = []

    def f(x):
        xs.append(x.detach().clone())
        return ((x - 3.0) ** 2).sum() + 0.1 * (x ** 4).sum()

    minimize(f, torch.zeros(4, dtype=torch.float64), "nesterov")
    assert all(not torch.equal(a, b) for a, b in zip(xs, xs[1:]))


def test_bounds_arrays_are_lower_upper_vectors_for_n2():
    # (lb, ub) NumPy arrays of length 2 must not be read as two (lo, hi) pairs
    lb, ub = np.array([-2.0, -2.0]), np.array([0.5, 2.0])
    res = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), "lbfgs",
                   bounds=(lb, ub))
    ref = so.minimize(so.rosen, [-1.2, 1.0], jac=so.rosen_der, method="L-BFGS-B",
                      bounds=list(zip(lb, ub)))
    assert res.success
    np.testing.assert_allclose(res.x.numpy(), ref.x, atol=1e-4)
