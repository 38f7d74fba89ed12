"""Cost of GGN / Fisher products, side by side, as a multiple of one gradient.

Models: an MLP 784-256-256-10 (batch 512), a small CNN (batch 128) and a small
LayerNorm MLP 64-32-10 (batch 256, where per-call overhead matters), float32, CPU,
cross-entropy loss. Contenders, timed in interleaved rounds so machine noise hits all of
them alike (median over repeats; "/10" rows are a block of 10 vectors, time per vector):

  gradient               torch.autograd.grad of the loss (the unit)
  raw func jvp+vjp       torch.func: vjp (forward + graph) and jvp per product, no caching
  raw func vmap/10       the same with vmap over 10 vectors
  curvlab GGN matvec     GGNOperator @ v (forward recorded once; J v by double backward)
  curvlab GGN /10        GGNOperator @ V, V of shape (n, 10)
  curvlab GGN uncached   GGNOperator(cache_graph=False) @ v (what several batches cost)
  curvlab GGN uncached/10  the same with a block of 10 (forward shared by the block)
  curvlab EF / MC-Fisher EmpiricalFisherOperator / FisherOperator(mode="mc") @ v
  curvlinops GGN / EF    curvlinops GGNLinearOperator / EFLinearOperator @ v (and /10)

The exact GGN diagonal (DiagonalOperator) is timed against BackPACK's DiagGGNExact on the
MLP when BackPACK is installed. Results also go to a JSON file with ``--json PATH``.

Run: python benchmarks/bench_linops.py [--quick] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.func as tf
from torch import nn

from curvlab.linops import (
    DiagonalOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
)


def mlp(batch: int = 512) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return model, torch.randn(batch, 784), torch.randint(0, 10, (batch,))


def cnn(batch: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def contenders(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    loss_fn = nn.CrossEntropyLoss()
    params = {k: p.detach() for k, p in model.named_parameters()}
    leaves = list(model.parameters())

    def outputs(p):
        return tf.functional_call(model, p, (X,))

    op = GGNOperator(model, loss_fn, (X, y))
    g = torch.Generator().manual_seed(1)
    n = op.shape[0]
    v = torch.randn(n, generator=g)
    V = torch.randn(n, 10, generator=g)
    v_tree = op.objective.unflatten(v)
    V_tree = op.objective.unflatten(V.T, batched=True)

    def loss_hvp(out, u):
        p = out.softmax(-1)
        return (p * u - p * (p * u).sum(-1, keepdim=True)) / out.shape[0]

    def raw_single():
        out, vjp_fn = tf.vjp(outputs, params)
        jv = tf.jvp(outputs, (params,), (v_tree,))[1]
        return vjp_fn(loss_hvp(out.detach(), jv))

    def raw_block():
        out, vjp_fn = tf.vjp(outputs, params)
        jv = tf.vmap(lambda t: tf.jvp(outputs, (params,), (t,))[1])(V_tree)
        return tf.vmap(vjp_fn)(loss_hvp(out.detach(), jv))

    uncached = GGNOperator(model, loss_fn, (X, y), cache_graph=False)
    ef = EmpiricalFisherOperator(model, loss_fn, (X, y))
    mc = FisherOperator(model, loss_fn, (X, y), mode="mc", seed=0)
    for o in (op, ef, mc):
        o @ v  # record the forward (and J^T u) graphs once; later products reuse them
    op @ V
    runs = {
        "gradient": (lambda: torch.autograd.grad(loss_fn(model(X), y), leaves), 1),
        "raw func jvp+vjp": (raw_single, 1),
        "raw func vmap/10": (raw_block, 10),
        "curvlab GGN matvec": (lambda: op @ v, 1),
        "curvlab GGN /10": (lambda: op @ V, 10),
        "curvlab GGN uncached": (lambda: uncached @ v, 1),
        "curvlab GGN uncached/10": (lambda: uncached @ V, 10),
        "curvlab EF matvec": (lambda: ef @ v, 1),
        "curvlab MC-Fisher matvec": (lambda: mc @ v, 1),
    }
    agreement = {}
    try:
        from curvlinops import EFLinearOperator, GGNLinearOperator

        peer = GGNLinearOperator(model, loss_fn, leaves, [(X, y)], check_deterministic=False)
        peer_ef = EFLinearOperator(model, loss_fn, leaves, [(X, y)], check_deterministic=False)
        runs["curvlinops GGN matvec"] = (lambda: peer @ v, 1)
        runs["curvlinops GGN /10"] = (lambda: peer @ V, 10)
        runs["curvlinops EF matvec"] = (lambda: peer_ef @ v, 1)
        ref = peer @ v
        agreement["GGN vs curvlinops"] = float((op @ v - ref).norm() / ref.norm())
        ref = peer_ef @ v
        agreement["EF vs curvlinops"] = float((ef @ v - ref).norm() / ref.norm())
    except ImportError:
        print("  curvlinops not installed (pip install -e '.[bench]'): skipped")
    return runs, agreement


def measure(runs: dict, repeats: int) -> dict[str, float]:
    for fn, _ in runs.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (fn, per) in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) / per)
    return {k: statistics.median(s) for k, s in samples.items()}


def diagonal_runs(repeats: int) -> dict[str, float]:
    """Exact GGN diagonal: curvlab vs BackPACK (one small MLP batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    loss_fn = nn.CrossEntropyLoss()
    runs = {"curvlab DiagonalOperator": lambda: DiagonalOperator(model, loss_fn,
                                                                 (X, y)).diagonal}
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        # a copy: BackPACK's module hooks are incompatible with torch.func transforms
        bp_model, bp_loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def backpack_diag():
            bp_model.zero_grad()
            with backpack(DiagGGNExact()):
                bp_loss(bp_model(X), y).backward()
            return torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_model.parameters()])

        runs["backpack DiagGGNExact"] = backpack_diag
        ours, theirs = runs["curvlab DiagonalOperator"](), backpack_diag()
        print(f"  exact GGN diagonal: relative difference to BackPACK "
              f"{float((ours - theirs).norm() / theirs.norm()):.1e}")
    except ImportError:
        print("  BackPACK not installed: diagonal comparison skipped")
    return measure({k: (f, 1) for k, f in runs.items()}, repeats)


