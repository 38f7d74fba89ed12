"""Cost of a Hessian-vector product, side by side, as a multiple of one gradient.

Models: an MLP 784-256-256-10 (batch 512) and a small CNN (batch 128), float32, CPU.
Contenders, timed in interleaved rounds so machine noise hits all of them alike:

  gradient             torch.autograd.grad of the loss (the unit)
  raw double-backward  autograd.grad(create_graph=True), then autograd.grad of <g, v>
  raw rev-over-rev     torch.func.vjp(torch.func.grad(f))
  raw fwd-over-rev     torch.func.jvp(torch.func.grad(f))
  curvlab hvp          curvlab.hvp(f, params, v) (mode="auto")
  curvlab op matvec    HessianOperator @ v (gradient graph recorded once and reused)
  curvlab batched/10   curvlab.hvp with 10 vectors at once, time per vector
  curvlinops matvec    curvlinops.HessianLinearOperator @ v (skipped if not installed)

Run: python benchmarks/bench_autodiff.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from curvlab.bench.curvature import cnn, contenders, measure, mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 30)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
    for name, build in (("MLP 784-256-256-10, batch 512", mlp), ("CNN 3x32x32, batch 128", cnn)):
        model, X, y = build()
        runs = contenders(model, X, y)
        if importlib.util.find_spec("curvlinops") is None:
            print("  curvlinops not installed (pip install -e '.[bench]'): skipped")
        med = measure(runs, repeats)
        unit = med["gradient"]
        raw_best = min(med[k] for k in med if k.startswith("raw"))
        print(f"\n{name}  (median of {repeats}; ratios to one gradient)")
        print(f"  {'method':24s} {'ms':>9s} {'x grad':>8s} {'x best raw':>11s}")
        for k, t in med.items():
            print(f"  {k:24s} {1e3 * t:9.2f} {t / unit:8.2f} {t / raw_best:11.2f}")
        if "_curvlinops default setup" in runs:
            extra = runs["_curvlinops default setup"][1]
            print(f"  curvlinops default construction (check_deterministic=True) costs "
                  f"{extra / unit:.0f} gradients; curvlab operators run no checks")


if __name__ == "__main__":
    main()
