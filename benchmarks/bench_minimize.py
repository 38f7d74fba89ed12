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
NumPy's BLAS is limited to one thread like torch (unless the environment says otherwise).

``--floor`` adds ``repeats`` more runs of curvlab and pytorch-minimize per problem, clocks on
the objective's forward passes and on the autograd engine (every backward pass of both goes
through it) and prints, per problem size, the median of curvlab's forward + backward time
divided by pytorch-minimize's wall time: the ratio curvlab would reach with zero time
spent outside autograd, i.e. a lower bound for the wall-time ratio at these evaluation
counts.

``--bounded`` runs only the bound-constrained comparison instead: curvlab ``lbfgs`` with
``bounds`` (L-BFGS-B) vs scipy's L-BFGS-B on bound-constrained versions of the MGH problems
(every other variable bounded just short of the unconstrained minimizer, so about half the
bounds are active at the solution) and of the NIST StRD models (1/2 RSS from start 2, every
parameter boxed, the first one cut 1% short of the certified value). "Solved": projected
gradient ``||P(x - g) - x||_inf <= 1e-5`` (the tolerance both solvers are given) recomputed
at the returned point; evaluations are objective calls (value and gradient together).

Usage: ``python benchmarks/bench_minimize.py [--quick] [--repeats R] [--pairs P,Q]
[--floor] [--bounded] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

# Every solver gets one thread: torch.set_num_threads(1) below, and the BLAS behind NumPy /
# scipy pinned here, before NumPy loads (its idle worker threads otherwise spin and slow down
# whichever solver runs next, by up to 10x when other processes share the cores).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from curvlab.bench.classical import (  # noqa: E402
    PAIRS,
    TARGETS,
    Counted,
    run_once,
)
from curvlab.minimize.problems import logistic_regression, mgh_problems  # noqa: E402

HAVE_TORCHMIN = importlib.util.find_spec("torchmin") is not None


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


