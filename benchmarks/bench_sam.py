"""Does SAM find flatter minima than its base optimizer at the same training loss?

Task: a small CNN (conv 1->8 and 8->16, 3x3, ReLU, 2x2 max-pool, linear 256->32->10;
9.8k parameters) on scikit-learn's 8x8 digits (1438 training images, standardized;
359 held out), cross-entropy, mini-batches of 64 drawn with a seeded generator.

Optimizers, each with and without SAM (``curvlab.optim.SAM``, rho given per base):
  * SGD with momentum 0.9, lr 0.05;     SAM rho 0.05 (Foret et al.'s default)
  * AdamW lr 2e-3, weight decay 0;      SAM rho 0.05
  * ASAM (adaptive=True, eta 0.01, the authors' grouping: T = |w| + eta on weights, 1 on
    biases) on the same SGD, rho 0.5 (the ASAM authors' CIFAR-10 setting)
Every pair starts from the same initialization and sees the same mini-batches (seeds
0..S-1).

Protocol (matched training loss): the full training loss (all 1438 images) is evaluated
every 5 steps, and after every step once it is within 2x the next level. For each level
(default 0.05 and 0.01) a run is measured at the first crossing: at whichever of the two
evaluations around it (the first at or below the level, the one before) has the loss
closer to the level. The run goes on to the next level and stops after the last, or at the
step budget (then "NOT REACHED", left out of the ratios). The loss at the measurement is
printed per seed: it can miss the level by half a step's progress, and along these runs
lambda_max falls as the loss falls, so a lower loss lowers that run's lambda_max.
Measured there: lambda_max = the largest eigenvalue of the Hessian of the full training
loss, by Lanczos (``curvlab.diagnostics.lambda_max`` on ``curvlab.linops.HessianOperator``,
tol 1e-3; non-convergence is flagged), steps and gradient evaluations to get there (SAM
takes 2 per step) and held-out accuracy.

Output: per seed and median over seeds, ``ratio = lambda_max(SAM) / lambda_max(base)``
(< 1: SAM is flatter). Written to benchmarks/results/bench_sam.txt (table) and
bench_sam.json (records).

Run: python benchmarks/bench_sam.py [--seeds 3] [--targets 0.05,0.01] [--max-steps 3000]
     [--only SGD,SAM(SGD)]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from curvlab.bench.problems.digits import load_digits_tensors
from curvlab.diagnostics import lambda_max
from curvlab.linops import HessianOperator
from curvlab.optim import SAM, asam_param_groups

LOSS = nn.CrossEntropyLoss()
RESULTS = Path(__file__).resolve().parent / "results"
EVAL_EVERY = 5  # full-training-loss evaluations: every 5 steps, every step once the
NEAR = 2.0      # loss is within NEAR x the next level
BATCH = 64


def cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def data():
    (X, y), (Xt, yt) = load_digits_tensors(seed=0)
    return (X.reshape(-1, 1, 8, 8), y), (Xt.reshape(-1, 1, 8, 8), yt)


# name -> (base label, SAM?, optimizer factory)
Factory = Callable[[nn.Module], torch.optim.Optimizer]
METHODS: dict[str, tuple[str, bool, Factory]] = {
    "SGD": ("SGD", False, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)),
    "SAM(SGD)": ("SGD", True, lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05,
                                              lr=0.05, momentum=0.9)),
    "ASAM(SGD)": ("SGD", True, lambda m: SAM(asam_param_groups(m), torch.optim.SGD, rho=0.5,
                                               adaptive=True, eta=0.01, lr=0.05,
                                               momentum=0.9)),
    "AdamW": ("AdamW", False, lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3,
                                                           weight_decay=0.0)),
    "SAM(AdamW)": ("AdamW", True, lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=0.05,
                                                  lr=2e-3, weight_decay=0.0)),
}


def full_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(LOSS(model(X), y))


def measure(model: nn.Module, train, test, seed: int) -> dict:
    """lambda_max of the full training loss's Hessian and the held-out accuracy."""
    X, y = train
    t0 = time.perf_counter()
    eig = lambda_max(HessianOperator(model, LOSS, (X, y)), tol=1e-3,
                     generator=torch.Generator().manual_seed(seed))
    Xt, yt = test
    with torch.no_grad():
        acc = float((model(Xt).argmax(1) == yt).float().mean())
    return {"lambda_max": float(eig.eigenvalues[0]), "lanczos_converged": bool(eig.converged),
            "hvps": eig.num_matvecs, "test_acc": acc,
            "lanczos_seconds": time.perf_counter() - t0}


