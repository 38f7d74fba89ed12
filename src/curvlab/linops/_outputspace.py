"""Shared machinery for curvature matrices of the form ``sum_b J_b^T M_b J_b``.

The GGN, the (exact, Monte Carlo and empirical) Fisher all read

    A = sum_b J_b^T M_b J_b,

with ``J_b`` the Jacobian of the model outputs on batch ``b`` with respect to the flat
parameters and ``M_b`` a symmetric matrix in output space (Schraudolph 2002, "Fast
curvature matrix-vector products for second-order gradient descent"; Martens 2020, "New
insights and perspectives on the natural gradient method", sec. 8-9). A product costs one
Jacobian-vector product, one cheap output-space product and one vector-Jacobian product.

How the products are formed was measured (``benchmarks/bench_linops.py``, CPU). The forward
pass is recorded once per batch and shared by every vector of a block (and, for a single
batch, by every later product). ``J v`` is then cheapest by double backward, ``J v =
d/du <J^T u, v>``: one backward pass through the ``J^T u`` graph, itself recorded once
(forward mode would redo the primal forward for every vector; it is used only for a lone
vector on a graph that is not reused). ``J^T u`` is one backward through the forward graph.
For a block of ``k`` vectors, vectorizing (``is_grads_batched``) only pays when a product
is tiny and per-call overhead dominates; on real models (a 784-256-256-10 MLP, a small
CNN, the digits MLP) a loop over the block was as fast or faster (vmapped convolution
backward: 2x slower). So blocks are vectorized when ``batch size * num_params <= 2**20``
and looped otherwise (``vectorize=`` overrides).

This module also holds the per-sample helpers (losses, output gradients and output
Hessians of one sample) used by the empirical Fisher and the exact diagonals.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.func as tf
from torch import nn
from torch.utils._pytree import tree_map

from curvlab.autodiff import attention_kernels, fused_attention_node, one_sample_at_a_time
from curvlab.linops.base import CurvatureOperator
from curvlab.losses import (
    is_known_mean_loss,
    loss_normalizer,
    term_curvature_weights,
    term_weights,
)
from curvlab.objective import Objective

__all__ = ["OutputSpaceOperator", "Linearization", "loss_on_outputs", "sample_weights",
           "loss_term_scale", "canonical_fisher", "has_canonical_hessian",
           "per_sample_output_grads", "per_sample_output_hessians", "per_sample_losses"]

OutputMatrix = Callable[[torch.Tensor], torch.Tensor]


def loss_on_outputs(objective: Objective, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)`` checked to be a scalar tensor."""
    loss = objective.loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; use a loss "
                         "with reduction='mean' or 'sum'")
    return loss.reshape(())


def sample_weights(objective: Objective, weight: float, outputs: torch.Tensor,
                   targets: Any) -> torch.Tensor:
    """``s_i``, the weight of each sample's own loss ``l_i = loss_fn(f_i[None], y_i[None])``
    in the full-data loss, shape ``(B,)``: ``L = sum_b sum_i s_i l_i`` (up to samples whose
    loss is 0/0 because every target of theirs is ignored: those get ``s_i = 0``).

    A mean loss averages sample ``i``'s terms with normalizer ``n_i`` (its valid targets, or
    their class weights; :func:`curvlab.losses.term_weights`), so ``s_i = (w_b / n_b) n_i``;
    a loss whose terms curvlab does not know is taken to average its samples,
    ``s_i = w_b / B``; a summing loss adds them, ``s_i = w_b``.
    """
    batch = outputs.shape[0]
    if objective.reduction == "sum":
        return torch.full((batch,), weight, dtype=outputs.dtype, device=outputs.device)
    if is_known_mean_loss(objective.loss_fn) and isinstance(targets, torch.Tensor):
        per_sample = term_weights(objective.loss_fn, targets).reshape(batch, -1).sum(dim=1)
        per_sample = per_sample.to(device=outputs.device, dtype=outputs.dtype)
        return per_sample * (weight / per_sample.sum())
    return torch.full((batch,), weight / batch, dtype=outputs.dtype, device=outputs.device)


def _is_cross_entropy(objective: Objective) -> bool:
    return isinstance(objective.loss_fn, nn.CrossEntropyLoss)


