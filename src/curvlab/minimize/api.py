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
==================  ================================================================
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
from curvlab.minimize.result import OptimizeResult

__all__ = ["minimize", "METHODS", "check_x0", "check_positive", "check_max_iter"]


def _tr(subproblem: str) -> Callable:
    def run(ev, x0, mon, **kw):
        return trust_region.trust_region(ev, x0, mon, subproblem=subproblem, **kw)

    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p for name, p in inspect.signature(trust_region.trust_region).parameters.items()
         if name != "subproblem"])
    return run


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
}

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
             **options: Any) -> OptimizeResult:
    """Minimize the scalar function ``fun(x, *args)`` from ``x0``.

    Args:
        fun: returns a scalar tensor (or ``(f, grad)`` when ``jac=True``).
        x0: starting point, a float32/float64 tensor of any shape, on any device.
        method: one of :data:`METHODS` (see the module table).
        gtol: success means ``||grad f(x)||_inf <= gtol`` at the returned ``x``; this is
            re-checked on the returned point, never inferred from another criterion.
        max_iter: iteration budget (default ``20000`` for first-order methods, else
            ``max(1000, 200 n)``).
        jac / hessp / hess: optional user gradient ``jac(x)`` (or ``True``), Hessian-vector
            product ``hessp(x, p)`` and dense Hessian ``hess(x)``; autodiff otherwise.
        callback: ``callback(intermediate_result)`` after every iteration with ``x``,
            ``fun``, ``grad``, ``nit``; returning True (or raising StopIteration) stops.
        history: record ``f``, ``grad_norm``, ``step``, ``radius``, ``decrement`` per
            iteration in ``result.history``.
        **options: method options, e.g. ``line_search``, ``history_size``, ``lr``,
            ``beta``, ``clip``, ``initial_radius``, ``max_radius``, ``eta``, ``c1``,
            ``c2``, ``cg_max_iter``.
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    method = method.lower()
    x = check_x0(x0)
    check_positive(gtol, "gtol")
    n = x.numel()
    if max_iter is None:
        max_iter = 20000 if method in _FIRST_ORDER else max(1000, 200 * n)
    check_max_iter(max_iter)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable, got " + type(callback).__name__)
    solver = METHODS[method]
    allowed = _options(solver)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; "
                        f"accepted: {allowed}")
    ev = Evaluator(fun, x0.shape, args, jac=jac, hessp=hessp, hess=hess)
    mon = Monitor(method, ev, float(gtol), max_iter, callback, history)
    try:
        return solver(ev, x, mon, **options)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        cause = _explain_fun(fun, x0, args, jac)  # one more call of fun, on failure only
        if cause is None:
            raise
        raise cause from err
