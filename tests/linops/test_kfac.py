"""KFACOperator against dense float64 references."""

import pytest
import torch
import torch.nn.functional as F
from _shared_models import AppliedThroughWeight, Layout
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlab import Objective
from curvlab.linops import EKFACOperator, GGNOperator, KFACOperator
from curvlab.linops._kronecker import damped_factor_inverse

D64 = torch.float64


def dense_ggn(model, loss_fn, X, y):
    """J^T H J over the flat parameter vector (objective layout), from torch.func."""
    obj = Objective(model, loss_fn, (X, y))
    theta = obj.flatten(obj.param_tensors())

    def outputs(t):
        return functional_call(model, obj.unflatten(t), (X,))

    J = jacrev(outputs)(theta).reshape(-1, theta.numel())
    z = outputs(theta).detach()
    H = hessian(lambda z_: loss_fn(z_, y))(z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


def dense_ef(model, loss_fn, X, y, reduction="mean"):
    """Empirical Fisher c/N sum_n grad l_n grad l_n^T."""
    obj = Objective(model, loss_fn, (X, y))
    rows = []
    for n in range(X.shape[0]):
        o = Objective(model, loss_fn, (X[n:n + 1], y[n:n + 1]))
        rows.append(o.flat_grad())
    Gm = torch.stack(rows)
    c = 1.0 if reduction == "mean" else float(X.shape[0])
    del obj
    return c * Gm.T @ Gm / X.shape[0]


def test_single_linear_mse_equals_ggn():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D64)
    X, y = torch.randn(7, 4, dtype=D64), torch.randn(7, 3, dtype=D64)
    ref = dense_ggn(model, nn.MSELoss(), X, y)
    for kind in ("exact",):
        op = KFACOperator(model, nn.MSELoss(), (X, y), fisher_type=kind)
        torch.testing.assert_close(op.to_dense(), ref, atol=1e-8, rtol=0)
    # sum reduction: same identity
    ref_s = dense_ggn(model, nn.MSELoss(reduction="sum"), X, y)
    op = KFACOperator(model, nn.MSELoss(reduction="sum"), (X, y), fisher_type="exact")
    torch.testing.assert_close(op.to_dense(), ref_s, atol=1e-8, rtol=0)


