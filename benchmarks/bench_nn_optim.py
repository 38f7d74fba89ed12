"""Neural-network optimizers side by side: steps and wall time to a target loss.

Tasks (CPU, float32, one thread), from ``curvlab.bench.nn``:
  digits   MLP 64-128-128-10 on scikit-learn's digits, batch 128, 60 steps (quick: 40),
           evaluated every 5 steps on the full training loss.
  charlm   character-level transformer (2 layers, d_model 128, 4 heads, context 32, batch 32;
           quick: 1 layer, d_model 64, batch 16) on the Python standard library's source
           text, 160 steps (quick: 30), evaluated every 10 (quick: 5) steps on the validation
           loss (nats/char) of 256 (quick: 128) fixed windows.
  gpt2     a tiny GPT-2 (Hugging Face transformers from a config, random weights, default
           attention, no dropout; 2 layers, d_model 128, 4 heads; quick: 1 layer, d_model 64)
           on the same text, windows, budgets and evaluation as charlm. Only when
           transformers imports (otherwise skipped with a notice). charlm and gpt2 are "the
           transformer tasks".

Optimizers: the entries of ``curvlab.bench.optimizers.REGISTRY`` (factory + declared lr
grid per task) except those that take ``step(closure, batch=...)`` (Hessian-free, natural
gradient: ``bench_curvature_optim.py``): torch AdamW / SGD (Nesterov) / Muon (+ AdamW for
non-matrix parameters, match_rms_adamw), curvlab Shampoo / SOAP / KL-Shampoo / KL-SOAP /
PSGD-Kron / Muon (quintic, Polar Express, Polar Express through Gram Newton-Schulz,
NorMuon) / K-FAC / EKFAC, SAM around SGD (digits only; two forward-backward passes per
step: compare its wall time, not its steps), and the installed peers: pytorch-optimizer
SOAP / Shampoo / ScalableShampoo / Kron (PSGD) / Muon / Muon+PolarExpress / NorMuon,
heavyball SOAP / KL-Shampoo / KL-SOAP / PSGD-Kron (eager and, in the compiled session,
compiled); kfac-pytorch and Distributed Shampoo are reported as skipped when missing.
Peers without a grid on a task (heavyball, pytorch-optimizer's Muon family and Kron:
trained on digits only) are step-timed there beside the curvlab optimizer of the same
algorithm ("timed only" rows), so every curvlab step is compared with every installed
implementation of its algorithm.

Protocol (``curvlab.bench.tuning.TunedStudy``, every run a task of ``curvlab.bench``'s runner):
  1. tune: every lr of the grid with seed 0; pick the lr with the lowest mean evaluated loss
     over the run (area under the loss curve: rewards both speed and final loss);
  2. evaluate: that lr with the other seeds; report medians over seeds;
  3. target: AdamW's median-seed loss at 75% of the step budget (so the reference reaches it
     by construction, and the target is not chosen to suit anyone);
  4. step time: all optimizers on identical copies of the model and one fixed gradient,
     stepped in interleaved rounds so machine noise hits them alike; median per step
     (``curvlab.bench.steptime``; "-" where the steps raised, the error printed under the
     table: K-FAC's step needs the statistics of a forward pass, SAM's a closure); then the
     same with every optimizer that has a compiled variant (``OptimizerSpec.make_compiled``:
     curvlab Shampoo / SOAP / KL-Shampoo / KL-SOAP / PSGD-Kron with ``compile_step()``,
     curvlab Muon with ``compile=True``, torch AdamW and Muon with
     ``torch.compile(opt.step)``, heavyball's with ``compile_step=True`` and its kernels
     compiled, also on tasks where they are not trained), in a session of
     its own (``--no-compile``: skipped; with --quick skipped unless ``--compile``); a
     compiled variant that compiles again during the timed steps is reported with how
     often, and an optimizer stops being stepped once its steps have taken 60 s.
     Training runs are eager.
--quick: seed 0 and the middle lr of each grid only (no tuning), short budgets.
Columns: steps to target, wall time to target (forward + backward + step, evaluation
excluded), final loss, optimizer step time -- each also as a ratio to AdamW -- the compiled
step time and its ratio to the eager one timed beside it in the compiled session; then the
step time of each curvlab optimizer over the fastest peer of the same algorithm, eager and
compiled (with the first compiled step's time: the compilation). "-" =
target not reached within the step budget (by the median seed).

Every run is appended to OUT/results.jsonl as it finishes (a killed run loses at most the
run in progress; ``--resume`` continues it); the table is printed from those records and
written with them to OUT/summary.json.

Run: python benchmarks/bench_nn_optim.py [--quick] [--tasks digits,charlm,gpt2] [--seeds 3]
         [--only name,...] [--compile | --no-compile] [--out FOLDER] [--resume | --overwrite]
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

from curvlab.bench.nn import NNProblem, char_lm_problem, digits_mlp_problem, gpt2_problem
from curvlab.bench.optimizers import REGISTRY, OptimizerSpec
from curvlab.bench.problems.gpt2 import gpt2_available
from curvlab.bench.runner import run_stages, write_atomic
from curvlab.bench.script_args import add_output_arguments, output_paths
from curvlab.bench.steptime import EAGER
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
        "gpt2": lambda: gpt2_problem(steps=30 if quick else 160, quick=quick, target=None,
                                     batch_size=16 if quick else 32,
                                     val_size=128 if quick else 256,
                                     eval_every=5 if quick else 10, data_seed=0),
    }


DEFAULT_TASKS = "digits,charlm,gpt2"
STEP_TIME_ROUNDS = {"digits_mlp": 100, "char_lm": 40, "gpt2": 40}  # quick: 20


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


def compile_session(args: argparse.Namespace) -> bool:
    """Whether to time the compiled variants: by default in full runs only (compiling every
    optimizer costs minutes on a loaded CPU; --quick stays quick), forced by --compile."""
    if getattr(args, "compile", False):
        return True
    return not (getattr(args, "no_compile", False) or args.quick)


def study(args: argparse.Namespace) -> TunedStudy:
    makers = problems(args.quick)
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {sorted(makers)}")
    if "gpt2" in names and not gpt2_available():
        if args.tasks != DEFAULT_TASKS:
            raise SystemExit("--tasks gpt2 needs transformers (pip install -e '.[hf]')")
        print("skipped: task gpt2: transformers does not import (pip install -e '.[hf]')")
        names.remove("gpt2")
    probs = [makers[name]() for name in names]
    return TunedStudy(
        "nn", probs, specs(args.only), seeds=[0] if args.quick else list(range(args.seeds)),
        quick=args.quick, reference=REFERENCE,
        step_time_rounds={p.name: 20 if args.quick else STEP_TIME_ROUNDS[p.name] for p in probs},
        compiled_step_time=compile_session(args))


# ------------------------------------------------------------------------------- table
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return _fmt(a / b if a is not None and b else None, ".2f")


def print_table(rows: list[dict], step_s: dict[tuple[str, str], float],
                compiled_s: dict[tuple[str, str], float] | None = None,
                first_s: dict[tuple[str, str], float] | None = None,
                recompiled: dict[tuple[str, str], tuple[int, int]] | None = None) -> None:
    """The table; ``compiled_s``: step times of the compiled variants (``first_s``: their
    first step, i.e. compilation; ``recompiled``: (k, n), compiled anew at k of n later
    steps)."""
    compiled_s, first_s, recompiled = compiled_s or {}, first_s or {}, recompiled or {}
    header = (f"{'task':10s} {'optimizer':34s} {'lr':>7s} {'steps':>6s} {'/AdamW':>7s} "
              f"{'wall s':>7s} {'/AdamW':>7s} {'final':>7s} {'step ms':>8s} {'/AdamW':>7s} "
              f"{'compiled':>8s} {'/eager':>7s}")
    print(header)
    print("-" * len(header))
    for problem in dict.fromkeys(r["problem"] for r in rows):
        trs = [r for r in rows if r["problem"] == problem]
        ref = next((r for r in trs if r["method"] == REFERENCE), None)
        ref_s = step_s.get((problem, REFERENCE))
        for r in trs:
            s = step_s.get((problem, r["method"]))
            c = compiled_s.get((problem, r["method"]))
            # the ratio against the eager step timed beside it (same session, same noise)
            s_beside = compiled_s.get((problem, r["method"] + EAGER), s)
            print(f"{problem:10s} {r['method']:34s} {r['lr']:7g}"
                  f" {_fmt(r['steps_to_target'], '6.0f')}"
                  f" {_ratio(r['steps_to_target'], ref and ref['steps_to_target']):>7s}"
                  f" {_fmt(r['time_to_target'], '7.2f')}"
                  f" {_ratio(r['time_to_target'], ref and ref['time_to_target']):>7s}"
                  f" {_fmt(r['final_loss'], '7.4f')} {_fmt(s and s * 1e3, '8.3f')}"
                  f" {_ratio(s, ref_s):>7s} {_fmt(c and c * 1e3, '8.3f'):>8s}"
                  f" {_ratio(c, s_beside):>7s}")
        trained = {r["method"] for r in trs}
        for (p, method), s in step_s.items():  # timed only (peers not trained here)
            if p == problem and method not in trained:
                print(f"{problem:10s} {method:34s} {'(timed only: eager step)':>55s}"
                      f" {s * 1e3:8.3f} {_ratio(s, ref_s):>7s} {'-':>8s} {'-':>7s}")
        for (p, method), c in compiled_s.items():  # timed only (not trained here)
            if p == problem and method not in trained and not method.endswith(EAGER):
                print(f"{problem:10s} {method:34s} {'(timed only: compiled step)':>55s}"
                      f" {'-':>8s} {'-':>7s} {c * 1e3:8.3f} {'-':>7s}")
        print()
    algorithms = {spec.name: spec.algorithm for spec in REGISTRY.values()}
    families = {spec.name: spec.family for spec in REGISTRY.values()}
    for label, times in (("eager", step_s), ("compiled", compiled_s)):
        if not times:
            continue
        print(f"step time ({label}), curvlab / fastest peer of the same algorithm:")
        for (problem, method), t in times.items():
            if families.get(method) != "curvlab":  # (the " [eager]" twins: no family)
                continue
            peers = [(pt, pm) for (pp, pm), pt in times.items() if pp == problem
                     and families.get(pm) not in (None, "curvlab")
                     and algorithms.get(pm) == algorithms.get(method)]
            first = first_s.get((problem, method)) if label == "compiled" else None
            extra = f"  first step {first:.1f}s" if first is not None else ""
            if peers:
                best_s, best = min(peers)
                again = recompiled.get((problem, best)) if label == "compiled" else None
                if again:
                    extra += f"  ({best} compiled anew at {again[0]} of {again[1]} steps)"
                print(f"  {problem:10s} {method:22s} {t / best_s:5.2f}x  (vs {best}){extra}")
            elif extra:
                print(f"  {problem:10s} {method:22s}    - (no peer timed){extra}")
    for (problem, method), (k, n) in recompiled.items():
        print(f"  compiled {method} on {problem}: compiled anew during {k} of its {n} steps "
              "after the first" + (" (guards failing every step: its step time is mostly "
                                   "compilation)" if k == n else ""))


# ------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 1 lr")
    ap.add_argument("--tasks", default=DEFAULT_TASKS,
                    help="comma-separated; gpt2 is skipped with a notice without transformers")
    when = ap.add_mutually_exclusive_group()
    when.add_argument("--compile", action="store_true",
                      help="time the compiled variants also with --quick")
    when.add_argument("--no-compile", action="store_true",
                      help="skip the compiled step-time session (default with --quick)")
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
    compiled_s, compiled_errors = plan.step_times(records, compiled=True)
    first_s = plan.first_step_times(records)
    recompiled = plan.recompilations(records)
    for p in plan.problems:
        print(f"{p.name}: target loss {plan.target(records, p):.4f}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread, seeds "
          f"{list(plan.seeds)}, total {time.perf_counter() - t_start:.0f}s\n")
    print_table(rows, step_s, compiled_s, first_s, recompiled)
    for (problem, method), error in step_errors.items():
        print(f"  step time of {method} on {problem}: a step raised ({error[:120]})")
    for (problem, method), error in compiled_errors.items():
        print(f"  compiled step time of {method} on {problem}: a step raised ({error[:120]})")
    summary = {"rows": rows, "step_time_s": {f"{p}/{m}": v for (p, m), v in step_s.items()},
               "step_time_errors": {f"{p}/{m}": e for (p, m), e in step_errors.items()},
               "compiled_step_time_s": {f"{p}/{m}": v for (p, m), v in compiled_s.items()},
               "compiled_first_step_s": {f"{p}/{m}": v for (p, m), v in first_s.items()},
               "compiled_recompiled_steps": {f"{p}/{m}": n for (p, m), n in recompiled.items()},
               "compiled_step_time_errors": {f"{p}/{m}": e
                                             for (p, m), e in compiled_errors.items()},
               "seeds": list(plan.seeds), "quick": args.quick, "torch": torch.__version__}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    print(f"\nrecords: {out / 'results.jsonl'}   summary: {summary_path}")


if __name__ == "__main__":
    main()
