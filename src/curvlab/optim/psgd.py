r"""PSGD-Kron: preconditioned SGD with a Kronecker-product preconditioner fitted on a Lie group.

For a block ``G`` of order k the preconditioner is ``P = Q^T Q`` with
``Q = Q_1 \otimes \cdots \otimes Q_k`` (``P G = G \times_1 Q_1^T Q_1 \cdots \times_k Q_k^T
Q_k``); a factor is a dense ``d_i x d_i`` matrix, or diagonal when ``d_i > max_dense_dim``
or ``d_i^2 > max_skew \cdot numel(G)`` (the author's ``preconditioner_max_size`` /
``preconditioner_max_skew``). ``Q`` is fitted so that ``P`` minimizes the PSGD criterion

.. math::
    c(P) = E[h^T P h + v^T P^{-1} v],

whose minimizer is ``P = H^{-1}`` for Hessian-vector pairs ``(v, h = H v)``, ``v ~ N(0, I)``
(``fit="hvp"``, the author's *KronNewton*), and ``P = E[g g^T]^{-1/2}`` for
``(v, g)`` with ``v`` independent of the gradient or momentum ``g``
(``fit="whitening"``, *KronWhiten*; ``v`` can be integrated out). One fit step per
factor, with ``A = Q h``, ``B = Q^{-T} v`` (``geometry="EQ"``, ``dQ = E Q``: the Lie group
of upper-triangular matrices, Li 2015/2018) or ``P h`` (``"Q0.5EQ1.5"``,
``dQ = Q^{0.5} E Q^{1.5}``: Li 2024, the author's current default):

.. math::
    T_1 &= A_{(i)} A_{(i)}^T, \quad T_2 = B_{(i)} B_{(i)}^T \quad
        (\text{Q0.5EQ1.5: } T_1 = (Ph)_{(i)} (Ph)_{(i)}^T,\
        T_2 = v_{(i)} v_{(i)}^T, \text{ whitening: } T_2 = \tfrac{numel}{d_i} I) \\
    \ell &\le \|T_1 + T_2\|_2 \ \ (\text{whitening Q0.5EQ1.5: } \|T_1\|_2 + numel/d_i),
        \qquad L_i \leftarrow \max(\beta_L L_i + (1 - \beta_L)\ell,\ \ell) \\
    Q_i &\leftarrow Q_i - \tfrac{\mu}{L_i}\, \mathrm{triu}(T_1 - T_2)\, Q_i
        \quad(\text{EQ}), \qquad
    Q_i \leftarrow Q_i - \tfrac{\mu}{L_i} (T_1 - T_2) Q_i,\ \text{then one Procrustes
        rotation toward SPD}\quad(\text{Q0.5EQ1.5})

(a diagonal factor ``q``: the same with ``T`` the diagonals, ``\ell = \max(T_1 + T_2)``).
``\ell`` is a lower bound of the spectral norm by ``norm_iterations`` power iterations
started at the largest row (deterministic; the author uses a random 32-vector subspace),
so ``\mu / L_i`` is the step normalized by the Lipschitz constant of the criterion on the
group, ``0 < \mu \le 1``. ``h`` is damped: ``h + (damping + \epsilon_{mach} |h|) n``,
``n ~ N(0, I)``, which bounds ``P \preceq I / damping``. The factors are rebalanced to a
common max-abs before each fit (``P`` unchanged; the author does it with probability
0.01). A fit runs at the group's first step and then, at steps due by
``precondition_frequency``, with probability ``precond_update_prob`` (the author's
Bernoulli draw, from a private generator saved in checkpoints).

The step, with ``m`` the gradient EMA ``m \leftarrow \beta m + (1 - \beta) g``,
``\beta = \min(\tfrac{t-1}{t}, momentum)`` (the author's schedule; ``momentum = 0``:
``m = g``):

.. math::
    d = \mathrm{clip}(P m), \qquad \theta \leftarrow (1 - \eta\lambda)\theta - \eta d,

``clip`` (whitening default ``update_clip=(2, 10)``, the author's ``grad_clip_max_amps``)
scales a block's ``d`` to RMS <= 2, then clamps entries to ``+-10``.

``fit="whitening"`` (default, the author's torch.optim wrapper ``KWNS4`` and heavyball's
PSGDKron): ``whiten="momentum"`` (default there) fits ``P`` to ``m``, ``"gradient"`` to ``g``;
a plain ``loss.backward(); step()`` loop. ``fit="hvp"``: ``step(closure)`` where the
closure returns the loss *without calling backward*; on fit steps the optimizer
differentiates it with ``create_graph=True`` and forms ``H v`` by double backward (the
author's ``KronNewton`` with ``exact_hessian_vector_product=True``), otherwise a plain
gradient. Parameters that go to the blocked base's diagonal method (vectors, scalars,
parameters above ``diagonal_threshold`` / ``max_state_ratio``) get a diagonal ``Q``, one
``L`` per parameter.

References: Li (2015), "Preconditioned stochastic gradient descent", arXiv:1512.04202
(criterion, Kronecker preconditioners); Li (2018), "Preconditioner on matrix Lie group for
SGD", arXiv:1809.10232 (Lie groups, whitening); Li (2024), "Stochastic Hessian fittings with
Lie groups", arXiv:2402.11858 (normalized step, Q0.5EQ1.5); code: github lixilinx/psgd_torch
``psgd.py`` (``update_precond_kron_eq``, ``update_precond_kron_{whiten,newton}_q0p5eq1p5``,
``procrustes_step2``, ``KronWhiten``, ``KronNewton``) and
``wrapped_as_torch_optimizer_for_ddp.py`` (``KWNS4``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.autodiff import attention_kernels, check_double_backward
from curvlab.optim.base import (
    finite_nonnegative,
    finite_positive,
    one_of,
    optional,
    positive_int,
    unit_interval,
)
from curvlab.optim.preconditioners import BlockedPreconditionerOptimizer, kronecker_statistic
from curvlab.optim.preconditioners import mode_product as _mode_product
from curvlab.optim.preconditioners.block_math import is_due
from curvlab.optim.stability import StabilityModel, momentum_threshold

__all__ = ["PSGDKron"]

FITS = ("whitening", "hvp")
GEOMETRIES = ("Q0.5EQ1.5", "EQ")
#: the author's defaults: KWNS4 (momentum whitening), KronWhiten, KronNewton
_DEFAULT_LR = {("whitening", "momentum"): 2e-4, ("whitening", "gradient"): 1e-3,
               ("hvp", "momentum"): 1e-2, ("hvp", "gradient"): 1e-2}


# ----------------------------------------------------------------------------- factor math
_TINY = {dt: torch.finfo(dt).smallest_normal for dt in (torch.float16, torch.bfloat16,
                                                          torch.float32, torch.float64)}


def _tiny(x: Tensor) -> float:
    return _TINY[x.dtype]


def spectral_norm_lower_bound(M: Tensor, iterations: int) -> Tensor:
    """Per batch entry a lower bound of ``||M||_2`` (``M``: (n, d, d)): power iteration on
    ``M^T M`` from ``M``'s largest row, ``iterations`` times; exact in the limit. Scaled by
    the max-abs entry first (no overflow)."""
    s = M.abs().amax(dim=(-2, -1)) + _tiny(M)
    A = M / s[:, None, None]
    j = torch.linalg.vector_norm(A, dim=-1).argmax(-1)
    x = A[torch.arange(A.shape[0], device=A.device), j]
    for _ in range(iterations):
        x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + _tiny(x))
        x = (A.mT @ (A @ x.unsqueeze(-1))).squeeze(-1)
    x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + _tiny(x))
    return torch.linalg.vector_norm(A @ x.unsqueeze(-1), dim=(-2, -1)) * s


def procrustes_step_(Q: Tensor, iterations: int, max_step: float = 0.125) -> None:
    """One rotation ``Q <- exp(a R) Q`` (second order) with ``R = Q^T - Q`` normalized, ``a``
    from a line search capped at ``max_step``: moves each ``Q`` (n, d, d) toward SPD without
    changing ``Q^T Q`` beyond the truncation error ``||a R||^4 / 4`` (the author's
    ``procrustes_step2``)."""
    R = Q.mT - Q
    R = R / (spectral_norm_lower_bound(R, iterations) + _tiny(R))[:, None, None]
    RQ = R @ Q
    RRQ = R @ RQ
    tr1 = RQ.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr2 = RRQ.diagonal(dim1=-2, dim2=-1).sum(-1)
    a = torch.where(tr2 < 0, (-tr1 / tr2).clamp(max=max_step),
                    torch.full_like(tr1, max_step))[:, None, None]
    Q.add_(a * (RQ + 0.5 * a * RRQ))


def _along(q: Tensor, i: int, order: int) -> Tensor:
    """A diagonal factor ``q`` (n, d) shaped to broadcast along mode ``i`` of (n, *shape)."""
    return q.view(q.shape[0], *[q.shape[1] if j == i else 1 for j in range(order)])


def apply_factors(X: Tensor, Qs: list[Tensor], transpose: bool = False) -> Tensor:
    """``X x_1 Q_1 ... x_k Q_k`` (``Q_i^T`` with ``transpose``) for stacked blocks ``X``."""
    for i, q in enumerate(Qs):
        X = X * _along(q, i, len(Qs)) if q.ndim == 2 else _mode_product(X, q, i, transpose)
    return X


def precondition(X: Tensor, Qs: list[Tensor]) -> Tensor:
    """``P X`` with ``P = Q^T Q``."""
    return apply_factors(apply_factors(X, Qs), Qs, transpose=True)


def _solve_transposed(X: Tensor, Qs: list[Tensor]) -> Tensor:
    """``X x_1 Q_1^{-T} ... x_k Q_k^{-T}`` (upper-triangular dense factors)."""
    n, order = X.shape[0], len(Qs)
    for i, q in enumerate(Qs):
        if q.ndim == 2:
            X = X / _along(q, i, order)
            continue
        Xi = X.movedim(1 + i, 1)
        moved = Xi.shape
        Y = torch.linalg.solve_triangular(q.mT, Xi.reshape(n, moved[1], -1), upper=False)
        X = Y.reshape(moved).movedim(1, 1 + i)
    return X


def _statistic(X: Tensor, i: int, dense: bool) -> Tensor:
    """``X_(i) X_(i)^T`` (dense) or its diagonal."""
    if dense:
        return kronecker_statistic(X, i)
    return (X * X).sum(dim=[d for d in range(1, X.ndim) if d != 1 + i])


def balance_(Qs: list[Tensor]) -> None:
    """Rescale the factors of each block to the geometric mean of their max-abs entries
    (``P`` unchanged; keeps their dynamic ranges apart from over/underflow)."""
    if len(Qs) < 2:
        return
    logs = [q.abs().flatten(1).amax(1).clamp_min(_tiny(q)).log() for q in Qs]
    mean = sum(logs) / len(logs)
    for q, lg in zip(Qs, logs, strict=True):
        q.mul_((mean - lg).exp().view(-1, *([1] * (q.ndim - 1))))


def fit_kron_(Qs: list[Tensor], Ls: list[Tensor], h: Tensor, v: Tensor | None, *,
              geometry: str, whitening: bool, lr: float, beta_l: float, damping: float,
              iterations: int, noise: Tensor | None = None) -> None:
    """One PSGD fit of the factors ``Qs`` (and Lipschitz estimates ``Ls``, (n,) each) of
    stacked blocks to the pairs ``(v, h)`` (``v = None``: whitening, drawn or integrated
    out). ``noise``: the fit's one standard normal draw, shaped like ``h`` (None: drawn from
    the global generator). See the module docstring for the update."""
    n = h.shape[0]
    numel = math.prod(h.shape[1:])
    if noise is None:
        noise = torch.randn(h.shape, dtype=h.dtype, device=h.device)
    damp = damping + torch.finfo(h.dtype).eps * h.abs()
    if geometry == "EQ":
        if v is None:  # whitening: an auxiliary v, damped with itself (the author's)
            v = noise
            h = h + damp * v
        else:
            h = h + damp * noise
        A, B = apply_factors(h, Qs), _solve_transposed(v, Qs)
        T = [(_statistic(A, i, q.ndim == 3), _statistic(B, i, q.ndim == 3))
             for i, q in enumerate(Qs)]
    else:
        Ph = precondition(h + damp * noise, Qs)
        T = [(_statistic(Ph, i, q.ndim == 3),
              numel / q.shape[1] if v is None else _statistic(v, i, q.ndim == 3))
             for i, q in enumerate(Qs)]
    for (T1, T2), q, L in zip(T, Qs, Ls, strict=True):
        dense = q.ndim == 3
        if isinstance(T2, float):  # whitening Q0.5EQ1.5: T2 = numel/d * I
            ell = (spectral_norm_lower_bound(T1, iterations) if dense
                   else T1.amax(-1)) + T2
        else:
            S = T1 + T2
            ell = spectral_norm_lower_bound(S, iterations) if dense else S.amax(-1)
        L.copy_(torch.maximum(beta_l * L + (1 - beta_l) * ell, ell))
        step = (lr / L).view(n, *([1] * (q.ndim - 1)))
        if not dense:  # the author's forms (EQ: less round-off than the product)
            if geometry == "EQ":
                q.sub_(step * (T1 - T2) * q)
            else:
                q.mul_(1 - step * (T1 - T2))
            continue
        if isinstance(T2, float):
            E = T1 - T2 * torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        else:
            E = T1 - T2
        if geometry == "EQ":  # triu as a mask (torch.triu measured 20 ms on 5x5 here)
            r = torch.arange(E.shape[-1], device=E.device)
            E = torch.where(r[:, None] <= r[None, :], E, 0.0)
        q.sub_(step * (E @ q))
        if geometry != "EQ":
            procrustes_step_(q, iterations)


def init_scale(h: Tensor, v: Tensor | None, damping: float) -> Tensor:
    """Per block the author's on-the-fly initial scale of ``Q`` (so that ``P = s^2 I``):
    ``(mean h^4 + damping^4)^{-1/8}``, times ``(mean v^2)^{1/4}`` for HVP pairs."""
    flat = h.flatten(1)
    s = (flat.pow(4).mean(1) + damping ** 4).pow(-0.125)
    if v is not None:
        s = s * v.flatten(1).pow(2).mean(1).pow(0.25)
    return s


# ------------------------------------- the step's tensor functions (the blocks' compiled too)
def _fit_settings(group: dict) -> dict[str, Any]:
    """A group's fit hyperparameters, as the pure fits take them."""
    return {"geometry": group["geometry"], "whitening": group["fit"] == "whitening",
            "lr": group["lr_preconditioner"], "beta_l": group["lipschitz_beta"],
            "damping": group["damping"], "iterations": group["norm_iterations"],
            "init_on_the_fly": group["precond_init_scale"] is None}


