"""scipy.optimize's calling conventions on top of curvlab's solvers (one place for them).

* NumPy in, NumPy out: a NumPy (or list / float) ``x0`` means the user's functions take
  and return NumPy arrays, as scipy's do. They are wrapped into a torch function whose
  derivatives come from the user's ``jac`` or, without one, from finite differences
  (scipy's ``'2-point'`` rule, ``h_j = sqrt(eps) max(1, |x_j|)``, or ``'3-point'``);
  every finite-difference evaluation is counted in ``nfev`` as scipy counts it. The result
  is converted back to NumPy (:func:`to_numpy_result`).
* Option aliases (scipy's names for curvlab's): ``maxiter`` -> ``max_iter``; ``options``
  dicts are merged into the keyword options (:func:`merge_options`).
* Method names: scipy's ``'L-BFGS-B'``, ``'CG'``, ... map to curvlab's (:data:`METHOD_ALIASES`).
* Callbacks in both scipy forms (:func:`wrap_callback`): ``callback(intermediate_result)``
  when the parameter is named ``intermediate_result`` (or the callable takes an
  ``OptimizeResult``, curvlab's form), legacy ``callback(xk)`` otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["METHOD_ALIASES", "is_numpy_input", "as_tensor_x0", "merge_options",
           "wrap_callback", "to_numpy_result", "NumpyScalarFunction", "fd_jacobian"]

#: scipy.optimize.minimize method names -> curvlab's (case-insensitive lookup).
METHOD_ALIASES: dict[str, str] = {
    "l-bfgs-b": "lbfgs",
    "l-bfgs": "lbfgs",
    "bfgs": "bfgs",
    "cg": "cg",
    "newton-cg": "newton-cg",
    "trust-ncg": "trust-ncg",
    "trust-krylov": "trust-ncg",
    "trust-exact": "trust-exact",
    "dogleg": "dogleg",
    "sr1": "sr1",
}


def is_numpy_input(x0: Any) -> bool:
    """scipy-style input: anything that is not a torch tensor (ndarray, list, float)."""
    return not isinstance(x0, torch.Tensor)


def as_tensor_x0(x0: Any, name: str = "x0") -> torch.Tensor:
    """A float64 tensor copy of a NumPy-like ``x0`` (scipy works in float64)."""
    try:
        arr = np.asarray(x0, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a torch.Tensor or array-like of numbers, got "
                        f"{type(x0).__name__}") from err
    return torch.from_numpy(np.array(arr, dtype=np.float64, copy=True))


def merge_options(options: dict | None, kwargs: dict, aliases: dict[str, str]) -> dict:
    """``options`` (scipy's dict) merged into ``kwargs`` with scipy's names renamed to
    curvlab's; a name given twice is an error rather than a silent choice."""
    merged = dict(kwargs)
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        for k, v in options.items():
            if k in merged:
                raise TypeError(f"option {k!r} given both in options= and as a keyword")
            merged[k] = v
    for old, new in aliases.items():
        if old in merged:
            if new in merged and merged[new] is not None:
                raise TypeError(f"give either {old!r} (scipy's name) or {new!r}, not both")
            merged[new] = merged.pop(old)
    return merged


def wrap_callback(callback: Callable | None, to_user: Callable[[Any], Any],
                  scipy_rule: bool = True) -> Callable | None:
    """A callback in curvlab's form ``cb(intermediate_result)`` from either scipy form.
    scipy's rule (NumPy input): a parameter named ``intermediate_result`` gets the result
    object by keyword, any other (legacy ``callback(xk)``) gets the current ``x``. For
    tensor input curvlab's own form stays: the result object, by keyword when the
    parameter is named ``intermediate_result``, else positionally. ``to_user`` converts
    tensors for the user (NumPy for NumPy input)."""
    if callback is None:
        return None
    try:
        params = list(inspect.signature(callback).parameters)
    except (TypeError, ValueError):
        params = []
    keyword = bool(params) and params[0] == "intermediate_result"
    legacy = scipy_rule and bool(params) and not keyword

    def call(res: Any) -> Any:
        if legacy:
            return callback(to_user(res["x"]))
        out = type(res)({k: to_user(v) for k, v in res.items()})
        return callback(intermediate_result=out) if keyword else callback(out)

    call.legacy = legacy  # type: ignore[attr-defined]
    return call


def _np(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.dim() == 0 else v.numpy()
    return v


def to_numpy_result(res: dict, keys: tuple[str, ...] = ("x", "fun", "grad", "jac", "cost",
                                                         "hess_inv", "optimality",
                                                         "active_mask")) -> dict:
    """Tensors in ``keys`` of ``res`` as NumPy arrays (0-dim ones as Python floats)."""
    for k in keys:
        if k in res and res[k] is not None:
            res[k] = _np(res[k])
    return res


def _fd_steps(x: np.ndarray, scheme: str, rel_step: float | None = None) -> np.ndarray:
    """scipy's ``approx_derivative`` steps: ``rel_step sign(x) max(1, |x|)`` (``rel_step``
    default ``sqrt(eps)`` forward, ``eps^(1/3)`` central; least_squares' ``diff_step``)."""
    eps = np.finfo(np.float64).eps
    rel = rel_step if rel_step is not None else (
        eps ** 0.5 if scheme == "2-point" else eps ** (1.0 / 3.0))
    sign = np.where(x >= 0, 1.0, -1.0)
    h = rel * sign * np.maximum(1.0, np.abs(x))
    return (x + h) - x


def fd_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, f0: np.ndarray,
                scheme: str = "2-point", rel_step: float | None = None
                ) -> tuple[np.ndarray, int]:
    """Finite-difference Jacobian ``(m, n)`` of ``f`` at ``x`` (``f0 = f(x)``): forward
    differences (``'2-point'``, ``n`` evaluations) or central (``'3-point'``, ``2 n``),
    steps of :func:`_fd_steps`. Returns the Jacobian and the number of evaluations."""
    if scheme not in ("2-point", "3-point"):
        raise ValueError(f"finite differences must be '2-point' or '3-point', got {scheme!r}")
    h = _fd_steps(x, scheme, rel_step)
    cols = []
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h[j]
        if scheme == "2-point":
            cols.append((np.asarray(f(x + e), dtype=np.float64).ravel() - f0) / h[j])
        else:
            cols.append((np.asarray(f(x + e), dtype=np.float64).ravel()
                         - np.asarray(f(x - e), dtype=np.float64).ravel()) / (2 * h[j]))
    J = np.stack(cols, axis=1) if cols else np.zeros((f0.size, 0))
    return J, x.size * (1 if scheme == "2-point" else 2)


class NumpyScalarFunction:
    """A NumPy objective ``fun(x, *args) -> float`` (or ``(f, g)`` with ``jac=True``) as a
    torch function of a float64 tensor, differentiable once: the gradient comes from
    ``jac`` (callable or True) or finite differences (``jac`` a scheme string or None).
    ``extra_evals`` counts the evaluations made for finite differences."""

    def __init__(self, fun: Callable, args: tuple, jac: Any, shape: tuple) -> None:
        self.fun, self.args, self.jac, self.shape = fun, tuple(args), jac, shape
        self.extra_evals = 0
        self._grad_at: tuple[np.ndarray, np.ndarray] | None = None  # (x, g(x)) of fd_hessp

    def _value_grad(self, xn: np.ndarray) -> tuple[float, np.ndarray]:
        x = xn.reshape(self.shape)
        if self.jac is True:
            f, g = self.fun(x, *self.args)
            return float(np.asarray(f)), np.asarray(g, dtype=np.float64).ravel()
        f = float(np.asarray(self.fun(x, *self.args)))
        if callable(self.jac):
            return f, np.asarray(self.jac(x, *self.args), dtype=np.float64).ravel()
        scheme = self.jac if isinstance(self.jac, str) else "2-point"

        def fv(z):
            out = self.fun(z.reshape(self.shape), *self.args)
            return np.atleast_1d(np.asarray(out, dtype=np.float64))

        J, k = fd_jacobian(fv, xn, np.array([f]), scheme)
        self.extra_evals += k
        return f, J.ravel()

    def fd_hessp(self, x: np.ndarray, p: np.ndarray, *_args: Any,
                 epsilon: float = float(np.sqrt(np.finfo(float).eps))) -> np.ndarray:
        """``H p ~ (g(x + epsilon p) - g(x)) / epsilon``: scipy's Newton-CG without ``hess``
        or ``hessp`` (``scipy.optimize.approx_fhess_p``, its ``eps`` option)."""
        xn, pn = np.asarray(x, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
        # the inner CG loop asks for many products at one x: g(x) once per point
        if self._grad_at is None or not np.array_equal(self._grad_at[0], xn):
            self._grad_at = (xn.copy(), self._value_grad(xn)[1])
            self.extra_evals += 1
        g2 = self._value_grad(xn + epsilon * pn)[1]
        self.extra_evals += 1
        return ((g2 - self._grad_at[1]) / epsilon).reshape(np.shape(p))

    def value(self, xn: np.ndarray) -> float:
        out = self.fun(xn.reshape(self.shape), *self.args)
        if self.jac is True:
            out = out[0]
        return float(np.asarray(out))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outer = self

        class _F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, xt):
                xn = xt.detach().cpu().numpy().astype(np.float64).ravel()
                if ctx.needs_input_grad[0]:
                    f, g = outer._value_grad(xn)
                    ctx.g = torch.from_numpy(g).to(xt).view_as(xt)
                else:
                    f = outer.value(xn)
                    ctx.g = None
                return torch.tensor(f, dtype=xt.dtype, device=xt.device)

            @staticmethod
            def backward(ctx, grad_out):
                if ctx.g is None:
                    raise RuntimeError("gradient requested for a value-only evaluation")
                return grad_out * ctx.g

        if not x.requires_grad:
            with torch.no_grad():
                return _F.apply(x)
        return _F.apply(x)

