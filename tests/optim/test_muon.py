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
    """On a CPU the AdamW parameters take torch's fused kernel (``AdamW(fused=True)``; the
    foreach / for-loop step differs from it by rounding within 30 steps)."""
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    ours = Muon(muon_param_groups(m1, lr=0.02, adamw_lr=1e-3, weight_decay=0.1,
                                  adamw_weight_decay=0.01), ns_dtype=torch.bfloat16)
    hidden = [m2[0].weight, m2[2].weight]
    rest = [m2[0].bias, m2[2].bias, m2[4].weight, m2[4].bias]
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    ref_adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
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


@pytest.mark.parametrize("shapes", [[(5, 7)] * 3, [(5, 7), (7, 5), (5, 7), (7, 5)],
                                    [(3, 2, 2), (4, 3), (3, 4), (4, 1, 3)]],
                         ids=["same", "both-orientations", "conv-and-linear"])
def test_batching_equals_one_at_a_time(shapes):
    """Matrices are batched by the wide 2-D shape Newton–Schulz iterates on: (A, B) and
    (B, A) updates (and conv kernels of the same flattened size) share one batch, and each
    gets the update it gets alone (in float64, to rounding)."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    singles = [nn.Parameter(p.detach().clone()) for p in ps]
    batched = Muon(ps, lr=0.05)
    alone = [Muon([p], lr=0.05) for p in singles]
    for _ in range(3):
        for p, s in zip(ps, singles, strict=True):
            G = torch.randn(p.shape, dtype=torch.float64)
            p.grad, s.grad = G, G.clone()
        batched.step()
        for o in alone:
            o.step()
    for p, s in zip(ps, singles, strict=True):
        torch.testing.assert_close(p, s, rtol=1e-12, atol=1e-14)


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


def _muon_run(model: nn.Module, steps: int = 3, **kwargs) -> list[torch.Tensor]:
    opt = Muon(model.parameters(), lr=0.02, **kwargs)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        X = torch.randn(32, 6, generator=g)
        model.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("ns_dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_compiled_newton_schulz_matches_eager(ns_dtype, rtol):
    """compile=True runs the same iteration through torch.compile (full graph): in float32
    the eager updates; in bfloat16, where fused kernels round elsewhere, updates as close to
    the float64 iteration's as the eager ones (measured: both within 3.5%, 4% apart)."""
    base = _mlp()
    start = [p.detach().clone() for p in base.parameters()]
    try:
        compiled = _muon_run(copy.deepcopy(base), compile=True, ns_dtype=ns_dtype)
    except Exception as err:  # no C++ compiler for inductor on this machine
        if "ompil" not in type(err).__name__ + str(err):
            raise
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")
    eager = _muon_run(copy.deepcopy(base), ns_dtype=ns_dtype)
    exact = _muon_run(copy.deepcopy(base), ns_dtype=torch.float64)
    reference = eager if ns_dtype == torch.float32 else exact
    for c, e, x, r, s in zip(compiled, eager, exact, reference, start, strict=True):
        moved = (r - s).norm()
        assert moved > 0
        assert (c - r).norm() <= rtol * moved, ((c - r).norm() / moved).item()
        assert (e - x).norm() <= 6e-2 * moved


def test_default_ns_dtype_follows_the_hardware():
    """bfloat16 where the device multiplies it natively (the authors' and torch's choice),
    float32 on CPUs that emulate it, float64 for float64 parameters on a CPU."""
    from curvlab.optim.muon import default_ns_dtype, native_bfloat16_matmul

    cpu = torch.device("cpu")
    assert default_ns_dtype(cpu, torch.float64) == torch.float64
    expected = torch.bfloat16 if native_bfloat16_matmul(cpu) else torch.float32
    assert default_ns_dtype(cpu, torch.float32) == expected
    assert native_bfloat16_matmul(cpu) == (torch.cpu._is_amx_tile_supported()
                                           or torch.cpu._is_avx512_bf16_supported())
    assert default_ns_dtype(torch.device("cuda"), torch.float32) == torch.bfloat16
    # small stacks on a CPU: float32 (a bfloat16 product's fixed cost), by k n^2 m
    for shape in [(64, 128), (128, 64), (1, 128, 128), (3, 64, 256), (128, 192)]:
        assert default_ns_dtype(cpu, torch.float32, shape) == torch.float32
    for shape in [(2, 128, 128), (4, 64, 256), (128, 256), (128, 384), (384, 128),
                  (2, 128, 256), (256, 256)]:
        assert default_ns_dtype(cpu, torch.float32, shape) == expected
    assert default_ns_dtype(torch.device("cuda"), torch.float32, (8, 8)) == torch.bfloat16


