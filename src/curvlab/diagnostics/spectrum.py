"""Spectral diagnostics of a curvature operator: extreme eigenvalues, trace, density,
condition number and per-layer sharpness.

Every function takes a curvature operator (e.g. ``HessianOperator(model, loss_fn,
batch)``), a square tensor or a :class:`~curvlab.linalg.MatvecOperator`, and reports the
matrix-vector products it used. The algorithms are in :mod:`curvlab.linalg.krylov` and
:mod:`curvlab.linalg.estimators`; this module chooses sensible settings and interprets
the numbers. All of them assume a symmetric operator: a user's tensor or matvec is checked
for symmetry where it enters (:func:`curvlab.linalg.as_operator`; ValueError if it is not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from curvlab.linalg.estimators import SpectralDensity, TraceEstimate, hutchinson, hutchpp, slq
from curvlab.linalg.krylov import EigenResult, lanczos, power_iteration
from curvlab.linalg.operator import MatvecOperator, as_operator

__all__ = ["top_eigenvalues", "bottom_eigenvalues", "BottomEigenResult", "spectral_density",
           "trace", "condition_number", "ConditionNumber", "layer_sharpness",
           "LayerSharpness", "parameter_blocks"]


def top_eigenvalues(op: Any, k: int = 1, *, tol: float = 1e-4, method: str = "lanczos",
                    max_iter: int | None = None, v0: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues and eigenvectors.

    ``method="lanczos"`` (default) stops when every Ritz pair has relative residual
    ``||H y - theta y|| / |theta| <= tol``, which bounds the relative eigenvalue error by
    ``tol`` (see :mod:`curvlab.linalg.krylov`; for ``k >= 2`` a deflated second run finds
    the copies of repeated eigenvalues one Krylov space misses). ``method="power"`` (``k=1``
    only) finds the largest-*magnitude* eigenvalue with the same stopping rule, usually at
    several times the cost. ``v0`` warm-starts from previous eigenvector(s).
    """
    if method == "lanczos":
        return lanczos(op, k, which="largest", tol=tol, max_iter=max_iter, v0=v0,
                       generator=generator)
    if method == "power":
        if k != 1:
            raise ValueError("method='power' computes one eigenpair; use k=1 or "
                             "method='lanczos'")
        return power_iteration(op, tol=tol, max_iter=max_iter or 1000, v0=v0,
                               generator=generator)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


@dataclass
class BottomEigenResult(EigenResult):
    """:class:`EigenResult` of the smallest eigenvalues plus a classification of the point.

    ``lambda_max_estimate`` is the largest Ritz value of the same Krylov space (a lower
    bound on lambda_max, used as the scale). ``classification``:

    * ``"saddle"`` -- a Ritz value below ``-flat_tol * lambda_max``. Ritz values are
      never below lambda_min (Courant-Fischer), so negative curvature is certain.
    * ``"minimum"`` -- converged smallest eigenvalue above ``+flat_tol * lambda_max``.
    * ``"flat"`` -- the smallest eigenvalue is within ``flat_tol * lambda_max`` of zero
      (degenerate: second-order information cannot decide).
    * ``"undetermined"`` -- not converged and no negative Ritz value found.
    """

    lambda_max_estimate: float = 0.0
    classification: str = "undetermined"


