"""A tiny Hugging Face GPT-2, built from a config, for `curvlab diagnose`:

    curvlab diagnose examples/hf_gpt2.py:make --precision

The model keeps transformers' default settings (its default attention kernel included)
and computes its own loss, so `make()` returns `loss_fn=None`; the data is a DataLoader of
dict batches as a Hugging Face collator yields them (`input_ids`, `attention_mask`,
`labels` with -100 on padding). The text is the Python standard library's own source,
read byte by byte (no tokenizer download, nothing from the hub).
"""

import inspect
import json

import torch
from torch.utils.data import DataLoader

VOCAB = 257  # bytes 0..255 and one padding id
PAD = 256


def _sequences(count: int, max_len: int, seed: int) -> list[torch.Tensor]:
    """``count`` byte sequences of random lengths from the source of a stdlib module."""
    text = inspect.getsource(json.decoder).encode()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=g))
        start = int(torch.randint(0, len(text) - length, (1,), generator=g))
        out.append(torch.tensor(list(text[start:start + length])))
    return out


def collate(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: the batch a Hugging Face collator produces."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def make(train_steps: int = 60, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    train = DataLoader(_sequences(512, 48, seed), batch_size=32, shuffle=True,
                       collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < train_steps:
        for batch in train:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
            step += 1
            if step == train_steps:
                break
    model.eval()
    data = DataLoader(_sequences(64, 48, seed + 1), batch_size=16, collate_fn=collate)
    return model, None, data


if __name__ == "__main__":
    from curvlab.objective import Objective

    model, loss_fn, data = make()
    print("loss per token:", float(Objective(model, loss_fn, data).loss()))
