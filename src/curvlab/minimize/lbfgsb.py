"""L-BFGS-B: limited-memory BFGS with bound constraints ``lb <= x <= ub``.

Byrd, Lu, Nocedal & Zhu, "A limited memory algorithm for bound constrained optimization",
SIAM J. Sci. Comput. 16 (1995). With the compact representation ``B = theta I - W M W^T``,
``W = [Y, theta S]``, ``M = [[-D, L^T], [L, theta S^T S]]^{-1}`` (``D = diag(s_i^T y_i)``,
``L`` the strictly lower part of ``S^T Y``; Byrd, Nocedal & Schnabel 1994), every iteration:

1. **Generalized Cauchy point** (Sec. 4, Alg. CP): the first local minimizer of the
   quadratic model along the projected steepest-descent path ``P(x - t g)``, examined
   segment by segment between the breakpoints ``t_i`` where a variable hits its bound, with
   the derivatives ``f'``, ``f''`` updated in ``O(m)`` per breakpoint.
2. **Subspace minimization** (Sec. 5.1, direct primal method): minimize the model over the
   variables free at the Cauchy point (the reduced inverse by Sherman-Morrison-Woodbury),
   projected onto the box; truncated instead only when the projection is not a descent
   direction (L-BFGS-B 3.0, Morales & Nocedal 2011).
3. **Line search** along ``d = x_bar - x`` with the strong Wolfe conditions and the
   largest feasible step as ``alpha_max`` (the first trial step ``1``; on the first
   iteration, as L-BFGS-B, ``alpha_max = 1`` under bounds and the first trial ``1 / ||d||``
   unless every variable is boxed); pairs with ``s^T y <= eps (-g^T s)`` are skipped.
   A line search that cannot move forgets the pairs and retries from the gradient.

Numerics as in the L-BFGS-B code (Zhu, Byrd, Lu & Nocedal 1997; Morales & Nocedal 2011):
``M`` is never formed; its products and the subspace system use Cholesky factors of the
two positive definite blocks (:class:`_Saddle`). A failed factorization, like an ascent
direction from rounding, forgets the pairs.

Success: the projected gradient ``||P(x - g) - x||_inf <= gtol`` at the returned point
(scipy's ``pgtol``); ``ftol > 0`` adds scipy's relative-reduction test. The small dense
algebra (``2m x 2m``) and the breakpoint scan run in float64 NumPy on the host; the
objective, its gradient and the iterates stay on the tensor's device (GPU included).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.linalg import solve_triangular

from curvlab.minimize.evaluator import Evaluator, Monitor
from curvlab.minimize.linesearch import LineFunction, strong_wolfe
from curvlab.minimize.quasi_newton import LbfgsInvHessProduct, curvature_ok
from curvlab.minimize.result import OptimizeResult

__all__ = ["lbfgsb", "parse_bounds"]


def parse_bounds(bounds: Any, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(lb, ub)`` float64 arrays of ``x``'s size from scipy's forms: a sequence of ``(lo,
    hi)`` pairs (None is unbounded), ``scipy.optimize.Bounds``, or ``(lb, ub)`` with
    scalars, NumPy arrays or tensors (two Python sequences of two numbers each, ambiguous for
    ``n = 2``, are read as pairs, as scipy reads them)."""
    n = x.numel()

    def is_pair(b: Any) -> bool:  # arrays and tensors are (lb, ub) vectors, never pairs
        return isinstance(b, (list, tuple)) and len(b) == 2 and all(
            v is None or np.isscalar(v) or np.ndim(v) == 0 for v in b)

    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        pair = (bounds.lb, bounds.ub)
    elif isinstance(bounds, (list, tuple)) and len(bounds) == n and all(map(is_pair, bounds)):
        # scipy's form: one (lo, hi) pair per variable (this reading wins for n = 2)
        pair = ([-np.inf if b[0] is None else b[0] for b in bounds],
                [np.inf if b[1] is None else b[1] for b in bounds])
    elif isinstance(bounds, (list, tuple)) and len(bounds) == 2:
        pair = tuple(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b
                     for b in bounds)
    else:
        raise ValueError("bounds must be a sequence of (lo, hi) pairs, one per variable, "
                         f"scipy.optimize.Bounds or (lb, ub); got {bounds!r}")
    out = []
    for b, inf in zip(pair, (-np.inf, np.inf), strict=True):
        a = np.asarray(inf if b is None else b, dtype=np.float64)
        a = np.where(np.isnan(a), inf, a)
        out.append(np.broadcast_to(a.reshape(-1) if a.ndim else a, (n,)).astype(np.float64))
    lb, ub = out
    if np.any(lb > ub):
        raise ValueError("bounds: every lower bound must be <= its upper bound")
    return lb, ub