def test_mse_matvec_matches_dense_and_damping():
    torch.manual_seed(1)
    model = nn.Linear(5, 2).to(D64)
    X, y = torch.randn(9, 5, dtype=D64), torch.randn(9, 2, dtype=D64)
    op = KFACOperator(model, nn.MSELoss(), (X, y), fisher_type="exact", damping=0.3)
    ref = dense_ggn(model, nn.MSELoss(), X, y) + 0.3 * torch.eye(12, dtype=D64)
    v = torch.randn(12, dtype=D64)
    torch.testing.assert_close(op.matvec(v), ref @ v, atol=1e-8, rtol=0)
    torch.testing.assert_close(op.to_dense(), ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("loss_fn, make_y", [
    (nn.CrossEntropyLoss(), lambda: torch.tensor([2])),
    (nn.MSELoss(), lambda: torch.randn(1, 3, dtype=D64)),
])
def test_single_sample_equals_exact_fisher(loss_fn, make_y):
    torch.manual_seed(2)
    model = nn.Linear(4, 3).to(D64)
    X, y = torch.randn(1, 4, dtype=D64), make_y()
    op = KFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    torch.testing.assert_close(op.to_dense(), dense_ggn(model, loss_fn, X, y), atol=1e-8,
                               rtol=0)
    ef = KFACOperator(model, loss_fn, (X, y), fisher_type="empirical")
    torch.testing.assert_close(ef.to_dense(), dense_ef(model, loss_fn, X, y), atol=1e-8,
                               rtol=0)


def test_single_sample_mlp_blocks_equal_fisher_blocks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(D64)
    X, y = torch.randn(1, 3, dtype=D64), torch.tensor([1])
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    D, ref = op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    for sl in (slice(0, 20), slice(20, 44)):  # [W1 b1], [W2 b2]
        torch.testing.assert_close(D[sl, sl], ref[sl, sl], atol=1e-8, rtol=0)
    assert D[0:20, 20:].abs().max() == 0


def test_inverse_matches_dense_inverse():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D64)
    X, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 3, (6,))
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="mc")
    lam = 1e-2
    n = op.shape[0]
    ref = torch.linalg.inv(op.to_dense() + lam * torch.eye(n, dtype=D64))
    inv = op.inverse(lam)
    torch.testing.assert_close(inv.to_dense(), ref, atol=1e-8, rtol=1e-8)
    v = torch.randn(n, dtype=D64)
    torch.testing.assert_close(inv.matvec(v), ref @ v, atol=1e-8, rtol=1e-8)
    # factored Tikhonov damping: (A + pi sqrt(l)) kron (G + sqrt(l)/pi) per block
    fac = op.inverse(lam, method="factored").to_dense()
    dense = torch.zeros(n, n, dtype=D64)
    for layer, idx in zip(op.layers, op._index, strict=True):  # [W|b] -> flat
        A, G = op.factors[layer.name]
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        r = lam ** 0.5
        block = torch.kron(G + r / pi * torch.eye(G.shape[0], dtype=D64),
                           A + pi * r * torch.eye(A.shape[0], dtype=D64))
        flat = idx.reshape(-1)
        dense[flat.unsqueeze(1), flat.unsqueeze(0)] = block
    torch.testing.assert_close(fac, torch.linalg.inv(dense), atol=1e-8, rtol=1e-8)


class _UnusedHead(nn.Module):
    """An MLP with a layer the forward never calls (an unused head, as in many HF models)."""

    def __init__(self, unused: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.head = nn.Linear(4, 2) if unused else None

    def forward(self, x):
        return self.body(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("op_cls", [KFACOperator, EKFACOperator])
def test_a_layer_applied_through_its_weight_is_refused_not_zeroed(op_cls):
    """Its Gauss-Newton block is not zero, but no hook sees its input: it used to get zero
    Kronecker factors with a warning that it 'did not run'. A ValueError names it now, and
    nn.MultiheadAttention's out_proj (applied by F.multi_head_attention_forward) is not
    among the factored layers."""
    X, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 3, (6,))
    model = AppliedThroughWeight().to(D64)
    with pytest.raises(ValueError, match=r"\['proj'\] were not called"):
        op_cls(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    op = op_cls(model, nn.CrossEntropyLoss(), (X, y), params=["inner.weight", "inner.bias"],
                fisher_type="exact")
    assert op.shape[0] == 16
    attn = _Attention().to(D64)
    Xs, ys = torch.randn(4, 5, 8, dtype=D64), torch.randint(0, 3, (4,))
    op = op_cls(attn, nn.CrossEntropyLoss(), (Xs, ys))  # (no 'did not run' warning)
    assert not any("out_proj" in name for name in op.factors)
    assert "enc.linear1" in op.factors and "head" in op.factors
    with pytest.raises(ValueError, match="out_proj"):
        op_cls(attn, nn.CrossEntropyLoss(), (Xs, ys),
               params=["enc.self_attn.out_proj.weight", "head.weight"])


@pytest.mark.parametrize("op_cls", [KFACOperator, EKFACOperator])
def test_a_layer_that_never_runs_has_a_zero_block(op_cls):
    """Its exact Gauss-Newton block is zero, so is its K-FAC block (a warning names it);
    the other blocks, products and damped inverses are those of the model without it."""
    X, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 3, (6,))
    torch.manual_seed(5)
    with_head = _UnusedHead(True).to(D64)
    torch.manual_seed(5)
    without = _UnusedHead(False).to(D64)
    with pytest.warns(UserWarning, match=r"\['head'\] did not run"):
        op = op_cls(with_head, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    ref = op_cls(without, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    n, m = ref.shape[0], op.shape[0]
    D = op.to_dense()
    torch.testing.assert_close(D[:n, :n], ref.to_dense(), atol=1e-12, rtol=0)
    assert D[n:].abs().max() == 0 and D[:, n:].abs().max() == 0
    assert m == n + 10  # the head's [W b]
    lam = 1e-2
    for method in ("exact", "factored") if op_cls is KFACOperator else ("exact",):
        inv = op.inverse(lam, method=method).to_dense()
        assert torch.isfinite(inv).all()
        torch.testing.assert_close(inv[:n, :n], ref.inverse(lam, method=method).to_dense(),
                                   atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(inv[n:, n:], torch.eye(m - n, dtype=D64) / lam,
                                   atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="no loss terms"):  # all ignored: still an error
        KFACOperator(with_head, nn.CrossEntropyLoss(ignore_index=-100),
                     (X, torch.full_like(y, -100)), fisher_type="exact")


def test_inverse_of_singular_factors_needs_damping():
    model = nn.Linear(4, 2).to(D64)
    X, y = torch.randn(1, 4, dtype=D64), torch.tensor([0])
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    with pytest.raises(ValueError, match="damping"):
        op.inverse(0.0)


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_multi_batch_equals_one_batch(kind):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).to(D64)
    X, y = torch.randn(10, 3, dtype=D64), torch.randint(0, 3, (10,))
    one = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type=kind)
    many = KFACOperator(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])],
                        fisher_type=kind)
    for name, (A, G) in one.factors.items():
        A2, G2 = many.factors[name]
        torch.testing.assert_close(A2, A, atol=1e-10, rtol=0)
        if kind != "mc":  # different random draws per batch
            torch.testing.assert_close(G2, G, atol=1e-10, rtol=0)


