"""Line searches along ``x + alpha d`` (Nocedal & Wright, *Numerical Optimization*, 2nd ed.).

* :func:`backtracking` -- Armijo sufficient decrease ``phi(a) <= phi(0) + c1 a phi'(0)``
  by backtracking with safeguarded quadratic interpolation (N&W Alg. 3.1, eq. 3.57).
* :func:`strong_wolfe` -- sufficient decrease plus ``|phi'(a)| <= c2 |phi'(0)|``
  (N&W Alg. 3.5 bracketing + Alg. 3.6 zoom, cubic interpolation eq. 3.59).
* :func:`exact_quadratic` -- the exact minimizer ``a = -g^T d / d^T H d`` of a quadratic
  along ``d`` (N&W eq. 3.55), one Hessian-vector product.

Near a minimizer with a large ``|f|`` the decrease can fall below the rounding error of
``f``; both searches then also accept the approximate Armijo condition of Hager & Zhang
(2005, eq. 4.1): ``phi(a) <= phi(0) + 1e-10 |phi(0)|`` (``10 eps |phi(0)|`` for an ``f``
of lower precision, e.g. ``1.2e-6`` in float32) and ``phi'(a) <= (1 - 2 c1)
|phi'(0)|`` (exact Armijo for a quadratic, evaluated with derivatives, which stay accurate).

Non-finite trial values (overflow, log of a negative number, ...) count as "too long":
the search backtracks away from them and never returns such a point. All searches work on
a :class:`LineFunction` that evaluates value, gradient and ``phi'(a) = g(x + a d)^T d``
with one host sync per trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from curvlab.minimize.evaluator import host

__all__ = ["LineFunction", "Point", "sufficient_decrease", "LineSearchResult", "backtracking",
           "strong_wolfe", "exact_quadratic", "LINE_SEARCHES"]

LINE_SEARCHES = ("armijo", "strong-wolfe", "exact")


@dataclass
class Point:
    """One evaluated trial: step ``alpha``, ``phi`` and ``dphi`` as floats, plus the
    tensors ``x``, ``f``, ``g`` and whatever the evaluator returned in ``extra``."""

    alpha: float
    phi: float
    dphi: float
    x: torch.Tensor | None = None
    f: torch.Tensor | None = None
    g: torch.Tensor | None = None
    extra: Any = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.phi) and math.isfinite(self.dphi)


@dataclass
class LineSearchResult:
    """``point`` is the accepted trial (or the best sufficient-decrease point found when
    ``success`` is False; ``None`` when there is none). ``nevals`` trials were made."""

    point: Point | None
    success: bool
    nevals: int
    message: str = ""


APPROX_EPS = 1e-10


def sufficient_decrease(p: Point, phi0: float, dphi0: float, c1: float) -> bool:
    """Armijo ``phi(a) <= phi(0) + c1 a phi'(0)`` or its approximate form (module doc)."""
    if not p.finite:
        return False
    if p.phi <= phi0 + c1 * p.alpha * dphi0:
        return True
    slack = APPROX_EPS
    if p.f is not None and p.f.dtype != torch.float64:  # f rounds at ~eps |f| (float32)
        slack = max(slack, 10.0 * torch.finfo(p.f.dtype).eps)
    return p.phi <= phi0 + slack * abs(phi0) and p.dphi <= (2.0 * c1 - 1.0) * dphi0


class LineFunction:
    """``phi(alpha) = f(x + alpha d)``; ``evaluate(x) -> (f, g, *extra)``."""

    def __init__(self, evaluate: Callable[[torch.Tensor], tuple], x: torch.Tensor,
                 d: torch.Tensor) -> None:
        self.evaluate, self.x, self.d = evaluate, x, d
        self.nevals = 0
        self._scale: tuple[float, float] | None = None

    def negligible(self, step: float) -> bool:
        """Whether ``step * d`` is below rounding relative to ``x`` (one sync, cached)."""
        if self._scale is None:
            self._scale = tuple(host(self.d.abs().max(),  # type: ignore[assignment]
                                     self.x.abs().max()))
        dmax, xmax = self._scale
        return step * dmax <= 1e-16 * (1.0 + xmax)

    def __call__(self, alpha: float) -> Point:
        self.nevals += 1
        xt = torch.add(self.x, self.d, alpha=alpha)
        out = self.evaluate(xt)
        f, g = out[0], out[1]
        phi, dphi = host(f, torch.dot(g, self.d))
        if math.isnan(phi):
            phi = math.inf
        return Point(alpha, phi, dphi, xt, f, g, out[2] if len(out) > 2 else None)


def backtracking(line: LineFunction, phi0: float, dphi0: float, alpha0: float = 1.0,
                 c1: float = 1e-4, max_evals: int = 40, shrink: tuple[float, float] = (0.1, 0.5)
                 ) -> LineSearchResult:
    """Armijo backtracking (N&W Alg. 3.1): try ``alpha0``, then the minimizer of the
    quadratic through ``phi(0), phi'(0), phi(a)`` (eq. 3.57) clipped to
    ``[shrink[0] a, shrink[1] a]``; non-finite trials shrink by ``shrink[0]``."""
    if not dphi0 < 0:
        return LineSearchResult(None, False, 0, "not a descent direction")
    alpha = alpha0
    for _ in range(max_evals):
        p = line(alpha)
        if sufficient_decrease(p, phi0, dphi0, c1):
            return LineSearchResult(p, True, line.nevals)
        if not p.finite:
            alpha *= shrink[0]
            continue
        denom = 2.0 * (p.phi - phi0 - dphi0 * alpha)
        new = -dphi0 * alpha * alpha / denom if denom > 0 else shrink[1] * alpha
        alpha = min(max(new, shrink[0] * alpha), shrink[1] * alpha)
        if line.negligible(alpha):
            break
    return LineSearchResult(None, False, line.nevals, "no sufficient decrease")


