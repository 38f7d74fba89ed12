"""Finite-difference checks of gradients and Hessian-vector products.

Central differences: for a step ``h``,

    (f(x + h v) - f(x - h v)) / (2h) = g(x)^T v + O(h^2),
    (g(x + h v) - g(x - h v)) / (2h) = H(x) v + O(h^2),

with a rounding error of order ``eps |f| / h``; balancing the two gives the step
``h = eps^(1/3) max(1, |x|_inf)`` and an expected relative error of order ``eps^(2/3)``
(Nocedal & Wright, "Numerical Optimization", 2nd ed., sec. 8.1). The default tolerance
is ``eps^(1/3)`` of the dtype (6e-6 in float64, 5e-3 in float32), which leaves a wide
margin for conditioning while still catching a wrong derivative (relative error O(1)).

``mode="full"`` compares every coordinate (``2n`` evaluations: for small ``n``);
``mode="directional"`` compares along one random unit direction (two evaluations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvlab.autodiff import hvp as ad_hvp
from curvlab.autodiff import hvp_fn
from curvlab.objective import Objective

__all__ = ["CheckResult", "gradient_check", "hvp_check", "CHECK_MODES"]

CHECK_MODES = ("directional", "full")
Vec = torch.Tensor


@dataclass(frozen=True)
class CheckResult:
    """Outcome of a finite-difference check.

    ``rel_error = |fd - ad| / max(|fd|, |ad|)`` (infinity norms; for a directional
    gradient check the scalars themselves), ``passed = rel_error <= rtol``. ``worst_index``
    is the flat index (into the gradient, ``H v`` or the flattened ``n x n`` Hessian) of
    the largest absolute difference (``None`` for a directional gradient check).
    ``num_evals`` counts the function (gradient check) or gradient (HVP check) evaluations
    spent on finite differences.
    """

    kind: str
    mode: str
    rel_error: float
    abs_error: float
    rtol: float
    step: float
    num_evals: int
    worst_index: int | None
    passed: bool

    def __bool__(self) -> bool:
        return self.passed


@dataclass
class _Problem:
    x: Vec
    fun: Callable[[Vec], Vec]
    grad: Callable[[Vec], Vec]
    hvp: Callable[[Vec, Vec], Vec]


def _objective_problem(obj: Objective, x: Vec | None) -> _Problem:
    x0 = obj.flatten(obj.param_tensors()) if x is None else obj.check_vector(x, "x")

    def hvp(t: Vec, v: Vec) -> Vec:
        point, direction = obj.unflatten(t), obj.unflatten(v)
        out = torch.zeros_like(t)
        with obj.mode():
            for w, inputs, targets in obj.batches():
                hv = ad_hvp(lambda p, i=inputs, y=targets: obj.batch_loss(p, i, y), point,
                            direction)
                out += w * obj.flatten(hv)
        return out

    return _Problem(x=x0.detach(), fun=lambda t: obj.loss(obj.unflatten(t)),
                    grad=lambda t: obj.flat_grad(obj.unflatten(t)), hvp=hvp)


def _tensor_problem(f: Callable[[Vec], Any], x: Any) -> _Problem:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor when f is a function, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    shape = x.shape

    def fun(t: Vec) -> Vec:
        y = f(t.reshape(shape))
        if not isinstance(y, torch.Tensor) or y.numel() != 1:
            raise ValueError("f must return a scalar (one-element) tensor")
        return y.reshape(())

    def grad(t: Vec) -> Vec:
        leaf = t.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fun(leaf), leaf, allow_unused=True)
        return torch.zeros_like(t) if g is None else g

    # plain torch.autograd (not torch.func), so autograd.Functions without
    # setup_context -- the usual subject of a check -- work too
    return _Problem(x=x.detach().reshape(-1), fun=fun, grad=grad,
                    hvp=lambda t, v: hvp_fn(fun, t)[2](v))


def _problem(f: Any, x: Any, loss_fn: Any, data: Any, params: Any) -> _Problem:
    if isinstance(f, Objective):
        return _objective_problem(f, x)
    if isinstance(f, nn.Module):
        return _objective_problem(Objective(f, loss_fn, data, params), x)
    if not callable(f):
        raise TypeError(f"f must be a callable, an Objective or an nn.Module, got "
                        f"{type(f).__name__}")
    return _tensor_problem(f, x)


def _settings(x: Vec, mode: str, step: float | None, rtol: float | None) -> tuple[float, float]:
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    eps = torch.finfo(x.dtype).eps
    if step is None:
        step = eps ** (1 / 3) * max(1.0, float(x.abs().max()) if x.numel() else 1.0)
    if rtol is None:
        rtol = eps ** (1 / 3)
    if not step > 0 or not rtol > 0:
        raise ValueError(f"step and rtol must be positive, got step={step}, rtol={rtol}")
    return step, rtol


def _direction(x: Vec, direction: Vec | None, seed: int) -> Vec:
    if direction is None:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    else:
        if not isinstance(direction, torch.Tensor) or direction.numel() != x.numel():
            raise ValueError(f"direction must be a tensor with {x.numel()} elements")
        v = direction.detach().reshape(-1).to(dtype=x.dtype, device=x.device)
    norm = v.norm()
    if not norm > 0:
        raise ValueError("direction must be nonzero")
    return v / norm


def _compare(kind: str, mode: str, fd: Vec, ad: Vec, rtol: float, step: float, evals: int,
             indexed: bool) -> CheckResult:
    diff = (fd - ad).abs().reshape(-1)
    scale = max(float(fd.abs().max()), float(ad.abs().max()), torch.finfo(fd.dtype).tiny)
    abs_err = float(diff.max())
    rel = abs_err / scale
    return CheckResult(kind=kind, mode=mode, rel_error=rel, abs_error=abs_err, rtol=rtol,
                       step=step, num_evals=evals,
                       worst_index=int(diff.argmax()) if indexed else None,
                       passed=bool(rel <= rtol))


def gradient_check(f: Any, x: Any = None, *, loss_fn: Any = None, data: Any = None,
                   params: Any = None, mode: str = "directional",
                   grad_fn: Callable[[Vec], Vec] | None = None, direction: Vec | None = None,
                   step: float | None = None, rtol: float | None = None,
                   seed: int = 0) -> CheckResult:
    """Compare a gradient with central finite differences of ``f``.

    ``f`` is a function of the tensor ``x``, an :class:`~curvlab.objective.Objective`, or
    an ``nn.Module`` with ``loss_fn`` and ``data`` (then ``x`` is the flat parameter
    vector, default the current parameters). The gradient checked is autograd's, or
    ``grad_fn(x)`` when given (same shape as ``x``).
    """
    prob = _problem(f, x, loss_fn, data, params)
    step, rtol = _settings(prob.x, mode, step, rtol)
    x0 = prob.x
    if grad_fn is None:
        g = prob.grad(x0)
    else:
        g = grad_fn(x0 if isinstance(f, (Objective, nn.Module)) else x0.reshape(x.shape))
    g = torch.as_tensor(g).detach().reshape(-1).to(x0.dtype)
    if g.numel() != x0.numel():
        raise ValueError(f"the gradient has {g.numel()} elements, expected {x0.numel()}")
    with torch.no_grad():
        if mode == "directional":
            v = _direction(x0, direction, seed)
            fd = (prob.fun(x0 + step * v) - prob.fun(x0 - step * v)) / (2 * step)
            return _compare("gradient", mode, fd.reshape(1), (g @ v).reshape(1), rtol, step, 2,
                            indexed=False)
        fd = torch.empty_like(x0)
        for j in range(x0.numel()):
            e = torch.zeros_like(x0)
            e[j] = step
            fd[j] = (prob.fun(x0 + e) - prob.fun(x0 - e)) / (2 * step)
    return _compare("gradient", mode, fd, g, rtol, step, 2 * x0.numel(), indexed=True)


def hvp_check(f: Any, x: Any = None, *, loss_fn: Any = None, data: Any = None,
              params: Any = None, mode: str = "directional",
              product_fn: Callable[[Vec, Vec], Vec] | None = None, direction: Vec | None = None,
              step: float | None = None, rtol: float | None = None,
              seed: int = 0) -> CheckResult:
    """Compare Hessian-vector products with central finite differences of the gradient.

    Same inputs as :func:`gradient_check`. The products checked are autograd's
    (double backward), or ``product_fn(x, v)`` when given. ``mode="full"`` checks every
    column ``H e_j``; ``"directional"`` checks ``H v`` for one random unit ``v``.
    """
    prob = _problem(f, x, loss_fn, data, params)
    step, rtol = _settings(prob.x, mode, step, rtol)
    x0 = prob.x
    flat_input = isinstance(f, (Objective, nn.Module))

    def product(v: Vec) -> Vec:
        if product_fn is None:
            return prob.hvp(x0, v).detach().reshape(-1)
        args = (x0, v) if flat_input else (x0.reshape(x.shape), v.reshape(x.shape))
        return torch.as_tensor(product_fn(*args)).detach().reshape(-1).to(x0.dtype)

    if mode == "directional":
        v = _direction(x0, direction, seed)
        fd = (prob.grad(x0 + step * v) - prob.grad(x0 - step * v)) / (2 * step)
        return _compare("hvp", mode, fd.reshape(-1), product(v), rtol, step, 2, indexed=True)
    n = x0.numel()
    fd = torch.empty(n, n, dtype=x0.dtype, device=x0.device)
    ad = torch.empty_like(fd)
    for j in range(n):
        e = torch.zeros_like(x0)
        e[j] = 1
        fd[:, j] = (prob.grad(x0 + step * e) - prob.grad(x0 - step * e)).reshape(-1) / (2 * step)
        ad[:, j] = product(e)
    return _compare("hvp", mode, fd, ad, rtol, step, 2 * n, indexed=True)