def _keep_finite_(olds: list[Tensor], news: list[Tensor], ok: Tensor) -> None:
    """``old <- new`` where ``ok`` (per leading-dim row), else ``old`` kept."""
    for old, new in zip(olds, news, strict=True):
        old.copy_(torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, old))


def _fit_rows_pure(Qs: list[Tensor], Ls: list[Tensor], h: Tensor, v: Tensor | None,
                   noise: Tensor, *, init_on_the_fly: bool, **fit: Any) -> Tensor:
    """One fit of stacked blocks' factors in place (rows whose fit is non-finite keep
    theirs; ``init_on_the_fly``: rows never fitted, ``L == 0``, first get the author's
    initial scale): returns the per-row success mask."""
    order = len(Qs)
    if init_on_the_fly:
        scale = init_scale(h, v, fit["damping"]).pow(1.0 / order)
        fresh = Ls[0] == 0
        for q in Qs:
            q.copy_(torch.where(fresh.view(-1, *([1] * (q.ndim - 1))),
                                q * scale.view(-1, *([1] * (q.ndim - 1))), q))
    new_Q = [q.clone() for q in Qs]
    new_L = [L.clone() for L in Ls]
    balance_(new_Q)
    fit_kron_(new_Q, new_L, h, v, noise=noise, **fit)
    ok = torch.stack([torch.isfinite(q).flatten(1).all(1) for q in new_Q]).all(0)
    _keep_finite_(Qs + Ls, new_Q + new_L, ok)
    return ok


