"""K-FAC on a tiny GPT-2 (random weights, HF transformers): every Conv1D / embedding layer
factored against the old layout in which only the tied vocabulary head (the one nn.Linear)
was, side by side in one run; and the cost of the first step at a large vocabulary.

1. Bigram chains (next token = a fixed permutation of the current one), vocab 64, batch 8 x
   16 tokens, 40 steps of K-FAC at its defaults, Monte-Carlo Fisher and empirical Fisher,
   3 seeds: mean loss of the last 5 steps, and the ratio all-layers / head-only, with the
   tied embedding / head weight counting both uses (default) or the head's only.
2. Vocab 8192: wall time of the first step (forward, backward, factors, eigendecompositions)
   with the size rule (the 8192 x 8192 head factor kept diagonal).

Usage: ``python benchmarks/bench_kfac_gpt2.py [--steps 40] [--seeds 3] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import curvlab.linops._kronecker as kron
from curvlab.optim import KFAC

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kfac_gpt2.json"


def gpt2(vocab: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


class Logits(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits[:, :-1].transpose(1, 2)


def batches(vocab: int, steps: int, seed: int, B: int = 8, T: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(B, T, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (B,), generator=g)
        for t in range(1, T):
            ids[:, t] = perm[ids[:, t - 1]]
        out.append(ids)
    return out


def run(layout: str, fisher_type: str, steps: int, seed: int) -> float:
    orig = kron.layer_kind
    if layout == "head_only":
        kron.layer_kind = lambda m, grouped=False: "linear" if isinstance(m, nn.Linear) else None
    try:
        model = Logits(gpt2(64, seed))
        ce = nn.CrossEntropyLoss()
        tied = "head" if layout == "all_tied_head" else "both"
        opt = KFAC(model, fisher_type=fisher_type, loss_fn=ce, tied_weights=tied)
    finally:
        kron.layer_kind = orig
    losses = []
    for ids in batches(64, steps, seed + 100):
        opt.zero_grad()
        loss = ce(model(ids), ids[:, 1:])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return sum(losses[-5:]) / 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res: dict = {"training": {}}
    print(f"{'fisher':>10} {'seed':>4} {'all layers':>11} {'(tied: head)':>13} "
          f"{'head only':>10} {'ratio':>6} {'ratio':>6}")
    for fisher_type in ("mc", "empirical"):
        ratios, ratios_t = [], []
        for seed in range(args.seeds):
            a = run("all", fisher_type, args.steps, seed)
            t = run("all_tied_head", fisher_type, args.steps, seed)
            h = run("head_only", fisher_type, args.steps, seed)
            ratios.append(a / h)
            ratios_t.append(t / h)
            res["training"][f"{fisher_type}/{seed}"] = {"all": a, "all_tied_head": t,
                                                        "head_only": h}
            print(f"{fisher_type:>10} {seed:>4} {a:11.3f} {t:13.3f} {h:10.3f} {a / h:6.2f} "
                  f"{t / h:6.2f}")
        res["training"][f"{fisher_type}/median_ratio"] = statistics.median(ratios)
        res["training"][f"{fisher_type}/median_ratio_tied_head"] = statistics.median(ratios_t)
        print(f"{fisher_type:>10} median ratio (all / head-only loss): "
              f"{statistics.median(ratios):.2f} (tied_weights='both'), "
              f"{statistics.median(ratios_t):.2f} (tied_weights='head')")
    model = gpt2(8192, 0)
    ids = batches(8192, 1, 0)[0]
    opt = KFAC(model)
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    res["vocab8192_first_step_s"] = time.perf_counter() - t0
    print(f"vocab 8192: first step {res['vocab8192_first_step_s']:.2f} s "
          f"(head output factor diagonal: 8192 > max_factor_dim)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
