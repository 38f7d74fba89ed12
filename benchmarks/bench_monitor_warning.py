"""How early does CurvatureMonitor warn before gradient descent blows up, and does it cry
wolf?

Setup (after Cohen et al., "Gradient descent on neural networks typically occurs at the
edge of stability", ICLR 2021): full-batch gradient descent on 500 digits images with
one-hot targets and MSE loss, a tanh MLP 64-64-64-10, run at several learning rates
``lr = f * 2 / lambda_0`` (``lambda_0`` = the initial sharpness), all of which start
stable (``f < 1``). Progressive sharpening drives ``lr x lambda_max`` up; runs whose ratio
reaches 2 become unstable. A run *diverges* when the loss first exceeds twice its running
minimum. The monitor runs with its default settings except ``every=10`` (checks every 10
steps) and uses the training set as its monitor batch (this is full-batch GD).

Per run: the step of the first stability warning (``approaching`` or ``crossed`` on
``lr x lambda_max``), the step the loss first doubled, the lead time between them, the
crossing step the first warning forecast vs the first check at which the ratio was >= 2,
and the gradient-norm / update-size jump events (reported separately). A warning claims
"the ratio will reach 2 within ``horizon`` steps" (300 here), so each run is observed for
``steps + horizon`` steps: a run diverges if the loss doubles anywhere in that time, and a
stability warning issued in the first ``steps`` steps of a run that never diverges counts
as false (warnings in the last ``horizon`` steps cannot be verified and are not counted).
Target: every divergence warned at least 50 steps ahead, no false warnings.

Run: python benchmarks/bench_monitor_warning.py [--quick] [--steps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch import nn

from curvlab.bench.problems.digits import load_digits_tensors
from curvlab.diagnostics import CurvatureMonitor
from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator

FRACTIONS = (0.05, 0.12, 0.18, 0.24, 0.3, 0.36, 0.48, 0.6, 0.7)
QUICK_FRACTIONS = (0.12, 0.36, 0.6)
LEAD_TARGET = 50


def setup():
    (X, y), _ = load_digits_tensors()
    X, y = X[:500], y[:500]
    return X, nn.functional.one_hot(y, 10).float()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


def run(lr: float, steps: int, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """Train for ``steps`` + the monitor's horizon; warnings count up to ``steps``."""
    model = make_model()
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = CurvatureMonitor(model, loss_fn, (X, Y), optimizer=opt, every=10)
    running_min, doubled = float("inf"), None
    t = time.perf_counter()
    for step in range(1, steps + monitor.horizon + 1):
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        monitor.step(loss)
        value = float(loss.detach())
        running_min = min(running_min, value)
        if doubled is None and value > 2 * running_min:
            doubled = step
        if doubled is not None and step >= doubled + 20:
            break
    stab = [e for e in monitor.events if e.kind in ("approaching", "crossed")
            and (doubled is not None or e.step <= steps)]
    jumps = [e for e in monitor.events if e.kind.endswith("_jump")]
    first = stab[0] if stab else None
    crossed_at = next((c["step"] for c in monitor.checks if c["lr_sharpness"] >= 2), None)
    return {
        "lr": lr, "diverged_at": doubled, "first_warning": first.step if first else None,
        "first_warning_kind": first.kind if first else None,
        "forecast": first.predicted_step if first else None, "crossed_at": crossed_at,
        "lead": (doubled - first.step) if (first and doubled) else None,
        "jumps": [(e.step, e.kind) for e in jumps],
        "max_ratio": max(c["lr_sharpness"] for c in monitor.checks),
        "hvps_per_check": monitor.hvps_per_check, "seconds": time.perf_counter() - t,
        "steps_run": monitor.step_count,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 learning rates, 600 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the raw results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("curvlab").setLevel(logging.ERROR)  # events are tabulated below
    steps = args.steps or (600 if args.quick else 2000)
    fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
    X, Y = setup()
    op = HessianOperator(make_model(), nn.MSELoss(), (X, Y))
    lam0 = float(lanczos(op, 1, tol=1e-6).eigenvalues[0])
    print(f"full-batch GD, tanh MLP 64-64-64-10, 500 digits, MSE; lambda_0 = {lam0:.4f}, "
          f"2/lambda_0 = {2 / lam0:.3f}; {steps} steps (+300 to verify warnings); "
          f"monitor every 10 steps")
    head = (f"{'f':>5}{'lr':>7}{'max lr*lam':>11}{'diverged':>9}{'warned':>8}{'kind':>12}"
            f"{'lead':>6}{'forecast':>10}{'crossed':>9}{'jumps':>6}{'HVP/chk':>8}{'sec':>6}")
    print(head)
    print("-" * len(head))
    results = []
    for f in fractions:
        r = run(f * 2 / lam0, steps, X, Y)
        r["fraction"] = f
        results.append(r)

        def fmt(v, spec="d"):
            return "-" if v is None else format(v, spec)

        print(f"{f:>5.2f}{r['lr']:>7.3f}{r['max_ratio']:>11.2f}{fmt(r['diverged_at']):>9}"
              f"{fmt(r['first_warning']):>8}{r['first_warning_kind'] or '-':>12}"
              f"{fmt(r['lead']):>6}{fmt(r['forecast'], '.0f'):>10}{fmt(r['crossed_at']):>9}"
              f"{len(r['jumps']):>6}{r['hvps_per_check']:>8.2f}{r['seconds']:>6.1f}")
    diverged = [r for r in results if r["diverged_at"] is not None]
    stable = [r for r in results if r["diverged_at"] is None]
    leads = [r["lead"] for r in diverged]
    false = sum(r["first_warning"] is not None for r in stable)
    missed = sum(r["lead"] is None or r["lead"] < 0 for r in diverged)
    print(f"\ndiverging runs: {len(diverged)}; lead times (steps): {leads}; missed: {missed}")
    print(f"non-diverging runs: {len(stable)}; runs with a false stability warning: {false}; "
          f"jump events on them: {sum(len(r['jumps']) for r in stable)}")
    ok = (not missed and all(lead >= LEAD_TARGET for lead in leads) and false == 0)
    print(f"target (every divergence warned >= {LEAD_TARGET} steps ahead, no false warnings): "
          f"{'MET' if ok else 'NOT MET'}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"lambda_0": lam0, "steps": steps, "runs": results}, fh, indent=1)


if __name__ == "__main__":
    main()
