"""Nonlinear least squares: ``min_x F(x) = 1/2 sum_i C^2 rho(r_i(x)^2 / C^2)``.

``rho`` is the loss (scipy's conventions, ``z = r^2``, ``C = f_scale``): ``linear``
``rho(z) = z``; ``soft_l1`` ``2 (sqrt(1 + z) - 1)``; ``huber`` ``z`` if ``z <= 1`` else
``2 sqrt(z) - 1``; ``cauchy`` ``log(1 + z)``. Robust losses are handled by iteratively
reweighted least squares (IRLS): with ``w_i = rho'(r_i^2 / C^2)`` the weighted residual
``sqrt(w) r`` and Jacobian ``sqrt(w) J`` give the exact gradient ``grad F = J^T (w r)``
and a Gauss-Newton model that drops the ``rho''`` term (Holland & Welsch 1977).

Methods:

* ``lm`` -- Levenberg-Marquardt with the damping update of Madsen, Nielsen & Tingleff,
  *Methods for Non-Linear Least Squares Problems* (2004), Alg. 3.16: solve
  ``(J^T J + mu I) h = -g``, gain ratio ``rho = (F(x) - F(x + h)) / (1/2 h^T (mu h - g))``,
  accept when ``rho > 0`` with ``mu *= max(1/3, 1 - (2 rho - 1)^3)``, else
  ``mu *= nu, nu *= 2``; ``mu_0 = tau max diag(J^T J)``. When ``F`` changes only at
  rounding level the step is accepted if it reduces ``||grad F||_inf``.
* ``gauss-newton`` -- ``h = argmin ||J h + r||`` (minimum norm) with Armijo backtracking
  on ``F`` (N&W Sec. 10.3).

The Jacobian is formed densely (``jac_mode="dense"``, reverse or forward mode, whichever
is cheaper) or never (``"matrix-free"``: CG on the normal equations with products
``J v`` and ``J^T u`` from one linearization per iterate, two reverse passes each);
``"auto"`` goes matrix-free when ``m n > 4e6``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.func as tf

from curvlab.autodiff import jacobian
from curvlab.linalg.cg import cg
from curvlab.minimize.api import check_max_iter, check_positive, check_x0
from curvlab.minimize.evaluator import Monitor
from curvlab.minimize.result import OptimizeResult

__all__ = ["least_squares", "LOSSES"]

LOSSES = ("linear", "soft_l1", "huber", "cauchy")


def _rho(loss: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho(z), rho'(z))`` for ``z = r^2 / C^2``."""
    if loss == "linear":
        return z, torch.ones_like(z)
    if loss == "soft_l1":
        t = torch.sqrt(1.0 + z)
        return 2.0 * (t - 1.0), 1.0 / t
    if loss == "huber":
        big = z > 1.0
        sz = torch.sqrt(torch.where(big, z, torch.ones_like(z)))
        return torch.where(big, 2.0 * sz - 1.0, z), torch.where(big, 1.0 / sz,
                                                                torch.ones_like(z))
    return torch.log1p(z), 1.0 / (1.0 + z)


@dataclass
class _Counter:
    """Evaluation counts in the shape :class:`Monitor` reports."""

    shape: torch.Size
    nfev: int = 0
    ngev: int = 0
    nhvp: int = 0
    nhess: int = 0
    njev: int = 0
    njvp: int = 0