def loss_term_scale(objective: Objective, weight: float, outputs: torch.Tensor,
                    targets: Any = None) -> torch.Tensor | float:
    """Weight ``c_bt`` of each loss term's curvature in the full-data loss, broadcastable
    against ``outputs``: terms are the positions of ``nn.CrossEntropyLoss`` (classes along
    dim 1; shape ``(B, 1, *d)``, zero at ``ignore_index``, the class weight elsewhere, with
    label smoothing :func:`curvlab.losses.term_curvature_weights`) or the elements of an
    element-wise loss (a number). For a mean loss the batch's terms share ``w_b / n_b = 1 /
    N``."""
    base = weight
    if objective.reduction == "mean":
        if isinstance(targets, torch.Tensor) and is_known_mean_loss(objective.loss_fn):
            base = weight / loss_normalizer(objective.loss_fn, targets)
        else:
            classes = outputs.shape[1] if _is_cross_entropy(objective) else 1
            base = weight / (outputs.numel() // classes)
    if (_is_cross_entropy(objective) and isinstance(targets, torch.Tensor)
            and not torch.is_floating_point(targets)):
        c = term_curvature_weights(objective.loss_fn, targets).to(device=outputs.device,
                                                                   dtype=outputs.dtype)
        return base * c.unsqueeze(1)
    return base


def canonical_fisher(objective: Objective, weight: float, outputs: torch.Tensor,
                     targets: Any = None) -> OutputMatrix:
    """``U -> c Lambda U`` with the output-space Fisher of cross-entropy (``diag(p) -
    p p^T`` per position, ``p = softmax`` over dim 1), of MSE (``2 I``) or of
    ``BCEWithLogitsLoss`` (``diag(sigma(z) (1 - sigma(z)))`` per element) and ``c`` the
    per-term weights of :func:`loss_term_scale` (ignored targets weigh 0, class weights
    scale their term); for these canonical-link losses it is also the loss Hessian
    (Martens 2020, sec. 9.2), class weights and ``ignore_index`` included."""
    scale = loss_term_scale(objective, weight, outputs, targets)
    if isinstance(objective.loss_fn, nn.BCEWithLogitsLoss):
        lam = scale * torch.sigmoid(outputs) * torch.sigmoid(-outputs)
        return lambda U: lam * U
    if _is_cross_entropy(objective):
        p = outputs.softmax(dim=1)
        return lambda U: scale * (p * U - p * (p * U).sum(dim=2, keepdim=True))
    return lambda U: (2.0 * scale) * U


def has_canonical_hessian(objective: Objective, targets: Any) -> bool:
    """Whether :func:`canonical_fisher` is exactly the Hessian of ``loss_fn``: MSE,
    ``BCEWithLogitsLoss`` without ``weight`` / ``pos_weight`` (its Hessian in the logits,
    ``sigma (1 - sigma)``, does not depend on the targets; both weights would make it), or
    cross-entropy on class indices (class weights, ``ignore_index`` and label smoothing
    keep the per-term Hessian ``h_t (diag(p) - p p^T)``,
    :func:`curvlab.losses.term_curvature_weights`)."""
    loss_fn = objective.loss_fn
    if isinstance(loss_fn, nn.MSELoss):
        return True
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return loss_fn.weight is None and loss_fn.pos_weight is None
    return (_is_cross_entropy(objective) and isinstance(targets, torch.Tensor)
            and not torch.is_floating_point(targets))


def _one_sample_loss(objective: Objective) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``l_i(f_i) = loss_fn(f_i[None], y_i[None])``: the loss applied to a batch of one."""
    def loss(out_i: torch.Tensor, target_i: Any) -> torch.Tensor:
        return loss_on_outputs(objective, out_i.unsqueeze(0),
                               tree_map(lambda t: t.unsqueeze(0), target_i))
    return loss


def _over_samples(fn: Callable[[torch.Tensor, Any], torch.Tensor], outputs: torch.Tensor,
                  targets: Any) -> torch.Tensor:
    """``fn`` of every sample's outputs and targets, stacked: vectorized (``vmap``), or one
    sample at a time where vmap cannot batch the loss (torch's weighted, label-smoothed
    cross-entropy selects the valid targets with ``masked_select``)."""
    try:
        return tf.vmap(fn)(outputs, targets)
    except RuntimeError as err:
        one_sample_at_a_time(err, "per-sample loss terms")
    def row(i: int) -> torch.Tensor:
        return fn(outputs[i], tree_map(lambda t: t[i], targets))

    return torch.stack([row(i) for i in range(outputs.shape[0])])


def per_sample_losses(objective: Objective, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """``(l_1, ..., l_B)``, each sample's loss (vectorized over the batch; 0 for a sample
    whose targets are all ignored)."""
    return _zero_empty_samples(
        objective, _over_samples(_one_sample_loss(objective), outputs, targets), targets)


def per_sample_output_grads(objective: Objective, outputs: torch.Tensor,
                            targets: Any) -> torch.Tensor:
    """``d l_i / d f_i`` for every sample, shape ``outputs.shape`` (zero for a sample whose
    loss is 0/0 because all its targets are ignored)."""
    grads = _over_samples(tf.grad(_one_sample_loss(objective)), outputs, targets)
    return _zero_empty_samples(objective, grads, targets)


def _zero_empty_samples(objective: Objective, values: torch.Tensor,
                        targets: Any) -> torch.Tensor:
    """Zero the rows of samples without a loss term (mean cross-entropy / NLL whose targets
    are all ``ignore_index``: their own loss is 0/0 and they weigh 0 in the full loss)."""
    loss_fn = objective.loss_fn
    if (objective.reduction != "mean" or not isinstance(loss_fn, (nn.CrossEntropyLoss,
                                                                   nn.NLLLoss))
            or not isinstance(targets, torch.Tensor) or torch.is_floating_point(targets)):
        return values
    counts = term_weights(loss_fn, targets).reshape(targets.shape[0], -1).sum(dim=1)
    keep = (counts > 0).reshape(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep.to(values.device), values, torch.zeros((), dtype=values.dtype,
                                                                    device=values.device))


def per_sample_output_hessians(objective: Objective, outputs: torch.Tensor,
                               targets: Any) -> torch.Tensor:
    """``d^2 l_i / d f_i^2`` for every sample, shape ``(B, D, D)`` with ``D`` the number
    of outputs per sample (flattened row-major)."""
    hess = _over_samples(tf.hessian(_one_sample_loss(objective)), outputs, targets)
    d = outputs[0].numel()
    hess = hess.reshape(outputs.shape[0], d, d)
    return _zero_empty_samples(objective, hess, targets)


def _as_output_tensor(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise TypeError(f"the model must return one batched tensor of outputs for this "
                        f"curvature, got {type(out).__name__}")
    return out


class Linearization:
    """The model outputs on one batch, recorded once at ``point``, with products by the
    output Jacobian ``J`` (``jvp``) and its transpose (``vjp``) on blocks of vectors
    (a block of ``k > 1`` goes through one vectorized backward, ``is_grads_batched``).

    ``reusable=True`` means more products will follow on this recording. ``vectorize``
    records whether blocks should be vectorized or looped over by the caller (None:
    decide from the problem size, see the module docstring).

    ``J v`` differentiates the model twice (double backward) or needs forward-mode rules,
    which fused attention kernels lack: the outputs are recorded with
    :data:`curvlab.autodiff.attention_kernels`, again under the math kernels right away
    when the graph holds a fused attention kernel, and when a ``J v`` fails for that
    reason (``J^T u`` alone works with any kernel).
    """

    def __init__(self, objective: Objective, point: Mapping[str, torch.Tensor], inputs: Any,
                 *, reusable: bool, vectorize: bool | None = None) -> None:
        self.objective, self.inputs, self.reusable = objective, inputs, reusable
        self.point = dict(point)
        self._record()
        self.value = self.out.detach()
        if vectorize is None:
            vectorize = self.value.shape[0] * objective.num_params <= 2**20
        self.vectorize = vectorize

    def _record(self) -> None:
        while True:  # at most twice: a fused attention kernel in the graph -> math kernels
            self.math = attention_kernels.math
            self.leaves = {k: p.detach().requires_grad_(True) for k, p in self.point.items()}
            with torch.enable_grad(), self.objective.mode(), attention_kernels.context():
                self.out = _as_output_tensor(self.objective.outputs(self.leaves, self.inputs))
            fused = None if self.math else fused_attention_node(self.out)
            if fused is None:
                break
            attention_kernels.learn(fused)
        self._dual: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def _forward_mode(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        obj = self.objective
        with obj.mode(), attention_kernels.context():
            return tf.jvp(lambda p: obj.outputs(p, self.inputs), (self.point,), (v,))[1]

    def _double_backward(self, V: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._dual is None:
            u = torch.zeros_like(self.value, requires_grad=True)
            with torch.enable_grad():
                jt_u = torch.autograd.grad(self.out, list(self.leaves.values()), u,
                                           create_graph=True, allow_unused=True)
            self._dual = (u, {name: g for name, g in zip(self.leaves, jt_u, strict=True)
                              if g is not None and g.requires_grad})
        u, jt_u = self._dual
        k = next(iter(V.values())).shape[0]
        if not jt_u:
            return torch.zeros((k, *self.value.shape), dtype=self.value.dtype,
                               device=self.value.device)
        graph, vs = list(jt_u.values()), [V[name] for name in jt_u]
        if k == 1:
            return torch.autograd.grad(graph, u, [v[0] for v in vs],
                                       retain_graph=True)[0].unsqueeze(0)
        return torch.autograd.grad(graph, u, vs, retain_graph=True, is_grads_batched=True)[0]

    def jvp(self, V: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J v`` for a block of parameter-shaped directions (leading dim ``k``)."""
        while True:  # at most twice: retry() raises once the math kernels failed too
            try:
                return self._jvp(V)
            except (RuntimeError, NotImplementedError) as err:
                if not attention_kernels.retry(err, self.math):
                    raise
            self._record()

    def _jvp(self, V: dict[str, torch.Tensor]) -> torch.Tensor:
        k = next(iter(V.values())).shape[0]
        if k == 1 and not self.reusable:
            try:
                return self._forward_mode({n: t[0] for n, t in V.items()}).unsqueeze(0)
            except (RuntimeError, NotImplementedError) as err:
                if "forward" not in str(err).lower():
                    raise
        return self._double_backward(V)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """``J^T u`` for a block ``U`` of shape ``(k, *outputs.shape)``, as flat rows (k, n)."""
        leaves = list(self.leaves.values())
        k = U.shape[0]

        def flat(grads: tuple, rows: int) -> torch.Tensor:
            return torch.cat([torch.zeros((rows, leaf.numel()), dtype=U.dtype, device=U.device)
                              if g is None else g.reshape(rows, -1)
                              for g, leaf in zip(grads, leaves, strict=True)], dim=1)

        if k == 1:
            return flat(torch.autograd.grad(self.out, leaves, U[0], retain_graph=True,
                                            allow_unused=True), 1)
        return flat(torch.autograd.grad(self.out, leaves, U, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True), k)


