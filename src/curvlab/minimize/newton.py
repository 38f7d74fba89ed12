"""Newton methods with a line search (Nocedal & Wright, 2nd ed., Ch. 3 and 7).

* :func:`newton` -- damped Newton with backtracking: ``d = -(H + E)^{-1} g`` with the
  Cheng-Higham modified Cholesky factorization of ``H`` (:mod:`curvlab.linalg.factor`;
  ``E = 0`` when ``H`` is positive definite; N&W Sec. 3.4), step ``alpha`` by Armijo
  backtracking from 1 (or strong Wolfe). Records the Newton decrement
  ``lambda = sqrt(g^T (H + E)^{-1} g)`` (Boyd & Vandenberghe, eq. 9.29).
* :func:`newton_cg` -- line-search Newton-CG / truncated Newton (N&W Alg. 7.1): CG on
  ``H d = -g`` with forcing term ``eta_k = min(0.5, sqrt(||g||)) ||g||``, stopped at
  negative curvature (``d = -g`` if that happens at once); Hessian-free, each CG iteration
  is one HVP through the gradient graph recorded at ``x_k``.
"""

from __future__ import annotations

import math

import torch

from curvlab.linalg.cg import cg
from curvlab.linalg.factor import modified_cholesky
from curvlab.minimize.evaluator import Evaluator, Monitor, NonFiniteError
from curvlab.minimize.linesearch import LineFunction, backtracking, strong_wolfe
from curvlab.minimize.result import OptimizeResult

__all__ = ["newton", "newton_cg"]


def _search(kind: str, line: LineFunction, phi0: float, dphi0: float, c1: float, c2: float):
    if kind == "armijo":
        return backtracking(line, phi0, dphi0, 1.0, c1=c1)
    if kind == "strong-wolfe":
        return strong_wolfe(line, phi0, dphi0, 1.0, c1=c1, c2=c2)
    raise ValueError(f"line_search must be 'armijo' or 'strong-wolfe', got {kind!r}")


def _newton_loop(ev: Evaluator, mon: Monitor, x: torch.Tensor, direction, line_search: str,
                 c1: float, c2: float) -> OptimizeResult:
    f, g, prod = ev.fgh(x)
    gn = mon.gnorm(g)
    if not (math.isfinite(gn) and math.isfinite(f.item())):
        return mon.finish(x, f, g, 4, "At the starting point.")
    phi = float(f)
    mon.record(phi, gn)
    while True:
        if gn <= mon.gtol:
            return mon.finish(x, f, g, 0)
        if mon.nit >= mon.max_iter:
            return mon.finish(x, f, g, 1)
        try:
            d, decrement = direction(x, g, prod)
        except NonFiniteError as err:
            return mon.finish(x, f, g, 4, f"{err}; the objective may be unbounded below.")
        dphi0 = float(torch.dot(g, d))
        if not dphi0 < 0:
            return mon.finish(x, f, g, 3)
        ls = _search(line_search, LineFunction(ev.fgh, x, d), phi, dphi0, c1, c2)
        p = ls.point
        if p is None:
            return mon.finish(x, f, g, 2, ls.message)
        mon.nit += 1
        x, f, g, prod, phi = p.x, p.f, p.g, p.extra, p.phi
        gn = mon.gnorm(g)
        mon.record(phi, gn, step=p.alpha, decrement=decrement)
        if mon.stop_requested(x, f, g):
            return mon.finish(x, f, g, 5)
        if not ls.success and gn > mon.gtol:
            return mon.finish(x, f, g, 2, ls.message)


def newton(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, line_search: str = "armijo",
           c1: float = 1e-4, c2: float = 0.9) -> OptimizeResult:
    """Damped Newton with a modified-Cholesky-corrected Hessian (dense, ``n`` small)."""

    def direction(x, g, prod):
        d = -modified_cholesky(ev.hess(x, prod)).solve(g)
        return d, math.sqrt(max(-float(torch.dot(g, d)), 0.0))

    return _newton_loop(ev, mon, x0, direction, line_search, c1, c2)


def newton_cg(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, line_search: str = "armijo",
              c1: float = 1e-4, c2: float = 0.9, cg_max_iter: int | None = None
              ) -> OptimizeResult:
    """Truncated Newton (N&W Alg. 7.1), Hessian-free; ``cg_max_iter`` defaults to ``20 n``."""
    max_cg = 20 * x0.numel() if cg_max_iter is None else int(cg_max_iter)

    def direction(x, g, prod):
        gnorm = float(torch.linalg.vector_norm(g))
        eta = min(0.5, math.sqrt(gnorm))
        res = cg(prod, -g, rtol=eta, max_iter=max_cg)
        d = res.x
        if res.negative_curvature and res.iterations == 1:
            d = -g
        return d, None

    return _newton_loop(ev, mon, x0, direction, line_search, c1, c2)
