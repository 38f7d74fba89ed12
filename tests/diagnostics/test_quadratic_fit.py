"""quadratic_model_fit: exact on quadratics, Taylor error orders on a network."""

import torch
from torch import nn

from curvlab.diagnostics.quadratic_fit import quadratic_model_fit


def test_quadratic_rho_is_one_for_every_step():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = A @ A.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    d = torch.randn(6, generator=g, dtype=torch.float64)
    fit = quadratic_model_fit(lambda z: 0.5 * z @ A @ z - b @ z, direction=d, x=x,
                              step_sizes=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    for rho in fit.rho:
        assert abs(rho - 1) < 1e-10
    assert abs(fit.curvature - (d @ A @ d).item()) < 1e-10 * fit.curvature


def test_network_taylor_errors_shrink_like_step_squared_and_cubed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    direction = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    steps = [10 ** (-4 + 0.25 * i) for i in range(9)]  # two decades
    batches = [(X[:20], y[:20]), (X[20:], y[20:])]
    fit = quadratic_model_fit(model, nn.CrossEntropyLoss(), batches, direction, steps)
    assert 1.5 <= fit.slope_first <= 2.5
    assert 2.5 <= fit.slope_second <= 3.5
    assert all(e2 < e1 for e1, e2 in zip(fit.error_first, fit.error_second))
    assert abs(fit.rho[0] - 1) < 1e-3
