"""The Laplace approximation to the log marginal likelihood (the evidence) of a network.

With a Gaussian prior ``N(mu_0, P_0^{-1})``, ``P_0 = delta I``, and the curvature of the
negative log-likelihood at ``theta_MAP`` (a GGN, Fisher or K-FAC approximation of it),
the evidence is approximated as (MacKay 1992; Immer et al., ICML 2021, eq. 4; Daxberger
et al., "Laplace Redux", NeurIPS 2021, eq. 5)

    log p(D) ~ log p(D | theta) - 1/2 (log det P - log det P_0)
               - 1/2 (theta - mu_0)^T P_0 (theta - mu_0),
    P = H / T + P_0,

where ``H`` is the curvature of ``-log p(D | theta)`` summed over the data and ``T`` the
temperature; the ``2 pi`` of both Gaussian normalizers cancel. This follows laplace-torch's
``BaseLaplace.log_marginal_likelihood`` term by term (``log_likelihood``,
``log_det_ratio``, ``scatter``), including its tempering: ``log p(D | theta)`` is
``-(sum of the losses) / T`` for classification (cross-entropy is ``-log Cat``) and
``-(sum of squared errors) / (2 sigma^2 T) - n_el log(sigma sqrt(2 pi))`` for regression
(``MSELoss``, ``n_el`` the number of target elements, ``sigma`` the noise std).

The curvature operator is of the objective's loss ``L``; a mean-reduced ``L`` averages
``S`` loss terms (:func:`curvlab.losses.loss_normalizer`), so the sum of the losses is
``S L`` and ``H = s C`` with ``s = S`` (classification) or ``S / (2 sigma^2)``
(regression). Then ``log det P = n log(s / T) + log det(C + (delta T / s) I)``, computed by
:func:`curvlab.linalg.logdet` (exact for K-FAC and small operators, SLQ with an error bar
otherwise).

curvlab's K-FAC has one Kronecker block per layer with the bias folded into the input
factor; laplace-torch's ``KronLaplace`` keeps weight and bias in separate blocks, so the
two K-FAC evidences agree only for layers without bias (the full-GGN ones always agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from curvlab.distributed import comm_device
from curvlab.linalg.logdet import LogDetEstimate, logdet
from curvlab.linops import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    KFACOperator,
)
from curvlab.losses import loss_normalizer

__all__ = ["LaplaceEvidence", "laplace_log_marginal_likelihood"]

#: operators that are positive semi-definite by construction (a lower bound 0 on the
#: spectrum makes the SLQ quadrature error a bound)
_PSD = (GGNOperator, FisherOperator, EmpiricalFisherOperator, KFACOperator)


@dataclass
class LaplaceEvidence:
    """``value = log_likelihood - 1/2 log_det_ratio - 1/2 scatter`` (module docstring).

    ``stderr`` is ``logdet.stderr / 2`` (0 for the exact log-determinants);
    ``logdet`` the estimate of ``log det P`` (its ``damping`` is ``delta T / s``, the one
    added to the curvature operator); ``num_matvecs`` the curvature products used.
    """

    value: float
    stderr: float
    log_likelihood: float
    log_det_ratio: float
    scatter: float
    logdet: LogDetEstimate
    num_params: int
    num_matvecs: int


def _likelihood(loss_fn: Any) -> str:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise ValueError("the Laplace evidence needs a log-likelihood: CrossEntropyLoss "
                             "without class weights and label smoothing")
        kind = "classification"
    elif isinstance(loss_fn, nn.MSELoss):
        kind = "regression"
    else:
        raise ValueError(f"the Laplace evidence needs the loss to be a negative "
                         f"log-likelihood it knows: nn.CrossEntropyLoss (classification) or "
                         f"nn.MSELoss (Gaussian regression), got {type(loss_fn).__name__}")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"loss_fn.reduction must be 'mean' or 'sum', got "
                         f"{loss_fn.reduction!r}")
    return kind


def laplace_log_marginal_likelihood(
        curvature: CurvatureOperator, *, prior_precision: float = 1.0,
        prior_mean: float | torch.Tensor = 0.0, sigma_noise: float = 1.0,
        temperature: float = 1.0, method: str = "auto", **logdet_kwargs: Any,
) -> LaplaceEvidence:
    """Laplace log marginal likelihood at the operator's parameters (``theta_MAP``).

    Args:
        curvature: the curvature of the objective's loss at ``theta_MAP``: a
            :class:`~curvlab.linops.GGNOperator` (laplace-torch's ``"full"`` GGN),
            :class:`~curvlab.linops.KFACOperator` (``"kron"``; ``fisher_type="exact"`` is
            laplace-torch's GGN K-FAC), a Fisher or, at your risk, a Hessian operator.
            Its loss must be ``nn.CrossEntropyLoss`` or ``nn.MSELoss``. A damping of the
            operator itself (``KFACOperator(damping=...)``) is part of the curvature.
        prior_precision: ``delta > 0`` of the isotropic prior ``P_0 = delta I``.
        prior_mean: ``mu_0``, a scalar or a flat ``(n,)`` tensor.
        sigma_noise: observation noise std (regression only).
        temperature: ``T`` (``P = H / T + P_0``, log-likelihood divided by ``T``).
        method, ``**logdet_kwargs``: passed to :func:`curvlab.linalg.logdet` (``"auto"``:
            exact for K-FAC and small operators, SLQ otherwise; ``num_probes``,
            ``num_steps``, ``tol``, ``generator``).
    """
    if not isinstance(curvature, CurvatureOperator):
        raise TypeError(f"curvature must be a curvature operator built on an Objective (e.g. "
                        f"GGNOperator(model, loss_fn, data)), got {type(curvature).__name__}")
    for name, val in (("prior_precision", prior_precision), ("sigma_noise", sigma_noise),
                      ("temperature", temperature)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive finite number, got {val!r}")
    obj = curvature.objective
    kind = _likelihood(obj.loss_fn)
    if kind == "classification" and sigma_noise != 1.0:
        raise ValueError("sigma_noise applies to regression (nn.MSELoss) only")
    theta = obj.flatten(curvature.point).detach().double()
    n = theta.numel()
    mean = obj.loss_fn.reduction == "mean"
    weights, normalizers = [], []
    for w, _, targets in obj.batches():
        weights.append(float(w))
        normalizers.append(loss_normalizer(obj.loss_fn, targets) if mean else 0.0)
        normalizers.append(float(targets.numel()))
    counts = torch.tensor([sum(normalizers[0::2]), sum(normalizers[1::2])],
                          dtype=torch.float64)
    if obj.process_group is not None:
        counts = obj.all_reduce(counts.to(comm_device(obj.process_group))).cpu()
    terms, elements = float(counts[0]), int(counts[1])
    if mean and not terms > 0:
        raise ValueError("the data has no loss terms (every target ignored)")
    if mean:
        expected = [n_b / terms for n_b in normalizers[0::2]]
        if any(abs(w - e) > 1e-9 * max(e, 1e-300) for w, e in zip(weights, expected,
                                                                   strict=True)):
            raise ValueError(
                "the objective weights its batches differently from the loss terms they "
                "average (e.g. batches with different numbers of ignored targets), so its "
                "loss is not (sum of the losses) / (number of terms) and the Laplace "
                "likelihood would be wrong; use one batch or a loss with reduction='sum'")
    total_loss = float(obj.loss(curvature.point)) * (terms if mean else 1.0)
    if kind == "classification":
        scale = terms if mean else 1.0
        log_lik = -total_loss / temperature
    else:
        scale = (terms if mean else 1.0) / (2 * sigma_noise ** 2)
        log_lik = (-total_loss / (2 * sigma_noise ** 2 * temperature)
                   - elements * math.log(sigma_noise * math.sqrt(2 * math.pi)))
    s = scale / temperature  # P = s C + delta I
    if "lower_bound" not in logdet_kwargs and isinstance(curvature, _PSD):
        logdet_kwargs["lower_bound"] = 0.0
    ld = logdet(curvature, prior_precision / s, method, **logdet_kwargs)
    logdet_p = n * math.log(s) + ld.estimate
    ld_p = replace(ld, estimate=logdet_p, samples=ld.samples + n * math.log(s))
    mu0 = torch.as_tensor(prior_mean, dtype=torch.float64)
    if mu0.numel() not in (1, n):
        raise ValueError(f"prior_mean must be a scalar or a flat ({n},) tensor, got shape "
                         f"{tuple(mu0.shape)}")
    delta = theta - mu0.to(theta.device).reshape(-1)
    scatter = float(prior_precision * (delta @ delta))
    log_det_ratio = logdet_p - n * math.log(prior_precision)
    value = log_lik - 0.5 * (log_det_ratio + scatter)
    return LaplaceEvidence(value, 0.5 * ld.stderr, log_lik, log_det_ratio, scatter, ld_p, n,
                           ld.num_matvecs)