def _clip(D: Tensor, clip: tuple[float, float] | None, seg: Tensor | None = None,
          counts: Tensor | None = None) -> Tensor:
    """Per block (or per segment ``seg`` of a flat ``D``, sizes ``counts``): scale to
    RMS <= ``clip[0]``, then clamp entries to ``+-clip[1]``."""
    if clip is None:
        return D
    max_rms, max_abs = clip
    if seg is None:
        rms = D.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (D.ndim - 1)))
    else:
        sq = torch.zeros(len(counts), dtype=D.dtype, device=D.device)
        rms = (sq.index_add_(0, seg, D * D) / counts.to(D.dtype)).sqrt()[seg]
    D = D * (max_rms / rms.clamp_min(max_rms))
    return D.clamp(-max_abs, max_abs)


def _block_direction_pure(m: Tensor, Qs: list[Tensor], clip: tuple[float, float] | None
                          ) -> Tensor:
    """``clip(P m)`` of stacked blocks."""
    return _clip(precondition(m, Qs), clip)


def _diagonal_direction_pure(q: Tensor, m: Tensor, clip: tuple[float, float] | None,
                             seg: Tensor, counts: Tensor) -> Tensor:
    """``clip(q^2 m)`` per parameter (segment) of the flat diagonal members."""
    return _clip(q * q * m, clip, seg, counts)


