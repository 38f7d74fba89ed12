"""The model-loss conventions' cross-entropy against torch's, value and derivatives."""

import pytest
import torch
from torch import nn

from curvlab.losses import ClassesLastCrossEntropyLoss

D = torch.float64


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"ignore_index": 2},
                                    {"label_smoothing": 0.1, "ignore_index": 0},
                                    {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=D)}])
def test_classes_last_cross_entropy_is_cross_entropy(kwargs):
    """On (B, C, T) logits (the conventions' layout, a view of (B, T, C)) it is
    nn.CrossEntropyLoss: value, gradient, Hessian-vector product, per-sample under vmap."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=g, dtype=D).movedim(-1, 1)  # (B, C, T), strided
    y = torch.randint(0, 4, (3, 5), generator=g)
    v = torch.randn(3, 4, 5, generator=g, dtype=D)
    ours, ref = ClassesLastCrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs)

    def hvp(loss):
        x = z.detach().requires_grad_(True)
        value = loss(x, y)
        grad, = torch.autograd.grad(value, x, create_graph=True)
        return value, grad, torch.autograd.grad(grad, x, v)[0]

    for a, b in zip(hvp(ours), hvp(ref)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    per_sample = [torch.func.vmap(lambda zi, yi, f=f: f(zi[None], yi[None]))(z, y)
                  for f in (ours, ref)]
    torch.testing.assert_close(*per_sample, rtol=1e-13, atol=1e-15)
    # 2-d input and probability targets are passed through to torch's loss
    if "ignore_index" not in kwargs:  # (torch refuses it with probability targets)
        p = torch.randn(3, 4, 5, generator=g, dtype=D).softmax(dim=1)
        torch.testing.assert_close(ours(z, p), ref(z, p), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours(z[:, :, 0], y[:, 0]), ref(z[:, :, 0], y[:, 0]))


def _conventions_output(loss, logits):
    return {"loss": torch.as_tensor(loss), "logits": logits}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_logits_match_their_convention(dtype):
    """Hugging Face's language-model losses upcast 16-bit logits to float32: the
    conventions do too (before, a bfloat16 GPT-2 or Llama with ``loss_fn=None`` matched no
    convention: 4.1734 against 4.15625). A loss computed in 16 bits (BERT's masked-LM head)
    matches at twice the rounding unit, only if every other convention is more than 3x
    that away; otherwise the error says the loss is too coarse to tell them apart."""
    from curvlab.losses import match_convention

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    spread = 6.0 * torch.nn.functional.one_hot(labels, 5).to(torch.float32)
    logits = (spread + 0.1 * torch.randn(4, 6, 5, generator=g)).to(dtype)  # fits labels[t]
    upcast = logits.float().reshape(-1, 5)
    shifted = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 5),
                                          labels[:, 1:].reshape(-1))
    same = nn.functional.cross_entropy(upcast, labels.reshape(-1))
    assert match_convention(_conventions_output(shifted, logits), labels).name.startswith(
        "causal")
    assert match_convention(_conventions_output(same, logits), labels).name.startswith("cross")
    # the loss as a 16-bit computation rounds it: matched at the loose tolerance, far from
    # the shifted convention (~6 nats away)
    rounded = same.to(dtype).float() * (1 + torch.finfo(dtype).eps)
    assert match_convention(_conventions_output(rounded, logits), labels).name.startswith(
        "cross")
    # uniform-ish logits: every convention is near log(5), within 3x the loose tolerance
    flat = (0.01 * torch.randn(4, 6, 5, generator=g)).to(dtype)
    near = nn.functional.cross_entropy(flat.float().reshape(-1, 5), labels.reshape(-1))
    with pytest.raises(ValueError, match="too coarse"):
        match_convention(_conventions_output(near * (1 + torch.finfo(dtype).eps), flat),
                         labels)