def test_mc_converges_to_exact():
    torch.manual_seed(6)
    model = nn.Linear(3, 3).to(D64)
    X, y = torch.randn(4, 3, dtype=D64), torch.randint(0, 3, (4,))
    exact = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    mc = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="mc", mc_samples=1000)
    Ge, Gm = exact.factors[""][1], mc.factors[""][1]
    assert (Gm - Ge).norm() < 0.15 * Ge.norm()


def _conv_reference(conv, X, y, loss_fn):
    """A and G of a Conv2d by explicit patch extraction and per-position gradients."""
    N = X.shape[0]
    ph, pw = conv.padding
    Xp = F.pad(X, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    out = conv(X)
    Ho, Wo = out.shape[2:]
    A = torch.zeros(X.shape[1] * kh * kw + 1, X.shape[1] * kh * kw + 1, dtype=D64)
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                patch = Xp[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(-1)
                a = torch.cat([patch, torch.ones(1, dtype=D64)])
                A += torch.outer(a, a)
    A /= N
    G = torch.zeros(conv.out_channels, conv.out_channels, dtype=D64)
    for n in range(N):  # per-sample loss gradient w.r.t. the conv output
        o = conv(X[n:n + 1]).detach().requires_grad_(True)
        loss = loss_fn(o.flatten(1), y[n:n + 1])
        g = torch.autograd.grad(loss, o)[0][0]
        for i in range(Ho):
            for j in range(Wo):
                G += torch.outer(g[:, i, j], g[:, i, j])
    G /= N * Ho * Wo
    return A, G


@pytest.mark.parametrize("padding, stride", [(0, 1), (1, 2)])
def test_conv2d_factors_match_explicit_unfolding(padding, stride):
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 3, 3, padding=padding, stride=stride).to(D64)
    model = nn.Sequential(conv, nn.Flatten())
    X = torch.randn(3, 2, 5, 5, dtype=D64)
    n_out = model(X).shape[1]
    y = torch.randint(0, n_out, (3,))
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="empirical")
    A, G = op.factors["0"]
    A_ref, G_ref = _conv_reference(conv, X, y, nn.CrossEntropyLoss())
    torch.testing.assert_close(A, A_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(G, G_ref, atol=1e-10, rtol=0)


def test_conv2d_layout_full_kernel_equals_ggn():
    """A kernel covering the whole image has one position: K-FAC is exact on one sample."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).to(D64)
    X, y = torch.randn(1, 2, 3, 3, dtype=D64), torch.tensor([1])
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    torch.testing.assert_close(op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y),
                               atol=1e-8, rtol=0)


def test_param_subset_and_float32():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(torch.float32)
    X, y = torch.randn(5, 3, dtype=torch.float32), torch.randint(0, 2, (5,))
    full = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), params=["2.weight"],
                      fisher_type="exact")
    assert op.shape == (8, 8) and op.dtype == torch.float32
    A_full, G_full = full.factors["2"]
    torch.testing.assert_close(op.to_dense(), torch.kron(G_full, A_full[:4, :4]))
    with torch.no_grad():
        H = torch.tanh(model[0](X))
    torch.testing.assert_close(A_full[:4, :4], H.T @ H / 5)


def test_errors(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="params="):  # an explicit unsupported parameter
        KFACOperator(model, nn.CrossEntropyLoss(), data, params=[model[0], model[1]])
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, params=[model[0], model[2]])
    assert op.shape[0] == 16 + 10
    # params=None: the supported layers, and one log line naming what is left out
    with caplog.at_level("INFO", logger="curvlab.linops.kfac"):
        auto = KFACOperator(model, nn.CrossEntropyLoss(), data)
    assert list(auto.objective.params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "not covered: 1.weight, 1.bias" in caplog.text
    with pytest.raises(ValueError, match="fisher_type"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, params=[model[0]], fisher_type="x")
    with pytest.raises(ValueError, match="mc"):
        KFACOperator(model, nn.L1Loss(), (torch.randn(5, 3), torch.randn(5, 2)),
                     params=[model[0]], fisher_type="mc")


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_conv2d_one_block_per_group(bias):
    """A kernel covering the whole image on one sample: each group's Kronecker block is
    the GGN block of that group's weights (and bias), the blocks between groups are 0."""
    torch.manual_seed(10)
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=bias)
    model = nn.Sequential(conv, nn.Flatten()).to(D64)
    X, y = torch.randn(1, 4, 3, 3, dtype=D64), torch.tensor([4])
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    assert [lay.name for lay in op.layers] == ["0.group0", "0.group1"]
    D, ref = op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    seen = torch.zeros_like(D, dtype=torch.bool)
    for idx in op._index:
        flat = idx.reshape(-1)
        torch.testing.assert_close(D[flat][:, flat], ref[flat][:, flat], atol=1e-10, rtol=0)
        seen[flat.unsqueeze(1), flat.unsqueeze(0)] = True
    assert D[~seen].abs().max() == 0 and seen.diagonal().all()
    # several positions and samples: factors from each group's own patches and channels
    X = torch.randn(3, 4, 5, 5, dtype=D64)
    y = torch.randint(0, 54, (3,))
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="empirical")
    for j in range(2):  # A: the unfolded patches of the group's input channels
        a = F.unfold(X[:, 2 * j:2 * j + 2], 3).transpose(1, 2)
        if bias:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=D64)], -1)
        A_ref = torch.einsum("nti,ntj->ij", a, a) / 3
        A, G = op.factors[f"0.group{j}"]
        torch.testing.assert_close(A, A_ref, atol=1e-10, rtol=0)
        assert G.shape == (3, 3)


