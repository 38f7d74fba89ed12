"""curvlab.minimize vs scipy.optimize vs pytorch-minimize (vs torch.optim.LBFGS), side by side.

Every solver runs on the same MGH-style problems (``curvlab.minimize.problems``) plus
L2-regularized logistic regression on scikit-learn's breast-cancer data, in float64 on the
CPU, with tight tolerances (gradient tolerance 1e-5, tiny step/function tolerances so the
peers do not stop early). The benchmark itself decides "solved": the gradient at the
returned ``x`` is recomputed by autograd and must satisfy ``||grad||_inf <= 1e-5``
(solver flags are ignored). Evaluations are counted by wrapping the objective (every
call is one forward pass; curvlab and scipy evaluate value and gradient together), HVPs
by the solver's own products (scipy: calls to ``hessp``; pytorch-minimize does not report
them). Wall time: median over repeats (runs longer than 2 s are timed once). Other
processes may share the machine: the ratios are what to read, not the absolute times.

Usage: ``python benchmarks/bench_minimize.py [--quick] [--repeats R] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.optimize as so
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from curvlab.minimize import minimize  # noqa: E402
from curvlab.minimize.problems import logistic_regression, mgh_problems  # noqa: E402

GTOL = 1e-5
MAX_ITER = 5000

try:
    import torchmin
except ImportError:  # pragma: no cover - optional peer
    torchmin = None


class Counted:
    """Wrap an objective to count forward evaluations."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x):
        self.calls += 1
        return self.f(x)


def verify(problem, x: torch.Tensor) -> float:
    x = x.detach().to(torch.float64).reshape(-1).clone().requires_grad_(True)
    f = problem.objective(x)
    (g,) = torch.autograd.grad(f, x)
    gn = float(g.abs().max())
    return gn if math.isfinite(gn) and math.isfinite(float(f.detach())) else math.inf


# --- solver runners: each returns (x, hvp_count or None) and uses the counted f -----

def run_curvlab(method):
    def run(fc, x0):
        r = minimize(fc, x0, method, gtol=GTOL, max_iter=MAX_ITER)
        return r.x, r.nhvp + r.nhess * x0.numel()
    return run


def _np_wrappers(fc, counters):
    def fg(xn):
        x = torch.from_numpy(xn).requires_grad_(True)
        v = fc(x)
        (g,) = torch.autograd.grad(v, x)
        return float(v), g.numpy()

    def hessp(xn, pn):
        counters["hvp"] += 1
        x = torch.from_numpy(xn).requires_grad_(True)
        v = fc.f(x)
        (g,) = torch.autograd.grad(v, x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, torch.from_numpy(pn))
        return hv.numpy()

    def hess(xn):
        counters["hvp"] += xn.size
        return torch.func.hessian(fc.f)(torch.from_numpy(xn)).numpy()

    return fg, hessp, hess


SCIPY_OPTIONS = {
    "L-BFGS-B": dict(gtol=GTOL, ftol=1e-300, maxiter=MAX_ITER, maxfun=10 * MAX_ITER),
    "BFGS": dict(gtol=GTOL, norm=np.inf, maxiter=MAX_ITER),
    "Newton-CG": dict(xtol=1e-12, maxiter=MAX_ITER),
    "trust-ncg": dict(gtol=GTOL, maxiter=MAX_ITER),
    "trust-exact": dict(gtol=GTOL, maxiter=MAX_ITER),
    "dogleg": dict(gtol=GTOL, maxiter=MAX_ITER),
}


def run_scipy(method):
    def run(fc, x0):
        counters = {"hvp": 0}
        fg, hessp, hess = _np_wrappers(fc, counters)
        kw = {}
        if method in ("Newton-CG", "trust-ncg"):
            kw["hessp"] = hessp
        if method in ("trust-exact", "dogleg"):
            kw["hess"] = hess
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = so.minimize(fg, x0.numpy(), jac=True, method=method,
                            options=SCIPY_OPTIONS[method], **kw)
        return torch.from_numpy(np.asarray(r.x)), counters["hvp"]
    return run