def _fit_diagonal_pure(q: Tensor, L: Tensor, h: Tensor, v: Tensor | None, noise: Tensor,
                       seg: Tensor, counts: Tensor, *, geometry: str, lr: float, beta_l: float,
                       damping: float, init_on_the_fly: bool) -> Tensor:
    """The fit of diagonal factors ``q`` (flat, one ``L`` per element, its segment's max)
    in place; elements whose fit is non-finite keep theirs. Returns the success mask."""
    n = len(counts)

    def segment_max(x: Tensor) -> Tensor:
        return torch.zeros(n, dtype=x.dtype, device=x.device).scatter_reduce_(
            0, seg, x, "amax", include_self=False)[seg]

    def segment_mean(x: Tensor) -> Tensor:
        sums = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, seg, x)
        return (sums / counts.to(x.dtype))[seg]

    if init_on_the_fly:
        scale = (segment_mean(h.pow(4)) + damping ** 4).pow(-0.125)
        if v is not None:
            scale = scale * segment_mean(v * v).pow(0.25)
        q.copy_(torch.where(L == 0, q * scale, q))
    damp = damping + torch.finfo(h.dtype).eps * h.abs()
    if geometry == "EQ":
        if v is None:
            v = noise
            hd = h + damp * v
        else:
            hd = h + damp * noise
        T1, T2 = (q * hd) ** 2, (v / q) ** 2
        ell = segment_max(T1 + T2)
    else:
        T1 = (q * q * (h + damp * noise)) ** 2
        T2 = 1.0 if v is None else v * v
        ell = segment_max(T1) + 1.0 if v is None else segment_max(T1 + T2)
    newL = torch.maximum(beta_l * L + (1 - beta_l) * ell, ell)
    newq = q * (1 - lr / newL * (T1 - T2))
    ok = torch.isfinite(newq)
    q.copy_(torch.where(ok, newq, q))
    L.copy_(torch.where(ok, newL, L))
    return ok