class _Linearization:
    """Residual, weights, gradient and ``J^T J`` products (or dense ``J``) at one point."""

    def __init__(self, fn: Callable, x: torch.Tensor, loss: str, C: float, dense: bool,
                 cnt: _Counter) -> None:
        cnt.nfev += 1
        cnt.ngev += 1
        r, vjp_fn = tf.vjp(fn, x)
        r = r.detach()
        rho, w = _rho(loss, (r / C) ** 2)
        self.r, self.F = r, 0.5 * C * C * rho.sum()
        self.sw = torch.sqrt(w)
        self.g = vjp_fn(w * r)[0].detach()
        self.J: torch.Tensor | None = None
        self.cnt = cnt
        if dense:
            cnt.njev += 1
            self.J = jacobian(fn, x).reshape(r.numel(), x.numel()).detach()
            self.Jw = self.sw[:, None] * self.J
        else:
            self._vjp = vjp_fn
            _, self._jvp = tf.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(r))

    def normal(self, v: torch.Tensor) -> torch.Tensor:
        """``J~^T J~ v`` with ``J~ = sqrt(w) J``."""
        if self.J is not None:
            return self.Jw.T @ (self.Jw @ v)
        self.cnt.njvp += 2
        jv = self._jvp(v)[0]
        return self._vjp(self.sw * self.sw * jv)[0].detach()

    def diag_max(self) -> float:
        """``max diag(J~^T J~)`` for ``mu_0``; matrix-free it is not available without ``n``
        products, so ``||g||_inf + 1`` stands in (LM adapts ``mu`` within a few steps)."""
        if self.J is not None:
            return float((self.Jw * self.Jw).sum(0).max())
        return float(self.g.abs().max()) + 1.0


