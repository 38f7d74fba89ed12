"""Curvature matrices as matrix-free linear operators on the flat parameter vector."""

from curvlab.linops.base import CurvatureOperator
from curvlab.linops.diagonal import DiagonalOperator
from curvlab.linops.fisher import EmpiricalFisherOperator, FisherOperator
from curvlab.linops.ggn import GGNOperator
from curvlab.linops.hessian import HessianOperator

__all__ = [
    "CurvatureOperator",
    "DiagonalOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
]

from curvlab.linops.kfac import EKFACOperator, KFACOperator  # noqa: E402

__all__ += ["KFACOperator", "EKFACOperator"]
