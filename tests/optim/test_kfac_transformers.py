"""K-FAC on transformer layers: HF Conv1D (transposed linear), embeddings, tied weights,
the size rule for large factors, bf16 autocast and torch.compile."""

import copy
import logging

import pytest
import torch
from torch import nn

from curvlab.linops import KFACOperator
from curvlab.linops._kronecker import find_layers
from curvlab.optim import KFAC

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

D64 = torch.float64


class ClassesFirst(nn.Module):
    def forward(self, z):
        return z.transpose(1, 2)


def _pair(seed=0):
    """A Conv1D network and the same network with nn.Linear (transposed weights)."""
    torch.manual_seed(seed)
    conv = nn.Sequential(Conv1D(5, 3), nn.Tanh(), Conv1D(4, 5)).to(D64)
    lin = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(D64)
    with torch.no_grad():
        for c, m in zip(conv[::2], lin[::2], strict=True):
            m.weight.copy_(c.weight.T)
            m.bias.copy_(torch.randn_like(m.bias))
            c.bias.copy_(m.bias)
    return conv, lin


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
def test_conv1d_factors_equal_linear(fisher_type):
    conv, lin = _pair()
    X, y = torch.randn(6, 2, 3, dtype=D64), torch.randint(0, 4, (6, 2))
    loss_fn = nn.CrossEntropyLoss()
    a = KFACOperator(nn.Sequential(*conv, ClassesFirst()), loss_fn, (X, y),
                     fisher_type=fisher_type, seed=1)
    b = KFACOperator(nn.Sequential(*lin, ClassesFirst()), loss_fn, (X, y),
                     fisher_type=fisher_type, seed=1)
    assert [lay.kind for lay in a.layers] == ["conv1d", "conv1d"]
    for name in ("0", "2"):
        for x, z in zip(a.factors[name], b.factors[name], strict=True):
            torch.testing.assert_close(x, z, atol=1e-12, rtol=0)
    # the operator acts on the (in, out)-stored weight: P^T K P with P the transposition
    perm = torch.cat([torch.arange(15).reshape(5, 3).T.reshape(-1), torch.arange(15, 20),
                      20 + torch.arange(20).reshape(4, 5).T.reshape(-1),
                      torch.arange(40, 44)])
    Da, Db = a.to_dense(), b.to_dense()
    torch.testing.assert_close(Da, Db[perm][:, perm], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"eigenvalue_correction": True},
                                {"inverse_method": "inverse"}])
def test_conv1d_optimizer_step_equals_linear(kw):
    conv, lin = _pair(1)
    X, y = torch.randn(8, 3, 3, dtype=D64), torch.randint(0, 4, (8, 3))
    for model in (conv, lin):
        opt = KFAC(model, lr=0.3, damping=0.05, precondition_frequency=1, **kw)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X).transpose(1, 2), y).backward()
            opt.step()
    for c, m in zip(conv[::2], lin[::2], strict=True):
        torch.testing.assert_close(c.weight.T, m.weight, atol=1e-12, rtol=0)
        torch.testing.assert_close(c.bias, m.bias, atol=1e-12, rtol=0)


def test_embedding_is_linear_on_one_hot_inputs():
    """An Embedding is a Linear layer (no bias) on one-hot inputs: the same K-FAC, its input
    factor exactly diagonal (stored as the token counts)."""
    torch.manual_seed(2)
    V, d = 7, 3
    emb = nn.Embedding(V, d).to(D64)
    head = nn.Linear(d, 4).to(D64)
    lin = nn.Linear(V, d, bias=False).to(D64)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    ids, y = torch.randint(0, V, (5, 6)), torch.randint(0, 4, (5, 6))
    loss_fn = nn.CrossEntropyLoss()
    a = KFACOperator(nn.Sequential(emb, head, ClassesFirst()), loss_fn, (ids, y),
                     fisher_type="exact")
    one_hot = nn.functional.one_hot(ids, V).to(D64)
    b = KFACOperator(nn.Sequential(lin, head, ClassesFirst()), loss_fn, (one_hot, y),
                     fisher_type="exact")
    A_emb, G_emb = a.factors["0"]
    A_lin, G_lin = b.factors["0"]
    assert A_emb.dim() == 1
    torch.testing.assert_close(torch.diag(A_emb), A_lin, atol=1e-12, rtol=0)
    torch.testing.assert_close(G_emb, G_lin, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.factors["1"][1], b.factors["1"][1], atol=1e-12, rtol=0)