class AutogradClock:
    """Seconds spent in the objective's forward passes and in autograd's engine: wraps the
    objective, ``torch.autograd._engine_run_backward`` (behind ``autograd.grad`` and
    ``backward``) and curvlab's direct engine entry point while active."""

    def __init__(self):
        self.forward = self.backward = 0.0

    def objective(self, fun):
        def timed(x):
            t0 = time.perf_counter()
            try:
                return fun(x)
            finally:
                self.forward += time.perf_counter() - t0
        return timed

    def _timed(self, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.backward += time.perf_counter() - t0
        return run

    def __enter__(self):
        self._ev = importlib.import_module("curvlab.minimize.evaluator")
        self._saved = (torch.autograd._engine_run_backward, self._ev._RUN_BACKWARD)
        torch.autograd._engine_run_backward = self._timed(self._saved[0])
        if self._saved[1] is not None:
            self._ev._RUN_BACKWARD = self._timed(self._saved[1])
        return self

    def __exit__(self, *exc):
        torch.autograd._engine_run_backward, self._ev._RUN_BACKWARD = self._saved


def floor_table(pairs, active, problems, results, repeats):
    """Per size, the median over problems both solved of curvlab's autograd time (forward +
    engine) over pytorch-minimize's wall time (medians of ``repeats`` extra clocked runs)."""
    sizes = sorted({p.n for p in problems})
    print("\nfloor: curvlab forward+backward time / pytorch-minimize wall time (extra clocked "
          "runs; the ratio curvlab would reach with no time outside autograd)")
    print(f"{'pair':12s} " + " ".join(f"{'n=' + str(n):>7s}" for n in sizes) + "   worst")
    for name in pairs:
        solvers = dict(active[name])
        ours = list(solvers)[0]
        tm = [s for s in solvers if s.startswith("torchmin")]
        if not tm:
            continue
        per_size = defaultdict(list)
        for i, p in enumerate(problems):
            a, b = results[name][ours][i], results[name][tm[0]][i]
            if not (a["solved"] and b["solved"]):
                continue
            autograd, peer = [], []
            for _ in range(repeats):  # interleaved; runs longer than 2 s once
                clock = AutogradClock()
                timed = dataclasses.replace(p, objective=clock.objective(p.objective))
                with clock:
                    run_once(solvers[ours], timed)
                autograd.append(clock.forward + clock.backward)
                peer.append(run_once(solvers[tm[0]], p)[0])
                if peer[-1] > 2.0:
                    break
            autograd, t_peer = statistics.median(autograd), statistics.median(peer)
            per_size[p.n].append(autograd / t_peer)
        row = [f"{statistics.median(per_size[n]):7.2f}" if per_size[n] else f"{'-':>7s}"
               for n in sizes]
        worst = max((statistics.median(v) for v in per_size.values() if v), default=math.nan)
        print(f"{name:12s} " + " ".join(row) + f"   {worst:5.2f}")


def bounded_problems(nist_dir=None):
    """``(name, objective, x0, lb, ub)`` for the bound-constrained comparison."""
    import numpy as np
    import scipy.optimize as so

    out = []
    for p in mgh_problems():
        x0 = p.start()

        def fg(z, p=p):
            t = torch.from_numpy(z).requires_grad_(True)
            v = p.objective(t)
            (g,) = torch.autograd.grad(v, t)
            return float(v), g.numpy()

        ref = so.minimize(fg, x0.numpy(), jac=True, method="L-BFGS-B",
                          options=dict(gtol=1e-8, ftol=1e-300, maxiter=20000)).x
        lb = np.full(p.n, -np.inf)
        ub = np.full(p.n, np.inf)
        ub[::2] = ref[::2] - 0.1 * (1.0 + np.abs(ref[::2]))
        x0c = torch.from_numpy(np.minimum(x0.numpy(), ub))
        out.append((p.name, p.objective, x0c, lb, ub))
    if nist_dir:
        from curvlab.minimize.problems import nist_problems

        for p in nist_problems(nist_dir):
            c = np.array(p.certified)
            s2 = np.array(p.starts[1])
            lb = np.minimum(s2, c) - np.abs(c)
            ub = np.maximum(s2, c) + np.abs(c)
            if s2[0] > c[0]:
                lb[0] = c[0] + 0.01 * abs(c[0])
            else:
                ub[0] = c[0] - 0.01 * abs(c[0])

            def obj(b, p=p):
                r = p.residual(b)
                return 0.5 * torch.dot(r, r)

            out.append((f"NIST {p.name}", obj, torch.from_numpy(s2), lb, ub))
    return out


def bounded_main(nist_dir=None, gtol=1e-5):
    """curvlab lbfgs(bounds) vs scipy L-BFGS-B on the bounded problems (module doc): both
    get the same projected-gradient tolerance ``gtol`` and are judged by it, recomputed by
    autograd at the point each returns; a per-problem table side by side, then the
    summary."""
    import warnings

    import numpy as np
    import scipy.optimize as so

    from curvlab.minimize import minimize

    def pg(obj, x, lb, ub):
        t = torch.as_tensor(x, dtype=torch.float64).clone().requires_grad_(True)
        v = obj(t)
        (g,) = torch.autograd.grad(v, t)
        xn, gn = t.detach().numpy(), g.numpy()
        return float(np.max(np.abs(np.clip(xn - gn, lb, ub) - xn))), float(v.detach())

    rows = {"curvlab lbfgs+bounds": [], "scipy L-BFGS-B": []}
    for name, obj, x0, lb, ub in bounded_problems(nist_dir):
        fc = Counted(obj)
        try:
            r = minimize(fc, x0.clone(), "lbfgs", bounds=(lb, ub), gtol=gtol, max_iter=5000)
            x = r.x
        except Exception as e:  # noqa: BLE001
            print(f"  curvlab crashed on {name}: {e}")
            x = x0
        rows["curvlab lbfgs+bounds"].append((name, *pg(obj, x, lb, ub), fc.calls))
        fc = Counted(obj)

        def fg(z, fc=fc):
            t = torch.from_numpy(z).requires_grad_(True)
            v = fc(t)
            (g,) = torch.autograd.grad(v, t)
            return float(v.detach()), g.numpy()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = so.minimize(fg, x0.numpy(), jac=True, method="L-BFGS-B",
                            bounds=list(zip(lb, ub)),
                            options=dict(gtol=gtol, ftol=1e-300, maxiter=5000, maxfun=50000))
        rows["scipy L-BFGS-B"].append((name, *pg(obj, s.x, lb, ub), fc.calls))
    a, b = rows.values()
    ok = {k: [np.isfinite(r[1]) and r[1] <= gtol for r in v] for k, v in rows.items()}
    oa, ob = ok.values()
    print(f"\nbounded problems: {len(a)} (MGH with bounds + NIST StRD boxes); solved: "
          f"projected gradient <= {gtol:g} at the returned point (the tolerance both get)")
    print(f"{'problem':24s} | {'curvlab pg':>10s} {'f':>11s} {'evals':>6s} | "
          f"{'scipy pg':>10s} {'f':>11s} {'evals':>6s}")
    for i in range(len(a)):
        print(f"{a[i][0]:24s} | {a[i][1]:10.1e} {a[i][2]:11.4e} {a[i][3]:6d}{' ' if oa[i] else '*'}"
              f"| {b[i][1]:10.1e} {b[i][2]:11.4e} {b[i][3]:6d}{' ' if ob[i] else '*'}")
    print("(* = not solved)")
    both = [i for i in range(len(a)) if oa[i] and ob[i]]
    head = f"gm evals (both solved, {len(both)})"
    print(f"\n{'solver':22s} {'solved':>8s} {head:>28s}")
    for (name, recs), good in zip(rows.items(), ok.values(), strict=True):
        print(f"{name:22s} {sum(good):>4d}/{len(recs):<3d} "
              f"{gmean([recs[i][3] for i in both]):28.1f}")
    for (name, recs), good in zip(rows.items(), ok.values(), strict=True):
        bad = [r[0] for r, g_ in zip(recs, good, strict=True) if not g_]
        if bad:
            print(f"  unsolved by {name}: " + "; ".join(bad))
    return rows


def gmean(v):
    v = [max(a, 1) for a in v]
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else math.nan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset, one repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--floor", action="store_true",
                    help="also print curvlab's autograd time / pytorch-minimize's wall time")
    ap.add_argument("--bounded", action="store_true",
                    help="only the bound-constrained comparison (lbfgs vs L-BFGS-B)")
    ap.add_argument("--nist", default=None, help="NIST StRD directory for --bounded")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                          / "bench_minimize.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.bounded:
        nist = args.nist or os.environ.get("NIST_STRD_DIR") or next(
            (str(c) for c in (Path(__file__).resolve().parents[1].parent / "shared/data/nist_strd",
                              Path(__file__).resolve().parents[1].parents[1]
                              / "shared/data/nist_strd") if (c / "Misra1a.dat").exists()), None)
        bounded_main(nist)
        return
    problems = mgh_problems() + [logistic_regression()]
    pairs = [p for p in args.pairs.split(",") if p]
    if args.quick:
        keep = ("Rosenbrock (n=2)", "Beale", "Helical", "Logistic", "Broyden tridiagonal")
        problems = [p for p in problems if p.name.startswith(keep)]
        if args.pairs == ap.get_default("pairs"):
            pairs = list(TARGETS)
    repeats = args.repeats or (1 if args.quick else 3)
    if not HAVE_TORCHMIN:
        print("pytorch-minimize not installed: its columns are skipped")
    # warm up every runner once (imports, first-call overheads)
    warm = [p for p in problems if p.n == 2][0]
    active = {name: [(s, r) for s, r in PAIRS[name] if HAVE_TORCHMIN or
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
        peer = list(solvers)[1] if len(solvers) > 1 else ours  # peers may be missing
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
    if HAVE_TORCHMIN:
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
        if args.floor:
            floor_table(pairs, active, problems, results, repeats)
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
