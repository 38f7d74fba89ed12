"""The model-loss conventions' cross-entropy against torch's, value and derivatives."""

import pytest
import torch
from torch import nn

from curvlab.losses import ClassesLastCrossEntropyLoss

D = torch.float64


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"ignore_index": 2},
                                    {"label_smoothing": 0.1, "ignore_index": 0},
                                    {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=D)}])
def test_classes_last_cross_entropy_is_cross_entropy(kwargs):
    """On (B, C, T) logits (the conventions' layout, a view of (B, T, C)) it is
    nn.CrossEntropyLoss: value, gradient, Hessian-vector product, per-sample under vmap."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=g, dtype=D).movedim(-1, 1)  # (B, C, T), strided
    y = torch.randint(0, 4, (3, 5), generator=g)
    v = torch.randn(3, 4, 5, generator=g, dtype=D)
    ours, ref = ClassesLastCrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs)

    def hvp(loss):
        x = z.detach().requires_grad_(True)
        value = loss(x, y)
        grad, = torch.autograd.grad(value, x, create_graph=True)
        return value, grad, torch.autograd.grad(grad, x, v)[0]

    for a, b in zip(hvp(ours), hvp(ref)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    per_sample = [torch.func.vmap(lambda zi, yi, f=f: f(zi[None], yi[None]))(z, y)
                  for f in (ours, ref)]
    torch.testing.assert_close(*per_sample, rtol=1e-13, atol=1e-15)
    # 2-d input and probability targets are passed through to torch's loss
    if "ignore_index" not in kwargs:  # (torch refuses it with probability targets)
        p = torch.randn(3, 4, 5, generator=g, dtype=D).softmax(dim=1)
        torch.testing.assert_close(ours(z, p), ref(z, p), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours(z[:, :, 0], y[:, 0]), ref(z[:, :, 0], y[:, 0]))
