"""First-order methods: gradient descent, heavy-ball momentum, Nesterov acceleration.

* :func:`gd` -- ``x+ = x - alpha g`` with ``alpha`` from a line search: ``"armijo"``
  (backtracking, N&W Alg. 3.1), ``"strong-wolfe"`` (N&W Alg. 3.5/3.6) or ``"exact"``
  (``alpha = g^T g / g^T H g``, exact on quadratics, N&W eq. 3.55). The first trial is
  the fixed ``lr`` if given, else the Barzilai-Borwein step ``s^T s / s^T y`` (Barzilai &
  Borwein 1988) when ``s^T y > 0``, else ``alpha_{k-1} g_{k-1}^T d_{k-1} / g_k^T d_k``
  (N&W eq. 3.60); the line search then enforces its conditions as usual.
* :func:`momentum` -- Polyak heavy ball (Polyak 1964) in the form ``m = beta m + g``,
  ``x+ = x - alpha m`` (``= x - alpha g + beta (x - x_prev)`` for constant ``alpha``),
  with ``alpha = lr`` or chosen by Armijo backtracking; a non-descent ``m`` or a failed
  sufficient-decrease test restarts the momentum (``m = g``) so ``f`` never increases.
* :func:`nesterov` -- Nesterov's accelerated gradient (Nesterov 1983) with backtracking
  on the Lipschitz constant (Beck & Teboulle 2009, FISTA without prox:
  ``f(y - g_y / L) <= f(y) - ||g_y||^2 / (2 L)``), ``t+ = (1 + sqrt(1 + 4 t^2)) / 2``,
  ``y = x + (t - 1) / t+ (x - x_prev)`` and gradient-based adaptive restart
  (O'Donoghue & Candes 2015: reset ``t = 1`` when ``g_y^T (x+ - x) > 0``).

All accept ``clip`` (max 2-norm of the gradient used in the step; the convergence test
always uses the true gradient).
"""

from __future__ import annotations

import math

import torch

from curvlab.minimize.evaluator import Evaluator, Monitor, clip_direction
from curvlab.minimize.linesearch import (
    LineFunction,
    backtracking,
    exact_quadratic,
    strong_wolfe,
)
from curvlab.minimize.result import OptimizeResult

__all__ = ["gd", "momentum", "nesterov"]


def _start(mon: Monitor, x: torch.Tensor, evaluate):
    out = evaluate(x)
    f, g = out[0], out[1]
    gn = mon.gnorm(g)
    ok = math.isfinite(gn) and math.isfinite(f.item())
    if ok:
        mon.record(float(f), gn)
    return out, gn, ok


def _check_lr(lr: float | None) -> None:
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0 (or None for a line search), got {lr}")


def gd(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, line_search: str = "armijo",
       lr: float | None = None, clip: float | None = None, c1: float = 1e-4,
       c2: float = 0.9) -> OptimizeResult:
    """Steepest descent with a line search (see module doc)."""
    if line_search not in ("armijo", "strong-wolfe", "exact"):
        raise ValueError("line_search must be 'armijo', 'strong-wolfe' or 'exact', got "
                         f"{line_search!r}")
    _check_lr(lr)
    evaluate = ev.fgh if line_search == "exact" else ev.fg
    out, gn, ok = _start(mon, x0, evaluate)
    x, f, g = x0, out[0], out[1]
    if not ok:
        return mon.finish(x, f, g, 4, "At the starting point.")
    phi = float(f)
    prod = out[2] if len(out) > 2 else None
    prev: tuple[float, float] | None = None
    bb: float | None = None
    while True:
        if gn <= mon.gtol:
            return mon.finish(x, f, g, 0)
        if mon.nit >= mon.max_iter:
            return mon.finish(x, f, g, 1)
        d = -clip_direction(g, clip)
        dphi0 = float(torch.dot(g, d))
        line = LineFunction(evaluate, x, d)
        if line_search == "exact":
            ls = exact_quadratic(line, g, prod)
        else:
            if lr is not None:
                alpha0 = lr
            elif bb is not None:
                alpha0 = bb
            elif prev is None:
                alpha0 = min(1.0, 1.0 / max(float(torch.linalg.vector_norm(d)), 1e-300))
            else:
                alpha0 = prev[0] * prev[1] / dphi0
            if line_search == "armijo":
                ls = backtracking(line, phi, dphi0, alpha0, c1=c1)
            else:
                ls = strong_wolfe(line, phi, dphi0, alpha0, c1=c1, c2=c2)
        p = ls.point
        if p is None:
            return mon.finish(x, f, g, 3 if not dphi0 < 0 else 2, ls.message)
        mon.nit += 1
        prev = (p.alpha, dphi0)
        s_, y_ = p.x - x, p.g - g
        ss, sy = torch.stack((torch.dot(s_, s_), torch.dot(s_, y_))).tolist()
        bb = ss / sy if sy > 0 and math.isfinite(ss / sy) else None
        x, f, g, phi, prod = p.x, p.f, p.g, p.phi, p.extra
        gn = mon.gnorm(g)
        mon.record(phi, gn, step=p.alpha)
        if mon.stop_requested(x, f, g):
            return mon.finish(x, f, g, 5)
        if not ls.success and gn > mon.gtol:
            return mon.finish(x, f, g, 2, ls.message)


