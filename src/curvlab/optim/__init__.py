
from curvlab.optim.kfac import KFAC  # noqa: E402

__all__ = [*globals().get("__all__", []), "KFAC"]
