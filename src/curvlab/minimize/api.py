"""``curvlab.minimize``: one entry point for every deterministic solver.

Methods (see each module for the algorithm and its reference):

==================  ================================================================
``gd``              steepest descent, line search ``armijo`` | ``strong-wolfe`` | ``exact``
``momentum``        Polyak heavy ball (fixed ``lr`` or Armijo), momentum restarts
``nesterov``        Nesterov acceleration, Lipschitz backtracking, adaptive restart
``newton``          damped Newton, modified Cholesky when ``H`` is indefinite (dense)
``newton-cg``       truncated Newton, Hessian-free CG with negative-curvature exit
``trust-cauchy``    trust region, Cauchy point
``dogleg``          trust region, dogleg (dense)
``trust-ncg``       trust region, Steihaug-CG (Hessian-free)
``trust-exact``     trust region, More-Sorensen (dense; Cholesky on CPU, else ``eigh``)
``bfgs``            BFGS, strong Wolfe, dense inverse Hessian
``lbfgs``           L-BFGS two-loop, strong Wolfe, ``history_size`` pairs
``sr1``             SR1 trust region (dense)
``cg``              nonlinear conjugate gradients, Polak-Ribiere+, strong Wolfe
==================  ================================================================

scipy's names map to these (``'L-BFGS-B'`` -> ``lbfgs``, ``'CG'`` -> ``cg``,
``'trust-krylov'`` -> ``trust-ncg``, ...; :data:`curvlab.minimize.scipy_compat.METHOD_ALIASES`);
scipy's options (``options={...}``, ``maxiter``, ``tol``, ``maxcor``, ``maxfun``) and both
callback forms are accepted, and a NumPy ``x0`` gives scipy's NumPy contract (see
``docs/scipy_compat.md``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from curvlab.minimize import first_order, newton, quasi_newton, trust_region
from curvlab.minimize.evaluator import Evaluator, Monitor
from curvlab.minimize.quasi_newton import LbfgsInvHessProduct
from curvlab.minimize.result import OptimizeResult
from curvlab.minimize.scipy_compat import (
    METHOD_ALIASES,
    NumpyScalarFunction,
    as_tensor_x0,
    is_numpy_input,
    merge_options,
    to_numpy_result,
    wrap_callback,
)

__all__ = ["minimize", "METHODS", "check_x0", "check_positive", "check_max_iter"]


def _tr(subproblem: str) -> Callable:
    def run(ev, x0, mon, **kw):
        return trust_region.trust_region(ev, x0, mon, subproblem=subproblem, **kw)

    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p for name, p in inspect.signature(trust_region.trust_region).parameters.items()
         if name != "subproblem"])
    return run


#: The solvers behind :func:`minimize`, by method name (lower case; scipy's names such as
#: ``"L-BFGS-B"`` are mapped to them, see ``docs/scipy_compat.md``).
METHODS: dict[str, Callable] = {
    "gd": first_order.gd,
    "momentum": first_order.momentum,
    "nesterov": first_order.nesterov,
    "newton": newton.newton,
    "newton-cg": newton.newton_cg,
    "trust-cauchy": _tr("trust-cauchy"),
    "dogleg": _tr("dogleg"),
    "trust-ncg": _tr("trust-ncg"),
    "trust-exact": _tr("trust-exact"),
    "bfgs": quasi_newton.bfgs,
    "lbfgs": quasi_newton.lbfgs,
    "sr1": quasi_newton.sr1,
    "cg": quasi_newton.cg,
}

#: scipy's option names -> curvlab's (``options={...}`` or keywords).
OPTION_ALIASES = {"maxiter": "max_iter", "maxcor": "history_size", "maxfun": "max_nfev"}

#: methods that need Hessian products (from autodiff, or the user's ``hess`` / ``hessp``)
_SECOND_ORDER = ("newton", "newton-cg", "trust-cauchy", "dogleg", "trust-ncg", "trust-exact")


class _Budget(Exception):
    """``max_nfev`` objective evaluations used up (raised by the counted evaluator)."""


class _BudgetEvaluator(Evaluator):
    """An :class:`Evaluator` that stops the run after ``max_nfev`` objective evaluations,
    the finite-difference evaluations of a NumPy function's gradient (``extra_evals()``)
    included, as scipy counts them in ``maxfun`` and ``nfev``."""

    max_nfev: int = 0
    extra_evals: Callable[[], int] = staticmethod(lambda: 0)

    def _call(self, x):
        if self.nfev + self.extra_evals() > self.max_nfev:
            self.nfev -= 1
            raise _Budget
        return super()._call(x)

_FIRST_ORDER = ("gd", "momentum", "nesterov", "trust-cauchy")


@functools.cache
def _options(solver: Callable) -> list[str]:
    """The keyword options ``solver`` accepts (signature inspected once per method)."""
    return [p for p in inspect.signature(solver).parameters
            if p not in ("ev", "x0", "mon", "memory")]


def check_x0(x0: Any, name: str = "x0") -> torch.Tensor:
    """Validate the starting point: a non-empty float32/float64 tensor."""
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x0).__name__}; "
                        f"wrap it with torch.as_tensor({name}, dtype=torch.float64)")
    if x0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x0.dtype}; convert it "
                        f"with {name}.double() or {name}.float()")
    if x0.numel() == 0:
        raise ValueError(f"{name} must have at least one element")
    return x0.detach().reshape(-1).clone()


def check_positive(value: Any, name: str) -> float:
    """``value`` as a float, if it is a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_max_iter(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_iter must be an int >= 0 (or None for the default), got "
                         f"{value!r}")
    return value


