"""Curvature-based optimizers vs first-order baselines, side by side in one run.

1. Digits MLP (``curvlab.bench.nn.digits_mlp_problem``: 64-128-128-10 ReLU, batch 128,
   target: full training loss <= 0.15): steps to target and median step time of K-FAC,
   EKFAC, natural gradient and Hessian-free against AdamW and SGD, every optimizer over
   its declared learning-rate grid and 3 seeds. Reports the K-FAC / AdamW steps ratio
   (best grid point of each, median over seeds) and divergences of K-FAC at its default
   damping over the whole grid. kfac-pytorch is included when importable.
2. Deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010) on digits pixels in
   [0, 1], 64-32-16-8-16-32-64 sigmoid, logistic outputs: Hessian-free for a wall-time
   budget, AdamW at each grid learning rate for the same wall time; reconstruction error
   (mean squared error of the sigmoid outputs) and the ratio HF / best AdamW. HF uses a
   random 512-sample curvature batch and initial damping 1e-4 (the default 1.0 spends
   ~25 steps only lowering it); AdamW uses batches of 128.

Usage: ``python benchmarks/bench_curvature_optim.py [--quick] [--only digits|autoencoder]
[--budget SECONDS] [--out results.json]`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab.bench.nn import digits_mlp_problem
from curvlab.optim import KFAC, HessianFree, NaturalGradient

RESULTS = Path(__file__).resolve().parent / "results" / "bench_curvature_optim.json"
BATCH_API = (HessianFree, NaturalGradient)  # optimizers that take step(closure, batch=...)


def _has_fisher() -> bool:
    return importlib.util.find_spec("curvlab.linops.fisher") is not None


def optimizer_grid(quick: bool) -> dict[str, tuple[Callable[[nn.Module, float], Any],
                                                   tuple[float, ...]]]:
    """name -> (factory(model, lr), declared lr grid)."""
    grid: dict[str, Any] = {
        "torch.SGD": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
                      (0.03, 0.1, 0.3)),
        "torch.AdamW": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr),
                        (1e-3, 3e-3, 1e-2)),
        "curvlab.KFAC": (lambda m, lr: KFAC(m, lr=lr), (0.03, 0.1, 0.3)),
        "curvlab.EKFAC": (lambda m, lr: KFAC(m, lr=lr, eigenvalue_correction=True),
                          (0.03, 0.1, 0.3)),
        "curvlab.HessianFree": (lambda m, lr: HessianFree(m, nn.CrossEntropyLoss(), lr=lr,
                                                          cg_max_iter=20), (1.0,)),
    }
    if _has_fisher():
        grid["curvlab.NaturalGradient"] = (
            lambda m, lr: NaturalGradient(m, lr=lr, damping=0.1, cg_max_iter=20), (0.3, 1.0))
    if importlib.util.find_spec("kfac") is not None:
        import kfac  # kfac-pytorch

        def _peer(m: nn.Module, lr: float) -> Any:
            base = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
            pre = kfac.preconditioner.KFACPreconditioner(m, damping=0.1)
            return _PeerKFAC(base, pre)
        grid["kfac-pytorch"] = (_peer, (0.03, 0.1, 0.3))
    if quick:
        grid = {k: (f, (lrs[len(lrs) // 2],)) for k, (f, lrs) in grid.items()}
    return grid


class _PeerKFAC:
    """kfac-pytorch's preconditioner + SGD behind ``step(closure)``."""

    def __init__(self, base: torch.optim.Optimizer, pre: Any) -> None:
        self.base, self.pre = base, pre

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = closure()
        self.pre.step()
        self.base.step()
        return loss

    def zero_grad(self) -> None:
        self.base.zero_grad()


EVAL_EVERY = 2  # finer than curvlab bench's 10, so the steps ratio is resolved
EXPENSIVE_CAP = 60  # step cap of HF and NGD (seconds per step; they hit the target early)


