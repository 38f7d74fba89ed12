"""Curvature diagnostics of models and training runs."""

from curvlab.diagnostics.checks import CheckResult, gradient_check, hvp_check
from curvlab.diagnostics.precision import PrecisionReport, precision_check
from curvlab.diagnostics.quadratic_fit import QuadraticFit, quadratic_model_fit
from curvlab.diagnostics.summary import CurvatureSummary, curvature_summary

__all__ = [
    "CurvatureSummary",
    "PrecisionReport",
    "QuadraticFit",
    "curvature_summary",
    "precision_check",
    "quadratic_model_fit",
    "CheckResult",
    "gradient_check",
    "hvp_check",
]