def test_damped_factor_inverse_survives_an_indefinite_factor():
    """A factor left slightly indefinite by float32 rounding (an eigenvalue -1e-6 below a
    damping of 1e-9: Cholesky fails) is inverted through its eigenvalues clamped at 0."""
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=D64, generator=torch.Generator().manual_seed(0)))[0]
    X = Q @ torch.diag(torch.tensor([1.0, 1e-3, -1e-6], dtype=D64)) @ Q.T
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(X + 1e-9 * torch.eye(3, dtype=D64))
    ref = Q @ torch.diag(1 / torch.tensor([1.0 + 1e-9, 1e-3 + 1e-9, 1e-9], dtype=D64)) @ Q.T
    torch.testing.assert_close(damped_factor_inverse(X, 1e-9), ref, rtol=1e-6, atol=0)
    P = Q @ torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=D64)) @ Q.T  # the usual path
    torch.testing.assert_close(damped_factor_inverse(P, 0.1) @ (P + 0.1 * torch.eye(3, dtype=D64)),
                               torch.eye(3, dtype=D64), rtol=0, atol=1e-12)


def _layout_model():
    """Every block layout: grouped Conv2d with and without bias, Embedding (diagonal input
    factor, transposed), HF Conv1D (transposed) if transformers is installed, bias-free
    Linear."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.conv = nn.Conv2d(2, 4, 2, groups=2)
            self.conv_nb = nn.Conv2d(4, 4, 1, groups=2, bias=False)
            try:
                from transformers.pytorch_utils import Conv1D
                self.proj = Conv1D(5, 4 * 4 + 4)
            except ImportError:
                self.proj = nn.Linear(4 * 4 + 4, 5)
            self.head = nn.Linear(5, 3, bias=False)

        def forward(self, x):
            img, tok = x[:, :18].reshape(-1, 2, 3, 3), x[:, 18].long()
            h = self.conv_nb(torch.tanh(self.conv(img))).flatten(1)
            h = torch.cat([h, self.emb(tok)], 1)
            return self.head(torch.tanh(self.proj(h)))

    torch.manual_seed(11)
    model = Net().to(D64)
    X = torch.cat([torch.randn(6, 18, dtype=D64), torch.randint(0, 7, (6, 1)).to(D64)], 1)
    return model, X, torch.randint(0, 3, (6,))


def test_products_and_inverses_read_and_write_every_block_layout():
    """The K-FAC, EKFAC and inverse products (blocks read and written through views of
    the parameter slices) equal their dense matrices (assembled through the index layout)
    on grouped, bias-free, embedding and transposed blocks, for vectors and blocks of
    vectors."""
    model, X, y = _layout_model()
    lf = nn.CrossEntropyLoss()
    op = KFACOperator(model, lf, (X, y), fisher_type="mc", damping=0.1)
    n = op.shape[0]
    V = torch.randn(n, 3, dtype=D64)
    D = op.to_dense()
    torch.testing.assert_close(op.matmat(V), D @ V, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.matvec(V[:, 0]), D @ V[:, 0], atol=1e-10, rtol=1e-10)
    for method in ("exact", "factored"):
        inv = op.inverse(0.05, method=method)
        torch.testing.assert_close(inv.matmat(V), inv.to_dense() @ V, atol=1e-9, rtol=1e-9)
    # the inverse's damping replaces the operator's 0.1
    torch.testing.assert_close(op.inverse(0.05).matmat(V),
                               torch.linalg.solve(D - 0.05 * torch.eye(n, dtype=D64), V),
                               atol=1e-8, rtol=1e-8)
    ek = EKFACOperator(model, lf, (X, y), fisher_type="mc", damping=0.1,
                       params=[k for k, _ in model.named_parameters() if not k.startswith("emb")])
    W = torch.randn(ek.shape[0], 2, dtype=D64)
    torch.testing.assert_close(ek.matmat(W), ek.to_dense() @ W, atol=1e-10, rtol=1e-10)


def test_the_padding_row_of_an_embedding_has_no_curvature():
    """nn.Embedding(padding_idx=p) gives row p no gradient, so its Gauss-Newton block is
    zero; K-FAC counted the padding tokens in the input factor and gave the row curvature
    (most of the factor in a padded batch). Its count is 0 now: the row's K-FAC block is
    zero like the GGN's, and the others are those of the tokens that are not padding."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3, padding_idx=0)
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(0)
    model = Bag().to(D64)
    x = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 1, 0]])
    y = torch.tensor([0, 1, 3])
    G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    op = KFACOperator(model, nn.CrossEntropyLoss(), (x, y), fisher_type="exact")
    K = op.to_dense()
    pad = slice(0, 3)  # emb.weight[0]: the first three coordinates
    assert G[pad].abs().max() == 0
    assert K[pad].abs().max() == 0 and K[:, pad].abs().max() == 0
    A = op.factors["emb"][0]
    torch.testing.assert_close(A, torch.tensor([0, 2, 1, 1, 1, 1], dtype=D64) / 3)
    assert K[3:18, 3:18].abs().max() > 0


