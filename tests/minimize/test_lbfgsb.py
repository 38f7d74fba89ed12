"""L-BFGS-B internals against dense references, badly scaled problems, and the scipy fields
of ``lbfgs`` (``hess_inv``, ``return_all``, ``maxls``)."""

from pathlib import Path

import numpy as np
import pytest
import scipy.optimize as so
import torch

from curvlab.minimize import minimize
from curvlab.minimize.lbfgsb import _cauchy, _Compact, _subspace
from curvlab.minimize.problems import load_nist
from curvlab.minimize.quasi_newton import LbfgsInvHessProduct

DATA = str(Path(__file__).parent / "data")  # public-domain NIST StRD files


def _dense_B(cp: _Compact) -> np.ndarray:
    """``B = theta I - W M W^T`` column by column through :meth:`_Compact.mv`."""
    n = cp.n
    return np.column_stack([cp.theta * np.eye(n)[:, j] - cp.W @ cp.mv(cp.W[j])
                            for j in range(n)])


def _bfgs_exact(S, Y, theta):
    """The BFGS recursion from ``theta I`` over the pairs in 60-digit arithmetic."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    B = mp.eye(S.shape[0]) * mp.mpf(theta)
    for s_, y_ in zip(S.T, Y.T, strict=True):
        s, y = mp.matrix(s_.tolist()), mp.matrix(y_.tolist())
        Bs = B * s
        B = B - (Bs * Bs.T) / (s.T * Bs)[0] + (y * y.T) / (y.T * s)[0]
    return np.array(B.tolist(), dtype=float)


def test_compact_form_keeps_the_small_curvature_of_a_badly_scaled_problem():
    # Misra1b-like: curvatures 1e11 and ~40 along a rotated valley, more pairs than n = 2
    # (S rank deficient). The explicit inverse of the middle matrix made B indefinite
    # (smallest eigenvalue -4e6 instead of 33); the Cholesky factors keep it.
    rng = np.random.default_rng(0)
    c, s_ = np.cos(1e-5), np.sin(1e-5)
    Q = np.array([[c, -s_], [s_, c]])
    cp = _Compact(10, 2)
    for i in range(6):
        A = Q @ np.diag([1e11 * (1 + 0.1 * i), 40.0 - i]) @ Q.T  # a changing Hessian
        s = rng.standard_normal(2) * np.array([1.0, 1e-5])
        y = A @ s
        assert cp.push(s, y, -abs(float(s @ y)))
    B = _dense_B(cp)
    exact = _bfgs_exact(cp.S, cp.Y, cp.theta)
    lam, lam_exact = np.linalg.eigvalsh(0.5 * (B + B.T)), np.linalg.eigvalsh(exact)
    assert lam[0] > 0
    np.testing.assert_allclose(lam, lam_exact, rtol=1e-6)


def _rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _model_path_reference(x, g, lb, ub, B):
    """The first local minimizer of ``m(z) = g^T (z - x) + (z - x)^T B (z - x) / 2`` along
    ``P(x - t g)``, segment by segment with dense algebra."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(g < 0, (x - ub) / g, np.where(g > 0, (x - lb) / g, np.inf))
    knots = np.unique(np.concatenate([[0.0], t[np.isfinite(t) & (t > 0)]]))
    knots = np.append(knots, np.inf)
    for a, b in zip(knots[:-1], knots[1:], strict=True):
        za = np.clip(x - a * g, lb, ub) - x
        d = np.where(t > a, -g, 0.0)
        fp, fpp = float(g @ d + za @ B @ d), float(d @ B @ d)
        if fp >= 0:
            return x + za
        ts = -fp / fpp if fpp > 0 else np.inf
        if ts < b - a:
            return x + za + ts * d
    return np.clip(x - knots[-2] * g, lb, ub)


