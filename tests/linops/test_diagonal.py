"""DiagonalOperator against the diagonals of dense float64 ground truth."""

import pytest
import torch
from _linops_truth import MODELS, Truth, as_data, inputs_for, mlp, rel_err, targets_for
from _shared_models import PackedLSTM
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.linops import DiagonalOperator, EmpiricalFisherOperator, GGNOperator

LOSSES = {"ce": nn.CrossEntropyLoss, "mse_sum": lambda: nn.MSELoss(reduction="sum")}
DENSE = {"ggn": Truth.ggn, "hessian": Truth.hessian, "ef": Truth.empirical_fisher}


def _setup(model_name, loss_name):
    model = MODELS[model_name]()
    loss_fn = LOSSES[loss_name]()
    X, y = inputs_for(model_name), targets_for(loss_fn)
    return model, loss_fn, X, y, Truth(model, loss_fn, X, y)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["single", "list", "loader"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("curvature", list(DENSE))
def test_exact_diagonal(model_name, form, loss_name, curvature):
    model, loss_fn, X, y, truth = _setup(model_name, loss_name)
    op = DiagonalOperator(model, loss_fn, as_data(X, y, form), curvature=curvature,
                          chunk_size=5)
    d = torch.diagonal(DENSE[curvature](truth))
    assert rel_err(op.diagonal, d) < 1e-8
    v = torch.randn(truth.n, dtype=torch.float64)
    assert torch.equal(op @ v, op.diagonal * v)
    assert torch.equal(op.to_dense(), torch.diag(op.diagonal))


@pytest.mark.parametrize("curvature", list(DENSE))
def test_hutchinson_is_unbiased(curvature):
    model, loss_fn, X, y, truth = _setup("mlp", "ce")
    d = torch.diagonal(DENSE[curvature](truth))
    data = as_data(X, y, "list")
    est = DiagonalOperator(model, loss_fn, data, curvature=curvature, method="hutchinson",
                           num_samples=300, seed=0).diagonal
    # Var(z_j (A z)_j) = sum_{i != j} A_ij^2; four standard deviations of the mean
    A = DENSE[curvature](truth)
    sd = ((A**2).sum(1) - d**2).clamp_min(0).sqrt() / 300**0.5
    assert bool(((est - d).abs() <= 4 * sd + 1e-12).all())
    first, again = (DiagonalOperator(model, loss_fn, data, curvature=curvature,
                                     method="hutchinson", num_samples=5, seed=0).diagonal
                    for _ in range(2))
    assert torch.equal(first, again)


MC_LOSSES = {
    "ce": (nn.CrossEntropyLoss, "list"),
    "ce_weighted_ignore": (lambda: nn.CrossEntropyLoss(weight=torch.tensor(
        [0.5, 2.0, 1.0], dtype=torch.float64), ignore_index=1), "single"),
    "bce": (nn.BCEWithLogitsLoss, "list"),
    "mse": (nn.MSELoss, "loader"),
    "mse_sum": (lambda: nn.MSELoss(reduction="sum"), "single"),
}


@pytest.mark.parametrize("loss_name", list(MC_LOSSES))
def test_monte_carlo_ggn_diagonal_is_unbiased(loss_name):
    """(J^T u)^2 with u the weighted sampled scores: its mean over draws tends to diag(G)
    (a single draw has relative sd ~ sqrt(2) per coordinate; 4000 draws: ~2%)."""
    make, form = MC_LOSSES[loss_name]
    loss_fn, model = make(), mlp()
    X = inputs_for("mlp")
    y = targets_for(loss_fn)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        y = torch.sigmoid(y)
    d = torch.diagonal(Truth(model, loss_fn, X, y).ggn())
    est = DiagonalOperator(model, loss_fn, as_data(X, y, form), method="mc",
                           num_samples=4000, chunk_size=500, seed=0).diagonal
    assert rel_err(est, d) < 0.08
    again = DiagonalOperator(model, loss_fn, (X, y), method="mc", num_samples=3, seed=0)
    assert torch.equal(again.diagonal, DiagonalOperator(model, loss_fn, (X, y), method="mc",
                                                        num_samples=3, seed=0).diagonal)


def test_monte_carlo_diagonal_errors():
    model, loss_fn, X, y, _ = _setup("mlp", "ce")
    with pytest.raises(ValueError, match="GGN diagonal from sampled targets"):
        DiagonalOperator(model, loss_fn, (X, y), curvature="ef", method="mc")
    yf = torch.randn(X.shape[0], 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Fisher of its sampled targets"):
        DiagonalOperator(model, nn.HuberLoss(), (X, yf), method="mc")
    with pytest.raises(ValueError, match="linear in the model output"):  # its GGN is 0
        DiagonalOperator(model, nn.L1Loss(), (X, yf), method="mc")
    with pytest.raises(ValueError, match="Fisher of its sampled targets"):
        DiagonalOperator(model, nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
                         (X, torch.rand(X.shape[0], 3, dtype=torch.float64)), method="mc")


@settings(max_examples=10, deadline=None)
@given(d_in=st.integers(1, 4), hidden=st.integers(1, 5), d_out=st.integers(1, 4),
       n=st.integers(2, 8), seed=st.integers(0, 1000), use_ce=st.booleans(),
       chunk=st.integers(1, 9))
def test_exact_ggn_diagonal_property(d_in, hidden, d_out, n, seed, use_ce, chunk):
    model = mlp(seed, d_in, hidden, d_out)
    loss_fn = nn.CrossEntropyLoss() if use_ce else nn.MSELoss()
    X = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = targets_for(loss_fn, n, d_out, seed)
    G = Truth(model, loss_fn, X, y).ggn()
    d = DiagonalOperator(model, loss_fn, [(X[:1], y[:1]), (X[1:], y[1:])],
                         chunk_size=chunk).diagonal
    assert float((d - torch.diagonal(G)).norm()) <= 1e-8 * float(G.norm()) + 1e-300


def test_nonconvex_loss_uses_signed_factorization():
    # the output-space Hessian of this loss is indefinite: the exact diagonal must still
    # equal diag(J^T H J), which a plain Cholesky-type factorization could not represent
    model, _, X, _, _ = _setup("mlp", "ce")
    y = torch.randn(12, 3, dtype=torch.float64)

    class Wavy(nn.Module):
        reduction = "mean"

        def forward(self, out, target):
            return (torch.sin(3 * out) * target).sum(1).mean()

    loss_fn = Wavy()
    truth = Truth(model, loss_fn, X, y)
    d = DiagonalOperator(model, loss_fn, as_data(X, y, "list")).diagonal
    assert rel_err(d, torch.diagonal(truth.ggn())) < 1e-8


def test_from_vector_and_float32():
    f32 = torch.float32
    diag = torch.tensor([1.0, 2.0, 3.0], dtype=f32)
    op = DiagonalOperator.from_vector(diag)
    assert op.shape == (3, 3) and op.dtype == f32
    assert torch.equal(op @ torch.ones(3, dtype=f32), diag)
    assert torch.equal(op @ torch.ones(3, 2, dtype=f32), torch.stack([diag, diag], 1))
    assert torch.equal(op.to_dense(), torch.diag(diag))
    op.refresh()
    assert torch.equal(op.diagonal, diag)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.ones(4, dtype=f32)
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="1-D"):
        DiagonalOperator.from_vector(torch.ones(2, 2))
    model = mlp().float()
    loss_fn = nn.CrossEntropyLoss()
    X, y = inputs_for("mlp"), targets_for(loss_fn)
    d32 = DiagonalOperator(model, loss_fn, (X.float(), y)).diagonal
    d64 = torch.diagonal(Truth(mlp(), loss_fn, X, y).ggn())
    assert d32.dtype == torch.float32 and rel_err(d32.double(), d64) < 1e-5


def test_diagonal_errors():
    model, loss_fn, X, y, _ = _setup("mlp", "ce")
    with pytest.raises(ValueError, match="curvature"):
        DiagonalOperator(model, loss_fn, (X, y), curvature="fisher")
    with pytest.raises(ValueError, match="method"):
        DiagonalOperator(model, loss_fn, (X, y), method="approx")
    with pytest.raises(ValueError, match="num_samples"):
        DiagonalOperator(model, loss_fn, (X, y), method="hutchinson", num_samples=0)
    def not_separable(out, y):  # not a mean of per-sample losses
        return nn.functional.cross_entropy(out, y) ** 2

    with pytest.raises(ValueError, match="per-sample"):
        DiagonalOperator(model, not_separable, (X, y))


# ---- models vmap cannot batch over their samples: the exact diagonal loops over them ----
class _TwoLayerGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, num_layers=2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _BilinearPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.act, self.head = nn.Bilinear(3, 3, 4), nn.PReLU(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.mix(x[:, 0], x[:, 1])))


