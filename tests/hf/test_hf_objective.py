"""Hugging Face models as they come: dict batches, the model's own loss, padded sequences.

The models are built from configs with random weights (no hub), in float64 where results
are compared to 1e-10.
"""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from _hf_models import build, padded_batch, split  # noqa: E402
from torch import nn  # noqa: E402

from curvlab.diagnostics import (  # noqa: E402
    CurvatureMonitor,
    curvature_summary,
    layer_sharpness,
    precision_check,
    spectral_density,
    top_eigenvalues,
    trace,
)
from curvlab.linops import (  # noqa: E402
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
)
from curvlab.objective import Objective  # noqa: E402

MODELS = ["gpt2", "llama", "bert"]
ATTN = {}  # the library default (SDPA): curvature products must work through it


def _shifted_ce(logits, labels):
    """The causal-LM loss written out: token t predicts token t+1, pads (-100) skipped."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    return nn.functional.cross_entropy(z[keep], y[keep], reduction="sum") / keep.sum()


@pytest.mark.parametrize("name", MODELS)
def test_model_loss_is_found_and_reproduced(name):
    model = build(name, **ATTN)
    batch = padded_batch()
    obj = Objective(model, None, batch)
    causal = name != "bert"
    assert obj.convention.name.startswith("causal" if causal else "cross-entropy")
    with torch.no_grad():
        out = model(**batch)
    # Hugging Face computes its loss in float32; curvlab's is the float64 loss
    torch.testing.assert_close(obj.loss(), out.loss.to(torch.float64), rtol=1e-6, atol=0)
    if causal:
        torch.testing.assert_close(obj.loss(), _shifted_ce(out.logits, batch["labels"]),
                                   rtol=1e-13, atol=0)
    terms = (batch["labels"][:, 1:] if causal else batch["labels"]) != -100
    assert obj.num_loss_terms == int(terms.sum())


@pytest.mark.parametrize("name", MODELS)
def test_padded_sequences_in_1_2_4_batches_equal_one_batch(name):
    """Token-averaged losses weigh each batch by its valid tokens. Llama computes RMSNorm
    and the attention softmax in float32 even in a float64 model, so its results carry
    float32 rounding that depends on the batch composition: it is compared at 1e-5."""
    tol = 1e-5 if name == "llama" else 1e-10
    model = build(name, **ATTN)
    batch = padded_batch(16, 6)
    g = torch.Generator().manual_seed(0)
    ref = None
    for k in (1, 2, 4):
        data = split(batch, k)
        obj = Objective(model, None, data)
        loss, grad = obj.loss_and_grad()
        grad = obj.flatten(grad)
        if ref is None:
            v = torch.randn(obj.num_params, generator=g, dtype=torch.float64)
        ggn_v = GGNOperator(obj).matvec(v)
        # the same start and the same products give the same Ritz value (converged or not)
        lam = top_eigenvalues(HessianOperator(obj), 1, tol=1e-3, max_iter=8,
                              generator=torch.Generator().manual_seed(1)).eigenvalues[0]
        got = (loss, grad, ggn_v, lam)
        if ref is None:
            ref = got
            continue
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("name", MODELS)
def test_every_capability_runs_with_the_models_own_loss(name, tmp_path, caplog):
    model = build(name, **ATTN)
    batch = padded_batch(8, 8)
    H = HessianOperator(model, None, split(batch, 2))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    hv = H @ v
    G = GGNOperator(model, None, split(batch, 2))
    F = FisherOperator(model, None, split(batch, 2))
    # cross-entropy: the exact Fisher is the GGN (Martens 2020, sec. 9.2)
    torch.testing.assert_close(F @ v, G @ v, rtol=1e-10, atol=1e-12)
    Fmc = FisherOperator(model, None, batch, mode="mc", seed=0)
    assert torch.isfinite(Fmc @ v).all() and torch.isfinite(hv).all()
    # K-FAC covers the supported layers (norms left out, a tied head counted once, logged)
    with caplog.at_level("INFO", logger="curvlab.linops.kfac"):
        K = KFACOperator(model, None, split(batch, 2), damping=1e-3)
    assert "Kronecker blocks over" in caplog.text and "not covered: none" not in caplog.text
    assert 0.9 * H.shape[0] < K.shape[0] < H.shape[0]
    u = torch.randn(K.shape[0], dtype=torch.float64)
    assert float(u @ (K @ u)) > 0
    H1 = HessianOperator(model, None, batch)
    gen = torch.Generator().manual_seed(0)
    assert top_eigenvalues(H1, 2, tol=1e-2, generator=gen).eigenvalues.shape == (2,)
    assert trace(GGNOperator(model, None, batch), 6, generator=gen).estimate > 0
    assert spectral_density(H1, num_probes=1, num_steps=5, generator=gen) is not None
    assert layer_sharpness(H1, generator=gen, max_iter=2)
    summary = curvature_summary(model, None, batch, trace_samples=6, tol=1e-2)
    assert summary.num_samples == 8 and summary.lambda_max > 0
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = CurvatureMonitor(model, None, batch, optimizer=opt, every=2, track_every=1,
                               max_hvps=4, log_dir=tmp_path)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        monitor.step()
    assert monitor.checks and (tmp_path / "monitor.jsonl").stat().st_size > 0
    model.eval()  # Dropout off: the float32 and float64 passes see the same function
    report = precision_check(model, None, batch, dtypes=("float32",))
    assert report.reports["float32"].loss_error < 1e-5


def test_user_loss_receives_the_logits_and_the_labels_are_not_model_inputs():
    model = build("gpt2", **ATTN)
    batch = padded_batch()
    seen = {}

    def loss_fn(logits, labels):
        seen["logits"] = logits.shape
        return _shifted_ce(logits, labels)

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(sorted(k)),
                                             with_kwargs=True)
    try:
        own = Objective(model, None, batch).loss()
        torch.testing.assert_close(Objective(model, loss_fn, batch).loss(), own, rtol=1e-13,
                                   atol=0)
    finally:
        handle.remove()
    assert seen["logits"] == (16, 10, 64)
    assert calls[-1] == ["attention_mask", "input_ids"]


def test_pairs_from_a_generator_are_read_once(caplog):
    """The obvious glue, ``((b, b["labels"]) for b in batches)``, used to give loss 0."""
    model = build("gpt2", **ATTN)
    batches = split(padded_batch(), 4)
    ref = Objective(model, None, batches).loss()
    obj = Objective(model, None, ((b, b["labels"]) for b in batches))
    assert float(obj.loss()) > 1
    torch.testing.assert_close(obj.loss(), ref, rtol=1e-13, atol=0)
    # a custom token-averaged loss: curvlab cannot know its terms, says so, and takes them
    custom = Objective(model, _shifted_ce, ((b, b["labels"]) for b in batches))
    custom.loss()
    assert "cannot tell what it averages over" in caplog.text
    counted = Objective(model, _shifted_ce, ((b, b["labels"]) for b in batches),
                        normalizer=lambda y: float((y[:, 1:] != -100).sum()))
    torch.testing.assert_close(counted.loss(), ref, rtol=1e-13, atol=0)


class _ScaledLoss(nn.Module):
    """A model whose own loss is not one of the known conventions (its loss times
    ``factor``)."""

    def __init__(self, inner, factor=2.0):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, **kw):
        out = self.inner(**kw)
        out.loss = self.factor * out.loss
        return out


def test_an_unknown_model_loss_is_a_clear_error():
    model = _ScaledLoss(build("gpt2", **ATTN))
    with pytest.raises(ValueError, match="matches none of the loss conventions"):
        Objective(model, None, padded_batch())
    # a NaN loss (Gemma-2 in float64 with a padding mask gives NaN logits) is said so
    with pytest.raises(ValueError, match="own loss on this batch is nan"):
        Objective(_ScaledLoss(build("gpt2", **ATTN), float("nan")), None, padded_batch())
    with pytest.raises(ValueError, match="'labels'"):
        Objective(build("gpt2", **ATTN), nn.CrossEntropyLoss(),
                  {"input_ids": torch.ones(2, 3, dtype=torch.long)}).loss()


class _ReadsLabels(nn.Module):
    """A model whose logits depend on the labels (as an encoder-decoder's do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, labels=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.logits = out.logits + 1e-3 * (labels.clamp_min(0) if labels is not None
                                          else 0).unsqueeze(-1)
        out.loss = self.inner.loss_function(out.logits, labels, vocab_size=out.logits.shape[-1])
        return out


