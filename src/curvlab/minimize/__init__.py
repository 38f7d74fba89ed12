"""Deterministic solvers: ``minimize``, ``least_squares``, line searches, test problems."""

from curvlab.minimize.api import METHODS, minimize
from curvlab.minimize.least_squares import least_squares
from curvlab.minimize.result import OptimizeResult

__all__ = ["METHODS", "OptimizeResult", "least_squares", "minimize"]
