"""Kronecker-factored approximate curvature (K-FAC) as a linear operator.

``KFACOperator(model, loss_fn, data)`` approximates the Fisher / GGN of the empirical risk
by a block-diagonal matrix with one Kronecker block ``A (x) G + damping I`` per Linear or
Conv2d layer (Martens & Grosse 2015, eq. 1-3 and sec. 3; Grosse & Martens 2016 for
convolutions, KFC, "independent spatial positions" assumption; Eschenhagen et al. 2023,
"K-FAC expand", for positions of a sequence). See :mod:`curvlab.linops._kronecker` for the
factor definitions. For the objective ``L = sum_b w_b loss_b``

    A = sum_n omega_n sum_t a_nt a_nt^T / sum_n omega_n,
    G = c (1/T) sum_n sum_t sum_u g_ntu g_ntu^T

where ``g_ntu`` is the gradient at the layer's output (sample n, position t of T) of the
cotangent ``u`` backpropagated from the model output, ``sum_u u u^T = d^2 L / dz^2`` per
sample (``"exact"``: the columns of its square root; ``"mc"``: in expectation, scores at
targets sampled from the model, each loss term scaled as the loss scales it; see
:func:`curvlab.linops._kronecker.backprop_vectors`), ``c = 1``. ``"empirical"`` uses the
gradient ``u = dL/dz`` on the true targets and ``c = sum_n omega_n`` for a mean loss (1 for
a summing one). ``omega_n`` is the mean term weight of sample ``n``
(:func:`curvlab.losses.term_weights`: 1, 0 where every target is ignored, the class weight),
so ignored targets and class weights give the K-FAC of the valid terms.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvlab.distributed import all_reduce_coalesced
from curvlab.linalg.logdet import kronecker_logdet
from curvlab.linops._kronecker import (
    FISHER_TYPES,
    MAX_FACTOR_DIM,
    all_reduce_factors,
    apply_blocks,
    curvature_pass,
    damped_factor_inverse,
    dense_factor,
    eigen_factor,
    eigenbasis_scale,
    factor_scale,
    factored_pi,
    find_layers,
    kron_apply,
    rotate,
    tied_embeddings,
    unrotate,
)
from curvlab.linops.base import CurvatureOperator
from curvlab.losses import check_curved_in_outputs
from curvlab.objective import input_samples

logger = logging.getLogger(__name__)

__all__ = ["KFACOperator", "KFACInverseOperator", "EKFACOperator"]


class KFACOperator(CurvatureOperator):
    """Block-diagonal Kronecker-factored curvature ``blockdiag(A_l (x) G_l) + damping I``.

    Args:
        model, loss_fn, data, params: as for every curvature operator (or one Objective).
            ``model`` must be an ``nn.Module``. Selected parameters must belong to an
            ``nn.Linear``, ``nn.Conv2d`` (grouped: one block per group), HF ``Conv1D``
            (transposed linear) or ``nn.Embedding`` (diagonal input factor) layer, and to one
            layer only (a language model's tied embedding / output head is counted through
            the head; other tied weights: ValueError). ``params=None`` selects the
            trainable parameters of the supported layers and logs what it leaves out (e.g.
            LayerNorms) with its fraction of the parameters.
        fisher_type: ``"mc"`` (Fisher, targets sampled from the model, default),
            ``"exact"`` (Fisher/GGN through the exact output-Hessian square root) or
            ``"empirical"`` (empirical Fisher, true targets).
        damping: ``lambda`` added to the diagonal of the operator.
        mc_samples: sampled targets per input for ``"mc"``.
        seed: seed of the target sampling (``"mc"``), so the operator is reproducible.
        max_factor_dim: factors of a larger dimension are kept diagonal (their ``eigh``
            would be too slow: ~6 s at 2048, ~54 s at 4096 in float64 on one core).
        approx: ``"expand"`` (default) or ``"reduce"`` (Eschenhagen et al. 2023: ``A`` from
            the position-averaged inputs, ``G`` from the position-summed output gradients,
            one term per sample) for layers that share their weight over positions.
        separate_weight_and_bias: one Kronecker block for the weight and one for the bias
            (named ``"<layer>.weight"`` / ``"<layer>.bias"`` in ``factors``) instead of one
            block for ``[W | b]``.

    Attributes after construction: ``factors`` maps the layer name to ``(A, G)`` (a
    diagonal factor is a 1-D tensor).

    With a data-parallel objective (``process_group``) the factors are summed over the
    ranks (the Kronecker factors of the full data, not a sum of per-rank Kronecker
    products), so products need no further all-reduce.
    """

    products_are_global = True

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, fisher_type: str = "mc", damping: float = 0.0, mc_samples: int = 1,
                 seed: int = 0, train: bool = False,
                 max_factor_dim: int | None = MAX_FACTOR_DIM, approx: str = "expand",
                 separate_weight_and_bias: bool = False) -> None:
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
        self.max_factor_dim = max_factor_dim
        self.approx = approx
        self.separate_weight_and_bias = separate_weight_and_bias
        # tied embeddings counted through their head, however the parameters are selected
        self._exclude: dict[str, str] = (tied_embeddings(model) if isinstance(model, nn.Module)
                                         else {})
        if params is None and isinstance(model, nn.Module):
            params = self._supported_params(model)
        super().__init__(model, loss_fn, data, params, train=train)

    def _supported_params(self, model: nn.Module) -> list[str]:
        """The trainable parameters K-FAC has blocks for (``params=None``), logged once."""
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        tied = self._exclude
        layers, others = find_layers(
            model, named, max_factor_dim=self.max_factor_dim, exclude=tied,
            approx=self.approx, separate_weight_and_bias=self.separate_weight_and_bias,
            grouped=True)
        chosen = [k for k in named if k not in others]
        if not chosen:
            raise ValueError("K-FAC has no supported layer (nn.Linear, nn.Conv2d, HF Conv1D, "
                             "nn.Embedding) among the model's trainable parameters")
        total = sum(p.numel() for p in named.values())
        left = sum(named[k].numel() for k in others)
        logger.info(
            "KFACOperator: %d Kronecker blocks over %.1f%% of the parameters; not covered: "
            "%s (%.1f%%)%s", len(layers), 100 * (total - left) / total,
            ", ".join(others) or "none", 100 * left / total,
            "".join(f"; tied embedding {e!r} counted through {h!r} only"
                    for e, h in tied.items()))
        return chosen

    # ---- construction --------------------------------------------------------------
    def _layout(self) -> None:
        obj = self.objective
        if not isinstance(obj.model, torch.nn.Module):
            raise TypeError("KFACOperator needs an nn.Module model (its layers are hooked)")
        self.layers, others = find_layers(
            obj.model, obj.params, max_factor_dim=self.max_factor_dim, approx=self.approx,
            exclude=self._exclude,
            separate_weight_and_bias=self.separate_weight_and_bias, grouped=True)
        if others:
            raise ValueError(
                f"K-FAC has Kronecker factors only for nn.Linear, ungrouped nn.Conv2d, HF "
                f"Conv1D and nn.Embedding layers that are called (not nn.MultiheadAttention's "
                f"out_proj, whose weight the attention applies itself); parameters {others} "
                "belong to other modules. Pass params= to select the supported layers only")
        offsets, i = {}, 0
        for k, _, n in obj._shapes:
            offsets[k] = i
            i += n
        self._index = []
        for layer in self.layers:
            cols = []
            if layer.weight is not None:
                w = obj.params[layer.weight]
                pos = torch.arange(w.numel())
                pos = pos.reshape(w.shape).T if layer.transposed else \
                    pos.reshape(w.shape[0], -1)[layer.out_rows]
                cols.append(offsets[layer.weight] + pos)
            if layer.bias is not None:
                bias = torch.arange(obj.params[layer.bias].numel())[layer.out_rows]
                cols.append(offsets[layer.bias] + bias.reshape(-1, 1))
            self._index.append(torch.cat(cols, dim=1).to(obj.device))

    def refresh(self) -> None:
        if self.fisher_type == "exact":
            check_curved_in_outputs(self.objective.loss_fn, "K-FAC (fisher_type='exact')")
        super().refresh()
        self._layout()
        self.factors = dict(zip([layer.name for layer in self.layers],
                                self._compute_factors(), strict=True))

    def _passes(self, gen: torch.Generator, loss_samples: list[float] | None = None,
                per_sample: bool = False):
        """Per batch, the :func:`curvature_pass` entries of every layer (and the weight of
        the batch's loss samples appended to ``loss_samples``; ``per_sample``: rows must be
        samples)."""
        obj = self.objective
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.point.items()}
        with obj.mode():
            for w, x, y in obj.batches():
                yield curvature_pass(self.layers, lambda x=x: obj.outputs(leaves, x),
                                     obj.loss_fn, y, self.fisher_type, weight=w,
                                     reduction=obj.reduction, mc_samples=self.mc_samples,
                                     generator=gen, params=leaves, loss_samples=loss_samples,
                                     per_sample=per_sample, num_samples=input_samples(x))

    def _loss_samples(self, per_batch: list[float]) -> float:
        """The whole data's loss samples (summed over the ranks)."""
        obj = self.objective
        total = torch.tensor([sum(per_batch)], dtype=torch.float64, device=obj.device)
        obj.all_reduce(total)
        return float(total)

    def _compute_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        obj = self.objective
        self._generator = gen = torch.Generator(device=obj.device).manual_seed(self.seed)

        def zeros(d: int, diag: bool) -> torch.Tensor:
            shape = (d,) if diag else (d, d)
            return torch.zeros(shape, dtype=obj.dtype, device=obj.device)

        A = [zeros(lay.d_in, lay.diag_in) for lay in self.layers]
        G = [zeros(lay.d_out, lay.diag_out) for lay in self.layers]
        omega = torch.zeros(len(self.layers), dtype=obj.dtype, device=obj.device)
        samples: list[float] = []
        for calls in self._passes(gen, samples):
            for i, (layer, per_layer) in enumerate(zip(self.layers, calls, strict=True)):
                for a, om, gs in per_layer:
                    A[i] += layer.input_stat(a, om).to(obj.dtype)
                    omega[i] += om.sum()
                    for g in gs:
                        G[i] += layer.output_stat(g).to(obj.dtype)
        # data parallel: whole-data factors
        all_reduce_factors([*A, *G], obj.process_group)
        obj.all_reduce(omega)
        weights = omega.tolist()
        if not any(om > 0 for om in weights):
            raise ValueError("K-FAC: no layer ran in the forward pass on a loss term of "
                             "nonzero weight")
        idle = [layer.name for layer, om in zip(self.layers, weights, strict=True) if om <= 0]
        if idle:  # their exact Gauss-Newton blocks are zero too: their outputs never reach
            # the loss (an unused head, a branch this data does not take)
            warnings.warn(f"K-FAC: the layers {idle} did not run in the forward pass on this "
                          "data: their Kronecker factors, like their Gauss-Newton blocks, are "
                          "zero", stacklevel=2)
        scale = factor_scale(self.fisher_type, obj.reduction, self._loss_samples(samples))
        return [(a / om, g * scale) if om > 0 else (a, g)
                for a, g, om in zip(A, G, weights, strict=True)]

    # ---- products ------------------------------------------------------------------
    def _blocks(self):
        for layer, idx in zip(self.layers, self._index, strict=True):
            A, G = self.factors[layer.name]
            yield idx, A, G

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        def block(i: int, layer: Any, M: torch.Tensor) -> torch.Tensor:
            A, G = self.factors[layer.name]
            return kron_apply(G, M, A) + self.damping * M
        return apply_blocks(self.layers, self.objective, V, block)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The dense ``n x n`` matrix, assembled from the Kronecker blocks."""
        n = self.shape[0]
        D = self.damping * torch.eye(n, dtype=self.dtype, device=self.device)
        for idx, A, G in self._blocks():
            flat = idx.reshape(-1)
            D[flat.unsqueeze(1), flat.unsqueeze(0)] += torch.kron(dense_factor(G),
                                                                  dense_factor(A))
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
        ``pi^2 = (tr A / dim A) / (tr G / dim G)``, the factor inverses by Cholesky
        (:func:`curvlab.linops._kronecker.damped_factor_inverse`): ``M -> G_inv M A_inv``.

        ``damping`` defaults to the operator's own; it must be positive unless every
        factor is nonsingular.
        """
        lam = self.damping if damping is None else float(damping)
        if not (lam >= 0):
            raise ValueError(f"damping must be >= 0, got {damping}")
        if method not in ("exact", "factored"):
            raise ValueError(f"method must be 'exact' or 'factored', got {method!r}")
        return KFACInverseOperator(self, lam, method)

    def _inverse_blocks(self, damping: float, method: str
                        ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per layer, the inverse of its block as a function of ``(k, d_out, d_in)``
        blocks: ``M -> Q_G [(Q_G^T M Q_A) / denom] Q_A^T`` (``"exact"``) or ``M -> G_inv M
        A_inv`` (``"factored"``)."""
        out = []
        for _, A, G in self._blocks():
            if method == "factored":
                pi = factored_pi(A, G)
                root = damping ** 0.5
                if not (pi * root > 0 or (_nonsingular(A) and _nonsingular(G))):
                    raise ValueError("the Kronecker factors are singular: pass damping > 0")
                A_inv = damped_factor_inverse(A, pi * root)
                G_inv = damped_factor_inverse(G, root / pi)
                out.append(lambda M, A_inv=A_inv, G_inv=G_inv: kron_apply(G_inv, M, A_inv))
                continue
            dA, QA = eigen_factor(A)
            dG, QG = eigen_factor(G)
            out.append(_eigen_inverse(QA, QG, dG.unsqueeze(1) * dA.unsqueeze(0) + damping))
        return out


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
        self._inverses = parent._inverse_blocks(damping, method)

    def refresh(self) -> None:
        raise TypeError("a KFACInverseOperator is fixed; refresh the parent KFACOperator "
                        "and call .inverse() again")

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        return apply_blocks(self.parent.layers, self.objective, V,
                            lambda i, layer, M: self._inverses[i](M))


class EKFACOperator(KFACOperator):
    """Eigenvalue-corrected K-FAC (EKFAC, George et al. 2018): per block, the Kronecker
    eigenbasis ``Q_G (x) Q_A`` of the K-FAC factors with the eigenvalues ``d_G d_A^T``
    replaced by the diagonal of the curvature block in that basis,

        S = c sum_n sum_u (Q_G^T (sum_t g_ntu a_nt^T) Q_A)^2,

    (``g_ntu`` and ``c`` as for :class:`KFACOperator`, from a second pass over the data
    once the eigenbases are known), so the block is ``M -> Q_G [(Q_G^T M Q_A) * S] Q_A^T``.
    For one sample with ``T = 1`` this is K-FAC itself. Same arguments as
    :class:`KFACOperator`; ``scales`` maps the layer name to ``S``. Embedding layers are
    not supported (ValueError).
    """

    def refresh(self) -> None:
        super().refresh()
        obj = self.objective
        self._bases = [(eigen_factor(A)[1], eigen_factor(G)[1])
                       for A, G in (self.factors[lay.name] for lay in self.layers)]
        S = [torch.zeros(lay.d_out, lay.d_in, dtype=obj.dtype, device=obj.device)
             for lay in self.layers]
        samples: list[float] = []
        for calls in self._passes(self._generator, samples, per_sample=True):
            for i, per_layer in enumerate(calls):
                QA, QG = self._bases[i]
                total, _ = eigenbasis_scale(per_layer, QA, QG)
                if total is not None:
                    S[i] += total.to(obj.dtype)
        if obj.process_group is not None:
            all_reduce_coalesced(S, obj.process_group)
        scale = factor_scale(self.fisher_type, obj.reduction, self._loss_samples(samples))
        self.scales = {lay.name: s * scale for lay, s in zip(self.layers, S, strict=True)}

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        def block(i: int, layer: Any, M: torch.Tensor) -> torch.Tensor:
            QA, QG = self._bases[i]
            return unrotate(rotate(M, QG, QA) * self.scales[layer.name], QG, QA) + \
                self.damping * M
        return apply_blocks(self.layers, self.objective, V, block)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        n = self.shape[0]
        D = self.damping * torch.eye(n, dtype=self.dtype, device=self.device)
        for layer, idx, (QA, QG) in zip(self.layers, self._index, self._bases, strict=True):
            flat = idx.reshape(-1)
            eye = lambda Q, d: torch.eye(d, dtype=self.dtype, device=self.device) \
                if Q is None else Q  # noqa: E731
            Q = torch.kron(eye(QG, layer.d_out), eye(QA, layer.d_in))
            block = Q @ torch.diag(self.scales[layer.name].reshape(-1)) @ Q.T
            D[flat.unsqueeze(1), flat.unsqueeze(0)] += block
        return D

    def inverse(self, damping: float | None = None, *,
                method: str = "exact") -> KFACInverseOperator:
        """``(EKFAC + lambda I)^-1``, exactly: ``M -> Q_G [(Q_G^T M Q_A) / (S + lambda)]
        Q_A^T`` (``method`` must be ``"exact"``)."""
        if method != "exact":
            raise ValueError("EKFACOperator.inverse supports method='exact' only")
        return super().inverse(damping, method=method)

    def _inverse_blocks(self, damping: float, method: str
                        ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [_eigen_inverse(QA, QG, self.scales[layer.name] + damping,
                               "the corrected eigenvalues are singular: pass damping > 0")
                for layer, (QA, QG) in zip(self.layers, self._bases, strict=True)]


def _eigen_inverse(QA: torch.Tensor | None, QG: torch.Tensor | None, denom: torch.Tensor,
                   singular: str = "the Kronecker factors are singular: pass damping > 0"
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``M -> Q_G [(Q_G^T M Q_A) / denom] Q_A^T`` (ValueError if a ``denom`` entry is not
    positive)."""
    if not bool((denom > 0).all()):
        raise ValueError(singular)
    return lambda M: unrotate(rotate(M, QG, QA) / denom, QG, QA)


def _nonsingular(X: torch.Tensor) -> bool:
    """Whether a PSD factor (a matrix or a diagonal) has no zero eigenvalue."""
    d = X if X.dim() == 1 else torch.linalg.eigvalsh(X.double())
    return bool((d > 0).all())
