"""Character-level language modelling on the Python standard library's own source text.

No download: the corpus is the concatenation of a fixed, sorted list of the top-level
``*.py`` files in ``sysconfig.get_paths()["stdlib"]`` (deterministic for a given Python
installation). Characters outside printable ASCII map to one ``"?"`` token. The model is a
small pre-LayerNorm GPT (causal self-attention, GELU MLP, learned positions, untied head).
"""

from __future__ import annotations

import math
import string
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["load_char_corpus", "CharTransformer", "char_lm_model", "char_batch", "char_lm_loss"]

VOCAB = "\n" + "".join(c for c in string.printable if c not in "\n\r\x0b\x0c") + "?"


def load_char_corpus(max_chars: int = 1_000_000, val_fraction: float = 0.1,
                     stdlib_dir: str | None = None) -> tuple[Tensor, Tensor, str]:
    """Encoded ``(train_ids, val_ids, vocab)`` from the standard library's source text.

    The first ``1 - val_fraction`` of the text is training data, the rest validation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library directory {root}")
    parts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    lut = torch.full((128,), VOCAB.index("?"), dtype=torch.long)
    for i, c in enumerate(VOCAB):
        lut[ord(c)] = i
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)
    ids = lut[codes]
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:], VOCAB


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Decoder-only transformer: token + position embeddings, blocks, LayerNorm, head."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02 if not name.endswith("fc_out.weight") and not
                                name.endswith("proj.weight") else 0.02 / math.sqrt(2 * n_layers))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def char_lm_model(vocab_size: int = len(VOCAB), d_model: int = 128, n_layers: int = 2,
                  n_heads: int = 4, seq_len: int = 64, seed: int = 0) -> CharTransformer:
    """A seeded :class:`CharTransformer`."""
    torch.manual_seed(seed)
    return CharTransformer(vocab_size, d_model, n_layers, n_heads, seq_len)


def char_batch(ids: Tensor, batch_size: int, seq_len: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows ``(x, y)`` of shape ``(batch_size, seq_len)``; ``y`` is ``x`` shifted."""
    start = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    offs = start[:, None] + torch.arange(seq_len + 1)
    w = ids[offs]
    return w[:, :-1], w[:, 1:]


def char_lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