def _gpt2(vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("tied", ["head", "both"])
def test_gpt2_layout_and_log(caplog, tied):
    model = _gpt2()
    with caplog.at_level(logging.INFO, logger="curvlab.optim.kfac"):
        opt = KFAC(model, max_factor_dim=48, tied_weights=tied)
    kinds = {lay.name: lay.kind for lay in opt._layers}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    assert kinds["transformer.wpe"] == "embedding" and kinds["lm_head"] == "linear"
    assert "transformer.wte" not in kinds  # tied to lm_head: factored with the head
    assert [E.name for E in opt._tied.values()] == (["transformer.wte"] if tied == "both"
                                                     else [])
    head = next(lay for lay in opt._layers if lay.name == "lm_head")
    assert head.diag_out and not head.diag_in  # vocab 64 > 48: the output factor diagonal
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "not factored" in lines[0] and "ln_f.weight" in lines[0] and "%" in lines[0]
    assert "lm_head.G" in lines[0]
    assert ("both uses counted" if tied == "both" else "curvature of one use only") in lines[0]
    n_other = sum(p.numel() for p in opt._other)
    assert n_other / sum(p.numel() for p in model.parameters()) < 0.02


def test_vocab_sized_factor_is_diagonal():
    """A vocabulary x vocabulary factor is never formed above the size rule."""
    layers, _ = find_layers(nn.Linear(8, 4096), dict(nn.Linear(8, 4096).named_parameters()))
    model = nn.Linear(8, 4096)
    layers, _ = find_layers(model, dict(model.named_parameters()))
    assert layers[0].diag_out and not layers[0].diag_in


def test_bf16_autocast_step_keeps_float32_factors():
    model = _gpt2()
    ids = torch.randint(0, 64, (4, 8))
    opt = KFAC(model, precondition_frequency=1)
    ref = copy.deepcopy(model)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    st = opt.state[model.transformer.h[0].attn.c_attn.weight]
    assert st["A"].dtype == torch.float32 and st["QG"].dtype == torch.float32
    moved = [float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters(),
                                                         strict=True)]
    assert all(torch.isfinite(torch.tensor(moved))) and max(moved) > 0


def test_torch_compile_equals_eager():
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    out = []
    for mode in ("eager", "compile_after", "compiled_given"):
        model = copy.deepcopy(base)
        if mode == "compiled_given":
            fwd = torch.compile(model)
            opt = KFAC(fwd, precondition_frequency=1)
        else:
            opt = KFAC(model, precondition_frequency=1)
            fwd = torch.compile(model) if mode == "compile_after" else model
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(fwd(X), y).backward()
            opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    moved = float((out[0] - torch.cat([p.detach().reshape(-1) for p in base.parameters()]))
                  .norm())
    assert moved > 1e-2
    for o in out[1:]:
        torch.testing.assert_close(o, out[0], atol=1e-5, rtol=1e-5)


def test_no_captured_statistics_is_an_error():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model)
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = nn.functional.cross_entropy(model(X), y)
    opt._capture.clear()  # as if the forward pass had bypassed the hooks
    loss.backward()
    with pytest.raises(RuntimeError, match="no statistics were captured"):
        opt.step()


class _Logits(nn.Module):
    """GPT-2 as a model of next-token logits (B, vocab, T-1) for nn.CrossEntropyLoss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, :-1].transpose(1, 2)


def _bigram_batches(vocab, steps, B=8, T=16, seed=1):
    """Token chains with a fixed successor, next = perm[current]: learnable."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(B, T, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (B,), generator=g)
        for t in range(1, T):
            ids[:, t] = perm[ids[:, t - 1]]
        out.append(ids)
    return out


def test_gpt2_trains_faster_than_with_only_the_head_factored(monkeypatch):
    """All Conv1D / embedding layers factored (MC Fisher) vs the old layout, where only the
    tied head (the one nn.Linear) was: lower loss after 30 steps at the defaults."""
    import curvlab.linops._kronecker as kron

    batches = _bigram_batches(64, 30)
    ce = nn.CrossEntropyLoss()
    final = {}
    for layout in ("all", "head_only"):
        if layout == "head_only":
            monkeypatch.setattr(kron, "layer_kind", lambda m, grouped=False: "linear"
                                if isinstance(m, nn.Linear) else None)
        model = _Logits(_gpt2())
        opt = KFAC(model, fisher_type="mc", loss_fn=ce)
        losses = []
        for ids in batches:
            opt.zero_grad()
            loss = ce(model(ids), ids[:, 1:])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        final[layout] = sum(losses[-5:]) / 5
    assert final["all"] < 0.9 * final["head_only"], final


class _TiedLM(nn.Module):
    """Embedding -> tanh Linear -> bias-free head sharing the embedding's weight."""

    def __init__(self, V=6, d=3, tied=True):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).transpose(1, 2)