def _explain_fun(fun: Callable, x0: torch.Tensor, args: tuple, jac: Any) -> Exception | None:
    """Why ``fun`` cannot be minimized, from one call at ``x0`` (made only after a solver
    failed, so the counts of a good run are untouched), or None if ``fun`` looks fine."""
    xr = x0.detach().clone().requires_grad_(jac is None)
    try:
        with torch.enable_grad():
            out = fun(xr, *args)
    except Exception:
        return None  # fun's own error stands
    if jac is True:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
                   else f"a {type(out).__name__}")
            return TypeError(f"with jac=True, fun must return a pair (f, grad), got {got}; "
                             "return both, or pass jac=None to differentiate fun by autodiff")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return TypeError(f"fun must return a scalar tensor, got {type(out).__name__}; compute "
                         "it from x with torch operations (no float(), .item() or numpy)")
    if not out.is_floating_point():
        return TypeError(f"fun must return a floating-point tensor, got {out.dtype}; compute "
                         "it in x's dtype (no .long(), comparisons or integer casts)")
    if out.numel() != 1:
        return ValueError(f"fun must return a scalar tensor, got shape {tuple(out.shape)}; "
                          "reduce it first, e.g. with .sum()")
    if jac is None and not out.requires_grad:
        return ValueError("fun(x0) does not depend on x: its value has no autograd graph (a "
                          "constant, or computed with .detach(), .item(), numpy or under "
                          "torch.no_grad()); compute it from x with torch operations, or "
                          "pass jac")
    return None


