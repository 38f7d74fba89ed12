"""Curvature products through fused attention kernels.

``F.scaled_dot_product_attention`` on CPU runs a fused (flash) kernel whose backward has no
derivative and which has no forward-mode rule, so every product that differentiates the
model twice failed on models with default attention (HF ``attn_implementation="sdpa"``,
``nn.MultiheadAttention(need_weights=False)``). curvlab now records such products under
the math SDPA backend (:data:`curvlab.autodiff.attention_kernels`). Ground truth: the same
weights with attention computed by plain matmul + softmax (HF ``"eager"``,
``nn.MultiheadAttention(need_weights=True)``), float64.
"""

import logging

import pytest
import torch
from torch import nn

import curvlab
from curvlab import autodiff
from curvlab.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

D = torch.float64
OPERATORS = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]


@pytest.fixture(autouse=True)
def default_kernels(monkeypatch):
    """Every test starts from the default kernels (the choice is process-wide)."""
    monkeypatch.setattr(autodiff.attention_kernels, "math", False)


def _close(a, b, tol=1e-10):
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=tol * scale)


# ---- nn.MultiheadAttention -----------------------------------------------------------------
class TinyAttention(nn.Module):
    """Linear -> LayerNorm -> self-attention -> mean over positions -> Linear."""

    def __init__(self, need_weights: bool, dim: int = 8, classes: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.inp, self.norm = nn.Linear(4, dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.drop, self.out = nn.Dropout(dropout), nn.Linear(dim, classes)

    def forward(self, x):
        h = self.norm(self.inp(x))
        # need_weights=False goes through F.scaled_dot_product_attention (fused kernel);
        # need_weights=True forms the attention matrix by matmul + softmax
        a = self.attn(h, h, h, need_weights=self.need_weights)[0]
        return self.out(self.drop(a.mean(dim=1)))


def _mha_pair(dropout: float = 0.0):
    torch.manual_seed(0)
    fused = TinyAttention(need_weights=False, dropout=dropout).to(D)
    plain = TinyAttention(need_weights=True, dropout=dropout).to(D)
    plain.load_state_dict(fused.state_dict())
    X, y = torch.randn(6, 5, 4, dtype=D), torch.randint(0, 3, (6,))
    return fused, plain, (X, y)


@pytest.mark.parametrize("op_cls", OPERATORS)
def test_mha_operator_products_equal_explicit_attention(op_cls):
    fused, plain, data = _mha_pair()
    A = op_cls(fused, nn.CrossEntropyLoss(), data)
    B = op_cls(plain, nn.CrossEntropyLoss(), data)
    V = torch.randn(A.shape[0], 3, dtype=D)
    _close(A @ V, B @ V)
    _close(A @ V[:, 0], B @ V[:, 0])
    # several batches (one linearization per product, forward mode for a lone vector)
    X, y = data
    A2 = op_cls(fused, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])])
    _close(A2 @ V[:, 1], B @ V[:, 1])


def test_mha_autodiff_products_equal_explicit_attention():
    fused, plain, (X, y) = _mha_pair()
    params = {k: p.detach() for k, p in fused.named_parameters()}

    def loss(model):
        return lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (X,)),
                                                     y)

    v = {k: torch.randn_like(p) for k, p in params.items()}
    ref = curvlab.hvp(loss(plain), params, v, mode="double_backward")
    for mode in curvlab.autodiff.HVP_MODES:
        out = curvlab.hvp(loss(fused), params, v, mode=mode)
        for k in params:
            _close(out[k], ref[k])
    H, Href = curvlab.hessian(loss(fused), params), curvlab.hessian(loss(plain), params)
    for a in params:
        for b in params:
            _close(H[a][b], Href[a][b])

    def net(model):
        return lambda p: torch.func.functional_call(model, p, (X,))

    ce = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
    _close(curvlab.jvp(net(fused), params, v)[1], curvlab.jvp(net(plain), params, v)[1])
    g, gref = curvlab.gnvp(net(fused), ce, params, v), curvlab.gnvp(net(plain), ce, params, v)
    for k in params:
        _close(g[k], gref[k])


def test_monitor_and_summary_of_a_model_in_train_mode():
    """The graph is recorded again under the math kernels inside the objective's eval
    mode, not in the module's train mode (Dropout would make the Hessian random)."""
    from curvlab.diagnostics import CurvatureMonitor, curvature_summary

    fused, plain, data = _mha_pair(dropout=0.5)
    fused.train()
    plain.train()
    lams = []
    for model in (fused, plain):
        monitor = CurvatureMonitor(model, nn.CrossEntropyLoss(), data, lr=0.1, max_hvps=40,
                                   tol=1e-8, generator=torch.Generator().manual_seed(0))
        monitor.check()
        lams.append(monitor.checks[-1]["lambda_max"])
    assert lams[0] == pytest.approx(lams[1], rel=1e-8)
    assert fused.training
    s1 = curvature_summary(fused, nn.CrossEntropyLoss(), data, trace_samples=6)
    s2 = curvature_summary(plain, nn.CrossEntropyLoss(), data, trace_samples=6)
    assert s1.trace == pytest.approx(s2.trace, rel=1e-8)


