r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors.

For a matrix block ``G`` with factors ``L, R`` (EMA of ``G G^T`` and ``G^T G``) and
eigenbases ``Q_L, Q_R`` (refreshed every ``precondition_frequency`` steps):

.. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) G_t \quad\text{(original basis)} \\
    \tilde G_t &= Q_L^T G_t Q_R, \qquad \tilde m_t = Q_L^T m_t Q_R \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2) \tilde G_t^{\odot 2} \quad\text{(rotated basis)} \\
    \theta_t &= (1-\eta\lambda)\theta_{t-1} - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        Q_L \frac{\tilde m_t}{\sqrt{v_t} + \epsilon} Q_R^T

Keeping ``m`` in the original basis and rotating it every step is exactly the momentum
re-rotation ``\tilde m \leftarrow Q_{new}^T Q_{old} \tilde m Q_{old}^T Q_{new}`` whenever the
basis changes. ``v`` is per-coordinate and cannot be rotated exactly: on a QR refresh its
coordinates are permuted with the eigenvalue order (SOAP, Alg. 4). The first refresh uses a
float64 ``eigh``; later ones one power-iteration step + QR (``eigenbasis_method="qr"``) or
``eigh`` again (``"eigh"``). As in the reference implementation, statistics are updated and
bases refreshed *after* the update, so step t rotates with the basis of the gradients of
steps < t: a basis fitted to the current gradient concentrates it in a few coordinates, and
momentum rotated into the others meets a near-zero second moment (measured: divergence at
``precondition_frequency=1``). Order-k blocks rotate every mode. Parameters with one
non-trivial dimension or more than ``diagonal_threshold`` elements run plain Adam.