def momentum(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, lr: float | None = None,
             beta: float = 0.9, clip: float | None = None, c1: float = 1e-4
             ) -> OptimizeResult:
    """Polyak heavy ball with a monotone safeguard (see module doc)."""
    _check_lr(lr)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    (f, g), gn, ok = _start(mon, x0, ev.fg)
    x = x0
    if not ok:
        return mon.finish(x, f, g, 4, "At the starting point.")
    phi = float(f)
    m = None
    alpha = lr
    while True:
        if gn <= mon.gtol:
            return mon.finish(x, f, g, 0)
        if mon.nit >= mon.max_iter:
            return mon.finish(x, f, g, 1)
        gc = clip_direction(g, clip)
        m = gc if m is None else torch.add(gc, m, alpha=beta)
        if alpha is None:
            alpha = min(1.0, 1.0 / max(float(torch.linalg.vector_norm(gc)), 1e-300))
        alpha0 = lr if lr is not None else 2.0 * alpha
        dphi0 = -float(torch.dot(g, m))
        ls = None
        if dphi0 < 0:
            ls = backtracking(LineFunction(ev.fg, x, -m), phi, dphi0, alpha0, c1=c1,
                              max_evals=1 if lr is not None else 40)
        if ls is None or not ls.success:
            m = gc  # restart the momentum
            dphi0 = -float(torch.dot(g, m))
            ls = backtracking(LineFunction(ev.fg, x, -m), phi, dphi0, alpha0, c1=c1)
        p = ls.point
        if p is None:
            return mon.finish(x, f, g, 2 if dphi0 < 0 else 3, ls.message)
        mon.nit += 1
        alpha = p.alpha if lr is None else alpha
        x, f, g, phi = p.x, p.f, p.g, p.phi
        gn = mon.gnorm(g)
        mon.record(phi, gn, step=p.alpha)
        if mon.stop_requested(x, f, g):
            return mon.finish(x, f, g, 5)


def nesterov(ev: Evaluator, x0: torch.Tensor, mon: Monitor, *, lr: float | None = None,
             clip: float | None = None, max_backtracks: int = 60) -> OptimizeResult:
    """Accelerated gradient with Lipschitz backtracking and adaptive restart."""
    _check_lr(lr)
    (fy, gy), gn, ok = _start(mon, x0, ev.fg)
    x = y = x0
    if not ok:
        return mon.finish(y, fy, gy, 4, "At the starting point.")
    L = 1.0 / lr if lr is not None else max(float(torch.linalg.vector_norm(gy)), 1e-12)
    t = 1.0
    while True:
        if gn <= mon.gtol:
            return mon.finish(y, fy, gy, 0)
        if mon.nit >= mon.max_iter:
            return mon.finish(y, fy, gy, 1)
        gc = clip_direction(gy, clip)
        gg, phi_y = torch.stack((torch.dot(gc, gy), fy.to(gy.dtype))).tolist()
        found = False
        for _ in range(max_backtracks):
            x_new = torch.add(y, gc, alpha=-1.0 / L)
            fx_t, grad_at_x = ev.f_lazy(x_new)
            f_new = float(fx_t)
            if math.isfinite(f_new) and f_new <= phi_y - 0.5 * gg / L:
                found = True
                break
            L *= 2.0
        if not found:
            return mon.finish(y, fy, gy, 2, "Lipschitz backtracking failed.")
        mon.nit += 1
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        if float(torch.dot(gy, x_new - x)) > 0:
            t, t_new = 1.0, 1.0  # adaptive restart
        coef = (t - 1.0) / t_new
        y = torch.add(x_new, x_new - x, alpha=coef) if coef != 0 else x_new
        x, t = x_new, t_new
        if lr is None:
            L *= 0.9
        if coef == 0:  # y = x_new, already evaluated: only its gradient is missing
            fy, gy = fx_t, grad_at_x()
        else:
            fy, gy = ev.fg(y)
        gn = mon.gnorm(gy)
        if not (math.isfinite(gn) and math.isfinite(fy.item())):
            y, t = x, 1.0
            fy, gy = fx_t, grad_at_x()
            gn = mon.gnorm(gy)
        mon.record(fy, gn, step=1.0 / L)
        if mon.stop_requested(y, fy, gy):
            return mon.finish(y, fy, gy, 5)
