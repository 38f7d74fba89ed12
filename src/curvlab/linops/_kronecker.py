"""Kronecker-factored curvature statistics of Linear and Conv2d layers (K-FAC / KFC).

One place for the machinery shared by :class:`curvlab.linops.KFACOperator` and the
:class:`curvlab.optim.KFAC` optimizer: finding the supported layers, module hooks that
record layer inputs and output gradients, the two Kronecker factors, and the damped
Kronecker solves.

For a layer ``s = W a`` (weight and bias form one matrix ``[W | b]`` of shape
``(d_out, d_in + 1)``, acting on ``a`` with a trailing one) the curvature block is
approximated as (Martens & Grosse 2015, eq. 1-3; Grosse & Martens 2016 for convolutions;
Eschenhagen et al. 2023 "K-FAC expand" for positions shared by a weight)

    F_layer ~= A (x) G,   A = sum_n omega_n sum_t a_nt a_nt^T / sum_n omega_n,
                          G = (1/T) sum_n sum_t sum_u g_ntu g_ntu^T

where ``t`` runs over the ``T`` positions of sample ``n`` (unfolded patches of a
convolution, extra leading dimensions of a Linear input; ``T = 1`` for a flat input),
``omega_n`` is the sample's mean loss-term weight (:func:`sample_weights`) and ``g_ntu`` is
the gradient at the layer's output of a cotangent ``u`` on the model output with ``sum_u
u u^T = d^2 L / dz^2`` per sample (:func:`backprop_vectors`). In the flat, row-major layout
of ``[W | b]`` the block is the matrix ``G (x) A`` acting as ``M -> G M A``. Conventions
(and the conversion to curvlinops') are in ``docs/conventions.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.distributed import all_reduce_coalesced, all_reduce_symmetric
from curvlab.losses import is_known_mean_loss, term_curvature_weights, term_weights

__all__ = [
    "KronLayer",
    "MAX_FACTOR_DIM",
    "find_layers",
    "tied_embeddings",
    "is_supported",
    "is_hf_conv1d",
    "layer_kind",
    "kron_apply",
    "rotate",
    "unrotate",
    "dense_factor",
    "mean_diag",
    "damped_factor_inverse",
    "layer_inputs",
    "layer_output_grads",
    "grad_factor",
    "LayerCapture",
    "backprop_vectors",
    "curvature_pass",
    "loss_terms",
    "sample_weights",
    "sample_scores",
    "factor_scale",
    "weighted_input_factor",
    "all_reduce_factors",
    "eigenbasis_scale",
    "eigen_factor",
    "symmetric_eigh",
    "factored_pi",
]

FISHER_TYPES = ("mc", "exact", "empirical")

#: factors of a larger dimension are kept diagonal (their eigendecomposition would cost
#: ~6 s at 2048 and ~54 s at 4096 in float64 on one CPU core, measured; a vocabulary-sized
#: output factor of a language-model head would not fit in memory)
MAX_FACTOR_DIM = 2048


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF transformers' ``Conv1D`` (a Linear layer with its weight stored ``(in, out)``),
    recognized by class name and module path, so transformers is never imported here."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_kind(module: nn.Module, grouped: bool = False) -> str | None:
    """``"linear"``, ``"conv2d"`` (any padding mode; grouped ones only if ``grouped``: one
    block per group), ``"conv1d"`` (HF's transposed linear) or ``"embedding"``; None for a
    module K-FAC does not factor."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and (module.groups == 1 or grouped):
        return "conv2d"
    if is_hf_conv1d(module) and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return "conv1d"
    if isinstance(module, nn.Embedding) and not module.sparse:
        return "embedding"
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` gets a Kronecker block (see :func:`layer_kind`)."""
    return layer_kind(module) is not None


@dataclass
class KronLayer:
    """A supported module and the keys of its weight / bias in a parameter dict (either
    may be None when that parameter is not optimized).

    The block acts on ``M = [W | b]`` of shape ``(d_out, d_in)``: the weight itself for
    Linear, its ``(d_out, C k_h k_w)`` reshape for Conv2d, its transpose for HF Conv1D and
    Embedding (weights stored ``(in, out)``). ``diag_in`` / ``diag_out``: the factor ``A`` /
    ``G`` is kept diagonal (a 1-D tensor): exactly so for an Embedding's ``A`` (one-hot
    inputs), by the size rule (:data:`MAX_FACTOR_DIM`) otherwise."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    kind: str = "linear"
    diag_in: bool = False
    diag_out: bool = False
    approx: str = "expand"
    group: int = 0
    groups: int = 1
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def sums_positions(self) -> bool:
        """Whether its statistics group the positions of a sample (K-FAC reduce; not for an
        Embedding, whose reduce is expand): its rows must be the samples."""
        return self.approx == "reduce" and self.kind != "embedding"

    @property
    def transposed(self) -> bool:
        return self.kind in ("conv1d", "embedding")

    @property
    def d_out(self) -> int:
        w = self.module.weight
        return int(w.shape[1] if self.transposed else w.shape[0] // self.groups)

    @property
    def out_rows(self) -> slice:
        """The output channels of this layer's group (all for an ungrouped layer)."""
        d = self.d_out
        return slice(self.group * d, (self.group + 1) * d)

    @property
    def d_in(self) -> int:
        """Columns of the ``[W | b]`` block restricted to the selected parameters."""
        w = self.module.weight
        n = 0
        if self.weight is not None:
            n = int(w.shape[0]) if self.transposed else int(w[0].numel())
        return n + (1 if self.bias is not None else 0)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.weight, self.bias) if k is not None]

    @property
    def stat_dtype(self) -> torch.dtype:
        """Factors are accumulated in the parameters' dtype, at least float32 (bf16 / fp16
        activations under autocast are promoted)."""
        return torch.promote_types(self.module.weight.dtype, torch.float32)

    def block(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``[W | b]`` (``d_out x d_in``) from weight- and bias-shaped tensors."""
        parts = []
        if self.weight is not None:
            parts.append(weight.T if self.transposed else weight.reshape(weight.shape[0], -1))
        if self.bias is not None:
            parts.append(bias.reshape(-1, 1))
        return torch.cat(parts, dim=1)

    def split(self, M: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Weight- and bias-shaped parts of a ``d_out x d_in`` block."""
        w = b = None
        if self.weight is not None:
            shape = self.module.weight.shape
            cols = self.d_in - (1 if self.bias is not None else 0)
            w = M[:, :cols].T if self.transposed else M[:, :cols].reshape(shape)
        if self.bias is not None:
            b = M[:, -1]
        return w, b

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """This layer's output rows of a batched weight- or bias-shaped ``(k, ...)`` view
        (a grouped convolution's group; all rows otherwise)."""
        return t if self.groups == 1 else t[:, self.out_rows]

    def gather(self, tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[W | b]`` blocks ``(k, d_out, d_in)`` of a batched parameter dict (``(k, ...)``
        entries, e.g. ``Objective.unflatten(V, batched=True)``)."""
        parts = []
        if self.weight is not None:
            w = self._rows(tree[self.weight])
            parts.append(w.transpose(1, 2) if self.transposed else w.flatten(2))
        if self.bias is not None:
            parts.append(self._rows(tree[self.bias]).unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def scatter(self, tree: Mapping[str, torch.Tensor], M: torch.Tensor) -> None:
        """Write ``(k, d_out, d_in)`` blocks into a batched parameter dict of views (the
        inverse of :meth:`gather`)."""
        cols = M.shape[-1] - (self.bias is not None)
        if self.weight is not None:
            w = self._rows(tree[self.weight])
            if self.transposed:
                w.copy_(M[..., :cols].transpose(1, 2))
            else:
                w.copy_(M[..., :cols].reshape(w.shape))
        if self.bias is not None:
            self._rows(tree[self.bias]).copy_(M[..., -1])

    def input_stat(self, a: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """``sum_n omega_n sum_t a_nt a_nt^T`` (its diagonal if ``diag_in``); K-FAC reduce:
        ``sum_n omega_n abar_n abar_n^T`` with ``abar_n = (1/T) sum_t a_nt``."""
        w = omega.to(self.stat_dtype)
        if self.approx == "reduce" and self.kind != "embedding":
            a = a.mean(1, keepdim=True)
        if self.kind == "embedding":  # a holds token ids: A = weighted counts (+ bias: none)
            counts = torch.bincount(a.reshape(-1), weights=w.repeat_interleave(a.shape[1]),
                                    minlength=self.module.num_embeddings)
            pad = self.module.padding_idx  # its row gets no gradient: a zero input, a zero
            if pad is not None:            # Gauss-Newton block (not its token count)
                counts[pad] = 0
            return counts.to(self.stat_dtype)
        if self.diag_in:
            return torch.einsum("n,ntd->d", w, a.square())
        return weighted_input_factor(a, w)

    def output_stat(self, g: torch.Tensor) -> torch.Tensor:
        """``sum_n (1/T) sum_t g_nt g_nt^T`` (its diagonal if ``diag_out``); K-FAC reduce:
        ``sum_n gbar_n gbar_n^T`` with ``gbar_n = sum_t g_nt``."""
        if self.approx == "reduce" and self.kind != "embedding":
            g = g.sum(1, keepdim=True)
        if self.diag_out:
            return g.square().sum((0, 1)) / g.shape[1]
        return grad_factor(g)


def tied_embeddings(model: nn.Module) -> dict[str, str]:
    """Embedding layers whose weight is also the weight of another supported layer (a
    language model's tied input embedding and output head): ``{embedding: other}``."""
    users: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            users.setdefault(id(module.weight), []).append((name, kind))
    out = {}
    for uses in users.values():
        emb = [n for n, k in uses if k == "embedding"]
        rest = [n for n, k in uses if k != "embedding"]
        if len(emb) == 1 and len(rest) == 1:
            out[emb[0]] = rest[0]
    return out


def find_layers(
    model: nn.Module, params: Mapping[str, torch.Tensor], *,
    max_factor_dim: int | None = MAX_FACTOR_DIM, embeddings: bool = True,
    exclude: Iterable[str] = (), approx: str = "expand",
    separate_weight_and_bias: bool = False, grouped: bool = False,
) -> tuple[list[KronLayer], list[str]]:
    """Split ``params`` into supported layers and the keys of all other parameters.

    ``max_factor_dim``: factors of a larger dimension are diagonal (None: never).
    ``approx``: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023) for layers that
    share their weight over positions. ``separate_weight_and_bias``: one block for the
    weight and one for the bias (the bias block's input factor is the scalar ``T``, or 1
    with reduce) instead of one block for ``[W | b]``. ``grouped``: a grouped Conv2d gets one
    block per group (layers ``"<name>.group<j>"``).
    ``embeddings=False`` leaves Embedding layers to the caller's fallback; modules named
    in ``exclude`` are skipped, and so are the layers whose parent applies their weight
    without calling them (:func:`applied_through_weight`): their inputs cannot be
    captured. A parameter used by several supported layers (tied weights) raises
    ValueError (see :func:`tied_embeddings`).
    """
    key_of = {id(p): k for k, p in params.items()}
    layers, covered = [], set()
    exclude = set(exclude) | applied_through_weight(model)
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    for name, module in model.named_modules():
        kind = layer_kind(module, grouped)
        if kind is None or (kind == "embedding" and not embeddings) or name in exclude:
            continue
        wk = key_of.get(id(module.weight))
        bias = getattr(module, "bias", None)
        bk = key_of.get(id(bias)) if bias is not None else None
        if wk is None and bk is None:
            continue
        if (wk is not None and wk in covered) or (bk is not None and bk in covered):
            raise ValueError(f"parameter of layer {name!r} is shared with another layer "
                             "(tied weights); Kronecker factors need one layer per parameter: "
                             "leave the shared parameter out of params= (or untie it)")
        covered.update(k for k in (wk, bk) if k is not None)
        pairs = [(wk, None), (None, bk)] if separate_weight_and_bias and wk and bk \
            else [(wk, bk)]
        groups = module.groups if kind == "conv2d" else 1
        for j in range(groups):
            for w, b in pairs:
                label = name if len(pairs) == 1 else \
                    f"{name}.{'bias' if w is None else 'weight'}"
                label = label if groups == 1 else f"{label}.group{j}"
                layer = KronLayer(label, module, w, b, kind, approx=approx, group=j,
                                  groups=groups)
                big = max_factor_dim if max_factor_dim is not None else math.inf
                layer.diag_in = kind == "embedding" or layer.d_in > big
                layer.diag_out = layer.d_out > big
                layers.append(layer)
    others = [k for k in params if k not in covered]
    return layers, others


def applied_through_weight(model: nn.Module) -> set[str]:
    """Names of the supported layers whose parent module applies their weight itself and
    never calls them, so no forward hook sees their input: the ``out_proj`` of every
    ``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` takes
    ``out_proj.weight``; also inside ``nn.Transformer*`` layers). Other such uses are
    caught at the first pass (:func:`curvature_pass`, ``params=``)."""
    return {f"{name}.out_proj" if name else "out_proj"
            for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)}


def uncovered_by_kfac(model: nn.Module, params: Mapping[str, torch.Tensor]) -> str | None:
    """None if every parameter of ``params`` belongs to exactly one layer with Kronecker
    factors (:func:`find_layers`, grouped convolutions per group), else what is not: the
    uncovered keys, "no supported layer", or the tied-weights error."""
    try:
        layers, others = find_layers(model, params, grouped=True)
    except ValueError as err:  # a parameter shared by two layers (tied weights)
        return str(err)
    if others:
        return f"not covered: {others}"
    return None if layers else "no supported layer"


def layer_inputs(layer: KronLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(N, T, d_in)`` rows ``a_nt`` (unfolded patches for a
    convolution, a trailing one when the bias is selected; ``(N, T)`` token ids for an
    Embedding), in the layer's statistics dtype."""
    m = layer.module
    if layer.kind == "embedding":
        return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    x = x.to(layer.stat_dtype)
    if layer.kind == "conv2d":
        if layer.groups > 1:
            c = x.shape[1] // layer.groups
            x = x[:, layer.group * c:(layer.group + 1) * c]
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or any(m.padding):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        a = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride).transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
    if layer.weight is None:
        a = a[..., :0]
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
    return a