def test_the_step_iterates_small_stacks_in_float32_on_a_cpu(monkeypatch):
    """Muon's step asks for the dtype of each stack it orthogonalizes (by its shape): a
    64x128 weight iterates in float32 even where bfloat16 products are native."""
    from curvlab.optim import muon as muon_module

    monkeypatch.setattr(muon_module, "native_bfloat16_matmul", lambda device: True)
    seen = []
    real = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz",
                        lambda U, *a, dtype=None, **k: seen.append((tuple(U.shape), dtype))
                        or real(U, *a, dtype=dtype, **k))
    W, V = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(256, 256))
    W.grad, V.grad = torch.randn(64, 128), torch.randn(256, 256)
    Muon([W, V], lr=0.02).step()
    assert sorted(seen) == [((1, 64, 128), torch.float32), ((1, 256, 256), torch.bfloat16)]


@pytest.mark.parametrize("rule,normalize", [("original", None), ("match_rms_adamw", None),
                                            ("original", "neuron")])
@pytest.mark.parametrize("d_in,d_out", [(4, 12), (12, 4), (6, 6)])
def test_conv1d_update_is_the_transpose_of_the_linear_update(rule, normalize, d_in, d_out):
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
    opts = [Muon(groups, adjust_lr=rule, normalize=normalize),
            Muon(muon_param_groups(lin, lr=0.05, adamw_lr=1e-2), adjust_lr=rule,
                 normalize=normalize)]
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


def test_ns_variants_update_matches_newton_schulz():
    """ns_coefficients / gram reach the iteration; the default is bitwise the quintic tuple."""
    from curvlab.linalg.matfuncs import NS_QUINTIC_COEFFICIENTS

    torch.manual_seed(0)
    G = torch.randn(6, 60, dtype=torch.float64)  # wide enough for Gram on a CPU
    for kw in [dict(ns_coefficients="polar_express"),
               dict(ns_coefficients="polar_express", gram=True),
               dict(ns_coefficients=[(3.0, -3.2, 1.2)] * 2 + [(1.5, -0.5, 0.0)] * 4, ns_steps=6,
                    gram=True, gram_restarts=(3,))]:
        W = nn.Parameter(torch.zeros(6, 60, dtype=torch.float64))
        opt = Muon([W], lr=0.1, momentum=0.0, nesterov=False, adjust_lr="none", **kw)
        W.grad = G.clone()
        opt.step()
        ns = {"steps": kw.get("ns_steps", 5), "coefficients": kw["ns_coefficients"],
              "gram": kw.get("gram", False), "gram_restarts": kw.get("gram_restarts", 2)}
        torch.testing.assert_close(W.detach(), -0.1 * newton_schulz(G, **ns), rtol=1e-12,
                                   atol=1e-14)
    m1, m2 = _mlp(), _mlp()
    o1 = Muon(m1.parameters(), lr=0.02)
    o2 = Muon(m2.parameters(), lr=0.02, ns_coefficients=NS_QUINTIC_COEFFICIENTS)
    assert o1.param_groups[0]["ns_coefficients"] == "quintic"
    X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    for m, o in ((m1, o1), (m2, o2)):
        for _ in range(3):
            m.zero_grad()
            m(X).pow(2).mean().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.mark.parametrize("cols", [8 * 6 - 1, 8 * 6])
def test_gram_on_a_cpu_only_from_the_min_aspect(cols):
    """gram=True: Gram Newton-Schulz on matrices >= CPU_GRAM_MIN_ASPECT times wider than
    tall (either orientation), the plain iteration below, bitwise."""
    from curvlab.optim.muon import CPU_GRAM_MIN_ASPECT

    assert CPU_GRAM_MIN_ASPECT == 8
    G = torch.randn(6, cols, generator=torch.Generator().manual_seed(0))
    for grad in (G, G.T.contiguous()):
        W = nn.Parameter(torch.zeros_like(grad))
        opt = Muon([W], lr=1.0, momentum=0.0, nesterov=False, adjust_lr="none",
                   ns_coefficients="polar_express", gram=True, ns_dtype=torch.float32)
        W.grad = grad.clone()
        opt.step()
        ns = [newton_schulz(grad[None], 5, "polar_express", gram=gram)[0]  # (a batch of 1)
              for gram in (cols >= 8 * 6, cols < 8 * 6)]
        assert torch.equal(W.detach(), -ns[0])
        assert not torch.equal(ns[0], ns[1])


