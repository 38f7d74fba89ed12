"""Property-based check of every exact curvature operator against dense float64 truth.

Hypothesis varies the loss (cross-entropy with and without ignore_index, label smoothing or
class weights; MSE; BCE with logits), the reduction, the output layout (``(B, C)`` or a
sequence model's ``(B, C, T)``) and how the samples are split into batches. The truth is
written out with torch.autograd on the concatenated data, never through curvlab:

* Hessian of the full-data loss;
* GGN ``J^T (d^2 loss / d f^2) J``;
* Fisher (for the likelihood losses: CE without class weights, MSE, BCE) = GGN;
* empirical Fisher ``sum_i s_i g_i g_i^T``, ``g_i`` the gradient of sample ``i``'s own loss
  and ``s_i = n_i / N`` its share of the loss terms (1 for a summing loss);
* the exact diagonals of the Hessian, GGN and empirical Fisher.
"""

import torch
from _linops_truth import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from curvlab.linops import (
    DiagonalOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from curvlab.objective import Objective

B, C, T = 6, 3, 2
LOSSES = ["ce", "ce_ignore", "ce_smooth", "ce_weight", "mse", "bce"]


class Net(nn.Module):
    def __init__(self, seq: bool):
        super().__init__()
        self.seq = seq
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C * (T if seq else 1)))

    def forward(self, x):
        out = self.body(x)
        return out.reshape(-1, C, T) if self.seq else out


def _problem(kind: str, reduction: str, seq: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net(seq).double()
    X = torch.randn(B, 3, generator=g, dtype=torch.float64)
    shape = (B, T) if seq else (B,)
    if kind.startswith("ce"):
        y = torch.randint(0, C, shape, generator=g)
        kw = {}
        if kind == "ce_ignore":
            y[torch.rand(shape, generator=g) < 0.4] = -100
            y.reshape(-1)[0] = 1  # at least one valid target
        if kind == "ce_smooth":
            kw["label_smoothing"] = 0.2
        if kind == "ce_weight":
            kw["weight"] = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction, **kw)
    elif kind == "mse":
        y = torch.randn((B, C, T) if seq else (B, C), generator=g, dtype=torch.float64)
        loss_fn = nn.MSELoss(reduction=reduction)
    else:
        y = torch.rand((B, C, T) if seq else (B, C), generator=g, dtype=torch.float64).round()
        loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    return model, loss_fn, X, y


def _sample_terms(loss_fn, y_i):
    """The normalizer of one sample's mean loss, written out (torch's definitions)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        valid = y_i != loss_fn.ignore_index
        w = loss_fn.weight
        return float((w[y_i.clamp_min(0)] * valid).sum()) if w is not None else float(valid.sum())
    return float(y_i.numel())


def _truth(model, loss_fn, X, y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = t[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(t, x=X):
        return functional_call(model, unflat(t), (x,))

    H = torch.autograd.functional.hessian(lambda t: loss_fn(outputs(t), y), theta)
    f = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(f.numel(), -1)
    Hf = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), f).reshape(f.numel(), -1)
    G = J.T @ Hf @ J
    n = [_sample_terms(loss_fn, y[i]) for i in range(B)]
    total = sum(n)
    EF = torch.zeros_like(G)
    for i in range(B):
        if n[i] == 0:
            continue
        t = theta.clone().requires_grad_(True)
        gi = torch.autograd.grad(loss_fn(outputs(t, X[i:i + 1]), y[i:i + 1]), t)[0]
        s = n[i] / total if loss_fn.reduction == "mean" else 1.0
        EF += s * torch.outer(gi, gi)
    return H, G, EF


def _split(X, y, parts):
    cuts = torch.linspace(0, B, parts + 1).round().long().tolist()
    return [(X[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(LOSSES), reduction=st.sampled_from(["mean", "sum"]),
       seq=st.booleans(), parts=st.integers(1, 3), seed=st.integers(0, 50))
def test_exact_operators_equal_dense_truth(kind, reduction, seq, parts, seed):
    model, loss_fn, X, y = _problem(kind, reduction, seq, seed)
    H, G, EF = _truth(model, loss_fn, X, y)
    obj = Objective(model, loss_fn, _split(X, y, parts))
    torch.testing.assert_close(obj.loss(), loss_fn(model(X), y).detach(), rtol=1e-12, atol=0)
    assert rel_err(HessianOperator(obj).to_dense(), H) < 1e-10
    assert rel_err(GGNOperator(obj).to_dense(), G) < 1e-10
    assert rel_err(EmpiricalFisherOperator(obj).to_dense(), EF) < 1e-10
    if kind != "ce_weight":  # a class-weighted cross-entropy is not a likelihood
        assert rel_err(FisherOperator(obj).to_dense(), G) < 1e-10
    for curvature, dense in (("hessian", H), ("ggn", G), ("ef", EF)):
        diag = DiagonalOperator(obj, curvature=curvature, method="exact").diagonal
        assert rel_err(diag, dense.diagonal()) < 1e-10, curvature