def small(batch: int = 256) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 10))
    return model, torch.randn(batch, 64), torch.randint(0, 10, (batch,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats, quarter-size batches (well under a minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the medians to this JSON file")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 25)
    shrink = 4 if args.quick else 1
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
    results: dict[str, dict] = {}
    problems = (("MLP 784-256-256-10", mlp, 512), ("CNN 3x32x32", cnn, 128),
                ("LayerNorm MLP 64-32-10", small, 256))
    for title, build, batch in problems:
        name = f"{title}, batch {batch // shrink}"
        model, X, y = build(batch // shrink)
        runs, agreement = contenders(model, X, y)
        med = measure(runs, repeats)
        unit = med["gradient"]
        print(f"\n{name}  (median of {repeats}; per vector; ratios to one gradient)")
        print(f"  {'method':26s} {'ms':>9s} {'x grad':>8s}")
        for k, t in med.items():
            print(f"  {k:26s} {1e3 * t:9.2f} {t / unit:8.2f}")
        for k, r in agreement.items():
            print(f"  agreement {k}: relative difference {r:.1e}")
        results[name] = {"median_seconds": med, "agreement": agreement}
    print("\nExact GGN diagonal, MLP 64-64-10, batch 256")
    med = diagonal_runs(max(3, repeats // 5))
    for k, t in med.items():
        print(f"  {k:26s} {1e3 * t:9.2f} ms")
    results["diagonal"] = {"median_seconds": med}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