class PSGDKron(BlockedPreconditionerOptimizer):
    """PSGD with Kronecker-product preconditioners (torch.optim API; see the module
    docstring for the math).

    Args:
        params: parameters or param groups.
        lr: learning rate ``eta`` (default: the author's, 2e-4 for momentum whitening, 1e-3
            for gradient whitening, 1e-2 for ``fit="hvp"``).
        momentum: EMA factor of the gradient (the author's "momentum"), in ``[0, 1)``.
        weight_decay: decoupled weight decay.
        fit: "whitening" (default) or "hvp" (needs ``step(closure)``, one process).
        whiten: what the whitening fit whitens: "momentum" (default; needs momentum > 0)
            or "gradient".
        geometry: "Q0.5EQ1.5" (default, the author's recommendation; dense factors kept
            near SPD) or "EQ" (upper-triangular factors, the original Lie group; heavyball's
            PSGDKron).
        lr_preconditioner: the normalized fit step ``mu`` in ``(0, 1]`` (default 0.1).
        precond_update_prob: probability of a fit at a due step, in ``(0, 1]``; anneal it
            by setting ``group["precond_update_prob"]`` as the author recommends.
        precondition_frequency: fits are considered every this many steps (default 1).
        lipschitz_beta: EMA factor ``beta_L`` of the Lipschitz estimate (default 0.9).
        damping: ``>= 0``, bounds ``P <= I / damping`` (default 1e-9).
        precond_init_scale: ``Q_0 = s I`` (``P_0 = s^2 I``); None (default): per block from its
            first fitted pair (the author's on-the-fly rule).
        max_skew, max_dense_dim: a block dimension ``d`` gets a diagonal factor when
            ``d^2 > max_skew * numel(block)`` or ``d > max_dense_dim`` (defaults 1.0, None).
        update_clip: ``(max_rms, max_abs)`` per block of the direction, or None; default
            ``(2.0, 10.0)`` for whitening, None for "hvp" (the author's).
        norm_iterations: power iterations of the spectral-norm lower bound (default 2).
        seed: seed of the private generators (fit draws and random vectors).
        max_preconditioner_dim, merge_dims, diagonal_threshold, max_state_ratio: blocking
            (see :func:`curvlab.optim.preconditioners.plan_blocks`).
        nonfinite, factor_dtype, process_group, distributed_mode: as for Shampoo. The fit
            runs in ``factor_dtype`` (float32, or float64 for float64 parameters).
    """

    #: compiled step: the blocks' pure parts (fit, direction) compiled, each once per block
    #: shape; the fit decision, its noise (private generator), the failure count and the
    #: diagonal parts stay eager
    compilable = True
    compile_diagonal_direction = False

    hyperparameters = {**BlockedPreconditionerOptimizer.hyperparameters,
                       "momentum": unit_interval, "fit": one_of(*FITS),
                       "whiten": one_of("momentum", "gradient"),
                       "geometry": one_of(*GEOMETRIES),
                       "lr_preconditioner": lambda x: None if isinstance(x, (int, float))
                       and 0 < x <= 1 else "must be in (0, 1]",
                       "precond_update_prob": lambda x: None if isinstance(x, (int, float))
                       and 0 < x <= 1 else "must be in (0, 1]",
                       "lipschitz_beta": unit_interval, "damping": finite_nonnegative,
                       "precond_init_scale": optional(finite_positive),
                       "max_skew": lambda x: None if isinstance(x, (int, float))
                       and x >= 0 and not math.isnan(x) else "must be >= 0",
                       "max_dense_dim": optional(positive_int),
                       "norm_iterations": positive_int}

    def __init__(
        self,
        params: Any,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        fit: str = "whitening",
        whiten: str = "momentum",
        geometry: str = "Q0.5EQ1.5",
        lr_preconditioner: float = 0.1,
        precond_update_prob: float = 1.0,
        precondition_frequency: int = 1,
        lipschitz_beta: float = 0.9,
        damping: float = 1e-9,
        precond_init_scale: float | None = None,
        max_skew: float = 1.0,
        max_dense_dim: int | None = None,
        update_clip: tuple[float, float] | None | str = "auto",
        norm_iterations: int = 2,
        seed: int = 0,
        max_preconditioner_dim: int = 1024,
        merge_dims: bool = True,
        diagonal_threshold: int | None = None,
        max_state_ratio: float | None = 8.0,
        nonfinite: str = "skip",
        factor_dtype: torch.dtype | None = None,
        process_group: Any = None,
        distributed_mode: str = "broadcast",
    ) -> None:
        if lr is None:
            lr = _DEFAULT_LR.get((fit, whiten), 1e-3)
        if isinstance(update_clip, str):
            if update_clip != "auto":
                raise ValueError(f"PSGDKron: update_clip={update_clip!r} must be 'auto', None "
                                 "or (max_rms, max_abs)")
            update_clip = (2.0, 10.0) if fit == "whitening" else None
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, fit=fit, whiten=whiten,
            geometry=geometry, lr_preconditioner=lr_preconditioner,
            precond_update_prob=precond_update_prob,
            precondition_frequency=precondition_frequency, start_preconditioning_step=1,
            lipschitz_beta=lipschitz_beta, damping=damping,
            precond_init_scale=precond_init_scale, max_skew=max_skew,
            max_dense_dim=max_dense_dim,
            update_clip=None if update_clip is None else tuple(update_clip),
            norm_iterations=norm_iterations, max_preconditioner_dim=max_preconditioner_dim,
            merge_dims=merge_dims, diagonal_threshold=diagonal_threshold,
            max_state_ratio=max_state_ratio,
        )
        self._generator = torch.Generator().manual_seed(seed)  # fit decisions (all ranks)
        self._seed = seed
        self._noise: dict[str, torch.Generator] = {}  # random vectors, per device
        self._fit_now: dict[int, bool] = {}
        self._pairs: dict[int, tuple[Tensor, Tensor]] = {}
        self._fit_inputs: dict[str, Tensor] | None = None
        self._members: list = []
        self._segments: dict[tuple, Tensor] = {}
        self._roots: tuple[int, dict] = (-1, {})
        super().__init__(params, defaults, nonfinite=nonfinite, factor_dtype=factor_dtype,
                         process_group=process_group, distributed_mode=distributed_mode)
        if any(g["fit"] == "hvp" for g in self.param_groups) and self.process_group is not None:
            raise ValueError("PSGDKron: fit='hvp' runs in one process (its closure is "
                             "differentiated twice); use fit='whitening' with a process_group")

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group["fit"] == "whitening" and group["whiten"] == "momentum" \
                and group["momentum"] == 0:
            raise ValueError("PSGDKron: whiten='momentum' needs momentum > 0 (or "
                             "whiten='gradient')")
        clip = group["update_clip"]
        if clip is not None and not (isinstance(clip, (tuple, list)) and len(clip) == 2 and all(
                isinstance(c, (int, float)) and c > 0 and not math.isnan(c) for c in clip)):
            raise ValueError(f"PSGDKron: update_clip={clip!r} must be None or two numbers "
                             "(max_rms, max_abs) > 0")

    # -- randomness --------------------------------------------------------------------------
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._noise:
            self._noise[key] = torch.Generator(device=device).manual_seed(self._seed + 1)
        return self._noise[key]

    def _global_state(self) -> dict[str, Any]:
        return {**super()._global_state(), "rng": self._generator.get_state(),
                "noise_rng": {k: g.get_state() for k, g in self._noise.items()}}

    def _load_global_state(self, state: dict[str, Any]) -> None:
        super()._load_global_state(state)
        if "rng" in state:
            self._generator.set_state(state["rng"])
        for key, rng in state.get("noise_rng", {}).items():
            self._noise_generator(torch.device(key)).set_state(rng)

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step. With ``fit="hvp"`` the closure is required and must return the loss
        without calling backward (the optimizer differentiates it)."""
        self._fit_now = {}
        for gi, group in enumerate(self.param_groups):
            t = self._steps[gi] + 1
            due = is_due(t, 1, group["precondition_frequency"])
            prob = group["precond_update_prob"]
            if due and prob < 1:
                due = bool(torch.rand((), generator=self._generator) < prob)
            self._fit_now[id(group)] = t == 1 or due
        if not any(g["fit"] == "hvp" for g in self.param_groups):
            return super().step(closure)
        if closure is None:
            raise ValueError("PSGDKron(fit='hvp').step needs a closure that returns the loss "
                             "(without calling backward)")
        loss = self._hvp_gradients(closure)
        try:
            super().step(None)
        finally:
            self._pairs = {}
        return loss

    def _hvp_gradients(self, closure: Any) -> Any:
        """Run the closure, set every parameter's gradient, and for the groups that fit
        this step store ``(v, H v)`` per parameter (``v ~ N(0, I)``). When a fused attention
        kernel lacks the double-backward rule, the closure runs once more under the math
        kernels (:data:`curvlab.autodiff.attention_kernels`)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        fitting = [p for g in self.param_groups if g["fit"] == "hvp" and self._fit_now[id(g)]
                   for p in g["params"] if p.requires_grad]

        def compute() -> Any:
            self._pairs = {}
            with torch.enable_grad():
                loss = closure()
                if not (isinstance(loss, Tensor) and loss.requires_grad):
                    raise ValueError("PSGDKron(fit='hvp'): the closure must return the loss "
                                     "tensor with its graph")
                if fitting:
                    try:
                        check_double_backward(loss)
                    except ValueError as err:
                        raise ValueError(f"PSGDKron(fit='hvp'): {err}") from None
                try:
                    grads = torch.autograd.grad(loss, params, create_graph=bool(fitting),
                                                allow_unused=True)
                except RuntimeError as err:
                    raise RuntimeError("PSGDKron(fit='hvp'): could not differentiate the "
                                       "closure's loss; the closure must not call backward "
                                       f"itself ({err})") from err
                for p, g in zip(params, grads, strict=True):
                    p.grad = None if g is None else g.detach()
                fit_ids = {id(p) for p in fitting}
                live = [(p, g) for p, g in zip(params, grads, strict=True)
                        if g is not None and id(p) in fit_ids]
                vs = [torch.randn(p.shape, dtype=p.dtype, device=p.device,
                                  generator=self._noise_generator(p.device)) for p, _ in live]
                curved = [k for k, (_, g) in enumerate(live) if g.requires_grad]
                hvs: list[Tensor | None] = [None] * len(live)
                if curved:  # a gradient without a graph is constant: H v = 0 there
                    out = torch.autograd.grad([live[k][1] for k in curved],
                                              [live[k][0] for k in curved],
                                              [vs[k] for k in curved], allow_unused=True)
                    for k, hv in zip(curved, out, strict=True):
                        hvs[k] = hv
                for (p, _), v, hv in zip(live, vs, hvs, strict=True):
                    self._pairs[id(p)] = (v, torch.zeros_like(v) if hv is None
                                          else hv.detach())
            return loss

        # a fused attention kernel without a double-backward rule: the closure runs again
        # under the math kernels (curvlab.autodiff.attention_kernels; logged once)
        loss = attention_kernels.run(compute) if fitting else compute()
        return loss.detach()

    def _group_direction(self, k: int, g: Any, work: list[int]) -> Tensor:
        self._members = [g.members[i] for i in work]
        return super()._group_direction(k, g, work)

    def _pair_stacks(self, dtype: torch.dtype, flat: bool) -> tuple[Tensor, Tensor] | None:
        """``(V, H)`` of the current members, stacked like their gradient blocks."""
        if not all(id(p) in self._pairs for p, _, _ in self._members):
            return None
        out = []
        for j in range(2):
            if flat:
                parts = [self._pairs[id(p)][j].reshape(-1) for p, _, _ in self._members]
                out.append(torch.cat(parts).to(dtype))
            else:
                parts = [self._pairs[id(p)][j].reshape(plan.merged_shape)[sl]
                         for p, plan, sl in self._members]
                out.append(torch.stack(parts).to(dtype))
        return out[0], out[1]

    # -- the preconditioner interface --------------------------------------------------------
    def _dense_dims(self, group: dict, shape: tuple[int, ...]) -> list[bool]:
        numel = math.prod(shape)
        cap = group["max_dense_dim"]
        return [d > 1 and d * d <= group["max_skew"] * numel and (cap is None or d <= cap)
                for d in shape]

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        s = group["precond_init_scale"]
        s = 1.0 if s is None else s ** (1.0 / len(shape))
        st: dict[str, Tensor] = {}
        if group["momentum"] > 0:
            st["m"] = torch.zeros(n, *shape, dtype=dtype, device=device)
        for i, (d, dense) in enumerate(zip(shape, self._dense_dims(group, shape), strict=True)):
            eye = torch.eye(d, dtype=dtype, device=device) if dense else \
                torch.ones(d, dtype=dtype, device=device)
            st[f"Q{i}"] = (s * eye).expand(n, *eye.shape).clone()
            st[f"L{i}"] = torch.zeros(n, dtype=dtype, device=device)
        return st

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        s = group["precond_init_scale"]
        st = {"q": torch.full((n,), 1.0 if s is None else s, dtype=dtype, device=device),
              "L": torch.zeros(n, dtype=dtype, device=device)}
        if group["momentum"] > 0:
            st["m"] = torch.zeros(n, dtype=dtype, device=device)
        return st

    def _momentum(self, group: dict, st: dict[str, Tensor], G: Tensor, step: int) -> Tensor:
        mu = group["momentum"]
        if mu == 0:
            return G
        st["m"].lerp_(G, 1.0 - min((step - 1) / step, mu))
        return st["m"]

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        """The momentum, and the pair the fit of this step uses (when it fits)."""
        m = self._momentum(group, st, G, step)
        self._fit_inputs = None
        if not self._fit_now.get(id(group), False):
            return
        if group["fit"] == "hvp":
            pair = self._pair_stacks(G.dtype, flat=False)
            if pair is not None:
                self._fit_inputs = {"_v": pair[0], "_h": pair[1]}
        else:
            self._fit_inputs = {"_h": m if group["whiten"] == "momentum" else G}

    def _refresh_blocks(self, group: dict, st: dict[str, Tensor], step: int) -> None:
        """The fit of the factors (``Q_i``, ``L_i``) to this step's pair, when it fits."""
        inputs, self._fit_inputs = self._fit_inputs, None
        if inputs is None:
            return
        order = sum(1 for k in st if k[0] == "Q")
        keys = [f"{c}{i}" for i in range(order) for c in "QL"]
        self._refresh(lambda s: self._fit_rows(group, s, order), {**st, **inputs}, keys,
                      reads=list(inputs))

    def _fit_rows(self, group: dict, s: dict[str, Tensor], order: int) -> None:
        """The fit of the rows ``s`` (eager, or its pure part compiled): the noise is drawn
        here from the private generator, the failures are counted on the host after."""
        h, v = s["_h"], s.get("_v")
        noise = torch.randn(h.shape, dtype=h.dtype, device=h.device,
                            generator=self._noise_generator(h.device))
        fn = self._pure(_fit_rows_pure, ("fit", tuple(h.shape), h.dtype, h.device, v is None))
        ok = fn([s[f"Q{i}"] for i in range(order)], [s[f"L{i}"] for i in range(order)], h, v,
                noise, **_fit_settings(group))
        failed = int(ok.numel() - ok.sum())
        self._count_refresh(ok.numel(), failed, "PSGD fit", tuple(h.shape[1:]))

    def _pure(self, fn: Any, key: Any) -> Any:
        """``fn``, compiled once per ``key`` after :meth:`compile_step`."""
        return fn if self._step_compiler is None else self._step_compiler(fn, key)

    def _block_direction(self, group: dict, st: dict[str, Tensor], G: Tensor,
                         step: int) -> Tensor:
        """Momentum, the fit when this step fits, ``clip(P m)``: one path, eager or with
        its pure parts (fit, direction) compiled; the fit decision and its noise are drawn
        on the host beforehand."""
        self._update_statistics(group, st, G, step)
        self._refresh_blocks(group, st, step)
        return self._precondition(group, st, G, step)

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        """``clip(P m)`` per block."""
        order = G.ndim - 1
        m = st["m"] if group["momentum"] > 0 else G
        fn = self._pure(_block_direction_pure, ("direction", tuple(G.shape), G.dtype,
                                                G.device))
        return fn(m, [st[f"Q{i}"] for i in range(order)], group["update_clip"])

    def _segment_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per flat element of the current diagonal members: its member index, and the
        member sizes."""
        sizes = tuple(p.numel() for p, _, _ in self._members)
        key = (sizes, str(device))
        if key not in self._segments:
            counts = torch.tensor(sizes, device=device)
            self._segments[key] = (torch.repeat_interleave(
                torch.arange(len(sizes), device=device), counts), counts)
        return self._segments[key]

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        """Diagonal ``Q = diag(q)`` per parameter (one ``L`` per parameter)."""
        m = self._momentum(group, st, g, step)
        seg, counts = self._segment_index(g.device)
        if self._fit_now.get(id(group), False):
            h = v = None
            if group["fit"] == "hvp":
                pair = self._pair_stacks(g.dtype, flat=True)
                if pair is not None:
                    v, h = pair
            else:
                h = m if group["whiten"] == "momentum" else g
            if h is not None:
                self._fit_diagonal(group, st, h, v, seg, counts)
        # the diagonal parts stay eager under compile_step: their segment sums
        # (index_add_, scatter_reduce) fail in inductor's multithreaded CPU code generation
        # (torch 2.13: CppVecKernel's atomic_add store asserts), and they are cheap
        return _diagonal_direction_pure(st["q"], m, group["update_clip"], seg, counts)

    def _fit_diagonal(self, group: dict, st: dict[str, Tensor], h: Tensor, v: Tensor | None,
                      seg: Tensor, counts: Tensor) -> None:
        noise = torch.randn(h.shape, dtype=h.dtype, device=h.device,
                            generator=self._noise_generator(h.device))
        settings = _fit_settings(group)
        del settings["whitening"], settings["iterations"]
        ok = _fit_diagonal_pure(st["q"], st["L"], h, v, noise, seg, counts, **settings)
        failed = int(ok.numel() - ok.sum())
        self._count_refresh(ok.numel(), failed, "PSGD diagonal fit")

    # -- monitor protocol --------------------------------------------------------------------
    def stability_model(self) -> StabilityModel:
        """The step ``lr P m`` with EMA momentum on a quadratic: stable iff
        ``lr lambda_max(P^{1/2} H P^{1/2}) < 2 (1 + b) / (1 - b)`` (2 without momentum),
        i.e. the protocol's ``P^{-1/2}`` is PSGD's ``P^{1/2}``, applied per block as
        ``(Q_1^T Q_1)^{1/2} x ... x (Q_k^T Q_k)^{1/2}`` (the symmetric root, by eigh of each
        factor). Holds while the update clip is inactive; coordinates whose momentum is
        exactly 0 (never a gradient) are not governed."""
        group = self.param_groups[0]
        mu = group["momentum"]
        return StabilityModel("psgd", float(group["lr"]),
                              momentum_threshold(mu, ema=True) if mu > 0 else 2.0,
                              self._sqrt_preconditioner,
                              "PSGD's P = Q^T Q per block; the update clip is ignored")

    def _factor_root(self, q: Tensor) -> Tensor:
        """``(q^T q)^{1/2}`` of a dense factor (float64 eigh), ``|q|`` of a diagonal one;
        cached until the next step."""
        step = self._counters["steps"]
        if self._roots[0] != step:
            self._roots = (step, {})
        key = (q.data_ptr(), q.storage_offset(), tuple(q.shape))
        cache = self._roots[1]
        if key not in cache:
            if q.ndim == 1:
                cache[key] = q.abs()
            else:
                w, U = torch.linalg.eigh((q.mT @ q).to(torch.float64))
                cache[key] = ((U * w.clamp_min(0).sqrt()) @ U.mT).to(q.dtype)
        return cache[key]

    def _sqrt_preconditioner(self, p: Tensor, x: Tensor) -> Tensor:
        st = self.state.get(p, {})
        gi, plan = self._param_plan(p)
        if "q" in st:  # diagonal method
            out = x * self._factor_root(st["q"].reshape(-1)).view(x.shape).to(x.dtype)
            if "m" in st:
                out = torch.where(st["m"] != 0, out, torch.zeros_like(out))
            return out
        if not any(k.startswith("Q0") for k in st):
            return x
        out = torch.empty_like(x)
        for j, (_, slices) in enumerate(plan.blocks):
            sfx = "" if len(plan.blocks) == 1 else f".{j}"
            X = x.reshape(plan.merged_shape)[slices]
            order = X.ndim
            roots = [self._factor_root(st[f"Q{i}{sfx}"]).to(x.dtype)[None]
                     for i in range(order)]
            Y = apply_factors(X[None], roots)[0]
            m = st.get(f"m{sfx}")
            if m is not None and not bool(m.any()):
                Y = torch.zeros_like(Y)
            out.view(plan.merged_shape)[slices] = Y
        return out
