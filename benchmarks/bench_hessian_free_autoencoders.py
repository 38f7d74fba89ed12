"""Hessian-free at its defaults against tuned AdamW on deep autoencoders, equal time budgets.

Problems (``curvlab.bench.nn.digits_autoencoder_problem``): scikit-learn's digits pixels in
[0, 1], 80% for training (1438 images) and 20% held out (359, split drawn with seed 0),
autoencoder 64-256-128-64-16-64-128-256-64 (``DEEP_AUTOENCODER``) with sigmoid, tanh or
ReLU hidden units, PyTorch's default initialization and a linear output layer;
loss: Bernoulli cross-entropy of the logits (``BCEWithLogitsLoss``); reported:
reconstruction error = mean squared error of the sigmoid outputs on the whole training
split (and on the held-out split).

Methods:
- AdamW (torch defaults, weight decay 0.01), batches of 256, lr TUNED per problem over
  ``ADAMW_LRS`` on seed 0 (pick: lowest final training reconstruction error);
- ``HessianFree(model, BCEWithLogitsLoss())`` at its DEFAULTS, the same on the three
  problems, stepped as ``step(batch=...)`` on gradient batches of ``HF_BATCH`` (its
  documented recommendation; the curvature batch is its default fraction of it).

Every run gets the same training-time budget (``--budget``, default 25 s, the figure of
the issue this bench answers; evaluation excluded), measured by ``--clock``: ``cpu``
(default: this process's CPU time with torch on one thread, which on a quiet machine
equals the wall time and on a shared one is not inflated by other processes) or ``wall``.
The AdamW and HF runs are interleaved (each problem: AdamW lr, HF, AdamW lr, ...), so load
drifts hit both alike. Seeds 0, 1, 2; the table gives per problem the median over seeds of
the final error of HF and of AdamW at its tuned lr, their ratio HF / AdamW, and the per-run
step counts.

A fixed budget is a number of steps that depends on the machine: HF needs its first ~40-70
steps to leave the sigmoid net's mean-image plateau, so at 10 s its ratio ranged from 2.0
(a slow day, ~40 HF steps) to 0.6-0.8 (a fast one, ~75-100 steps); at 25 s it was ahead on
all three in the recent runs (``results/bench_hessian_free_autoencoders.txt``).

Usage: ``python benchmarks/bench_hessian_free_autoencoders.py [--budget S] [--clock cpu|wall]
[--activations sigmoid,tanh,relu] [--seeds 0,1,2] [--out FOLDER] [--resume | --overwrite]``
(default OUT: ``benchmarks/results/bench_hessian_free_autoencoders/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab.bench.nn import DEEP_AUTOENCODER, NNProblem, digits_autoencoder_problem, nn_task
from curvlab.bench.optimizers import OptimizerSpec
from curvlab.bench.runner import Task, run_stages, write_atomic
from curvlab.bench.script_args import add_output_arguments, output_paths
from curvlab.optim import HessianFree

RESULTS = Path(__file__).resolve().parent / "results" / "bench_hessian_free_autoencoders"
SUITE = "hf_autoencoders"
ACTIVATIONS = ("sigmoid", "tanh", "relu")
ADAMW_BATCH = 256
ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
HF_BATCH = HessianFree.recommended_batch_size
TEST_FRACTION = 0.2


def _adamw(m: nn.Module, lr: float, problem: str) -> Any:
    return torch.optim.AdamW(m.parameters(), lr=lr)


def _hessian_free(m: nn.Module, lr: float, problem: str) -> Any:
    return HessianFree(m, nn.BCEWithLogitsLoss())  # the defaults; lr is always 1


ADAMW = OptimizerSpec("torch.AdamW", _adamw, {}, "baseline", "adamw",
                      note="torch defaults (weight decay 0.01)")
HF = OptimizerSpec("curvlab.HessianFree", _hessian_free, {}, "curvlab", "hessian-free",
                   step_batch=True, closure=False)


def problem(activation: str, batch_size: int) -> NNProblem:
    return digits_autoencoder_problem(batch_size=batch_size, activation=activation,
                                      sizes=DEEP_AUTOENCODER, test_fraction=TEST_FRACTION,
                                      eval_every=10**9)


def _task(spec: OptimizerSpec, activation: str, lr: float, seed: int, budget: float,
          clock: str) -> Task:
    batch = HF_BATCH if spec is HF else ADAMW_BATCH
    return nn_task(SUITE, problem(activation, batch), spec, lr, seed, time_budget=budget,
                   clock=time.process_time if clock == "cpu" else time.perf_counter,
                   config={"batch_size": batch, "time_budget": budget, "clock": clock,
                           "activation": activation})


def tuning_tasks(activations: list[str], budget: float, clock: str) -> list[Task]:
    """Seed 0: AdamW at every lr, HF interleaved after the first one."""
    tasks = []
    for act in activations:
        adam = [_task(ADAMW, act, lr, 0, budget, clock) for lr in ADAMW_LRS]
        tasks += adam[:2] + [_task(HF, act, 1.0, 0, budget, clock)] + adam[2:]
    return tasks


def _runs(records: list[dict], activation: str, method: str) -> list[dict]:
    return [r for r in records if r["config"].get("activation") == activation
            and r["method"] == method]


def _final(record: dict) -> float:
    return record["metrics"].get("final_loss", math.inf) if record["status"] == "ok" else math.inf


def best_lr(records: list[dict], activation: str) -> float:
    seed0 = [r for r in _runs(records, activation, ADAMW.name) if r["seed"] == 0]
    return min(seed0, key=_final)["config"]["lr"]


def evaluation_tasks(records: list[dict], activations: list[str], seeds: list[int],
                     budget: float, clock: str) -> list[Task]:
    """The other seeds: HF and AdamW at its tuned lr, alternating."""
    tasks = []
    for seed in seeds:
        if seed == 0:
            continue
        for act in activations:
            tasks += [_task(HF, act, 1.0, seed, budget, clock),
                      _task(ADAMW, act, best_lr(records, act), seed, budget, clock)]
    return tasks


def summary(records: list[dict], activations: list[str], seeds: list[int]) -> dict[str, Any]:
    rows = []
    for act in activations:
        lr = best_lr(records, act)
        hf = sorted(_runs(records, act, HF.name), key=lambda r: r["seed"])
        adam = sorted((r for r in _runs(records, act, ADAMW.name) if r["config"]["lr"] == lr),
                      key=lambda r: r["seed"])
        med = lambda rs, k: statistics.median(  # noqa: E731
            (r["metrics"].get(k, math.inf) if r["status"] == "ok" else math.inf) for r in rs)
        row = {"activation": act, "adamw_lr": lr,
               "adamw_grid_seed0": {r["config"]["lr"]: _final(r)
                                    for r in _runs(records, act, ADAMW.name) if r["seed"] == 0},
               "hf": med(hf, "final_loss"), "adamw": med(adam, "final_loss"),
               "hf_held_out": med(hf, "held_out_loss"),
               "adamw_held_out": med(adam, "held_out_loss"),
               "hf_steps": [r["metrics"].get("steps_done") for r in hf],
               "adamw_steps": [r["metrics"].get("steps_done") for r in adam],
               "hf_status": [r["status"] for r in hf], "adamw_status": [r["status"] for r in adam],
               "hf_finals": [_final(r) for r in hf], "adamw_finals": [_final(r) for r in adam]}
        row["ratio"] = row["hf"] / row["adamw"]
        row["ratio_held_out"] = row["hf_held_out"] / row["adamw_held_out"]
        rows.append(row)
    return {"rows": rows, "seeds": seeds}


def print_summary(s: dict[str, Any], budget: float, clock: str) -> None:
    print(f"\n== deep autoencoder {'-'.join(map(str, DEEP_AUTOENCODER))} on digits, "
          f"{budget:g} s ({clock} time) per run, reconstruction MSE, median of seeds "
          f"{s['seeds']}; HessianFree at defaults (batch {HF_BATCH}) vs AdamW tuned "
          f"(batch {ADAMW_BATCH})")
    print(f"{'units':8s} {'AdamW lr':>8s} {'AdamW':>9s} {'HF':>9s} {'HF/AdamW':>8s} "
          f"{'held-out A':>10s} {'held-out HF':>11s} {'ratio':>6s}  steps AdamW | HF")
    for r in s["rows"]:
        print(f"{r['activation']:8s} {r['adamw_lr']:8g} {r['adamw']:9.5f} {r['hf']:9.5f} "
              f"{r['ratio']:8.3f} {r['adamw_held_out']:10.5f} {r['hf_held_out']:11.5f} "
              f"{r['ratio_held_out']:6.3f}  {r['adamw_steps']} | {r['hf_steps']}")
    for r in s["rows"]:
        grid = ", ".join(f"{float(lr):g}: {v:.5f}" for lr, v in r["adamw_grid_seed0"].items())
        adam, hf = ([round(v, 5) for v in r[k]] for k in ("adamw_finals", "hf_finals"))
        print(f"  {r['activation']}: AdamW seed-0 grid {grid}; per seed AdamW {adam}, HF {hf}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=25.0,
                        help="training-time budget per run in seconds (default 25)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--activations", default=",".join(ACTIVATIONS))
    parser.add_argument("--seeds", default="0,1,2")
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args()
    if not args.budget > 0:
        parser.error("--budget must be a positive number of seconds")
    acts = args.activations.split(",")
    if not set(acts) <= set(ACTIVATIONS):
        parser.error(f"--activations: choose from {ACTIVATIONS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if 0 not in seeds:
        parser.error("--seeds must include 0 (the AdamW tuning seed)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out, summary_path = output_paths(args.out)

    def done(task: Task, record: dict) -> None:
        m = record["metrics"]
        print(f"  {task.problem:40s} {task.method:20s} seed={task.seed} "
              f"lr={task.config['lr']:<6g} {record['status']:8s} "
              f"final={m.get('final_loss', math.nan):.5f} steps={m.get('steps_done')} "
              f"({record['wall_time']:.0f}s wall)", flush=True)

    records = run_stages(
        [lambda recs: tuning_tasks(acts, args.budget, args.clock),
         lambda recs: evaluation_tasks(recs, acts, seeds, args.budget, args.clock)],
        out, resume=args.resume, overwrite=args.overwrite, on_done=done)
    s = summary(records, acts, seeds)
    print_summary(s, args.budget, args.clock)
    s.update(budget=args.budget, clock=args.clock, hf_batch=HF_BATCH, adamw_batch=ADAMW_BATCH)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(summary_path, json.dumps(s, indent=1, default=str))
    print(f"\nrecords: {out / 'results.jsonl'}   summary: {summary_path}")


if __name__ == "__main__":
    main()