def _cubic_min(a: Point, b: Point, lo: float, hi: float) -> float:
    """Minimizer of the cubic interpolating ``phi`` and ``phi'`` at ``a`` and ``b``
    (N&W eq. 3.59), clipped to ``[lo, hi]``; the midpoint when the cubic has none."""
    if a.alpha == b.alpha or not (a.finite and b.finite):
        return 0.5 * (lo + hi)
    d1 = a.dphi + b.dphi - 3.0 * (a.phi - b.phi) / (a.alpha - b.alpha)
    disc = d1 * d1 - a.dphi * b.dphi
    if not (disc >= 0 and math.isfinite(disc)):
        return 0.5 * (lo + hi)
    d2 = math.copysign(math.sqrt(disc), b.alpha - a.alpha)
    den = b.dphi - a.dphi + 2.0 * d2
    if den == 0:
        return 0.5 * (lo + hi)
    t = b.alpha - (b.alpha - a.alpha) * (b.dphi + d2 - d1) / den
    if not math.isfinite(t):
        return 0.5 * (lo + hi)
    return min(max(t, lo), hi)


def strong_wolfe(line: LineFunction, phi0: float, dphi0: float, alpha0: float = 1.0,
                 c1: float = 1e-4, c2: float = 0.9, alpha_max: float = 1e10,
                 max_evals: int = 25) -> LineSearchResult:
    """Strong Wolfe line search, N&W Alg. 3.5 (bracketing phase) and Alg. 3.6 (zoom).

    Bracketing grows the step by cubic extrapolation within ``[1.1 a, 10 a]``, or to
    ``10 a`` when ``|phi'|`` did not decrease (More & Thuente 1994, case 4); zoom takes
    the safeguarded cubic minimizer (kept at least 10% of the bracket away from its ends).
    On failure the best sufficient-decrease point seen is returned with ``success=False``.
    """
    if not dphi0 < 0:
        return LineSearchResult(None, False, 0, "not a descent direction")
    start = Point(0.0, phi0, dphi0)
    prev, alpha = start, min(alpha0, alpha_max)
    best: Point | None = None

    def armijo(p: Point) -> bool:
        return sufficient_decrease(p, phi0, dphi0, c1)

    def zoom(lo: Point, hi: Point) -> LineSearchResult:
        nonlocal best
        while line.nevals < max_evals:
            a, b = sorted((lo.alpha, hi.alpha))
            width = b - a
            if width <= 1e-16 * max(b, 1e-16) or line.negligible(width):
                break
            t = _cubic_min(lo, hi, a + 0.1 * width, b - 0.1 * width)
            p = line(t)
            if not armijo(p) or p.phi >= lo.phi:
                hi = p
            else:
                best = p
                if abs(p.dphi) <= -c2 * dphi0:
                    return LineSearchResult(p, True, line.nevals)
                if p.dphi * (hi.alpha - lo.alpha) >= 0:
                    hi = lo
                lo = p
        return LineSearchResult(best, False, line.nevals, "zoom did not meet strong Wolfe")

    while line.nevals < max_evals:
        p = line(alpha)
        if not armijo(p) or (prev is not start and p.phi >= prev.phi):
            return zoom(prev, p)
        best = p
        if abs(p.dphi) <= -c2 * dphi0:
            return LineSearchResult(p, True, line.nevals)
        if p.dphi >= 0:
            return zoom(p, prev)
        if alpha >= alpha_max:
            break
        if abs(p.dphi) >= abs(prev.dphi):
            new = 10.0 * alpha  # the slope steepens: the cubic's minimizer lies behind
        else:
            new = _cubic_min(prev, p, 1.1 * alpha, 10.0 * alpha)
        prev, alpha = p, min(new, alpha_max)
    return LineSearchResult(best, False, line.nevals, "bracketing did not meet strong Wolfe")


def exact_quadratic(line: LineFunction, g: torch.Tensor, hvp: Callable[[torch.Tensor],
                    torch.Tensor]) -> LineSearchResult:
    """Exact step for a quadratic (N&W eq. 3.55): ``alpha = -g^T d / d^T H d``.
    Fails (``success=False``) when ``d`` is not a descent direction or ``d^T H d <= 0``."""
    d = line.d
    gd, dHd = host(torch.dot(g, d), torch.dot(d, hvp(d)))
    if not gd < 0:
        return LineSearchResult(None, False, 0, "not a descent direction")
    if not dHd > 0:
        return LineSearchResult(None, False, 0, "non-positive curvature: not a convex "
                                "quadratic along d; use line_search='strong-wolfe'")
    p = line(-gd / dHd)
    return LineSearchResult(p, p.finite, line.nevals)