class _Saddle:
    """Solves ``[[-P, Q^T], [Q, R]] z = b`` for ``P`` symmetric positive definite and a
    positive definite Schur complement ``R + Q P^{-1} Q^T``, by the two Cholesky factors
    ``P = L1 L1^T`` and ``R + E E^T = L2 L2^T`` (``E = Q L1^{-T}``); the ``LEL^T`` form of
    L-BFGS-B's ``formt``/``bmv`` and ``formk`` (Zhu, Byrd, Lu & Nocedal 1997). The
    explicit inverse of this indefinite matrix loses the small curvatures of a badly
    scaled problem (relative errors ``1e-2`` in ``B`` at ``theta ~ 1e11``, an indefinite
    ``B``); the triangular solves keep them. Raises ``LinAlgError`` when a factor is not
    positive definite."""

    def __init__(self, P: np.ndarray, Q: np.ndarray, R: np.ndarray) -> None:
        self.k = P.shape[0]
        self.L1 = np.linalg.cholesky(P)
        self.E = solve_triangular(self.L1, Q.T, lower=True).T
        self.L2 = np.linalg.cholesky(R + self.E @ self.E.T)

    def solve(self, b: np.ndarray) -> np.ndarray:
        k = self.k
        if k == 0:
            return b.copy()
        b1, b2 = b[:k], b[k:]
        u = solve_triangular(self.L1, b1, lower=True)  # L1^{-1} b1
        z2 = solve_triangular(self.L2, b2 + self.E @ u, lower=True)
        z2 = solve_triangular(self.L2, z2, lower=True, trans="T")
        z1 = solve_triangular(self.L1, self.E.T @ z2 - u, lower=True, trans="T")
        return np.concatenate([z1, z2])


class _Compact:
    """The last ``m`` pairs and the compact form ``B = theta I - W M W^T`` (host float64).
    ``M = K^{-1}``, ``K = [[-D, L^T], [L, theta S^T S]]``, is applied by :meth:`mv` through
    the factors of ``K`` (:class:`_Saddle`), never formed."""

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.S = np.zeros((n, 0))
        self.Y = np.zeros((n, 0))
        self.theta = 1.0
        self.W = np.zeros((n, 0))
        self.K: _Saddle | None = None

    @property
    def k(self) -> int:
        return self.S.shape[1]

    def push(self, s: np.ndarray, y: np.ndarray, gs: float) -> bool:
        """Store a pair if :func:`~curvlab.minimize.quasi_newton.curvature_ok` (``s^T y >
        eps (-g^T s)``, L-BFGS-B's test); returns whether it was stored. Raises
        ``LinAlgError`` when ``K`` cannot be factored (the caller forgets the pairs, as
        L-BFGS-B does)."""
        sy, yy = float(s @ y), float(y @ y)
        if not curvature_ok(sy, yy, gs, float(np.finfo(np.float64).eps)):
            return False
        self.S = np.column_stack([self.S, s])[:, -self.m:]
        self.Y = np.column_stack([self.Y, y])[:, -self.m:]
        self.theta = yy / sy
        SY = self.S.T @ self.Y
        self.W = np.column_stack([self.Y, self.theta * self.S])
        self.K = _Saddle(np.diag(np.diag(SY)), np.tril(SY, -1),
                         self.theta * (self.S.T @ self.S))
        return True

    def mv(self, v: np.ndarray) -> np.ndarray:
        """``M v``."""
        return v.copy() if self.K is None else self.K.solve(v)


