"""Classical solvers side by side: curvlab.minimize vs scipy.optimize vs pytorch-minimize.

Shared by ``benchmarks/bench_minimize.py`` (the detailed table) and ``curvlab bench --suite
classical``. "Solved" is decided here, not by the solver: the gradient at the returned x is
recomputed by autograd and must satisfy ``||grad||_inf <= 1e-5``. Evaluations are counted
by wrapping the objective (one call = one forward pass).
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from typing import Any

import numpy as np
import scipy.optimize as so
import torch

from curvlab.bench.runner import Task
from curvlab.minimize import minimize
from curvlab.minimize.problems import logistic_regression, mgh_problems

GTOL = 1e-5
MAX_ITER = 5000



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

def run_curvlab(method, path=None):
    def run(fc, x0):
        callback = None if path is None else (lambda res: path.append(res.x.tolist()))
        r = minimize(fc, x0, method, gtol=GTOL, max_iter=MAX_ITER, callback=callback)
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


def run_scipy(method, path=None):
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
                            options=SCIPY_OPTIONS[method], **kw,
                            callback=None if path is None else (lambda xk: path.append(
                                np.asarray(xk).tolist())))
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
        import torchmin

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


PEER_MODULE = {"scipy": None, "torchmin": "torchmin", "torch.optim": None}
SUITE_METHODS = {  # curvlab method -> the peers run on the same problems
    "lbfgs": (("scipy", "L-BFGS-B"), ("torchmin", "l-bfgs")),
    "bfgs": (("scipy", "BFGS"), ("torchmin", "bfgs")),
    "newton-cg": (("scipy", "Newton-CG"), ("torchmin", "newton-cg")),
    "trust-ncg": (("scipy", "trust-ncg"), ("torchmin", "trust-ncg")),
    "trust-exact": (("scipy", "trust-exact"), ("torchmin", "trust-exact")),
}


def _runner(library: str, method: str, path: list | None):
    if library == "curvlab":
        return run_curvlab(method, path)
    if library == "scipy":
        return run_scipy(method, path)
    return run_torchmin(method)


def _classical_task(problem: Any, library: str, method: str) -> Task:
    def fn(progress: Any) -> dict[str, Any]:
        path = [problem.start().tolist()] if problem.n == 2 else None
        seconds, rec = run_once(_runner(library, method, path), problem)
        progress(1.0)
        status = "ok" if rec["error"] is None else "error"
        metrics = {"solved": bool(rec["solved"]), "evaluations": rec["evals"],
                   "hvps": rec["hvp"], "grad_inf": rec["grad_inf"], "time": seconds,
                   "n": rec["n"]}
        out = {"status": status, "metrics": metrics, "series": {"path": path or []}}
        if rec["error"]:
            out["metrics"]["error"] = rec["error"]
        return out

    return Task("classical", problem.name, f"{library} {method}", {"n": problem.n}, fn)


def classical_tasks(quick: bool) -> tuple[list[Task], list[str]]:
    """curvlab's quasi-Newton/Newton methods and their scipy / pytorch-minimize
    counterparts on the MGH-style problems (n <= 4 when quick) and logistic regression."""
    problems = [p for p in mgh_problems() if not quick or p.n <= 4] + [logistic_regression()]
    notices = []
    if importlib.util.find_spec("torchmin") is None:
        notices.append("pytorch-minimize is not installed (pip install -e '.[bench]'): "
                       "its classical runs are skipped")
    methods = ("lbfgs", "newton-cg", "trust-ncg") if quick else tuple(SUITE_METHODS)
    tasks = []
    for method in methods:
        for problem in problems:
            tasks.append(_classical_task(problem, "curvlab", method))
            for library, peer_method in SUITE_METHODS[method]:
                if library == "torchmin" and notices:
                    continue
                tasks.append(_classical_task(problem, library, peer_method))
    return tasks, notices
