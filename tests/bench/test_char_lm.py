"""Character-level LM problem: deterministic stdlib corpus, model shapes, causal masking."""

import math

import torch

from curvlab.bench.problems.char_lm import (
    VOCAB,
    char_batch,
    char_lm_loss,
    char_lm_model,
    load_char_corpus,
)


def test_corpus_is_deterministic_and_in_vocab():
    a_train, a_val, vocab = load_char_corpus(max_chars=20_000)
    b_train, b_val, _ = load_char_corpus(max_chars=20_000)
    assert vocab == VOCAB
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(a_train) + len(a_val) == 20_000 and len(a_val) == 2_000
    assert int(a_train.min()) >= 0 and int(a_train.max()) < len(VOCAB)
    text = "".join(VOCAB[i] for i in a_train[:200].tolist())
    assert "import" in text or "def " in text or '"""' in text  # it is Python source


def test_batches_are_shifted_windows():
    ids = torch.arange(1000)
    x, y = char_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_model_loss_at_init_is_near_uniform_and_attention_is_causal():
    model = char_lm_model(d_model=32, n_layers=1, n_heads=4, seq_len=16, seed=0)
    x = torch.randint(0, len(VOCAB), (2, 16), generator=torch.Generator().manual_seed(1))
    loss = char_lm_loss(model, x, x)
    assert abs(loss.item() - math.log(len(VOCAB))) < 0.3
    # changing a later token must not change earlier logits
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % len(VOCAB)
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