def _cauchy(x, g, lb, ub, cp: _Compact):
    """Generalized Cauchy point (BLNZ Alg. CP): returns ``(xc, c)`` with ``c = W^T (xc -
    x)``. ``M`` products go through :meth:`_Compact.mv` (one per breakpoint: ``w_b^T M c
    = c^T M w_b`` by symmetry); the segment curvature is kept ``>= eps f''_0`` (L-BFGS-B
    3.0's floor against ``0 / 0`` from rounding)."""
    n = x.size
    t = np.full(n, np.inf)
    neg, pos = g < 0, g > 0
    t[neg] = (x[neg] - ub[neg]) / g[neg]
    t[pos] = (x[pos] - lb[pos]) / g[pos]
    d = np.where(t > 0, -g, 0.0)
    W, theta = cp.W, cp.theta
    p = W.T @ d
    c = np.zeros(W.shape[1])
    fp = -float(d @ d)
    fpp = -theta * fp - float(p @ cp.mv(p))
    fpp0 = fpp
    xc = x.copy()
    if fp == 0:
        return xc, c
    dt_min = -fp / fpp if fpp > 0 else np.inf
    order = [i for i in np.argsort(t) if 0 < t[i] < np.inf]
    t_old = 0.0
    k = 0
    while k < len(order):
        b = order[k]
        dt = t[b] - t_old
        if dt_min < dt:
            break
        xc[b] = ub[b] if d[b] > 0 else lb[b]
        zb = xc[b] - x[b]
        c = c + dt * p
        gb = g[b]
        wb = W[b]
        v = cp.mv(wb)
        fp = fp + dt * fpp + gb * gb + theta * gb * zb - gb * float(c @ v)
        fpp = fpp - theta * gb * gb - 2.0 * gb * float(p @ v) - gb * gb * float(wb @ v)
        fpp = max(np.finfo(np.float64).eps * fpp0, fpp)
        p = p + gb * wb
        d[b] = 0.0
        t_old = t[b]
        k += 1
        if fp >= 0:
            dt_min = 0.0
            break
        dt_min = -fp / fpp if fpp > 0 else np.inf
    dt_min = max(dt_min, 0.0)
    if not math.isfinite(dt_min):  # the model is unbounded along the path: go to its end
        dt_min = 0.0 if k >= len(order) else t[order[k]] - t_old
    t_old += dt_min
    rest = d != 0
    xc[rest] = x[rest] + t_old * d[rest]
    c = c + dt_min * p
    return np.minimum(np.maximum(xc, lb), ub), c


def _subspace(x, g, xc, c, lb, ub, cp: _Compact):
    """Direct primal subspace minimization (BLNZ Sec. 5.1) over the variables free at
    ``xc``: ``du = -B_F^{-1} r`` with ``B_F^{-1} = I / theta + W_F K_F^{-1} W_F^T /
    theta^2`` (Sherman-Morrison-Woodbury), ``K_F = K - W_F^T W_F / theta = [[-D - Y_F^T Y_F
    / theta, L^T - Y_F^T S_F], [L - S_F^T Y_F, theta S_A^T S_A]]`` factored as in
    L-BFGS-B's ``formk`` (:class:`_Saddle`; ``A`` the variables at a bound). Then L-BFGS-B
    3.0's rule (Morales & Nocedal 2011): project ``xc + du`` onto the box; only if a bound
    was hit and the projected point is not a descent direction from ``x`` truncate ``du``
    to the box instead (BLNZ's backtracking). Raises ``LinAlgError`` when ``K_F`` cannot be
    factored."""
    free = (xc > lb) & (xc < ub)
    if not free.any():
        return xc
    theta, W = cp.theta, cp.W
    r = (g + theta * (xc - x) - W @ cp.mv(c))[free]
    if cp.k == 0:
        du = -r / theta
    else:
        SF, YF, SA = cp.S[free], cp.Y[free], cp.S[~free]
        SY = cp.S.T @ cp.Y
        KF = _Saddle(np.diag(np.diag(SY)) + (YF.T @ YF) / theta, np.tril(SY, -1) - SF.T @ YF,
                     theta * (SA.T @ SA))
        WF = W[free]
        du = -r / theta - (WF @ KF.solve(WF.T @ r)) / (theta * theta)
    xf, lf, uf = xc[free], lb[free], ub[free]
    proj = np.minimum(np.maximum(xf + du, lf), uf)
    xbar = xc.copy()
    xbar[free] = proj
    if not np.any((proj == lf) | (proj == uf)) or float(g @ (xbar - x)) <= 0:
        return xbar
    with np.errstate(divide="ignore", invalid="ignore"):
        a_hi = np.where(du > 0, (uf - xf) / du, np.inf)
        a_lo = np.where(du < 0, (lf - xf) / du, np.inf)
    alpha = min(1.0, float(np.min(np.minimum(a_hi, a_lo))))
    xbar[free] = xf + max(alpha, 0.0) * du
    return np.minimum(np.maximum(xbar, lb), ub)


