"""``curvlab.optim.LBFGS``: full-batch L-BFGS for a model and a closure, torch.optim style.

Drop-in for ``torch.optim.LBFGS`` when the objective is deterministic: ``step(closure)``
runs up to ``max_iter`` iterations of :func:`curvlab.minimize.quasi_newton.lbfgs`
(two-loop recursion, N&W Alg. 7.4/7.5, strong Wolfe line search by default) on the
concatenated parameters and stores the :class:`~curvlab.minimize.OptimizeResult` of the
call in ``optimizer.result`` (``success`` only when ``||grad||_inf <= gtol`` holds at
the parameters left in the model). The curvature pairs persist in the optimizer state,
so ``state_dict()`` / ``load_state_dict()`` resume exactly. ``lr`` scales the first
trial step of every line search (1 is right for L-BFGS); LR schedulers can change it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from curvlab.minimize.evaluator import Monitor
from curvlab.minimize.quasi_newton import LBFGSMemory, lbfgs
from curvlab.minimize.result import OptimizeResult
from curvlab.optim.base import CurvlabOptimizer, dense_grad
from curvlab.optim.stability import StabilityModel

__all__ = ["LBFGS"]


class _ClosureEvaluator:
    """``fg(x)``: write ``x`` into the parameters, call the closure, gather the gradient."""

    def __init__(self, params: list[torch.Tensor], closure: Callable) -> None:
        self.params, self.closure = params, closure
        n = sum(p.numel() for p in params)
        self.shape = torch.Size([n])
        self.nfev = self.ngev = self.nhvp = self.nhess = 0
        self.first_loss: torch.Tensor | None = None

    def set(self, x: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                p.copy_(x[offset:offset + k].view_as(p))
                offset += k

    def fg(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.set(x)
        self.nfev += 1
        self.ngev += 1
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.closure()
        if not isinstance(loss, torch.Tensor):
            raise TypeError("the closure must return the loss tensor (after loss.backward())")
        if all(p.grad is None for p in self.params):
            # no gradient at all is not a zero gradient: reporting convergence would be wrong
            raise RuntimeError("the closure did not call loss.backward(): no parameter has a "
                               ".grad; compute the loss, call loss.backward() and return it")
        if self.first_loss is None:
            self.first_loss = loss.detach()
        g = torch.cat([dense_grad(p).reshape(-1) for p in self.params])
        return loss.detach().reshape(()).to(x.dtype), g.to(x.dtype)


class LBFGS(CurvlabOptimizer):
    """Full-batch L-BFGS with strong Wolfe line search and an ``OptimizeResult`` per step.

    Args:
        params: parameters (one parameter group).
        lr: scale of the first trial step of each line search (default 1).
        max_iter: L-BFGS iterations per ``step`` call.
        history_size: number of curvature pairs kept.
        gtol: stop (successfully) when ``||grad||_inf <= gtol``.
        line_search: ``"strong-wolfe"`` (default) or ``"armijo"``.
        c1, c2: line search constants.
    """

    not_compilable_because = (
        "its step is a loop of closure evaluations (iterations with a line search) whose "
        "length depends on the values it reads; the evaluations dominate its time")

    supports_add_param_group = False

    def __init__(self, params: Iterable, lr: float = 1.0, max_iter: int = 100,
                 history_size: int = 10, gtol: float = 1e-5,
                 line_search: str = "strong-wolfe", c1: float = 1e-4, c2: float = 0.9
                 ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if int(history_size) < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        if not gtol > 0:
            raise ValueError(f"gtol must be > 0, got {gtol}")
        if line_search not in ("strong-wolfe", "armijo"):
            raise ValueError(f"line_search must be 'strong-wolfe' or 'armijo', got "
                             f"{line_search!r}")
        if not 0 < c1 < c2 < 1:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        defaults = dict(lr=lr, max_iter=int(max_iter), history_size=int(history_size),
                        gtol=gtol, line_search=line_search, c1=c1, c2=c2)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS supports a single parameter group; pass all parameters "
                             "in one group")
        self.result: OptimizeResult | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def stability_model(self) -> StabilityModel:
        """Every step passes a line search with a sufficient-decrease test on the closure's
        loss (strong Wolfe or Armijo), so no ``lr x sharpness`` bound applies: the threshold
        is infinite and a monitor watches the loss and non-finite values only."""
        return StabilityModel("line_search", float(self.param_groups[0]["lr"]), math.inf,
                              note=f"{self.param_groups[0]['line_search']} line search: "
                              "steps never increase the loss of their batch")

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Run up to ``max_iter`` iterations; returns the loss at the start of the call.

        ``closure`` clears gradients is not needed: it must compute the loss, call
        ``loss.backward()`` and return the loss (as for ``torch.optim.LBFGS``).
        """
        if closure is None:
            raise ValueError("LBFGS.step needs a closure that computes the loss, calls "
                             "loss.backward() and returns the loss")
        group = self.param_groups[0]
        params = self._params()
        if not params:
            raise ValueError("no parameter requires grad")
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise TypeError("all parameters must share one dtype")
        state = self.state[params[0]]
        mem = LBFGSMemory(group["history_size"], deque(state.get("s", [])),
                          deque(state.get("y", [])), deque(state.get("rho", [])),
                          state.get("gamma", 1.0))
        while len(mem.s) > mem.history_size:
            mem.s.popleft()
            mem.y.popleft()
            mem.rho.popleft()
        ev = _ClosureEvaluator(params, closure)
        x0 = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        mon = Monitor("lbfgs", ev, group["gtol"], group["max_iter"])  # type: ignore[arg-type]
        res = lbfgs(ev, x0, mon, history_size=group["history_size"],  # type: ignore[arg-type]
                    line_search=group["line_search"], c1=group["c1"], c2=group["c2"],
                    memory=mem, step_scale=group["lr"])
        ev.set(res.x)
        # leave .grad consistent with the returned parameters
        offset = 0
        for p in params:
            k = p.numel()
            p.grad = res.grad.reshape(-1)[offset:offset + k].view_as(p).clone()
            offset += k
        state["s"], state["y"], state["rho"] = list(mem.s), list(mem.y), list(mem.rho)
        state["gamma"] = mem.gamma
        state["n_iter"] = state.get("n_iter", 0) + res.nit
        state["func_evals"] = state.get("func_evals", 0) + res.nfev
        res.pop("memory", None)
        self.result = res
        self._counters["steps"] += 1
        return ev.first_loss if ev.first_loss is not None else res.fun

    def _load_param_state(self, p: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        n = sum(q.numel() for q in self._params())
        for key in ("s", "y"):
            for v in saved.get(key, []):
                if not isinstance(v, torch.Tensor) or v.numel() != n:
                    raise ValueError(f"LBFGS.load_state_dict: curvature pair {key!r} has "
                                     f"{getattr(v, 'numel', lambda: '?')()} entries, the "
                                     f"parameters {n} (a state dict of a different model?)")
        return {k: ([t.detach().to(p.device, copy=True) for t in v] if k in ("s", "y")
                    else v) for k, v in saved.items()}

    def _extra_stats(self) -> dict[str, Any]:
        st = self.state.get(self._params()[0], {}) if self._params() else {}
        return {"n_iter": st.get("n_iter", 0), "func_evals": st.get("func_evals", 0)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("result", None)
