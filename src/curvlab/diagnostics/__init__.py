
from curvlab.diagnostics.checks import CheckResult, gradient_check, hvp_check  # noqa: F401
