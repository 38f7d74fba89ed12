"""minimize / least_squares reject bad arguments and unusable functions with an error that
names the argument and the fix (instead of AttributeError, LinAlgError, an autograd
internals message, or a silently accepted value)."""

import pytest
import torch

from curvlab.minimize import least_squares, minimize

X0 = torch.tensor([1.0, 2.0], dtype=torch.float64)


def quadratic(x):
    return (x ** 2).sum()


def residual(x):
    return x - 1


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(residual_fn=lambda x: [x[0] - 1, x[1]]), TypeError,
     "residual_fn must return a floating-point tensor, got list"),
    (dict(residual_fn=lambda x: (10 * x).long()), TypeError, "got torch.int64"),
    (dict(tau=-1.0), ValueError, "tau must be a finite number > 0"),
    (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
    (dict(gtol=0.0), ValueError, "gtol must be a finite number > 0"),
    (dict(gtol=-1e-6), ValueError, "gtol must be a finite number > 0"),
    (dict(gtol=float("nan")), ValueError, "gtol must be a finite number > 0"),
    (dict(max_iter=-1), ValueError, "max_iter must be an int >= 0"),
    (dict(max_iter=2.5), ValueError, "max_iter must be an int >= 0"),
    (dict(f_scale=float("inf")), ValueError, "f_scale must be a finite number > 0"),
    (dict(cg_rtol=0.0), ValueError, "cg_rtol must be a finite number > 0"),
    (dict(cg_max_iter=0), ValueError, "cg_max_iter must be an int >= 1"),
])
def test_least_squares_arguments(kwargs, error, message):
    kwargs = {"residual_fn": residual, **kwargs}
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        least_squares(kwargs.pop("residual_fn"), X0, **kwargs)


@pytest.mark.parametrize("fun, kwargs, error, message", [
    (lambda x: torch.tensor(3.0, dtype=torch.float64), {}, ValueError,
     "does not depend on x"),
    (lambda x: quadratic(x).detach(), {}, ValueError, "does not depend on x"),
    (lambda x: quadratic(x).long(), {}, TypeError,
     "fun must return a floating-point tensor, got torch.int64"),
    (lambda x: float(quadratic(x)), {}, TypeError, "fun must return a scalar tensor, got float"),
    (quadratic, {"jac": True}, TypeError, r"with jac=True, fun must return a pair \(f, grad\)"),
    (quadratic, {"gtol": 0.0}, ValueError, "gtol must be a finite number > 0"),
    (quadratic, {"gtol": True}, ValueError, "gtol must be a finite number > 0"),
    (quadratic, {"max_iter": -1}, ValueError, "max_iter must be an int >= 0"),
    (quadratic, {"max_iter": True}, ValueError, "max_iter must be an int >= 0"),
])
@pytest.mark.parametrize("method", ["lbfgs", "newton", "trust-ncg"])
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_minimize_arguments(fun, kwargs, error, message, method):
    with pytest.raises(error, match=message):
        minimize(fun, X0, method=method, **kwargs)


def test_good_functions_are_untouched():
    """The explanation only runs after a failure: a good run calls fun exactly nfev times,
    and fun's own errors propagate unchanged."""
    calls = []

    def counted(x):
        calls.append(1)
        return quadratic(x)

    res = minimize(counted, X0, method="bfgs")
    assert res.success and len(calls) == res.nfev

    def raising(x):
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        minimize(raising, X0)
    res = least_squares(residual, X0, max_iter=0)
    assert res.nit == 0 and not res.success
