"""Step time of curvlab's Muon family against pytorch-optimizer's, interleaved.

The step-time session of ``bench_nn_optim.py`` (:func:`curvlab.bench.steptime.
interleaved_step_times`: the optimizers' steps interleaved on one fixed gradient, medians)
on its three tasks, for the pairs of the same algorithm: Muon (quintic), Muon with Polar
Express, Polar Express through Gram Newton-Schulz (its peer: pytorch-optimizer's plain
Polar Express) and NorMuon. Prints curvlab / peer per pair. Pin it to one core::

    taskset -c 0 python benchmarks/bench_muon_steptime.py --rounds-scale 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_nn_optim import STEP_TIME_ROUNDS, problems  # noqa: E402

from curvlab.bench.optimizers import REGISTRY  # noqa: E402
from curvlab.bench.steptime import interleaved_step_times  # noqa: E402

PAIRS = [("Muon", "curvlab.Muon", "pytorch-optimizer.Muon"),
         ("PE", "curvlab.Muon+PolarExpress", "pytorch-optimizer.Muon+PolarExpress"),
         ("Gram", "curvlab.Muon+PolarExpress+Gram", "pytorch-optimizer.Muon+PolarExpress"),
         ("NorMuon", "curvlab.NorMuon", "pytorch-optimizer.NorMuon")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,charlm,gpt2")
    ap.add_argument("--rounds-scale", type=float, default=1.0,
                    help="times bench_nn_optim's step-time rounds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = list(dict.fromkeys(n for _, *pair in PAIRS for n in pair))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    makers = problems(quick=False)
    for task in args.tasks.split(","):
        problem = makers[task]()
        rounds = int(STEP_TIME_ROUNDS[problem.name] * args.rounds_scale)
        times, errors = interleaved_step_times(problem, [(REGISTRY[n], 1e-2) for n in names],
                                               rounds)
        if errors:
            raise RuntimeError(errors)
        print(f"{task:7s} " + "  ".join(
            f"{k} {times[a] / times[b]:.2f} ({times[a] * 1e3:.2f}/{times[b] * 1e3:.2f} ms)"
            for k, a, b in PAIRS), flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
