"""Neural-network optimizers side by side: steps and wall time to a target loss.

Tasks (CPU, float32, one thread), from ``curvlab.bench.nn``:
  digits   MLP 64-128-128-10 on scikit-learn's digits, batch 128, 60 steps (quick: 40),
           evaluated every 5 steps on the full training loss.
  charlm   character-level transformer (2 layers, d_model 128, 4 heads, context 32, batch 32;
           quick: 1 layer, d_model 64, batch 16) on the Python standard library's source
           text, 160 steps (quick: 30), evaluated every 10 (quick: 5) steps on the validation
           loss (nats/char) of 256 (quick: 128) fixed windows.

Optimizers: the entries of ``curvlab.bench.optimizers.REGISTRY`` (factory + declared lr
grid per task) except those that take ``step(closure, batch=...)`` (Hessian-free, natural
gradient: ``bench_curvature_optim.py``): torch AdamW / SGD (Nesterov) / Muon (+ AdamW for
non-matrix parameters, match_rms_adamw), curvlab Shampoo / SOAP / Muon / K-FAC / EKFAC,
SAM around SGD (digits only; two forward-backward passes per step: compare its wall time,
not its steps), pytorch-optimizer SOAP / Shampoo / ScalableShampoo and heavyball SOAP
(uncompiled) when installed; kfac-pytorch and Distributed Shampoo are reported as skipped
when missing.

Protocol (``curvlab.bench.tuning.TunedStudy``, every run a task of ``curvlab.bench``'s runner):
  1. tune: every lr of the grid with seed 0; pick the lr with the lowest mean evaluated loss
     over the run (area under the loss curve: rewards both speed and final loss);
  2. evaluate: that lr with the other seeds; report medians over seeds;
  3. target: AdamW's median-seed loss at 75% of the step budget (so the reference reaches it
     by construction, and the target is not chosen to suit anyone);
  4. step time: all optimizers on identical copies of the model and one fixed gradient,
     stepped in interleaved rounds so machine noise hits them alike; median per step
     (``curvlab.bench.steptime``; "-" where the steps raised, the error printed under
     the table: K-FAC's step needs the statistics of a forward pass, SAM's a closure).
--quick: seed 0 and the middle lr of each grid only (no tuning), short budgets.
Columns: steps to target, wall time to target (forward + backward + step, evaluation
excluded), final loss, optimizer step time -- each also as a ratio to AdamW -- then the
step time of each curvlab optimizer over the fastest peer of the same algorithm. "-" =
target not reached within the step budget (by the median seed).

Every run is appended to OUT/results.jsonl as it finishes (a killed run loses at most the
run in progress; ``--resume`` continues it); the table is printed from those records and
written with them to OUT/summary.json.

Run: python benchmarks/bench_nn_optim.py [--quick] [--tasks digits,charlm] [--seeds 3]
         [--only name,...] [--out FOLDER] [--resume | --overwrite]
(default OUT: benchmarks/results/bench_nn_optim/; an --out ending in .json names the
summary file, the records go to the folder of the same name without .json)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from curvlab.bench.nn import NNProblem, char_lm_problem, digits_mlp_problem
from curvlab.bench.optimizers import REGISTRY, OptimizerSpec
from curvlab.bench.runner import run_stages, write_atomic
from curvlab.bench.script_args import add_output_arguments, output_paths
from curvlab.bench.tuning import TunedStudy

RESULTS = Path(__file__).resolve().parent / "results" / "bench_nn_optim"
REFERENCE = "torch.AdamW"


# ------------------------------------------------------------------------------- tasks
def problems(quick: bool) -> dict[str, Callable[[], NNProblem]]:
    """The tasks: ``--tasks`` name -> problem (no fixed target: AdamW sets it)."""
    return {
        "digits": lambda: digits_mlp_problem(steps=40 if quick else 60, target=None,
                                             eval_every=5, data_seed=0),
        "charlm": lambda: char_lm_problem(steps=30 if quick else 160, quick=quick, target=None,
                                          batch_size=16 if quick else 32,
                                          val_size=128 if quick else 256,
                                          eval_every=5 if quick else 10, data_seed=0),
    }


STEP_TIME_ROUNDS = {"digits_mlp": 100, "char_lm": 40}  # quick: 20


def specs(only: str) -> list[OptimizerSpec]:
    """The registry entries compared here (``only``: comma-separated name substrings;
    the reference is always kept, it sets the target)."""
    chosen = []
    for spec in REGISTRY.values():
        if spec.step_batch:
            continue
        missing = spec.missing()
        if missing:
            print(f"skipped: {missing}")
            continue
        if only and spec.name != REFERENCE and not any(
                s.strip().lower() in spec.name.lower() for s in only.split(",")):
            continue
        chosen.append(spec)
    return chosen


def study(args: argparse.Namespace) -> TunedStudy:
    makers = problems(args.quick)
    unknown = [n for n in args.tasks.split(",") if n not in makers]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {sorted(makers)}")
    probs = [makers[name]() for name in args.tasks.split(",")]
    return TunedStudy(
        "nn", probs, specs(args.only), seeds=[0] if args.quick else list(range(args.seeds)),
        quick=args.quick, reference=REFERENCE,
        step_time_rounds={p.name: 20 if args.quick else STEP_TIME_ROUNDS[p.name] for p in probs})


# ------------------------------------------------------------------------------- table
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return _fmt(a / b if a is not None and b else None, ".2f")


def print_table(rows: list[dict], step_s: dict[tuple[str, str], float]) -> None:
    header = (f"{'task':10s} {'optimizer':34s} {'lr':>7s} {'steps':>6s} {'/AdamW':>7s} "
              f"{'wall s':>7s} {'/AdamW':>7s} {'final':>7s} {'step ms':>8s} {'/AdamW':>7s}")
    print(header)
    print("-" * len(header))
    for problem in dict.fromkeys(r["problem"] for r in rows):
        trs = [r for r in rows if r["problem"] == problem]
        ref = next((r for r in trs if r["method"] == REFERENCE), None)
        ref_s = step_s.get((problem, REFERENCE))
        for r in trs:
            s = step_s.get((problem, r["method"]))
            print(f"{problem:10s} {r['method']:34s} {r['lr']:7g}"
                  f" {_fmt(r['steps_to_target'], '6.0f')}"
                  f" {_ratio(r['steps_to_target'], ref and ref['steps_to_target']):>7s}"
                  f" {_fmt(r['time_to_target'], '7.2f')}"
                  f" {_ratio(r['time_to_target'], ref and ref['time_to_target']):>7s}"
                  f" {_fmt(r['final_loss'], '7.4f')} {_fmt(s and s * 1e3, '8.3f')}"
                  f" {_ratio(s, ref_s):>7s}")
        print()
    print("step time, curvlab / fastest peer of the same algorithm:")
    for r in rows:
        if r["family"] != "curvlab" or (r["problem"], r["method"]) not in step_s:
            continue
        peers = [(step_s[(p["problem"], p["method"])], p["method"]) for p in rows
                 if p["problem"] == r["problem"] and p["algorithm"] == r["algorithm"]
                 and p["family"] != "curvlab" and (p["problem"], p["method"]) in step_s]
        if peers:
            best_s, best = min(peers)
            print(f"  {r['problem']:10s} {r['method']:22s} "
                  f"{step_s[(r['problem'], r['method'])] / best_s:5.2f}x  (vs {best})")


# ------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 1 lr")
    ap.add_argument("--tasks", default="digits,charlm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (substrings); "
                    f"{REFERENCE} always runs (it sets the target)")
    add_output_arguments(ap, RESULTS)
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out, summary_path = output_paths(args.out)

    plan = study(args)
    for p in plan.problems:
        print(f"task {p.name}: budget {p.steps} steps, eval every {p.eval_every}", flush=True)

    def done(task, record) -> None:
        m = record["metrics"]
        what = (f"final={m['final_loss']:.4f}" if "final_loss" in m
                else f"{len(m.get('times', {}))} optimizers timed")
        error = f" error: {record['error'][:100]}" if record.get("error") else ""
        print(f"  {task.problem:10s} {task.method:34s} seed={task.seed} "
              f"{task.config.get('lr', ''):<7} {record['status']:8s} {what} "
              f"({record['wall_time']:.0f}s){error}", flush=True)

    t_start = time.perf_counter()
    records = run_stages(plan.stages(), out, resume=args.resume, overwrite=args.overwrite,
                         on_done=done)
    rows, (step_s, step_errors) = plan.rows(records), plan.step_times(records)
    for p in plan.problems:
        print(f"{p.name}: target loss {plan.target(records, p):.4f}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread, seeds "
          f"{list(plan.seeds)}, total {time.perf_counter() - t_start:.0f}s\n")
    print_table(rows, step_s)
    for (problem, method), error in step_errors.items():
        print(f"  step time of {method} on {problem}: a step raised ({error[:120]})")
    summary = {"rows": rows, "step_time_s": {f"{p}/{m}": v for (p, m), v in step_s.items()},
               "step_time_errors": {f"{p}/{m}": e for (p, m), e in step_errors.items()},
               "seeds": list(plan.seeds), "quick": args.quick, "torch": torch.__version__}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    print(f"\nrecords: {out / 'results.jsonl'}   summary: {summary_path}")


if __name__ == "__main__":
    main()
