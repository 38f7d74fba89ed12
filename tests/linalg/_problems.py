"""Small float64 problems with dense ground truth for the Krylov/estimator tests."""

import torch
from torch import nn

from curvlab.linops import HessianOperator


def mlp_hessian(seed: int = 0, hidden: int = 12, train_steps: int = 0, dtype=torch.float64):
    """A tanh MLP 5 -> hidden -> 3 on 60 random points: (HessianOperator, dense H)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)
    X = torch.randn(60, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (60,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(train_steps):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
    op = HessianOperator(model, loss_fn, (X, y))
    H = op.to_dense()
    op.num_matvecs = 0
    return op, 0.5 * (H + H.T)


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q`` (float64)."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigenvalues.double()) @ Q.T
