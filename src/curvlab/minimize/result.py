"""The result object every curvlab solver returns (shape of ``scipy.optimize.OptimizeResult``).

``success`` is set by the solver core only after re-checking the stated tolerance at the
returned ``x`` (``||grad||_inf <= gtol``); a run that stops for any other reason carries
``success=False`` and a ``status`` / ``message`` that says why (:data:`STATUS_MESSAGES`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["OptimizeResult", "STATUS_MESSAGES"]

#: status code -> message. 0 is the only successful status.
STATUS_MESSAGES: dict[int, str] = {
    0: "Optimization terminated successfully: ||grad||_inf <= gtol.",
    1: "Maximum number of iterations reached before ||grad||_inf <= gtol.",
    2: "Line search failed to find a step satisfying its conditions.",
    3: "Search direction is not a descent direction.",
    4: "Non-finite objective or gradient encountered.",
    5: "Stopped by the callback.",
    6: "No further progress possible: the step (or trust radius) fell below machine "
       "precision before ||grad||_inf <= gtol.",
    7: "Maximum number of function evaluations reached before ||grad||_inf <= gtol.",
}


class OptimizeResult(dict):
    """Result of :func:`curvlab.minimize` / :func:`curvlab.least_squares`.

    A dict with attribute access. Fields: ``x`` (solution, shape of ``x0``), ``fun``
    (objective at ``x``, 0-dim tensor), ``grad`` (gradient at ``x``), ``nit`` (iterations),
    ``nfev`` / ``ngev`` (objective / gradient evaluations; an evaluation of both in one
    autograd pass counts once in each), ``nhvp`` (Hessian-vector products), ``nhess``
    (dense Hessians formed), ``success``, ``status`` (see :data:`STATUS_MESSAGES`),
    ``message``, ``method`` and, when requested, ``history``: a dict of per-iteration
    lists ``f``, ``grad_norm`` (inf-norm) and, where the method has them, ``step``
    (step length), ``radius`` (trust radius) and ``decrement`` (Newton decrement).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __repr__(self) -> str:
        keys = [k for k in ("message", "success", "status", "fun", "nit", "nfev", "ngev",
                            "nhvp", "nhess", "method") if k in self]
        rest = [k for k in self if k not in keys and k != "history"]
        width = max(len(k) for k in keys + rest) if self else 0
        lines = [f"{k.rjust(width)}: {self[k]!r}" for k in keys + rest]
        return "\n".join(lines)

    def __dir__(self) -> list[str]:
        return list(self.keys())
