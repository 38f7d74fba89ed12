r"""A new block preconditioner in one file: Kronecker-factored AdaGrad (plain Shampoo).

For a matrix block :math:`G_t` (and per mode of a higher-order block)

.. math::
    L_t = L_{t-1} + G_t G_t^\top, \quad R_t = R_{t-1} + G_t^\top G_t, \quad
    \theta_t = (1 - \eta\lambda)\theta_{t-1}
        - \eta\, (L_t + \epsilon I)^{-1/4} G_t (R_t + \epsilon I)^{-1/4}

(Gupta, Koren & Singer 2018, "Shampoo", Algorithm 1; an order-k block uses the power
``-1/(2k)`` per mode), roots recomputed every ``precondition_frequency`` steps;
vectors and scalars use diagonal AdaGrad. Everything else -- blocking and the state-size
rule, batched stacks of equal blocks, the gradient rule, checkpoints through
``self.state``, refresh failure policy, data parallelism -- comes from
:class:`curvlab.optim.preconditioners.BlockedPreconditionerOptimizer` by implementing its
interface; ``tests/optim/test_conformance.py`` registers it in one line.

Run: ``python examples/kronecker_adagrad.py`` (trains a small MLP on digits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.matfuncs import matrix_inverse_root
from curvlab.optim.base import finite_positive
from curvlab.optim.preconditioners import (
    BlockedPreconditionerOptimizer,
    guarded_batched,
    kronecker_statistic,
    mode_product,
)


class KroneckerAdaGrad(BlockedPreconditionerOptimizer):
    """Plain Shampoo (see the module docstring)."""

    hyperparameters = {**BlockedPreconditionerOptimizer.hyperparameters, "eps": finite_positive}

    def __init__(self, params: Any, lr: float = 0.1, eps: float = 1e-4,
                 weight_decay: float = 0.0, *, precondition_frequency: int = 10,
                 max_preconditioner_dim: int = 1024, nonfinite: str = "skip") -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency,
                        start_preconditioning_step=1,
                        max_preconditioner_dim=max_preconditioner_dim, merge_dims=True,
                        diagonal_threshold=None, max_state_ratio=8.0)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_block_state(self, group: dict, shape: tuple[int, ...], n: int,
                          dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        st = {}
        for i, d in enumerate(shape):
            st[f"F{i}"] = torch.zeros(n, d, d, dtype=dtype, device=device)
            st[f"R{i}"] = torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()
        return st

    def _init_diagonal_state(self, group: dict, n: int, dtype: torch.dtype,
                             device: torch.device) -> dict[str, Tensor]:
        return {"sum": torch.zeros(n, dtype=dtype, device=device)}

    def _update_statistics(self, group: dict, st: dict[str, Tensor], G: Tensor,
                           step: int) -> None:
        for i in range(G.ndim - 1):
            st[f"F{i}"].add_(kronecker_statistic(G, i))

    def _refresh_blocks(self, group: dict, st: dict[str, Tensor], step: int) -> None:
        order = sum(1 for k in st if k.startswith("F"))

        def roots(s: dict[str, Tensor]) -> None:
            for i in range(order):
                (R,), failed = guarded_batched(
                    lambda F: (matrix_inverse_root(F, 2 * order, damping=group["eps"],
                                                   compute_dtype=self.compute_dtype),),
                    (s[f"F{i}"],), (s[f"R{i}"],))
                s[f"R{i}"].copy_(R)
                self._count_refresh(R.shape[0], failed, "inverse root", tuple(R.shape[1:]))

        self._refresh(roots, st, [f"R{i}" for i in range(order)],
                      reads=[f"F{i}" for i in range(order)])

    def _precondition(self, group: dict, st: dict[str, Tensor], G: Tensor,
                      step: int) -> Tensor:
        P = G
        for i in range(G.ndim - 1):
            P = mode_product(P, st[f"R{i}"], i)
        return P

    def _diagonal_direction(self, group: dict, st: dict[str, Tensor], g: Tensor,
                            step: int) -> Tensor:
        st["sum"].addcmul_(g, g)
        return g / (st["sum"].sqrt() + group["eps"])


if __name__ == "__main__":
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    opt = KroneckerAdaGrad(model.parameters(), lr=0.05, precondition_frequency=5)
    for step in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 199:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(opt.stats())