def test_tied_weight_counts_both_uses():
    """The tied weight's statistics are the embedding's and the head's own K-FAC factors,
    and with diagonal factors (commuting: exact) the step is the damped solve with the sum
    of both Kronecker blocks."""
    torch.manual_seed(4)
    model = _TiedLM().to(D64)
    ids = torch.randint(0, 6, (5, 4))
    lam = 0.1
    opt = KFAC(model, lr=1.0, damping=lam, momentum=0.0, kl_clip=None, max_factor_dim=1,
               tied_weights="both")
    before = model.emb.weight.detach().clone()
    saved = copy.deepcopy(model.state_dict())
    nn.functional.cross_entropy(model(ids), ids).backward()
    g = model.emb.weight.grad.clone()
    opt.step()
    st = opt.state[model.emb.weight]
    # the factors of each use, from the operator on an untied copy (same values)
    untied = _TiedLM(tied=False).to(D64)
    untied.load_state_dict(saved)
    with torch.no_grad():
        untied.head.weight.copy_(before)
    op = KFACOperator(untied, nn.CrossEntropyLoss(), (ids, ids), fisher_type="empirical",
                      max_factor_dim=1)
    for (mine, ref) in ((st["tA"], op.factors["emb"][0]), (st["tG"], op.factors["emb"][1]),
                        (st["A"], op.factors["head"][0]), (st["G"], op.factors["head"][1])):
        torch.testing.assert_close(mine, ref, atol=1e-12, rtol=1e-10)
    C = torch.kron(torch.diag(st["G"]), torch.diag(st["A"])) + \
        torch.kron(torch.diag(st["tA"]), torch.diag(st["tG"]))
    step = torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=D64), g.reshape(-1))
    torch.testing.assert_close(model.emb.weight.detach() - before, -step.reshape(g.shape),
                               atol=1e-12, rtol=1e-10)


def test_tied_both_state_dict_round_trip():
    torch.manual_seed(5)
    ids = [torch.randint(0, 6, (4, 5)) for _ in range(5)]

    def steps(model, opt, batches):
        for b in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(b), b).backward()
            opt.step()

    model = _TiedLM().to(D64)
    opt = KFAC(model, tied_weights="both", precondition_frequency=2)
    steps(model, opt, ids[:3])
    saved_m, saved_o = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, ids[3:])
    model2 = _TiedLM().to(D64)
    model2.load_state_dict(saved_m)
    opt2 = KFAC(model2, tied_weights="both", precondition_frequency=2)
    opt2.load_state_dict(saved_o)
    steps(model2, opt2, ids[3:])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_operator_on_gpt2_with_its_own_loss_and_padding():
    """KFACOperator on an HF causal LM (loss_fn=None: the Objective's shifted, flattened
    cross-entropy with ignore_index=-100), Conv1D layers, a padded sequence: the Monte-Carlo
    factors match the exact (type-2) ones in trace, the input factors exactly."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 32, (4, 6))
    labels = ids.clone()
    labels[0, 3:] = -100
    batch = {"input_ids": ids, "labels": labels}
    params = [n for n, _ in model.named_parameters() if ".attn.c_" in n or ".mlp.c_" in n]
    exact = KFACOperator(model, None, batch, params=params, fisher_type="exact")
    mc = KFACOperator(model, None, batch, params=params, fisher_type="mc", mc_samples=500)
    assert len(exact.factors) == 4
    for name, (A, G) in exact.factors.items():
        A_mc, G_mc = mc.factors[name]
        torch.testing.assert_close(A_mc, A, atol=1e-12, rtol=0)
        assert abs(float(G_mc.trace() / G.trace()) - 1) < 0.03


@pytest.mark.parametrize("name", ["emb.weight", "head.weight", "emb", "head"])
def test_operator_selects_a_tied_weight_by_either_name(name):
    """params=None counts a tied embedding / head weight through the head; selecting that
    weight by name (either alias) or by module raised "shared with another layer ... select
    the parameters of one of them with params=" - advice that cannot be followed (both names
    are one tensor). Selected, it gets the same block as with params=None."""
    torch.manual_seed(6)
    model = _TiedLM().to(D64)
    ids = torch.randint(0, 6, (5, 4))
    full = KFACOperator(model, nn.CrossEntropyLoss(), (ids, ids), fisher_type="exact")
    one = KFACOperator(model, nn.CrossEntropyLoss(), (ids, ids), params=[name],
                       fisher_type="exact")
    assert [layer.name for layer in one.layers] == ["head"]
    for ref, mine in zip(full.factors["head"], one.factors["head"], strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-14)