First step (Alg. 3; the authors' implementation): step ``start_preconditioning_step``
(default 1) only accumulates the factors and computes the first eigenbasis. It moves no
parameter (decoupled weight decay, if any, still applies), and Adam restarts in that
basis: ``m = v = 0`` and the bias corrections count ``t`` from the next step. Steps before
it (if ``start_preconditioning_step > 1``) run plain Adam in the identity basis. Measured on
the char-LM benchmark (3 seeds): 80 steps to AdamW's target instead of 100 with an Adam
step at step 1 and ``v`` carried into the new basis as ``(Q_L o Q_L)^T v (Q_R o Q_R)``:
Adam's first step moves every coordinate by ~lr, and a second moment carried over from the
identity basis is too large on the coordinates the eigenbasis makes small.

Cost: blocks of equal shape are stacked (batched matmuls); in one process, the QR refreshes
due in a step run after all directions, one batched call per factor size across block
shapes. Host reads per step: the base class's gradient check (and, on the CPU only, where
they are free, its finiteness check of each block group's direction), one finiteness check
per batched refresh call, and (only until every block has its first basis) one per refresh.

Reference: Vyas et al. (2024), "SOAP: Improving and stabilizing Shampoo using Adam",
Alg. 3-4.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.matfuncs import (
    eigenbasis_qr_refresh,
    high_precision_matmul,
    symmetric_eigh,
)
from curvlab.optim.adam import (
    AdamConfig,
    adam_moments_,
    adam_normalize,
    adam_stability_preconditioner,
)
from curvlab.optim.base import (
    betas_rule,
    finite_nonnegative,
    finite_positive,
    one_of,
    optional,
    positive_int,
    unit_interval,
)
from curvlab.optim.preconditioners import (
    BlockedPreconditionerOptimizer,
    ema_,
    guarded_batched,
    kronecker_statistic,
    mode_product,
)
from curvlab.optim.stability import StabilityModel, ema_samples, momentum_threshold

__all__ = ["SOAP"]


class SOAP(BlockedPreconditionerOptimizer):
    """SOAP (torch.optim API). See the module docstring for the update.

    Args:
        params: parameters or param groups.
        lr: learning rate. betas: Adam's ``(beta1, beta2)``.
        shampoo_beta: EMA decay of the Kronecker factors (default: ``betas[1]``).
        eps: Adam's epsilon. weight_decay: decoupled weight decay.
        precondition_frequency: steps between eigenbasis refreshes.
        start_preconditioning_step: the initialization step (default 1, the paper's first
            step): it computes the first eigenbasis and takes no update; Adam restarts there.
        max_preconditioner_dim, merge_dims, diagonal_threshold: blocking (see
            :func:`curvlab.optim.preconditioners.plan_blocks`).
        eigenbasis_method: "qr" (default; power iteration + QR after the first eigh) or "eigh".
        max_state_ratio: a parameter whose Kronecker factors would exceed this multiple of
            its size and 2^20 elements runs plain Adam (default 8; None: no limit, a
            warning states the cost).
        nonfinite: "skip" or "raise" for non-finite gradients; a failed refresh keeps the
            previous basis (counted in :meth:`stats`).
        factor_dtype, compute_dtype: dtype of state / of the eigendecompositions.
        process_group, distributed_mode: under DDP, share the eigenbasis refreshes over the
            ranks of this group; see :mod:`curvlab.optim.distributors.blocks`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 1,
        max_preconditioner_dim: int = 1024,
        merge_dims: bool = True,
        diagonal_threshold: int | None = None,
        eigenbasis_method: str = "qr",
        max_state_ratio: float | None = 8.0,
        nonfinite: str = "skip",
        factor_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = torch.float64,
        process_group: Any = None,
        distributed_mode: str = "broadcast",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps,
            weight_decay=weight_decay, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim, merge_dims=merge_dims,
            diagonal_threshold=diagonal_threshold, eigenbasis_method=eigenbasis_method,
            max_state_ratio=max_state_ratio,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, factor_dtype=factor_dtype,
                         compute_dtype=compute_dtype, process_group=process_group,
                         distributed_mode=distributed_mode)
        self._ident_cache: dict[tuple, Tensor] = {}
        # id(has_basis) -> weak reference, for state whose blocks all have a basis
        self._complete: dict[int, weakref.ref] = {}
        self._pending: list[dict[str, Tensor]] = []  # due QR refreshes of the current step
        self._batch_plans: dict[tuple, list] = {}  # states' ids -> buckets by factor size

    hyperparameters = {**BlockedPreconditionerOptimizer.hyperparameters,
                       "betas": betas_rule, "shampoo_beta": optional(unit_interval),
                       "eps": finite_positive, "eigenbasis_method": one_of("qr", "eigh"),
                       "weight_decay": finite_nonnegative,
                       "precondition_frequency": positive_int}

    @staticmethod
    def _adam(group: dict[str, Any]) -> AdamConfig:
        return AdamConfig(group["betas"], group["eps"])

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        st = {
            "m": torch.zeros(n, *shape, dtype=dtype, device=device),
            "v": torch.zeros(n, *shape, dtype=dtype, device=device),
            # 0 until the first eigendecomposition, then 1 (per block, kept in the checkpoint)
            "has_basis": torch.zeros(n, dtype=dtype, device=device),
        }
        for i, d in enumerate(shape):
            st[f"F{i}"] = torch.zeros(n, d, d, dtype=dtype, device=device)
            st[f"Q{i}"] = torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()
        return st

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        return {"m": torch.zeros(n, dtype=dtype, device=device),
                "v": torch.zeros(n, dtype=dtype, device=device)}

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        t = _adam_step(group, step)
        if t == 0:  # the initialization step: no update, Adam restarts
            st["m"].zero_()
            st["v"].zero_()
            return torch.zeros_like(g)
        config = self._adam(group)
        adam_moments_(st["m"], st["v"], g, config)
        return adam_normalize(st["m"], st["v"], t, config)

    #: step t's direction uses the eigenbasis of steps < t (Vyas et al. 2024, Algorithm 1)
    refresh_after_precondition = True

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        """Per mode ``i`` the factor ``F_i <- sb F_i + (1 - sb) G_(i) G_(i)^T``
        (``sb = shampoo_beta``, default ``betas[1]``; 1: the running sum)."""
        order = G.ndim - 1
        sb = group["shampoo_beta"]
        sb = group["betas"][1] if sb is None else sb
        for i in range(order):
            F = st[f"F{i}"]
            if sb == 1.0:
                ema_(F, kronecker_statistic(G, i), sb, False)
            elif order == 2:  # in one kernel
                A, B = (G, G.mT) if i == 0 else (G.mT, G)
                F.baddbmm_(A, B, beta=sb, alpha=1.0 - sb)
            else:
                F.lerp_(kronecker_statistic(G, i), 1.0 - sb)

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        """Adam in the eigenbasis ``Q`` of the factors: the moments are updated with the
        rotated gradient, the normalized direction is rotated back. The initialization
        step (``t == 0``) moves nothing."""
        t = _adam_step(group, step)
        if t == 0:  # the initialization step: statistics + first eigenbasis, no update
            return torch.zeros_like(G)
        # Blocks without a basis yet hold Q = I, and rotating by I is exact: no host sync
        # on has_basis, and one code path for every block.
        Qs = [st[f"Q{i}"] for i in range(G.ndim - 1)]
        config = self._adam(group)
        st["m"].lerp_(G, 1.0 - group["betas"][0])  # in the original basis: rotating it is exact
        adam_moments_(None, st["v"], _rotate(G, Qs), config)
        N = adam_normalize(_rotate(st["m"], Qs), st["v"], t, config, inplace=True)
        return _rotate(N, Qs, back=True)

    def _refresh_blocks(self, group: dict, st: dict[str, Tensor], step: int) -> None:
        """New eigenbases ``Q_i`` of the factors (eigh, or one warm-started QR step), the
        second moment carried into the new basis; after the initialization step Adam
        restarts in the first basis."""
        order = sum(1 for k in st if k[0] == "F")
        t = _adam_step(group, step)
        if self.process_group is None:
            # one process: the QR refreshes of all block shapes run batched after the step
            if (t > 0 and group["eigenbasis_method"] == "qr" and self._basis_complete(st)
                    and any(st is g.state for g in self._groups or ())):
                self._pending.append(st)
            else:
                self._refresh_basis(group, st, order)
        else:
            self._refresh(lambda s: self._refresh_basis(group, s, order), st,
                          [k for k in st if k[0] == "Q" or k == "has_basis"]
                          + self._coordinate_keys(st),
                          reads=[f"F{i}" for i in range(order)])
        if t == 0:  # Adam restarts in the new basis
            for k in ("m", "v"):
                if k in st:
                    st[k].zero_()

    def _coordinate_keys(self, st: dict[str, Tensor]) -> list[str]:
        """The per-coordinate statistics of the eigenbasis, which follow its columns when a
        QR refresh reorders them: Adam's second moment ``v``."""
        return ["v"]

    def _follow_basis(self, st: dict[str, Tensor], orders: list[Tensor]) -> None:
        """Move the per-coordinate statistics to their coordinates' new positions
        (``orders[i]``: the new column order of mode ``i``, per block)."""
        st["v"].copy_(_permute_modes(st["v"], orders))

    def _identity_order(self, n: int, d: int, device: torch.device) -> Tensor:
        """``arange(d)`` per block: the fallback order of a block whose refresh failed."""
        key = (n, d, device)
        ident = self._ident_cache.get(key)
        if ident is None:
            ident = self._ident_cache[key] = torch.arange(d, device=device).expand(n, d)
        return ident

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step (see the class docstring); with one process the QR refreshes that are due
        run after all directions, one batched refresh per factor size across block shapes."""
        self._pending: list[dict[str, Tensor]] = []
        loss = super().step(closure)
        if self._pending:
            self._refresh_qr_batched(self._pending)
            self._pending = []
        return loss

    def _basis_complete(self, st: dict[str, Tensor]) -> bool:
        """Whether every block of ``st`` has its first basis (a host read only until known)."""
        hb = st["has_basis"]
        known = self._complete.get(id(hb))
        if known is not None and known() is hb:
            return True
        if int(hb.sum()) < hb.shape[0]:
            return False
        self._complete[id(hb)] = weakref.ref(hb)
        return True

    def _refresh_qr_batched(self, states: list[dict[str, Tensor]]) -> None:
        """QR refreshes of several block groups' states (all with a basis already): the
        factors of equal size (dtype, device) go through one batched call."""
        key = tuple(id(st) for st in states)
        plan = self._batch_plans.get(key)
        if plan is None:  # buckets of (state, F key, Q key, mode, first row, rows)
            buckets: dict[tuple, list] = {}
            for st in states:
                for i in range(_order(st)):
                    Q = st[f"Q{i}"]
                    buckets.setdefault((Q.shape[-1], Q.dtype, Q.device), []).append(
                        (st, f"F{i}", f"Q{i}", i, Q.shape[0]))
            plan = self._batch_plans[key] = []
            for (d, _, device), items in buckets.items():
                rows, a = [], 0
                for st, fk, qk, i, n in items:
                    rows.append((st, fk, qk, i, a, a + n))
                    a += n
                plan.append((self._identity_order(a, d, device), rows))
        orders: dict[int, list] = {id(st): [None] * _order(st) for st in states}

        def fn_qr(F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
            return eigenbasis_qr_refresh(F, Q, compute_dtype=F.dtype)

        with high_precision_matmul():
            for ident, rows in plan:
                if len(rows) == 1:
                    st, fk, qk = rows[0][:3]
                    F, Q = st[fk], st[qk]
                else:
                    F = torch.cat([r[0][r[1]] for r in rows])
                    Q = torch.cat([r[0][r[2]] for r in rows])
                (Qn, perm), failed = guarded_batched(fn_qr, (F, Q), (Q, ident))
                for st, _, qk, i, a, e in rows:
                    st[qk].copy_(Qn[a:e])  # keeps the state's layout
                    orders[id(st)][i] = perm[a:e]
                self._counters["refreshes"] += len(rows) - 1  # one per block shape and mode
                self._count_refresh(ident.shape[0], failed, "eigenbasis", (ident.shape[-1],))
        for st in states:  # v follows its coordinates along every mode
            self._follow_basis(st, orders[id(st)])

    def _refresh_basis(self, group: dict, st: dict[str, Tensor], order: int) -> None:
        cdt = self.compute_dtype
        hb = st["has_basis"]
        n = hb.shape[0]
        complete = self._basis_complete(st)
        use_eigh = group["eigenbasis_method"] == "eigh" or not complete

        def fn_eigh(F: Tensor) -> tuple[Tensor]:
            _, Q = symmetric_eigh(F, cdt)
            return (Q.flip(-1).to(F.dtype),)  # descending eigenvalues

        def fn_qr(F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
            return eigenbasis_qr_refresh(F, Q, compute_dtype=F.dtype)

        orders = []
        with high_precision_matmul():
            for i in range(order):
                F, Q = st[f"F{i}"], st[f"Q{i}"]
                if use_eigh:
                    (Qn,), failed = guarded_batched(fn_eigh, (F,), (Q,))
                else:
                    ident = self._identity_order(n, Q.shape[-1], Q.device)
                    (Qn, perm), failed = guarded_batched(fn_qr, (F, Q), (Q, ident))
                    orders.append(perm)
                # copied into the existing (contiguous) state tensor: replacing it with the
                # column-major LAPACK output broke DCP checkpoints (layout-blind templates)
                Q.copy_(Qn)
                self._count_refresh(n, failed, "eigenbasis", tuple(Q.shape[1:]))
        if orders:  # v follows its coordinates to their new positions along every mode
            self._follow_basis(st, orders)
        if not complete:
            hb.fill_(1.0)
        self._complete[id(hb)] = weakref.ref(hb)

    def _after_load(self) -> None:  # the stacks are new: forget their ids
        self._complete.clear()
        self._batch_plans.clear()

    def _rebuild(self) -> None:
        super()._rebuild()
        self._after_load()

    def stability_model(self) -> StabilityModel:
        """Adam's rule in the eigenbasis: ``P = Q (sqrt(v_hat) + eps) Q^T`` per block, so
        ``P^{-1/2} x = Q ((Q^T x Q) / sqrt(sqrt(v_hat) + eps)) Q^T`` (the basis and ``v`` of
        the current state; diagonal parameters: Adam's diagonal). Threshold
        ``2 (1 + b1) / (1 - b1)``."""
        group = self.param_groups[0]
        return StabilityModel("soap", float(group["lr"]),
                              momentum_threshold(group["betas"][0], ema=True),
                              self._inv_sqrt_preconditioner,
                              "Adam in the eigenbasis of the Kronecker factors",
                              self._preconditioner_samples)

    def _preconditioner_samples(self) -> float:
        """Gradients the eigenbasis second moment averages since Adam (re)started (fewest
        over the groups; :func:`~curvlab.optim.stability.ema_samples`)."""
        return min((ema_samples(g["betas"][1], _adam_step(g, t))
                    for g, t in zip(self.param_groups, self._steps)), default=math.inf)

    def _inv_sqrt_preconditioner(self, p: Tensor, x: Tensor) -> Tensor:
        gi, plan = self._param_plan(p)
        group = self.param_groups[gi]
        t = _adam_step(group, self._steps[gi])
        st = self.state.get(p, {})
        if t <= 0 or not st:
            return x
        if plan.diagonal:
            P = adam_stability_preconditioner(st["v"], t, self._adam(group))
            return x * P.rsqrt().to(x.dtype)
        out = torch.zeros_like(x)
        for j, (shape, slices) in enumerate(plan.blocks):
            sfx = "" if len(plan.blocks) == 1 else f".{j}"
            if "Q0" + sfx not in st:  # held by another rank ("allgather")
                continue
            Qs = [st[f"Q{i}{sfx}"].unsqueeze(0) for i in range(len(shape))]
            P = self._rotated_preconditioner(group, st, sfx, t).unsqueeze(0)
            X = x.reshape(plan.merged_shape)[slices].unsqueeze(0).to(P.dtype)
            R = _rotate(X, Qs) * P.rsqrt()
            out.view(plan.merged_shape)[slices] = _rotate(R, Qs, back=True)[0].to(x.dtype)
        return out

    def _rotated_preconditioner(self, group: dict, st: dict[str, Tensor], sfx: str,
                                t: int) -> Tensor:
        """A block's ``P`` in its eigenbasis (block-shaped): Adam's ``sqrt(v_hat) + eps``
        with the first moment's bias correction folded in (``st[key + sfx]``: the block's
        state)."""
        return adam_stability_preconditioner(st["v" + sfx], t, self._adam(group))


def _adam_step(group: dict, step: int) -> int:
    """Adam's step count for the bias corrections: ``step`` before the initialization step
    ``start_preconditioning_step``, 0 at it, then counted from it."""
    start = group["start_preconditioning_step"]
    return step if step < start else step - start


def _order(st: dict[str, Tensor]) -> int:
    """The order of the blocks of a stacked state (one eigenbasis ``Q{i}`` per mode)."""
    return sum(1 for k in st if k[0] == "Q")


def _rotate(X: Tensor, Qs: list[Tensor], back: bool = False, scale: float = 1.0) -> Tensor:
    """``X x_0 Q_0^T x_1 Q_1^T ...`` (into the eigenbasis) or, with ``back``, ``X x_i Q_i``
    (out of it), times ``scale``; matrices take two batched matmuls."""
    if X.ndim == 3:
        QL, QR = Qs
        if back:
            return torch.baddbmm(X, torch.bmm(QL, X), QR.mT, beta=0.0, alpha=scale)
        return torch.bmm(torch.bmm(QL.mT, X), QR)
    for i, Q in enumerate(Qs):
        X = mode_product(X, Q, i, transpose=not back)
    return X * scale if scale != 1.0 else X


def _permute_modes(X: Tensor, orders: list[Tensor]) -> Tensor:
    """``X[b, orders[0][b, i], orders[1][b, j], ...]`` for a batch of blocks ``X`` (B, *s),
    as one row gather (``index_select``) per mode."""
    n = X.shape[0]
    for i, order in enumerate(orders):
        if n == 1:
            X = X.index_select(1 + i, order[0])
            continue
        d = order.shape[-1]
        rows = order + d * torch.arange(n, device=order.device).unsqueeze(-1)
        Xi = X.movedim(1 + i, 1)
        shape = Xi.shape
        X = Xi.reshape(n * d, -1).index_select(0, rows.reshape(-1)).view(shape).movedim(1, 1 + i)
    return X
