"""Trust-region methods (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Ch. 4 and 7).

All share the outer loop of N&W Alg. 4.1: solve ``min_p m(p) = g^T p + 1/2 p^T B p``
s.t. ``||p|| <= radius``, accept ``x + p`` when ``rho = (f(x) - f(x + p)) / (m(0) - m(p))
> eta``, shrink the radius to ``||p|| / 4`` when ``rho < 1/4`` (a non-finite trial value
counts as ``rho = -inf``) and double it (up to ``max_radius``) when ``rho > 3/4`` and the
step reached the boundary. Subproblem solvers:

* ``trust-cauchy``: the Cauchy point (N&W Alg. 4.2), one HVP per iteration;
* ``dogleg``: the dogleg path between the Cauchy and Newton points (N&W Sec. 4.1), dense
  ``B``; when ``B`` is indefinite the Newton point uses the modified Cholesky ``B + E``;
* ``trust-ncg``: Steihaug-CG (N&W Alg. 7.2), Hessian-free;
* ``trust-exact``: the More-Sorensen characterization (N&W Thm. 4.1, Sec. 4.3): find
  ``lambda >= max(0, -lambda_1)`` with ``||(B + lambda I)^{-1} g|| = radius`` by safeguarded
  Newton on ``1/radius - 1/||p(lambda)||`` (N&W Alg. 4.3, eq. 4.44). On the CPU this is
  More & Sorensen's iteration (:class:`MoreSorensen`: Cholesky factorizations of
  ``B + lambda I``, the approximate stopping rules, an approximate null vector for the
  (nearly) hard case); on other devices :func:`solve_exact` solves the same problem in the
  eigenbasis of ``B`` (one ``eigh`` per iterate), including the hard case (eq. 4.45),
  where ``p = p(-lambda_1) + tau q_1`` with ``q_1`` the lowest eigenvector.

The quasi-Newton trust-region method SR1 (:mod:`curvlab.minimize.quasi_newton`) reuses
:func:`solve_exact` and :func:`trust_region_loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg import get_lapack_funcs

from curvlab.linalg.cg import boundary_roots, steihaug_cg
from curvlab.linalg.factor import modified_cholesky
from curvlab.minimize.evaluator import Evaluator, Monitor, NonFiniteError, host
from curvlab.minimize.result import OptimizeResult

__all__ = ["trust_region", "solve_exact", "solve_dogleg", "solve_cauchy", "MoreSorensen",
           "SUBPROBLEMS"]

SUBPROBLEMS = ("trust-cauchy", "dogleg", "trust-ncg", "trust-exact")
_LAPACK = get_lapack_funcs(("potrf", "potrs"), dtype=np.float64)
_TRTRS = get_lapack_funcs(("trtrs",), dtype=np.float64)[0]


def solve_cauchy(g: torch.Tensor, hvp: Callable, radius: float) -> tuple[torch.Tensor, float, bool]:
    """Cauchy point (N&W Alg. 4.2): ``p = -tau radius g / ||g||``, ``tau = 1`` if
    ``g^T B g <= 0`` else ``min(||g||^3 / (radius g^T B g), 1)``. Returns
    ``(p, m(p), hit_boundary)``."""
    gg, gBg = host(torch.dot(g, g), torch.dot(g, hvp(g)))
    gnorm = math.sqrt(gg)
    tau = 1.0 if gBg <= 0 else min(gnorm ** 3 / (radius * gBg), 1.0)
    t = tau * radius / gnorm
    return -t * g, -t * gg + 0.5 * t * t * gBg, tau >= 1.0


def _model(g: torch.Tensor, B: torch.Tensor, p: torch.Tensor) -> float:
    return float(torch.dot(g, p) + 0.5 * torch.dot(p, B @ p))


def solve_dogleg(g: torch.Tensor, B: torch.Tensor, radius: float
                 ) -> tuple[torch.Tensor, float, bool]:
    """Dogleg step (N&W Sec. 4.1, eq. 4.15-4.16) with dense ``B``; returns
    ``(p, m(p), hit_boundary)``."""
    pB = -modified_cholesky(B).solve(g)
    nB = float(torch.linalg.vector_norm(pB))
    if nB <= radius:
        return pB, _model(g, B, pB), False
    gg, gBg = host(torch.dot(g, g), torch.dot(g, B @ g))
    gnorm = math.sqrt(gg)
    if gBg <= 0 or gg / gBg * gnorm >= radius:
        p = -(radius / gnorm) * g
        return p, _model(g, B, p), True
    pU = -(gg / gBg) * g
    d = pB - pU
    # ||pU + tau d|| = radius, tau in [0, 1]
    a, b, c = host(torch.dot(d, d), torch.dot(pU, d), torch.dot(pU, pU))
    tau = (-b + math.sqrt(max(b * b - a * (c - radius * radius), 0.0))) / a
    p = pU + tau * d
    return p, _model(g, B, p), True


def solve_exact(g: torch.Tensor, B: torch.Tensor, radius: float, rtol: float = 1e-6,
                max_iter: int = 100) -> tuple[torch.Tensor, float, bool]:
    """Nearly exact trust-region step (More & Sorensen 1983; N&W Sec. 4.3) in the
    eigenbasis ``B = Q diag(lam) Q^T``: ``p(l) = -Q (a / (lam + l))`` with ``a = Q^T g``.

    Interior Newton step when ``lam_1 > 0`` and ``||p(0)|| <= radius`` (checked first with a
    Cholesky factorization, which spares the ``eigh`` near a minimizer); the hard case
    (eq. 4.45) when ``a`` vanishes on the lowest eigenspace and ``||p(-lam_1)|| <= radius``;
    otherwise safeguarded Newton on ``phi(l) = 1/radius - 1/||p(l)||`` (eq. 4.44:
    ``l += (||p|| / ||q||)^2 (||p|| - radius) / radius``, ``||q||^2 = sum coef^2 / (lam + l)``)
    bracketed in ``(max(0, -lam_1), -lam_1 + ||g|| / radius]``. Returns
    ``(p, m(p), hit_boundary)``. The scalar iteration runs on the host in float64 (for a
    small CPU ``B`` the Cholesky test too, through LAPACK without torch's per-call overhead).
    """
    if B.device.type == "cpu" and g.numel() <= 64:  # LAPACK directly, no torch dispatch
        Bn = B.numpy().astype(np.float64)
        gn = g.numpy().astype(np.float64)
        potrf, potrs = _LAPACK
        L, info = potrf(Bn, lower=True, clean=False)
        if info == 0:  # positive definite: try the interior Newton step first (no eigh)
            pn_, info = potrs(L, gn, lower=True)
            pn, gp = math.sqrt(float(pn_ @ pn_)), -float(gn @ pn_)
            if info == 0 and pn <= radius:
                return torch.from_numpy(-pn_).to(g.dtype), 0.5 * gp, False
        lam_t, Q_t = torch.linalg.eigh(torch.from_numpy(Bn))  # honours torch's thread count
        lam, Qn = lam_t.numpy(), Q_t.numpy()
        a = Qn.T @ gn
    else:
        L, info = torch.linalg.cholesky_ex(B)
        if int(info) == 0:
            p = -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            pn, gp = host(torch.linalg.vector_norm(p), torch.dot(g, p))
            if pn <= radius:
                return p, 0.5 * gp, False  # m(p) = g^T p + p^T B p / 2 = g^T p / 2 at B p = -g
        lam_t, Q = torch.linalg.eigh(B)
        both = torch.stack((lam_t, Q.T @ g)).to("cpu", torch.float64).numpy()
        lam, a = both[0], both[1]
        Qn = None
    lam1 = float(lam[0])
    anorm = float(np.sqrt(np.dot(a, a)))
    scale = max(float(np.abs(lam).max()), 1e-300)

    def finish(coef: np.ndarray, boundary: bool) -> tuple[torch.Tensor, float, bool]:
        m = float(np.dot(a, coef) + 0.5 * np.dot(lam * coef, coef))
        if Qn is not None:
            return torch.from_numpy(Qn @ coef).to(g.dtype), m, boundary
        return Q @ torch.as_tensor(coef, dtype=g.dtype, device=g.device), m, boundary

    if lam1 > 0:
        coef = -a / lam
        if float(np.sqrt(np.dot(coef, coef))) <= radius:
            return finish(coef, False)
    lo = max(0.0, -lam1)
    low = (lam - lam1) <= 1e-10 * scale
    if lam1 <= 0 and float(np.sqrt(np.dot(a[low], a[low]))) <= 1e-10 * max(anorm, 1e-300):
        coef = np.zeros_like(a)
        coef[~low] = -a[~low] / (lam[~low] - lam1)
        nrm2 = float(np.dot(coef, coef))
        if nrm2 <= radius * radius:
            coef[int(np.argmax(low))] += math.sqrt(radius * radius - nrm2)
            return finish(coef, True)
    hi = max(lo, anorm / radius - lam1)
    l = hi
    for _ in range(max_iter):
        denom = lam + l
        if not np.all(denom > 0):
            l = 0.5 * (lo + hi)
            continue
        coef = -a / denom
        nrm = float(np.sqrt(np.dot(coef, coef)))
        if abs(nrm - radius) <= rtol * radius:
            break
        if nrm > radius:
            lo = l
        else:
            hi = l
        q2 = float(np.dot(coef, coef / denom))
        new = l + (nrm * nrm / q2) * (nrm - radius) / radius
        l = new if lo < new < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(hi, 1e-300):
            break
    coef = -a / (lam + l)
    nrm = float(np.sqrt(np.dot(coef, coef)))
    if nrm > radius:
        coef *= radius / nrm
    return finish(coef, True)


def _smallest_singular(U: np.ndarray) -> tuple[float, np.ndarray]:
    """Estimate of the smallest singular value of the upper-triangular ``U`` and its right
    singular vector in ``O(n^2)`` (Cline, Moler, Stewart & Wilkinson, SINUM 16, 1979; Golub
    & Van Loan, *Matrix Computations*, 4th ed., Alg. 3.5.1): ``U^T w = e`` with the signs
    ``e_k = +-1`` chosen greedily to make ``w`` large, then ``U v = w``; returns
    ``(||w|| / ||v||, v / ||v||)``."""
    n = U.shape[0]
    s = np.zeros(n)  # partial sums of U^T w for the rows still to come
    w = np.empty(n)
    for k in range(n):
        ukk, sk = U[k, k], s[k]
        wp, wm = (1.0 - sk) / ukk, (-1.0 - sk) / ukk
        row, rest = U[k, k + 1:], s[k + 1:]
        sp, sm = rest + wp * row, rest + wm * row
        if abs(wp) + np.abs(sp).sum() >= abs(wm) + np.abs(sm).sum():
            w[k], s[k + 1:] = wp, sp
        else:
            w[k], s[k + 1:] = wm, sm
    v, _ = _TRTRS(U, w)
    vn = math.sqrt(float(v @ v))
    return math.sqrt(float(w @ w)) / vn, v / vn


def _to_boundary(p: np.ndarray, z: np.ndarray, radius: float) -> float:
    """The root ``tau`` of ``||p + tau z|| = radius`` of smaller magnitude (``||p|| <=
    radius``, so the roots have opposite signs)."""
    roots = boundary_roots(float(p @ p), float(p @ z), float(z @ z), radius)
    return min(roots, key=abs)


class MoreSorensen:
    """Approximate trust-region step by More & Sorensen's iteration ("Computing a trust
    region step", SISSC 4, 1983; Conn, Gould & Toint, *Trust-Region Methods*, 2000, Alg.
    7.3.4 and Sec. 7.3.8) for one ``(g, B)``, called with successive radii at the same
    iterate (a shrinking radius reuses the lower bound on ``lambda``).

    ``lambda`` is safeguarded in ``[lambda_L, lambda_U]`` (initial bounds from Gershgorin
    discs and norms of ``B``) and updated by Newton's method on ``1/radius - 1/||p||``
    (N&W eq. 4.44, ``||w||^2 = p^T (B + lambda I)^{-1} p`` from the Cholesky factor ``R``);
    a failed factorization raises ``lambda_L`` by the pivot deficit of the leading
    submatrix. Stopping rules: ``lambda = 0`` and ``||p|| <= radius`` (interior Newton
    step); ``| ||p|| - radius | <= k_easy radius``; or, inside the region, the step
    ``p + tau z`` to the boundary along an approximate null vector ``z`` of ``R``
    (:func:`_smallest_singular`) when ``tau^2 ||R z||^2 <= k_hard (p^T (B + lambda I) p +
    lambda radius^2)`` (the nearly hard case). The model value is then within a factor
    ``(1 - k_hard)`` of optimal (More & Sorensen, Thm. 3.4). Runs in float64 NumPy/LAPACK
    on host copies of ``g`` and ``B`` (CPU tensors only); if ``max_iter`` factorizations
    do not settle, the exact eigenbasis solve (:func:`solve_exact`) takes over.
    """

    def __init__(self, g: torch.Tensor, B: torch.Tensor, *, k_easy: float = 0.1,
                 k_hard: float = 0.2, max_iter: int = 50) -> None:
        if B.device.type != "cpu":
            raise ValueError("MoreSorensen runs on CPU tensors; use solve_exact on "
                             f"{B.device}")
        self.g_t, self.B_t = g, B
        self.g = g.numpy().astype(np.float64, copy=False)
        self.B = B.numpy().astype(np.float64, copy=False)
        self.k_easy, self.k_hard, self.max_iter = k_easy, k_hard, max_iter
        self.gnorm = math.sqrt(float(self.g @ self.g))
        self.prev_radius, self.prev_lower = -1.0, 0.0
        self._newton: tuple | None = None
        self._bounds: tuple | None = None

    def _eigen_bounds(self) -> tuple:
        """Gershgorin bounds on the spectrum of ``B``, ``min(||B||_F, ||B||_inf)``,
        ``min diag B``, the threshold below which ``g`` counts as zero and ``I``."""
        if self._bounds is None:
            H = self.B
            d = np.diag(H)
            rows = np.abs(H).sum(1)
            off = rows - np.abs(d)
            hinf = float(rows.max())
            self._bounds = (float((d - off).min()), float((d + off).max()),
                            min(math.sqrt(float((H * H).sum())), hinf), float(d.min()),
                            H.shape[0] * np.finfo(np.float64).eps * hinf, np.eye(H.shape[0]))
        return self._bounds

    def _finish(self, p: np.ndarray, boundary: bool) -> tuple[torch.Tensor, float, bool]:
        m = float(self.g @ p + 0.5 * (p @ (self.B @ p)))
        return torch.from_numpy(p).to(self.g_t.dtype), m, boundary

    def __call__(self, radius: float) -> tuple[torch.Tensor, float, bool]:
        """``(p, m(p), hit_boundary)`` for the trust radius ``radius``."""
        potrf, potrs = _LAPACK
        if self._newton is None:  # B positive definite: the Newton step, once per iterate
            R0, info = potrf(self.B, lower=False, clean=True)
            if info == 0:
                p, info = potrs(R0, -self.g, lower=False)
            self._newton = (R0, p, math.sqrt(float(p @ p))) if info == 0 else ()
        if self._newton and self._newton[2] <= radius:
            # lambda = 0 is the solution (the initial lambda_L is then 0, see below)
            p = self._newton[1]
            return torch.from_numpy(p).to(self.g_t.dtype), 0.5 * float(self.g @ p), False
        gersh_lo, gersh_hi, hnorm, min_diag, tiny, eye = self._eigen_bounds()
        H, g = self.B, self.g
        hi = max(0.0, self.gnorm / radius + min(-gersh_lo, hnorm))
        lo = max(0.0, -min_diag, self.gnorm / radius - min(gersh_hi, hnorm))
        if radius < self.prev_radius:
            lo = max(lo, self.prev_lower)

        def guess(lo: float, hi: float) -> float:
            return max(math.sqrt(abs(lo * hi)), lo + 0.01 * (hi - lo))

        lam = 0.0 if lo == 0.0 else guess(lo, hi)
        factored = self._newton[0] if lam == 0.0 and self._newton else None
        step = None
        for _ in range(self.max_iter):
            if factored is None:
                R, info = potrf(H + lam * eye, lower=False, clean=True)
            else:
                R, info, factored = factored, 0, None
            if info == 0 and self.gnorm > tiny:
                p, _ = potrs(R, -g, lower=False)
                pn = math.sqrt(float(p @ p))
                if lam == 0.0 and pn <= radius:
                    step = (p, False)
                    break
                w, _ = _TRTRS(R, p, trans=1)
                new = lam + (pn * pn / float(w @ w)) * (pn - radius) / radius
                if pn < radius:
                    smin, z = _smallest_singular(R)
                    tau = _to_boundary(p, z, radius)
                    quad = float(p @ ((H + lam * eye) @ p))
                    if tau * tau * smin * smin <= self.k_hard * (quad + lam * radius * radius):
                        step = (p + tau * z, True)
                        break
                    hi, lo = lam, max(lo, lam - smin * smin)
                    R2, info2 = potrf(H + new * eye, lower=False, clean=True)
                    if info2 == 0:
                        lam, factored = new, R2
                    else:
                        lo = max(lo, new)
                        lam = guess(lo, hi)
                else:
                    if pn - radius <= self.k_easy * radius:
                        step = (p, True)
                        break
                    lo, lam = lam, new
            elif info == 0:  # g ~ 0: move along the approximate null vector of R
                if lam == 0.0:
                    step = (np.zeros_like(g), False)
                    break
                smin, z = _smallest_singular(R)
                if smin * smin <= self.k_hard * lam:
                    step = (radius * z, True)
                    break
                hi, lo = lam, max(lo, lam - smin * smin)
                lam = guess(lo, hi)
            else:  # B + lam I is not positive definite: the leading k x k block fails
                k = int(info)
                col = R[:k - 1, k - 1]
                deficit = float(col @ col) - (H[k - 1, k - 1] + lam)
                v = np.zeros_like(g)
                v[k - 1] = 1.0
                if k > 1:
                    v[:k - 1], _ = _TRTRS(np.ascontiguousarray(R[:k - 1, :k - 1]), -col)
                lo = max(lo, lam + deficit / float(v @ v))
                lam = guess(lo, hi)
        self.prev_radius, self.prev_lower = radius, lo
        if step is None:
            return solve_exact(self.g_t, self.B_t, radius)
        return self._finish(*step)


def trust_region_loop(ev: Evaluator, mon: Monitor, x: torch.Tensor, subproblem: Callable,
                      *, initial_radius: float, max_radius: float, eta: float,
                      evaluate: Callable, on_trial: Callable | None = None,
                      evaluate_lazy: Callable | None = None) -> OptimizeResult:
    """N&W Alg. 4.1. ``evaluate(x) -> (f, g, extra)``; ``subproblem(x, g, extra, radius) ->
    (p, m(p), hit_boundary)``; ``on_trial(x, g, extra, p, trial)`` (quasi-Newton updates)
    sees every trial point, accepted or not. ``evaluate_lazy(x) -> (f, finish)`` (without
    ``on_trial``): trial points are evaluated by value first and ``finish() -> (f, g,
    extra)`` runs only for a step accepted on its value (a non-finite gradient then rejects
    it after all), as ``rho`` needs no gradient."""
    if not (0 <= eta < 0.25):
        raise ValueError(f"eta must be in [0, 0.25), got {eta}")
    if not (0 < initial_radius <= max_radius):
        raise ValueError("need 0 < initial_radius <= max_radius, got "
                         f"{initial_radius}, {max_radius}")
    radius = float(initial_radius)
    lazy = evaluate_lazy is not None and on_trial is None
    f, g, extra = evaluate(x)
    gn = mon.gnorm(g)
    if not (math.isfinite(gn) and math.isfinite(f.item())):
        return mon.finish(x, f, g, 4, "At the starting point.")
    phi = float(f)
    mon.record(phi, gn, radius=radius)
    eps = torch.finfo(x.dtype).eps
    while True:
        if gn <= mon.gtol:
            return mon.finish(x, f, g, 0, radius=radius)
        if mon.nit >= mon.max_iter:
            return mon.finish(x, f, g, 1, radius=radius)
        try:
            p, mp, boundary = subproblem(x, g, extra, radius)
        except (NonFiniteError, ZeroDivisionError, OverflowError) as err:
            return mon.finish(x, f, g, 4, f"The model overflowed ({err}); the objective may "
                              "be unbounded below.", radius=radius)
        pnorm = float(torch.linalg.vector_norm(p))
        predicted = -mp
        if not (predicted > 0 and math.isfinite(predicted)) or pnorm == 0:
            return mon.finish(x, f, g, 6, "The model predicts no decrease.", radius=radius)
        xt = x + p
        if lazy:
            f_t, finish = evaluate_lazy(xt)  # type: ignore[misc]
            ft = f_t.item()
            ft = ft if math.isfinite(ft) else math.inf
            rho = (phi - ft) / predicted if math.isfinite(ft) else -math.inf
            if rho > eta:
                trial = finish()
                gt = mon.gnorm(trial[1])
                if not math.isfinite(gt):
                    ft, rho = math.inf, -math.inf
        else:
            trial = evaluate(xt)
            # one host sync for the trial's value and gradient norm
            ft, gt = host(trial[0], torch.linalg.vector_norm(trial[1], math.inf))
            if math.isnan(ft) or math.isnan(gt) or math.isinf(gt):
                ft = math.inf
            rho = (phi - ft) / predicted if math.isfinite(ft) else -math.inf
            if on_trial is not None:
                on_trial(x, g, extra, p, trial)
        mon.nit += 1
        if rho < 0.25:
            radius = 0.25 * min(pnorm, radius)
        elif rho > 0.75 and boundary:
            radius = min(2.0 * radius, max_radius)
        if rho > eta:
            x, (f, g, extra), phi, gn = xt, trial, ft, gt
        mon.record(phi, gn, step=pnorm, radius=radius)
        if mon.stop_requested(x, f, g):
            return mon.finish(x, f, g, 5, radius=radius)
        if radius < 1e-6 and gn > mon.gtol and radius <= eps * max(
                float(torch.linalg.vector_norm(x)), 1e-30):
            return mon.finish(x, f, g, 6, radius=radius)


def trust_region(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, subproblem: str,
                 initial_radius: float = 1.0, max_radius: float = 1000.0, eta: float = 0.15,
                 cg_max_iter: int | None = None) -> OptimizeResult:
    """Trust-region Newton with the given subproblem solver (see module doc)."""
    if subproblem not in SUBPROBLEMS:
        raise ValueError(f"subproblem must be one of {SUBPROBLEMS}, got {subproblem!r}")
    max_cg = 2 * x0.numel() if cg_max_iter is None else int(cg_max_iter)

    def solve(x, g, extra, radius):
        if subproblem == "trust-cauchy":
            return solve_cauchy(g, extra, radius)
        if subproblem == "trust-ncg":
            gnorm = float(torch.linalg.vector_norm(g))
            res = steihaug_cg(extra, g, radius, rtol=min(0.5, math.sqrt(gnorm)),
                              max_iter=max_cg)
            return res.p, res.model_value, res.hit_boundary
        cache = solve.cache
        if cache[0] is not extra:
            cache[:] = [extra, ev.hess(x, extra), None]
        B = cache[1]
        if subproblem == "dogleg":
            return solve_dogleg(g, B, radius)
        if B.device.type != "cpu":
            return solve_exact(g, B, radius)
        if cache[2] is None:  # one More-Sorensen state per iterate, kept across radii
            cache[2] = MoreSorensen(g, B)
        return cache[2](radius)

    solve.cache = [None, None, None]
    return trust_region_loop(ev, mon, x0, solve, initial_radius=initial_radius,
                             max_radius=max_radius, eta=eta, evaluate=ev.fgh,
                             evaluate_lazy=ev.fgh_lazy)
