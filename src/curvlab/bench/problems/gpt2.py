"""GPT-2 (Hugging Face ``transformers``) built from a config with random weights, as a
module mapping token ids to logits (``(batch, time) -> (batch, time, vocab)``).

Default attention implementation of ``transformers``; dropout off (``resid_pdrop``,
``embd_pdrop``, ``attn_pdrop`` = 0) so that runs are deterministic and comparable to the
char-level transformer; the input embedding and the output head are tied (GPT-2's
default). :func:`gpt2_available` says whether ``transformers`` imports.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

__all__ = ["gpt2_available", "GPT2Logits", "gpt2_model"]


def gpt2_available() -> bool:
    """Whether ``transformers`` (with its GPT-2) can be imported."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401
    except Exception:  # an installed transformers that fails to import: treated as absent
        return False
    return True


class GPT2Logits(nn.Module):
    """``GPT2LMHeadModel`` returning its logits tensor (the benchmarks' loss takes logits).
    ``autocast``: run the forward pass under ``torch.autocast`` in that dtype (mixed
    precision: float32 parameters, bfloat16 matmuls), logits returned in float32."""

    def __init__(self, lm: nn.Module, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.autocast = autocast

    def forward(self, ids: Tensor) -> Tensor:
        if self.autocast is None:
            return self.lm(input_ids=ids).logits
        with torch.autocast(ids.device.type, dtype=self.autocast):
            return self.lm(input_ids=ids).logits.float()


def gpt2_model(vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
               seq_len: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32,
               autocast: torch.dtype | None = None) -> GPT2Logits:
    """A seeded GPT-2 of the given size (MLP width ``4 d_model``; about ``12 n_layers
    d_model^2`` parameters besides the embeddings) with parameters in ``dtype`` (see
    :class:`GPT2Logits` for ``autocast``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=d_model,
                     n_layer=n_layers, n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2Logits(GPT2LMHeadModel(cfg), autocast).to(dtype)
