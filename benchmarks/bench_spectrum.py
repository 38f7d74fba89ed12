"""HVPs and time to reach lambda_max within 1e-3 relative, side by side in one run.

Problem: a digits MLP 64-256-320-10 (~102k parameters, float32), Hessian of the
cross-entropy on a fixed batch of 512 training images, at three points of an SGD run
(momentum 0.9, lr 0.05, batch 128): at initialization, after 50 steps and after 1000
steps -- the spectral gap at the top, and so the cost of every method, differs between
them. Ground truth: lambda_max of the same network in float64 by curvlab Lanczos to
relative residual 1e-10.

Contenders (each asked for tol = 1e-3, all from the same random start vector per repeat):

  curvlab lanczos   curvlab.linalg.lanczos(op, tol=1e-3): stops at relative residual
                    ||Hy - theta y|| / theta <= 1e-3 (a bound on the eigenvalue error)
  curvlab power     curvlab.linalg.power_iteration(op, tol=1e-3): the same residual rule
  pyhessian power   pyhessian.hessian(...).eigenvalues(tol=1e-3): stops when the Rayleigh
                    quotient changes by < 1e-3 relative (no error guarantee)
  scipy eigsh       scipy.sparse.linalg.eigsh(op.to_scipy(), k=1, which="LA", tol=1e-3)
                    (ARPACK implicitly restarted Lanczos, same residual rule as ours)

Columns: HVPs and seconds until the method stopped, the true relative error of what it
returned, whether that meets 1e-3, and ("oracle") the first HVP count at which the
method's running estimate was within 1e-3 of the truth (known only with the ground truth;
the fairest measure of raw convergence speed). Medians over repeats; ratios are
curvlab lanczos / contender. Repeats are interleaved so machine noise hits all alike.

How many HVPs Lanczos saves over power iteration depends on the gap at the top of the
spectrum: on the 512-image batch (the full run) power iteration needed 3.4-4.7x the HVPs of
Lanczos; on the 256-image batch of ``--quick`` the top is better separated and it needs
only 2-3x. Results of a full run are in ``benchmarks/results/bench_spectrum.{json,txt}``.

Run: python benchmarks/bench_spectrum.py [--quick] [--repeats N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors
from curvlab.linalg import lanczos, power_iteration
from curvlab.linops import HessianOperator

TOL = 1e-3


def problem(batch: int, steps: int):
    (X, y), _ = load_digits_tensors()
    model = digits_mlp(hidden=(256, 320), seed=0)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, loss_fn, (X[:batch], y[:batch])


def ground_truth(model: nn.Module, loss_fn: nn.Module, data) -> float:
    m64 = copy.deepcopy(model).double()
    op = HessianOperator(m64, loss_fn, (data[0].double(), data[1]))
    res = lanczos(op, 1, tol=1e-10, max_iter=400, generator=torch.Generator().manual_seed(99))
    if not res.converged:
        raise RuntimeError("ground truth Lanczos did not converge")
    return float(res.eigenvalues[0])


def first_within(history: list[float], truth: float) -> int | None:
    for i, v in enumerate(history):
        if abs(v - truth) <= TOL * abs(truth):
            return i + 1
    return None


def run_curvlab(kind: str, model, loss_fn, data, v0):
    op = HessianOperator(model, loss_fn, data)
    t = time.perf_counter()
    if kind == "lanczos":
        res = lanczos(op, 1, tol=TOL, max_iter=300, v0=v0)
    else:
        res = power_iteration(op, tol=TOL, max_iter=1000, v0=v0)
    elapsed = time.perf_counter() - t
    return (float(res.eigenvalues[0]), res.num_matvecs, elapsed,
            [h[0] for h in res.history], res.converged)


def run_pyhessian(model, loss_fn, data, v0):
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package shadows it)

    estimates: list[float] = []
    original = ph.hessian_vector_product

    def counting(gradsH, params, v):
        Hv = original(gradsH, params, v)
        estimates.append(float(sum((h * w).sum() for h, w in zip(Hv, v, strict=True))))
        return Hv

    ph.hessian_vector_product = counting
    torch.manual_seed(int(v0.abs().sum() * 1000) % 2 ** 31)  # PyHessian draws its own start
    try:
        t = time.perf_counter()
        hess = ph.hessian(model, loss_fn, data=data, cuda=False)
        eigs, _ = hess.eigenvalues(maxIter=1000, tol=TOL, top_n=1)
        elapsed = time.perf_counter() - t
    finally:
        ph.hessian_vector_product = original
        for p in model.parameters():
            p.grad = None
    return float(eigs[0]), len(estimates), elapsed, estimates, True


def run_eigsh(model, loss_fn, data, v0):
    from scipy.sparse.linalg import eigsh

    op = HessianOperator(model, loss_fn, data)
    lin = op.to_scipy()
    t = time.perf_counter()
    vals = eigsh(lin, k=1, which="LA", tol=TOL, v0=v0.double().numpy(),
                 return_eigenvectors=False)
    elapsed = time.perf_counter() - t
    return float(vals[0]), op.num_matvecs, elapsed, None, True


def bench_state(steps: int, batch: int, repeats: int) -> dict:
    model, loss_fn, data = problem(batch, steps)
    n = sum(p.numel() for p in model.parameters())
    truth = ground_truth(model, loss_fn, data)
    print(f"\n== after {steps} SGD steps: MLP 64-256-320-10, {n} parameters, Hessian on "
          f"{batch} images; lambda_max (float64 truth) = {truth:.8g}; tol = {TOL:g}; "
          f"{repeats} repeats")
    methods = {
        "curvlab lanczos": lambda v0: run_curvlab("lanczos", model, loss_fn, data, v0),
        "curvlab power": lambda v0: run_curvlab("power", model, loss_fn, data, v0),
        "pyhessian power": lambda v0: run_pyhessian(model, loss_fn, data, v0),
        "scipy eigsh": lambda v0: run_eigsh(model, loss_fn, data, v0),
    }
    rows: dict[str, list[dict]] = {k: [] for k in methods}
    for r in range(repeats):
        v0 = torch.randn(n, generator=torch.Generator().manual_seed(r))
        for name, fn in methods.items():
            value, hvps, secs, history, converged = fn(v0)
            err = abs(value - truth) / abs(truth)
            rows[name].append({"hvps": hvps, "seconds": secs, "rel_error": err,
                               "meets_tol": err <= TOL, "converged": converged,
                               "oracle_hvps": first_within(history, truth)
                               if history is not None else None})

    def med(name: str, key: str) -> float:
        vals = [row[key] for row in rows[name] if row[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    head = (f"{'method':<17}{'HVPs':>7}{'seconds':>9}{'rel.err':>10}{'meets':>7}"
            f"{'oracle HVPs':>13}{'HVP ratio':>11}{'time ratio':>12}")
    print(head)
    print("-" * len(head))
    base_h, base_t = med("curvlab lanczos", "hvps"), med("curvlab lanczos", "seconds")
    for name in methods:
        meets = sum(row["meets_tol"] for row in rows[name])
        print(f"{name:<17}{med(name, 'hvps'):>7.0f}{med(name, 'seconds'):>9.3f}"
              f"{med(name, 'rel_error'):>10.1e}{f'{meets}/{repeats}':>7}"
              f"{med(name, 'oracle_hvps'):>13.0f}{base_h / med(name, 'hvps'):>11.2f}"
              f"{base_t / med(name, 'seconds'):>12.2f}")
    met = (all(row["meets_tol"] for row in rows["curvlab lanczos"])
           and base_h <= med("curvlab power", "hvps") / 3)
    print(f"target (lanczos meets tol in every repeat, HVPs <= 1/3 of power iteration's "
          f"under the same stopping rule): {'MET' if met else 'NOT MET'}")
    return {"steps": steps, "parameters": n, "batch": batch, "truth": truth, "rows": rows,
            "target_met": met}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 repeats, a 256-image batch, two training states")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the raw results as JSON")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    batch = 256 if args.quick else 512
    states = (0, 1000) if args.quick else (0, 50, 1000)
    torch.set_num_threads(1)
    results = [bench_state(steps, batch, repeats) for steps in states]
    print("\n(medians; ratio = curvlab lanczos / method; 'oracle HVPs' = first product count "
          "at which the method's running estimate was within 1e-3 of the truth; "
          "pyhessian stops on a change in the estimate, the others on the residual)")
    print(f"overall target: {'MET' if all(r['target_met'] for r in results) else 'NOT MET'} "
          f"in {sum(r['target_met'] for r in results)}/{len(results)} training states")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"tol": TOL, "states": results}, fh, indent=1, default=float)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