@pytest.mark.parametrize("seed", range(5))
def test_cauchy_point_and_subspace_step_match_dense_references(seed):
    rng = np.random.default_rng(seed)
    n = 7
    A = rng.standard_normal((n, n))
    A = A @ A.T + 0.5 * np.eye(n)
    cp = _Compact(5, n)
    for _ in range(4):
        s = rng.standard_normal(n)
        cp.push(s, A @ s, -float(s @ A @ s))
    B = _dense_B(cp)
    x = rng.uniform(-1, 1, n)
    g = rng.standard_normal(n) * 3
    lb, ub = x - rng.uniform(0.05, 1.0, n), x + rng.uniform(0.05, 1.0, n)
    lb[0], ub[1] = -np.inf, np.inf
    xc, c = _cauchy(x, g, lb, ub, cp)
    np.testing.assert_allclose(xc, _model_path_reference(x, g, lb, ub, B), atol=1e-10)
    np.testing.assert_allclose(c, cp.W.T @ (xc - x), atol=1e-9)
    # subspace step: Newton step of the model on the variables free at xc, then projected
    free = (xc > lb) & (xc < ub)
    r = (g + B @ (xc - x))[free]
    du = -np.linalg.solve(B[np.ix_(free, free)], r)
    want = xc.copy()
    want[free] = np.clip(xc[free] + du, lb[free], ub[free])
    if float(g @ (want - x)) > 0:  # L-BFGS-B 3.0: truncate instead
        with np.errstate(divide="ignore"):
            steps = np.where(du > 0, (ub[free] - xc[free]) / du,
                             np.where(du < 0, (lb[free] - xc[free]) / du, np.inf))
        want[free] = xc[free] + min(1.0, steps.min()) * du
    np.testing.assert_allclose(_subspace(x, g, xc, c, lb, ub, cp), want, atol=1e-9)


def test_pairs_are_kept_when_the_objective_is_scaled():
    # L-BFGS is invariant to f -> c f (with gtol -> c gtol). BLNZ's skip test
    # s^T y > eps ||y||^2 is not: it drops every pair once the curvature exceeds 1 / eps
    # ~ 4.5e15 (steepest descent for thousands of iterations); L-BFGS-B's s^T y >
    # eps (-g^T s) keeps them
    x0 = torch.tensor([-1.2, 1.0, -0.5, 0.3], dtype=torch.float64)
    runs = [minimize(lambda x, c=c: c * _rosen(x), x0, "lbfgs", gtol=1e-6 * c, max_iter=500)
            for c in (1.0, 1e20)]
    assert all(r.success for r in runs), [r.message for r in runs]
    assert abs(runs[1].nit - runs[0].nit) <= 0.25 * runs[0].nit + 3, [r.nit for r in runs]
    np.testing.assert_allclose(runs[1].x.numpy(), runs[0].x.numpy(), atol=1e-5)
    # with bounds (the projected gradient is not scale-free: compare the iterates)
    box = (np.full(4, -2.0), np.full(4, 0.8))
    ref = minimize(_rosen, x0, "lbfgs", bounds=box)
    big = minimize(lambda x: 1e20 * _rosen(x), x0, "lbfgs", bounds=box, gtol=1e-300,
                   max_iter=80)
    assert ref.success  # big stops at the rounding level of f (line search), not before
    np.testing.assert_allclose(big.x.numpy(), ref.x.numpy(), atol=1e-5)


def _nist_objective(p):
    def f(b):
        r = p.residual(b)
        return 0.5 * torch.dot(r, r)
    return f


def test_misra1b_bounded_like_scipy():
    # boxed as in bench_minimize --bounded: the old explicit-inverse L-BFGS-B ran 5000
    # iterations here; scipy's L-BFGS-B takes 16
    p = load_nist(DATA, "Misra1b")
    c, s2 = np.array(p.certified), np.array(p.starts[1])
    lb, ub = np.minimum(s2, c) - np.abs(c), np.maximum(s2, c) + np.abs(c)
    ub[0] = c[0] - 0.01 * abs(c[0])
    res = minimize(_nist_objective(p), torch.tensor(s2), "lbfgs", bounds=(lb, ub),
                   max_iter=500)
    assert res.success and res.nit <= 60, (res.message, res.nit)
    assert res.x[0] == pytest.approx(ub[0])  # the cut bound is active


def test_misra1b_unbounded_restarts_after_a_stalled_line_search():
    # from NIST start 1 the line search stalls after 5 iterations with stale pairs; L-BFGS-B
    # forgets them and restarts from the gradient instead of stopping there
    p = load_nist(DATA, "Misra1b")
    res = minimize(_nist_objective(p), torch.tensor(p.starts[0], dtype=torch.float64),
                   "lbfgs", max_iter=2000)
    assert res.success, res.message
    np.testing.assert_allclose(res.x.numpy(), p.certified, rtol=1e-4)


