
from curvlab.optim.hessian_free import HessianFree  # noqa: E402
from curvlab.optim.kfac import KFAC  # noqa: E402
from curvlab.optim.natural_gradient import NaturalGradient  # noqa: E402

__all__ = [*globals().get("__all__", []), "HessianFree", "KFAC", "NaturalGradient"]
