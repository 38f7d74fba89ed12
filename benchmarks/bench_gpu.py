"""The comparisons of bench_nn_optim.py at GPU scale: a ~100M-parameter GPT-2, bfloat16.

Task: a GPT-2-style transformer (Hugging Face transformers from a config, random weights,
default attention, no dropout): 14 layers, d_model 768, 12 heads, context 256 (about 99M
parameters in its blocks; character vocabulary), trained on the Python standard library's
source text like bench_nn_optim.py's charlm, batch 32 windows, 300 steps, evaluated every
25 steps on 64 fixed validation windows. Mixed precision: float32 parameters and optimizer
state, forward and backward under ``torch.autocast(bfloat16)``.

Optimizers, protocol and columns: as bench_nn_optim.py (``curvlab.bench.tuning.TunedStudy``:
tune the lr grid with seed 0, evaluate the other seeds, AdamW's median loss at 75% of the
budget as the target; steps and wall time to target; step time on a fixed gradient,
interleaved, eager and compiled (curvlab ``compile_step()``, heavyball compiled), with
the accelerator synchronized around each timed step), on the GPU-scale task only.

No accelerator: the script says so and exits with status 2 (it did not run; 0 would read
as a benchmark that passed). ``--dry-run`` instead builds and runs everything at toy size
on the CPU (2-layer d_model 32 GPT-2, 6 steps, one seed, the middle lr, the optimizers
of bench_nn_optim.py's --quick set, 4 step-time rounds) to check the script end to end;
add ``--no-compile`` to skip the compiled step-time session there too (it compiles each
optimizer: tens of seconds on a CPU).

Run: python benchmarks/bench_gpu.py [--seeds 3] [--only name,...] [--no-compile]
         [--device cuda] [--dry-run] [--out FOLDER] [--resume | --overwrite]
(default OUT: benchmarks/results/bench_gpu/)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import torch

from curvlab.bench.nn import NNProblem, _SequenceCrossEntropy
from curvlab.bench.problems.gpt2 import gpt2_available
from curvlab.bench.runner import run_stages, write_atomic
from curvlab.bench.script_args import add_output_arguments, output_paths
from curvlab.bench.tuning import TunedStudy

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gpu"
NO_ACCELERATOR = 2  # exit status without a GPU (and without --dry-run)


def _nn_script():
    """bench_nn_optim.py (its optimizer selection and table), imported by path."""
    path = Path(__file__).resolve().parent / "bench_nn_optim.py"
    spec = importlib.util.spec_from_file_location("_bench_nn_optim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accelerator() -> str | None:
    """The device to run on (``cuda``), or None."""
    return "cuda" if torch.cuda.is_available() else None


def gpt2_gpu_problem(dry_run: bool) -> NNProblem:
    """The GPU-scale GPT-2 task (``dry_run``: toy size, same code path). Its name is
    ``gpt2`` so that the registry's gpt2 learning-rate grids apply."""
    from curvlab.bench.problems.char_lm import char_batch, load_char_corpus
    from curvlab.bench.problems.gpt2 import gpt2_model

    if dry_run:
        d, layers, heads, seq, batch, steps, every, val, chars = 32, 2, 2, 16, 4, 6, 3, 8, 50_000
    else:
        d, layers, heads, seq, batch, steps, every, val, chars = \
            768, 14, 12, 256, 32, 300, 25, 64, 5_000_000
    train, val_ids, vocab = load_char_corpus(max_chars=chars)
    val_batch = char_batch(val_ids, val, seq, torch.Generator().manual_seed(1234))
    return NNProblem(
        "gpt2", lambda seed: gpt2_model(len(vocab), d, layers, heads, seq, seed,
                                        autocast=torch.bfloat16),
        lambda gen: char_batch(train, batch, seq, gen), val_batch, _SequenceCrossEntropy(),
        target=None, steps=steps, eval_every=every, data_seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (substrings); "
                    "torch.AdamW always runs (it sets the target)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled step-time session")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy size on the CPU: checks the script end to end")
    add_output_arguments(ap, RESULTS)
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if not gpt2_available():
        print("bench_gpu.py needs transformers (pip install -e '.[hf]'); nothing was run.")
        return NO_ACCELERATOR
    device = "cpu" if args.dry_run else (args.device or accelerator())
    if device is None or (not args.dry_run and device == "cpu"):
        print("bench_gpu.py runs at GPU scale (a ~100M-parameter GPT-2 in bfloat16) and "
              f"found no accelerator (torch {torch.__version__}, CUDA available: "
              f"{torch.cuda.is_available()}); nothing was run. On this machine use "
              "benchmarks/bench_nn_optim.py, or --dry-run to check this script at toy size.")
        return NO_ACCELERATOR
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if device == "cpu":
        torch.set_num_threads(1)
    nn_script = _nn_script()
    out, summary_path = output_paths(args.out)
    problem = gpt2_gpu_problem(args.dry_run)
    n_params = sum(p.numel() for p in problem.build(0).parameters())
    specs = [s for s in nn_script.specs(args.only) if s.quick or not args.dry_run]
    plan = TunedStudy(
        "gpu", [problem], specs,
        seeds=[0] if args.dry_run else list(range(args.seeds)), quick=args.dry_run,
        reference=nn_script.REFERENCE, step_time_rounds={problem.name: 4 if args.dry_run
                                                         else 30},
        device=device, compiled_step_time=not args.no_compile)
    print(f"task {problem.name} ({n_params / 1e6:.1f}M parameters, bfloat16 autocast, "
          f"{device}{', dry run' if args.dry_run else ''}): budget {problem.steps} steps, "
          f"eval every {problem.eval_every}", flush=True)

    def done(task, record) -> None:
        m = record["metrics"]
        what = (f"final={m['final_loss']:.4f}" if "final_loss" in m
                else f"{len(m.get('times', {}))} optimizers timed")
        print(f"  {task.method:34s} seed={task.seed} {task.config.get('lr', ''):<7} "
              f"{record['status']:8s} {what} ({record['wall_time']:.0f}s)", flush=True)

    t_start = time.perf_counter()
    records = run_stages(plan.stages(), out, resume=args.resume, overwrite=args.overwrite,
                         on_done=done)
    rows, (step_s, step_errors) = plan.rows(records), plan.step_times(records)
    compiled_s, compiled_errors = plan.step_times(records, compiled=True)
    first_s = plan.first_step_times(records)
    print(f"target loss {plan.target(records, problem):.4f}")
    print(f"\ntorch {torch.__version__}, {device}, seeds {list(plan.seeds)}, "
          f"total {time.perf_counter() - t_start:.0f}s\n")
    nn_script.print_table(rows, step_s, compiled_s, first_s)
    for label, errors in (("", step_errors), ("compiled ", compiled_errors)):
        for (_, method), error in errors.items():
            print(f"  {label}step time of {method}: a step raised ({error[:120]})")
    summary = {"rows": rows, "device": device, "dry_run": args.dry_run, "parameters": n_params,
               "step_time_s": {m: v for (_, m), v in step_s.items()},
               "compiled_step_time_s": {m: v for (_, m), v in compiled_s.items()},
               "compiled_first_step_s": {m: v for (_, m), v in first_s.items()},
               "seeds": list(plan.seeds), "torch": torch.__version__}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    print(f"\nrecords: {out / 'results.jsonl'}   summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
