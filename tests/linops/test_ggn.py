"""GGN (and Hessian) operators against dense float64 ground truth."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from _linops_truth import MODELS, N, Truth, as_data, inputs_for, mlp, rel_err, targets_for
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.linops import GGNOperator, HessianOperator

LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss,
          "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum")}


def _setup(model_name, loss_name):
    model = MODELS[model_name]()
    loss_fn = LOSSES[loss_name]()
    X, y = inputs_for(model_name), targets_for(loss_fn)
    return model, loss_fn, X, y, Truth(model, loss_fn, X, y)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["single", "list", "loader"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_ggn_matches_dense(model_name, form, loss_name):
    model, loss_fn, X, y, truth = _setup(model_name, loss_name)
    G = truth.ggn()
    op = GGNOperator(model, loss_fn, as_data(X, y, form))
    assert rel_err(op.to_dense(), G) < 1e-8
    g = torch.Generator().manual_seed(0)
    v = torch.randn(truth.n, generator=g, dtype=torch.float64)
    for _ in range(2):  # single vectors: the cached double-backward route, used twice
        assert rel_err(op @ v, G @ v) < 1e-8
    V = torch.randn(truth.n, 3, generator=g, dtype=torch.float64)
    assert rel_err(op @ V, G @ V) < 1e-8
    assert op.num_matvecs == truth.n + 2 + 3


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["single", "list"])
def test_hessian_matches_dense(model_name, form):
    model, loss_fn, X, y, truth = _setup(model_name, "ce")
    op = HessianOperator(model, loss_fn, as_data(X, y, form))
    assert rel_err(op.to_dense(), truth.hessian()) < 1e-8


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("form", ["single", "list"])
def test_block_strategies(vectorize, form):
    model, loss_fn, X, y, truth = _setup("cnn", "mse")
    G = truth.ggn()
    V = torch.randn(truth.n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for cache in (True, False):
        op = GGNOperator(model, loss_fn, as_data(X, y, form), cache_graph=cache,
                         vectorize=vectorize)
        assert rel_err(op @ V, G @ V) < 1e-8
        assert rel_err(op @ V[:, 0], G @ V[:, 0]) < 1e-8


def test_param_subset():
    model, loss_fn, X, y, truth = _setup("mlp", "mse")
    G = truth.ggn()
    # only the last layer: the trailing block of the full GGN
    sub = GGNOperator(model, loss_fn, (X, y), params=["2"])
    k = sub.shape[0]
    assert k == 6 * 3 + 3
    assert rel_err(sub.to_dense(), G[-k:, -k:]) < 1e-8


def test_refresh_follows_new_parameters():
    model, loss_fn, X, y, truth = _setup("mlp", "ce")
    op = GGNOperator(model, loss_fn, (X, y))
    before = op.to_dense()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert torch.equal(op.to_dense(), before)  # a snapshot until refreshed
    op.refresh()
    assert rel_err(op.to_dense(), Truth(model, loss_fn, X, y).ggn()) < 1e-8
    assert rel_err(op.to_dense(), before) > 1e-3


def test_float32():
    model = mlp().float()
    loss_fn = nn.CrossEntropyLoss()
    X, y = inputs_for("mlp").float(), targets_for(loss_fn)
    G = Truth(mlp(), loss_fn, X.double(), y).ggn()
    op = GGNOperator(model, loss_fn, [(X[:6], y[:6]), (X[6:], y[6:])])
    D = op.to_dense()
    assert D.dtype == torch.float32
    assert rel_err(D.double(), G) < 1e-5


def test_to_scipy_eigsh_and_cg():
    model, loss_fn, X, y, truth = _setup("layernorm", "ce")
    G = truth.ggn().numpy()
    A = GGNOperator(model, loss_fn, as_data(X, y, "list")).to_scipy()
    vals = spla.eigsh(A, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(G)[-3:], rtol=1e-8)
    damped = A + 0.1 * spla.aslinearoperator(np.eye(G.shape[0]))
    b = np.random.default_rng(0).standard_normal(G.shape[0])
    x, info = spla.cg(damped, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(G + 0.1 * np.eye(G.shape[0]), b), rtol=1e-7,
                               atol=1e-9)


@settings(max_examples=12, deadline=None)
@given(d_in=st.integers(1, 5), hidden=st.integers(1, 6), d_out=st.integers(1, 4),
       n=st.integers(2, 9), seed=st.integers(0, 1000), use_ce=st.booleans(),
       scale=st.floats(0.1, 5.0), split=st.integers(1, 8), k=st.integers(1, 4))
def test_ggn_property(d_in, hidden, d_out, n, seed, use_ce, scale, split, k):
    model = mlp(seed, d_in, hidden, d_out)
    loss_fn = nn.CrossEntropyLoss() if use_ce else nn.MSELoss()
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = targets_for(loss_fn, n, d_out, seed)
    split = min(split, n - 1)
    data = [(X[:split], y[:split]), (X[split:], y[split:])]
    G = Truth(model, loss_fn, X, y).ggn()
    op = GGNOperator(model, loss_fn, data)
    V = torch.randn(op.shape[0], k, generator=g, dtype=torch.float64)
    tol = 1e-8 * float(G.norm()) * float(V.norm()) + 1e-300
    assert float((op @ V - G @ V).norm()) <= tol
    assert float((op @ V[:, 0] - G @ V[:, 0]).norm()) <= tol


def test_dataloader_over_shuffled_data_gives_the_same_ggn():
    model, loss_fn, X, y, truth = _setup("mlp", "ce")
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    assert rel_err(GGNOperator(model, loss_fn, loader).to_dense(), truth.ggn()) < 1e-8
    assert N % 4 == 0
