"""curvlab: second-order optimization toolkit for PyTorch."""

from curvlab.autodiff import gnvp, grad, hessian, hvp, hvp_fn, jacobian, jvp, vjp
from curvlab.objective import Objective

__version__ = "0.1.0"

__all__ = [
    "Objective",
    "gnvp",
    "grad",
    "hessian",
    "hvp",
    "hvp_fn",
    "jacobian",
    "jvp",
    "vjp",
]

from curvlab import minimize  # noqa: E402  (a callable package: curvlab.minimize(fun, x0))
from curvlab.minimize import OptimizeResult, least_squares  # noqa: E402

__all__ += ["OptimizeResult", "least_squares", "minimize"]

from curvlab import diagnostics, linalg, linops, optim  # noqa: E402

__all__ += ["diagnostics", "linalg", "linops", "optim"]
