"""curvature_summary against a dense float64 Hessian."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics.summary import curvature_summary


def test_summary_matches_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    loss_fn = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            n = s.numel()
            parts[k] = theta[i:i + n].reshape(s)
            i += n
        return loss_fn(torch.func.functional_call(model, parts, (X,)), y)

    H = torch.autograd.functional.hessian(f, flat)
    s = curvature_summary(model, loss_fn, (X, y), trace_samples=30, tol=1e-10)
    lam = torch.linalg.eigvalsh(H)[-1].item()
    assert abs(s.lambda_max - lam) < 1e-8 * abs(lam)
    assert abs(s.max_stable_lr - 2 / lam) < 1e-6 * (2 / lam)
    assert abs(s.trace - torch.trace(H).item()) < 4 * s.trace_stderr
    g = torch.func.grad(f)(flat)
    assert abs(s.grad_norm - g.norm().item()) < 1e-10
    assert s.num_params == flat.numel() and s.num_samples == 40
    assert s.trace_samples == 30 and s.num_hvps >= 30
    # a Hutch++ sketch as wide as the matrix takes the trace exactly
    exact = curvature_summary(model, loss_fn, (X, y), trace_samples=3 * flat.numel())
    assert abs(exact.trace - torch.trace(H).item()) < 1e-10 * abs(torch.trace(H).item())


def test_summary_rejects_too_few_trace_samples():
    model = nn.Linear(2, 1)
    X = torch.randn(8, 2)
    with pytest.raises(ValueError, match="trace_samples"):
        curvature_summary(model, nn.MSELoss(), (X, X[:, :1]), trace_samples=5)
