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
import statistics
import time

import torch
import torch.func as tf
from torch import nn

import curvlab
from curvlab.linops import HessianOperator


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return model, torch.randn(512, 784), torch.randint(0, 10, (512,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    return model, torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))


def contenders(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    params = {k: p.detach() for k, p in model.named_parameters()}
    leaves = list(model.parameters())

    def f(p):
        return loss_fn(tf.functional_call(model, p, (X,)), y)

    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    V = {k: torch.randn((10, *p.shape), generator=g) for k, p in params.items()}
    v_list = list(v.values())

    def gradient():
        return torch.autograd.grad(loss_fn(model(X), y), leaves)

    def double_backward():
        gs = torch.autograd.grad(loss_fn(model(X), y), leaves, create_graph=True)
        return torch.autograd.grad(gs, leaves, grad_outputs=v_list)

    def rev_rev():
        return tf.vjp(tf.grad(f), params)[1](v)

    def fwd_rev():
        return tf.jvp(tf.grad(f), (params,), (v,))[1]

    op = HessianOperator(model, loss_fn, (X, y))
    v_flat = op.objective.flatten(v)
    op @ v_flat  # record the gradient graph once; later products reuse it

    runs = {
        "gradient": (gradient, 1),
        "raw double-backward": (double_backward, 1),
        "raw rev-over-rev": (rev_rev, 1),
        "raw fwd-over-rev": (fwd_rev, 1),
        "curvlab hvp": (lambda: curvlab.hvp(f, params, v), 1),
        "curvlab op matvec": (lambda: op @ v_flat, 1),
        "curvlab batched/10": (lambda: curvlab.hvp(f, params, V, batched=True), 10),
    }
    try:
        from curvlinops import HessianLinearOperator

        t0 = time.perf_counter()
        peer = HessianLinearOperator(model, loss_fn, leaves, [(X, y)], check_deterministic=False)
        runs["curvlinops matvec"] = (lambda: peer @ v_flat, 1)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        HessianLinearOperator(model, loss_fn, leaves, [(X, y)])
        runs["_curvlinops default setup"] = (None, time.perf_counter() - t0 - setup)
    except ImportError:
        print("  curvlinops not installed (pip install -e '.[bench]'): skipped")
    return runs


def measure(runs: dict, repeats: int) -> dict[str, float]:
    timed = {k: v for k, v in runs.items() if v[0] is not None}
    for fn, _ in timed.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(repeats):
        for name, (fn, per) in timed.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) / per)
    return {k: statistics.median(s) for k, s in samples.items()}


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
