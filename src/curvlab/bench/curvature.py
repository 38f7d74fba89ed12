"""HVP cost for ``curvlab bench --suite curvature`` and ``benchmarks/bench_autodiff.py``.

Each contender computes one product (or a batch of 10, timed per vector) on the same
model and data; timings are interleaved rounds so machine noise hits all alike, and the
unit is one gradient.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf
from torch import nn

import curvlab
from curvlab.bench.runner import Task
from curvlab.linops import HessianOperator

__all__ = ["mlp", "cnn", "contenders", "measure", "curvature_tasks"]


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
        pass  # peer not installed: its row is simply absent
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




def _hvp_task(name: str, build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]],
              repeats: int) -> Task:
    def fn(progress: Any) -> dict[str, Any]:
        model, X, y = build()
        runs = contenders(model, X, y)
        med = measure(runs, repeats)
        progress(1.0)
        return {"metrics": {"times": med}}

    return Task("curvature", name, "hvp-cost", {"repeats": repeats}, fn)


def curvature_tasks(quick: bool) -> list[Task]:
    """One HVP-cost task per model; its record holds every contender's median time."""
    repeats = 5 if quick else 20
    tasks = [_hvp_task("mlp_784_256_256_10", mlp, repeats)]
    if not quick:
        tasks.append(_hvp_task("cnn_3x32x32", cnn, repeats))
    return tasks
