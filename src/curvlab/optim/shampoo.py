r"""Shampoo: Kronecker-factored preconditioning with learning-rate grafting.

For a block ``G`` of order k (a matrix: k = 2) with factors ``F_i`` (mode-i Gram matrices):

.. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) G_t, \qquad \hat m_t = m_t / (1-\beta_1^t) \\
    F_{i,t} &= \beta_2 F_{i,t-1} + (1-\beta_2) G_{t(i)} G_{t(i)}^T
        \quad(\beta_2 = 1:\ F_{i,t} = F_{i,t-1} + G_{t(i)} G_{t(i)}^T) \\
    R_i &= (\hat F_i + \epsilon I)^{-1/p}, \quad p = 2k \text{ unless overridden}
        \quad\text{(refreshed every ``precondition_frequency`` steps)} \\
    P_t &= \hat m_t \times_1 R_1 \cdots \times_k R_k
        \quad(\text{matrix: } R_L \hat m_t R_R) \\
    \theta_t &= (1 - \eta\lambda)\theta_{t-1} - \eta\, P_t \|D_t\| / \|P_t\|

with ``D_t`` the direction of the grafted diagonal method (per block). Before
``start_preconditioning_step`` the update is ``D_t`` itself (``\hat m_t`` if
``grafting="none"``). Parameters with one non-trivial dimension (biases, norms) or more than
``diagonal_threshold`` elements use ``D_t`` (with ``grafting="none"``: the diagonal of the
Kronecker factor, ``\hat m_t / (\hat v_t + \epsilon)^{1/2}``).

References: Gupta, Koren, Singer (2018), "Shampoo: Preconditioned stochastic tensor
optimization", Alg. 1-2; Anil et al. (2020), "Scalable second order optimization for deep
learning" (grafting, blocking, amortized roots); Shi et al. (2023), "A distributed
data-parallel PyTorch implementation of the distributed Shampoo optimizer" (EMA statistics,
bias correction, exponent override).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.matfuncs import (
    MatrixFunctionError,
    coupled_newton_inverse_root,
    eigenbasis_qr_refresh,
    high_precision_matmul,
    matrix_inverse_root,
    symmetric_eigh,
)
from curvlab.optim.adam import AdamConfig, adam_stability_preconditioner
from curvlab.optim.base import (
    finite_nonnegative,
    finite_positive,
    one_of,
    optional,
    positive_int,
)
from curvlab.optim.preconditioners import (
    GRAFTING_METHODS,
    BlockedPreconditionerOptimizer,
    ema_,
    graft,
    graft_direction,
    guarded_batched,
    kronecker_statistic,
    mode_product,
)
from curvlab.optim.stability import StabilityModel, ema_samples, momentum_threshold

__all__ = ["Shampoo"]


class Shampoo(BlockedPreconditionerOptimizer):
    """Shampoo with blocking, grafting and amortized inverse roots (torch.optim API).

    Args:
        params: parameters or param groups.
        lr: learning rate ``eta``.
        betas: ``(beta1, beta2)`` for the first moment and the factor statistics
            (``beta2 = 1``: running sums as in the original Shampoo).
        eps: damping added to each factor before the root (> 0; 0 only with
            ``pseudo_inverse``). ``epsilon`` is a deprecated alias.
        weight_decay: decoupled weight decay ``lambda``.
        max_preconditioner_dim: block size limit per dimension.
        merge_dims: merge small adjacent dimensions (never into a single vector).
        diagonal_threshold: parameters with more elements use the diagonal method.
        precondition_frequency: steps between inverse-root refreshes.
        start_preconditioning_step: first step that uses the preconditioner (default:
            ``precondition_frequency``); before it the grafted method runs alone.
        exponent_override: use ``F^{-1/p}`` with this ``p`` for every factor instead of ``2k``.
        grafting: "adam" (default), "rmsprop", "adagrad", "sgd" or "none".
        adam: :class:`~curvlab.optim.adam.AdamConfig` (or dict) of the grafted diagonal
            method: its ``betas[1]`` and ``eps`` (the first moment is Shampoo's own, from
            ``betas[0]``); stored in the groups as ``adam_betas`` / ``adam_eps``.
            ``grafting_beta2`` / ``grafting_epsilon`` are deprecated aliases.
        use_bias_correction: bias-correct the first moment and EMA factor statistics.
        root_method: "eigh" (float64 eigendecomposition, default), "newton" (coupled Newton
            iteration) or "qr" (warm-started eigenbasis: after a first eigh, each refresh is one
            power-iteration step + QR from the previous basis, eigenvalues are the Rayleigh
            quotients ``diag(Q^T F Q)``; much cheaper, approximate between refreshes).
        pseudo_inverse: zero the inverse root on the numerical null space instead of damping.
        nonfinite: "skip" (default) skips a step with a non-finite gradient; "raise" raises
            FloatingPointError. A failed/non-finite root keeps the previous one (counted in
            :meth:`stats`); non-finite values never reach the parameters or the state.
        factor_dtype: dtype of statistics and state (default float32; float64 for float64
            parameters). compute_dtype: dtype of the eigendecompositions (default float64).
            Both must be float32 or float64.
        max_state_ratio: a parameter whose Kronecker factors would exceed this multiple of
            its size and 2^20 elements uses the grafted diagonal method (default 8; None:
            no limit, a warning states the cost).
        process_group, distributed_mode: under DDP, share the root refreshes over the ranks
            of this group (``"default"`` or a ``ProcessGroup``); ``"allgather"`` also splits
            the state and works with FSDP2; see :mod:`curvlab.optim.distributors.blocks`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        max_preconditioner_dim: int = 1024,
        merge_dims: bool = True,
        diagonal_threshold: int | None = None,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        exponent_override: float | None = None,
        grafting: str = "adam",
        adam: AdamConfig | dict | None = None,
        use_bias_correction: bool = True,
        root_method: str = "eigh",
        pseudo_inverse: bool = False,
        nonfinite: str = "skip",
        factor_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = torch.float64,
        process_group: Any = None,
        distributed_mode: str = "broadcast",
        max_state_ratio: float | None = 8.0,
        **renamed: Any,
    ) -> None:
        adam = AdamConfig.of(adam)
        if "grafting_beta2" in renamed:  # only Adam's beta2 was configurable
            warnings.warn("Shampoo: 'grafting_beta2' is renamed adam=AdamConfig(betas=(b1, "
                          "beta2))", DeprecationWarning, stacklevel=2)
            adam = AdamConfig((adam.betas[0], renamed.pop("grafting_beta2")), adam.eps)
        aux = self._renamed_kwargs(renamed, {"eps": eps, "adam_betas": adam.betas,
                                             "adam_eps": adam.eps})
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=aux["eps"], weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim, merge_dims=merge_dims,
            diagonal_threshold=diagonal_threshold, precondition_frequency=precondition_frequency,
            start_preconditioning_step=(precondition_frequency if start_preconditioning_step
                                        is None else start_preconditioning_step),
            exponent_override=exponent_override, grafting=grafting,
            adam_betas=tuple(aux["adam_betas"]), adam_eps=aux["adam_eps"],
            use_bias_correction=use_bias_correction, root_method=root_method,
            pseudo_inverse=pseudo_inverse, max_state_ratio=max_state_ratio,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, factor_dtype=factor_dtype,
                         compute_dtype=compute_dtype, process_group=process_group,
                         distributed_mode=distributed_mode)

    renamed = {"epsilon": "eps", "grafting_epsilon": "adam_eps"}
    hyperparameters = {**BlockedPreconditionerOptimizer.hyperparameters,
                       "adam_betas": lambda b: None if isinstance(b, (tuple, list)) and len(b)
                       == 2 and all(0 <= x < 1 for x in b) else "must be two numbers in [0, 1)",
                       "adam_eps": finite_positive, "weight_decay": finite_nonnegative,
                       "grafting": one_of(*GRAFTING_METHODS),
                       "root_method": one_of("eigh", "newton", "qr"),
                       "exponent_override": optional(finite_positive),
                       "precondition_frequency": positive_int}

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0):
            raise ValueError(f"Shampoo: betas[0]={b1!r} must be in [0, 1)")
        if not (0.0 < b2 <= 1.0):
            raise ValueError(f"Shampoo: betas[1]={b2!r} must be in (0, 1] (1: running sums)")
        eps = group["eps"]
        if not (math.isfinite(eps) and (eps > 0 or (eps == 0 and group["pseudo_inverse"]))):
            raise ValueError(f"Shampoo: eps={eps!r} must be finite and > 0 (0 only with "
                             "pseudo_inverse=True): the roots of undamped factors overflow")
        p = group["exponent_override"]
        if group["root_method"] == "newton" and p is not None and int(p) != p:
            raise ValueError("Shampoo: root_method='newton' needs an integer exponent_override")

    def stability_model(self) -> StabilityModel:
        """Shampoo's step is the grafted method's (Adam's, by default) in norm, per block:
        the rule used is Adam's, ``2 (1 + b1) / (1 - b1)`` on the sharpness preconditioned
        by the grafted second moment ``sqrt(v_hat) + eps`` (exact for the diagonal
        parameters; for blocks the direction is Shampoo's, only its size is Adam's, so the
        ratio is an estimate)."""
        group = self.param_groups[0]
        return StabilityModel("shampoo", float(group["lr"]),
                              momentum_threshold(group["betas"][0], ema=True),
                              self._inv_sqrt_preconditioner,
                              "grafted Adam's preconditioner; block directions are Shampoo's",
                              self._preconditioner_samples)

    def _preconditioner_samples(self) -> float:
        """Gradients the grafted second moment averages (fewest over the groups;
        :func:`~curvlab.optim.stability.ema_samples`); inf without Adam grafting."""
        return min((ema_samples(g["adam_betas"][1], t) if g["grafting"] == "adam" else math.inf
                    for g, t in zip(self.param_groups, self._steps)), default=math.inf)

    def _inv_sqrt_preconditioner(self, p: Tensor, x: Tensor) -> Tensor:
        st = self.state.get(p, {})
        v = [val for k, val in st.items() if k == "v" or k.startswith("v.")]
        gi, plan = self._param_plan(p)
        group, t = self.param_groups[gi], self._steps[gi]
        if group["grafting"] != "adam" or not v or t == 0:
            return x
        # Shampoo's own first moment (bias-corrected with its beta1), grafted Adam's v
        config = AdamConfig((group["betas"][0], group["adam_betas"][1]), group["adam_eps"],
                            bias_correction=group["use_bias_correction"])
        if "v" in st:
            P = adam_stability_preconditioner(st["v"], t, config)
            return x * P.rsqrt().view(x.shape).to(x.dtype)
        out = torch.empty_like(x)
        for j, (_, slices) in enumerate(plan.blocks):
            P = adam_stability_preconditioner(st[f"v.{j}"], t, config).rsqrt()
            out.view(plan.merged_shape)[slices] = \
                x.reshape(plan.merged_shape)[slices] * P.to(x.dtype)
        return out

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {}
        if group["betas"][0] > 0:
            st["m"] = torch.zeros(n, *shape, dtype=dtype, device=device)
        if group["grafting"] not in ("none", "sgd"):
            st["v"] = torch.zeros(n, *shape, dtype=dtype, device=device)
        for i, d in enumerate(shape):
            st[f"F{i}"] = torch.zeros(n, d, d, dtype=dtype, device=device)
            st[f"R{i}"] = torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()
            if group["root_method"] == "qr":
                st[f"Q{i}"] = torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()
        if group["root_method"] == "qr":
            st["has_basis"] = torch.zeros(n, dtype=dtype, device=device)
        return st

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        st = {"v": torch.zeros(n, dtype=dtype, device=device)}
        if group["betas"][0] > 0:
            st["m"] = torch.zeros(n, dtype=dtype, device=device)
        return st

    def _m_hat(self, group: dict, st: dict[str, Tensor], G: Tensor, step: int) -> Tensor:
        """The (bias-corrected) first moment, already updated with ``G``."""
        b1 = group["betas"][0]
        if b1 == 0:
            return G
        return st["m"] / (1.0 - b1**step) if group["use_bias_correction"] else st["m"]

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        if group["betas"][0] > 0:
            ema_(st["m"], g, group["betas"][0], self._guard)
        m_hat = self._m_hat(group, st, g, step)
        if group["grafting"] != "none":
            return graft_direction(group["grafting"], m_hat, g, st.get("v"), step,
                                   group["adam_betas"][1], group["adam_eps"], self._guard)
        b2 = group["betas"][1]
        ema_(st["v"], g * g, b2, self._guard)
        v_hat = st["v"] / (1.0 - b2**step) if group["use_bias_correction"] and b2 < 1 else st["v"]
        p = group["exponent_override"] or 2
        return m_hat * (v_hat + group["eps"]).pow(-1.0 / p)

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        """First moment ``m``, and per mode ``i`` the factor ``F_i`` (EMA, or the running
        sum for ``betas[1] == 1``) of ``G_(i) G_(i)^T``."""
        if group["betas"][0] > 0:
            ema_(st["m"], G, group["betas"][0], self._guard)
        for i in range(G.ndim - 1):
            ema_(st[f"F{i}"], kronecker_statistic(G, i), group["betas"][1], self._guard)

    def _refresh_blocks(self, group: dict, st: dict[str, Tensor], step: int) -> None:
        """The inverse roots ``R_i = (F_i + eps I)^(-1/p)`` of every factor."""
        order = sum(1 for k in st if k[0] == "F")
        self._refresh(lambda s: self._refresh_roots(group, s, order, step), st,
                      [k for k in st if k[0] in "RQ" or k == "has_basis"],
                      reads=[f"F{i}" for i in range(order)])

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        """``m_hat x_1 R_1 ... x_k R_k`` grafted to the norm of the grafting method's
        direction (whose second moment is updated here), per block; before
        ``start_preconditioning_step`` the grafting direction itself."""
        m_hat = self._m_hat(group, st, G, step)
        D = None
        if group["grafting"] != "none":
            D = graft_direction(group["grafting"], m_hat, G, st.get("v"), step,
                                group["adam_betas"][1], group["adam_eps"], self._guard)
        if step < group["start_preconditioning_step"]:
            return m_hat if D is None else D
        P = m_hat
        for i in range(G.ndim - 1):
            P = mode_product(P, st[f"R{i}"], i)
        return P if D is None else graft(P, D)

    def _refresh_roots(self, group: dict, st: dict[str, Tensor], order: int, step: int) -> None:
        b2 = group["betas"][1]
        scale = 1.0 / (1.0 - b2**step) if group["use_bias_correction"] and b2 < 1 else 1.0
        p = group["exponent_override"] or 2 * order
        eps, cdt = group["eps"], self.compute_dtype
        if group["root_method"] == "eigh":
            def fn(F: Tensor) -> tuple[Tensor]:
                return (matrix_inverse_root(F * scale, p, damping=eps, compute_dtype=cdt,
                                            pseudo_inverse=group["pseudo_inverse"]),)
        elif group["root_method"] == "newton":
            def fn(F: Tensor) -> tuple[Tensor]:
                return (coupled_newton_inverse_root(F * scale, int(p), damping=eps,
                                                    compute_dtype=cdt),)
        else:
            self._refresh_roots_qr(st, order, scale, p, eps)
            return
        for i in range(order):
            R = st[f"R{i}"]
            (new,), failed = guarded_batched(fn, (st[f"F{i}"],), (R,))
            R.copy_(new)
            self._count_refresh(R.shape[0], failed, "inverse root", tuple(R.shape[1:]))

    def _refresh_roots_qr(self, st: dict[str, Tensor], order: int, scale: float, p: float,
                          eps: float) -> None:
        """Roots from a warm-started eigenbasis (eigh the first time, then one QR step)."""
        cdt = self.compute_dtype
        first = not bool(st["has_basis"].all())

        def fn(F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
            Fs = F.to(cdt) * scale
            if first:
                est, Qn = symmetric_eigh(Fs, cdt)
            else:
                Qn = eigenbasis_qr_refresh(Fs, Q.to(cdt), compute_dtype=cdt)[0]
                with high_precision_matmul():
                    est = ((Fs @ Qn) * Qn).sum(-2)
            inv = (est.clamp_min(0.0) + eps).pow(-1.0 / p)
            with high_precision_matmul():
                R = (Qn * inv.unsqueeze(-2)) @ Qn.mT
            if not bool(torch.isfinite(R.sum())):
                raise MatrixFunctionError("inverse root from the QR eigenbasis is not finite")
            return R.to(F.dtype), Qn.to(F.dtype)

        for i in range(order):
            R, Q = st[f"R{i}"], st[f"Q{i}"]
            (Rn, Qn), failed = guarded_batched(fn, (st[f"F{i}"], Q), (R, Q))
            R.copy_(Rn)
            Q.copy_(Qn)
            self._count_refresh(R.shape[0], failed, "inverse root", tuple(R.shape[1:]))
        st["has_basis"].fill_(1.0)