def test_lbfgs_inv_hess_product_matches_scipy():
    rng = np.random.default_rng(1)
    n, k = 6, 4
    A = rng.standard_normal((n, n))
    A = A @ A.T + np.eye(n)
    sk = rng.standard_normal((k, n))
    yk = sk @ A
    ours = LbfgsInvHessProduct(list(torch.from_numpy(sk)), list(torch.from_numpy(yk)))
    ref = so.LbfgsInvHessProduct(sk, yk)
    v = rng.standard_normal(n)
    np.testing.assert_allclose(ours.todense().numpy(), ref.todense(), rtol=1e-12)
    out = ours.matvec(torch.from_numpy(v))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), ref.matvec(v), rtol=1e-12)
    assert isinstance(ours.matvec(v), np.ndarray)  # NumPy in, NumPy out
    np.testing.assert_allclose((ours @ torch.eye(n, dtype=torch.float64)).numpy(),
                               ref.todense(), rtol=1e-12)


def test_hess_inv_is_the_inverse_of_the_solvers_matrix():
    x0 = torch.zeros(4, dtype=torch.float64)
    # unbounded: H from gamma I over the stored pairs (the two-loop recursion's matrix)
    res = minimize(_rosen, x0, "lbfgs")
    H = res.hess_inv
    g = torch.randn(4, dtype=torch.float64)
    mem = res.memory
    from curvlab.minimize.quasi_newton import two_loop
    torch.testing.assert_close(H.matvec(g), two_loop(g, mem))
    # bounded: H is the inverse of the compact B = theta I - W M W^T of the last iterate
    res = minimize(_rosen, x0, "lbfgs", bounds=(np.full(4, -1.0), np.full(4, 0.7)))
    Hd = res.hess_inv.todense().numpy()
    S = torch.stack(list(res.hess_inv.sk)).numpy().T
    Y = torch.stack(list(res.hess_inv.yk)).numpy().T
    cp = _Compact(10, 4)
    for i in range(S.shape[1]):
        cp.push(S[:, i], Y[:, i], -1.0)
    np.testing.assert_allclose(Hd @ _dense_B(cp), np.eye(4), atol=1e-8)


def test_return_all_and_maxls():
    res = minimize(so.rosen, np.array([-1.2, 1.0]), method="L-BFGS-B", jac=so.rosen_der,
                   options={"return_all": True})
    assert len(res.allvecs) == res.nit + 1 and isinstance(res.allvecs[0], np.ndarray)
    np.testing.assert_allclose(res.allvecs[0], [-1.2, 1.0])
    np.testing.assert_allclose(res.allvecs[-1], res.x)
    ref = so.minimize(so.rosen, np.array([-1.2, 1.0]), method="BFGS", jac=so.rosen_der,
                      options={"return_all": True})
    ours = minimize(so.rosen, np.array([-1.2, 1.0]), method="BFGS", jac=so.rosen_der,
                    options={"return_all": True})
    assert len(ref.allvecs) == ref.nit + 1 and len(ours.allvecs) == ours.nit + 1
    assert isinstance(ours.hess_inv, np.ndarray)
    assert isinstance(res.hess_inv.todense(), np.ndarray)  # NumPy in, NumPy hess_inv
    # maxls caps the evaluations of each line search
    calls, per_iter = [0], []

    def f(x):
        calls[0] += 1
        return _rosen(x)

    def cb(intermediate_result):
        per_iter.append(calls[0])
        calls[0] = 0

    for bounds in (None, (np.full(2, -2.0), np.full(2, 2.0))):
        calls[0], per_iter[:] = 0, []
        res = minimize(f, torch.tensor([-1.2, 1.0], dtype=torch.float64), "lbfgs", maxls=3,
                       bounds=bounds, callback=cb)
        # a stalled search is retried once from the gradient: at most 2 searches per step
        assert res.nit > 5 and max(per_iter[1:]) <= 2 * 3 + 1, (res.message, per_iter)
    with pytest.raises(ValueError, match="maxls"):
        minimize(_rosen, torch.zeros(2, dtype=torch.float64), "lbfgs", maxls=0)
