"""Cost of CurvatureMonitor at its default settings on the digits MLP.

SGD (lr 0.05, momentum 0.9, batch 128) on the digits MLP 64-128-128-10, the same training
run twice, interleaved in rounds: without a monitor and with
``CurvatureMonitor(model, loss_fn, data=(X, y), optimizer=opt)`` (defaults: a 256-image
monitor batch, a check every 100 steps, tol 3e-2, gradient norm / update size every
10 steps). Reported: wall time of both, the
monitor's self-measured overhead (fraction of wall time inside ``monitor.step``), the
extra wall time relative to the plain run, and the mean HVPs per warm-started check
(the first, cold, check excluded) next to a cold Lanczos at the same points.

Targets: overhead < 10% of training time; <= 3 HVPs per warm-started check on average.

Run: python benchmarks/bench_monitor_overhead.py [--quick] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors
from curvlab.diagnostics import CurvatureMonitor
from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator


def train(steps: int, with_monitor: bool, X, y, cold_check: bool = False) -> dict:
    model = digits_mlp(seed=0)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    monitor = (CurvatureMonitor(model, loss_fn, data=(X, y), optimizer=opt,
                                generator=torch.Generator().manual_seed(1))
               if with_monitor else None)
    cold = []
    t = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss)
            if cold_check and step % monitor.every == 0:  # not timed: comparison only
                t_pause = time.perf_counter()
                op = HessianOperator(model, loss_fn, monitor.batch)
                cold.append(lanczos(op, 1, tol=monitor.tol, max_iter=monitor.max_hvps,
                                    generator=torch.Generator().manual_seed(step)).num_matvecs)
                t += time.perf_counter() - t_pause
    out = {"seconds": time.perf_counter() - t}
    if monitor is not None:
        hv = [c["num_hvps"] for c in monitor.checks]
        out.update(overhead=monitor.overhead, warm_hvps=statistics.mean(hv[1:]),
                   first_hvps=hv[0], checks=len(hv), cold_hvps=statistics.mean(cold or [0]),
                   converged=all(c["converged"] for c in monitor.checks))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 steps, 1 round")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("curvlab").setLevel(logging.ERROR)
    steps = args.steps or (1000 if args.quick else 3000)
    rounds = args.rounds or (1 if args.quick else 3)
    (X, y), _ = load_digits_tensors()
    plain, monitored = [], []
    for _ in range(rounds):
        plain.append(train(steps, False, X, y))
        monitored.append(train(steps, True, X, y))
    cold = train(steps, True, X, y, cold_check=True)
    tp = statistics.median(r["seconds"] for r in plain)
    tm = statistics.median(r["seconds"] for r in monitored)
    ov = statistics.median(r["overhead"] for r in monitored)
    warm = statistics.median(r["warm_hvps"] for r in monitored)
    d = CurvatureMonitor(digits_mlp(), nn.CrossEntropyLoss(), data=(X, y), lr=1.0)
    print(f"digits MLP 64-128-128-10, SGD batch 128, {steps} steps, {rounds} rounds "
          f"(medians); monitor defaults: every={d.every}, {d.batch[0].shape[0]}-image batch, "
          f"tol={d.tol:g}, track_every={d.track_every}")
    print(f"{'plain training (s)':<40}{tp:>10.2f}")
    print(f"{'with monitor (s)':<40}{tm:>10.2f}")
    print(f"{'extra wall time vs plain':<40}{100 * (tm - tp) / tp:>9.1f}%")
    print(f"{'monitor self-measured overhead':<40}{100 * ov:>9.1f}%")
    print(f"{'checks per run':<40}{monitored[0]['checks']:>10d}")
    print(f"{'HVPs, first (cold) check':<40}{monitored[0]['first_hvps']:>10d}")
    print(f"{'HVPs per warm-started check (mean)':<40}{warm:>10.2f}")
    print(f"{'HVPs per cold check at the same points':<40}{cold['cold_hvps']:>10.2f}")
    print(f"{'all checks converged':<40}{str(all(r['converged'] for r in monitored)):>10}")
    ok = ov < 0.10 and warm <= 3
    print(f"target (overhead < 10%, <= 3 HVPs per warm check): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