def test_labels_reach_the_model_only_when_its_logits_read_them():
    model = build("gpt2", **ATTN)
    batch = padded_batch()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(sorted(k)),
                                             with_kwargs=True)
    try:
        Objective(model, None, batch).loss()
    finally:
        handle.remove()
    assert calls[-1] == ["attention_mask", "input_ids"]  # its own loss would be wasted work
    reads = _ReadsLabels(model)
    obj = Objective(reads, None, batch)
    with torch.no_grad():
        ref = reads(**batch).loss
    torch.testing.assert_close(obj.loss(), ref.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_exact_diagonals_with_padding_equal_the_dense_matrices(name):
    """``DiagonalOperator(method="exact")`` evaluates samples one at a time; under ``vmap``
    Hugging Face's attention-mask checks (a host read) used to raise. The GGN and
    empirical-Fisher diagonals (the model's own loss, padded sequences) equal the
    diagonals of the dense matrices, on a few norm and bias parameters."""
    from curvlab.linops import DiagonalOperator, EmpiricalFisherOperator

    model = build(name, **ATTN)
    batch = padded_batch(6, 8)
    params = [p for p in model.parameters() if p.ndim == 1][-6:]
    for curvature, dense in (("ggn", GGNOperator), ("ef", EmpiricalFisherOperator)):
        D = DiagonalOperator(model, None, batch, params, curvature=curvature, method="exact",
                             chunk_size=4)
        ref = dense(model, None, batch, params).to_dense().diagonal()
        # (Llama's RMSNorm computes in float32 even in a float64 model: a float64 rounding
        # difference between the per-sample and the batched pass can flip a float32 one)
        torch.testing.assert_close(D.diagonal, ref, rtol=1e-6,
                                   atol=1e-7 * float(ref.abs().max()))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_with_their_own_loss(name, dtype):
    """A bfloat16 / float16 model with ``loss_fn=None``: Hugging Face's loss upcasts the
    logits to float32, the conventions did not, and no convention matched (ValueError).
    The objective's loss is now the model's own, and the exact GGN diagonal runs (its
    per-sample check at 16-bit rounding) and agrees with the dense GGN."""
    from curvlab.linops import DiagonalOperator

    model = build(name, dtype=dtype)
    batch = padded_batch(8, 8)
    obj = Objective(model, None, batch)
    with torch.no_grad():
        ref = model(**batch).loss
    assert obj.convention.name.startswith("causal")
    torch.testing.assert_close(obj.loss().float(), ref.float(), rtol=1e-5, atol=0)
    params = [p for p in model.parameters() if p.ndim == 1][-2:]
    D = DiagonalOperator(model, None, batch, params, curvature="ggn").diagonal
    dense = GGNOperator(model, None, batch, params).to_dense().diagonal()
    assert float((D.float() - dense.float()).abs().max()) <= 0.03 * float(dense.abs().max())


def test_exact_ggn_diagonal_of_float32_logits_equals_the_dense_matrix():
    """Mamba returns float32 logits even in a float64 model. The per-sample output
    Hessians of its causal-LM loss (positions x vocabulary, with many repeated
    eigenvalues) made float32 ``eigh`` fail to converge (LinAlgError) on this batch; the
    decomposition now runs in float64."""
    from curvlab.linops import DiagonalOperator

    model = build("mamba")
    batch = padded_batch(3, 5)
    del batch["attention_mask"]  # Mamba takes none
    with torch.no_grad():
        assert model(**batch).logits.dtype == torch.float32
    params = [p for p in model.parameters() if p.ndim == 1][-2:]
    D = DiagonalOperator(model, None, batch, params, curvature="ggn", method="exact")
    ref = GGNOperator(model, None, batch, params).to_dense().diagonal()
    torch.testing.assert_close(D.diagonal, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_curvature(reentrant):
    """``gradient_checkpointing_enable()`` (as a Trainer run sets it): curvlab's train-mode
    evaluations run without it (reentrant checkpointing refuses ``autograd.grad``, the
    other one double backward) and equal the model without it; the flags are back on
    afterwards, and a Hessian-free step trains the checkpointed model as the plain one."""
    from curvlab.optim import HessianFree

    batch = padded_batch(8)
    models = []
    for checkpointing in (True, False):
        model = build("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
        if checkpointing:  # (the name from transformers 5.x; the older one before)
            kwargs = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        models.append(model)
    v = torch.randn(sum(p.numel() for p in models[0].parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    for op in (GGNOperator, HessianOperator):
        got, want = (op(m, None, batch, train=True).matvec(v) for m in models)
        assert want.norm() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert any(getattr(m, "gradient_checkpointing", False) for m in models[0].modules())
    for model in models:
        opt = HessianFree(model, None, cg_max_iter=5)
        for _ in range(2):
            opt.step(batch=batch)
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert not torch.equal(models[1].transformer.wte.weight,
                           build("gpt2").transformer.wte.weight)  # it trained
