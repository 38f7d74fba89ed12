"""Curvature-based optimizers vs first-order baselines, side by side in one run.

1. Digits MLP (``curvlab.bench.nn.digits_mlp_problem``: 64-128-128-10 ReLU, batch 128,
   400 steps (quick: 40; Hessian-free and natural gradient at most 60), target: full
   training loss <= 0.05, checked every 2 steps): steps to target and median step time of
   K-FAC, EKFAC, natural gradient and Hessian-free (the entries of
   ``curvlab.bench.optimizers.REGISTRY``; HF and NGD take ``step(closure, batch=...)``)
   against AdamW (torch defaults, weight decay 0.01) and SGD (momentum 0.9), every
   optimizer over its declared learning-rate grid (quick: the middle lr) and seeds 0-2
   (quick: 0). Reports the K-FAC / AdamW steps ratio (best lr of each: median steps over
   seeds when every seed reaches the target, then median final loss) and divergences of
   K-FAC at its default damping over the whole grid. kfac-pytorch is included when
   importable.
2. Deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010;
   ``curvlab.bench.nn.digits_autoencoder_problem``) on digits pixels in [0, 1],
   64-32-16-8-16-32-64 sigmoid, logistic outputs: Hessian-free for a wall-time budget
   (``--budget``, default 60 s, quick 3 s, of training time), then AdamW at each grid
   learning rate for the training time HF took; reconstruction error (mean squared error
   of the sigmoid outputs) and the ratio HF / best AdamW. HF uses full batches, a random
   512-sample curvature batch, initial damping 1e-4 (the old default 1.0 spent ~25 steps
   only lowering it), CG budget 100 and Martens' diagonal preconditioner (the settings
   this section was run with before HF's defaults changed; see
   ``bench_hessian_free_autoencoders.py`` for HF at its defaults), stepped as
   ``step(batch=...)`` (its own loss and gradient, one pass reused by the products);
   AdamW uses batches of 128.

Every run is a task of ``curvlab.bench``'s runner, appended to OUT/results.jsonl as it
finishes (a killed run loses at most the run in progress; ``--resume`` continues it); the
tables are printed from those records and written with them to OUT/summary.json.

Usage: ``python benchmarks/bench_curvature_optim.py [--quick] [--only digits|autoencoder]
[--budget SECONDS] [--out FOLDER] [--resume | --overwrite]`` (default OUT:
``benchmarks/results/bench_curvature_optim/``; an --out ending in .json names the summary
file, the records go to the folder of the same name without .json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab.bench.nn import digits_autoencoder_problem, digits_mlp_problem, nn_task
from curvlab.bench.optimizers import REGISTRY, OptimizerSpec
from curvlab.bench.runner import Task, run_stages, write_atomic
from curvlab.bench.script_args import add_output_arguments, output_paths
from curvlab.optim import HessianFree

RESULTS = Path(__file__).resolve().parent / "results" / "bench_curvature_optim"
SUITE = "nn"
EVAL_EVERY = 2  # finer than curvlab bench's 5, so the steps ratio is resolved
EXPENSIVE_CAP = 60  # step cap of HF and NGD (seconds per step; they hit the target early)


# ------------------------------------------------------------------------------- optimizers
def _sgd_momentum(m: nn.Module, lr: float, problem: str) -> Any:
    return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)


def _adamw(m: nn.Module, lr: float, problem: str) -> Any:
    return torch.optim.AdamW(m.parameters(), lr=lr)


def _autoencoder_hf(m: nn.Module, lr: float, problem: str) -> Any:
    return HessianFree(m, nn.BCEWithLogitsLoss(), lr=lr, damping=1e-4, cg_max_iter=100,
                       curvature_batch_size=512, preconditioner="martens")


# the baselines of this comparison (the registry's SGD is Nesterov, its AdamW has no decay)
SGD = OptimizerSpec("torch.SGD", _sgd_momentum, {"digits_mlp": (0.03, 0.1, 0.3)}, "baseline",
                    "sgd", note="momentum 0.9")
ADAMW = OptimizerSpec("torch.AdamW", _adamw, {"digits_mlp": (1e-3, 3e-3, 1e-2),
                                              "digits_autoencoder": (3e-3, 1e-2, 3e-2)},
                      "baseline", "adamw", note="torch defaults (weight decay 0.01)")
CURVATURE = ("curvlab.KFAC", "curvlab.EKFAC", "curvlab.HessianFree", "curvlab.NaturalGradient",
             "kfac-pytorch")
EXPENSIVE = ("curvlab.HessianFree", "curvlab.NaturalGradient")
AUTOENCODER_HF = OptimizerSpec("curvlab.HessianFree", _autoencoder_hf,
                               {"digits_autoencoder": (1.0,)}, "curvlab", "hessian-free",
                               step_batch=True, closure=False)


def digits_specs() -> list[OptimizerSpec]:
    specs = [SGD, ADAMW]
    for name in CURVATURE:
        missing = REGISTRY[name].missing()
        if missing:
            print(f"skipped: {missing}")
        else:
            specs.append(REGISTRY[name])
    return specs


# ------------------------------------------------------------------------------- tasks
def digits_tasks(quick: bool, seeds: list[int]) -> list[Task]:
    """Every optimizer x declared lr x seed on the digits MLP."""
    steps = 40 if quick else 400
    tasks = []
    for spec in digits_specs():
        problem = digits_mlp_problem(steps=min(steps, EXPENSIVE_CAP) if spec.name in EXPENSIVE
                                     else steps, eval_every=EVAL_EVERY)
        tasks += [nn_task(SUITE, problem, spec, lr, seed, config={"eval_every": EVAL_EVERY})
                  for lr in spec.grid(problem.name, quick) for seed in seeds]
    return tasks


def autoencoder_lrs(quick: bool) -> tuple[float, ...]:
    return (3e-2,) if quick else ADAMW.lrs["digits_autoencoder"]


def hf_autoencoder_tasks(seeds: list[int], budget: float) -> list[Task]:
    problem = digits_autoencoder_problem(batch_size=None, eval_every=10)
    return [nn_task(SUITE, problem, AUTOENCODER_HF, 1.0, seed, time_budget=budget,
                    config={"batch_size": None, "time_budget": budget}) for seed in seeds]


def adamw_autoencoder_tasks(records: list[dict], quick: bool) -> list[Task]:
    """AdamW at each lr for the training time HF took with the same seed."""
    problem = digits_autoencoder_problem(batch_size=128, eval_every=100)
    tasks = []
    for hf in _autoencoder_runs(records, AUTOENCODER_HF.name):
        if hf["status"] == "error" or "train_time" not in hf["metrics"]:
            continue
        budget = hf["metrics"]["train_time"]
        tasks += [nn_task(SUITE, problem, ADAMW, lr, hf["seed"], time_budget=budget,
                          config={"batch_size": 128, "time_budget": budget,
                                  "matched_to": hf["key"]})
                  for lr in autoencoder_lrs(quick)]
    return tasks


# ------------------------------------------------------------------------------- tables
def _autoencoder_runs(records: list[dict], method: str) -> list[dict]:
    return [r for r in records if r["problem"] == "digits_autoencoder" and r["method"] == method]


def digits_summary(records: list[dict], quick: bool, seeds: list[int]) -> dict[str, Any]:
    """Per optimizer and lr: steps to target of every seed, their median (when every seed
    reached it), divergences, median final loss and step time; the best lr of each."""
    runs = [r for r in records if r["problem"] == "digits_mlp"]
    rows, best = [], {}
    for method in dict.fromkeys(r["method"] for r in runs):
        for lr in dict.fromkeys(r["config"]["lr"] for r in runs if r["method"] == method):
            rs = sorted((r for r in runs if r["method"] == method and r["config"]["lr"] == lr),
                        key=lambda r: r["seed"])
            hits = [r["metrics"].get("steps_to_target") for r in rs]
            med = statistics.median(hits) if all(h is not None for h in hits) else None
            finals = [r["metrics"].get("final_loss", math.inf) for r in rs]
            times = [r["metrics"]["step_time"] for r in rs if r["metrics"].get("step_time")]
            row = {"optimizer": method, "lr": lr, "median_steps_to_target": med, "hits": hits,
                   "diverged": sum(r["status"] == "diverged" for r in rs),
                   "errors": [r["error"] for r in rs if r.get("error")],
                   "median_final_loss": statistics.median(finals),
                   "median_step_ms": 1e3 * statistics.median(times) if times else None,
                   "steps": rs[0]["config"]["steps"], "target": rs[0]["config"]["target"]}
            rows.append(row)
            key = (med if med is not None else math.inf, row["median_final_loss"])
            if method not in best or key < best[method][0]:
                best[method] = (key, row)
    return {"rows": rows, "best": {k: v[1] for k, v in best.items()},
            "steps": 40 if quick else 400, "seeds": seeds}


def autoencoder_summary(records: list[dict], quick: bool) -> dict[str, Any]:
    lrs = autoencoder_lrs(quick)
    rows = []
    for hf in sorted(_autoencoder_runs(records, AUTOENCODER_HF.name), key=lambda r: r["seed"]):
        if hf["status"] == "error" or "train_time" not in hf["metrics"]:
            continue
        row = {"seed": hf["seed"], "hf": hf["metrics"]["final_loss"],
               "hf_steps": hf["metrics"]["steps_done"], "budget_s": hf["metrics"]["train_time"]}
        adam = {r["config"]["lr"]: r for r in _autoencoder_runs(records, ADAMW.name)
                if r["config"].get("matched_to") == hf["key"]}
        for lr in lrs:
            r = adam.get(lr)
            row[f"adamw_{lr:g}"] = r["metrics"].get("final_loss", math.inf) if r else math.inf
            row[f"adamw_{lr:g}_steps"] = r["metrics"].get("steps_done") if r else None
        row["best_adamw"] = min(row[f"adamw_{lr:g}"] for lr in lrs)
        row["ratio_hf_over_adamw"] = row["hf"] / row["best_adamw"]
        rows.append(row)
    return {"rows": rows, "lrs": lrs}


def print_digits(digits: dict[str, Any]) -> None:
    target = digits["rows"][0]["target"] if digits["rows"] else None
    print(f"\n== digits MLP, {digits['steps']} steps (HF/NGD: at most {EXPENSIVE_CAP}), target "
          f"loss {target:g} (full training set, checked every {EVAL_EVERY} steps), seeds "
          f"{digits['seeds']}")
    print(f"{'optimizer':24s} {'lr':>7s} {'med steps':>9s} {'hits':>18s} {'div':>3s} "
          f"{'final loss':>10s} {'ms/step':>8s}")
    for r in digits["rows"]:
        med = "-" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:g}"
        hits = ",".join("-" if h is None else str(h) for h in r["hits"])
        ms = "-" if r["median_step_ms"] is None else f"{r['median_step_ms']:8.2f}"
        print(f"{r['optimizer']:24s} {r['lr']:7g} {med:>9s} {hits:>18s} {r['diverged']:3d} "
              f"{r['median_final_loss']:10.4f} {ms:>8s}"
              + (f"  error: {r['errors'][0][:80]}" if r["errors"] else ""))
    best = digits["best"]
    kfac_best, adam_best = best.get("curvlab.KFAC"), best.get("torch.AdamW")
    if (kfac_best and adam_best and kfac_best["median_steps_to_target"]
            and adam_best["median_steps_to_target"]):
        ratio = kfac_best["median_steps_to_target"] / adam_best["median_steps_to_target"]
        print(f"K-FAC / AdamW steps to target (best lr each): {ratio:.2f} "
              f"(K-FAC lr {kfac_best['lr']:g}, AdamW lr {adam_best['lr']:g})")
    for name in ("curvlab.KFAC", "kfac-pytorch"):
        if name in best and best[name]["median_step_ms"] is not None:
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
    if ae["rows"]:
        med = statistics.median(r["ratio_hf_over_adamw"] for r in ae["rows"])
        print(f"median HF / best-AdamW reconstruction error: {med:.3f}")


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one lr, short runs")
    parser.add_argument("--budget", type=float, default=None,
                        help="autoencoder training-time budget per run in seconds")
    parser.add_argument("--only", choices=("digits", "autoencoder"), default=None,
                        help="run one section")
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args()
    if args.budget is not None and not args.budget > 0:
        parser.error("--budget must be a positive number of seconds")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("curvlab.optim").setLevel(logging.ERROR)  # skipped steps of diverging lrs
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    budget = args.budget or (3.0 if args.quick else 60.0)
    out, summary_path = output_paths(args.out)
    digits, autoencoder = args.only in (None, "digits"), args.only in (None, "autoencoder")

    def first(records: list[dict]) -> list[Task]:
        return ((digits_tasks(args.quick, seeds) if digits else [])
                + (hf_autoencoder_tasks(seeds, budget) if autoencoder else []))

    def second(records: list[dict]) -> list[Task]:
        return adamw_autoencoder_tasks(records, args.quick) if autoencoder else []

    def done(task: Task, record: dict) -> None:
        error = f" error: {record['error'][:100]}" if record.get("error") else ""
        print(f"  {task.problem:18s} {task.method:24s} seed={task.seed} "
              f"lr={task.config['lr']:<7g} {record['status']:8s} "
              f"final={record['metrics'].get('final_loss', math.nan):.4f} "
              f"({record['wall_time']:.0f}s){error}", flush=True)

    records = run_stages([first, second], out, resume=args.resume, overwrite=args.overwrite,
                         on_done=done)
    results: dict[str, Any] = {}
    if digits:
        results["digits"] = digits_summary(records, args.quick, seeds)
        print_digits(results["digits"])
    if autoencoder:
        results["autoencoder"] = autoencoder_summary(records, args.quick)
        print_autoencoder(results["autoencoder"], budget)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(summary_path, json.dumps(results, indent=1, default=str))
    print(f"\nrecords: {out / 'results.jsonl'}   summary: {summary_path}")


if __name__ == "__main__":
    main()