def train_digits(make: Callable[[nn.Module, float], Any], lr: float, seed: int, steps: int
                 ) -> dict[str, Any]:
    """One run: the problem, sampling and seeds of ``curvlab.bench.nn.train_run``, loss on
    the full training set every ``EVAL_EVERY`` steps (evaluation not timed)."""
    problem = digits_mlp_problem(steps=steps)
    problem.eval_every = EVAL_EVERY
    torch.manual_seed(seed)
    model = problem.build(seed)
    opt = make(model, lr)
    if isinstance(opt, BATCH_API):
        problem.steps = min(problem.steps, EXPENSIVE_CAP)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def evaluate() -> float:
        with torch.no_grad():
            return float(problem.loss_fn(model(problem.eval_batch[0]), problem.eval_batch[1]))

    losses, at, step_times, status = [evaluate()], [0], [], "ok"
    for step in range(1, problem.steps + 1):
        x, y = problem.sample(gen)

        def closure(x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = problem.loss_fn(model(x), y)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        if isinstance(opt, BATCH_API):
            opt.step(closure, batch=(x, y))
        else:
            opt.step(closure)
        step_times.append(time.perf_counter() - t0)
        if step % problem.eval_every == 0:
            value = evaluate()
            losses.append(value)
            at.append(step)
            if not math.isfinite(value) or value > 1e3 * losses[0]:
                status = "diverged"
                break
    hit = next((s for s, v in zip(at, losses, strict=True) if v <= problem.target), None)
    return {"status": status, "steps_to_target": hit, "final_loss": losses[-1],
            "step_time": statistics.median(step_times)}


def digits_section(quick: bool, seeds: list[int]) -> dict[str, Any]:
    steps = 40 if quick else 400
    grid = optimizer_grid(quick)
    rows, best = [], {}
    for name, (make, lrs) in grid.items():
        for lr in lrs:
            runs = [train_digits(make, lr, s, steps) for s in seeds]
            hits = [r["steps_to_target"] for r in runs]
            med = (statistics.median(hits) if all(h is not None for h in hits) else None)
            row = {"optimizer": name, "lr": lr, "median_steps_to_target": med,
                   "hits": hits, "diverged": sum(r["status"] == "diverged" for r in runs),
                   "median_final_loss": statistics.median(r["final_loss"] for r in runs),
                   "median_step_ms": 1e3 * statistics.median(r["step_time"] for r in runs)}
            rows.append(row)
            key = (med if med is not None else math.inf, row["median_final_loss"])
            if name not in best or key < best[name][0]:
                best[name] = (key, row)
    return {"rows": rows, "best": {k: v[1] for k, v in best.items()}, "steps": steps}


def autoencoder(seed: int, sizes=(64, 32, 16, 8, 16, 32, 64)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def autoencoder_section(quick: bool, seeds: list[int], budget: float) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    X = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss()

    def recon(m: nn.Module) -> float:
        with torch.no_grad():
            return float((torch.sigmoid(m(X)) - X).square().mean())

    lrs = (3e-2,) if quick else (3e-3, 1e-2, 3e-2)
    rows = []
    for seed in seeds:
        model = autoencoder(seed)
        opt = HessianFree(model, loss_fn, damping=1e-4, cg_max_iter=100,
                          curvature_batch_size=512)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < budget:
            opt.step(batch=(X, X))
            n += 1
        elapsed = time.perf_counter() - t0
        row = {"seed": seed, "hf": recon(model), "hf_steps": n, "budget_s": elapsed}
        for lr in lrs:
            model = autoencoder(seed)
            adam = torch.optim.AdamW(model.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < elapsed:
                idx = torch.randint(0, len(X), (128,), generator=gen)
                adam.zero_grad()
                loss_fn(model(X[idx]), X[idx]).backward()
                adam.step()
                n += 1
            row[f"adamw_{lr:g}"] = recon(model)
            row[f"adamw_{lr:g}_steps"] = n
        row["best_adamw"] = min(row[f"adamw_{lr:g}"] for lr in lrs)
        row["ratio_hf_over_adamw"] = row["hf"] / row["best_adamw"]
        rows.append(row)
    return {"rows": rows, "lrs": lrs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one lr, short runs")
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS})")
    parser.add_argument("--budget", type=float, default=None,
                        help="autoencoder wall-time budget per run in seconds")
    parser.add_argument("--only", choices=("digits", "autoencoder"), default=None,
                        help="run one section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # skipped-step notices of diverging grid points
    seeds = [0] if args.quick else [0, 1, 2]
    if importlib.util.find_spec("kfac") is None:
        print("kfac-pytorch: not installed (not on the package index here); skipped")
    if not _has_fisher():
        print("curvlab.NaturalGradient: curvlab.linops.fisher missing; skipped")

    results: dict[str, Any] = {}
    if args.only in (None, "digits"):
        results["digits"] = digits_section(args.quick, seeds)
        print_digits(results["digits"], seeds)
    if args.only in (None, "autoencoder"):
        budget = args.budget or (3.0 if args.quick else 60.0)
        results["autoencoder"] = autoencoder_section(args.quick, seeds, budget)
        print_autoencoder(results["autoencoder"], budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")


def print_digits(digits: dict[str, Any], seeds: list[int]) -> None:
    print(f"\n== digits MLP, {digits['steps']} steps (HF/NGD: {EXPENSIVE_CAP}), target loss "
          f"0.15 (full training set, checked every {EVAL_EVERY} steps), seeds {seeds}")
    print(f"{'optimizer':24s} {'lr':>7s} {'med steps':>9s} {'hits':>18s} {'div':>3s} "
          f"{'final loss':>10s} {'ms/step':>8s}")
    for r in digits["rows"]:
        med = "-" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:g}"
        hits = ",".join("-" if h is None else str(h) for h in r["hits"])
        print(f"{r['optimizer']:24s} {r['lr']:7g} {med:>9s} {hits:>18s} {r['diverged']:3d} "
              f"{r['median_final_loss']:10.4f} {r['median_step_ms']:8.2f}")
    best = digits["best"]
    kfac_best, adam_best = best["curvlab.KFAC"], best["torch.AdamW"]
    if kfac_best["median_steps_to_target"] and adam_best["median_steps_to_target"]:
        ratio = kfac_best["median_steps_to_target"] / adam_best["median_steps_to_target"]
        print(f"K-FAC / AdamW steps to target (best lr each): {ratio:.2f} "
              f"(K-FAC lr {kfac_best['lr']:g}, AdamW lr {adam_best['lr']:g})")
    for name in ("curvlab.KFAC", "kfac-pytorch"):
        if name in best:
            print(f"{name} median ms/step at best lr: {best[name]['median_step_ms']:.2f}")
    kfac_div = sum(r["diverged"] for r in digits["rows"] if r["optimizer"] == "curvlab.KFAC")
    print(f"K-FAC (default damping) divergences over the grid and seeds: {kfac_div}")


def print_autoencoder(ae: dict[str, Any], budget: float) -> None:
    print(f"\n== deep autoencoder 64-32-16-8-16-32-64 sigmoid, {budget:g}s per run, "
          f"reconstruction MSE")
    lrs = ae["lrs"]
    head = " ".join(f"{'AdamW ' + format(lr, 'g'):>12s}" for lr in lrs)
    print(f"{'seed':>4s} {'HF':>9s} {'HF steps':>8s} {head} {'HF/best AdamW':>13s}")
    for r in ae["rows"]:
        cols = " ".join(f"{r[f'adamw_{lr:g}']:12.5f}" for lr in lrs)
        print(f"{r['seed']:4d} {r['hf']:9.5f} {r['hf_steps']:8d} {cols} "
              f"{r['ratio_hf_over_adamw']:13.3f}")
    med = statistics.median(r["ratio_hf_over_adamw"] for r in ae["rows"])
    print(f"median HF / best-AdamW reconstruction error: {med:.3f}")


if __name__ == "__main__":
    main()
