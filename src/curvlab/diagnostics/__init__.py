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
from curvlab.diagnostics.laplace import LaplaceEvidence as LaplaceEvidence
from curvlab.diagnostics.laplace import (
    laplace_log_marginal_likelihood as laplace_log_marginal_likelihood,
)
from curvlab.diagnostics.monitor import CurvatureMonitor as CurvatureMonitor
from curvlab.diagnostics.monitor import MonitorEvent as MonitorEvent
from curvlab.diagnostics.monitor import forecast_crossing as forecast_crossing
from curvlab.diagnostics.propagation import effective_rank as effective_rank
from curvlab.diagnostics.propagation import gradient_effective_rank as gradient_effective_rank
from curvlab.diagnostics.propagation import jacobian_singular_values as jacobian_singular_values
from curvlab.diagnostics.sharpness import epsilon_sharpness as epsilon_sharpness
from curvlab.diagnostics.sharpness import lambda_max as lambda_max
from curvlab.diagnostics.spectrum import bottom_eigenvalues as bottom_eigenvalues
from curvlab.diagnostics.spectrum import condition_number as condition_number
from curvlab.diagnostics.spectrum import layer_sharpness as layer_sharpness
from curvlab.diagnostics.spectrum import parameter_blocks as parameter_blocks
from curvlab.diagnostics.spectrum import spectral_density as spectral_density
from curvlab.diagnostics.spectrum import top_eigenvalues as top_eigenvalues
from curvlab.diagnostics.spectrum import trace as trace
from curvlab.diagnostics.stability import adam_preconditioner as adam_preconditioner
from curvlab.diagnostics.stability import gd_stability as gd_stability
from curvlab.diagnostics.stability import gradient_noise as gradient_noise
from curvlab.diagnostics.stability import newton_decrement as newton_decrement
from curvlab.diagnostics.stability import preconditioned_sharpness as preconditioned_sharpness
from curvlab.diagnostics.stability import relative_update as relative_update
from curvlab.diagnostics.stability import stability_model as stability_model
from curvlab.diagnostics.stability import stability_report as stability_report
from curvlab.diagnostics.stability import stability_threshold as stability_threshold

__all__ += [
    "CurvatureMonitor",
    "LaplaceEvidence",
    "MonitorEvent",
    "adam_preconditioner",
    "bottom_eigenvalues",
    "condition_number",
    "effective_rank",
    "epsilon_sharpness",
    "forecast_crossing",
    "gd_stability",
    "gradient_effective_rank",
    "gradient_noise",
    "jacobian_singular_values",
    "lambda_max",
    "laplace_log_marginal_likelihood",
    "layer_sharpness",
    "newton_decrement",
    "parameter_blocks",
    "preconditioned_sharpness",
    "relative_update",
    "spectral_density",
    "stability_model",
    "stability_report",
    "stability_threshold",
    "top_eigenvalues",
    "trace",
]
from curvlab.diagnostics.report import CurvatureReport as CurvatureReport  # noqa: E402
from curvlab.diagnostics.report import ReportOptions as ReportOptions  # noqa: E402
from curvlab.diagnostics.report import curvature_report as curvature_report  # noqa: E402
from curvlab.diagnostics.report import write_report as write_report  # noqa: E402

__all__ += ["CurvatureReport", "ReportOptions", "curvature_report", "write_report"]
