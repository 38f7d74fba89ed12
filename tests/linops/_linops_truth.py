"""Small float64 problems and independent dense ground truth for the operator tests.

Everything here is computed with torch.autograd.functional on a flat-parameter function
of the concatenated data, explicit loss Hessians and per-sample gradients from a Python
loop over samples, never through curvlab.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

N = 12
SPLITS = (5, 9)  # three batches of sizes 5, 4, 3


def mlp(seed: int = 0, d_in: int = 4, hidden: int = 6, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(2, 2, 2), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2, 3)).double()


def layernorm_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


MODELS = {"mlp": mlp, "cnn": cnn, "layernorm": layernorm_net}


def inputs_for(name: str, n: int = N, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if name == "cnn" else (n, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def targets_for(loss_fn: nn.Module, n: int = N, d_out: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, d_out, (n,), generator=g)
    return torch.randn(n, d_out, generator=g, dtype=torch.float64)


def as_data(X: torch.Tensor, y: torch.Tensor, form: str):
    """The same samples as one batch, a list of three batches or a DataLoader."""
    if form == "single":
        return (X, y)
    if form == "list":
        a, b = SPLITS
        return [(X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:])]
    return DataLoader(TensorDataset(X, y), batch_size=5, shuffle=False)


class Truth:
    """Dense float64 curvature matrices of ``loss_fn(model(X), y)`` on all samples."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
        self.model, self.loss_fn, self.X, self.y = model, loss_fn, X, y
        self.names = [k for k, p in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.n = self.theta.numel()

    def unflatten(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(self.names, self.shapes, strict=True):
            out[k] = t[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(self, t: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(t), (self.X if X is None else X,))

    def hessian(self) -> torch.Tensor:
        return torch.autograd.functional.hessian(
            lambda t: self.loss_fn(self.outputs(t), self.y), self.theta)

    def jacobian(self) -> torch.Tensor:
        J = torch.autograd.functional.jacobian(self.outputs, self.theta)
        return J.reshape(-1, self.n)

    def loss_hessian(self) -> torch.Tensor:
        out = self.outputs(self.theta).detach()
        H = torch.autograd.functional.hessian(lambda o: self.loss_fn(o, self.y), out)
        return H.reshape(out.numel(), out.numel())

    def ggn(self) -> torch.Tensor:
        J = self.jacobian()
        return J.T @ self.loss_hessian() @ J

    def per_sample_grads(self) -> torch.Tensor:
        rows = []
        for i in range(self.X.shape[0]):
            t = self.theta.clone().requires_grad_(True)
            loss = self.loss_fn(self.outputs(t, self.X[i:i + 1]), self.y[i:i + 1])
            rows.append(torch.autograd.grad(loss, t)[0])
        return torch.stack(rows)

    def empirical_fisher(self) -> torch.Tensor:
        G = self.per_sample_grads()
        scale = 1.0 / G.shape[0] if self.loss_fn.reduction == "mean" else 1.0
        return scale * G.T @ G

    def fisher(self) -> torch.Tensor:
        """``J^T Lambda J`` with the textbook output-space Fisher, written out."""
        out = self.outputs(self.theta).detach()
        J = self.jacobian()
        mean = self.loss_fn.reduction == "mean"
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            p = out.softmax(-1)
            blocks = [torch.diag(pi) - torch.outer(pi, pi) for pi in p]
            Lam = torch.block_diag(*blocks) / (out.shape[0] if mean else 1)
        else:
            Lam = 2 * torch.eye(out.numel(), dtype=out.dtype) / (out.numel() if mean else 1)
        return J.T @ Lam @ J


def rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).norm() / B.norm().clamp_min(1e-300))
