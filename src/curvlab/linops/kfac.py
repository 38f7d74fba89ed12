"""Kronecker-factored approximate curvature (K-FAC) as a linear operator.

``KFACOperator(model, loss_fn, data)`` approximates the Fisher / GGN of the empirical risk
by a block-diagonal matrix with one Kronecker block ``A (x) G + damping I`` per Linear or
Conv2d layer (Martens & Grosse 2015, eq. 1-3 and sec. 3; Grosse & Martens 2016 for
convolutions, KFC, "independent spatial positions" assumption). See
:mod:`curvlab.linops._kronecker` for the factor definitions; with N samples in total

    A = (1/N) sum_n sum_t a_nt a_nt^T,   G = c (1/N) sum_n (1/T) sum_t sum_u g_ntu g_ntu^T

where ``g_ntu`` is the output gradient backpropagated from the cotangent ``u`` of sample
``n`` (a sampled-label gradient for ``"mc"``, a column of the output-Hessian square root
for ``"exact"``, the true-label gradient for ``"empirical"``) and ``c = 1`` for a loss that
averages over samples, ``N`` for a summing loss.
"""

from __future__ import annotations

from typing import Any

import torch

from curvlab.distributed import all_reduce_symmetric
from curvlab.linalg.logdet import kronecker_logdet
from curvlab.linops._kronecker import (
    FISHER_TYPES,
    curvature_pass,
    eigen_factor,
    factored_pi,
    find_layers,
    grad_factor,
    input_factor,
)
from curvlab.linops.base import CurvatureOperator

__all__ = ["KFACOperator", "KFACInverseOperator"]


