"""Line searches satisfy the conditions they claim; non-finite trials are backtracked."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.minimize.linesearch import (
    LineFunction,
    backtracking,
    exact_quadratic,
    strong_wolfe,
)


def _fg(f):
    def evaluate(x):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = f(xr)
            (g,) = torch.autograd.grad(y, xr)
        return y.detach(), g

    return evaluate


def _setup(f, x):
    f0, g0 = _fg(f)(x)
    d = -g0
    return LineFunction(_fg(f), x, d), float(f0), float(g0 @ d)


FUNCS = {
    "rosenbrock": lambda x: 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2,
    "quartic": lambda x: (x ** 4).sum() + (x ** 2).sum(),
    "exp": lambda x: torch.exp(x).sum() - 3 * x.sum(),
    "wiggly": lambda x: (x ** 2).sum() + 0.3 * torch.sin(5 * x).sum(),
}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FUNCS)), a=st.floats(-2, 2), b=st.floats(-2, 2),
       alpha0=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_strong_wolfe_conditions_hold(name, a, b, alpha0):
    f = FUNCS[name]
    x = torch.tensor([a, b], dtype=torch.float64)
    line, phi0, dphi0 = _setup(f, x)
    if dphi0 > -1e-12:
        return
    c1, c2 = 1e-4, 0.9
    res = strong_wolfe(line, phi0, dphi0, alpha0, c1=c1, c2=c2)
    assert res.success
    p = res.point
    assert p.phi <= phi0 + c1 * p.alpha * dphi0 + 1e-10 * abs(phi0)
    assert abs(p.dphi) <= -c2 * dphi0 * (1 + 1e-12)
    # reported values are the function's values at the returned point
    assert p.phi == pytest.approx(float(f(x + p.alpha * line.d)), rel=1e-12, abs=1e-14)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FUNCS)), a=st.floats(-2, 2), b=st.floats(-2, 2),
       alpha0=st.sampled_from([1e-2, 1.0, 100.0]))
def test_armijo_condition_holds(name, a, b, alpha0):
    f = FUNCS[name]
    x = torch.tensor([a, b], dtype=torch.float64)
    line, phi0, dphi0 = _setup(f, x)
    if dphi0 > -1e-12:
        return
    res = backtracking(line, phi0, dphi0, alpha0, c1=1e-4)
    assert res.success
    p = res.point
    assert p.alpha <= alpha0
    assert p.phi <= phi0 + 1e-4 * p.alpha * dphi0 + 1e-10 * abs(phi0)


def test_tight_c2_gives_nearly_exact_step_on_quadratic():
    A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    f = lambda x: 0.5 * x @ A @ x  # noqa: E731
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    line, phi0, dphi0 = _setup(f, x)
    res = strong_wolfe(line, phi0, dphi0, 1.0, c1=1e-4, c2=1e-3)
    g = -line.d
    exact = float(g @ g / (g @ A @ g))
    assert res.success and res.point.alpha == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("search", ["armijo", "wolfe"])
def test_non_finite_trials_are_backtracked(search):
    # f is NaN for x >= 1 (log of a negative number); the first trial lands there
    f = lambda x: -torch.log(1 - x).sum() + x.sum() ** 2  # noqa: E731
    x = torch.tensor([0.5], dtype=torch.float64)
    d = torch.tensor([1.0], dtype=torch.float64)
    f0, g0 = _fg(f)(x)
    if float(g0 @ d) >= 0:
        d = -d
    line = LineFunction(_fg(f), x, -_fg(f)(x)[1])
    phi0, dphi0 = float(f0), float(g0 @ line.d)
    if search == "armijo":
        res = backtracking(line, phi0, dphi0, 100.0)
    else:
        res = strong_wolfe(line, phi0, dphi0, 100.0)
    assert res.point is not None and math.isfinite(res.point.phi)
    assert bool(torch.isfinite(res.point.g).all()) and res.point.phi < phi0


def test_exact_quadratic_and_non_descent():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    f = lambda x: 0.5 * x @ A @ x  # noqa: E731
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    line, phi0, dphi0 = _setup(f, x)
    g = -line.d
    res = exact_quadratic(line, g, lambda v: A @ v)
    assert res.success
    # the exact minimizer along d has zero directional derivative
    assert abs(res.point.dphi) < 1e-12
    up = LineFunction(_fg(f), x, g)  # ascent direction
    for search in (backtracking, strong_wolfe):
        r = search(up, phi0, float(g @ g), 1.0)
        assert not r.success and r.point is None and "descent" in r.message
    neg = exact_quadratic(line, g, lambda v: -(A @ v))
    assert not neg.success and "curvature" in neg.message
