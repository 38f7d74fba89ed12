"""The generalized Gauss-Newton matrix of the empirical risk as a matrix-free operator."""

from __future__ import annotations

from typing import Any

import torch

from curvlab.autodiff import hvp_fn
from curvlab.linops._outputspace import (
    OutputMatrix,
    OutputSpaceOperator,
    canonical_fisher,
    has_canonical_hessian,
    loss_on_outputs,
)
from curvlab.losses import check_curved_in_outputs

__all__ = ["GGNOperator"]


class GGNOperator(OutputSpaceOperator):
    """``G = sum_b w_b J_b^T H_b J_b`` with ``J_b`` the Jacobian of the model outputs on
    batch ``b``, ``H_b`` the Hessian of ``loss_fn`` with respect to those outputs and
    ``w_b`` the objective's batch weight (Schraudolph 2002, eq. 7; Martens & Sutskever
    2012, "Training deep and recurrent networks with Hessian-free optimization", sec. 6).

    ``G`` drops the second-order terms of the network from the Hessian, so it is positive
    semi-definite whenever the loss is convex in the outputs. Each product costs one JVP,
    one output-space HVP (negligible) and one VJP, with the forward pass recorded once
    (per block of vectors; once overall for a single batch with ``cache_graph=True``). See
    :mod:`curvlab.linops._outputspace` for the measured choices and ``vectorize``.
    Any loss works: ``H_b`` is applied by double backward through ``loss_fn``, or in closed
    form for ``nn.MSELoss`` and ``nn.CrossEntropyLoss`` on class indices (class weights and
    ``ignore_index`` weigh each term), whose Hessian is the output-space Fisher
    (:class:`FisherOperator`).
    """

    def refresh(self) -> None:
        check_curved_in_outputs(self.objective.loss_fn, "Gauss-Newton matrix")
        super().refresh()

    def _output_matrix(self, index: int, weight: float, outputs: torch.Tensor,
                       targets: Any) -> OutputMatrix:
        obj = self.objective
        if has_canonical_hessian(obj, targets):
            return canonical_fisher(obj, weight, outputs, targets)
        product = hvp_fn(lambda o: weight * loss_on_outputs(obj, o, targets), outputs)[2]
        return lambda U: product(U, batched=True)
