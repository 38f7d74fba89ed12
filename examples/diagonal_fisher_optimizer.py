r"""A new curvlab optimizer in one file: diagonal empirical-Fisher natural gradient.

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    f_t = \beta_2 f_{t-1} + (1-\beta_2) g_t^2, \qquad
    \theta_t = (1 - \eta\lambda)\theta_{t-1} - \eta\, \frac{m_t / (1-\beta_1^t)}
        {f_t / (1-\beta_2^t) + \delta}

(the natural gradient with the diagonal of the empirical Fisher, damped by ``delta``; Adam
takes the square root of the same diagonal). Everything else (validation, the gradient rule,
state in ``self.state``, checkpoints, ``stats()``, the monitor protocol) comes from
:class:`curvlab.optim.preconditioners.BlockedPreconditionerOptimizer` by implementing its
diagonal hooks; ``tests/optim/test_conformance.py`` registers it in one line.

Run: ``python examples/diagonal_fisher_optimizer.py`` (trains a small MLP on digits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.optim.base import betas_rule, finite_positive
from curvlab.optim.preconditioners import BlockedPreconditionerOptimizer
from curvlab.optim.stability import StabilityModel, momentum_threshold


class DiagonalFisher(BlockedPreconditionerOptimizer):
    """Diagonal empirical-Fisher natural gradient (see the module docstring)."""

    diagonal_only = True
    hyperparameters = {**BlockedPreconditionerOptimizer.hyperparameters,
                       "betas": betas_rule, "damping": finite_positive}

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 damping: float = 1e-6, weight_decay: float = 0.0, *,
                 nonfinite: str = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), damping=damping, weight_decay=weight_decay)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        return {"m": torch.zeros(n, dtype=dtype, device=device),
                "fisher": torch.zeros(n, dtype=dtype, device=device)}

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        b1, b2 = group["betas"]
        st["m"].lerp_(g, 1.0 - b1)
        st["fisher"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        f_hat = st["fisher"] / (1.0 - b2 ** step)
        return (st["m"] / (1.0 - b1 ** step)) / (f_hat + group["damping"])

    def stability_model(self) -> StabilityModel:
        group = self.param_groups[0]

        def inv_sqrt(p: Tensor, v: Tensor) -> Tensor:
            st, t = self.state.get(p, {}), self._steps[0]
            if "fisher" not in st or t == 0:
                return v
            b1, b2 = group["betas"]  # the step is m / P with the bias corrections folded in
            P = (st["fisher"] / (1.0 - b2 ** t) + group["damping"]) * (1.0 - b1 ** t)
            return v * P.rsqrt().to(v.dtype)

        return StabilityModel("diagonal_fisher", float(group["lr"]),
                              momentum_threshold(group["betas"][0], ema=True), inv_sqrt)


if __name__ == "__main__":
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    opt = DiagonalFisher(model.parameters(), lr=1e-3, damping=1e-4)
    for step in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 199:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(opt.stats())
