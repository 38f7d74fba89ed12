"""Quasi-Newton methods (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Ch. 6-7).

With ``s = x_{k+1} - x_k`` and ``y = g_{k+1} - g_k``:

* :func:`bfgs` -- N&W Alg. 6.1: ``d = -H g``, strong Wolfe line search (``c1 = 1e-4``,
  ``c2 = 0.9``), inverse update ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T``
  (eq. 6.17, ``rho = 1 / y^T s``), ``H_0 = (y^T s / y^T y) I`` before the first update
  (eq. 6.20). Dense ``n x n``.
* :func:`lbfgs` -- N&W Alg. 7.5 with the two-loop recursion (Alg. 7.4) over the last
  ``history_size`` pairs and ``H_0 = gamma I``, ``gamma = s^T y / y^T y`` (eq. 7.20); pairs
  with ``y^T s <= eps (-g^T s)`` are skipped (:func:`curvature_ok`). The memory can be
  carried across calls (:class:`LBFGSMemory`), which :class:`curvlab.optim.LBFGS` uses.
* :func:`sr1` -- SR1 trust-region method (N&W Alg. 6.2): ``B+ = B + (y - Bs)(y - Bs)^T /
  (y - Bs)^T s`` applied only when ``|s^T (y - Bs)| >= r ||s|| ||y - Bs||`` (eq. 6.26,
  ``r = 1e-8``), on every trial step (accepted or not), ``B_0 = (y^T y / y^T s) I`` at the
  first update when ``y^T s > 0``; the subproblem is solved exactly
  (:func:`curvlab.minimize.trust_region.solve_exact`); acceptance ``rho > eta = 1e-4`` as
  in Alg. 6.2, radius updates those of the shared loop (Alg. 4.1).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from curvlab.minimize.evaluator import Evaluator, Monitor, NonFiniteError, host
from curvlab.minimize.linesearch import LineFunction, backtracking, strong_wolfe
from curvlab.minimize.result import OptimizeResult
from curvlab.minimize.trust_region import solve_exact, trust_region_loop

__all__ = ["bfgs", "cg", "lbfgs", "sr1", "LBFGSMemory", "LbfgsInvHessProduct", "two_loop",
           "curvature_ok"]


#: NumPy (OpenBLAS) computes matrix-vector products with fewer entries on one thread; above
#: that its worker threads compete with torch's, so larger problems stay in torch.
_NUMPY_MAX = 9216


def _search(kind, line, phi0, dphi0, alpha0, c1, c2, maxls=None):
    budget = {} if maxls is None else {"max_evals": maxls}
    if kind == "strong-wolfe":
        return strong_wolfe(line, phi0, dphi0, alpha0, c1=c1, c2=c2, **budget)
    if kind == "armijo":
        return backtracking(line, phi0, dphi0, alpha0, c1=c1, **budget)
    raise ValueError(f"line_search must be 'strong-wolfe' or 'armijo', got {kind!r}")


class _Gram:
    """NumPy copies of the pairs (rows oldest first, at most ``m``) with the small matrices
    the Gram form of the two-loop recursion needs, updated in ``O(m n + m^2)`` per pair:
    ``U = triu(S Y^T, 1)`` and ``T^{-1}`` for the unit upper triangular
    ``T = I + diag(rho) U`` (bordered inverse when a pair is added; dropping the oldest pair
    keeps the trailing block, which is the inverse of the trailing block of ``T``).

    The pairs live in the window ``[o, o + k)`` of buffers with room for ``2 m``, so dropping
    the oldest pair only moves ``o``; the window is copied back to the front once every
    ``m`` pairs."""

    def __init__(self, m: int, n: int, dtype: np.dtype) -> None:
        cap = 2 * m
        self.m = m
        self.S = np.zeros((cap, n), dtype)
        self.Y = np.zeros((cap, n), dtype)
        self.rho = np.zeros(cap, dtype)
        self.U = np.zeros((cap, cap), dtype)
        self.Tinv = np.zeros((cap, cap), dtype)
        self.o = self.k = 0
        self.first: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def push(self, s: torch.Tensor, y: torch.Tensor, rho: float) -> None:
        o, k = self.o, self.k
        S, Y, U, Ti = self.S, self.Y, self.U, self.Tinv
        if k == self.m:  # drop the oldest pair
            o, k = o + 1, k - 1
        e = o + k
        if e == S.shape[0]:  # window at the end of the buffers: move it to the front
            for a in (S, Y, self.rho):
                a[:k] = a[o:e]
            for a in (U, Ti):
                a[:k, :k] = a[o:e, o:e]
            o, e = 0, k
        S[e] = s.numpy()
        Y[e] = y.numpy()
        self.rho[e] = rho
        u = S[o:e] @ Y[e]
        U[o:e, e] = u
        U[e, o:e + 1] = 0.0
        Ti[o:e, e] = -(Ti[o:e, o:e] @ (self.rho[o:e] * u))
        Ti[e, o:e] = 0.0
        Ti[e, e] = 1.0
        self.o, self.k = o, k + 1

    def apply(self, g: np.ndarray, gamma: float, sign: float = 1.0) -> np.ndarray:
        """``sign * H g``: the two-loop recursion in Gram-matrix form.

        The first loop's ``alpha_i = rho_i s_i^T (g - sum_{j>i} alpha_j y_j)`` is the
        triangular system ``T alpha = rho * S g``; the second loop's ``beta_i = rho_i y_i^T
        (gamma q + sum_{j<i} (alpha_j - beta_j) s_j)`` is ``(I + diag(rho) U^T) beta = rho *
        (gamma Y q + U^T alpha)``, i.e. ``beta = rho * T^{-T} (gamma Y q + U^T alpha)``
        because ``(I + diag(rho) U^T) diag(rho) = diag(rho) T^T``; then ``H g = gamma q +
        S^T (alpha - beta)`` with ``q = g - Y^T alpha`` (the compact form of Byrd, Nocedal
        & Schnabel 1994). A dozen small NumPy calls instead of ``4 m`` vector operations.
        """
        o, e = self.o, self.o + self.k
        S, Y, rho = self.S[o:e], self.Y[o:e], self.rho[o:e]
        Ti = self.Tinv[o:e, o:e]
        alpha = Ti @ (rho * (S @ g))
        q = g - alpha @ Y
        beta = rho * ((gamma * (Y @ q) + alpha @ self.U[o:e, o:e]) @ Ti)
        return (sign * gamma) * q + (sign * (alpha - beta)) @ S


def curvature_ok(ys: float, yy: float, gs: float | None, eps: float) -> bool:
    """Whether a pair is kept: ``y^T s > eps (-g^T s)`` with ``g`` the gradient at the
    start of the step (L-BFGS-B's ``mainlb`` test; scale-free: under the Wolfe conditions
    ``y^T s >= (1 - c2)(-g^T s)``, so only a failed line search can drop a pair). Without
    ``gs`` the older ``y^T s > eps y^T y`` (BLNZ eq. 3.9), which drops every pair of a
    problem whose variables differ in scale by ``1e8`` (``y^T y ~ 1e18 y^T s``)."""
    if not (math.isfinite(ys) and yy > 0):
        return False
    return ys > eps * (-gs if gs is not None else yy)


@dataclass
class LBFGSMemory:
    """The last ``history_size`` curvature pairs ``(s, y, rho = 1 / y^T s)``.

    On the CPU with small ``n`` a NumPy copy of the pairs and their Gram matrices is kept
    alongside (rebuilt whenever ``s`` was changed other than by :meth:`push`)."""

    history_size: int = 10
    s: deque = field(default_factory=deque)
    y: deque = field(default_factory=deque)
    rho: deque = field(default_factory=deque)
    gamma: float = 1.0
    _gram: _Gram | None = field(default=None, repr=False, compare=False)

    def push(self, s: torch.Tensor, y: torch.Tensor, ys: float, yy: float,
             gs: float | None = None) -> bool:
        """Store a pair; skipped (returns False) unless :func:`curvature_ok`."""
        if not curvature_ok(ys, yy, gs, torch.finfo(s.dtype).eps):
            return False
        gram = self._gram if self._gram_valid() else None
        if len(self.s) == self.history_size:
            self.s.popleft()
            self.y.popleft()
            self.rho.popleft()
        self.s.append(s)
        self.y.append(y)
        self.rho.append(1.0 / ys)
        self.gamma = ys / yy
        if gram is not None:
            gram.push(s, y, 1.0 / ys)
            gram.first, gram.last = self.s[0], s
        return True

    def clear(self) -> None:
        """Forget all pairs."""
        self.s.clear()
        self.y.clear()
        self.rho.clear()
        self._gram = None

    def _gram_valid(self) -> bool:
        gram = self._gram
        return (gram is not None and gram.k == len(self.s) > 0 and gram.last is self.s[-1]
                and gram.first is self.s[0] and gram.m == self.history_size)

    def gram(self) -> _Gram:
        """The NumPy Gram cache of the current pairs (CPU tensors only)."""
        if not self._gram_valid():
            s0 = self.s[0]
            gram = _Gram(self.history_size, s0.numel(), s0.numpy().dtype)
            for s, y, rho in zip(self.s, self.y, self.rho, strict=True):
                gram.push(s, y, rho)
            gram.first, gram.last = self.s[0], self.s[-1]
            self._gram = gram
        return self._gram  # type: ignore[return-value]


def two_loop(g: torch.Tensor, mem: LBFGSMemory, sign: float = 1.0) -> torch.Tensor:
    """``sign * H g`` by the L-BFGS two-loop recursion (N&W Alg. 7.4), ``H_0 = gamma I``.

    On the CPU with ``m n < 9216`` the inner products come from small Gram matrices in
    NumPy (:meth:`_Gram.apply`, kept up to date pair by pair): a torch
    call costs microseconds, which dominates at small ``n``. Otherwise the recursion runs
    in torch as written in Alg. 7.4, keeping the scalars on the device (no host syncs)."""
    if g.device.type == "cpu" and g.numel() * mem.history_size < _NUMPY_MAX:
        return torch.from_numpy(mem.gram().apply(g.numpy(), mem.gamma, sign))
    q = g.clone()
    talphas = []
    for s, y, rho in zip(reversed(mem.s), reversed(mem.y), reversed(mem.rho), strict=True):
        a = torch.dot(s, q) * rho
        q.addcmul_(y, a, value=-1.0)
        talphas.append(a)
    q.mul_(mem.gamma)
    for s, y, rho, a in zip(mem.s, mem.y, mem.rho, reversed(talphas), strict=True):
        b = torch.dot(y, q) * rho
        q.addcmul_(s, a - b)
    return q if sign == 1.0 else q.mul_(sign)


class LbfgsInvHessProduct:
    """The L-BFGS inverse-Hessian approximation ``H`` as a linear operator (scipy's
    ``LbfgsInvHessProduct``, the ``hess_inv`` of L-BFGS-B): the recursion
    ``H_{i+1} = (I - rho_i s_i y_i^T) H_i (I - rho_i y_i s_i^T) + rho_i s_i s_i^T``,
    ``rho_i = 1 / y_i^T s_i``, over the stored pairs (oldest first) from ``H_0 = gamma I``,
    applied by the two-loop recursion (N&W Alg. 7.4; Nocedal 1980).

    ``gamma = 1`` is scipy's operator; the solvers attach the ``gamma`` they used
    (``s^T y / y^T y`` of the newest pair, N&W eq. 7.20; L-BFGS-B's ``1 / theta``), so
    ``hess_inv`` is the matrix the last step was computed with. ``matvec`` / ``matmat`` /
    ``@`` take and return tensors (NumPy arrays in, NumPy arrays out); ``todense()`` is the
    ``n x n`` matrix (a tensor, or an array when built with ``numpy=True``)."""

    def __init__(self, sk: Any, yk: Any, gamma: float = 1.0, *, numpy: bool = False) -> None:
        S = torch.stack([torch.as_tensor(v).reshape(-1) for v in sk]) if len(sk) else None
        Y = torch.stack([torch.as_tensor(v).reshape(-1) for v in yk]) if len(yk) else None
        if (S is None) != (Y is None) or (S is not None and S.shape != Y.shape):
            raise ValueError("sk and yk must hold the same number of vectors of one size")
        self.sk, self.yk = S, Y
        self.gamma, self.numpy = float(gamma), numpy
        self.rho = None if S is None else 1.0 / (S * Y).sum(dim=1)

    @property
    def n_corrs(self) -> int:
        return 0 if self.sk is None else self.sk.shape[0]

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.sk is None else (self.sk.shape[1], self.sk.shape[1])

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.sk is None else self.sk.dtype

    def matmat(self, X: Any) -> Any:
        """``H X`` for ``X`` of shape ``(n, k)`` (or ``(n,)``)."""
        is_np = isinstance(X, np.ndarray)
        Q = torch.as_tensor(X).clone()
        vec = Q.dim() == 1
        Q = Q.reshape(Q.shape[0], -1)
        if self.sk is not None:
            S, Y, rho = (t.to(Q.dtype) for t in (self.sk, self.yk, self.rho))
            alphas = []
            for i in range(S.shape[0] - 1, -1, -1):
                a = rho[i] * (S[i] @ Q)
                Q = Q - Y[i][:, None] * a
                alphas.append(a)
            Q = Q * self.gamma
            for i, a in zip(range(S.shape[0]), reversed(alphas), strict=True):
                b = rho[i] * (Y[i] @ Q)
                Q = Q + S[i][:, None] * (a - b)
        else:
            Q = Q * self.gamma
        Q = Q.reshape(-1) if vec else Q
        return Q.numpy() if is_np else Q

    def matvec(self, x: Any) -> Any:
        """``H x``."""
        return self.matmat(x)

    __matmul__ = matmat
    dot = matmat

    def todense(self) -> Any:
        """``H`` as a dense ``n x n`` matrix."""
        if self.sk is None:
            raise ValueError("no stored pairs: the size of H is unknown")
        H = self.matmat(torch.eye(self.sk.shape[1], dtype=self.sk.dtype))
        return H.numpy() if self.numpy else H

    def __repr__(self) -> str:
        return f"<LbfgsInvHessProduct shape={self.shape} n_corrs={self.n_corrs}>"


def _line_search_loop(ev: Evaluator, mon: Monitor, x: torch.Tensor, direction, update,
                      line_search: str, c1: float, c2: float, ftol: float = 0.0,
                      maxls: int | None = None) -> OptimizeResult:
    """Shared loop: ``d = direction(g)``, line search, ``update(s, y, ys, alpha)``. A line
    search that fails without moving ``x`` forgets the curvature (``update(None, ...)``)
    and retries from steepest descent once before the run stops (L-BFGS-B's restart).
    A failed search that found a sufficient decrease is accepted. ``ftol > 0`` adds
    scipy's relative-reduction test ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol``
    (L-BFGS-B's ``factr`` test) as a stated success."""
    f, g = ev.fg(x)
    gn = mon.gnorm(g)
    if not (math.isfinite(gn) and math.isfinite(f.item())):
        return mon.finish(x, f, g, 4, "At the starting point.")
    phi = float(f)
    mon.record(phi, gn)
    fresh = False  # whether the current direction was computed without curvature pairs
    while True:
        if gn <= mon.gtol:
            return mon.finish(x, f, g, 0)
        if mon.nit >= mon.max_iter:
            return mon.finish(x, f, g, 1)
        d, alpha0 = direction(g)
        dphi0 = float(torch.dot(g, d))
        if not dphi0 < 0:
            # stale curvature information: restart from steepest descent once
            update(None, None, None, None, None)
            d, alpha0 = direction(g)
            dphi0 = float(torch.dot(g, d))
            if not dphi0 < 0:
                return mon.finish(x, f, g, 3)
        ls = _search(line_search, LineFunction(ev.fg, x, d), phi, dphi0, alpha0, c1, c2,
                     maxls)
        p = ls.point
        if p is None or (not ls.success and p.alpha * float(d.abs().max()) <= 1e-15 * (
                1.0 + float(x.abs().max()))):
            if not fresh:  # L-BFGS-B's rule: stay at x, forget the curvature, retry from -g
                update(None, None, None, None, None)
                fresh = True
                continue
            return mon.finish(x, f, g, 2, ls.message)
        fresh = False
        mon.nit += 1
        s = p.x - x
        y = p.g - g
        ys = p.alpha * (p.dphi - dphi0)
        update(s, y, ys, p.alpha, p.alpha * dphi0)
        phi_old = phi
        x, f, g, phi = p.x, p.f, p.g, p.phi
        gn = mon.gnorm(g)
        mon.record(phi, gn, step=p.alpha)
        if mon.stop_requested(x, f, g):
            return mon.finish(x, f, g, 5)
        if ftol > 0 and gn > mon.gtol and (phi_old - phi) <= ftol * max(
                abs(phi_old), abs(phi), 1.0):
            return mon.finish(x, f, g, 0, test="ftol_rel")


def lbfgs(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, history_size: int = 10,
          line_search: str = "strong-wolfe", c1: float = 1e-4, c2: float = 0.9,
          memory: LBFGSMemory | None = None, step_scale: float = 1.0, ftol: float = 0.0,
          bounds: Any = None, maxls: int | None = None) -> OptimizeResult:
    """Limited-memory BFGS (N&W Alg. 7.5). ``memory`` continues a previous run;
    ``step_scale`` multiplies the first trial step of every line search; ``maxls`` caps the
    evaluations of one line search (scipy's option; default 20 with bounds as scipy's,
    else the line search's own budget, 25 strong Wolfe / 40 Armijo). With ``bounds`` it is
    L-BFGS-B (:mod:`curvlab.minimize.lbfgsb`). The result's ``hess_inv`` is the final
    inverse-Hessian approximation as a :class:`LbfgsInvHessProduct`."""
    if int(history_size) < 1:
        raise ValueError(f"history_size must be >= 1, got {history_size}")
    if maxls is not None and (isinstance(maxls, bool) or not isinstance(maxls, int)
                              or maxls < 1):
        raise ValueError(f"maxls must be a positive int, got {maxls!r}")
    if bounds is not None:
        if memory is not None or line_search != "strong-wolfe" or step_scale != 1.0:
            raise ValueError("with bounds (L-BFGS-B) memory, line_search and step_scale "
                             "are not supported")
        from curvlab.minimize.lbfgsb import lbfgsb

        return lbfgsb(ev, x0, mon, bounds, history_size=int(history_size), c1=c1, c2=c2,
                      ftol=ftol, maxls=20 if maxls is None else maxls)
    mem = memory if memory is not None else LBFGSMemory(int(history_size))

    def direction(g):
        if not mem.s:
            return -g, step_scale * min(1.0, 1.0 / max(float(torch.linalg.vector_norm(g)),
                                                       1e-300))
        return two_loop(g, mem, -1.0), step_scale

    def update(s, y, ys, alpha, gs):
        if s is None:
            mem.clear()
            return
        mem.push(s, y, ys, float(torch.dot(y, y)), gs)

    res = _line_search_loop(ev, mon, x0, direction, update, line_search, c1, c2, ftol, maxls)
    res["memory"] = mem
    res["hess_inv"] = LbfgsInvHessProduct(list(mem.s), list(mem.y),
                                          mem.gamma if mem.s else 1.0)
    return res


def bfgs(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, line_search: str = "strong-wolfe",
         c1: float = 1e-4, c2: float = 0.9, ftol: float = 0.0) -> OptimizeResult:
    """BFGS with a dense inverse Hessian approximation (N&W Alg. 6.1). On the CPU with
    ``n^2 < 9216`` the ``n x n`` matrix is a NumPy array (a handful of small NumPy calls per
    update instead of torch calls that cost microseconds each)."""
    n = x0.numel()
    small = x0.device.type == "cpu" and n * n < _NUMPY_MAX
    eps = torch.finfo(x0.dtype).eps
    state: dict = {"H": None}

    def direction(g):
        H = state["H"]
        if H is None:
            return -g, min(1.0, 1.0 / max(float(torch.linalg.vector_norm(g)), 1e-300))
        if small:
            return torch.from_numpy(-(H @ g.numpy())), 1.0
        return -(H @ g), 1.0

    def update(s, y, ys, alpha, gs):
        if s is None:
            state["H"] = None
            return
        if small:
            s, y, outer = s.numpy(), y.numpy(), np.outer
        else:
            outer = torch.outer
        yy = float(y @ y)
        if not curvature_ok(ys, yy, gs, eps):
            return
        H = state["H"]
        if H is None:
            H = (np.eye(n, dtype=s.dtype) if small else
                 torch.eye(n, dtype=s.dtype, device=s.device)) * (ys / yy)  # N&W eq. 6.20
        rho = 1.0 / ys
        Hy = H @ y
        yHy = float(y @ Hy)
        H = H - rho * (outer(s, Hy) + outer(Hy, s))
        H = H + (rho * rho * yHy + rho) * outer(s, s)
        state["H"] = H

    res = _line_search_loop(ev, mon, x0, direction, update, line_search, c1, c2, ftol)
    H = state["H"]
    if H is None:
        H = torch.eye(n, dtype=x0.dtype, device=x0.device)
    res["hess_inv"] = torch.from_numpy(H).to(x0.dtype) if small and not isinstance(
        H, torch.Tensor) else H
    return res


def cg(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, c1: float = 1e-4, c2: float = 0.4,
       ftol: float = 0.0) -> OptimizeResult:
    """Nonlinear conjugate gradients, Polak-Ribiere+ (N&W Sec. 5.2, eq. 5.44-5.45):
    ``beta = max(0, g_{k+1}^T (g_{k+1} - g_k) / g_k^T g_k)``, ``d_{k+1} = -g_{k+1} + beta
    d_k``, strong Wolfe line search with ``c2 = 0.4`` (as scipy's CG) and first trial step
    ``alpha_k g_k^T d_k / g_{k+1}^T d_{k+1}`` (N&W eq. 3.60); a direction that is not a
    descent direction restarts from ``-g``."""
    state: dict = {"g": None, "d": None, "dphi": None, "alpha": None}

    def direction(g):
        gp, dp = state["g"], state["d"]
        if gp is None or dp is None:
            d = -g
            alpha0 = min(1.0, 1.0 / max(float(torch.linalg.vector_norm(g)), 1e-300))
        else:
            gg, gy = host(torch.dot(gp, gp), torch.dot(g, g - gp))
            beta = max(0.0, gy / gg) if gg > 0 else 0.0
            d = -g + beta * dp
            dphi = float(torch.dot(g, d))
            alpha0 = 1.0
            if dphi < 0 and state["dphi"] is not None:
                alpha0 = min(1.0, 1.01 * state["alpha"] * state["dphi"] / dphi)
        state["g"], state["d"] = g, d
        state["dphi"] = float(torch.dot(g, d))
        return d, alpha0

    def update(s, y, ys, alpha, gs):
        if s is None:  # restart
            state["d"] = None
            return
        state["alpha"] = alpha

    return _line_search_loop(ev, mon, x0, direction, update, "strong-wolfe", c1, c2, ftol)


def sr1(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, initial_radius: float = 1.0,
        max_radius: float = 1000.0, eta: float = 1e-4, skip_tol: float = 1e-8
        ) -> OptimizeResult:
    """SR1 trust-region method (N&W Alg. 6.2) with a dense model Hessian ``B``."""
    n = x0.numel()
    state = {"B": torch.eye(n, dtype=x0.dtype, device=x0.device), "first": True}

    def evaluate(x):
        f, g = ev.fg(x)
        return f, g, None

    def subproblem(x, g, extra, radius):
        if not bool(torch.isfinite(state["B"]).all()):
            raise NonFiniteError("the SR1 matrix has non-finite entries")
        return solve_exact(g, state["B"], radius)

    def on_trial(x, g, extra, p, trial):
        ft, gt = trial[0], trial[1]
        if not (bool(torch.isfinite(ft)) and bool(torch.isfinite(gt).all())):
            return
        y = gt - g
        B = state["B"]
        if state["first"]:
            ys, yy = host(torch.dot(y, p), torch.dot(y, y))
            if ys > 0:
                B = B * (yy / ys)
            state["first"] = False
        v = y - B @ p
        vs, vv, ss = host(torch.dot(v, p), torch.dot(v, v), torch.dot(p, p))
        if abs(vs) >= skip_tol * math.sqrt(ss * vv) and vs != 0:
            B = B + torch.outer(v, v) / vs
        state["B"] = B

    return trust_region_loop(ev, mon, x0, subproblem, initial_radius=initial_radius,
                             max_radius=max_radius, eta=eta, evaluate=evaluate,
                             on_trial=on_trial)