def _normuon_reference(W0, grads, lr, mom, beta2, scale):
    """NorMuon written out densely (Li et al. 2025; the authors' normuon_update): Nesterov
    momentum, Newton-Schulz, EMA of each row's mean square (no bias correction), rows divided
    by its root + 1e-10, Frobenius norm restored, shape scale."""
    W, B, v = W0.clone(), torch.zeros_like(W0), torch.zeros(W0.shape[0], dtype=W0.dtype)
    for G in grads:
        B = mom * B + (1 - mom) * G
        O = newton_schulz((1 - mom) * G + mom * B)
        v = beta2 * v + (1 - beta2) * (O * O).mean(dim=1)
        N = O / (v.sqrt() + 1e-10)[:, None]
        N = N * (torch.linalg.matrix_norm(O) / (torch.linalg.matrix_norm(N) + 1e-10))
        W = W - lr * scale * N
    return W


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (4, 3, 2, 2)])
def test_normuon_matches_dense_reference(shape):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    W0 = W.detach().reshape(shape[0], -1).clone()
    opt = Muon([W], lr=0.05, momentum=0.9, normalize="neuron", beta2=0.8)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(4)]
    for G in grads:
        W.grad = G
        opt.step()
    A, B = W0.shape
    expected = _normuon_reference(W0, [G.reshape(A, B) for G in grads], 0.05, 0.9, 0.8,
                                  math.sqrt(max(1, A / B)))
    torch.testing.assert_close(W.detach().reshape(A, B), expected, rtol=1e-12, atol=1e-13)
    v = opt.state[W]["neuron_second_moment"]
    assert v.shape == (A,) and v.dtype == torch.float64


def test_normuon_first_step_equalizes_row_norms_and_keeps_the_frobenius_norm():
    torch.manual_seed(0)
    W = nn.Parameter(torch.zeros(6, 10, dtype=torch.float64))
    rows = torch.logspace(0, 2, 6, dtype=torch.float64)[:, None]
    G = torch.randn(6, 10, dtype=torch.float64) * rows  # rows of very different sizes
    opt = Muon([W], lr=1.0, momentum=0.0, nesterov=False, adjust_lr="none", normalize="neuron")
    W.grad = G
    opt.step()
    rows = torch.linalg.vector_norm(W.detach(), dim=1)
    torch.testing.assert_close(rows, rows.mean().expand(6), rtol=1e-8, atol=0)  # eps 1e-10
    torch.testing.assert_close(torch.linalg.matrix_norm(W.detach()),
                               torch.linalg.matrix_norm(newton_schulz(G)), rtol=1e-10, atol=0)


def test_normuon_bfloat16_parameters_keep_a_float32_second_moment():
    W = nn.Parameter(torch.randn(4, 6).bfloat16())
    opt = Muon([W], lr=0.01, normalize="neuron")
    W.grad = torch.randn(4, 6).bfloat16()
    opt.step()
    assert opt.state[W]["neuron_second_moment"].dtype == torch.float32
    assert W.dtype == torch.bfloat16 and torch.isfinite(W).all()


def test_bad_variant_arguments():
    p = [nn.Parameter(torch.zeros(3, 3))]
    for kw, match in [(dict(ns_coefficients="cubic"), "ns_coefficients"),
                      (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
                      (dict(ns_coefficients=[(1.5, -0.5, 0.0)] * 3), "3 per-iteration"),
                      (dict(gram_restarts=0), "gram_restarts"),
                      (dict(gram="yes"), "gram"),
                      (dict(normalize="row"), "normalize"),
                      (dict(beta2=1.0), "beta2")]:
        with pytest.raises(ValueError, match=match):
            Muon(p, **kw)
    opt = Muon(p, ns_steps=3, ns_coefficients=[(1.5, -0.5, 0.0)] * 3)
    with pytest.raises(ValueError, match="ns_coefficients"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "ns_steps": 4})


