"""K-FAC for every loss layout: the factors against a dense float64 construction from
per-sample Jacobians, the Monte-Carlo estimate against the exact one, ignored targets and
class weights against the valid terms only."""

import copy

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

from curvlab.linops import KFACOperator
from curvlab.optim import KFAC

D64 = torch.float64
B, T, D_IN, H, C = 4, 3, 3, 5, 4


class SeqNet(nn.Module):
    """Per-position Linear, tanh, a fixed mixing over positions, per-position Linear head;
    ``layout`` "bct" returns (B, C, T) logits, "flat" the (B*T, C) rows of (B, T, C)."""

    def __init__(self, layout="bct"):
        super().__init__()
        self.layout = layout
        self.inner = nn.Linear(D_IN, H)
        self.head = nn.Linear(H, C)
        self.register_buffer("mix", torch.eye(T) + 0.3 * torch.ones(T, T))

    def forward(self, x):
        h = torch.einsum("st,bth->bsh", self.mix.to(x.dtype), torch.tanh(self.inner(x)))
        z = self.head(h)
        return z.transpose(1, 2) if self.layout == "bct" else z.reshape(-1, z.shape[-1])


def _problem(kind, seed=0, B=B):
    """(model, loss_fn, X, y) for one loss layout."""
    torch.manual_seed(seed)
    X = torch.randn(B, T, D_IN, dtype=D64)
    if kind in ("ce_bct", "ce_flat"):
        model = SeqNet("bct" if kind == "ce_bct" else "flat").to(D64)
        y = torch.randint(0, C, (B, T))
        return model, nn.CrossEntropyLoss(), X, (y if kind == "ce_bct" else y.reshape(-1))
    model = nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, C)).to(D64)
    X = X[:, 0]
    if kind == "bce":
        return model, nn.BCEWithLogitsLoss(), X, torch.randint(0, 2, (B, C)).to(D64)
    return model, nn.MSELoss(), X, torch.randn(B, C, dtype=D64)


def dense_kfac(model, loss_fn, X, y, layer_name, omega=None):
    """Type-2 K-FAC of one Linear layer from per-sample Jacobians: ``A = sum_n omega_n
    sum_t a a^T / sum omega``, ``G = (1/T) sum_{n,t} J_nt^T (d^2 L / dz^2) J_nt`` with
    ``J_nt`` the Jacobian of the outputs w.r.t. the layer output at (n, t)."""
    layer = dict(model.named_modules())[layer_name]
    store = {}

    def hook(mod, inp, out):
        store["a"] = inp[0].detach()
        return out + store["delta"]

    with torch.no_grad():
        shape = layer(layer_inputs_probe(model, layer, X)).shape
    store["delta"] = torch.zeros(shape, dtype=D64)
    h = layer.register_forward_hook(hook)
    try:
        z = model(X).detach()
        J = jacrev(lambda d: (store.__setitem__("delta", d), model(X))[1])(
            torch.zeros(shape, dtype=D64))
    finally:
        h.remove()
    Hz = hessian(lambda z_: loss_fn(z_, y))(z).reshape(z.numel(), z.numel())
    J = J.reshape(z.numel(), -1, shape[-1])  # (outputs, samples*positions, d_out)
    Tn = J.shape[1] // shape[0]
    G = torch.einsum("opi,oq,qpj->ij", J, Hz, J) / Tn
    a = store["a"].reshape(shape[0], -1, store["a"].shape[-1])
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=D64)], -1)
    om = torch.ones(shape[0], dtype=D64) if omega is None else omega
    A = torch.einsum("n,nti,ntj->ij", om, a, a) / om.sum()
    return A, G


def layer_inputs_probe(model, layer, X):
    got = {}
    h = layer.register_forward_hook(lambda m, i, o: got.update(x=i[0].detach()))
    with torch.no_grad():
        model(X)
    h.remove()
    return got["x"]


KINDS = ["bce", "ce_bct", "ce_flat", "mse"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_factors_equal_dense_type2_kfac(kind, reduction):
    model, loss_fn, X, y = _problem(kind)
    loss_fn.reduction = reduction
    op = KFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        A, G = dense_kfac(model, loss_fn, X, y, name)
        A_op, G_op = op.factors[name]
        torch.testing.assert_close(A_op, A, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(G_op, G, atol=1e-12, rtol=1e-10)


def _trace_ratio(kind, how, draws=2000):
    model, loss_fn, X, y = _problem(kind, seed=1, B=16)
    exact = KFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    if how == "operator":
        mc = KFACOperator(model, loss_fn, (X, y), fisher_type="mc", mc_samples=draws, seed=3)
        factors = mc.factors
    else:
        m2 = copy.deepcopy(model)
        opt = KFAC(m2, fisher_type="mc", loss_fn=loss_fn, mc_samples=draws, seed=3)
        loss_fn(m2(X), y).backward()
        opt.step()
        mods = dict(m2.named_modules())
        factors = {name: (opt.state[mods[name].weight]["A"], opt.state[mods[name].weight]["G"])
                   for name in exact.factors}
    ratios = []
    for name, (A, G) in exact.factors.items():
        A_mc, G_mc = factors[name]
        ratios.append(float(A_mc.trace() * G_mc.trace() / (A.trace() * G.trace())))
    return ratios


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["operator", "optimizer"])
def test_mc_trace_matches_exact(kind, how):
    for r in _trace_ratio(kind, how):
        assert abs(r - 1) < 0.02, r


@pytest.mark.parametrize("how", ["operator", "optimizer"])
def test_mc_sum_loss_matches_exact(how):
    """A summing loss: the MC factor G is the sum over samples in both (not N x it)."""
    model, loss_fn, X, y = _problem("ce_bct", seed=3)
    loss_fn.reduction = "sum"
    exact = KFACOperator(model, loss_fn, (X, y), fisher_type="exact")
    if how == "operator":
        G = KFACOperator(model, loss_fn, (X, y), fisher_type="mc", mc_samples=2000).factors
        G = G["head"][1]
    else:
        opt = KFAC(model, fisher_type="mc", loss_fn=loss_fn, mc_samples=2000)
        loss_fn(model(X), y).backward()
        opt.step()
        G = opt.state[model.head.weight]["G"]
    r = float(G.trace() / exact.factors["head"][1].trace())
    assert abs(r - 1) < 0.02, r