def run(method: str, seed: int, train, test, targets: list[float], max_steps: int
        ) -> list[dict]:
    """Train until the full training loss falls below each target in turn (descending);
    one record per target, measured at whichever of the two evaluations bracketing its
    first crossing has the loss closer to it."""
    base, is_sam, make = METHODS[method]
    X, y = train
    model = cnn(seed)
    opt = make(model)
    gen = torch.Generator().manual_seed(1000 + seed)
    pending = sorted(targets, reverse=True)
    out = []
    step, train_time, loss = 0, 0.0, math.inf
    before = (math.inf, 0, None)  # the previous evaluation: loss, step, parameters
    while step < max_steps and pending:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(y), (BATCH,), generator=gen)
        xb, yb = X[idx], y[idx]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            batch_loss = LOSS(model(xb), yb)
            batch_loss.backward()
            return batch_loss

        if is_sam:
            opt.step(closure)
        else:
            closure()
            opt.step()
        step += 1
        train_time += time.perf_counter() - t0
        if step % EVAL_EVERY == 0 or loss <= NEAR * pending[0]:
            loss = full_loss(model, X, y)
            if not math.isfinite(loss):
                break
            while pending and loss <= pending[0]:
                level = pending.pop(0)
                at, at_loss, at_step = model, loss, step
                if before[2] is not None and before[0] - level < level - loss:
                    at = copy.deepcopy(model)
                    at.load_state_dict(before[2])
                    at_loss, at_step = before[0], before[1]
                out.append({"target": level, "reached": True, "train_loss": at_loss,
                            "steps": at_step, **measure(at, train, test, seed)})
            before = (loss, step, copy.deepcopy(model.state_dict()))
    loss = full_loss(model, X, y)
    for target in pending:
        out.append({"target": target, "reached": False, "train_loss": loss, "steps": step,
                    **measure(model, train, test, seed)})
    for r in out:
        r.update({"method": method, "base": base, "sam": is_sam, "seed": seed,
                  "grad_evals": r["steps"] * (2 if is_sam else 1),
                  "train_seconds": train_time})
    return out


def table(records: list[dict], seeds: list[int], target: float) -> str:
    records = [r for r in records if r["target"] == target]
    by = {(r["method"], r["seed"]): r for r in records}
    lines = [f"== matched training loss {target}: measured at the evaluation closest to the "
             f"first crossing of {target}",
             "per seed: lambda_max (training loss at the stop, steps, held-out accuracy)"]
    methods = list(dict.fromkeys(r["method"] for r in records))
    for m in methods:
        cells = []
        for s in seeds:
            r = by[(m, s)]
            flag = "" if r["reached"] else " NOT REACHED"
            conv = "" if r["lanczos_converged"] else " (Lanczos not converged)"
            cells.append(f"s{s}: {r['lambda_max']:6.3f} ({r['train_loss']:.4f}, "
                         f"{r['steps']:4d}, {r['test_acc']:.3f}){flag}{conv}")
        lines.append(f"  {m:11s} " + " | ".join(cells))
    lines += ["median over seeds; ratio = lambda_max(method) / lambda_max(its base) per seed "
              "(< 1: flatter), and their median",
              f"  {'method':11s} {'lambda_max':>10s} {'train loss':>10s} {'steps':>6s} "
              f"{'grad evals':>10s} {'test acc':>8s} {'ratio per seed':>20s} {'median':>7s}"]
    for m in methods:
        rs = [by[(m, s)] for s in seeds]
        ok = [r for r in rs if r["reached"]]
        if not ok:
            lines.append(f"  {m:11s} target not reached in any seed")
            continue
        base = rs[0]["base"]
        ratios = []
        if rs[0]["sam"]:
            ratios = [by[(m, s)]["lambda_max"] / by[(base, s)]["lambda_max"] for s in seeds
                      if by[(m, s)]["reached"] and by[(base, s)]["reached"]]
        ratio_txt = ", ".join(f"{x:.2f}" for x in ratios) if ratios else "-"
        med_ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        lines.append(
            f"  {m:11s} {statistics.median(r['lambda_max'] for r in ok):10.3f} "
            f"{statistics.median(r['train_loss'] for r in ok):10.4f} "
            f"{statistics.median(r['steps'] for r in ok):6.0f} "
            f"{statistics.median(r['grad_evals'] for r in ok):10.0f} "
            f"{statistics.median(r['test_acc'] for r in ok):8.3f} {ratio_txt:>20s} "
            f"{med_ratio:>7s}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", default="0.05,0.01",
                    help="matched training-loss levels (comma-separated)")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "bench_sam.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    seeds = list(range(args.seeds))
    targets = sorted((float(t) for t in args.targets.split(",")), reverse=True)
    train, test = data()
    records = []
    t0, c0 = time.perf_counter(), time.process_time()
    for seed in seeds:
        for m in methods:
            for r in run(m, seed, train, test, targets, args.max_steps):
                records.append(r)
                print(f"{m:11s} seed {seed} target {r['target']}: steps {r['steps']:5d} "
                      f"loss {r['train_loss']:.4f} lambda_max {r['lambda_max']:.3f} "
                      f"acc {r['test_acc']:.3f}", flush=True)
    text = "\n\n".join(table(records, seeds, t) for t in targets)
    text += (f"\n\nwall time {time.perf_counter() - t0:.0f} s, CPU time "
             f"{time.process_time() - c0:.0f} s (torch {torch.__version__}, 1 thread; "
             "timings are not results)")
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"targets": targets, "seeds": seeds, "eval_every": EVAL_EVERY, "batch": BATCH,
         "records": records}, indent=1))


if __name__ == "__main__":
    main()