def _state_copy(opt):
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e25])
def test_bad_gradient_of_any_parameter_skips_the_step(value):
    """The gradient rule sees every gradient: a non-finite or overflowing entry in any one
    of them (matrices of each wide shape, AdamW parameters) skips the step with parameters
    and state bitwise unchanged, or raises."""
    model = _mlp()
    opt = Muon(muon_param_groups(model, lr=0.02, adamw_lr=1e-3))
    X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    model(X).pow(2).mean().backward()
    opt.step()
    for k, p in enumerate(model.parameters()):
        model.zero_grad()
        model(X).pow(2).mean().backward()
        p.grad.view(-1)[-1] = value
        params = [q.detach().clone() for q in model.parameters()]
        state = _state_copy(opt)
        skipped = opt.stats()["skipped_steps"]
        opt.step()
        assert opt.stats()["skipped_steps"] == skipped + 1, k
        assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
        after = _state_copy(opt)
        assert all(torch.equal(v, after[i][n]) for i, st in state.items()
                   for n, v in st.items()), k
    raising = Muon(muon_param_groups(model), nonfinite="raise")
    with pytest.raises(FloatingPointError):
        raising.step()


def test_gradient_rule_sees_the_gradient_the_closure_computes():
    """step(closure): the rule checks the gradients the closure made (the gradients were
    once collected before the closure ran: none here, so a NaN gradient went through)."""
    model = _mlp()
    opt = Muon(muon_param_groups(model))
    X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    X[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(X).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stats()["skipped_nonfinite"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_cheap_gradient_bound_defers_to_the_exact_rule():
    """Gradients whose combined norm (the cheap bound: AdamW gradients concatenated) is
    near the overflow threshold but each of which is below it: the exact rule decides, and
    the step is taken."""
    limit = 0.25 * torch.finfo(torch.float32).max
    model = _mlp()
    opt = Muon(muon_param_groups(model))
    model(torch.randn(4, 6)).sum().backward()
    for p in (model[0].bias, model[2].bias):  # AdamW parameters, ||g||^2 = 0.6 limit each
        p.grad.zero_()
        p.grad[:2] = math.sqrt(0.3 * limit)
    opt.step()
    assert opt.stats()["steps"] == 1 and opt.stats()["skipped_steps"] == 0
    model[0].bias.grad[:2] = math.sqrt(0.6 * limit)  # now 1.2 limit: overflow
    opt.step()
    assert opt.stats()["skipped_overflow"] == 1


def test_adamw_step_counts_per_parameter_through_missing_gradients_and_reloads():
    """The AdamW parameters' ``state["step"]`` (0-d float32, torch's layout) count each
    parameter's own steps, also when one misses a gradient and across state dict loads
    (they are incremented together: views of one tensor, made again after a load)."""
    model = _mlp()
    opt = Muon(muon_param_groups(model))
    X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    head_bias = model[4].bias

    def step(skip_bias=False):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        if skip_bias:
            head_bias.grad = None
        opt.step()

    for _ in range(3):
        step()
    step(skip_bias=True)
    counts = {id(p): opt.state[p]["step"] for g in opt.param_groups for p in g["params"]
              if "step" in opt.state[p]}
    assert {float(c) for c in counts.values()} == {3.0, 4.0}
    assert float(counts[id(head_bias)]) == 3.0
    assert all(c.shape == () and c.dtype == torch.float32 for c in counts.values())
    sd = copy.deepcopy(opt.state_dict())
    opt = Muon(muon_param_groups(model))
    opt.load_state_dict(sd)
    step()
    assert float(opt.state[head_bias]["step"]) == 4.0
    assert float(opt.state[model[0].bias]["step"]) == 5.0
    # a state entry replaced from outside is read, not overwritten
    opt.state[head_bias]["step"] = torch.tensor(10.0)
    step()
    assert float(opt.state[head_bias]["step"]) == 11.0
    assert float(opt.state[model[0].bias]["step"]) == 6.0


def test_compile_step_is_compile_true_after_construction_and_switches_off():
    """compile_step() (dynamo's eager backend: traced fullgraph, no code generation)
    compiles Newton–Schulz and the AdamW part of the biases: 3 steps equal the eager ones
    to float rounding. Run after the other compiled tests (one process), this met dynamo's
    recompile limit (8 graphs per code object) when every Muon shared one compiled
    newton_schulz: now one code copy per batch shape and setting."""
    base = _mlp()
    eager = _muon_run(copy.deepcopy(base), ns_dtype=torch.float32)
    model = copy.deepcopy(base)
    opt = Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32)
    assert opt.compilable and not opt.step_compiled
    assert opt.compile_step(backend="eager") is opt and opt.step_compiled
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        X = torch.randn(32, 6, generator=g)
        model.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    for p, e in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert not opt.compile_step(False).step_compiled
