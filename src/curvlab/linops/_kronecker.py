"""Kronecker-factored curvature statistics of Linear and Conv2d layers (K-FAC / KFC).

One place for the machinery shared by :class:`curvlab.linops.KFACOperator` and the
:class:`curvlab.optim.KFAC` optimizer: finding the supported layers, module hooks that
record layer inputs and output gradients, the two Kronecker factors, and the damped
Kronecker solves.

For a layer ``s = W a`` (weight and bias form one matrix ``[W | b]`` of shape
``(d_out, d_in + 1)``, acting on ``a`` with a trailing one) the curvature block is
approximated as (Martens & Grosse 2015, eq. 1-3; Grosse & Martens 2016 for convolutions)

    F_layer ~= A (x) G,   A = E_n[ sum_t a_nt a_nt^T ],   G = E_n[ (1/T) sum_t g_nt g_nt^T ]

where ``t`` runs over the ``T`` spatial positions of a convolution (unfolded patches,
``T = 1`` for a Linear layer on a flat input; extra leading dimensions of a Linear input
count as positions) and ``g_nt`` is the gradient of the per-sample loss with respect to
the layer's output at position ``t``. In the flat, row-major layout of ``[W | b]`` the
block is the matrix ``G (x) A`` acting as ``M -> G M A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KronLayer",
    "find_layers",
    "is_supported",
    "layer_inputs",
    "layer_output_grads",
    "input_factor",
    "grad_factor",
    "LayerCapture",
    "backprop_vectors",
    "curvature_pass",
    "sample_targets",
    "eigen_factor",
    "factored_pi",
]

FISHER_TYPES = ("mc", "exact", "empirical")


def is_supported(module: nn.Module) -> bool:
    """Linear layers and ungrouped Conv2d layers (any padding mode) get a Kronecker block."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


@dataclass
class KronLayer:
    """A supported module and the keys of its weight / bias in a parameter dict (either
    may be None when that parameter is not optimized)."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def d_out(self) -> int:
        w = self.module.weight
        return int(w.shape[0])

    @property
    def d_in(self) -> int:
        """Columns of the ``[W | b]`` block restricted to the selected parameters."""
        w = self.module.weight
        n = int(w[0].numel()) if self.weight is not None else 0
        return n + (1 if self.bias is not None else 0)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.weight, self.bias) if k is not None]


def find_layers(
    model: nn.Module, params: Mapping[str, torch.Tensor]
) -> tuple[list[KronLayer], list[str]]:
    """Split ``params`` into supported layers and the keys of all other parameters."""
    key_of = {id(p): k for k, p in params.items()}
    layers, covered = [], set()
    for name, module in model.named_modules():
        if not is_supported(module):
            continue
        wk = key_of.get(id(module.weight))
        bk = key_of.get(id(module.bias)) if module.bias is not None else None
        if wk is None and bk is None:
            continue
        if (wk is not None and wk in covered) or (bk is not None and bk in covered):
            raise ValueError(f"parameter of layer {name!r} is shared with another layer; "
                             "Kronecker factors need one layer per parameter")
        covered.update(k for k in (wk, bk) if k is not None)
        layers.append(KronLayer(name, module, wk, bk))
    others = [k for k in params if k not in covered]
    return layers, others


def layer_inputs(layer: KronLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(N, T, d_in)`` rows ``a_nt`` (unfolded patches for a
    convolution, a trailing one when the bias is selected)."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
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
    """Output gradients as ``(N, T, d_out)`` rows ``g_nt``."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)


def input_factor(a: torch.Tensor) -> torch.Tensor:
    """``sum_n sum_t a_nt a_nt^T`` for ``a`` of shape ``(N, T, d)``."""
    flat = a.reshape(-1, a.shape[-1])
    return flat.T @ flat


def grad_factor(g: torch.Tensor) -> torch.Tensor:
    """``sum_n (1/T) sum_t g_nt g_nt^T`` for ``g`` of shape ``(N, T, d)``."""
    flat = g.reshape(-1, g.shape[-1])
    return (flat.T @ flat) / g.shape[1]


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


