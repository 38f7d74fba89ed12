r"""KL-Shampoo and KL-SOAP: Shampoo's Kronecker factors fitted by KL minimization.

Model the gradient ``g = vec(G)`` of an order-k block (dims ``d_1 .. d_k``, ``N = prod d_i``)
as a zero-mean Gaussian with Kronecker covariance ``S = S_1 (x) ... (x) S_k`` and fit the
factors by ``min KL(N(0, E[g g^T]) || N(0, S))``. Setting the gradient in ``S_i`` to zero
gives, for a matrix (``L = S_1``, m x m; ``R = S_2``, n x n),

.. math::
    L = \tfrac{1}{n} E[G R^{-1} G^T], \qquad R = \tfrac{1}{m} E[G^T L^{-1} G]

(order k: ``S_i = (d_i / N) E[G_(i) (\otimes_{j \ne i} S_j^{-1}) G_(i)^T]``): each factor's
statistic is whitened by the *other* factors' inverses; Shampoo's one-sided ``E[G G^T]`` is
the fit with the other factor frozen at ``I``. ``(c L, R / c)`` fit equally well, ``R (x) L``
is unique; for ``G = L_0^{1/2} Z R_0^{1/2}`` with ``Z`` iid standard normal the fit is exact,
``R (x) L = R_0 (x) L_0``. The fit *is* the second moment (Shampoo's factors are its square
roots up to scale), so the preconditioner is ``S^{-1/2}``: exponent ``-1/2`` on every factor.

The practical scheme (Lin et al., Sec. 4 and their prototype ``optim/kl_opt.py``): per mode an
eigenbasis ``Q_i`` (SOAP's machinery: ``eigh`` at the initialization step, then one
power-iteration step + QR every ``precondition_frequency`` steps) and eigenvalues
``lambda_i`` re-estimated *every step* in that (stale) basis, with ``beta`` = ``shampoo_beta``:

.. math::
    \hat S_j^{-1} &= Q_j \operatorname{diag}(\lambda_j)^{-1} Q_j^T \\
    F_i &\leftarrow \beta F_i + (1 - \beta) \tfrac{d_i}{N} G_{(i)}
        (\otimes_{j \ne i} \hat S_j^{-1}) G_{(i)}^T \\
    \lambda_i &\leftarrow \max\big(\beta \lambda_i + (1 - \beta)
        [\operatorname{diag}(Q_i^T \Delta F_i Q_i) + \delta \textstyle\prod_{j \ne i}
        \operatorname{mean}(\lambda_j^{-1})],\ c_i^{-2}\big),
        \quad c_i = \max(10, \min(d_i, c_{\max}))

(all modes from the same old ``lambda``; ``Delta F_i`` the whitened statistic; ``delta`` =
``damping``, the KL fit of ``E[g g^T] + delta I``; the floor is the prototype's clamp
``lambda^{-1/2} <= c_i``). ``F_i`` only feeds the eigenbasis refresh; ``lambda_i`` is the
preconditioner's spectrum. Step ``t`` preconditions with the statistics of steps ``< t``;
they are updated after the direction. The first step (SOAP's initialization step) accumulates
the unwhitened ``F_i`` (``lambda = 1``), computes the first eigenbases, and moves nothing.

``lambda_i`` then starts from that first statistic (``init_factor="gradient"``, the default):
with ``e_i = diag(Q_i^T F_i Q_i)``,

.. math::
    \lambda_i = (e_i + \operatorname{rms}(e_i)) \,
        \frac{s^{1/k}}{\operatorname{mean}(e_i + \operatorname{rms}(e_i))}, \qquad
    s = \tfrac{1}{N} \lVert G \rVert_F^2,

so ``lambda_1 (x) ... (x) lambda_k`` has the gradient's mean square (the scale the KL fit
converges to) and no eigenvalue is below the RMS shift of a one-sample estimate (the
initialization of NVIDIA Emerging-Optimizers' online KL-Shampoo, ``okls.py``). The
prototype's constant start (``init_factor=0.1``) sits far above typical second moments
(~1e-6 on a small transformer) and decays at rate ``1 - beta``: hundreds of steps of tiny
updates. A block whose first gradient is zero starts at 0.1.

* :class:`KLShampoo`: ``m <- beta_1 m + (1 - beta_1) G`` and
  ``D = Q [ (Q^T m) / (sqrt(lambda_1 (x) ... (x) lambda_k) + eps) ] Q^T`` (rotations along
  every mode) -- no grafting, no bias correction, no second moment.
* :class:`KLSOAP`: SOAP (Adam in the eigenbasis) with the factors fitted as above.

Parameters with one non-trivial dimension (biases, norms) run SOAP's Adam in both.

Reference: Lin, Lowe, Dangel, Eschenhagen, Xu, Grosse (2025), "Understanding and Improving
Shampoo and SOAP via Kullback-Leibler Minimization" (arXiv:2509.03378, ICLR 2026).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.matfuncs import high_precision_matmul
from curvlab.optim.base import finite_nonnegative, finite_positive
from curvlab.optim.preconditioners import ema_, kronecker_statistic, mode_product
from curvlab.optim.soap import SOAP, _adam_step, _rotate
from curvlab.optim.stability import StabilityModel, ema_samples, momentum_threshold

__all__ = ["KLShampoo", "KLSOAP", "kl_statistics"]

#: the prototype's floor on the eigenvalues: ``lambda_i^{-1/2} <= max(10, min(d_i, c_max))``
_MIN_CLAMP = 10.0
#: the prototype's constant start of the eigenvalues; also the start of a block whose first
#: gradient is zero under ``init_factor="gradient"``
_PROTOTYPE_INIT = 0.1


def _init_factor_rule(x: Any) -> str | None:
    """Rule: ``"gradient"`` or a finite real number > 0."""
    return None if x == "gradient" else finite_positive(x)


def _along(x: Tensor, mode: int, ndim: int) -> Tensor:
    """A per-block vector ``x`` (B, d) shaped to broadcast along ``mode`` of (B, *shape)."""
    shape = [x.shape[0]] + [1] * (ndim - 1)
    shape[1 + mode] = x.shape[1]
    return x.view(shape)


def kl_statistics(G: Tensor, Qs: list[Tensor], inv: list[Tensor]) -> tuple[list[Tensor],
                                                                          list[Tensor]]:
    r"""The whitened Kronecker statistics of a stack of blocks ``G`` (B, d_1, ..., d_k).

    With ``\hat S_j^{-1} = Q_j diag(inv_j) Q_j^T`` (``Qs[j]``: (B, d_j, d_j) orthogonal,
    ``inv[j]``: (B, d_j) the inverse eigenvalues) returns, per mode ``i``,
    ``S_i = (d_i / N) G_(i) (\otimes_{j \ne i} \hat S_j^{-1}) G_(i)^T`` and its diagonal in
    the basis, ``diag(Q_i^T S_i Q_i)``.
    """
    k = G.ndim - 1
    N = math.prod(G.shape[1:])
    s = [x.sqrt() for x in inv]
    if k == 2:  # matrices: G Q_R, Q_L^T G and Q_L^T G Q_R, three batched matmuls
        A = torch.bmm(G, Qs[1])
        B = torch.bmm(Qs[0].mT, G)
        H = torch.bmm(B, Qs[1])
        W0, W1 = A * s[1].unsqueeze(-2), B * s[0].unsqueeze(-1)
        m, n = G.shape[1:]
        stats = [torch.bmm(W0, W0.mT).div_(n), torch.bmm(W1.mT, W1).div_(m)]
        H2 = H.square()
        diags = [torch.bmm(H2, inv[1].unsqueeze(-1)).squeeze(-1).div_(n),
                 torch.bmm(inv[0].unsqueeze(-2), H2).squeeze(-2).div_(m)]
        return stats, diags
    stats, diags = [], []
    H2 = _rotate(G, Qs).square()
    for i in range(k):
        W, X = G, H2
        for j in range(k):
            if j != i:
                W = mode_product(W, Qs[j], j, transpose=True) * _along(s[j], j, G.ndim)
                X = X * _along(inv[j], j, G.ndim)
        scale = G.shape[1 + i] / N
        stats.append(kronecker_statistic(W, i).mul_(scale))
        other = [1 + j for j in range(k) if j != i]
        diags.append(X.sum(dim=other).mul_(scale))
    return stats, diags


class _KLFactors:
    """The KL fit of the Kronecker factors, mixed into SOAP (see the module docstring):
    eigenvalue state ``lam{i}``, the whitened statistics, the eigenvalues following their
    columns through a QR refresh."""

    #: step t preconditions with the statistics of steps < t (the authors' order)
    statistics_after_precondition = True
    #: the whitened statistics run in IEEE float32 (``high_precision_matmul``), also in the
    #: compiled step (the switch is made around the compiled call: dynamo cannot trace it)
    high_precision_step = True
    hyperparameters = {**SOAP.hyperparameters, "init_factor": _init_factor_rule,
                       "damping": finite_nonnegative, "max_inverse_sqrt": finite_positive,
                       "start_preconditioning_step": lambda n: None if n == 1 else
                       "must be 1 (the initialization step)"}

    def __init__(self, params: Any, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.98),
                 shampoo_beta: float | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, init_factor: float | str = "gradient",
                 damping: float = 0.0,
                 max_inverse_sqrt: float = 4000.0, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, shampoo_beta, eps, weight_decay, **kwargs)
        self._add_defaults(init_factor=init_factor, damping=damping,
                           max_inverse_sqrt=max_inverse_sqrt)

    def _add_defaults(self, **settings: Any) -> None:
        """Add the KL settings to the defaults and to every group that lacks them (a
        group's own values kept), and validate the groups."""
        self.defaults.update(settings)
        for group in self.param_groups:
            for k, v in settings.items():
                group.setdefault(k, v)
            self._validate_group(group)

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        st = super()._init_block_state(group, shape, n, dtype, device)
        init = group["init_factor"]
        init = _PROTOTYPE_INIT if init == "gradient" else float(init)
        for i, d in enumerate(shape):
            st[f"lam{i}"] = torch.full((n, d), init, dtype=dtype, device=device)
        return st

    def _refresh_basis(self, group: dict, st: dict[str, Tensor], order: int) -> None:
        """SOAP's refresh; after the first one (the initialization step), ``lambda_i`` from
        the first statistic under ``init_factor="gradient"``."""
        first = not self._basis_complete(st)
        super()._refresh_basis(group, st, order)
        if first and group["init_factor"] == "gradient":
            self._spectrum_from_first_statistic(group, st, order)

    def _spectrum_from_first_statistic(self, group: dict, st: dict[str, Tensor],
                                       order: int) -> None:
        """``lambda_i = (e_i + rms(e_i)) s^{1/k} / mean(e_i + rms(e_i))`` with
        ``e_i = diag(Q_i^T F_i Q_i)`` and ``s`` the first gradient's mean square (module
        docstring); blocks with a zero (or non-finite) first gradient keep 0.1."""
        sb = group["shampoo_beta"]
        sb = group["betas"][1] if sb is None else sb
        weight = 1.0 if sb == 1.0 else 1.0 - sb  # F_i = weight * S_i after one update
        with high_precision_matmul():
            es = [torch.bmm(st[f"Q{i}"].mT, torch.bmm(st[f"F{i}"], st[f"Q{i}"]))
                  .diagonal(dim1=-2, dim2=-1).clamp_min(0.0) for i in range(order)]
        # every mode's statistic has trace (d_i / N) ||G||^2: mean(e_i) = weight * s
        s = es[0].mean(-1, keepdim=True) / weight
        ok = torch.isfinite(s) & (s > 0)
        for i, e in enumerate(es):
            shifted = e + e.square().mean(-1, keepdim=True).sqrt()
            lam = shifted * (s.pow(1.0 / order) / shifted.mean(-1, keepdim=True))
            d = lam.shape[-1]
            c = max(_MIN_CLAMP, min(d, group["max_inverse_sqrt"]))
            lam = torch.where(ok, lam.clamp_min(1.0 / (c * c)), _PROTOTYPE_INIT)
            st[f"lam{i}"].copy_(lam)

    def _coordinate_keys(self, st: dict[str, Tensor]) -> list[str]:
        """SOAP's (if any) and the eigenvalues ``lam{i}``."""
        keys = [k for k in super()._coordinate_keys(st) if k in st]
        return keys + [k for k in st if k.startswith("lam")]

    def _follow_basis(self, st: dict[str, Tensor], orders: list[Tensor]) -> None:
        if "v" in st:
            super()._follow_basis(st, orders)
        for i, order in enumerate(orders):
            lam = st[f"lam{i}"]
            lam.copy_(lam.gather(1, order))

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        """``F_i`` and ``lambda_i`` from ``G`` whitened by the other modes' ``lambda_j``
        (all from the old values); at the initialization step the unwhitened ``F_i`` only."""
        sb = group["shampoo_beta"]
        sb = group["betas"][1] if sb is None else sb
        k = G.ndim - 1
        if _adam_step(group, step) == 0:  # no basis yet: Shampoo's statistic, lambda kept
            for i in range(k):
                S = kronecker_statistic(G, i).mul_(G.shape[1 + i] / math.prod(G.shape[1:]))
                ema_(st[f"F{i}"], S, sb, self._guard)
            return
        lams = [st[f"lam{i}"] for i in range(k)]
        inv = [lam.reciprocal() for lam in lams]
        # IEEE float32: NVIDIA Emerging-Optimizers measured TF32 in this update turning the
        # eigenbasis after gradient spikes (their docs/primer/gradient_spike)
        with high_precision_matmul():
            stats, diags = kl_statistics(G, [st[f"Q{i}"] for i in range(k)], inv)
        delta = group["damping"]
        if delta:
            means = [x.mean(-1, keepdim=True) for x in inv]
            for i in range(k):
                diags[i].add_(delta * math.prod(means[j] for j in range(k) if j != i))
        for i in range(k):
            ema_(st[f"F{i}"], stats[i], sb, self._guard)
            c = max(_MIN_CLAMP, min(G.shape[1 + i], group["max_inverse_sqrt"]))
            lams[i].lerp_(diags[i], 1.0 - sb).clamp_min_(1.0 / (c * c))


_ARGS = """
    Args:
        params: parameters or param groups.
        lr: learning rate. betas: ``(beta_1, beta_2)``: momentum, and the default
            ``shampoo_beta``. eps: added to the denominator.
        shampoo_beta: EMA decay ``beta`` of ``F_i`` and ``lambda_i`` (default ``betas[1]``).
        weight_decay: decoupled weight decay.
        init_factor: ``"gradient"`` (default): ``lambda_i`` from the first gradient's
            statistic, scaled to its mean square (module docstring); a number: ``lambda_i``
            starts there (0.1 is the authors' prototype's).
        damping: ``delta``: the fit of ``E[g g^T] + delta I`` (0, the prototype's default).
        max_inverse_sqrt: ``c_max`` of the floor ``lambda_i >= max(10, min(d_i, c_max))^-2``
            (4000, the prototype's).
        kwargs: ``precondition_frequency``, ``eigenbasis_method``,
            ``max_preconditioner_dim``, ``merge_dims``, ``diagonal_threshold``,
            ``max_state_ratio``, ``nonfinite``, ``factor_dtype``, ``compute_dtype``,
            ``process_group``, ``distributed_mode``: as :class:`~curvlab.optim.soap.SOAP`
            (``start_preconditioning_step`` is 1: the initialization step).

    Defaults are the authors' prototype's (``betas=(0.9, 0.98)``, ``eps=1e-8``,
    ``precondition_frequency=10``) except ``lr`` (SOAP's 3e-3), ``weight_decay`` (0) and
    ``init_factor`` (the first statistic rather than 0.1).
"""


class KLShampoo(_KLFactors, SOAP):
    __doc__ = """KL-Shampoo: ``D = Q [(Q^T m) / (sqrt(lambda_1 (x) ... (x) lambda_k) + eps)] Q^T``
    with the KL-fitted eigenbases and eigenvalues of steps ``< t`` and the momentum ``m``
    (EMA, no bias correction) of steps ``<= t``; no grafting (module docstring).
""" + _ARGS

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        st = super()._init_block_state(group, shape, n, dtype, device)
        del st["v"]  # no second moment: lambda is the spectrum
        return st

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        """``m <- beta_1 m + (1 - beta_1) G``, divided in the eigenbasis by the spectrum;
        the initialization step moves nothing."""
        if _adam_step(group, step) == 0:
            return torch.zeros_like(G)
        k = G.ndim - 1
        Qs = [st[f"Q{i}"] for i in range(k)]
        st["m"].lerp_(G, 1.0 - group["betas"][0])
        M = _rotate(st["m"], Qs).div_(_spectrum([st[f"lam{i}"] for i in range(k)],
                                                group["eps"]))
        return _rotate(M, Qs, back=True)

    def stability_model(self) -> StabilityModel:
        """EMA momentum with a fixed preconditioner between updates, ``D = P^{-1} m`` with
        ``P = Q (sqrt(lambda_1 (x) ... (x) lambda_k) + eps) Q^T`` per block (the state's
        basis and eigenvalues, which the next step uses) and Adam's diagonal for the
        diagonal parameters: threshold ``2 (1 + b1) / (1 - b1)``, exact on a quadratic."""
        group = self.param_groups[0]
        return StabilityModel("kl_shampoo", float(group["lr"]),
                              momentum_threshold(group["betas"][0], ema=True),
                              self._inv_sqrt_preconditioner,
                              "KL-fitted Kronecker eigenbasis and eigenvalues",
                              self._eigenvalue_samples)

    def _eigenvalue_samples(self) -> float:
        """Gradients the eigenvalue EMAs average since the initialization step (fewest over
        the groups; :func:`~curvlab.optim.stability.ema_samples`): early on ``lambda`` is
        mostly its start."""
        return min((ema_samples(g["shampoo_beta"] if g["shampoo_beta"] is not None
                                else g["betas"][1], _adam_step(g, t))
                    for g, t in zip(self.param_groups, self._steps)), default=math.inf)

    def _rotated_preconditioner(self, group: dict, st: dict[str, Tensor], sfx: str,
                                t: int) -> Tensor:
        k = 0
        while f"lam{k}{sfx}" in st:
            k += 1
        return _spectrum([st[f"lam{i}{sfx}"].unsqueeze(0) for i in range(k)],
                         group["eps"])[0]


class KLSOAP(_KLFactors, SOAP):
    __doc__ = """KL-SOAP: SOAP (Adam in the eigenbasis, bias-corrected) whose Kronecker
    factors and eigenbases are the KL fit (module docstring).
""" + _ARGS

    def stability_model(self) -> StabilityModel:
        """SOAP's rule (the step is SOAP's; only the basis differs): Adam's threshold
        ``2 (1 + b1) / (1 - b1)`` with ``P = Q (sqrt(v_hat) + eps) Q^T`` per block."""
        model = super().stability_model()
        return StabilityModel("kl_soap", model.lr, model.threshold,
                              model.inv_sqrt_preconditioner,
                              "Adam in the eigenbasis of the KL-fitted Kronecker factors",
                              model.preconditioner_samples)


def _spectrum(lams: list[Tensor], eps: float) -> Tensor:
    """``sqrt(lambda_1 (x) ... (x) lambda_k) + eps`` of a stack of blocks (B, d_1, ..., d_k)."""
    ndim = len(lams) + 1
    P = _along(lams[0].sqrt(), 0, ndim)
    for j in range(1, len(lams)):
        P = P * _along(lams[j].sqrt(), j, ndim)
    return P + eps
