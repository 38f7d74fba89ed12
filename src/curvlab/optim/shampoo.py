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
from curvlab.optim._preconditioner import (
    GRAFTING_METHODS,
    BlockedPreconditionerOptimizer,
    ema_,
    graft,
    graft_direction,
    guarded_batched,
    is_due,
    kronecker_statistic,
    mode_product,
)

__all__ = ["Shampoo"]


class Shampoo(BlockedPreconditionerOptimizer):
    """Shampoo with blocking, grafting and amortized inverse roots (torch.optim API).

    Args:
        params: parameters or param groups.
        lr: learning rate ``eta``.
        betas: ``(beta1, beta2)`` for the first moment and the factor statistics
            (``beta2 = 1``: running sums as in the original Shampoo).
        epsilon: damping added to each factor before the root.
        weight_decay: decoupled weight decay ``lambda``.
        max_preconditioner_dim: block size limit per dimension.
        merge_dims: merge small adjacent dimensions (never into a single vector).
        diagonal_threshold: parameters with more elements use the diagonal method.
        precondition_frequency: steps between inverse-root refreshes.
        start_preconditioning_step: first step that uses the preconditioner (default:
            ``precondition_frequency``); before it the grafted method runs alone.
        exponent_override: use ``F^{-1/p}`` with this ``p`` for every factor instead of ``2k``.
        grafting: "adam" (default), "rmsprop", "adagrad", "sgd" or "none".
        grafting_beta2, grafting_epsilon: second-moment decay and epsilon of the grafted method.
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
        process_group, distributed_mode: under DDP, share the root refreshes over the ranks
            of this group (``"default"`` or a ``ProcessGroup``); ``"allgather"`` also splits
            the state and works with FSDP2; see :mod:`curvlab.optim._distributed`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        max_preconditioner_dim: int = 1024,
        merge_dims: bool = True,
        diagonal_threshold: int | None = None,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        exponent_override: float | None = None,
        grafting: str = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        use_bias_correction: bool = True,
        root_method: str = "eigh",
        pseudo_inverse: bool = False,
        nonfinite: str = "skip",
        factor_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = torch.float64,
        process_group: Any = None,
        distributed_mode: str = "broadcast",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), epsilon=epsilon, weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim, merge_dims=merge_dims,
            diagonal_threshold=diagonal_threshold, precondition_frequency=precondition_frequency,
            start_preconditioning_step=(precondition_frequency if start_preconditioning_step
                                        is None else start_preconditioning_step),
            exponent_override=exponent_override, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            use_bias_correction=use_bias_correction, root_method=root_method,
            pseudo_inverse=pseudo_inverse,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, factor_dtype=factor_dtype,
                         compute_dtype=compute_dtype, process_group=process_group,
                         distributed_mode=distributed_mode)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0):
            raise ValueError(f"betas[0] must be in [0, 1), got {b1}")
        if not (0.0 < b2 <= 1.0):
            raise ValueError(f"betas[1] must be in (0, 1], got {b2}")
        if group["epsilon"] < 0:
            raise ValueError(f"epsilon must be >= 0, got {group['epsilon']}")
        if group["grafting"] not in GRAFTING_METHODS:
            raise ValueError(f"grafting must be one of {GRAFTING_METHODS}, "
                             f"got {group['grafting']!r}")
        if group["root_method"] not in ("eigh", "newton", "qr"):
            raise ValueError("root_method must be 'eigh', 'newton' or 'qr', got "
                             f"{group['root_method']!r}")
        if int(group["precondition_frequency"]) < 1:
            raise ValueError("precondition_frequency must be >= 1, got "
                             f"{group['precondition_frequency']}")
        if int(group["start_preconditioning_step"]) < 1:
            raise ValueError("start_preconditioning_step must be >= 1, got "
                             f"{group['start_preconditioning_step']}")
        p = group["exponent_override"]
        if p is not None and not p > 0:
            raise ValueError(f"exponent_override must be positive, got {p}")
        if group["root_method"] == "newton" and p is not None and int(p) != p:
            raise ValueError("root_method='newton' needs an integer exponent_override")

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

    def _first_moment(self, group: dict, st: dict[str, Tensor], G: Tensor, step: int) -> Tensor:
        b1 = group["betas"][0]
        if b1 == 0:
            return G
        ema_(st["m"], G, b1, self._guard)
        return st["m"] / (1.0 - b1**step) if group["use_bias_correction"] else st["m"]

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        m_hat = self._first_moment(group, st, g, step)
        if group["grafting"] != "none":
            return graft_direction(group["grafting"], m_hat, g, st.get("v"), step,
                                   group["grafting_beta2"], group["grafting_epsilon"], self._guard)
        b2 = group["betas"][1]
        ema_(st["v"], g * g, b2, self._guard)
        v_hat = st["v"] / (1.0 - b2**step) if group["use_bias_correction"] and b2 < 1 else st["v"]
        p = group["exponent_override"] or 2
        return m_hat * (v_hat + group["epsilon"]).pow(-1.0 / p)

    def _block_direction(self, group: dict, st: dict[str, Tensor], G: Tensor,
                         step: int) -> Tensor:
        b2 = group["betas"][1]
        order = G.ndim - 1
        m_hat = self._first_moment(group, st, G, step)
        for i in range(order):
            ema_(st[f"F{i}"], kronecker_statistic(G, i), b2, self._guard)
        start = group["start_preconditioning_step"]
        if is_due(step, start, group["precondition_frequency"]):
            self._refresh(lambda s: self._refresh_roots(group, s, order, step), st,
                          [k for k in st if k[0] in "RQ" or k == "has_basis"],
                          reads=[f"F{i}" for i in range(order)])
        D = None
        if group["grafting"] != "none":
            D = graft_direction(group["grafting"], m_hat, G, st.get("v"), step,
                                group["grafting_beta2"], group["grafting_epsilon"], self._guard)
        if step < start:
            return m_hat if D is None else D
        P = m_hat
        for i in range(order):
            P = mode_product(P, st[f"R{i}"], i)
        return P if D is None else graft(P, D)

    def _refresh_roots(self, group: dict, st: dict[str, Tensor], order: int, step: int) -> None:
        b2 = group["betas"][1]
        scale = 1.0 / (1.0 - b2**step) if group["use_bias_correction"] and b2 < 1 else 1.0
        p = group["exponent_override"] or 2 * order
        eps, cdt = group["epsilon"], self.compute_dtype
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
            self._count_refresh(R.shape[0], failed, "inverse root")

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
            self._count_refresh(R.shape[0], failed, "inverse root")
        st["has_basis"].fill_(1.0)
