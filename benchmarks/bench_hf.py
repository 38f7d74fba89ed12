"""Curvature products on a tiny GPT-2 with default (fused SDPA) attention, side by side.

Model: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32), random
weights, eval mode, a batch of 8 sequences of 32 tokens, cross-entropy on the shifted
(tokens, vocab) logits; CPU. The unit is one gradient (forward + backward, default kernels).
Contenders, timed in interleaved rounds so machine noise hits all of them alike:

  gradient                 loss + backward, default kernels (fused SDPA): the unit
  gradient, math SDPA      the same under curvlab.autodiff.math_kernels()
  gradient, eager attn     the same model built with attn_implementation="eager"
  HVP                      HessianOperator at a new point (refresh) @ v: gradient graph
                           recorded once, one backward through it (what hvp() costs)
  HVP, first of process    the same, with attention_kernels.math reset before each call:
                           the fused-kernel graph is recorded, found underivable and
                           recorded again under the math kernels (what the reactive choice
                           costs once per process; "HVP" is the proactive cost)
  HVP, graph cached        a further product on the recorded graph (Krylov methods)
  GGN product              GGNOperator at a new point @ v: forward recorded, J^T u graph,
                           J v by double backward, output-space product, J^T (M J v)
  GGN, graph cached        a further product on the recorded linearization
  HVP / GGN, eager attn    the same products with attn_implementation="eager"
  HVP, eager, check        "HVP, eager attn" with attention_kernels.math unset: the
                           gradient graph is searched for underivable nodes (none found),
                           which a model without fused attention pays on every hvp_fn

Targets (issue 14): HVP <= 3x a gradient, GGN product <= 2x a gradient.
Run: python benchmarks/bench_hf.py [--quick] [--repeats N] [--dtype float32|float64]
Results: benchmarks/results/bench_hf.{txt,json} (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from curvlab import autodiff
from curvlab.linops import GGNOperator, HessianOperator

RESULTS = Path(__file__).resolve().parent / "results"


class Logits(nn.Module):
    """The shifted (tokens, vocab) logits of a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def build(dtype: torch.dtype, batch: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    default = GPT2LMHeadModel(GPT2Config(**config)).to(dtype).eval()
    eager = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="eager")).to(dtype).eval()
    eager.load_state_dict(default.state_dict())
    ids = torch.randint(0, 64, (batch, seq))
    return Logits(default), Logits(eager), (ids, ids[:, 1:].reshape(-1))


def contenders(default: nn.Module, eager: nn.Module, data) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    ids, targets = data
    kernels = autodiff.attention_kernels

    def gradient(model, math=False):
        leaves = list(model.parameters())

        def run():
            with autodiff.math_kernels() if math else torch.enable_grad():
                return torch.autograd.grad(loss_fn(model(ids), targets), leaves)
        return run

    def fresh(op, v, reset=False):
        def run():
            if reset:
                kernels.math = False
            try:
                op.refresh()
                return op @ v
            finally:
                kernels.math = True  # the other contenders run in the learnt state
        return run

    def cached(op, v):
        op @ v  # record once
        return lambda: op @ v

    n = sum(p.numel() for p in default.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1),
                    dtype=next(default.parameters()).dtype)
    H, G = HessianOperator(default, loss_fn, data), GGNOperator(default, loss_fn, data)
    He, Ge = HessianOperator(eager, loss_fn, data), GGNOperator(eager, loss_fn, data)
    H2, G2 = HessianOperator(default, loss_fn, data), GGNOperator(default, loss_fn, data)
    return {
        "gradient": gradient(default),
        "gradient, math SDPA": gradient(default, math=True),
        "gradient, eager attn": gradient(eager),
        "HVP": fresh(H, v),
        "HVP, first of process": fresh(H2, v, reset=True),
        "HVP, graph cached": cached(H, v),
        "GGN product": fresh(G, v),
        "GGN, graph cached": cached(G2, v),
        "HVP, eager attn": fresh(He, v),
        "GGN, eager attn": fresh(Ge, v),
        "HVP, eager, check": fresh(He, v, reset=True),
    }


def measure(runs: dict, repeats: int) -> dict[str, list[float]]:
    for fn in runs.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS), help="directory for bench_hf.{txt,json}")
    args = ap.parse_args()
    repeats = args.repeats or (7 if args.quick else 41)
    dtype = getattr(torch, args.dtype)
    default, eager, data = build(dtype, args.batch, args.seq)
    n = sum(p.numel() for p in default.parameters())
    kernel = default.model.config._attn_implementation
    lines = [f"tiny GPT-2 (2 layers, d=32, vocab 64), {n} parameters, attention {kernel!r}, "
             f"{args.batch}x{args.seq} tokens, {args.dtype}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; median of {repeats}, interleaved"]
    autodiff.attention_kernels.math = True  # learnt (the "first of process" rows reset it)
    samples = measure(contenders(default, eager, data), repeats)
    med = {k: statistics.median(s) for k, s in samples.items()}
    low = {k: min(s) for k, s in samples.items()}
    unit, unit_low = med["gradient"], low["gradient"]
    lines.append(f"{'contender':24s} {'median ms':>10s} {'x gradient':>11s} {'min ms':>8s} "
                 f"{'x gradient':>11s}")
    lines.append("-" * 68)
    lines += [f"{k:24s} {1e3 * t:10.2f} {t / unit:11.2f} {1e3 * low[k]:8.2f} "
              f"{low[k] / unit_low:11.2f}" for k, t in med.items()]
    hvp, ggn = med["HVP"] / unit, med["GGN product"] / unit
    lines.append(f"target (medians) HVP <= 3x gradient: {hvp:.2f}x "
                 f"{'MET' if hvp <= 3 else 'NOT MET'}; GGN product <= 2x gradient: "
                 f"{ggn:.2f}x {'MET' if ggn <= 2 else 'NOT MET'}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_hf.txt").write_text(text + "\n")
    record = {"model": "gpt2-tiny", "attention": kernel, "num_params": n, "dtype": args.dtype,
              "batch": args.batch, "seq": args.seq, "repeats": repeats,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "median_seconds": med, "min_seconds": low,
              "ratio_to_gradient": {k: t / unit for k, t in med.items()},
              "ratio_to_gradient_of_minima": {k: t / unit_low for k, t in low.items()}}
    (out / "bench_hf.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