@pytest.mark.parametrize("make", [PackedLSTM, _TwoLayerGRU, _BilinearPReLU])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_diagonal_of_models_vmap_cannot_batch(make, curvature):
    """vmap raises on packed sequences, a 2-layer GRU and F.bilinear's backward (none of
    them a data-dependent branch): the samples then run one at a time, by plain autograd."""
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    for i in range(6):
        X[i, 2 + i % 3:] = 0  # padded tails of lengths 2, 3, 4
    if make is _BilinearPReLU:
        X = X[:, :2] + 0.1
    y = torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    truth = Truth(model, loss_fn, X, y)
    d = DiagonalOperator(model, loss_fn, (X, y), curvature=curvature, chunk_size=4).diagonal
    assert rel_err(d, torch.diagonal(DENSE[curvature](truth))) < 1e-10


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_diagonal_is_checked_where_vmap_batches_wrongly_without_error(curvature):
    """torch 2.13's nested vmap broadcasts nn.PReLU's weight gradient over the samples when
    a chunk's number of samples equals its number of output directions (3 classes, chunks
    of 3) or the directions are one (the empirical Fisher): no error, a wrong diagonal. The
    vmapped rows are checked against plain autograd once per chunk shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.PReLU(3), nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    truth = Truth(model, loss_fn, X, y)
    d = DiagonalOperator(model, loss_fn, (X, y), curvature=curvature, chunk_size=3).diagonal
    assert rel_err(d, torch.diagonal(DENSE[curvature](truth))) < 1e-10


class _BatchCentered(nn.Module):
    """Subtracts the batch mean of its hidden features: a sample's outputs depend on the
    other samples of its batch."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(h - h.mean(0, keepdim=True))


