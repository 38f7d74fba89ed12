"""KFACOperator against curvlinops' KFACLinearOperator (K-FAC expand, type-2 Fisher):
the same Kronecker products, with curvlab's factors A = T x and G = 1/T x curvlinops' for
T positions per sample (docs/conventions.md).

The comparison is on models whose layers act on each position separately: with layers that
mix positions, curvlinops' type-2 backpropagates one Hessian-root column at every position
at once, which adds cross-position terms to G; curvlab's G equals the dense type-2
construction there (tests/linops/test_kfac_loss_terms.py)."""

import pytest
import torch
from torch import nn

from curvlab.linops import EKFACOperator, KFACOperator

curvlinops = pytest.importorskip("curvlinops")

D64 = torch.float64
B, T, D_IN, H, C = 5, 4, 3, 6, 3


class SeqNet(nn.Module):
    """Per-position layers on (B, T, d) (an identity mixing over positions); ``out``:
    "bct" logits for cross-entropy, "btc" outputs for element-wise losses."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.inner = nn.Linear(D_IN, H)
        self.head = nn.Linear(H, C)
        self.register_buffer("mix", torch.eye(T))

    def forward(self, x):
        h = torch.einsum("st,bth->bsh", self.mix.to(x.dtype), torch.tanh(self.inner(x)))
        z = self.head(h)
        if self.out == "pool":  # one output per sample: the positions are reduced inside
            return z.mean(1)
        return z.transpose(1, 2) if self.out == "bct" else z


def _case(name):
    torch.manual_seed(0)
    X = torch.randn(B, T, D_IN, dtype=D64)
    if name == "ce_pool":
        return SeqNet("pool").to(D64), nn.CrossEntropyLoss(), X, torch.randint(0, C, (B,))
    if name == "ce":
        return SeqNet("bct").to(D64), nn.CrossEntropyLoss(), X, torch.randint(0, C, (B, T))
    if name == "bce":
        y = torch.randint(0, 2, (B, T, C)).to(D64)
        return SeqNet("btc").to(D64), nn.BCEWithLogitsLoss(), X, y
    return SeqNet("btc").to(D64), nn.MSELoss(), X, torch.randn(B, T, C, dtype=D64)


@pytest.mark.parametrize("name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_equal_curvlinops_after_conversion(name, reduction):
    model, loss_fn, X, y = _case(name)
    loss_fn.reduction = reduction
    params = [p for p in model.parameters()]
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    theirs = curvlinops.KFACLinearOperator(model, loss_fn, params, data, fisher_type="type-2",
                                           separate_weight_and_bias=False,
                                           check_deterministic=False)
    theirs.compute_kronecker_factors()
    ours = KFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    for layer in ("inner", "head"):
        A_cl, G_cl = theirs._input_covariances[layer], theirs._gradient_covariances[layer]
        A, G = ours.factors[layer]
        torch.testing.assert_close(A, T * A_cl, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(G, G_cl / T, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [False, True])
def test_reduce_and_separate_blocks_equal_curvlinops(approx, separate):
    """K-FAC reduce has no T conversion; separate weight / bias blocks: the bias block's
    input factor is the scalar T (expand) or 1 (reduce). A model that averages over the
    positions before its output (curvlinops' type-2 is exact there for reduce too)."""
    model, loss_fn, X, y = _case("ce_pool")
    theirs = curvlinops.KFACLinearOperator(model, loss_fn, list(model.parameters()), [(X, y)],
                                           fisher_type="type-2", kfac_approx=approx,
                                           separate_weight_and_bias=separate,
                                           check_deterministic=False)
    theirs.compute_kronecker_factors()
    ours = KFACOperator(model, loss_fn, (X, y), fisher_type="exact", approx=approx,
                        separate_weight_and_bias=separate)
    t = T if approx == "expand" else 1
    for layer in ("inner", "head"):
        G_cl = theirs._gradient_covariances[layer]
        if separate:
            A_cl = theirs._input_covariances[layer]
            A_w, G_w = ours.factors[f"{layer}.weight"]
            A_b, G_b = ours.factors[f"{layer}.bias"]
            torch.testing.assert_close(A_w, t * A_cl, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(A_b, torch.full((1, 1), float(t), dtype=D64))
            for G in (G_w, G_b):
                torch.testing.assert_close(G, G_cl / t, atol=1e-12, rtol=1e-10)
        else:
            A, G = ours.factors[layer]
            torch.testing.assert_close(A, t * theirs._input_covariances[layer], atol=1e-12,
                                       rtol=1e-10)
            torch.testing.assert_close(G, G_cl / t, atol=1e-12, rtol=1e-10)
    # and the operators agree as matrices (curvlinops orders weight then bias per layer)
    v = torch.randn(ours.shape[0], dtype=D64)
    torch.testing.assert_close(ours.matvec(v), theirs @ v, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ekfac_equals_curvlinops(loss):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, C)).to(D64)
    X = torch.randn(7, D_IN, dtype=D64)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, C, (7,))
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(7, C, dtype=D64)
    theirs = curvlinops.EKFACLinearOperator(model, loss_fn, list(model.parameters()),
                                            [(X[:3], y[:3]), (X[3:], y[3:])],
                                            fisher_type="type-2",
                                            separate_weight_and_bias=False,
                                            check_deterministic=False)
    ours = EKFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    V = torch.randn(ours.shape[0], 3, dtype=D64)
    torch.testing.assert_close(ours @ V, theirs @ V, atol=1e-10, rtol=1e-8)
    lam = 0.1
    torch.testing.assert_close(ours.inverse(lam).to_dense() @ (ours.to_dense() + lam * torch.eye(
        ours.shape[0], dtype=D64)), torch.eye(ours.shape[0], dtype=D64), atol=1e-8, rtol=0)
