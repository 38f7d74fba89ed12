"""Deterministic solvers: ``minimize``, ``least_squares``, line searches, test problems.

The package itself is callable: ``curvlab.minimize(fun, x0, method=...)`` is
:func:`curvlab.minimize.api.minimize`, while ``curvlab.minimize.problems`` and friends
stay importable as submodules (a plain re-export of the function would shadow them).
"""

import sys
import types

from curvlab.minimize.api import METHODS, minimize
from curvlab.minimize.least_squares import least_squares
from curvlab.minimize.result import OptimizeResult

__all__ = ["METHODS", "OptimizeResult", "least_squares", "minimize"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return minimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