TORCHMIN_OPTIONS = {
    "l-bfgs": dict(gtol=GTOL, xtol=1e-300, history_size=10),  # same memory as the others
    "bfgs": dict(gtol=GTOL, xtol=1e-300),
    "newton-cg": dict(xtol=1e-300),
    "newton-exact": dict(xtol=1e-300),
    "trust-ncg": dict(gtol=GTOL),
    "trust-exact": dict(gtol=GTOL),
    "dogleg": dict(gtol=GTOL),
}


def run_torchmin(method):
    def run(fc, x0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = torchmin.minimize(fc, x0.clone(), method, max_iter=MAX_ITER,
                                  options=dict(TORCHMIN_OPTIONS[method]))
        return r.x, None
    return run


def run_torch_lbfgs(fc, x0):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=MAX_ITER, max_eval=10 * MAX_ITER,
                            tolerance_grad=GTOL, tolerance_change=1e-300, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = fc(x)
        v.backward()
        return v

    opt.step(closure)
    return x.detach(), None


PAIRS = {
    "lbfgs": [("curvlab lbfgs", run_curvlab("lbfgs")), ("scipy L-BFGS-B", run_scipy("L-BFGS-B")),
              ("torchmin l-bfgs", run_torchmin("l-bfgs")),
              ("torch.optim.LBFGS", run_torch_lbfgs)],
    "bfgs": [("curvlab bfgs", run_curvlab("bfgs")), ("scipy BFGS", run_scipy("BFGS")),
             ("torchmin bfgs", run_torchmin("bfgs"))],
    "newton-cg": [("curvlab newton-cg", run_curvlab("newton-cg")),
                  ("scipy Newton-CG", run_scipy("Newton-CG")),
                  ("torchmin newton-cg", run_torchmin("newton-cg"))],
    "trust-ncg": [("curvlab trust-ncg", run_curvlab("trust-ncg")),
                  ("scipy trust-ncg", run_scipy("trust-ncg")),
                  ("torchmin trust-ncg", run_torchmin("trust-ncg"))],
    "trust-exact": [("curvlab trust-exact", run_curvlab("trust-exact")),
                    ("scipy trust-exact", run_scipy("trust-exact")),
                    ("torchmin trust-exact", run_torchmin("trust-exact"))],
    "dogleg": [("curvlab dogleg", run_curvlab("dogleg")), ("scipy dogleg", run_scipy("dogleg")),
               ("torchmin dogleg", run_torchmin("dogleg"))],
    "newton": [("curvlab newton", run_curvlab("newton")),
               ("torchmin newton-exact", run_torchmin("newton-exact"))],
}
TARGETS = ("lbfgs", "bfgs", "newton-cg", "trust-ncg", "trust-exact")


def run_once(runner, problem):
    """One timed run: ``(seconds, record)``."""
    fc = Counted(problem.objective)
    x0 = problem.start()
    t0 = time.perf_counter()
    try:
        x, hvp = runner(fc, x0)
        err = None
    except Exception as e:  # a peer crashing is a result, not a benchmark failure
        x, hvp, err = x0, None, f"{type(e).__name__}: {str(e)[:60]}"
    elapsed = time.perf_counter() - t0
    gn = verify(problem, x) if err is None else math.inf
    return elapsed, dict(problem=problem.name, n=problem.n, evals=fc.calls, hvp=hvp,
                         grad_inf=gn, solved=gn <= GTOL, error=err)


def run_pair(solvers, problem, repeats):
    """Run every solver of a pair on one problem, interleaving the repeats so that load
    from other processes hits all of them alike; runs longer than 2 s are timed once."""
    times = {name: [] for name, _ in solvers}
    recs = {}
    for rep in range(repeats):
        for name, runner in solvers:
            if rep and times[name][0] > 2.0:
                continue
            t, rec = run_once(runner, problem)
            times[name].append(t)
            recs.setdefault(name, rec)
    for name in recs:
        recs[name]["time"] = statistics.median(times[name])
    return recs


def gmean(v):
    v = [max(a, 1) for a in v]
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else math.nan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset, one repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                          / "bench_minimize.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    problems = mgh_problems() + [logistic_regression()]
    pairs = [p for p in args.pairs.split(",") if p]
    if args.quick:
        keep = ("Rosenbrock (n=2)", "Beale", "Helical", "Logistic", "Broyden tridiagonal")
        problems = [p for p in problems if p.name.startswith(keep)]
        if args.pairs == ap.get_default("pairs"):
            pairs = list(TARGETS)
    repeats = args.repeats or (1 if args.quick else 3)
    if torchmin is None:
        print("pytorch-minimize not installed: its columns are skipped")
    # warm up every runner once (imports, first-call overheads)
    warm = [p for p in problems if p.n == 2][0]
    active = {name: [(s, r) for s, r in PAIRS[name] if torchmin is not None or
                     "torchmin" not in s] for name in pairs}
    for name in pairs:
        run_pair(active[name], warm, 1)
    results = defaultdict(dict)
    print(f"{len(problems)} problems, repeats={repeats} (interleaved), threads=1, float64 CPU")
    for name in pairs:
        t0 = time.perf_counter()
        for p in problems:
            for solver, rec in run_pair(active[name], p, repeats).items():
                results[name].setdefault(solver, []).append(rec)
        print(f"  ran {name} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    summary = {}
    hdr = (f"{'pair':12s} {'solver':22s} {'solved':>7s} {'gm evals':>9s} {'gm evals*':>9s} "
           f"{'HVPs':>7s} {'time s':>8s} {'t/curvlab':>9s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for name in pairs:
        solvers = results[name]
        ours = list(solvers)[0]
        peer = list(solvers)[1]
        common = [i for i, r in enumerate(solvers[ours])
                  if r["solved"] and solvers[peer][i]["solved"]]
        t_ours = sum(r["time"] for r in solvers[ours])
        for solver, recs in solvers.items():
            solved = sum(r["solved"] for r in recs)
            gm_all = gmean([r["evals"] for r in recs if r["solved"]])
            gm_common = gmean([recs[i]["evals"] for i in common])
            hv = [r["hvp"] for r in recs]
            hvs = "-" if any(h is None for h in hv) else str(sum(hv))
            tt = sum(r["time"] for r in recs)
            print(f"{name:12s} {solver:22s} {solved:>3d}/{len(recs):<3d} {gm_all:9.1f} "
                  f"{gm_common:9.1f} {hvs:>7s} {tt:8.3f} {tt / t_ours:9.2f}")
            summary[f"{name}/{solver}"] = dict(solved=solved, total=len(recs), gm_evals=gm_all,
                                               gm_evals_common=gm_common, time=tt)
        print()
    print("gm evals: geometric mean of objective evaluations over the problems the solver "
          "solved; gm evals*: over the problems solved by both curvlab and the first peer.")
    # wall time vs pytorch-minimize per problem size
    if torchmin is not None:
        sizes = sorted({p.n for p in problems})
        print("\nwall-time ratio curvlab / pytorch-minimize per problem size: median over the "
              "problems of that size that both solved (a peer that crashes or stops early is "
              "not 'faster'); < 1 means curvlab is faster")
        print(f"{'pair':12s} " + " ".join(f"{'n=' + str(n):>7s}" for n in sizes) + "   worst")
        for name in pairs:
            solvers = results[name]
            tm = [s for s in solvers if s.startswith("torchmin")]
            if not tm:
                continue
            ours, theirs = solvers[list(solvers)[0]], solvers[tm[0]]
            row, worst = [], 0.0
            for n in sizes:
                ratios = [a["time"] / b["time"] for a, b in zip(ours, theirs, strict=True)
                          if a["n"] == n and a["solved"] and b["solved"]]
                if not ratios:
                    row.append(f"{'-':>7s}")
                    continue
                med = statistics.median(ratios)
                worst = max(worst, med)
                row.append(f"{med:7.2f}")
            print(f"{name:12s} " + " ".join(row) + f"   {worst:5.2f}")
    print("\nunsolved (|grad|_inf > 1e-5 at the returned x) or crashed:")
    for name in pairs:
        for solver, recs in results[name].items():
            bad = [f"{r['problem']}" + (f" [{r['error']}]" if r["error"] else
                                        f" ({r['grad_inf']:.1e})") for r in recs if not r["solved"]]
            if bad:
                print(f"  {solver}: " + "; ".join(bad))
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "runs": results}, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
