"""Muon against torch.optim.Muon / AdamW and a float64 reference; parameter routing."""

import copy
import math

import pytest
import torch
from torch import nn

from curvlab.linalg.matfuncs import newton_schulz
from curvlab.optim import Muon, muon_param_groups


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def test_matches_torch_muon_plus_adamw_bitwise():
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    ours = Muon(muon_param_groups(m1, lr=0.02, adamw_lr=1e-3, weight_decay=0.1,
                                  adamw_weight_decay=0.01), ns_dtype=torch.bfloat16)
    hidden = [m2[0].weight, m2[2].weight]
    rest = [m2[0].bias, m2[2].bias, m2[4].weight, m2[4].bias]
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    ref_adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        X = torch.randn(32, 6, generator=g)
        for m in (m1, m2):
            m.zero_grad()
            m(X).pow(2).mean().backward()
        ours.step()
        ref_muon.step()
        ref_adamw.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_update_matches_float64_reference_with_scale_rules():
    torch.manual_seed(0)
    for rule, scale in [("original", math.sqrt(8 / 5)), ("match_rms_adamw", 0.2 * math.sqrt(8)),
                        ("none", 1.0)]:
        W = nn.Parameter(torch.randn(8, 5, dtype=torch.float64))
        W0 = W.detach().clone()
        opt = Muon([W], lr=0.1, momentum=0.9, nesterov=True, adjust_lr=rule)
        G1, G2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
        W.grad = G1
        opt.step()
        W.grad = G2
        opt.step()
        B1 = 0.1 * G1
        B2 = 0.9 * B1 + 0.1 * G2
        U1, U2 = 0.1 * G1 + 0.9 * B1, 0.1 * G2 + 0.9 * B2
        expected = W0 - 0.1 * scale * (newton_schulz(U1) + newton_schulz(U2))
        torch.testing.assert_close(W.detach(), expected, rtol=1e-12, atol=1e-12)


def test_conv_weights_are_flattened():
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    flat = nn.Parameter(conv.detach().reshape(4, 12).clone())
    o1 = Muon([conv], lr=0.1)
    o2 = Muon([flat], lr=0.1)
    G = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    conv.grad, flat.grad = G, G.reshape(4, 12)
    o1.step()
    o2.step()
    torch.testing.assert_close(conv.detach().reshape(4, 12), flat.detach(), rtol=0, atol=1e-14)


def test_same_shape_batching_equals_one_at_a_time():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(5, 7)) for _ in range(3)]
    singles = [nn.Parameter(p.detach().clone()) for p in ps]
    batched = Muon(ps, lr=0.05)
    alone = [Muon([p], lr=0.05) for p in singles]
    for _ in range(3):
        for p, s in zip(ps, singles, strict=True):
            G = torch.randn(5, 7)
            p.grad, s.grad = G, G.clone()
        batched.step()
        for o in alone:
            o.step()
    for p, s in zip(ps, singles, strict=True):
        torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-6)


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.out = nn.Linear(8, 10)


def test_muon_param_groups_routes_embeddings_head_biases_and_norms_to_adamw():
    model = _TinyLM()
    groups = muon_param_groups(model, lr=0.02, adamw_lr=1e-3)
    muon = {id(p) for p in groups[0]["params"]}
    adamw = {id(p) for p in groups[1]["params"]}
    assert groups[0]["use_muon"] and not groups[1]["use_muon"]
    assert muon == {id(model.body.weight), id(model.conv.weight)}
    assert id(model.emb.weight) in adamw and id(model.out.weight) in adamw
    assert id(model.norm.weight) in adamw and id(model.body.bias) in adamw
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    # head chosen explicitly by name
    g2 = muon_param_groups(model, head="body")
    assert id(model.out.weight) in {id(p) for p in g2[0]["params"]}
    opt = Muon(groups)
    assert opt.stats()["num_muon_params"] == 2


def test_tied_embedding_and_head_listed_once():
    model = _TinyLM()
    model.out.weight = nn.Parameter(torch.randn(10, 8))
    model.emb.weight = model.out.weight
    groups = muon_param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))


def test_bad_arguments():
    with pytest.raises(ValueError, match="muon_param_groups"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([nn.Parameter(torch.zeros(3, 3))], adjust_lr="sqrt")
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(3, 3))], momentum=1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        muon_param_groups([torch.zeros(2)])


def test_compiled_newton_schulz_matches_eager():
    """compile=True runs the same iteration through torch.compile (full graph)."""
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    eager = Muon(m1.parameters(), lr=0.02)
    compiled = Muon(m2.parameters(), lr=0.02, compile=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        X = torch.randn(32, 6, generator=g)
        for m in (m1, m2):
            m.zero_grad()
            m(X).pow(2).mean().backward()
        eager.step()
        try:
            compiled.step()
        except Exception as err:  # no C++ compiler for inductor on this machine
            if "ompil" not in type(err).__name__ + str(err):
                raise
            pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), _mlp().parameters(),
                                                     strict=True))


@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("d_in,d_out", [(4, 12), (12, 4), (6, 6)])
def test_conv1d_update_is_the_transpose_of_the_linear_update(rule, d_in, d_out):
    """HF Conv1D stores its weight (in, out): Muon must scale (and orthogonalize) it as the
    (out, in) matrix of the equivalent nn.Linear, found by muon_param_groups."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(d_out, d_in), nn.Tanh(), nn.Linear(d_out, 3)).double()
    lin = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3)).double()
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.T)
        lin[0].bias.copy_(conv[0].bias)
        lin[2].load_state_dict(conv[2].state_dict())
    start = lin[0].weight.detach().clone()
    groups = muon_param_groups(conv, lr=0.05, adamw_lr=1e-2)
    assert [g.get("transposed", False) for g in groups if g["use_muon"]] == [True]
    opts = [Muon(groups, adjust_lr=rule),
            Muon(muon_param_groups(lin, lr=0.05, adamw_lr=1e-2), adjust_lr=rule)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        X = torch.randn(16, d_in, generator=g, dtype=torch.float64)
        for m, opt in zip((conv, lin), opts, strict=True):
            m.zero_grad()
            m(X).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(conv[0].weight.T, lin[0].weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv[2].weight, lin[2].weight, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(lin[0].weight, start)


def test_transposed_group_needs_matrices():
    with pytest.raises(ValueError, match="transposed"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 3, 4))], "transposed": True}])


def test_muon_param_groups_on_gpt2_routes_embeddings_tied_head_and_norms_to_adamw():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    groups = muon_param_groups(model)
    muon = [g for g in groups if g["use_muon"]]
    adamw = {id(p) for g in groups if not g["use_muon"] for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(muon) == 1 and muon[0]["transposed"]  # every hidden matrix is a Conv1D
    assert sorted(names[id(p)] for p in muon[0]["params"]) == sorted(
        n for n, p in model.named_parameters() if n.endswith(("c_attn.weight", "c_proj.weight",
                                                             "c_fc.weight")))
    for n, p in model.named_parameters():
        if "wte" in n or "wpe" in n or "ln_" in n or n.endswith("bias"):
            assert id(p) in adamw, n
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
