"""Hessian-vector products of curvlab's operator against central finite differences of the
gradient, through the layers real models are built from (float64).

The dense references elsewhere come from autograd too (``torch.func``), so a wrong
second derivative inside PyTorch would agree with itself there. Finite differences are
independent of it: they caught the fused weight norm, whose double backward is wrong in
torch 2.13 (``curvlab.objective._weight_norm``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlab.linops import HessianOperator

D64 = torch.float64


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.enc(self.emb(x)).mean(dim=1)


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 6, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


def _weight_norm(dim):
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8), dim=dim),
                         nn.Tanh())


def _spectral_norm():
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8))
    return nn.Sequential(layer, nn.Tanh())


# name -> (body producing (n, features), input builder)
CASES = {
    "layer_norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU()), "vec"),
    "rms_norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.SiLU()), "vec"),
    "gelu_tanh": (lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU("tanh")), "vec"),
    "batch_norm_eval": (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()),
                        "vec"),
    "conv_group_norm_pool": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.MaxPool2d(2),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Flatten()), "img"),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2),
                                             nn.Softplus(), nn.Flatten()), "img"),
    "lstm": (lambda: _Recurrent(nn.LSTM), "seq"),
    "gru": (lambda: _Recurrent(nn.GRU), "seq"),
    "transformer_encoder": (_Tokens, "tok"),  # fused attention: curvlab's math fallback
    "weight_norm_dim0": (lambda: _weight_norm(0), "vec"),
    "weight_norm_dim1": (lambda: _weight_norm(1), "vec"),
    "spectral_norm_eval": (_spectral_norm, "vec"),
    # torch's kernel has no double backward: curvlab's composite form (objective.py)
    "embedding_bag_mean": (lambda: nn.Sequential(nn.EmbeddingBag(11, 8, padding_idx=0),
                                                 nn.Tanh()), "tok"),
    "embedding_bag_max": (lambda: nn.Sequential(nn.EmbeddingBag(11, 8, mode="max"),
                                                nn.Tanh()), "tok"),
}


def _inputs(kind, g):
    n = 6
    if kind == "vec":
        return torch.randn(n, 6, generator=g, dtype=D64)
    if kind == "img":
        return torch.randn(n, 2, 4, 4, generator=g, dtype=D64)
    if kind == "seq":
        return torch.randn(n, 5, 4, generator=g, dtype=D64)
    return torch.randint(0, 11, (n, 5), generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_vector_products_equal_finite_differences(name):
    make, kind = CASES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (nested-tensor note of the encoder)
        body = make()
    g = torch.Generator().manual_seed(1)
    X = _inputs(kind, g)
    with torch.no_grad():
        width = body.to(D64).eval()(X).shape[1]
    model = nn.Sequential(body, nn.Linear(width, 3)).to(D64).eval()
    y = torch.randint(0, 3, (X.shape[0],), generator=g)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    obj = op.objective
    theta = obj.flatten(obj.param_tensors())
    v = torch.randn(theta.shape, generator=g, dtype=D64)
    eps = 1e-5
    fd = (obj.flat_grad(obj.unflatten(theta + eps * v))
          - obj.flat_grad(obj.unflatten(theta - eps * v))) / (2 * eps)
    hv = op.matvec(v)
    assert fd.norm() > 1e-3
    assert float((hv - fd).norm() / fd.norm()) < 1e-6