def lbfgsb(ev: Evaluator, x0: torch.Tensor, mon: Monitor, bounds: Any, *,
           history_size: int = 10, c1: float = 1e-4, c2: float = 0.9, ftol: float = 0.0,
           maxls: int = 20) -> OptimizeResult:
    """L-BFGS-B (see module doc). ``x0`` is projected onto the box first (as scipy does)."""
    lb, ub = parse_bounds(bounds, x0)
    dev, dt = x0.device, x0.dtype
    to_t = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
    to_h = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    x = to_t(np.minimum(np.maximum(to_h(x0), lb), ub))
    constrained = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    boxed = bool(np.isfinite(lb).all() and np.isfinite(ub).all())
    cp = _Compact(int(history_size), x.numel())
    f, g = ev.fg(x)
    xh, gh = to_h(x), to_h(g)

    def pgnorm(xh, gh) -> float:
        return float(np.max(np.abs(np.minimum(np.maximum(xh - gh, lb), ub) - xh))) \
            if xh.size else 0.0

    def done(status, extra="", test="pgtol"):
        res = mon.finish(x, f, g, status, extra, test=test if status == 0 else "gtol")
        res["projected_grad_norm"] = pgnorm(xh, gh)
        res["hess_inv"] = LbfgsInvHessProduct(list(torch.from_numpy(cp.S.T.copy())),
                                              list(torch.from_numpy(cp.Y.T.copy())),
                                              1.0 / cp.theta)
        return res

    if not (math.isfinite(f.item()) and np.all(np.isfinite(gh))):
        return done(4, "At the starting point.")
    phi = float(f)
    mon.record(phi, pgnorm(xh, gh))
    while True:
        pg = pgnorm(xh, gh)
        if pg <= mon.gtol:
            return done(0)
        if mon.nit >= mon.max_iter:
            return done(1)
        d = None
        if cp.k:
            try:
                xc, c = _cauchy(xh, gh, lb, ub, cp)
                d = _subspace(xh, gh, xc, c, lb, ub, cp) - xh
            except np.linalg.LinAlgError:  # K_F not positive definite: forget the pairs
                d = None
            if d is not None and not float(gh @ d) < 0:
                d = None  # stale curvature pairs (ascent by rounding): forget them
            if d is None:
                cp = _Compact(cp.m, cp.n)
        if d is None:
            xc, c = _cauchy(xh, gh, lb, ub, cp)
            d = _subspace(xh, gh, xc, c, lb, ub, cp) - xh
        dphi0 = float(gh @ d)
        if not dphi0 < 0:
            return done(6, "No descent direction within the bounds.")
        dn = float(np.linalg.norm(d))
        if mon.nit == 0:
            # L-BFGS-B's first step: at most 1 with bounds, and 1 / ||d|| unless every
            # variable is boxed (the Cauchy step is then bounded by the box)
            amax = 1.0 if constrained else 1e10
            alpha0 = 1.0 if boxed else min(1.0 / dn, amax)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                a_hi = np.where(d > 0, (ub - xh) / d, np.inf)
                a_lo = np.where(d < 0, (lb - xh) / d, np.inf)
            amax = min(max(float(np.min(np.minimum(a_hi, a_lo))), 1.0), 1e10)
            alpha0 = 1.0
        dt_ = to_t(d)
        ls = strong_wolfe(LineFunction(ev.fg, x, dt_), phi, dphi0, min(alpha0, amax),
                          c1=c1, c2=c2, alpha_max=amax, max_evals=maxls)
        p = ls.point
        if p is None or (not ls.success and p.alpha * dn <= 1e-15 * (
                1.0 + float(np.max(np.abs(xh))))):
            if cp.k:  # L-BFGS-B: stay at x, forget the pairs and retry from the gradient
                cp = _Compact(cp.m, cp.n)
                continue
            return done(2, ls.message)
        mon.nit += 1
        xn = np.minimum(np.maximum(to_h(p.x), lb), ub)
        xt = to_t(xn)
        if not torch.equal(xt, p.x):  # rounding put it a hair outside: re-evaluate inside
            fn_, gn_ = ev.fg(xt)
        else:
            fn_, gn_ = p.f, p.g
        gnh = to_h(gn_)
        try:
            cp.push(xn - xh, gnh - gh, float(gh @ (xn - xh)))
        except np.linalg.LinAlgError:  # K not positive definite: forget the pairs
            cp = _Compact(cp.m, cp.n)
        phi_old = phi
        x, f, g, xh, gh, phi = xt, fn_, gn_, xn, gnh, float(fn_)
        mon.record(phi, pgnorm(xh, gh), step=p.alpha)
        if mon.stop_requested(x, f, g):
            return done(5)
        if not math.isfinite(phi):
            return done(4)
        if ftol > 0 and pgnorm(xh, gh) > mon.gtol and (phi_old - phi) <= ftol * max(
                abs(phi_old), abs(phi), 1.0):
            return done(0, test="ftol_rel")
