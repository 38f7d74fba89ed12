"""Exact, Monte Carlo and empirical Fisher operators against dense float64 ground truth."""

import pytest
import torch
from _linops_truth import MODELS, Truth, as_data, inputs_for, mlp, rel_err, targets_for
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.linops import EmpiricalFisherOperator, FisherOperator, GGNOperator

LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss,
          "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
          "mse_sum": lambda: nn.MSELoss(reduction="sum")}


def _setup(model_name, loss_name):
    model = MODELS[model_name]()
    loss_fn = LOSSES[loss_name]()
    X, y = inputs_for(model_name), targets_for(loss_fn)
    return model, loss_fn, X, y, Truth(model, loss_fn, X, y)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["single", "list", "loader"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_exact_fisher_is_textbook_fisher_and_ggn(model_name, form, loss_name):
    model, loss_fn, X, y, truth = _setup(model_name, loss_name)
    data = as_data(X, y, form)
    F = FisherOperator(model, loss_fn, data).to_dense()
    assert rel_err(F, truth.fisher()) < 1e-8
    assert rel_err(F, truth.ggn()) < 1e-8
    assert rel_err(F, GGNOperator(model, loss_fn, data).to_dense()) < 1e-12


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["single", "list", "loader"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "ce_sum"])
def test_empirical_fisher_matches_per_sample_gradients(model_name, form, loss_name):
    model, loss_fn, X, y, truth = _setup(model_name, loss_name)
    op = EmpiricalFisherOperator(model, loss_fn, as_data(X, y, form))
    EF = truth.empirical_fisher()
    assert rel_err(op.to_dense(), EF) < 1e-8
    v = torch.randn(truth.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_err(op @ v, EF @ v) < 1e-8


@settings(max_examples=10, deadline=None)
@given(d_in=st.integers(1, 4), hidden=st.integers(1, 5), d_out=st.integers(2, 4),
       n=st.integers(2, 8), seed=st.integers(0, 1000), use_ce=st.booleans(),
       split=st.integers(1, 7))
def test_fisher_and_empirical_fisher_property(d_in, hidden, d_out, n, seed, use_ce, split):
    model = mlp(seed, d_in, hidden, d_out)
    loss_fn = nn.CrossEntropyLoss() if use_ce else nn.MSELoss()
    X = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = targets_for(loss_fn, n, d_out, seed)
    split = min(split, n - 1)
    data = [(X[:split], y[:split]), (X[split:], y[split:])]
    truth = Truth(model, loss_fn, X, y)
    F, EF = truth.fisher(), truth.empirical_fisher()
    assert float((FisherOperator(model, loss_fn, data).to_dense() - F).norm()) <= 1e-8 * (
        float(F.norm()) + 1e-300)
    assert float((EmpiricalFisherOperator(model, loss_fn, data).to_dense() - EF).norm()) <= (
        1e-8 * (float(EF.norm()) + 1e-300))


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mc_fisher_single_draw_is_fixed_symmetric_psd(loss_name):
    model, loss_fn, X, y, truth = _setup("mlp", loss_name)
    op = FisherOperator(model, loss_fn, as_data(X, y, "list"), mode="mc", seed=3)
    D = op.to_dense()
    assert float((D - D.T).norm()) <= 1e-13 * float(D.norm())
    evals = torch.linalg.eigvalsh(D)
    assert float(evals.min()) >= -1e-12 * float(evals.max())
    # one draw per sample: rank at most the number of samples
    assert int((evals > 1e-10 * float(evals.max())).sum()) <= X.shape[0]
    v = torch.randn(truth.n, dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)
    assert torch.equal(op.to_dense(), D)
    # same seed and same batches (as a list or a DataLoader) -> the same draw
    loader = as_data(X, y, "loader")
    a = FisherOperator(model, loss_fn, loader, mode="mc", seed=3).to_dense()
    b = FisherOperator(model, loss_fn, list(loader), mode="mc", seed=3).to_dense()
    assert rel_err(a, b) < 1e-12
    op.refresh()
    assert rel_err(op.to_dense(), D) > 1e-3  # a new draw


@pytest.mark.parametrize("loss_name", ["ce", "mse", "mse_sum"])
def test_mc_fisher_converges_to_exact_fisher(loss_name):
    model, loss_fn, X, y, truth = _setup("mlp", loss_name)
    F = truth.fisher()
    data = as_data(X, y, "list")
    # spread of one draw, then the mean over many refreshed draws and a many-sample draw
    op = FisherOperator(model, loss_fn, data, mode="mc", generator=torch.Generator().manual_seed(0))
    draws = 100
    total, sq = torch.zeros_like(F), 0.0
    for _ in range(draws):
        D = op.to_dense()
        total += D
        sq += float((D - F).norm()) ** 2
        op.refresh()
    sigma = (sq / draws) ** 0.5  # RMS deviation of a single draw
    # E||mean_K - F||^2 = sigma^2 / K; 4 standard deviations is never hit by chance here
    assert float((total / draws - F).norm()) <= 4 * sigma / draws**0.5
    many = FisherOperator(model, loss_fn, data, mode="mc", num_samples=4000, seed=1).to_dense()
    assert float((many - F).norm()) <= 4 * sigma / 4000**0.5
    assert sigma > 0.1 * float(F.norm())  # the test above is not trivially loose


def test_fisher_errors():
    model, loss_fn, X, y, _ = _setup("mlp", "ce")
    with pytest.raises(TypeError, match="nn.MSELoss and nn.BCEWithLogitsLoss"):
        FisherOperator(model, nn.L1Loss(), (X, torch.randn(12, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="mode"):
        FisherOperator(model, loss_fn, (X, y), mode="sampled")
    with pytest.raises(ValueError, match="num_samples"):
        FisherOperator(model, loss_fn, (X, y), mode="mc", num_samples=0)
    with pytest.raises(ValueError, match="class weights"):
        FisherOperator(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)),
                       (X, y))
    with pytest.raises(ValueError, match="shuffle=False"):
        FisherOperator(model, loss_fn, DataLoader(TensorDataset(X, y), batch_size=4,
                                                  shuffle=True), mode="mc")
    with pytest.raises(TypeError, match="seed or generator"):
        FisherOperator(model, loss_fn, (X, y), mode="mc", seed=0, generator=torch.Generator())


def _seq_and_scalar_problems():
    """Cross-entropy on (B, C, L) outputs (C classes at L positions) and MSE on (B,)."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh()).double()
    Xs = torch.randn(7, 2, 5, dtype=torch.float64)
    ys = torch.randint(0, 3, (7, 5))
    scalar = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).double()
    Xr = torch.randn(7, 4, dtype=torch.float64)
    yr = torch.randn(7, dtype=torch.float64)
    return [(seq, nn.CrossEntropyLoss(), Xs, ys), (scalar, nn.MSELoss(), Xr, yr),
            (seq, nn.CrossEntropyLoss(reduction="sum"), Xs, ys)]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_fisher_on_positions_and_scalar_outputs(case):
    model, loss_fn, X, y = _seq_and_scalar_problems()[case]
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    G = Truth(model, loss_fn, X, y).ggn()
    assert rel_err(FisherOperator(model, loss_fn, data).to_dense(), G) < 1e-8
    assert rel_err(GGNOperator(model, loss_fn, data).to_dense(), G) < 1e-8
    op = FisherOperator(model, loss_fn, data, mode="mc", generator=torch.Generator().manual_seed(0))
    draws, total, sq = 100, torch.zeros_like(G), 0.0
    for _ in range(draws):
        D = op.to_dense()
        total += D
        sq += float((D - G).norm()) ** 2
        op.refresh()
    assert float((total / draws - G).norm()) <= 4 * (sq / draws) ** 0.5 / draws**0.5


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(label_smoothing=0.2),
                                     nn.CrossEntropyLoss(weight=torch.tensor(
                                         [0.5, 1.0, 2.0], dtype=torch.float64))])
def test_ggn_label_smoothing_and_class_weights(loss_fn):
    # one batch: a class-weighted mean is normalized per batch, so several batches are a
    # different objective than the concatenated data (the Objective weights batches by size)
    model, _, X, y, _ = _setup("mlp", "ce")
    truth = Truth(model, loss_fn, X, y)
    assert rel_err(GGNOperator(model, loss_fn, (X, y)).to_dense(), truth.ggn()) < 1e-8


def test_ggn_soft_targets_and_custom_loss():
    model, _, X, _, _ = _setup("mlp", "ce")
    soft = torch.rand(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    truth = Truth(model, ce, X, soft)
    assert rel_err(GGNOperator(model, ce, as_data(X, soft, "list")).to_dense(),
                   truth.ggn()) < 1e-8

    def wavy(out, target):  # a loss with an indefinite output-space Hessian
        return (torch.sin(3 * out) * target).sum(1).mean()

    wavy.reduction = "mean"
    truth = Truth(model, wavy, X, soft)
    G = GGNOperator(model, wavy, as_data(X, soft, "list")).to_dense()
    assert rel_err(G, truth.ggn()) < 1e-8
    assert float(torch.linalg.eigvalsh(G).min()) < 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_fisher_exact_and_mc(reduction):
    """BCEWithLogitsLoss: Bernoulli likelihood per element; the exact Fisher is
    J^T diag(sigma (1 - sigma)) J (scaled as the loss) = the GGN, MC draws average to it."""
    model = mlp()
    X = inputs_for("mlp")
    y = torch.randint(0, 2, (X.shape[0], 3), generator=torch.Generator().manual_seed(0))
    y = y.to(torch.float64)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    truth = Truth(model, loss_fn, X, y)
    out = truth.outputs(truth.theta).detach()
    lam = (torch.sigmoid(out) * (1 - torch.sigmoid(out))).reshape(-1)
    lam = lam / (out.numel() if reduction == "mean" else 1)
    J = truth.jacobian()
    F = J.T @ torch.diag(lam) @ J
    data = as_data(X, y, "list")
    assert rel_err(FisherOperator(model, loss_fn, data).to_dense(), F) < 1e-10
    assert rel_err(truth.ggn(), F) < 1e-10
    op = FisherOperator(model, loss_fn, data, mode="mc",
                        generator=torch.Generator().manual_seed(0))
    draws, total, sq = 60, torch.zeros_like(F), 0.0
    for _ in range(draws):
        D = op.to_dense()
        total += D
        sq += float((D - F).norm()) ** 2
        op.refresh()
    sigma = (sq / draws) ** 0.5
    assert float((total / draws - F).norm()) <= 4 * sigma / draws**0.5
    assert sigma > 0.1 * float(F.norm())
    with pytest.raises(ValueError, match="pos_weight"):
        FisherOperator(model, nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), data)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_bce_closed_form_output_hessian(reduction, monkeypatch):
    """GGN of BCEWithLogitsLoss (no weights): the output Hessian sigma (1 - sigma) is
    applied in closed form (no double backward through the loss), and equals the truth;
    with pos_weight (target-dependent Hessian) the double-backward path stays."""
    import curvlab.linops.ggn as ggn_mod

    model = mlp()
    X = inputs_for("mlp")
    y = torch.rand((X.shape[0], 3), generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    truth = Truth(model, loss_fn, X, y)
    calls = []
    real = ggn_mod.hvp_fn
    monkeypatch.setattr(ggn_mod, "hvp_fn", lambda *a, **k: calls.append(1) or real(*a, **k))
    G = GGNOperator(model, loss_fn, as_data(X, y, "list")).to_dense()
    assert rel_err(G, truth.ggn()) < 1e-10
    assert calls == []
    weighted = nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=torch.full((3,), 2.0,
                                                                                dtype=torch.float64))
    Gw = GGNOperator(model, weighted, as_data(X, y, "list")).to_dense()
    assert rel_err(Gw, Truth(model, weighted, X, y).ggn()) < 1e-10
    assert calls