class _PositionMasked(nn.Module):
    """Attention whose key-padding mask depends on a sample's position in the batch (the
    last position of the batch's sample ``masked`` is masked): other samples alone agree
    with the batch, that one does not."""

    def __init__(self, masked, host_read=False):
        super().__init__()
        self.masked, self.host_read = masked, host_read
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        if self.host_read and not bool(torch.isfinite(x).all()):  # vmap cannot batch this
            raise ValueError("non-finite inputs")
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        if x.shape[0] > 1:
            mask[self.masked, -1] = True
        return self.head(self.att(x, x, x, key_padding_mask=mask, need_weights=False)[0][:, 0])


@pytest.mark.parametrize("make", [_BatchCentered, lambda: _PositionMasked(-1),
                                  lambda: _PositionMasked(3), lambda: _PositionMasked(1)],
                         ids=["batch_centered", "last_masked", "middle_masked",
                              "second_masked"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_diagonal_refuses_models_that_mix_the_samples_of_a_batch(make, curvature):
    """The exact diagonal evaluates samples one at a time. For a model that mixes samples
    it returned per-sample Jacobians of another function with no error (an attention
    model whose mask depended on the batch position: 12% off the dense GGN diagonal); now
    a ValueError names the cause. Train-mode dropout (new masks for a sample alone) is
    refused the same way; in eval mode the same model's diagonal is exact."""
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    if isinstance(model, _BatchCentered):
        X = X[:, 0]
    y = torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="mixes the samples"):
        DiagonalOperator(model, loss_fn, (X, y), curvature=curvature, method="exact")
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    dropout = dropout.double()
    Xd = X.reshape(6, -1)[:, :4]
    with pytest.raises(ValueError, match="use train=False"):
        DiagonalOperator(dropout, loss_fn, (Xd, y), curvature=curvature, train=True)
    truth = Truth(dropout.eval(), loss_fn, Xd, y)
    d = DiagonalOperator(dropout, loss_fn, (Xd, y), curvature=curvature).diagonal
    assert rel_err(d, torch.diagonal(DENSE[curvature](truth))) < 1e-10


@pytest.mark.parametrize("host_read", [False, True], ids=["vmap", "one_at_a_time"])
@pytest.mark.parametrize("masked", [1, 62])
def test_exact_diagonal_compares_every_sample_of_a_large_batch(masked, host_read):
    """A batch of 64 whose model mixes only sample 1 (or 62): checking 32 evenly spaced
    samples alone missed both, and the exact GGN diagonal came out 0.6% (0.2%) off the
    dense one with no error. Every sample's own outputs (the primal outputs of its VJPs,
    vmapped or one sample at a time) are now compared with its rows of the batch."""
    torch.manual_seed(0)
    model = _PositionMasked(masked, host_read).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    with pytest.raises(ValueError, match=f"sample {masked} alone gives other outputs"):
        DiagonalOperator(model, nn.CrossEntropyLoss(), (X, y), chunk_size=16)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_diagonal_of_bce_with_float32_targets_on_a_float64_model(curvature):
    """torch's BCE-with-logits of float64 logits and float32 targets is float32 (its
    vmapped per-sample form float64): the separability check compared the two and raised
    "Float did not match Double" (a multi-label Hugging Face classifier in float64 with
    float32 labels). Now compared in float64 at the coarser precision; the 0/1 targets are
    exact in float32, so the diagonal equals the float64 targets' one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    y = (torch.rand(6, 3) > 0.5).float()
    d32 = DiagonalOperator(model, nn.BCEWithLogitsLoss(), (X, y), curvature=curvature).diagonal
    d64 = DiagonalOperator(model, nn.BCEWithLogitsLoss(), (X, y.double()),
                           curvature=curvature).diagonal
    assert rel_err(d32, d64) < 1e-12


class _Flagged(nn.Module):
    """Takes a dict batch with a flag and a 0-d temperature beside the batched inputs (as
    Hugging Face models take ``use_cache=False``)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, temperature, squash=True, note=None):
        h = self.inp(x)
        return self.head(torch.tanh(h) if squash else h) / temperature


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_diagonal_of_a_dict_batch_with_flags_and_scalars(curvature):
    """Flags, None and 0-d tensors in a dict batch are no samples: the exact diagonal
    sliced every leaf ("'bool' object is not subscriptable"); they are passed as they are
    now, in the vmapped and in the one-sample-at-a-time path."""
    torch.manual_seed(0)
    model = _Flagged().double()
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    inputs = {"x": X, "temperature": torch.tensor(1.5, dtype=torch.float64), "squash": True,
              "note": None}
    loss_fn = nn.CrossEntropyLoss()
    G = GGNOperator(model, loss_fn, (inputs, y)) if curvature == "ggn" else \
        EmpiricalFisherOperator(model, loss_fn, (inputs, y))
    want = torch.diagonal(G.to_dense())
    d = DiagonalOperator(model, loss_fn, (inputs, y), curvature=curvature, chunk_size=4)
    assert rel_err(d.diagonal, want) < 1e-12
    d._per_sample_loop = True  # the path of models vmap cannot batch
    d.refresh()
    assert rel_err(d.diagonal, want) < 1e-12
