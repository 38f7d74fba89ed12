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

from curvlab.minimize import OptimizeResult, least_squares, minimize  # noqa: E402

__all__ += ["OptimizeResult", "least_squares", "minimize"]
