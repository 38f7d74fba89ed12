"""Cost of CurvatureMonitor at its default settings on a tiny GPT-2.

AdamW (lr 3e-3, no warmup) trains a tiny GPT-2 (2 layers, width 32, 2 heads, context 32,
vocabulary 64: the builder of ``tests/hf/_hf_models.py``, float32) on character-level text
of the Python standard library (ids mod 64), batch 16 x 32 tokens. The same training run,
side by side, one step of each in turn (the order alternating, every step timed, so load
changes on a shared machine hit both alike), repeated over rounds: without a monitor, and
with
``CurvatureMonitor(model, None, batch, optimizer=opt)`` at its defaults (checks at steps
1, 4, 16, 64, then every 200 steps, adaptive; tol 3e-2; gradient norm / update size
every 20 steps) on a fixed 16-sequence monitor batch (the HF callback's default size).
For AdamW the monitor computes the preconditioned sharpness (its governing ratio) at each
check.

Reported: wall time of both (medians over rounds), the extra wall time of the monitored
run relative to the plain one (the target: <= 10%; under load it is noisy, hence also) the
monitor's self-measured overhead (time inside ``monitor.step`` over the monitored run's
training time),
checks, HVPs per check, and that the two runs' parameters are identical (the monitor does
not change training).

Run: python benchmarks/bench_monitor_overhead.py [--quick] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from curvlab.bench.problems.char_lm import char_batch, load_char_corpus
from curvlab.diagnostics import CurvatureMonitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hf"))
from _hf_models import VOCAB, build  # noqa: E402


class Run:
    """One training run (plain or monitored) that advances one step at a time."""

    def __init__(self, with_monitor: bool, ids: torch.Tensor) -> None:
        self.model = build("gpt2", dtype=torch.float32, seed=0,
                           attn_implementation="eager").train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.g = torch.Generator().manual_seed(1)
        self.ids = ids
        mx, _ = char_batch(ids, 16, 32, torch.Generator().manual_seed(123))
        self.monitor = (CurvatureMonitor(self.model, None, {"input_ids": mx, "labels": mx},
                                         optimizer=self.opt,
                                         generator=torch.Generator().manual_seed(0))
                        if with_monitor else None)
        self.seconds = 0.0
        self.rng = torch.get_rng_state()  # its own Dropout stream (the runs take turns)

    def step(self) -> None:
        torch.set_rng_state(self.rng)
        t = time.perf_counter()
        x, _ = char_batch(self.ids, 16, 32, self.g)
        self.opt.zero_grad()
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        if self.monitor is not None:
            self.monitor.step(loss)
        self.seconds += time.perf_counter() - t
        self.rng = torch.get_rng_state()

    def result(self) -> dict:
        out = {"seconds": self.seconds,
               "params": torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])}
        m = self.monitor
        if m is not None:
            out.update(overhead=m.monitor_time / self.seconds, checks=len(m.checks),
                       hvps=m.hvps_per_check, converged=sum(c["converged"] for c in m.checks),
                       warnings=len(m.warnings))
        return out


def train_pair(steps: int, ids: torch.Tensor) -> tuple[dict, dict]:
    """The plain and the monitored run side by side: one step of each in turn (the order
    alternating), each step timed, so load changes on a shared machine hit both alike."""
    plain, monitored = Run(False, ids), Run(True, ids)
    for i in range(steps):
        for run in ((plain, monitored) if i % 2 == 0 else (monitored, plain)):
            run.step()
    return plain.result(), monitored.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 steps, 2 rounds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("curvlab").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    steps = args.steps or (600 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 3)
    ids, _, _ = load_char_corpus(max_chars=300_000)
    ids = ids % VOCAB
    plain, monitored = [], []
    for _ in range(rounds):
        p, m = train_pair(steps, ids)
        plain.append(p)
        monitored.append(m)
    tp = statistics.median(r["seconds"] for r in plain)
    tm = statistics.median(r["seconds"] for r in monitored)
    extra = statistics.median(m["seconds"] / p["seconds"] - 1
                              for p, m in zip(plain, monitored, strict=True))
    m0 = monitored[0]
    same = all(torch.equal(p["params"], m["params"]) for p, m in zip(plain, monitored,
                                                                     strict=True))
    print(f"tiny GPT-2 (2x32, vocab {VOCAB}), AdamW 3e-3, batch 16x32, {steps} steps, "
          f"{rounds} rounds (medians), plain and monitored steps interleaved one by one; "
          "monitor at its defaults")
    print(f"{'plain training (s)':<44}{tp:>10.2f}")
    print(f"{'with monitor (s)':<44}{tm:>10.2f}")
    print(f"{'extra wall time vs plain (median of rounds)':<44}{100 * extra:>9.1f}%")
    print(f"{'monitor self-measured overhead':<44}"
          f"{100 * statistics.median(r['overhead'] for r in monitored):>9.1f}%")
    print(f"{'checks per run':<44}{m0['checks']:>10d}")
    print(f"{'HVPs per check (governing eigenvalue)':<44}{m0['hvps']:>10.2f}")
    print(f"{'checks certified converged':<44}{m0['converged']:>7d}/{m0['checks']}")
    print(f"{'warnings (healthy run)':<44}{m0['warnings']:>10d}")
    print(f"{'training identical with and without':<44}{str(same):>10}")
    print(f"target (extra wall time <= 10%): {'MET' if extra <= 0.10 else 'NOT MET'}")


if __name__ == "__main__":
    main()