def layer_output_grads(layer: KronLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(N, T, d_out)`` rows ``g_nt`` (statistics dtype)."""
    g = g.to(layer.stat_dtype)
    if layer.kind == "conv2d":
        return g[:, layer.out_rows].flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)


def grad_factor(g: torch.Tensor) -> torch.Tensor:
    """``sum_n (1/T) sum_t g_nt g_nt^T`` for ``g`` of shape ``(N, T, d)``."""
    flat = g.reshape(-1, g.shape[-1])
    return (flat.T @ flat) / g.shape[1]


# ---- factors: dense matrices or diagonals (1-D tensors) -------------------------------
def kron_apply(G: torch.Tensor, M: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``G M A`` for factors stored as matrices or diagonals."""
    left = G @ M if G.dim() == 2 else G.unsqueeze(1) * M
    return left @ A if A.dim() == 2 else left * A


def rotate(M: torch.Tensor, QG: torch.Tensor | None, QA: torch.Tensor | None) -> torch.Tensor:
    """``Q_G^T M Q_A`` (None: the identity basis of a diagonal factor)."""
    M = M if QG is None else QG.T @ M
    return M if QA is None else M @ QA


def unrotate(M: torch.Tensor, QG: torch.Tensor | None, QA: torch.Tensor | None) -> torch.Tensor:
    """``Q_G M Q_A^T``."""
    M = M if QG is None else QG @ M
    return M if QA is None else M @ QA.T


def dense_factor(X: torch.Tensor) -> torch.Tensor:
    return torch.diag(X) if X.dim() == 1 else X


def mean_diag(X: torch.Tensor) -> float:
    return float(X.mean() if X.dim() == 1 else X.diagonal().mean())


def apply_blocks(layers: Sequence[KronLayer], objective: Any, V: torch.Tensor,
                 fn: Callable[[int, KronLayer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``out`` with every layer's ``[W | b]`` blocks replaced by ``fn(i, layer, blocks)``
    (``blocks``: ``(k, d_out, d_in)`` from the ``(k, n)`` vectors ``V``), read and written
    through views of the parameters' slices (no index gather); every coordinate must
    belong to one layer."""
    out = V.new_empty(V.shape)  # contiguous: its parameter slices reshape into views
    src, dst = objective.unflatten(V, batched=True), objective.unflatten(out, batched=True)
    for i, layer in enumerate(layers):
        layer.scatter(dst, fn(i, layer, layer.gather(src)))
    return out


def damped_factor_inverse(X: torch.Tensor, delta: float) -> torch.Tensor:
    """``(X + delta I)^-1`` of a PSD factor (Cholesky in float64, or elementwise for a
    diagonal). Where rounding left ``X`` indefinite by more than ``delta`` (Cholesky
    fails), through its eigenvalues clamped at 0 (:func:`eigen_factor`)."""
    if X.dim() == 1:
        return 1.0 / (X + delta)
    eye = torch.eye(X.shape[0], dtype=torch.float64, device=X.device)
    try:
        L = torch.linalg.cholesky(X.double() + delta * eye)
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        d, Q = eigen_factor(X.double())
        return ((Q / (d + delta)) @ Q.T).to(X.dtype)
    return torch.cholesky_inverse(L).to(X.dtype)


class LayerCapture:
    """Forward hooks recording, per call of each layer, the processed input ``a``
    (``(N, T, d_in)``) and the output tensor, and (``grads=True``) a tensor hook storing
    the output gradient ``g`` of the next backward pass into the same record.

    Nothing is recorded while ``enabled()`` is false or gradients are disabled
    (``torch.no_grad`` evaluation). Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, layers: list[KronLayer], *, grads: bool = False,
                 keep_outputs: bool = False,
                 enabled: Callable[[], bool] | None = None) -> None:
        self.layers = layers
        self.grads = grads
        self.keep_outputs = keep_outputs
        self.enabled = enabled or (lambda: True)
        self._handles = [layer.module.register_forward_hook(self._make_hook(layer))
                         for layer in layers]

    def _make_hook(self, layer: KronLayer) -> Callable[..., None]:
        # not traced by torch.compile (a graph break instead of guards on the caller's
        # state), so a compiled model calls it like an eager one
        @torch.compiler.disable
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not self.enabled():
                return
            record: dict[str, Any] = {"a": layer_inputs(layer, inputs[0].detach())}
            if self.keep_outputs:
                record["out"] = output
            if self.grads and output.requires_grad:
                def store(g: torch.Tensor, record: dict[str, Any] = record) -> None:
                    record["g"] = layer_output_grads(layer, g.detach())
                output.register_hook(store)
            layer.records.append(record)
        return hook

    def clear(self) -> None:
        for layer in self.layers:
            layer.records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ---- the loss: its terms, their weights and their curvature ---------------------------
#
# A batch loss is ``loss_b = s_b sum_t c_t l_t`` over its terms ``t`` (positions of a
# cross-entropy, elements of an element-wise loss, samples of any other loss) with the
# term weights ``c_t`` of :func:`curvlab.losses.term_weights` (0 where ignored, the class
# weight otherwise) and ``s_b = 1 / sum_t c_t`` for ``reduction="mean"`` (1 for "sum"). The
# batch enters the objective with weight ``w_b``, so term ``t`` enters with ``kappa_t = w_b
# s_b c_t``. One rule then serves every fisher type: the cotangents ``u`` backpropagated
# from the output satisfy ``sum_u u u^T = d^2 (w_b loss_b) / dz^2`` per sample (exactly for
# "exact", in expectation for "mc": ``u = sum_t sqrt(kappa_t) s_t`` with ``s_t`` the score of
# term ``t`` at a target sampled from the model, ``E[s_t s_t^T] = d^2 l_t / dz_t^2``).

_MC_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def _is_ce(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss)


def loss_terms(loss_fn: Any, z: torch.Tensor, y: Any) -> torch.Tensor:
    """The term weights ``c_t`` of the batch (ones over the terms of ``z`` when the
    targets are unknown, ``y=None``)."""
    if y is None:
        shape = (z.shape[0], *z.shape[2:]) if _is_ce(loss_fn) else (
            z.shape if is_known_mean_loss(loss_fn) else z.shape[:1])
        return torch.ones(shape, dtype=z.dtype, device=z.device)
    if not isinstance(y, torch.Tensor):
        return torch.ones(z.shape[:1], dtype=z.dtype, device=z.device)
    return term_weights(loss_fn, y).to(device=z.device, dtype=z.dtype)


def curvature_terms(loss_fn: Any, z: torch.Tensor, y: Any) -> torch.Tensor:
    """The weights ``h_t`` of the terms' curvature: :func:`loss_terms` but for cross-entropy
    with class weights and label smoothing (:func:`curvlab.losses.term_curvature_weights`)."""
    if _is_ce(loss_fn) and isinstance(y, torch.Tensor) and not torch.is_floating_point(y):
        return term_curvature_weights(loss_fn, y).to(device=z.device, dtype=z.dtype)
    return loss_terms(loss_fn, z, y)


def sample_weights(c: torch.Tensor, n: int) -> torch.Tensor:
    """``omega_n``: the mean term weight of each of the ``n`` samples a layer sees (terms
    grouped sample-major), the weight of sample ``n`` in the input factor ``A``. Valid
    samples of an unweighted loss get 1, fully ignored ones 0, and a class weight
    ``k`` counts like ``k`` copies of the sample."""
    flat = c.reshape(-1)
    if flat.numel() % n == 0:
        return flat.reshape(n, -1).mean(1)
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        return flat.new_full((n,), float(flat[0]) if flat.numel() else 1.0)
    raise ValueError(f"cannot attribute the {flat.numel()} loss terms to the {n} samples a "
                     "layer sees (ignored targets or class weights need the terms grouped "
                     "sample-major: outputs of shape (samples, ...) or (samples * positions, "
                     "...))")


def sample_scores(loss_fn: Any, z: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of the per-term scores ``s_t = d l_t / dz_t`` (unweighted terms) at a target
    ``y_t`` sampled from the model's predictive distribution, shaped like ``z``, with
    ``E[s_t s_t^T] = d^2 l_t / dz_t^2`` (the Fisher of a canonical-link likelihood equals its
    Hessian):

    * ``CrossEntropyLoss`` (classes along dim 1): ``y_t ~ Categorical(softmax z_t)``,
      ``s_t = softmax(z_t) - onehot(y_t)`` (any label smoothing keeps the Hessian);
    * ``MSELoss``: ``l_t = (z_t - y_t)^2`` is the negative log-likelihood of ``N(z_t, 1/2)``,
      ``s_t = 2 (z_t - y_t) = sqrt(2) eps``, ``eps ~ N(0, 1)``;
    * ``BCEWithLogitsLoss``: ``y_t ~ Bernoulli(sigmoid z_t)``, ``s_t = sigmoid(z_t) - y_t``.
    """
    z = z.detach()
    if _is_ce(loss_fn):
        probs = torch.softmax(z, dim=1)
        flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        idx = torch.multinomial(flat, 1, generator=generator).reshape(-1)
        onehot = F.one_hot(idx, probs.shape[1]).to(z.dtype)
        return probs - onehot.reshape(*probs.movedim(1, -1).shape).movedim(-1, 1)
    if isinstance(loss_fn, nn.MSELoss):
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return math.sqrt(2.0) * noise
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        probs = torch.sigmoid(z)
        u = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return probs - (u < probs).to(z.dtype)
    raise ValueError(
        f"fisher_type='mc' needs to sample targets and knows CrossEntropyLoss, MSELoss and "
        f"BCEWithLogitsLoss, got {type(loss_fn).__name__}; use fisher_type='exact' or "
        "'empirical' for other losses")


def _term_hessian_scale(loss_fn: Any, z: torch.Tensor, y: Any,
                        c: torch.Tensor) -> torch.Tensor:
    """Per output element, the factor ``h`` with ``d^2 (c_t l_t) / dz^2 = h E[s s^T]``:
    ``c_t`` (broadcast over the classes of a cross-entropy; with class weights and label
    smoothing its curvature weight, :func:`curvature_terms`), times BCE's ``weight`` and, with
    ``pos_weight``, ``1 + (pos_weight - 1) y`` (its Hessian depends on the true target)."""
    if _is_ce(loss_fn):
        return curvature_terms(loss_fn, z, y).unsqueeze(1) if y is not None else c.unsqueeze(1)
    h = c
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None:
            h = h * loss_fn.weight.to(z)
        if loss_fn.pos_weight is not None:
            if y is None:
                raise ValueError("fisher_type='mc' with BCEWithLogitsLoss(pos_weight=...) "
                                 "needs the true targets (the curvature depends on them)")
            h = h * (1 + (loss_fn.pos_weight.to(z) - 1) * y.to(z))
    return h.expand(z.shape)


def _with_reduction(loss_fn: Any, reduction: str) -> Any:
    out = copy.copy(loss_fn)
    out.reduction = reduction
    return out


def _per_sample_loss(loss_fn: Any, z: torch.Tensor, y: Any, c: torch.Tensor, weight: float,
                     reduction: str, n: int) -> tuple[Callable[..., torch.Tensor], Any, Any]:
    """``(h, z_g, y_g)`` with ``sum_i h(z_g[i], y_g[i]) = weight * loss_fn(z, y)``: the rows of
    ``z`` grouped into ``n`` samples (sample-major) and each sample's share of the weighted
    batch loss. A loss :func:`curvlab.losses.term_weights` knows is split through its
    ``reduction="none"`` terms; any other is taken to average (or sum) over the rows."""
    rows = z.shape[0]
    if rows % n:
        raise ValueError(f"cannot group the {rows} output rows into the {n} samples the "
                         "layers see; fisher_type='exact' needs outputs of shape (samples, "
                         "...) or (samples * positions, ...)")
    zg = z.reshape(n, rows // n, *z.shape[1:])
    yg = y.reshape(n, rows // n, *y.shape[1:])
    if is_known_mean_loss(loss_fn):
        none = _with_reduction(loss_fn, "none")
        scale = weight / float(c.sum()) if reduction == "mean" else weight

        def h(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return none(zi, yi).sum() * scale
    else:
        scale = weight / rows if reduction == "mean" else weight

        def h(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            per_row = loss_fn(zi, yi).reshape(())
            return per_row * (zi.shape[0] if reduction == "mean" else 1) * scale
    with torch.no_grad():
        whole = float(weight * loss_fn(z, y))
        split = float(torch.func.vmap(h)(zg, yg).sum())
    if not math.isclose(whole, split, rel_tol=1e-5, abs_tol=1e-12 * max(1.0, abs(whole))):
        raise ValueError(f"cannot split {type(loss_fn).__name__} into per-sample terms (sum of "
                         f"the per-sample losses {split} != batch loss {whole}); use "
                         "fisher_type='mc' or 'empirical'")
    return h, zg, yg


def backprop_vectors(loss_fn: Any, z: torch.Tensor, y: Any, fisher_type: str, *,
                     weight: float = 1.0, reduction: str = "mean", samples: int | None = None,
                     mc_samples: int = 1, generator: torch.Generator | None = None
                     ) -> list[torch.Tensor]:
    """Cotangents ``u`` on the model output ``z`` of a batch entering the objective with
    ``weight`` (see the rule above the function), each shaped like ``z``:

    * ``"exact"``: the columns of a square root of each sample's block of ``d^2 (w_b loss_b)
      / dz^2`` (``samples`` groups the rows of ``z``, default one row per sample);
    * ``"mc"``: ``mc_samples`` draws ``u = sum_t sqrt(kappa_t h_t / mc_samples) s_t``
      (:func:`sample_scores`, :func:`_term_hessian_scale`);
    * ``"empirical"``: the gradient ``d (w_b loss_b) / dz`` on the true targets (the caller
      scales its factor by the number of samples for a mean loss, see
      :func:`factor_scale`).

    A batch whose terms all have weight 0 (every target ignored) gives no cotangent.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if not isinstance(z, torch.Tensor):
        raise TypeError("K-FAC needs the model output to be one tensor")
    if fisher_type != "mc" and y is None:
        raise ValueError(f"fisher_type={fisher_type!r} needs the targets")
    z = z.detach()
    c = loss_terms(loss_fn, z, y)
    n_b = float(c.sum())
    if n_b == 0 or weight == 0:
        return []
    if fisher_type == "exact":
        h, zg, yg = _per_sample_loss(loss_fn, z, y, c, weight, reduction,
                                     samples or z.shape[0])
        H = torch.func.vmap(torch.func.hessian(h))(zg, yg)
        m = zg[0].numel()
        H = H.reshape(-1, m, m)
        evals, evecs = eigen_factor(H)
        S = evecs * evals.sqrt().unsqueeze(1)
        return [S[:, :, k].reshape(z.shape) for k in range(m)]
    if fisher_type == "empirical":
        zl = z.requires_grad_(True)
        with torch.enable_grad():
            return [torch.autograd.grad(weight * loss_fn(zl, y), zl)[0]]
    if not isinstance(loss_fn, _MC_LOSSES):
        sample_scores(loss_fn, z)  # raises the explanation
    scale = weight / n_b if reduction == "mean" else weight
    root = (_term_hessian_scale(loss_fn, z, y, c) * (scale / mc_samples)).clamp_min(0).sqrt()
    return [root * sample_scores(loss_fn, z, generator) for _ in range(mc_samples)]


def factor_scale(fisher_type: str, reduction: str, num_samples: float) -> float:
    """The factor ``G`` of the empirical Fisher ``(1/N) sum_n grad l_n grad l_n^T`` (mean
    loss, ``l_n = N x`` sample n's share of the loss) is ``N`` times the one of the
    cotangents ``d L / dz`` of :func:`backprop_vectors`; every other ``G`` is as computed.
    ``N`` is the loss's number of samples (weighted), the same for every layer: with a
    layer's own row count, a sequence-first layer (rows = positions) or a flattened one
    (rows = samples x positions) had its block scaled by rows / samples."""
    return float(num_samples) if fisher_type == "empirical" and reduction == "mean" else 1.0


def curvature_pass(layers: list[KronLayer], forward: Callable[[], torch.Tensor], loss_fn: Any,
                   targets: Any, fisher_type: str, *, weight: float = 1.0,
                   reduction: str = "mean", mc_samples: int = 1,
                   generator: torch.Generator | None = None,
                   params: Mapping[str, torch.Tensor] | None = None,
                   loss_samples: list[float] | None = None, per_sample: bool = False,
                   num_samples: int | None = None
                   ) -> list[list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]]:
    """Run ``forward()`` with the layers hooked, then backpropagate every cotangent of
    :func:`backprop_vectors` to the layer outputs.

    Returns, per layer and per call of the layer in the forward pass, ``(a, omega, [g_u,
    ...])``: the input rows ``(N, T, d_in)``, the sample weights ``(N,)`` of
    :func:`sample_weights` and one ``(N, T, d_out)`` block of output gradients per
    cotangent ``u``. ``params``: the tensors ``forward`` uses as the layers' parameters (by
    key); a layer that was not called although its weight reaches the output raises
    ValueError (:func:`check_uncalled_layers`). ``num_samples``: the batch's samples (the
    first dimension of the model input; default: of the output). ``loss_samples``: a list
    their weight (:func:`sample_weights`) is appended to: the ``N`` of
    :func:`factor_scale`, which a layer's rows need not be (a sequence-first or flattened
    ``(samples * positions, d)`` input). ``per_sample``: every layer's rows must be the
    samples (EKFAC's per-sample gradients), else ValueError; so must the rows of a layer
    with K-FAC reduce (:attr:`KronLayer.sums_positions`).
    """
    with LayerCapture(layers, keep_outputs=True), torch.enable_grad():
        z = forward()
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"K-FAC needs the model output to be one tensor (the input of "
                            f"loss_fn), got {type(z).__name__}")
        if params is not None:
            check_uncalled_layers(layers, z, params)
        calls = [(lay, rec) for lay in layers for rec in lay.records]
        num_samples = batch_samples([rec["a"].shape[0] for _, rec in calls], num_samples,
                                    z.shape[0] if z.dim() else 1)
        check_rows_are_samples([lay.name for lay, rec in calls
                                if (per_sample or lay.sums_positions)
                                and rec["a"].shape[0] != num_samples])
        sizes = {rec["a"].shape[0] for _, rec in calls}
        samples = sizes.pop() if len(sizes) == 1 else None
        if fisher_type == "exact" and samples is None and calls:
            raise ValueError(
                "fisher_type='exact' needs every layer to see the samples along the first "
                f"dimension of its input (first dimensions {sorted(sizes)}"
                "): a sequence-first layout (nn.Transformer* / nn.MultiheadAttention with "
                "batch_first=False) or a flattened (samples * positions, d) input breaks "
                "that. Use batch_first=True, or fisher_type='mc' / 'empirical'")
        us = backprop_vectors(loss_fn, z, targets, fisher_type, weight=weight,
                              reduction=reduction, samples=samples, mc_samples=mc_samples,
                              generator=generator)
        c = curvature_terms(loss_fn, z.detach(), targets)
        if loss_samples is not None:
            loss_samples.append(float(sample_weights(c, num_samples).sum()))
        out = [[(rec["a"], sample_weights(c, rec["a"].shape[0]), []) for rec in lay.records]
               for lay in layers]
        flat = [entry for per_layer in out for entry in per_layer]
        if calls:
            outs = [rec["out"] for _, rec in calls]
            for u in us:
                grads = torch.autograd.grad(z, outs, u, retain_graph=True, allow_unused=True)
                for (lay, rec), g, entry in zip(calls, grads, flat, strict=True):
                    g = torch.zeros_like(rec["out"]) if g is None else g
                    entry[2].append(layer_output_grads(lay, g))
    return out


def batch_samples(rows: list[int], from_input: int | None, from_output: int) -> int:
    """The batch's samples: the model input's first dimension when a layer sees it as its
    rows or the output has it (a broadcast layer, e.g. GPT-2's position embedding with one
    row for the whole batch, still counts the batch), else the output's when a layer sees
    it, else the most common row count (an input whose first tensor is not batched, e.g. a
    mask passed first, is not trusted)."""
    if from_input is not None and (from_input in rows or from_input == from_output):
        return from_input
    if from_output in rows or not rows:
        return from_output
    return max(set(rows), key=rows.count)


def check_rows_are_samples(names: list[str]) -> None:
    """ValueError naming the layers whose input rows are not the samples although their
    statistics group positions by sample: EKFAC's eigenvalue correction (each sample's
    gradient summed over its positions) and K-FAC reduce (each sample's inputs averaged,
    its output gradients summed). With positions as rows (a sequence-first or flattened
    input) they grouped other sums, with no error (reduce: 20-30% off)."""
    if names:
        raise ValueError(
            f"EKFAC's eigenvalue correction and K-FAC reduce need each layer's input rows to "
            f"be the samples (the first dimension of the model input); the layers "
            f"{sorted(set(names))} see another first dimension (a sequence-first layout such "
            "as nn.Transformer's batch_first=False, or a flattened (samples * positions, d) "
            "input). Use batch_first=True, or K-FAC expand without the correction")


def check_uncalled_layers(layers: list[KronLayer], z: torch.Tensor,
                          params: Mapping[str, torch.Tensor]) -> None:
    """ValueError if a layer the forward pass did not call has a weight that reaches the
    output ``z`` (a parent applied it through its weight, as ``nn.MultiheadAttention`` does
    with ``out_proj``): K-FAC would see no input and give the layer zero curvature, although
    its Gauss-Newton block is not zero. A layer that really did not run (an unused head, a
    branch this data does not take) passes. One backward pass, only when a layer was not
    called."""
    idle = [lay for lay in layers if not lay.records and lay.weight is not None
            and lay.weight in params and params[lay.weight].requires_grad]
    if not idle or not z.requires_grad:
        return
    reached = torch.autograd.grad(z.sum(), [params[lay.weight] for lay in idle],
                                  retain_graph=True, allow_unused=True)
    used = [lay.name for lay, g in zip(idle, reached, strict=True) if g is not None]
    if used:
        raise ValueError(uncalled_layers_message(used))


def uncalled_layers_message(names: list[str]) -> str:
    """The error for layers whose weight is used without calling them."""
    return (f"K-FAC: the layers {names} were not called in the forward pass, but their "
            "weights were used (a parent module applied them itself, e.g. "
            "F.linear(x, layer.weight)): their inputs cannot be captured, and Kronecker "
            "factors from none would be zero where the curvature is not. Leave their "
            "parameters out of the factored layers (params=)")


def weighted_input_factor(a: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``sum_n omega_n sum_t a_nt a_nt^T`` for ``a`` of shape ``(N, T, d)``."""
    flat = a.reshape(-1, a.shape[-1])
    w = omega.to(a.dtype).repeat_interleave(a.shape[1])
    return (flat * w.unsqueeze(1)).T @ flat


def eigenbasis_scale(per_layer: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]],
                     QA: torch.Tensor | None, QG: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, float]:
    """EKFAC (George et al. 2018): ``sum_n sum_u (Q_G^T (sum_t g_ntu a_nt^T) Q_A)^2``, the
    diagonal of the layer's curvature block in the Kronecker eigenbasis, from the
    :func:`curvature_pass` entries of one layer (None if there are no cotangents), and the
    total sample weight ``sum_n omega_n``."""
    total, n = None, 0.0
    for a, om, gs in per_layer:
        if not torch.is_floating_point(a):
            raise ValueError("eigenvalue correction of an Embedding layer is not supported")
        ap = a if QA is None else a @ QA
        for g in gs:
            gp = g if QG is None else g @ QG
            if a.shape[1] == 1:  # per-sample gradient g a^T: the squares factorize
                s_u = gp[:, 0].square().T @ ap[:, 0].square()
            else:
                s_u = torch.einsum("ntg,nta->nga", gp, ap).square().sum(0)
            total = s_u if total is None else total + s_u
        n += float(om.sum())
    return total, n


def all_reduce_factors(mats: list[torch.Tensor], group: Any, timings: Any = None) -> None:
    """Sum factors over ``group`` in place: matrices by their upper triangles, diagonals
    as they are."""
    if group is None:
        return
    all_reduce_symmetric([m for m in mats if m.dim() == 2], group, timings)
    diags = [m for m in mats if m.dim() == 1]
    if diags:
        with timings.measure("communication") if timings is not None else \
                contextlib.nullcontext():
            all_reduce_coalesced(diags, group)


def symmetric_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a symmetric matrix or stack of them (the last two dimensions), computed
    in float64 on the symmetrized input and returned in ``M``'s dtype. float32 LAPACK
    fails to converge on some exactly representable inputs (per-sample output Hessians
    of a causal LM with float32 logits: block diagonal, many repeated eigenvalues); if
    float64 ``eigh`` fails too, it retries on ``M + t I`` with a relative jitter ``t`` of
    1e-10, 1e-8, 1e-6 (same eigenvectors; ``t`` is subtracted from the eigenvalues)."""
    M64 = M.double()
    M64 = 0.5 * (M64 + M64.mT)
    scale = float(M64.diagonal(dim1=-2, dim2=-1).abs().max().clamp_min(1e-30)) \
        if M64.numel() else 1.0
    eye = torch.eye(M64.shape[-1], dtype=M64.dtype, device=M64.device)
    last: Exception | None = None
    for jitter in (0.0, 1e-10, 1e-8, 1e-6):
        try:
            evals, evecs = torch.linalg.eigh(M64 + jitter * scale * eye)
            return (evals - jitter * scale).to(M.dtype), evecs.to(M.dtype)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            last = err
    raise torch.linalg.LinAlgError(f"symmetric eigendecomposition failed: {last}")


def eigen_factor(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor
    (:func:`symmetric_eigh`: float64, jitter retries). A diagonal factor (1-D) is its own
    eigendecomposition: ``(M.clamp_min(0), None)``."""
    if M.dim() == 1:
        return M.clamp_min(0), None
    evals, evecs = symmetric_eigh(M)
    return evals.clamp_min(0), evecs


def factored_pi(A: torch.Tensor, G: torch.Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` of Martens & Grosse (2015, sec. 6.3),
    which splits the damping between the two factors; 1 if either trace is 0."""
    ta = mean_diag(A)
    tg = mean_diag(G)
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)
