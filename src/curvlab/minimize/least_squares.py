"""Nonlinear least squares: ``min_x F(x) = 1/2 sum_i C^2 rho(r_i(x)^2 / C^2)``.

``rho`` is the loss (scipy's conventions, ``z = r^2``, ``C = f_scale``): ``linear``
``rho(z) = z``; ``soft_l1`` ``2 (sqrt(1 + z) - 1)``; ``huber`` ``z`` if ``z <= 1`` else
``2 sqrt(z) - 1``; ``cauchy`` ``log(1 + z)``; ``arctan`` ``arctan(z)``; or a callable
``loss(z)`` returning ``(rho, rho', rho'')`` stacked (shape ``(3, m)``; ``rho''`` is not
used). Robust losses are handled by iteratively
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
  on ``F`` (N&W Sec. 10.3). Its convergence needs the singular values of ``J`` bounded
  away from zero (N&W Thm. 10.1); when the iterates approach a point where ``J`` loses
  rank with ``grad F != 0`` (scipy's BVP test: ``s_min / s_max -> 1e-10`` at cost 19.8)
  the step's angle with ``-grad F`` goes to 90 degrees and the steps to zero. The run
  then stops with status 6 once that cosine, in the variables scaled by ``D`` (below), is
  below ``sqrt(eps)``; ``lm`` solves such problems.
* ``bounds=(lb, ub)`` (both methods): an active-set projected LM / Gauss-Newton step
  (Kanzow, Yamashita & Fukushima, JCAM 172, 2004): variables at a bound whose gradient
  pushes outward are fixed, the step is solved on the free ones and the trial point is
  projected onto the box; ``rho`` uses the Gauss-Newton model at the projected step.

Stopping (MINPACK's three scale-free tests, More, "The Levenberg-Marquardt algorithm:
implementation and theory", 1978, and ``lmder``; scipy's names and defaults). With ``D``
the column norms of the (weighted) Jacobian (running maximum, MINPACK's ``mode=1``; or
``1 / x_scale``) and
``h_GN = -J^+ r`` the Gauss-Newton step at the current point:

* ``gtol``: ``max_j |J_j^T r| / (||J_j|| ||r||) <= gtol`` -- the cosine of the angle
  between the residual and every column of ``J`` (free columns under bounds);
* ``ftol``: the last step reduced ``F`` by a relative ``<= ftol``, predicted and actual,
  *and* the Gauss-Newton model at ``x`` predicts a relative reduction ``||J h_GN||^2 /
  ||r||^2 <= ftol``;
* ``xtol``: the last step was relatively small, ``||D p|| <= xtol (xtol + ||D x||)``, *and*
  so is the Gauss-Newton step at ``x``, ``||D h_GN|| <= xtol (xtol + ||D x||)``.

The second half of ``ftol`` / ``xtol`` is checked at the returned point with the undamped
step, so a run whose damping grew (tiny steps far from a solution, where MINPACK's
trust-radius form of the test also fires) does not stop there. ``success`` means one of
these holds (``message`` names it), or ``F = 0``; ``gtol_abs`` adds the absolute test
``||grad F||_inf <= gtol_abs``. A zero Jacobian with a nonzero residual (an underflowed
model) and a residual with no autograd graph get their own statuses (8, 9).

The Jacobian is formed densely (``jac_mode="dense"``: forward or reverse mode, whichever
is cheaper, or the user's ``jac``) or never (``"matrix-free"``: CG on the normal
equations with products ``J v`` and ``J^T u`` from one linearization per iterate, two
reverse passes each); ``"auto"`` goes matrix-free when ``m n > 4e6``. Counts: ``nfev``
residual evaluations (trial points, finite differences), ``njev`` Jacobians (or
linearizations), as scipy counts them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.func as tf

from curvlab.linalg.cg import cg
from curvlab.minimize.api import check_max_iter, check_positive, check_x0
from curvlab.minimize.evaluator import Monitor
from curvlab.minimize.result import OptimizeResult
from curvlab.minimize.scipy_compat import (
    as_tensor_x0,
    fd_jacobian,
    is_numpy_input,
    to_numpy_result,
    wrap_callback,
)

__all__ = ["least_squares", "LOSSES"]

logger = logging.getLogger(__name__)

LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")

#: scipy's least_squares method names -> curvlab's (trust-region reflective and dogbox
#: both handle bounds; curvlab's LM does, with projected steps).
METHOD_ALIASES = {"trf": "lm", "dogbox": "lm", "lm": "lm", "gauss-newton": "gauss-newton"}


def _rho(loss: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho(z), rho'(z))`` for ``z = r^2 / C^2``."""
    if callable(loss):
        return _user_rho(loss, z)
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
    if loss == "arctan":
        return torch.atan(z), 1.0 / (1.0 + z * z)
    return torch.log1p(z), 1.0 / (1.0 + z)