def minimize(fun: Callable, x0: torch.Tensor, method: str = "lbfgs", *, gtol: float = 1e-5,
             max_iter: int | None = None, args: tuple = (), jac: Any = None,
             hessp: Callable | None = None, hess: Callable | None = None,
             callback: Callable | None = None, history: bool = False,
             bounds: Any = None, tol: float | None = None, options: dict | None = None,
             **kwargs: Any) -> OptimizeResult:
    """Minimize the scalar function ``fun(x, *args)`` from ``x0``.

    Args:
        fun: returns a scalar tensor (or ``(f, grad)`` when ``jac=True``). With a NumPy
            ``x0`` it takes and returns NumPy (scipy's contract; gradient from ``jac`` or
            finite differences) and the result is NumPy.
        x0: starting point, a float32/float64 tensor of any shape, on any device.
        method: one of :data:`METHODS` (see the module table) or scipy's name for one.
        gtol: success means ``||grad f(x)||_inf <= gtol`` at the returned ``x`` (under
            bounds the projected gradient); this is re-checked on the returned point.
            ``tol`` (scipy) sets it too.
        max_iter: iteration budget (default ``20000`` for first-order methods, else
            ``max(1000, 200 n)``); scipy's ``maxiter``. ``max_nfev`` (``maxfun``):
            objective-evaluation budget (status 7).
        jac / hessp / hess: optional user gradient ``jac(x)`` (or ``True``), Hessian-vector
            product ``hessp(x, p)`` and dense Hessian ``hess(x)``; autodiff otherwise.
        callback: ``callback(intermediate_result)`` (scipy's keyword form, or any one-
            argument callable whose parameter is named otherwise gets ``x``, scipy's legacy
            ``callback(xk)``) after every iteration; returning True or raising
            StopIteration stops.
        history: record ``f``, ``grad_norm``, ``step``, ``radius``, ``decrement`` per
            iteration in ``result.history``.
        bounds: ``(lb, ub)`` / ``scipy.optimize.Bounds`` / a sequence of ``(lo, hi)`` pairs
            (methods ``lbfgs`` = scipy's ``L-BFGS-B``).
        options / ``**kwargs``: method options, e.g. ``line_search``, ``history_size``, ``lr``,
            ``beta``, ``clip``, ``initial_radius``, ``max_radius``, ``eta``, ``c1``,
            ``c2``, ``cg_max_iter``, ``ftol`` (quasi-Newton, CG: scipy's relative-reduction
            test), ``maxls`` (``lbfgs``: evaluations per line search); scipy's names
            ``maxiter``, ``maxcor``, ``maxfun``, ``disp``, ``gtol``, ``return_all`` (the
            iterates ``x0, x1, ..., x_nit`` in ``result.allvecs``, any method).
    """
    opts = merge_options(options, kwargs, OPTION_ALIASES)
    opts.pop("disp", None)  # library code never prints
    if "gtol" in opts:
        gtol = opts.pop("gtol")
    elif tol is not None:
        gtol = tol
    if "max_iter" in opts:
        max_iter = opts.pop("max_iter")
    max_nfev = opts.pop("max_nfev", None)
    return_all = bool(opts.pop("return_all", False))
    if isinstance(method, str) and method.lower() not in METHODS:
        method = METHOD_ALIASES.get(method.lower(), method)
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} (or scipy's name for one: "
                         f"{sorted(METHOD_ALIASES)}), got {method!r}")
    method = method.lower()
    numpy_mode = is_numpy_input(x0)
    if numpy_mode:
        x0 = as_tensor_x0(x0)
    x = check_x0(x0)
    check_positive(gtol, "gtol")
    n = x.numel()
    if max_iter is None:
        max_iter = 20000 if method in _FIRST_ORDER else max(1000, 200 * n)
    check_max_iter(max_iter)
    if max_nfev is not None and (isinstance(max_nfev, bool) or not isinstance(max_nfev, int)
                                 or max_nfev < 1):
        raise ValueError(f"max_nfev must be a positive int, got {max_nfev!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable, got " + type(callback).__name__)
    if bounds is not None and method != "lbfgs":
        raise ValueError(f"bounds are supported by method 'lbfgs' (scipy's 'L-BFGS-B'), not "
                         f"{method!r}")
    # scipy's Newton-CG option ``eps``: the finite-difference step of its Hessian products
    fd_eps = opts.pop("eps", None) if numpy_mode and method == "newton-cg" else None
    solver = METHODS[method]
    allowed = _options(solver)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; "
                        f"accepted: {allowed} (and scipy's {sorted(OPTION_ALIASES)})")
    if bounds is not None:
        opts["bounds"] = bounds
    wrapped = None
    if numpy_mode:
        if (method in _SECOND_ORDER and method != "newton-cg" and hess is None
                and hessp is None):
            raise ValueError(f"method {method!r} needs Hessian products: with NumPy functions "
                             "pass hess= or hessp= (scipy requires them too; 'newton-cg' "
                             "approximates them by finite differences of the gradient), or "
                             "use a torch function and a torch x0")
        wrapped = NumpyScalarFunction(fun, args, jac, tuple(x0.shape))
        if method == "newton-cg" and hess is None and hessp is None:
            # scipy's rule: finite differences of the gradient (its option ``eps``)
            hessp = (wrapped.fd_hessp if fd_eps is None else
                     lambda x_, p_, *a: wrapped.fd_hessp(x_, p_, epsilon=float(fd_eps)))
        fun, jac, args = wrapped, None, ()
        hess, hessp = _numpy_hess(hess, hessp, wrapped.args)

    def to_user(v: Any) -> Any:
        if numpy_mode and isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            return v.item() if v.dim() == 0 else v.numpy()
        return v

    cb = wrap_callback(callback, to_user, scipy_rule=numpy_mode)
    ev = _BudgetEvaluator(fun, x0.shape, args, jac=jac, hessp=hessp, hess=hess)
    ev.max_nfev = max_nfev if max_nfev is not None else 1 << 62
    if wrapped is not None:
        ev.extra_evals = lambda: wrapped.extra_evals
    mon = Monitor(method, ev, float(gtol), max_iter, cb, history)
    if return_all:
        mon.allvecs = [x.view(ev.shape).clone()]
    try:
        res = solver(ev, x, mon, **opts)
    except _Budget:
        if mon.last is None:
            raise ValueError(f"max_nfev={max_nfev} is too small to finish one "
                             "iteration") from None
        res = mon.finish(*mon.last, 7)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        cause = _explain_fun(fun, x, args, jac)  # one more call of fun, on failure only
        if cause is None:
            raise
        raise cause from err
    first = ev.first
    if not res["success"] and first is not None and float(res["fun"]) > float(first[1]):
        # never return a point worse than x0 (scipy's test_no_increase): with a wrong
        # gradient or rounding-level line-search slack a failed run can drift upwards
        x_, f_, g_ = first
        res.update(x=x_.view(ev.shape), fun=f_, grad=g_.view(ev.shape),
                   grad_norm=Monitor.gnorm(g_))
        res["message"] += " Returned x0: the run ended above f(x0)."
    if wrapped is not None:
        res["nfev"] = res["nfev"] + wrapped.extra_evals
    if return_all:
        res["allvecs"] = [to_user(v) for v in mon.allvecs]
    if numpy_mode and isinstance(res.get("hess_inv"), LbfgsInvHessProduct):
        res["hess_inv"].numpy = True
    res["njev"] = res["ngev"]
    res["nhev"] = res["nhvp"] + res["nhess"]
    res["jac"] = res["grad"]
    return to_numpy_result(res) if numpy_mode else res


def _numpy_hess(hess: Callable | None, hessp: Callable | None, args: tuple):
    """Torch wrappers of NumPy ``hess(x, *args)`` / ``hessp(x, p, *args)``."""
    import numpy as np

    def th(fn):
        def call(*tensors):
            out = fn(*[t.detach().cpu().numpy() for t in tensors], *args)
            return torch.as_tensor(np.asarray(out, dtype=np.float64))
        return call

    return (None if hess is None else th(hess)), (None if hessp is None else th(hessp))
