"""Bad input to the curvature operators gets a clear ValueError/TypeError from curvlab."""

import pytest
import torch
from _linops_truth import inputs_for, mlp, targets_for
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.linops import (
    DiagonalOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

OPERATORS = [GGNOperator, HessianOperator, EmpiricalFisherOperator, FisherOperator,
             DiagonalOperator]


def _data():
    loss_fn = nn.CrossEntropyLoss()
    return mlp(), loss_fn, (inputs_for("mlp"), targets_for(loss_fn))


@pytest.mark.parametrize("Op", OPERATORS)
def test_bad_vectors(Op):
    model, loss_fn, data = _data()
    op = Op(model, loss_fn, data)
    n = op.shape[0]
    with pytest.raises(ValueError, match="shape"):
        op @ torch.ones(n + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.ones(n - 1, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.ones(n, dtype=torch.float32)
    with pytest.raises(ValueError, match="meta"):
        op @ torch.ones(n, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match="Tensor"):
        op.matvec([1.0] * n)


@pytest.mark.parametrize("Op", OPERATORS)
def test_bad_model_loss_or_data(Op):
    model, loss_fn, (X, y) = _data()
    with pytest.raises(ValueError, match="reduction"):
        Op(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="empty"):
        Op(model, loss_fn, [])
    empty = TensorDataset(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0).long())
    with pytest.raises(ValueError, match="empty"):
        Op(model, loss_fn, DataLoader(empty, batch_size=4))
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        Op(frozen, loss_fn, (X, y))
    partly = mlp()
    partly[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        Op(partly, loss_fn, (X, y), params=[partly[0].weight])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Op(model, "cross_entropy", (X, y))
    with pytest.raises(TypeError, match="Objective or"):
        from curvlab.objective import Objective
        Op(Objective(model, loss_fn, (X, y)), loss_fn, (X, y))


@pytest.mark.parametrize("Op", [GGNOperator, HessianOperator, EmpiricalFisherOperator,
                                DiagonalOperator])
def test_non_scalar_loss(Op):
    model, _, (X, _) = _data()
    y = torch.randn(12, 3, dtype=torch.float64)

    def per_sample_loss(out, target):  # forgot to reduce
        return ((out - target) ** 2).sum(1)

    with pytest.raises(ValueError, match="scalar"):
        op = Op(model, per_sample_loss, (X, y))
        op @ torch.ones(op.shape[0], dtype=torch.float64)
