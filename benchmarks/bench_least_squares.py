"""curvlab.least_squares vs scipy (lm, trf; exact Jacobian) vs lmfit on the NIST StRD suite.

27 nonlinear regression problems x 2 starting points, every solver at its default
settings, float64 on the CPU. Scored against the certified values: LRE (log relative
error, the worst parameter, capped at 11). Per solver: cases with >= 4 and >= 6 correct
digits, mean LRE, false successes (success claimed with < 2 digits), false failures
(failure reported with >= 4 digits), and evaluations: calls of the residual plus calls of
the Jacobian (scipy's nfev + njev; curvlab's nfev + njev, one autodiff Jacobian is one
call; lmfit's nfev with its finite differences), geometric mean over all 54 cases and the
ratio to curvlab. Timings are not reported (the machine is shared; counts are the metric).

Usage: ``python benchmarks/bench_least_squares.py [--data DIR] [--json PATH]``; ``DIR``
defaults to ``$NIST_STRD_DIR`` or ``../shared/data/nist_strd`` next to the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy.optimize as so  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from curvlab.minimize import least_squares  # noqa: E402
from curvlab.minimize.problems import nist_problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def default_data() -> str:
    cands = [os.environ.get("NIST_STRD_DIR", "")] + [
        str(p / "shared" / "data" / "nist_strd") for p in (ROOT.parent, ROOT.parent.parent)]
    for c in cands:
        if c and Path(c, "Misra1a.dat").exists():
            return c
    raise SystemExit("NIST StRD data not found: pass --data DIR or set NIST_STRD_DIR")


def run_curvlab(p, x0):
    res = least_squares(p.residual, torch.tensor(x0, dtype=torch.float64))
    return res.x.tolist(), bool(res.success), res.nfev + res.njev


def _np(p):
    f = lambda b: p.residual(torch.from_numpy(b)).numpy()  # noqa: E731
    jac = lambda b: torch.func.jacfwd(p.residual)(torch.from_numpy(b)).numpy()  # noqa: E731
    return f, jac


def run_scipy(method):
    def run(p, x0):
        f, jac = _np(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = so.least_squares(f, np.array(x0), jac=jac, method=method)
        return r.x.tolist(), bool(r.success), r.nfev + (r.njev or 0)
    return run


def run_lmfit(p, x0):
    import lmfit

    f, _ = _np(p)
    params = lmfit.Parameters()
    for i, v in enumerate(x0):
        params.add(f"b{i}", value=v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lmfit.minimize(lambda pr: f(np.array([pr[f"b{i}"].value for i in
                                                    range(len(x0))])), params)
    return [out.params[f"b{i}"].value for i in range(len(x0))], bool(out.success), out.nfev


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results"
                                          / "bench_least_squares.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    problems = nist_problems(args.data or default_data())
    solvers = {"curvlab lm": run_curvlab, "scipy lm": run_scipy("lm"),
               "scipy trf": run_scipy("trf")}
    if importlib.util.find_spec("lmfit") is not None:
        solvers["lmfit leastsq"] = run_lmfit
    else:
        print("lmfit not installed: its row is skipped")
    rows = {}
    for name, run in solvers.items():
        recs = []
        for p in problems:
            for s, x0 in enumerate(p.starts):
                try:
                    x, ok, ev = run(p, list(x0))
                    lre = p.lre(x) if all(math.isfinite(v) for v in x) else 0.0
                except Exception as err:  # a crash scores as a failure at 0 digits
                    x, ok, ev, lre = None, False, 0, 0.0
                    print(f"  {name} crashed on {p.name} start {s + 1}: {err}")
                recs.append(dict(problem=p.name, start=s + 1, lre=lre, success=ok, evals=ev))
        rows[name] = recs
    ref = rows["curvlab lm"]

    def gm(v):
        v = [max(a, 1) for a in v]
        return math.exp(sum(math.log(a) for a in v) / len(v))

    hdr = (f"{'solver':14s} {'>=4 dig':>8s} {'>=6 dig':>8s} {'mean LRE':>9s} {'false succ':>10s} "
           f"{'false fail':>10s} {'gm evals':>9s} {'evals/curvlab':>13s}")
    print(f"\nNIST StRD, {len(ref)} cases, default settings\n" + hdr + "\n" + "-" * len(hdr))
    summary = {}
    g_ref = gm([r["evals"] for r in ref])
    for name, recs in rows.items():
        d = dict(
            ge4=sum(r["lre"] >= 4 for r in recs), ge6=sum(r["lre"] >= 6 for r in recs),
            mean_lre=sum(r["lre"] for r in recs) / len(recs),
            false_success=sum(r["success"] and r["lre"] < 2 for r in recs),
            false_failure=sum((not r["success"]) and r["lre"] >= 4 for r in recs),
            gm_evals=gm([r["evals"] for r in recs]))
        summary[name] = d
        print(f"{name:14s} {d['ge4']:>5d}/{len(recs)} {d['ge6']:>5d}/{len(recs)} "
              f"{d['mean_lre']:9.2f} {d['false_success']:10d} {d['false_failure']:10d} "
              f"{d['gm_evals']:9.1f} {d['gm_evals'] / g_ref:13.2f}")
    print("\nper case (LRE / success / evals):")
    for i, r in enumerate(ref):
        cells = "  ".join(f"{rows[n][i]['lre']:5.2f} {'S' if rows[n][i]['success'] else 'F'} "
                          f"{rows[n][i]['evals']:4d}" for n in rows)
        print(f"  {r['problem']:9s} {r['start']}  {cells}")
    print("  columns: " + ", ".join(rows))
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "runs": rows}, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