class KFACOperator(CurvatureOperator):
    """Block-diagonal Kronecker-factored curvature ``blockdiag(A_l (x) G_l) + damping I``.

    Args:
        model, loss_fn, data, params: as for every curvature operator (or one Objective).
            ``model`` must be an ``nn.Module``; every selected parameter must belong to an
            ``nn.Linear`` or ungrouped ``nn.Conv2d`` layer (otherwise ValueError: select a
            subset with ``params=``).
        fisher_type: ``"mc"`` (Fisher, targets sampled from the model, default),
            ``"exact"`` (Fisher/GGN through the exact output-Hessian square root) or
            ``"empirical"`` (empirical Fisher, true targets).
        damping: ``lambda`` added to the diagonal of the operator.
        mc_samples: sampled targets per input for ``"mc"``.
        seed: seed of the target sampling (``"mc"``), so the operator is reproducible.

    Attributes after construction: ``factors`` maps the layer name to ``(A, G)``.

    With a data-parallel objective (``process_group``) the factors are summed over the
    ranks (the Kronecker factors of the full data, not a sum of per-rank Kronecker
    products), so products need no further all-reduce.
    """

    products_are_global = True

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, fisher_type: str = "mc", damping: float = 0.0, mc_samples: int = 1,
                 seed: int = 0, train: bool = False) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if not (damping >= 0):
            raise ValueError(f"damping must be >= 0, got {damping}")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples}")
        self.fisher_type = fisher_type
        self.damping = float(damping)
        self.mc_samples = int(mc_samples)
        self.seed = seed
        super().__init__(model, loss_fn, data, params, train=train)

    # ---- construction --------------------------------------------------------------
    def _layout(self) -> None:
        obj = self.objective
        if not isinstance(obj.model, torch.nn.Module):
            raise TypeError("KFACOperator needs an nn.Module model (its layers are hooked)")
        self.layers, others = find_layers(obj.model, obj.params)
        if others:
            raise ValueError(
                f"K-FAC has Kronecker factors only for nn.Linear and ungrouped nn.Conv2d "
                f"layers; parameters {others} belong to other modules. Pass params= to "
                "select the supported layers only")
        offsets, i = {}, 0
        for k, _, n in obj._shapes:
            offsets[k] = i
            i += n
        self._index = []
        for layer in self.layers:
            cols = []
            if layer.weight is not None:
                w = obj.params[layer.weight]
                cols.append(offsets[layer.weight] + torch.arange(w.numel()).reshape(
                    layer.d_out, -1))
            if layer.bias is not None:
                cols.append(offsets[layer.bias] + torch.arange(layer.d_out).reshape(-1, 1))
            self._index.append(torch.cat(cols, dim=1).to(obj.device))

    def refresh(self) -> None:
        super().refresh()
        self._layout()
        self.factors = dict(zip([layer.name for layer in self.layers],
                                self._compute_factors(), strict=True))

    def _compute_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        obj = self.objective
        gen = torch.Generator(device=obj.device).manual_seed(self.seed)
        A = [torch.zeros(lay.d_in, lay.d_in, dtype=obj.dtype, device=obj.device)
             for lay in self.layers]
        G = [torch.zeros(lay.d_out, lay.d_out, dtype=obj.dtype, device=obj.device)
             for lay in self.layers]
        n_total = obj.num_samples
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.point.items()}
        with obj.mode():
            for _, x, y in obj.batches():
                calls = curvature_pass(self.layers, lambda x=x: obj.outputs(leaves, x),
                                       obj.loss_fn, y, self.fisher_type,
                                       reduction=obj.reduction, mc_samples=self.mc_samples,
                                       generator=gen)
                for i, per_layer in enumerate(calls):
                    for a, gs in per_layer:
                        A[i] += input_factor(a)
                        for g in gs:
                            G[i] += grad_factor(g)
        all_reduce_symmetric([*A, *G], obj.process_group)  # data parallel: whole-data factors
        c = 1.0 if obj.reduction == "mean" else float(n_total)
        return [(a / n_total, g * (c / n_total)) for a, g in zip(A, G, strict=True)]

    # ---- products ------------------------------------------------------------------
    def _blocks(self):
        for layer, idx in zip(self.layers, self._index, strict=True):
            A, G = self.factors[layer.name]
            yield idx, A, G

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)  # every coordinate belongs to exactly one block
        for idx, A, G in self._blocks():
            M = V[:, idx]
            out[:, idx] = G @ M @ A + self.damping * M
        return out

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The dense ``n x n`` matrix, assembled from the Kronecker blocks."""
        n = self.shape[0]
        D = self.damping * torch.eye(n, dtype=self.dtype, device=self.device)
        for idx, A, G in self._blocks():
            flat = idx.reshape(-1)
            D[flat.unsqueeze(1), flat.unsqueeze(0)] += torch.kron(G, A)
        return D

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(self + damping I)``, exactly: ``sum_ij log(dG_i dA_j + lambda)`` per block
        (:func:`curvlab.linalg.kronecker_logdet`; ``lambda`` includes the operator's damping)."""
        return kronecker_logdet(self.factors.values(), self.damping + damping, size=self.shape[0])

    def inverse(self, damping: float | None = None, *,
                method: str = "exact") -> KFACInverseOperator:
        """An operator applying the inverse of the damped Kronecker approximation.

        ``method="exact"``: ``(A (x) G + lambda I)^-1`` per block, exactly, through the
        eigendecompositions ``A = Q_A D_A Q_A^T``, ``G = Q_G D_G Q_G^T``:
        ``M -> Q_G [(Q_G^T M Q_A) / (d_G d_A^T + lambda)] Q_A^T``.
        ``method="factored"``: Tikhonov factored damping (Martens & Grosse 2015, sec. 6.3)
        ``(A + pi sqrt(lambda) I)^-1 (x) (G + sqrt(lambda)/pi I)^-1``,
        ``pi^2 = (tr A / dim A) / (tr G / dim G)``.

        ``damping`` defaults to the operator's own; it must be positive unless every
        factor is nonsingular.
        """
        lam = self.damping if damping is None else float(damping)
        if not (lam >= 0):
            raise ValueError(f"damping must be >= 0, got {damping}")
        if method not in ("exact", "factored"):
            raise ValueError(f"method must be 'exact' or 'factored', got {method!r}")
        return KFACInverseOperator(self, lam, method)


class KFACInverseOperator(CurvatureOperator):
    """The inverse of a damped :class:`KFACOperator` (built by ``KFACOperator.inverse``)."""

    products_are_global = True

    def __init__(self, parent: KFACOperator, damping: float, method: str) -> None:
        self.objective = parent.objective
        self.parent = parent
        self.damping = damping
        self.method = method
        self.num_matvecs = 0
        self.point = parent.point
        self._eig = []
        for idx, A, G in parent._blocks():
            dA, QA = eigen_factor(A)
            dG, QG = eigen_factor(G)
            if method == "exact":
                denom = dG.unsqueeze(1) * dA.unsqueeze(0) + damping
            else:
                pi = factored_pi(A, G)
                root = damping ** 0.5
                denom = (dG + root / pi).unsqueeze(1) * (dA + pi * root).unsqueeze(0)
            if not bool((denom > 0).all()):
                raise ValueError("the Kronecker factors are singular: pass damping > 0")
            self._eig.append((idx, QA, QG, denom))

    def refresh(self) -> None:
        raise TypeError("a KFACInverseOperator is fixed; refresh the parent KFACOperator "
                        "and call .inverse() again")

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)  # every coordinate belongs to exactly one block
        for idx, QA, QG, denom in self._eig:
            M = V[:, idx]
            out[:, idx] = QG @ ((QG.T @ M @ QA) / denom) @ QA.T
        return out
