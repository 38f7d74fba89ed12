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
   then truncate the step to stay feasible.
3. **Line search** along ``d = x_bar - x`` with the strong Wolfe conditions and the
   largest feasible step as ``alpha_max`` (the first trial step ``1``; on the first
   iteration ``min(1, 1 / ||d||)``); pairs with ``s^T y <= eps y^T y`` are skipped.

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

from curvlab.minimize.evaluator import Evaluator, Monitor
from curvlab.minimize.linesearch import LineFunction, strong_wolfe
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


class _Compact:
    """The last ``m`` pairs and the compact form ``B = theta I - W M W^T`` (host float64)."""

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.S = np.zeros((n, 0))
        self.Y = np.zeros((n, 0))
        self.theta = 1.0
        self.W = np.zeros((n, 0))
        self.M = np.zeros((0, 0))

    def push(self, s: np.ndarray, y: np.ndarray) -> bool:
        sy, yy = float(s @ y), float(y @ y)
        if not (sy > np.finfo(np.float64).eps * yy and math.isfinite(sy)):
            return False
        self.S = np.column_stack([self.S, s])[:, -self.m:]
        self.Y = np.column_stack([self.Y, y])[:, -self.m:]
        self.theta = yy / sy
        SY = self.S.T @ self.Y
        D = np.diag(np.diag(SY))
        L = np.tril(SY, -1)
        K = np.block([[-D, L.T], [L, self.theta * (self.S.T @ self.S)]])
        self.W = np.column_stack([self.Y, self.theta * self.S])
        try:
            self.M = np.linalg.inv(K)
        except np.linalg.LinAlgError:
            self.M = np.linalg.pinv(K)
        return True


def _cauchy(x, g, lb, ub, cp: _Compact):
    """Generalized Cauchy point (BLNZ Alg. CP): returns ``(xc, c)`` with ``c = W^T (xc -
    x)``, and the free mask at ``xc``."""
    n = x.size
    t = np.full(n, np.inf)
    neg, pos = g < 0, g > 0
    t[neg] = (x[neg] - ub[neg]) / g[neg]
    t[pos] = (x[pos] - lb[pos]) / g[pos]
    d = np.where(t > 0, -g, 0.0)
    W, M, theta = cp.W, cp.M, cp.theta
    p = W.T @ d
    c = np.zeros(W.shape[1])
    fp = -float(d @ d)
    fpp = -theta * fp - float(p @ (M @ p)) if W.shape[1] else -theta * fp
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
        Mc, Mp, Mw = (M @ c, M @ p, M @ wb) if W.shape[1] else (c, p, wb)
        fp = fp + dt * fpp + gb * gb + theta * gb * zb - gb * float(wb @ Mc)
        fpp = fpp - theta * gb * gb - 2.0 * gb * float(wb @ Mp) - gb * gb * float(wb @ Mw)
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
    """Direct primal subspace minimization (BLNZ Sec. 5.1) with truncation to the box."""
    free = (xc > lb) & (xc < ub)
    if not free.any():
        return xc
    theta, W, M = cp.theta, cp.W, cp.M
    if W.shape[1] == 0:
        r = g[free] + theta * (xc - x)[free]
        du = -r / theta
    else:
        r = (g + theta * (xc - x) - W @ (M @ c))[free]
        WF = W[free]
        v = M @ (WF.T @ r)
        N = np.eye(W.shape[1]) - (M @ (WF.T @ WF)) / theta
        try:
            v = np.linalg.solve(N, v)
        except np.linalg.LinAlgError:
            v = np.linalg.lstsq(N, v, rcond=None)[0]
        du = -r / theta - (WF @ v) / (theta * theta)
    xf = xc[free]
    with np.errstate(divide="ignore", invalid="ignore"):
        a_hi = np.where(du > 0, (ub[free] - xf) / du, np.inf)
        a_lo = np.where(du < 0, (lb[free] - xf) / du, np.inf)
    alpha = min(1.0, float(np.min(np.minimum(a_hi, a_lo))) if du.size else 1.0)
    xbar = xc.copy()
    xbar[free] = xf + max(alpha, 0.0) * du
    return np.minimum(np.maximum(xbar, lb), ub)


def lbfgsb(ev: Evaluator, x0: torch.Tensor, mon: Monitor, bounds: Any, *,
           history_size: int = 10, c1: float = 1e-4, c2: float = 0.9, ftol: float = 0.0
           ) -> OptimizeResult:
    """L-BFGS-B (see module doc). ``x0`` is projected onto the box first (as scipy does)."""
    lb, ub = parse_bounds(bounds, x0)
    dev, dt = x0.device, x0.dtype
    to_t = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
    to_h = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    x = to_t(np.minimum(np.maximum(to_h(x0), lb), ub))
    cp = _Compact(int(history_size), x.numel())
    f, g = ev.fg(x)
    xh, gh = to_h(x), to_h(g)

    def pgnorm(xh, gh) -> float:
        return float(np.max(np.abs(np.minimum(np.maximum(xh - gh, lb), ub) - xh))) \
            if xh.size else 0.0

    def done(status, extra="", test="pgtol"):
        res = mon.finish(x, f, g, status, extra, test=test if status == 0 else "gtol")
        res["projected_grad_norm"] = pgnorm(xh, gh)
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
        xc, c = _cauchy(xh, gh, lb, ub, cp)
        xbar = _subspace(xh, gh, xc, c, lb, ub, cp)
        d = xbar - xh
        dphi0 = float(gh @ d)
        if not dphi0 < 0 and cp.S.shape[1]:
            cp = _Compact(cp.m, cp.n)  # stale curvature pairs: restart from the gradient
            xc, c = _cauchy(xh, gh, lb, ub, cp)
            d = _subspace(xh, gh, xc, c, lb, ub, cp) - xh
            dphi0 = float(gh @ d)
        if not dphi0 < 0:
            return done(6, "No descent direction within the bounds.")
        with np.errstate(divide="ignore", invalid="ignore"):
            a_hi = np.where(d > 0, (ub - xh) / d, np.inf)
            a_lo = np.where(d < 0, (lb - xh) / d, np.inf)
        amax = max(float(np.min(np.minimum(a_hi, a_lo))), 1.0)
        dn = float(np.linalg.norm(d))
        alpha0 = min(1.0, 1.0 / dn) if cp.S.shape[1] == 0 and mon.nit == 0 else 1.0
        dt_ = to_t(d)
        ls = strong_wolfe(LineFunction(ev.fg, x, dt_), phi, dphi0, min(alpha0, amax),
                          c1=c1, c2=c2, alpha_max=amax)
        p = ls.point
        if p is None:
            return done(2, ls.message)
        mon.nit += 1
        xn = np.minimum(np.maximum(to_h(p.x), lb), ub)
        xt = to_t(xn)
        if not torch.equal(xt, p.x):  # rounding put it a hair outside: re-evaluate inside
            fn_, gn_ = ev.fg(xt)
        else:
            fn_, gn_ = p.f, p.g
        gnh = to_h(gn_)
        cp.push(xn - xh, gnh - gh)
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
        if not ls.success and p.alpha * dn <= 1e-15 * (1.0 + float(np.max(np.abs(xh)))):
            return done(2, ls.message)