def test_math_kernels_is_logged_once_and_remembered(caplog):
    fused, _, data = _mha_pair()
    with caplog.at_level(logging.INFO, logger="curvlab.autodiff"):
        H = HessianOperator(fused, nn.CrossEntropyLoss(), data)
        v = torch.randn(H.shape[0], dtype=D)
        H @ v
        assert autodiff.attention_kernels.math  # learnt for the process
        H @ v
        GGNOperator(fused, nn.CrossEntropyLoss(), data) @ v
        HessianOperator(fused, nn.CrossEntropyLoss(), data) @ v
    records = [r for r in caplog.records if "math SDPA backend" in r.getMessage()]
    assert len(records) == 1


def test_models_without_fused_attention_keep_the_default_kernels():
    _, plain, data = _mha_pair()
    v = torch.randn(sum(p.numel() for p in plain.parameters()), dtype=D)
    HessianOperator(plain, nn.CrossEntropyLoss(), data) @ v
    GGNOperator(plain, nn.CrossEntropyLoss(), data) @ v
    assert not autodiff.attention_kernels.math


@pytest.mark.parametrize("message, kernel", [
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not "
     "implemented", "_scaled_dot_product_flash_attention_for_cpu_backward"),
    ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu that does not "
     "support it because it has not been implemented yet.",
     "_scaled_dot_product_flash_attention_for_cpu"),
    ("Trying to use forward AD with aten::_native_multi_head_attention that does not support "
     "it.", "_native_multi_head_attention"),
    ("mat1 and mat2 shapes cannot be multiplied", None),
])
def test_missing_derivative_names_the_kernel(message, kernel):
    assert autodiff.missing_derivative(RuntimeError(message)) == kernel


def test_math_kernels_context_restores_the_settings():
    fast = torch.backends.mha.get_fastpath_enabled()
    with autodiff.math_kernels():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_fused_kernel_forced_inside_the_model_is_a_clear_error():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Forced(TinyAttention):
        def forward(self, x):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return super().forward(x)

    torch.manual_seed(0)
    model = Forced(need_weights=False).to(D)
    data = (torch.randn(4, 5, 4, dtype=D), torch.randint(0, 3, (4,)))
    op = GGNOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        op @ torch.randn(op.shape[0], dtype=D)


# ---- Hugging Face models, default attention ------------------------------------------------
def _float64_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                             **kwargs):
    """Llama's eager attention without its float32 softmax (plain float64 math)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _float64_rms_norm(self, hidden_states):
    """LlamaRMSNorm without its float32 upcast."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class Logits(nn.Module):
    """The (tokens, vocab) logits a language-model loss consumes: shifted for causal LMs."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, ids):
        logits = self.model(input_ids=ids).logits
        if self.causal:
            logits = logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


SUB_HESSIAN = ("ln_1.weight", "input_layernorm.weight", "attention.self.query.bias")


def _hf_pair(kind, monkeypatch):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cls, causal = transformers.GPT2LMHeadModel, True
        config = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        make = transformers.GPT2Config
    elif kind == "llama":
        cls, causal = transformers.LlamaForCausalLM, True
        config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        make = transformers.LlamaConfig
        # HF Llama computes RMSNorm (and its eager softmax) in float32, so two attention
        # kernels agree only to float32 rounding; float64 references need float64 math
        from transformers.models.llama import modeling_llama
        monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                            _float64_eager_attention)
        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _float64_rms_norm)
    else:
        cls, causal = transformers.BertForMaskedLM, False
        config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, vocab_size=64)
        make = transformers.BertConfig
    torch.manual_seed(0)
    default = cls(make(**config)).to(D).eval()
    eager = cls(make(**config, attn_implementation="eager")).to(D).eval()
    eager.load_state_dict(default.state_dict())
    assert default.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 64, (2, 8))  # no padding token (id 0)
    targets = (ids[:, 1:] if causal else ids).reshape(-1)
    return Logits(default, causal), Logits(eager, causal), (ids, targets)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_hf_products_equal_eager_attention(kind, monkeypatch):
    default, eager, data = _hf_pair(kind, monkeypatch)
    n = sum(p.numel() for p in default.parameters())
    V = torch.randn(n, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    for op_cls in OPERATORS:
        A = op_cls(default, nn.CrossEntropyLoss(), data)
        B = op_cls(eager, nn.CrossEntropyLoss(), data)
        _close(A @ V, B @ V)
    ids, targets = data
    params = {k: p.detach() for k, p in default.named_parameters()}

    def loss(model):
        return lambda p: nn.functional.cross_entropy(
            torch.func.functional_call(model, p, (ids,)), targets)

    v = {k: torch.randn_like(p) for k, p in params.items()}
    ref = curvlab.hvp(loss(eager), params, v, mode="double_backward")
    for mode in ("auto", "rev_rev", "fwd_rev"):
        out = curvlab.hvp(loss(default), params, v, mode=mode)
        for k in params:
            _close(out[k], ref[k])
    # the dense Hessian in the first block's pre-attention norm weight (the rest fixed)
    name = next(k for k in params if ".0." in k and k.endswith(SUB_HESSIAN))

    def sub_loss(model):
        return lambda w: loss(model)({**params, name: w})

    _close(curvlab.hessian(sub_loss(default), params[name]),
           curvlab.hessian(sub_loss(eager), params[name]))