def _user_rho(loss: Callable, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A callable loss as scipy's: ``loss(z)`` returns ``(3, m)`` rows ``rho, rho',
    rho''`` (NumPy in and out, or tensors); IRLS reads the first two and needs ``rho' >=
    0`` (its weights are ``sqrt(rho')``)."""
    out = loss(z.detach().cpu().numpy())
    out = torch.as_tensor(np.asarray(out, dtype=np.float64)).to(z)
    if out.dim() != 2 or out.shape[0] < 2 or out.shape[1] != z.numel():
        raise ValueError(f"a callable loss must return an array of shape (3, {z.numel()}) "
                         f"(rho, rho', rho'' of z = (r / f_scale)^2), got {tuple(out.shape)}")
    if not bool((out[1] >= 0).all()):
        raise ValueError("a callable loss must have rho'(z) >= 0 (curvlab's least squares "
                         "reweights the residuals by sqrt(rho'))")
    return out[0], out[1]


class _Residual:
    """Counted residual evaluations ``r(x)`` (flat, in ``x``'s dtype) and Jacobians.

    Jacobians come from the user's ``jac`` (callable), from torch autodiff (forward mode
    when ``n <= m``, else reverse; one call of ``fun`` each) or, for NumPy functions
    without ``jac``, from finite differences with relative step ``diff_step``; their
    evaluations count in ``nfev`` (and against ``max_nfev``) when ``count_fd`` (scipy's
    ``'lm'``, MINPACK), else in ``nfev_fd`` only (scipy's ``'trf'`` / ``'dogbox'``).
    """

    def __init__(self, fun: Callable, shape: torch.Size, args: tuple, kwargs: dict,
                 jac: Any, numpy_mode: bool, *, diff_step: float | None = None,
                 count_fd: bool = True) -> None:
        self.fun, self.shape, self.args, self.kwargs = fun, shape, tuple(args), dict(kwargs)
        self.jac, self.numpy_mode = jac, numpy_mode
        self.diff_step, self.count_fd = diff_step, count_fd
        self.nfev = self.njev = self.njvp = self.nfev_fd = 0
        self.ngev = self.nhvp = self.nhess = 0  # the fields Monitor reports

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.numpy_mode:
            out = self.fun(x.detach().cpu().numpy().reshape(self.shape), *self.args,
                           **self.kwargs)
            return torch.as_tensor(np.asarray(out, dtype=np.float64)).reshape(-1).to(x)
        out = self.fun(x.view(self.shape), *self.args, **self.kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"residual_fn must return a floating-point tensor, got {got} (for "
                            "a tensor x0); compute it from x with torch operations "
                            "(torch.stack([...]) for a list of scalar tensors), or pass x0 as "
                            "NumPy for a NumPy function")
        return out.reshape(-1)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        self.nfev += 1
        with torch.no_grad():
            return self._call(x).to(x.dtype)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """First evaluation: the residual and whether it has an autograd graph in ``x``."""
        self.nfev += 1
        if self.numpy_mode or self.jac is not None:
            with torch.no_grad():
                return self._call(x).to(x.dtype), True
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self._call(xr)
        return r.detach().to(x.dtype), r.requires_grad

    def jacobian(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        self.njev += 1
        m, n = r.numel(), x.numel()
        if callable(self.jac):
            if self.numpy_mode:
                J = np.asarray(self.jac(x.cpu().numpy().reshape(self.shape), *self.args,
                                        **self.kwargs), dtype=np.float64)
                J = torch.from_numpy(np.atleast_2d(J).copy())
            else:
                with torch.no_grad():
                    J = self.jac(x.view(self.shape), *self.args, **self.kwargs)
            if J.numel() != m * n:
                raise ValueError(f"jac must return an ({m}, {n}) Jacobian, got shape "
                                 f"{tuple(J.shape)}")
            return J.reshape(m, n).to(x)
        if self.numpy_mode:
            scheme = self.jac if isinstance(self.jac, str) else "2-point"

            def f(z: np.ndarray) -> np.ndarray:
                return np.asarray(self.fun(z.reshape(self.shape), *self.args, **self.kwargs),
                                  dtype=np.float64).ravel()

            J, k = fd_jacobian(f, x.cpu().numpy().astype(np.float64), r.cpu().numpy(), scheme,
                               self.diff_step)
            if self.count_fd:
                self.nfev += k
            else:
                self.nfev_fd += k
            return torch.from_numpy(J).to(x)

        def fn(z: torch.Tensor) -> torch.Tensor:
            return self._call(z)

        if n <= m:
            try:
                return tf.jacfwd(fn)(x).reshape(m, n).to(x.dtype)
            except (RuntimeError, NotImplementedError) as err:
                if "forward" not in str(err).lower():
                    raise
        return tf.jacrev(fn)(x).reshape(m, n).to(x.dtype)

    def linear_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable, Callable]:
        """Matrix-free: ``(r, v -> J v, u -> J^T u)`` from one linearization."""
        if self.numpy_mode or self.jac is not None:
            raise ValueError("jac_mode='matrix-free' needs torch autodiff of the residual; "
                             "use jac_mode='dense' with a user jac or NumPy functions")
        self.njev += 1
        r, vjp_fn = tf.vjp(self._call, x)
        _, jvp_t = tf.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(r))

        def jvp(v: torch.Tensor) -> torch.Tensor:
            self.njvp += 1
            return jvp_t(v.to(r.dtype))[0].detach().to(x.dtype)

        def vjp(u: torch.Tensor) -> torch.Tensor:
            self.njvp += 1
            return vjp_fn(u.to(r.dtype))[0].detach().to(x.dtype)

        return r.detach().to(x.dtype), jvp, vjp


class _Linearization:
    """Residual, weights, gradient and the (weighted) Jacobian or its products at ``x``."""

    def __init__(self, model: _Residual, x: torch.Tensor, r: torch.Tensor | None, loss: Any,
                 C: float, dense: bool) -> None:
        self.model = model
        if dense:
            if r is None:
                r = model.value(x)
            self.J: torch.Tensor | None = model.jacobian(x, r)
        else:
            r, self._jvp, self._vjp = model.linear_maps(x)
            self.J = None
        rho, w = _rho(loss, (r / C) ** 2)
        self.r, self.F = r, 0.5 * C * C * rho.sum()
        self.sw = torch.sqrt(w)
        self.rw = self.sw * r  # weighted residual
        if self.J is not None:
            self.Jw = self.sw[:, None] * self.J
            self.g = self.Jw.T @ self.rw
            self.colnorm = torch.linalg.vector_norm(self.Jw, dim=0)
        else:
            self.g = self._vjp(w * r)
            self.colnorm = None

    def jw(self, v: torch.Tensor) -> torch.Tensor:
        """``J~ v`` with ``J~ = sqrt(w) J``."""
        if self.J is not None:
            return self.Jw @ v
        return self.sw * self._jvp(v)

    def normal(self, v: torch.Tensor) -> torch.Tensor:
        """``J~^T J~ v``."""
        if self.J is not None:
            return self.Jw.T @ (self.Jw @ v)
        return self._vjp(self.sw * self.sw * self._jvp(v))

    def diag_max(self) -> float:
        """``max diag(J~^T J~)`` for ``mu_0``; matrix-free ``||J~ g||^2 / ||g||^2`` (a
        Rayleigh quotient, one product) stands in."""
        if self.J is not None:
            return float((self.colnorm ** 2).max())
        gn = float(torch.linalg.vector_norm(self.g))
        if gn == 0:
            return 1.0
        return float(torch.linalg.vector_norm(self.jw(self.g))) ** 2 / gn ** 2

    def cosine(self, free: torch.Tensor | None) -> float:
        """``max_j |J_j^T r| / (||J_j|| ||r||)`` over the free columns (dense); matrix-free
        the cosine between ``r`` and ``J g`` (``g = J^T r``), ``||g||^2 / (||r|| ||J g||)``,
        which is at least the largest column cosine's share of it, no larger than the
        angle to the range of ``J``."""
        rn = float(torch.linalg.vector_norm(self.rw))
        g = self.g if free is None else self.g * free
        if rn == 0:
            return 0.0
        if self.colnorm is not None:
            cn = self.colnorm if free is None else self.colnorm * free
            ok = cn > 0
            if not bool(ok.any()):
                return 0.0
            return float((g[ok].abs() / cn[ok]).max()) / rn
        gg = float(torch.dot(g, g))
        if gg == 0:
            return 0.0
        return gg / (rn * float(torch.linalg.vector_norm(self.jw(g))))

    def zero_jacobian(self, x: torch.Tensor, free: torch.Tensor | None = None,
                      every: bool = False) -> bool:
        """Whether ``J`` is zero (an underflowed model, or no dependence on ``x``): dense,
        whether some free parameter's column norm ``||J_j||`` and effect ``||J_j|| |x_j|``
        are both below rounding relative to the largest: the data do not determine it."""
        if self.colnorm is not None:
            cn = self.colnorm if free is None else self.colnorm[free > 0]
            if cn.numel() == 0:
                return False
            xa = x.abs() if free is None else x.abs()[free > 0]
            effect = torch.where(xa > 0, cn * xa, cn)
            top = float(effect.max())
            if every:
                return top == 0
            eps = torch.finfo(x.dtype).eps
            return top == 0 or bool(((effect <= eps * top) & (cn <= eps * cn.max())).any())
        if bool((self.g != 0).any()):
            return False
        v = torch.ones_like(self.g)
        return not bool((self.jw(v) != 0).any())


class _SVDModel:
    """The Gauss-Newton model ``1/2 ||J p + r||^2`` at one point through the SVD of the
    column-scaled Jacobian ``J D^{-1} = U S V^T`` (``b = U^T r``), for MINPACK's ``lmpar``
    problem (More 1978, Sec. 5): the step minimizing the model subject to ``||D p|| <=
    delta`` is ``D p = -V (s b / (s^2 + par))`` with ``par = 0`` if the minimum-norm
    Gauss-Newton step fits, else ``||D p|| = delta`` to 10% by safeguarded Newton on
    ``1/||D p(par)|| - 1/delta``. Also gives the scale-free stopping quantities at this
    point: ``gn_ratio = ||J h_GN||^2 / ||r||^2`` (the relative reduction the undamped model
    predicts, twice the Gauss-Newton decrement over ``||r||^2``) and ``||D h_GN||``."""

    def __init__(self, Jw: torch.Tensor, rw: torch.Tensor, d: torch.Tensor) -> None:
        U, S, Vh = torch.linalg.svd(Jw / d, full_matrices=False)
        b = U.T @ rw
        cut = S > S.max() * max(Jw.shape) * torch.finfo(S.dtype).eps
        self.S, self.Vh, self.d, self.cut = S, Vh, d, cut
        self.b = torch.where(cut, b, torch.zeros_like(b))
        self.sb = torch.where(cut, S * b, torch.zeros_like(b))
        self.s2 = torch.where(cut, S * S, torch.ones_like(S))
        sb_h, s2_h, b_h = (t.double().cpu().numpy() for t in (self.sb, self.s2, self.b))
        self._h = (sb_h, s2_h, cut.cpu().numpy())
        rn2 = float(torch.dot(rw, rw))
        self.gn_ratio = float(np.dot(b_h, b_h)) / rn2 if rn2 > 0 else 0.0
        self.gn_dnorm = self._norm_at(0.0)

    def _norm_at(self, par: float) -> float:
        sb_h, s2_h, cut_h = self._h
        return float(np.sqrt(np.sum((sb_h / (s2_h + par)) ** 2 * cut_h)))

    def step(self, delta: float, par0: float) -> tuple[torch.Tensor, float, float]:
        """``(p, par, predicted reduction of 1/2 ||r||^2)`` for the radius ``delta``."""
        sb_h, s2_h, cut_h = self._h
        par, pn = 0.0, self.gn_dnorm
        if pn > 1.1 * delta:
            lo, hi = 0.0, float(np.sqrt(np.sum(sb_h ** 2))) / delta
            par = min(par0, hi) if par0 > 0 else 1e-3 * hi
            for _ in range(30):
                pn = self._norm_at(par)
                if abs(pn - delta) <= 0.1 * delta:
                    break
                if pn > delta:
                    lo = par
                else:
                    hi = par
                q = float(np.sum(sb_h ** 2 / (s2_h + par) ** 3 * cut_h))
                new = par + (pn - delta) / delta * pn * pn / q if q > 0 else 0.5 * (lo + hi)
                par = new if lo < new < hi else 0.5 * (lo + hi)
        p = -(self.Vh.T @ (self.sb / (self.s2 + par))) / self.d
        c = self.s2 * self.b / (self.s2 + par)
        pred = float(torch.dot(self.b, c)) - 0.5 * float(torch.dot(c, c))
        return p, par, pred


def _bounds(bounds: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(lb, ub)`` as tensors shaped like ``x`` (scipy's ``(lb, ub)`` or ``Bounds``), or
    None when unbounded."""
    if bounds is None:
        return None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        bounds = (bounds.lb, bounds.ub)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError("bounds must be (lb, ub) (scalars or arrays shaped like x0) or a "
                         f"scipy.optimize.Bounds, got {bounds!r}")
    out = []
    for b, inf in zip(bounds, (-math.inf, math.inf), strict=True):
        if b is None:
            b = inf
        t = torch.as_tensor(np.asarray(b, dtype=np.float64) if not isinstance(b, torch.Tensor)
                            else b).to(x)
        out.append(torch.broadcast_to(t.reshape(-1) if t.dim() else t, x.shape).clone())
    lb, ub = out
    if bool((lb >= ub).any()):
        raise ValueError("each lower bound must be strictly less than its upper bound")
    if bool(torch.isinf(lb).all()) and bool(torch.isinf(ub).all()):
        return None
    return lb, ub


def least_squares(residual_fn: Callable, x0: torch.Tensor, method: str | None = None,
                  loss: Any = "linear", *, f_scale: float = 1.0, gtol: float | None = 1e-8,
                  max_iter: int | None = None, args: tuple = (), jac_mode: str = "auto",
                  tau: float = 1e-3, cg_max_iter: int | None = None, cg_rtol: float = 1e-8,
                  callback: Callable | None = None, history: bool = False,
                  ftol: float | None = 1e-14, xtol: float | None = 1e-8,
                  gtol_abs: float | None = None, jac: Any = None, bounds: Any = None,
                  max_nfev: int | None = None, kwargs: dict | None = None, verbose: int = 0,
                  x_scale: Any = None, diff_step: float | None = None,
                  tr_solver: str | None = None, tr_options: dict | None = None
                  ) -> OptimizeResult:
    """Solve ``min_x 1/2 sum rho(r(x)^2)`` (see module doc) from ``x0``.

    ``residual_fn(x, *args, **kwargs)`` returns the residual (any shape): a tensor for a
    tensor ``x0``; for a NumPy ``x0`` it takes and returns NumPy arrays (scipy's
    contract) and the result is NumPy. ``jac``: None / ``'2-point'`` / ``'3-point'``
    (autodiff for torch functions, finite differences for NumPy ones) or a callable
    returning the ``(m, n)`` Jacobian. ``method``: ``'lm'`` (the default, None; also
    scipy's ``'trf'`` / ``'dogbox'``) or ``'gauss-newton'``. ``ftol`` / ``xtol`` /
    ``gtol``: the scale-free stopping tests of the module doc (None disables one);
    ``gtol_abs``: optional absolute ``||grad F||_inf`` test. ``bounds=(lb, ub)``: box
    constraints (``x0`` must be inside). ``max_iter`` / ``max_nfev``: iteration and
    residual-evaluation budgets (as scipy's: for a NumPy function without ``jac``, the
    finite-difference evaluations count with ``method='lm'``, default ``100 n (n + 1)``,
    and not with ``'trf'`` / ``'dogbox'`` or no method (scipy's default is ``'trf'``),
    default ``100 n``: then ``nfev_fd`` reports them). ``diff_step``: scipy's relative
    finite-difference step. ``tr_solver``: scipy's ``'exact'`` (dense) or ``'lsmr'``
    (matrix-free, torch functions) picks ``jac_mode``; ``tr_options`` are not used.
    ``x_scale``
    (scipy's): the characteristic scale of each variable, ``D = 1 / x_scale`` in the trust
    region and the ``xtol`` test (``'jac'`` or None, the default: ``D`` from the
    Jacobian's column norms, MINPACK's ``mode=1``, as scipy's ``lm``).

    The result (scipy's fields): ``x``, ``cost`` (``F``), ``fun`` (the residual vector),
    ``jac`` (dense mode), ``grad``, ``optimality`` (``||grad||_inf``, projected under
    bounds), ``active_mask`` (-1 / 1 at an active lower / upper bound), ``nfev``, ``njev``,
    ``njvp`` (matrix-free products), ``nit``, ``success``, ``status``, ``message``.
    """
    # scipy counts finite-difference evaluations in nfev (and max_nfev) for 'lm' only; its
    # default method is 'trf' (None here: curvlab's LM with trf's counting)
    count_fd = method in ("lm", "gauss-newton")
    method = "lm" if method is None else method
    method = METHOD_ALIASES.get(method, method) if isinstance(method, str) else method
    if tr_solver is not None:  # scipy's trust-region solver: a dense or an iterative one
        if tr_solver not in ("exact", "lsmr"):
            raise ValueError(f"tr_solver must be 'exact', 'lsmr' or None, got {tr_solver!r}")
        if jac_mode == "auto":
            jac_mode = "dense" if tr_solver == "exact" else "matrix-free"
    if tr_options:
        logger.info("least_squares: tr_options %s are scipy's (lsmr / regularize) and are "
                    "not used; cg_max_iter and cg_rtol set the matrix-free solver",
                    sorted(tr_options))
    if diff_step is not None and not (isinstance(diff_step, (int, float)) and diff_step > 0
                                      and math.isfinite(diff_step)):
        raise ValueError(f"diff_step must be a positive number or None, got {diff_step!r}")
    if method not in ("lm", "gauss-newton"):
        raise ValueError("method must be 'lm' or 'gauss-newton' (scipy's 'trf' and 'dogbox' "
                         f"run 'lm'), got {method!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable loss(z) -> (rho, rho', "
                         f"rho''), got {loss!r}")
    if jac_mode not in ("auto", "dense", "matrix-free"):
        raise ValueError(f"jac_mode must be 'auto', 'dense' or 'matrix-free', got {jac_mode!r}")
    for name, value in (("f_scale", f_scale), ("tau", tau), ("cg_rtol", cg_rtol),
                        ("gtol", gtol)):
        if value is not None or name != "gtol":  # gtol=None disables that test
            check_positive(value, name)
    if max_iter is not None:
        check_max_iter(max_iter)
    if cg_max_iter is not None and (isinstance(cg_max_iter, bool) or
                                    not isinstance(cg_max_iter, int) or cg_max_iter < 1):
        raise ValueError(f"cg_max_iter must be an int >= 1 or None, got {cg_max_iter!r}")
    if not callable(residual_fn):
        raise TypeError("residual_fn must be callable")
    if not (jac is None or callable(jac) or jac in ("2-point", "3-point")):
        raise ValueError("jac must be None, '2-point', '3-point' or a callable returning the "
                         f"(m, n) Jacobian, got {jac!r}")
    tols = {}
    for name, v in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol), ("gtol_abs", gtol_abs)):
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"{name} must be a number >= 0 or None, got {v!r}")
        tols[name] = 0.0 if v is None else float(v)
    if not any(tols.values()):
        raise ValueError("at least one of ftol, xtol, gtol, gtol_abs must be > 0")
    numpy_mode = is_numpy_input(x0)
    if numpy_mode:
        x0 = as_tensor_x0(x0)
    x = check_x0(x0)
    shape = x0.shape
    n = x.numel()
    model = _Residual(residual_fn, shape, args, kwargs or {}, jac, numpy_mode,
                      diff_step=diff_step, count_fd=count_fd)
    box = _bounds(bounds, x)
    fixed_scale = None  # D = 1 / x_scale; None: the Jacobian's column norms ('jac')
    if not (x_scale is None or (isinstance(x_scale, str) and x_scale == "jac")):
        xs = x_scale.detach().cpu().numpy() if isinstance(x_scale, torch.Tensor) else x_scale
        try:
            xs = np.broadcast_to(np.asarray(xs, dtype=np.float64), (n,))
        except (TypeError, ValueError):
            xs = np.array([np.nan])
        if not (np.all(np.isfinite(xs)) and np.all(xs > 0)):
            raise ValueError("x_scale must be 'jac', None or positive finite numbers, one per "
                             f"variable (or one for all), got {x_scale!r}")
        fixed_scale = torch.as_tensor(1.0 / xs, dtype=x.dtype, device=x.device)
    if box is not None and bool(((x < box[0]) | (x > box[1])).any()):
        raise ValueError("x0 is infeasible: it must lie within bounds (lb <= x0 <= ub)")
    r0, has_graph = model.probe(x)
    m = r0.numel()
    dense = (jac_mode == "dense" or jac is not None or numpy_mode
             or (jac_mode == "auto" and m * n <= 4_000_000))
    max_iter = max(100, 100 * n) if max_iter is None else int(max_iter)
    if max_nfev is None:  # scipy's defaults ('lm' with an estimated Jacobian: 100 n (n+1))
        max_nfev = 100 * n * (n + 1) if numpy_mode and not callable(jac) and count_fd else (
            100 * n)
    max_nfev = int(max_nfev)
    to_user = (lambda v: v) if not numpy_mode else (
        lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
    cb = wrap_callback(callback, to_user, scipy_rule=numpy_mode)
    mon = Monitor(method, model, max(tols["gtol_abs"], 0.0), max_iter, cb,  # type: ignore
                  history)
    C = float(f_scale)
    eps = torch.finfo(x.dtype).eps
    if tols["ftol"]:  # below ~50 eps the Gauss-Newton prediction is rounding noise
        tols["ftol"] = max(tols["ftol"], 50 * eps)
    max_cg = 2 * n if cg_max_iter is None else int(cg_max_iter)
    lb, ub = box if box is not None else (None, None)

    def value(z: torch.Tensor) -> tuple[float, torch.Tensor]:
        r = model.value(z)
        return float(0.5 * C * C * _rho(loss, (r / C) ** 2)[0].sum()), r

    def free_mask(lin: _Linearization, z: torch.Tensor) -> torch.Tensor | None:
        """1 for variables off their bounds or whose gradient points inside, else 0."""
        if box is None:
            return None
        tiny = 10 * eps * (1.0 + z.abs())
        bind = ((z <= lb + tiny) & (lin.g > 0)) | ((z >= ub - tiny) & (lin.g < 0))
        return (~bind).to(z.dtype)

    def project(z: torch.Tensor) -> torch.Tensor:
        return z if box is None else torch.minimum(torch.maximum(z, lb), ub)

    def proj_grad(lin: _Linearization, z: torch.Tensor) -> torch.Tensor:
        return lin.g if box is None else z - project(z - lin.g)

    def finish(lin: _Linearization, status: int, extra: str = "", test: str = ""
               ) -> OptimizeResult:
        res = mon.finish(x, lin.F, lin.g, status, extra, test=test, jac=lin.J,
                         njev=model.njev, njvp=model.njvp)
        res["cost"] = res["fun"]
        res["fun"] = lin.r.view(-1)
        res["optimality"] = float(torch.linalg.vector_norm(proj_grad(lin, x), math.inf))
        active = torch.zeros(n, dtype=torch.int64)
        if box is not None:
            tiny = 10 * eps * (1.0 + x.abs())
            active[(x <= lb + tiny).cpu()] = -1
            active[(x >= ub - tiny).cpu()] = 1
        res["active_mask"] = active.numpy() if numpy_mode else active
        for k in ("ngev", "nhvp", "nhess", "grad_norm"):
            res.pop(k, None)
        if model.nfev_fd:
            res["nfev_fd"] = model.nfev_fd  # finite-difference evaluations outside nfev
        if verbose:
            logger.info("least_squares: %s (nfev=%d, njev=%d, cost=%.6g)", res.message,
                        res.nfev, res.njev, float(res.cost))
        return to_numpy_result(res) if numpy_mode else res

    def solve(lin: _Linearization, mu: float, free: torch.Tensor | None,
              rtol: float = cg_rtol) -> torch.Tensor:
        """``(J~_F^T J~_F + mu I) h_F = -g_F`` on the free variables (``h = 0`` on the
        others); ``mu = 0``: the minimum-norm Gauss-Newton step."""
        if lin.J is not None:
            Jw, g = lin.Jw, lin.g
            idx = None
            if free is not None and not bool(free.all()):
                idx = free.nonzero().squeeze(1)
                Jw, g = Jw[:, idx], g[idx]
            if Jw.shape[1] == 0:
                return torch.zeros_like(x)
            if mu == 0.0:
                rhs = lin.rw.unsqueeze(1)
                if Jw.device.type == "cpu":
                    hf = -torch.linalg.lstsq(Jw, rhs, driver="gelsd").solution.squeeze(1)
                else:
                    hf = -(torch.linalg.pinv(Jw) @ rhs).squeeze(1)
            else:
                A = Jw.T @ Jw
                A.diagonal().add_(mu)
                Lc, info = torch.linalg.cholesky_ex(A)
                if int(info) == 0:
                    hf = -torch.cholesky_solve(g.unsqueeze(1), Lc).squeeze(1)
                else:
                    hf = -torch.linalg.lstsq(A, g.unsqueeze(1)).solution.squeeze(1)
            if idx is None:
                return hf
            h = torch.zeros_like(x)
            h[idx] = hf
            return h
        f = free if free is not None else None
        if f is None:
            op = lambda v: lin.normal(v) + mu * v  # noqa: E731
            rhs = -lin.g
        else:
            op = lambda v: f * lin.normal(f * v) + mu * v  # noqa: E731
            rhs = -lin.g * f
        return cg(op, rhs, rtol=rtol, max_iter=max_cg).x

    # D: running maximum of the column norms (MINPACK's mode=1 scaling), 1 matrix-free
    scale: list[torch.Tensor | None] = [fixed_scale]

    def update_scale(lin: _Linearization) -> None:
        if lin.colnorm is None or fixed_scale is not None:
            return
        cn = torch.where(lin.colnorm > 0, lin.colnorm, torch.ones_like(lin.colnorm))
        scale[0] = cn if scale[0] is None else torch.maximum(scale[0], cn)

    def dnorm(v: torch.Tensor) -> float:
        d = scale[0]
        return float(torch.linalg.vector_norm(v if d is None else d * v))

    def point_tests(lin: _Linearization, free: torch.Tensor | None) -> str:
        """The tests that hold at ``x`` from its own derivatives: zero residual, gtol,
        gtol_abs."""
        if float(lin.F) == 0.0:
            return "zero"
        if tols["gtol"] and lin.cosine(free) <= tols["gtol"]:
            return "gtol_scaled"
        if tols["gtol_abs"] and float(torch.linalg.vector_norm(
                proj_grad(lin, x), math.inf)) <= tols["gtol_abs"]:
            return "gtol_abs"
        return ""

    def gn_tests(lin: _Linearization, free: torch.Tensor | None, step_small: bool,
                 reduction_small: bool, h0: torch.Tensor | None = None) -> str:
        """``ftol`` / ``xtol`` at ``x``: the last step's conditions (given) and the
        undamped Gauss-Newton step ``h0`` at ``x`` (computed when needed)."""
        if not (step_small or reduction_small):
            return ""
        if h0 is None:
            h0 = solve(lin, 0.0, free, rtol=1e-3)
        if box is not None:
            h0 = project(x + h0) - x
        rn2 = float(torch.dot(lin.rw, lin.rw))
        if reduction_small and rn2 > 0:
            pred = float(torch.linalg.vector_norm(lin.jw(h0))) ** 2
            if pred <= tols["ftol"] * rn2:
                return "ftol"
        if step_small and dnorm(h0) <= tols["xtol"] * (tols["xtol"] + dnorm(x)):
            return "xtol"
        return ""

    lin = None
    if not has_graph:
        lin = _Linearization(model, x, r0, loss, C, True) if m * n <= 4_000_000 else None
        msg = ("The residual has no autograd graph in x (built with .item(), NumPy or under "
               "no_grad?): write it with torch operations on x, or pass jac= or a NumPy x0 "
               "for finite differences.")
        if lin is None:
            raise ValueError(msg)
        return finish(lin, 9, msg)
    lin = _Linearization(model, x, r0 if dense else None, loss, C, dense)
    if not (bool(torch.isfinite(lin.F)) and bool(torch.isfinite(lin.g).all())):
        return finish(lin, 4, "At the starting point.")
    update_scale(lin)
    free = free_mask(lin, x)
    Fv = float(lin.F)
    mon.record(Fv, mon.gnorm(proj_grad(lin, x)))
    mu = tau * lin.diag_max()
    delta = dnorm(x) if dnorm(x) > 0 else 1.0  # scipy trf's initial radius ||D x0||
    par = 0.0
    nu = 2.0
    test = point_tests(lin, free)
    while True:
        # a zero Jacobian stops the run; a parameter without effect blocks a success claim
        if Fv > 0 and (lin.zero_jacobian(x, free, every=True)
                       or (test and lin.zero_jacobian(x, free))):
            return finish(lin, 8)
        if test:
            return finish(lin, 0, test=test)
        if mon.nit >= max_iter:
            return finish(lin, 1)
        if model.nfev >= max_nfev:
            return finish(lin, 7)
        mon.nit += 1
        if method == "lm":
            if lin.J is not None:
                idx = None if free is None or bool(free.all()) else free.nonzero().squeeze(1)
                Jw = lin.Jw if idx is None else lin.Jw[:, idx]
                dsc = scale[0] if idx is None else scale[0][idx]
                if Jw.shape[1]:
                    svd = _SVDModel(Jw, lin.rw, dsc)
                    if tols["ftol"] and svd.gn_ratio <= tols["ftol"]:
                        test = "ftol"
                    elif tols["xtol"] and svd.gn_dnorm <= tols["xtol"] * (
                            tols["xtol"] + dnorm(x)) and box is None:
                        test = "xtol"
                    if test:
                        mon.nit -= 1
                        continue
                    hf, par, pred_tr = svd.step(delta, par)
                else:
                    hf, pred_tr = torch.zeros(0, dtype=x.dtype, device=x.device), 0.0
                if idx is None:
                    h = hf
                else:
                    h = torch.zeros_like(x)
                    h[idx] = hf
            else:
                h = solve(lin, mu, free)
            xt = project(x + h)
            p = xt - x
            pn = float(torch.linalg.vector_norm(p))
            if pn <= eps * (float(torch.linalg.vector_norm(x)) + eps):
                test = gn_tests(lin, free, True, True)
                if test:
                    continue
                return finish(lin, 6)
            F_new, r_new = value(xt)
            if box is None and lin.J is not None:
                predicted = pred_tr
            elif box is None:
                predicted = 0.5 * float(torch.dot(h, mu * h - lin.g))
            else:
                predicted = -float(torch.dot(lin.g, p)) - 0.5 * float(
                    torch.linalg.vector_norm(lin.jw(p))) ** 2
            gain = (Fv - F_new) / predicted if math.isfinite(F_new) and predicted > 0 else -1.0
            new = None
            if not gain > 0 and math.isfinite(F_new) and abs(Fv - F_new) <= 100 * eps * abs(Fv):
                # the change of F is at rounding level: judge the step by the gradient
                trial = _Linearization(model, xt, r_new, loss, C, dense)
                if mon.gnorm(proj_grad(trial, xt)) < mon.gnorm(proj_grad(lin, x)):
                    new, gain = trial, 0.5
            if gain > 0:
                F_old = Fv
                small_step = tols["xtol"] > 0 and dnorm(p) <= tols["xtol"] * (
                    tols["xtol"] + dnorm(xt))
                small_red = tols["ftol"] > 0 and (
                    F_old - F_new <= tols["ftol"] * F_old
                    and predicted <= tols["ftol"] * F_old and gain <= 2.0)
                x = xt
                lin = new if new is not None else _Linearization(
                    model, x, r_new if dense else None, loss, C, dense)
                if not (bool(torch.isfinite(lin.F)) and bool(torch.isfinite(lin.g).all())):
                    return finish(lin, 4)
                update_scale(lin)
                free = free_mask(lin, x)
                Fv = float(lin.F)
                mu *= max(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
                nu = 2.0
                if gain >= 0.75 or par == 0.0:
                    delta = max(delta, 2.0 * dnorm(p))
                    par *= 0.5
                elif gain < 0.25:
                    delta = 0.5 * min(delta, 10.0 * dnorm(p))
                    par *= 2.0
                test = point_tests(lin, free) or (lin.J is None and box is None and gn_tests(
                    lin, free, small_step, small_red))
            else:
                mu *= nu
                nu *= 2.0
                shrink = 0.1 if not math.isfinite(F_new) or F_new > 10 * Fv else 0.5
                delta = shrink * min(delta, 10.0 * dnorm(p))
                par = par / shrink if par > 0 else par
                if not math.isfinite(mu) or (lin.J is not None and delta <= eps * dnorm(x)):
                    test = gn_tests(lin, free, True, True)
                    if test:
                        continue
                    return finish(lin, 6)
            mon.record(Fv, mon.gnorm(proj_grad(lin, x)), step=pn,
                       radius=delta if lin.J is not None else mu)
        else:
            h = solve(lin, 0.0, free)
            xt = project(x + h)
            d = xt - x
            slope = float(torch.dot(lin.g, d))
            if not slope < 0:
                test = gn_tests(lin, free, True, True, h0=h)
                if test:
                    continue
                return finish(lin, 3)
            # the angle in the variables scaled by D (invariant to rescaling x)
            dsc = scale[0] if scale[0] is not None else torch.ones_like(x)
            cos = -slope / max(float(torch.linalg.vector_norm(proj_grad(lin, x) / dsc))
                               * float(torch.linalg.vector_norm(dsc * d)), 1e-300)
            if cos < math.sqrt(eps):
                test = gn_tests(lin, free, True, True, h0=h)
                if test:
                    continue
                return finish(lin, 6, f"The Gauss-Newton step is orthogonal to the gradient "
                              f"to rounding (cosine {cos:.1e}): the Jacobian is nearly rank-"
                              "deficient at a point that is not stationary, where Gauss-"
                              "Newton cannot make progress; use method='lm'.")
            alpha, accepted = 1.0, False
            for _ in range(60):
                F_new, r_new = value(x + alpha * d)
                if math.isfinite(F_new) and F_new <= Fv + 1e-4 * alpha * slope:
                    accepted = True
                    break
                if model.nfev >= max_nfev:
                    break
                # minimizer of the quadratic through F(0), F'(0), F(alpha) (N&W eq. 3.57)
                den = 2.0 * (F_new - Fv - slope * alpha) if math.isfinite(F_new) else 0.0
                new_a = -slope * alpha * alpha / den if den > 0 else 0.1 * alpha
                alpha = min(max(new_a, 0.1 * alpha), 0.5 * alpha)
            if not accepted:
                test = gn_tests(lin, free, True, True, h0=h)
                if test:
                    continue
                return finish(lin, 2 if model.nfev < max_nfev else 7)
            F_old, pred = Fv, -slope * alpha
            step = alpha * d
            small_step = tols["xtol"] > 0 and dnorm(step) <= tols["xtol"] * (
                tols["xtol"] + dnorm(x + step))
            small_red = tols["ftol"] > 0 and (F_old - F_new <= tols["ftol"] * F_old
                                              and pred <= 2 * tols["ftol"] * F_old)
            x = x + step
            lin = _Linearization(model, x, r_new if dense else None, loss, C, dense)
            if not (bool(torch.isfinite(lin.F)) and bool(torch.isfinite(lin.g).all())):
                return finish(lin, 4)
            update_scale(lin)
            free = free_mask(lin, x)
            Fv = float(lin.F)
            test = point_tests(lin, free) or gn_tests(lin, free, small_step, small_red)
            mon.record(Fv, mon.gnorm(proj_grad(lin, x)), step=alpha)
        if mon.stop_requested(x, lin.F, lin.g):
            return finish(lin, 5)