def least_squares(residual_fn: Callable, x0: torch.Tensor, method: str = "lm",
                  loss: str = "linear", *, f_scale: float = 1.0, gtol: float = 1e-5,
                  max_iter: int | None = None, args: tuple = (), jac_mode: str = "auto",
                  tau: float = 1e-3, cg_max_iter: int | None = None, cg_rtol: float = 1e-8,
                  callback: Callable | None = None, history: bool = False
                  ) -> OptimizeResult:
    """Solve ``min_x 1/2 sum rho(r(x)^2)`` (see module doc) from ``x0``.

    ``residual_fn(x, *args)`` returns the residual tensor (any shape). Success means
    ``||grad F||_inf <= gtol`` at the returned ``x``. The result carries ``x``, ``fun``
    (``F``), ``grad``, ``residual``, ``jac`` (dense mode), ``nfev`` (residual
    linearizations and trial evaluations), ``njev`` (dense Jacobians), ``njvp``
    (Jacobian-vector products in matrix-free mode), plus the usual status fields.
    """
    if method not in ("lm", "gauss-newton"):
        raise ValueError(f"method must be 'lm' or 'gauss-newton', got {method!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if jac_mode not in ("auto", "dense", "matrix-free"):
        raise ValueError(f"jac_mode must be 'auto', 'dense' or 'matrix-free', got {jac_mode!r}")
    for name, value in (("f_scale", f_scale), ("gtol", gtol), ("tau", tau),
                        ("cg_rtol", cg_rtol)):
        check_positive(value, name)
    if max_iter is not None:
        check_max_iter(max_iter)
    if cg_max_iter is not None and (isinstance(cg_max_iter, bool) or
                                    not isinstance(cg_max_iter, int) or cg_max_iter < 1):
        raise ValueError(f"cg_max_iter must be an int >= 1 or None, got {cg_max_iter!r}")
    if not callable(residual_fn):
        raise TypeError("residual_fn must be callable")
    x = check_x0(x0)
    shape = x0.shape
    n = x.numel()

    def fn(z: torch.Tensor) -> torch.Tensor:
        return residual_fn(z.view(shape), *args).reshape(-1)

    with torch.no_grad():
        r0 = residual_fn(x.view(shape), *args)
    if not isinstance(r0, torch.Tensor) or not r0.is_floating_point():
        got = r0.dtype if isinstance(r0, torch.Tensor) else type(r0).__name__
        raise TypeError(f"residual_fn must return a floating-point tensor, got {got}; compute "
                        "it from x with torch operations (torch.stack([...]) for a list of "
                        "scalar tensors)")
    m = r0.numel()
    dense = jac_mode == "dense" or (jac_mode == "auto" and m * n <= 4_000_000)
    cnt = _Counter(shape, nfev=1)
    max_iter = max(100, 100 * n) if max_iter is None else int(max_iter)
    mon = Monitor(method, cnt, float(gtol), max_iter, callback, history)  # type: ignore[arg-type]
    C = float(f_scale)
    eps = torch.finfo(x.dtype).eps
    max_cg = 2 * n if cg_max_iter is None else int(cg_max_iter)

    def value(z: torch.Tensor) -> float:
        cnt.nfev += 1
        with torch.no_grad():
            r = fn(z)
            return float(0.5 * C * C * _rho(loss, (r / C) ** 2)[0].sum())

    def finish(lin: _Linearization, status: int, extra: str = "") -> OptimizeResult:
        return mon.finish(x, lin.F, lin.g, status, extra, residual=lin.r.view(-1),
                          jac=lin.J, njev=cnt.njev, njvp=cnt.njvp)

    def solve(lin: _Linearization, mu: float) -> torch.Tensor:
        if lin.J is not None:
            if mu == 0.0:
                rhs = (lin.sw * lin.r).unsqueeze(1)
                if lin.Jw.device.type == "cpu":
                    return -torch.linalg.lstsq(lin.Jw, rhs, driver="gelsd").solution.squeeze(1)
                return -(torch.linalg.pinv(lin.Jw) @ rhs).squeeze(1)
            A = lin.Jw.T @ lin.Jw
            A.diagonal().add_(mu)
            Lc, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                return -torch.cholesky_solve(lin.g.unsqueeze(1), Lc).squeeze(1)
            return -torch.linalg.solve(A, lin.g)
        res = cg(lambda v: lin.normal(v) + mu * v, -lin.g, rtol=cg_rtol, max_iter=max_cg)
        return res.x

    lin = _Linearization(fn, x, loss, C, dense, cnt)
    if not (bool(torch.isfinite(lin.F)) and bool(torch.isfinite(lin.g).all())):
        return finish(lin, 4, "At the starting point.")
    gn = mon.gnorm(lin.g)
    Fv = float(lin.F)
    mon.record(Fv, gn)
    mu = tau * lin.diag_max()
    nu = 2.0
    while True:
        if gn <= mon.gtol:
            return finish(lin, 0)
        if mon.nit >= max_iter:
            return finish(lin, 1)
        mon.nit += 1
        if method == "lm":
            h = solve(lin, mu)
            hn = float(torch.linalg.vector_norm(h))
            if hn <= eps * (float(torch.linalg.vector_norm(x)) + eps):
                return finish(lin, 6)
            F_new = value(x + h)
            predicted = 0.5 * float(torch.dot(h, mu * h - lin.g))
            gain = (Fv - F_new) / predicted if math.isfinite(F_new) and predicted > 0 else -1.0
            new = None
            if not gain > 0 and math.isfinite(F_new) and abs(Fv - F_new) <= 100 * eps * abs(Fv):
                # the change of F is at rounding level: judge the step by the gradient
                trial = _Linearization(fn, x + h, loss, C, dense, cnt)
                if mon.gnorm(trial.g) < gn:
                    new, gain = trial, 0.5
            if gain > 0:
                x = x + h
                lin = new if new is not None else _Linearization(fn, x, loss, C, dense, cnt)
                Fv, gn = float(lin.F), mon.gnorm(lin.g)
                mu *= max(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
                nu = 2.0
            else:
                mu *= nu
                nu *= 2.0
                if not math.isfinite(mu):
                    return finish(lin, 6)
            mon.record(Fv, gn, step=hn, radius=mu)
        else:
            h = solve(lin, 0.0)
            slope = float(torch.dot(lin.g, h))
            if not slope < 0:
                return finish(lin, 3)
            alpha, accepted = 1.0, False
            for _ in range(60):
                F_new = value(x + alpha * h)
                if math.isfinite(F_new) and F_new <= Fv + 1e-4 * alpha * slope:
                    accepted = True
                    break
                alpha *= 0.5
            if not accepted:
                return finish(lin, 2)
            x = x + alpha * h
            lin = _Linearization(fn, x, loss, C, dense, cnt)
            Fv, gn = float(lin.F), mon.gnorm(lin.g)
            mon.record(Fv, gn, step=alpha)
        if mon.stop_requested(x, lin.F, lin.g):
            return finish(lin, 5)
