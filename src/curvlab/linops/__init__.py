"""Curvature matrices as matrix-free linear operators on the flat parameter vector."""

from curvlab.linops.base import CurvatureOperator
from curvlab.linops.hessian import HessianOperator

__all__ = ["CurvatureOperator", "HessianOperator"]
