"""The Hessian of the empirical risk as a matrix-free operator."""

from __future__ import annotations

from typing import Any

import torch

from curvlab.autodiff import hvp_fn
from curvlab.linops.base import CurvatureOperator

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` of the objective, applied by Hessian-vector products.

    Products are double-backward HVPs summed over batches with the objective's batch
    weights. With a single batch the gradient graph is recorded once and reused
    (``cache_graph=True``), so each further product costs one backward pass through it;
    this is what Krylov methods (many products at one point) want. Pass
    ``cache_graph=False`` to trade that speed for memory. Models with fused attention
    kernels (the default SDPA of Hugging Face models, ``nn.MultiheadAttention``) are
    differentiated through the math SDPA backend (:func:`curvlab.autodiff.hvp_fn`,
    :data:`curvlab.autodiff.attention_kernels`).
    """

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, train: bool = False, cache_graph: bool = True) -> None:
        self.cache_graph = cache_graph
        super().__init__(model, loss_fn, data, params, train=train)

    def refresh(self) -> None:
        super().refresh()
        self._product = None

    def _batch_product(self, inputs: Any, targets: torch.Tensor):
        obj = self.objective
        with obj.mode():
            return hvp_fn(lambda p: obj.batch_loss(p, inputs, targets), self.point)[2]

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        obj = self.objective
        if V.shape[0] == 1:  # one vector: no batch dimension to add and strip per tensor
            vt = obj.unflatten(V[0])
            apply = lambda product: obj.flatten(product(vt)).unsqueeze(0)  # noqa: E731
        else:
            Vt = obj.unflatten(V, batched=True)
            apply = lambda product: obj.flatten(product(Vt, batched=True),  # noqa: E731
                                                batched=True)
        single = isinstance(obj.data, list) and len(obj.data) == 1
        if single and self.cache_graph:
            if self._product is None:
                (w, x, y), = obj.batches()
                self._product = (w, self._batch_product(x, y))
            w, product = self._product
            return w * apply(product)
        out = torch.zeros_like(V)
        for w, x, y in obj.batches():
            out += w * apply(self._batch_product(x, y))
        return out
