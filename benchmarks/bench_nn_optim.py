"""Neural-network optimizers side by side: steps and wall time to a target loss.

Tasks (CPU, float32):
  digits   MLP 64-128-128-10 on scikit-learn's digits, batch 128; metric: full training loss.
  charlm   character-level transformer (2 layers, d_model 128, 4 heads, context 32, batch 32)
           on the Python standard library's source text; metric: validation loss (nats/char).

Every optimizer is a registry entry (factory + declared learning-rate grid); new optimizers
(K-FAC, natural gradient, Hessian-free) are added as more entries. Protocol per task:
  1. tune: every lr of the grid with seed 0; pick the lr with the lowest mean evaluated loss
     over the run (area under the loss curve: rewards both speed and final loss);
  2. evaluate: that lr with all seeds; report medians over seeds;
  3. target: AdamW's median-seed loss at 75% of the step budget (so the reference reaches it
     by construction, and the target is not chosen to suit anyone);
  4. step time: all optimizers on identical copies of the model and one fixed gradient,
     stepped in interleaved rounds so machine noise hits them alike; median per step.
Columns: steps to target, wall time to target (forward + backward + step, evaluation
excluded), final loss, optimizer step time -- each also as a ratio to AdamW. "-" = target
not reached within the step budget (by the median seed).

Peers: torch.optim AdamW / SGD (Nesterov) / Muon (+ AdamW for non-matrix parameters, both
with the match_rms_adamw rule so one lr serves both), pytorch-optimizer SOAP / Shampoo /
ScalableShampoo and heavyball SOAP (uncompiled) when installed; Distributed Shampoo is not
installable from PyPI and is reported as skipped.

Run: python benchmarks/bench_nn_optim.py [--quick] [--tasks digits,charlm] [--seeds 3]
                                         [--only name,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from curvlab.bench.optimizers import REGISTRY as OPTIMIZERS
from curvlab.bench.problems.char_lm import char_batch, char_lm_loss, char_lm_model, load_char_corpus
from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors


# ------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    make_model: Callable[[int], nn.Module]
    batch: Callable[[torch.Generator], tuple]  # -> (x, y)
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    target: float | None  # None: set from AdamW's runs (see module docstring)
    steps: int
    eval_every: int


def digits_task(quick: bool) -> Task:
    (X, y), _ = load_digits_tensors()
    ce = nn.CrossEntropyLoss()

    def batch(gen: torch.Generator) -> tuple:
        idx = torch.randint(0, len(y), (128,), generator=gen)
        return X[idx], y[idx]

    def evaluate(model: nn.Module) -> float:
        # full training loss: the test split has features that are constant on the training
        # split, which the standardization blows up, so test cross-entropy is dominated by a
        # few samples
        with torch.no_grad():
            return ce(model(X), y).item()

    return Task("digits_mlp", lambda seed: digits_mlp(seed=seed), batch,
                lambda m, a, b: ce(m(a), b), evaluate, target=None,
                steps=40 if quick else 60, eval_every=5)


def charlm_task(quick: bool) -> Task:
    train, val, vocab = load_char_corpus(max_chars=300_000 if quick else 1_000_000)
    seq = 32
    gval = torch.Generator().manual_seed(1234)
    vbatches = [char_batch(val, 64, seq, gval) for _ in range(2 if quick else 4)]
    d, layers = (64, 1) if quick else (128, 2)

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(char_lm_loss(model, a, b).item() for a, b in vbatches) / len(vbatches)

    return Task("char_lm", lambda seed: char_lm_model(len(vocab), d, layers, 4, seq, seed),
                lambda gen: char_batch(train, 16 if quick else 32, seq, gen), char_lm_loss,
                evaluate, target=None, steps=30 if quick else 160, eval_every=5 if quick else 10)


# ------------------------------------------------------------------------------- registry
@dataclass
class Entry:
    """A registry entry of :mod:`curvlab.bench.optimizers` in this script's terms (the
    optimizers, their factories and declared grids live there, shared with
    ``curvlab bench``). Entries that need ``step(closure)`` (Hessian-free, natural gradient)
    are compared in ``benchmarks/bench_curvature_optim.py`` instead."""

    name: str
    family: str  # algorithm, for "fastest peer of the same algorithm"
    factory: Callable[[nn.Module, float, str], object]  # (model, lr, task name)
    lrs: dict[str, list[float]]  # task -> declared grid
    requires: str | None = None
    curvlab: bool = False
    note: str = ""


REGISTRY: list[Entry] = [
    Entry(spec.name, spec.algorithm, spec.make, {k: list(v) for k, v in spec.lrs.items()},
          spec.requires, spec.family == "curvlab", spec.note)
    for spec in OPTIMIZERS.values() if spec.algorithm not in ("hessian-free", "natural-gradient")
] + [Entry("kfac-pytorch", "kfac", lambda m, lr, t: None, {}, requires="kfac",
           note="not installable from the package index here")]


# ------------------------------------------------------------------------------- running
def train(task: Task, entry: Entry, lr: float, seed: int) -> dict:
    """One run; the curve records ``(step, eval loss, training wall time so far)``."""
    model = task.make_model(seed)
    opt = entry.factory(model, lr, task.name)
    gen = torch.Generator().manual_seed(seed)
    wall, curve, error = 0.0, [], None
    final = task.evaluate(model)
    for step in range(1, task.steps + 1):
        x, y = task.batch(gen)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = task.loss(model, x, y)
        loss.backward()
        try:
            opt.step()
        except RuntimeError as err:  # a peer's matrix function failed: record, stop the run
            error = f"step {step}: {type(err).__name__}: {str(err)[:80]}"
            final = float("inf")
            break
        wall += time.perf_counter() - t0
        if step % task.eval_every == 0 or step == task.steps:
            final = task.evaluate(model)
            if not math.isfinite(final):
                final = float("inf")
                break
            curve.append((step, final, wall))
    return {"lr": lr, "seed": seed, "final_loss": final, "curve": curve, "error": error,
            "auc": (statistics.mean(c[1] for c in curve) if curve and math.isfinite(final)
                    else math.inf)}


def reach(run: dict, target: float) -> tuple[int | None, float | None]:
    """First evaluated step (and its training wall time) with loss <= target."""
    return next(((s, w) for s, loss, w in run["curve"] if loss <= target), (None, None))


def step_times(task: Task, entries: list[tuple[Entry, float]], rounds: int) -> dict[str, float]:
    """Median optimizer.step() time per entry, interleaved rounds on one fixed gradient."""
    gen = torch.Generator().manual_seed(0)
    base = task.make_model(0)
    x, y = task.batch(gen)
    opts = []
    for entry, lr in entries:
        model = copy.deepcopy(base)
        opt = entry.factory(model, lr, task.name)
        task.loss(model, x, y).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opts.append((entry.name, opt, model, grads))
    times: dict[str, list[float]] = {name: [] for name, _, _, _ in opts}
    for r in range(rounds):
        for name, opt, model, grads in opts:
            saved = [p.detach().clone() for p in model.parameters()]
            # some peers free .grad after a step
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            t0 = time.perf_counter()
            try:
                opt.step()
            except RuntimeError:
                continue
            times[name].append(time.perf_counter() - t0)
            if r % 10 == 9:  # keep parameters bounded under the repeated fixed gradient
                with torch.no_grad():
                    for p, s in zip(model.parameters(), saved, strict=True):
                        p.copy_(s)
    skip = min(5, rounds // 4)
    return {name: statistics.median(ts[skip:]) for name, ts in times.items() if ts[skip:]}


def run_task(task: Task, entries: list[Entry], seeds: list[int], quick: bool, log) -> list[dict]:
    rows = []
    for entry in entries:
        if task.name not in entry.lrs:
            continue
        grid = entry.lrs[task.name]
        if quick:
            grid = [grid[len(grid) // 2]]
        t0 = time.perf_counter()
        tune = [train(task, entry, lr, seeds[0]) for lr in grid]
        best = min(tune, key=lambda r: (r["auc"], r["final_loss"]))
        runs = [best] + [train(task, entry, best["lr"], s) for s in seeds[1:]]
        errors = [r["error"] for r in tune + runs[1:] if r["error"]]
        rows.append({
            "task": task.name, "optimizer": entry.name, "family": entry.family,
            "curvlab": entry.curvlab, "lr": best["lr"],
            "tuning": {str(r["lr"]): r["auc"] for r in tune},
            "final_loss": statistics.median([r["final_loss"] for r in runs]),
            "runs": runs, "errors": errors,
        })
        log(f"  {task.name:7s} {entry.name:34s} lr={best['lr']:<7g} "
            f"final={rows[-1]['final_loss']:.4f} ({time.perf_counter() - t0:.0f}s)"
            + (f" errors: {errors[0]}" if errors else ""))
    ref = next(r for r in rows if r["family"] == "adamw")
    target = task.target
    if target is None:  # AdamW's median-seed loss at 75% of the budget
        at = 0.75 * task.steps
        target = statistics.median(
            min(run["curve"], key=lambda c: abs(c[0] - at))[1] for run in ref["runs"])
    log(f"  {task.name}: target loss {target:.4f}")
    for row in rows:
        hits = [reach(r, target) for r in row["runs"]]
        # median over seeds; a seed that misses counts as +inf; "-" if most seeds miss
        steps = statistics.median([s if s is not None else math.inf for s, _ in hits])
        walls = statistics.median([w if w is not None else math.inf for _, w in hits])
        row.update(target=target, steps_to_target=None if math.isinf(steps) else steps,
                   wall_to_target=None if math.isinf(walls) else walls)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def print_table(rows: list[dict], step_ms: dict[tuple[str, str], float]) -> None:
    header = (f"{'task':10s} {'optimizer':34s} {'lr':>7s} {'steps':>6s} {'/AdamW':>7s} "
              f"{'wall s':>7s} {'/AdamW':>7s} {'final':>7s} {'step ms':>8s} {'/AdamW':>7s}")
    print(header)
    print("-" * len(header))
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        ref = next((r for r in trs if r["family"] == "adamw"), None)
        ref_ms = step_ms.get((task, ref["optimizer"])) if ref else None
        for r in trs:
            ms = step_ms.get((task, r["optimizer"]))

            def ratio(a: float | None, b: float | None) -> str:
                return _fmt(a / b if a is not None and b else None, ".2f")

            print(f"{task:10s} {r['optimizer']:34s} {r['lr']:7g}"
                  f" {_fmt(r['steps_to_target'], '6.0f')}"
                  f" {ratio(r['steps_to_target'], ref and ref['steps_to_target']):>7s}"
                  f" {_fmt(r['wall_to_target'], '7.2f')}"
                  f" {ratio(r['wall_to_target'], ref and ref['wall_to_target']):>7s}"
                  f" {_fmt(r['final_loss'], '7.4f')} {_fmt(ms and ms * 1e3, '8.3f')}"
                  f" {ratio(ms, ref_ms):>7s}")
        print()
    # curvlab vs the fastest peer implementation of the same algorithm
    print("step time, curvlab / fastest peer of the same algorithm:")
    for task in dict.fromkeys(r["task"] for r in rows):
        for r in rows:
            if r["task"] != task or not r["curvlab"]:
                continue
            peers = [(step_ms[(task, p["optimizer"])], p["optimizer"]) for p in rows
                     if p["task"] == task and p["family"] == r["family"] and not p["curvlab"]
                     and (task, p["optimizer"]) in step_ms]
            if peers:
                best_ms, best = min(peers)
                ratio = step_ms[(task, r["optimizer"])] / best_ms
                print(f"  {task:10s} {r['optimizer']:22s} {ratio:5.2f}"
                      f"x  (vs {best})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 1 lr")
    ap.add_argument("--tasks", default="digits,charlm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (substrings)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_nn_optim.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    entries = []
    for e in REGISTRY:
        if e.requires and importlib.util.find_spec(e.requires) is None:
            note = f"; {e.note}" if e.note else ""
            print(f"skipped: {e.name} ({e.requires} not installed{note})")
            continue
        if args.only and not any(s.strip().lower() in e.name.lower()
                                 for s in args.only.split(",")):
            continue
        entries.append(e)
    makers = {"digits": digits_task, "charlm": charlm_task}
    rows, step_ms = [], {}
    t_start = time.perf_counter()
    for name in args.tasks.split(","):
        task = makers[name](args.quick)
        print(f"task {name}: budget {task.steps} steps, eval every {task.eval_every}",
              flush=True)
        task_rows = run_task(task, entries, seeds, args.quick,
                             lambda s: print(s, flush=True))
        rows += task_rows
        lr_of = {r["optimizer"]: r["lr"] for r in task_rows}
        st = step_times(task, [(e, lr_of[e.name]) for e in entries if e.name in lr_of],
                        rounds=20 if args.quick else (100 if name == "digits" else 40))
        step_ms.update({(task.name, k): v for k, v in st.items()})
    print(f"\ntorch {torch.__version__}, 1 thread, seeds {seeds}, "
          f"total {time.perf_counter() - t_start:.0f}s\n")
    print_table(rows, step_ms)
    out = {"rows": rows, "step_time_s": {f"{t}/{o}": v for (t, o), v in step_ms.items()},
           "seeds": seeds, "quick": args.quick, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