def bottom_eigenvalues(op: Any, k: int = 1, *, tol: float = 1e-3, flat_tol: float = 1e-3,
                       max_iter: int | None = None, v0: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> BottomEigenResult:
    """The ``k`` smallest (algebraic) eigenvalues: negative curvature and saddle detection.

    Lanczos with residuals measured relative to the operator's scale:
    ``||H y - theta y|| <= tol * max|Ritz value|`` (the bottom of a network Hessian sits
    near zero, where a test relative to ``|theta|`` itself would never pass).
    """
    res = lanczos(op, k, which="smallest", tol=tol, relative_to="norm", max_iter=max_iter,
                  v0=v0, generator=generator)
    lam_max = float(res.ritz_values.max())
    scale = max(abs(lam_max), float(res.ritz_values.abs().max()))
    lo = float(res.eigenvalues[0])
    if lo < -flat_tol * scale:
        label = "saddle"
    elif not res.converged:
        label = "undetermined"
    elif lo > flat_tol * scale:
        label = "minimum"
    else:
        label = "flat"
    return BottomEigenResult(**{f: getattr(res, f) for f in res.__dataclass_fields__},
                             lambda_max_estimate=lam_max, classification=label)


def spectral_density(op: Any, *, num_probes: int = 10, num_steps: int = 60, deflate: int = 0,
                     num_points: int = 1000, sigma: float | None = None,
                     generator: torch.Generator | None = None) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (:func:`curvlab.linalg.slq`):
    ``num_probes * num_steps`` products (plus the deflation's, if ``deflate > 0``)."""
    return slq(op, num_probes, num_steps, deflate=deflate, num_points=num_points, sigma=sigma,
               generator=generator)


def trace(op: Any, num_samples: int = 30, *, method: str = "hutch++", block_size: int = 10,
          generator: torch.Generator | None = None) -> TraceEstimate:
    """Trace estimate with a standard error, from ``num_samples`` products.

    ``method="hutch++"`` (default; Meyer et al. 2021) spends a third of the products on a
    low-rank sketch whose trace it takes exactly -- much more accurate on curvature
    matrices, whose trace is dominated by a few outliers; ``"hutchinson"`` spends all of
    them on Rademacher probes.
    """
    if method == "hutch++":
        return hutchpp(op, num_samples, block_size=block_size, generator=generator)
    if method == "hutchinson":
        return hutchinson(op, num_samples, block_size=block_size, generator=generator)
    raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")


@dataclass
class ConditionNumber:
    """``lambda_max / lambda_min`` (inf when lambda_min <= 0: the operator is not
    positive definite and the condition number of the quadratic model is unbounded)."""

    value: float
    lambda_max: float
    lambda_min: float
    num_matvecs: int
    converged: bool


def condition_number(op: Any, *, tol: float = 1e-3, max_iter: int | None = None,
                     generator: torch.Generator | None = None) -> ConditionNumber:
    """Estimate ``kappa = lambda_max / lambda_min`` with one Lanczos run per end, each to
    relative residual ``tol`` (so ``kappa`` is within about ``2 tol`` relative when both
    converge)."""
    A = as_operator(op)
    top = lanczos(A, 1, which="largest", tol=tol, max_iter=max_iter, generator=generator)
    lam_max = float(top.eigenvalues[0])
    bot = lanczos(A, 1, which="smallest", tol=tol, max_iter=max_iter, generator=generator)
    lam_min = float(bot.eigenvalues[0])
    value = lam_max / lam_min if lam_min > 0 else float("inf")
    return ConditionNumber(value, lam_max, lam_min, A.num_matvecs,
                           top.converged and bot.converged)


def parameter_blocks(op: Any, group: str = "module") -> dict[str, slice]:
    """Slices of the flat parameter vector per parameter (``group="param"``) or per module
    (``"module"``: parameters sharing a name prefix, e.g. ``0.weight`` and ``0.bias``)."""
    objective = getattr(op, "objective", None)
    if objective is None:
        raise TypeError("per-block diagnostics need a curvature operator built on an "
                        "Objective (e.g. HessianOperator(model, loss_fn, data))")
    if group not in ("module", "param"):
        raise ValueError(f"group must be 'module' or 'param', got {group!r}")
    blocks: dict[str, slice] = {}
    start = 0
    for name, p in objective.params.items():
        key = name if group == "param" else (name.rsplit(".", 1)[0] if "." in name else name)
        stop = start + p.numel()
        if key in blocks and blocks[key].stop == start:
            blocks[key] = slice(blocks[key].start, stop)
        else:
            blocks[key if key not in blocks else name] = slice(start, stop)
        start = stop
    return blocks


@dataclass
class LayerSharpness:
    """lambda_max of each diagonal block ``H[b, b]`` of the curvature matrix."""

    lambda_max: dict[str, float]
    sizes: dict[str, int]
    num_matvecs: int
    converged: dict[str, bool] = field(default_factory=dict)


def layer_sharpness(op: Any, *, group: str = "module", tol: float = 1e-3,
                    max_iter: int | None = None,
                    generator: torch.Generator | None = None) -> LayerSharpness:
    """Per-layer (per parameter block) sharpness: the top eigenvalue of each diagonal
    block ``H_bb`` (the curvature seen when only that block moves), by Lanczos on the
    restricted operator ``v_b -> (H [0, v_b, 0])_b``. Each product is one full product.
    """
    blocks = parameter_blocks(op, group)
    full = as_operator(op)
    n = full.n
    out, sizes, conv = {}, {}, {}
    for name, sl in blocks.items():
        def mv(v: torch.Tensor, sl: slice = sl) -> torch.Tensor:
            x = torch.zeros(n, dtype=full.dtype, device=full.device)
            x[sl] = v
            return full.matvec(x)[sl]

        size = sl.stop - sl.start
        block = MatvecOperator(mv, size, dtype=full.dtype, device=full.device,
                               check_symmetry=False)  # a diagonal block of a checked op
        r = lanczos(block, 1,
                    which="largest", tol=tol, max_iter=max_iter, generator=generator)
        out[name], sizes[name], conv[name] = float(r.eigenvalues[0]), size, r.converged
    return LayerSharpness(out, sizes, full.num_matvecs, conv)
