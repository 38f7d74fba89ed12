"""How well does the local quadratic model describe the loss along a direction?

For a direction ``d`` and step ``t`` the Taylor models of ``f(theta + t d)`` are

    m1(t) = f + t g.d                      (first order)
    m2(t) = f + t g.d + t^2/2 d.H d        (second order, one Hessian-vector product)

and the reduction ratio ``rho(t) = (f(theta + t d) - f) / (m2(t) - f)`` is what trust
regions and Levenberg-Marquardt damping use (Nocedal & Wright, eq. 4.4). For a smooth
loss the errors shrink like ``|f - m1| = O(t^2)`` and ``|f - m2| = O(t^3)``; a ratio far
from one means the quadratic model (and so Newton-type steps, damping, trust radii) no
longer describes the loss at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvlab.autodiff import hvp_fn
from curvlab.objective import Objective

__all__ = ["QuadraticFit", "quadratic_model_fit"]

DEFAULT_STEPS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass(frozen=True)
class QuadraticFit:
    """Per step size ``t``: actual change, Taylor predictions, errors and ``rho``.

    ``slope_first`` / ``slope_second`` are least-squares slopes of ``log |error|`` against
    ``log t`` (about 2 and 3 where the loss is smooth and roundoff does not dominate).
    """

    step_sizes: list[float]
    actual: list[float]
    predicted_first: list[float]
    predicted_second: list[float]
    rho: list[float]
    error_first: list[float]
    error_second: list[float]
    directional_derivative: float
    curvature: float
    slope_first: float
    slope_second: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serializable)."""
        return dict(self.__dict__)


def _loglog_slope(ts: Sequence[float], errs: Sequence[float]) -> float:
    pts = [(math.log(t), math.log(e)) for t, e in zip(ts, errs) if t > 0 and e > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def quadratic_model_fit(
    model_or_fn: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor] | Objective,
    loss_fn: Any = None,
    data: Any = None,
    direction: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    step_sizes: Sequence[float] = DEFAULT_STEPS,
    *,
    x: torch.Tensor | None = None,
    params: Any = None,
) -> QuadraticFit:
    """Compare ``f(theta + t d) - f(theta)`` with its first- and second-order Taylor
    predictions for every ``t`` in ``step_sizes``; costs one gradient, one HVP and one
    loss evaluation per step size.

    Use either a model (``model, loss_fn, data``, or an :class:`Objective`) with
    ``direction`` as a flat vector or a parameter dict (e.g. the optimizer's last update,
    ``new_params - old_params``), or a plain function of a tensor with ``x=`` the point.
    """
    if direction is None:
        raise ValueError("direction is required: a flat vector or parameter dict, e.g. the "
                         "optimizer's last update (CurvatureMonitor tracks it for you)")
    steps = [float(t) for t in step_sizes]
    if not steps or any(not math.isfinite(t) or t <= 0 for t in steps):
        raise ValueError(f"step_sizes must be positive finite numbers, got {list(step_sizes)}")

    if isinstance(model_or_fn, (torch.nn.Module, Objective)):
        obj = model_or_fn if isinstance(model_or_fn, Objective) else Objective(
            model_or_fn, loss_fn, data, params)
        point = obj.flatten(obj.param_tensors())
        if isinstance(direction, Mapping):
            direction = obj.flatten(direction)
        obj.check_vector(direction, "direction")

        def f(theta: torch.Tensor) -> torch.Tensor:
            total = torch.zeros((), dtype=obj.dtype, device=obj.device)
            with obj.mode():
                for w, xb, yb in obj.batches():
                    total = total + w * obj.batch_loss(obj.unflatten(theta), xb, yb)
            return total
    elif callable(model_or_fn):
        if x is None:
            raise ValueError("a plain function needs the point x=")
        f, point = model_or_fn, x
        if not isinstance(direction, torch.Tensor) or direction.shape != point.shape:
            raise ValueError("direction must be a tensor shaped like x")
    else:
        raise TypeError("model_or_fn must be an nn.Module, an Objective or a callable")

    d = direction.detach()
    f0, g, product = hvp_fn(f, point)
    slope = float(torch.dot(g.reshape(-1), d.reshape(-1)))
    curv = float(torch.dot(product(d).reshape(-1), d.reshape(-1)))
    actual, pred1, pred2, rho, err1, err2 = [], [], [], [], [], []
    with torch.no_grad():
        for t in steps:
            change = float(f(point + t * d) - f0)
            p1 = t * slope
            p2 = p1 + 0.5 * t * t * curv
            actual.append(change)
            pred1.append(p1)
            pred2.append(p2)
            rho.append(change / p2 if p2 != 0 else math.nan)
            err1.append(abs(change - p1))
            err2.append(abs(change - p2))
    return QuadraticFit(
        step_sizes=steps, actual=actual, predicted_first=pred1, predicted_second=pred2,
        rho=rho, error_first=err1, error_second=err2, directional_derivative=slope,
        curvature=curv, slope_first=_loglog_slope(steps, err1),
        slope_second=_loglog_slope(steps, err2),
    )