def sample_targets(loss_fn: Any, z: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution for the loss ``loss_fn``
    (CrossEntropyLoss: categorical; MSELoss: Gaussian whose negative log-likelihood is
    the loss up to a constant; BCEWithLogitsLoss: Bernoulli)."""
    z = z.detach()
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        probs = torch.softmax(z, dim=1)
        flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        idx = torch.multinomial(flat, 1, generator=generator).reshape(-1)
        shape = (z.shape[0], *z.shape[2:])
        return idx.reshape(shape)
    if isinstance(loss_fn, nn.MSELoss):
        # mean reduction: loss_n = ||z_n - y||^2 / m, the NLL of N(z_n, (m/2) I)
        m = z[0].numel() if loss_fn.reduction == "mean" else 1
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return z + math.sqrt(m / 2.0) * noise
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        probs = torch.sigmoid(z)
        u = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return (u < probs).to(z.dtype)
    raise ValueError(
        f"fisher_type='mc' needs to sample targets and knows CrossEntropyLoss, MSELoss and "
        f"BCEWithLogitsLoss, got {type(loss_fn).__name__}; use fisher_type='exact' or "
        "'empirical' for other losses")


def _per_sample_loss_sqrt(loss_fn: Any, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Square roots ``S_n`` with ``S_n S_n^T = d^2 loss_n / dz_n^2`` (``loss_n`` = the loss
    on sample n alone), shape ``(N, m, m)``, from a symmetric eigendecomposition."""
    shape = z.shape[1:]

    def single(zn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        return loss_fn(zn.reshape(1, *shape), yn.unsqueeze(0)).reshape(())

    H = torch.func.vmap(torch.func.hessian(single))(z.detach(), y)
    m = int(math.prod(shape))
    H = H.reshape(-1, m, m)
    H = 0.5 * (H + H.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(H)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)


def backprop_vectors(loss_fn: Any, z: torch.Tensor, y: Any, fisher_type: str, *,
                     reduction: str = "mean", mc_samples: int = 1,
                     generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Cotangents ``u`` on the model output whose backpropagated outer products give G.

    Every returned tensor has ``z``'s shape and holds, per sample, the gradient of the
    per-sample loss (``empirical``: true targets; ``mc``: sampled targets, scaled by
    ``1/sqrt(mc_samples)``) or one column of the per-sample output-Hessian square root
    (``exact``), so ``sum_u J^T u u^T J`` is the per-sample (Fisher / GGN / empirical
    Fisher) curvature of the loss summed over the batch.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if not isinstance(z, torch.Tensor):
        raise TypeError("K-FAC needs the model output to be one tensor")
    if fisher_type == "exact":
        S = _per_sample_loss_sqrt(loss_fn, z, y)
        return [S[:, :, c].reshape(z.shape) for c in range(S.shape[2])]
    n = z.shape[0]
    scale = float(n) if reduction == "mean" else 1.0
    draws = [y] if fisher_type == "empirical" else [
        sample_targets(loss_fn, z, generator) for _ in range(mc_samples)]
    if fisher_type == "mc":
        scale /= math.sqrt(mc_samples)
    zl = z.detach().requires_grad_(True)
    out = []
    with torch.enable_grad():
        for t in draws:
            loss = loss_fn(zl, t)
            out.append(scale * torch.autograd.grad(loss, zl)[0])
    return out


def curvature_pass(layers: list[KronLayer], forward: Callable[[], torch.Tensor], loss_fn: Any,
                   targets: Any, fisher_type: str, *, reduction: str = "mean",
                   mc_samples: int = 1, generator: torch.Generator | None = None
                   ) -> list[list[tuple[torch.Tensor, list[torch.Tensor]]]]:
    """Run ``forward()`` with the layers hooked, then backpropagate every cotangent of
    :func:`backprop_vectors` to the layer outputs.

    Returns, per layer and per call of the layer in the forward pass, ``(a, [g_u, ...])``:
    the input rows ``(N, T, d_in)`` and one ``(N, T, d_out)`` block of per-sample output
    gradients per cotangent ``u``.
    """
    with LayerCapture(layers, keep_outputs=True), torch.enable_grad():
        z = forward()
        us = backprop_vectors(loss_fn, z, targets, fisher_type, reduction=reduction,
                              mc_samples=mc_samples, generator=generator)
        calls = [(lay, rec) for lay in layers for rec in lay.records]
        out = [[(rec["a"], []) for rec in lay.records] for lay in layers]
        flat = [entry for per_layer in out for entry in per_layer]
        if calls:
            outs = [rec["out"] for _, rec in calls]
            for u in us:
                grads = torch.autograd.grad(z, outs, u, retain_graph=True, allow_unused=True)
                for (lay, rec), g, entry in zip(calls, grads, flat, strict=True):
                    g = torch.zeros_like(rec["out"]) if g is None else g
                    entry[1].append(layer_output_grads(lay, g))
    return out


def eigen_factor(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor, computed in
    float64. If ``eigh`` fails to converge, retries with a relative diagonal jitter of
    1e-10, 1e-8, 1e-6 before raising."""
    M64 = M.double()
    M64 = 0.5 * (M64 + M64.T)
    scale = float(M64.diagonal().abs().max().clamp_min(1e-30)) if M64.numel() else 1.0
    eye = torch.eye(M64.shape[0], dtype=M64.dtype, device=M64.device)
    last: Exception | None = None
    for jitter in (0.0, 1e-10, 1e-8, 1e-6):
        try:
            evals, evecs = torch.linalg.eigh(M64 + jitter * scale * eye)
            return evals.clamp_min(0).to(M.dtype), evecs.to(M.dtype)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            last = err
    raise torch.linalg.LinAlgError(f"eigendecomposition of a Kronecker factor failed: {last}")


def factored_pi(A: torch.Tensor, G: torch.Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` of Martens & Grosse (2015, sec. 6.3),
    which splits the damping between the two factors; 1 if either trace is 0."""
    ta = float(A.diagonal().mean())
    tg = float(G.diagonal().mean())
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)
