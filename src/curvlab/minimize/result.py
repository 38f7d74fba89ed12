"""The result object every curvlab solver returns (shape of ``scipy.optimize.OptimizeResult``).

``success`` (status 0) is set only when a stated convergence test holds at the returned
``x``; the message names the test (:data:`SUCCESS_TESTS`). A run that stops for any other
reason carries ``success=False`` and a ``status`` / ``message`` that says why
(:data:`STATUS_MESSAGES`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["OptimizeResult", "STATUS_MESSAGES", "SUCCESS_TESTS"]

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
    7: "Maximum number of function evaluations reached before convergence.",
    8: "The Jacobian (gradient) is exactly zero at a point with a nonzero residual: the "
       "model underflowed or does not depend on x there; not a solution.",
    9: "The objective has no derivative information at x.",
    10: "The objective appears unbounded below.",
}

#: The convergence test behind a success -> the text of its message.
SUCCESS_TESTS: dict[str, str] = {
    "gtol": "||grad||_inf <= gtol.",
    "gtol_abs": "||grad F||_inf <= gtol_abs.",
    "gtol_scaled": "the residual is orthogonal to every column of the Jacobian to within "
                   "gtol: max_j |J_j^T r| / (||J_j|| ||r||) <= gtol.",
    "ftol": "the relative reduction of the cost, actual on the last step and predicted by "
            "the Gauss-Newton model at x, is <= ftol.",
    "xtol": "the relative change of x, on the last step and by the Gauss-Newton step at x, "
            "is <= xtol.",
    "zero": "the residual is exactly zero.",
    "ftol_rel": "the relative reduction of f on the last step is <= ftol.",
    "pgtol": "the projected gradient ||P(x - g) - x||_inf <= gtol.",
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