class OutputSpaceOperator(CurvatureOperator):
    """Base for ``A = sum_b J_b^T M_b J_b``; subclasses provide ``M_b`` through
    :meth:`_output_matrix`.

    With a single batch the forward graph (and ``M``) is recorded once and reused by every
    product (``cache_graph=True``); several batches are linearized one at a time per
    product, so memory stays that of one batch. ``vectorize`` chooses between one
    vectorized backward per block and a loop over its vectors (default: by problem size).
    """

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, train: bool = False, cache_graph: bool = True,
                 vectorize: bool | None = None) -> None:
        self.cache_graph, self.vectorize = cache_graph, vectorize
        super().__init__(model, loss_fn, data, params, train=train)

    @abstractmethod
    def _output_matrix(self, index: int, weight: float, outputs: torch.Tensor,
                       targets: Any) -> OutputMatrix:
        """``U -> M_b U`` for blocks ``U`` of shape ``(k, *outputs.shape)``, for batch
        number ``index`` with weight ``weight`` in the full-data loss."""

    def refresh(self) -> None:
        super().refresh()
        self._cached: tuple[Linearization, OutputMatrix] | None = None

    @staticmethod
    def _product(lin: Linearization, M: OutputMatrix, Vt: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J^T M J`` on a block: vectorized, or one vector at a time on the shared
        recording (cache-friendlier for large problems)."""
        k = next(iter(Vt.values())).shape[0]
        if k == 1 or lin.vectorize:
            return lin.vjp(M(lin.jvp(Vt)))
        return torch.cat([lin.vjp(M(lin.jvp({n: t[i:i + 1] for n, t in Vt.items()})))
                          for i in range(k)])

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        obj = self.objective
        Vt = obj.unflatten(V, batched=True)
        if self.cache_graph and isinstance(obj.data, list) and len(obj.data) == 1:
            if self._cached is None:
                (w, x, y), = obj.batches()
                lin = Linearization(obj, self.point, x, reusable=True, vectorize=self.vectorize)
                self._cached = (lin, self._output_matrix(0, w, lin.value, y))
            return self._product(*self._cached, Vt)
        out = torch.zeros_like(V)
        for index, (w, x, y) in enumerate(obj.batches()):
            lin = Linearization(obj, self.point, x, reusable=V.shape[0] > 1,
                                vectorize=self.vectorize)
            out += self._product(lin, self._output_matrix(index, w, lin.value, y), Vt)
        return out
