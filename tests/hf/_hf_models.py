"""Tiny GPT-2, Llama, BERT and Mamba models from configs, and padded batches for them."""

from __future__ import annotations

import torch

VOCAB = 64


def build(name: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, **attn):
    """A tiny model with the library's default settings (attention included) unless
    ``attn_implementation`` is given."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                               **attn)
        model = tf.GPT2LMHeadModel(config)
    elif name == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                max_position_embeddings=32, **attn)
        model = tf.LlamaForCausalLM(config)
    elif name == "bert":
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                               **attn)
        model = tf.BertForMaskedLM(config)
    elif name == "mamba":  # its logits are float32 whatever the model's dtype
        config = tf.MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                conv_kernel=3, vocab_size=VOCAB)
        model = tf.MambaForCausalLM(config)
    else:
        raise ValueError(name)
    return model.to(dtype).eval()


def padded_batch(n: int = 16, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """``n`` right-padded sequences of random lengths: labels are the inputs, -100 on pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def split(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    size = n // k
    return [{key: v[i:i + size] for key, v in batch.items()} for i in range(0, n, size)]