@pytest.mark.parametrize("op_cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("layout", ["seq_first", "flat"])
def test_empirical_kfac_does_not_depend_on_the_layers_input_layout(op_cls, layout):
    """The empirical Fisher's G is scaled by the loss's N; it used a layer's own row count,
    so a sequence-first layer (rows = positions) or a flattened one (rows = samples x
    positions) got its block scaled by rows / samples with no error (2.4% on a tiny
    nn.TransformerEncoderLayer with batch_first=False; T x for the flattened layer). The
    Monte-Carlo Fisher did not depend on it and does not. EKFAC's correction sums each
    sample's gradient over its positions, so it refuses rows that are not samples."""
    X = torch.randn(6, 4, 3, dtype=D64)
    y = torch.randint(0, 4, (6,))
    for fisher_type in ("empirical", "mc"):
        ref = op_cls(Layout("batch_first").to(D64), nn.CrossEntropyLoss(), (X, y),
                     fisher_type=fisher_type)
        if op_cls is EKFACOperator:  # per-sample gradients: rows must be the samples
            with pytest.raises(ValueError, match="EKFAC's eigenvalue correction and"):
                op_cls(Layout(layout).to(D64), nn.CrossEntropyLoss(), (X, y),
                       fisher_type=fisher_type)
            continue
        got = op_cls(Layout(layout).to(D64), nn.CrossEntropyLoss(), (X, y),
                     fisher_type=fisher_type)
        torch.testing.assert_close(got.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="first dimensions"):
        op_cls(Layout(layout).to(D64), nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    # K-FAC reduce averages each sample's positions: with positions as rows it was 20-30% off
    op_cls(Layout("batch_first").to(D64), nn.CrossEntropyLoss(), (X, y), approx="reduce")
    with pytest.raises(ValueError, match="K-FAC reduce need"):
        op_cls(Layout(layout).to(D64), nn.CrossEntropyLoss(), (X, y), approx="reduce")


def test_a_broadcast_layer_counts_the_batch_whatever_the_selected_parameters():
    """A position embedding called with (1, T) positions and broadcast over the batch has
    one row; the empirical G's N is still the batch's. With only that layer selected it
    used its single row (GPT-2's wpe: K-FAC trace 0.16 of the empirical Fisher's, 0.63
    now, c_fc's 0.73); its block is now the same whichever parameters are selected."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok = nn.Linear(3, 4)
            self.pos = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # (N, T, 3)
            h = self.tok(x) + self.pos(torch.arange(x.shape[1]).unsqueeze(0))
            return self.head(torch.tanh(h).mean(1))

    model = Positions().to(D64)
    X, y = torch.randn(6, 5, 3, dtype=D64), torch.randint(0, 2, (6,))
    alone = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), params=["pos.weight"],
                         fisher_type="empirical")
    every = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="empirical")
    for a, b in zip(alone.factors["pos"], every.factors["pos"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
