"""Spectrum, sharpness, stability and propagation diagnostics against dense truth."""

import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics import (
    bottom_eigenvalues,
    condition_number,
    epsilon_sharpness,
    gd_stability,
    gradient_effective_rank,
    gradient_noise,
    jacobian_singular_values,
    lambda_max,
    layer_sharpness,
    newton_decrement,
    parameter_blocks,
    preconditioned_sharpness,
    relative_update,
    spectral_density,
    stability_report,
    stability_threshold,
    top_eigenvalues,
    trace,
)
from curvlab.linops import HessianOperator
from curvlab.objective import Objective


def mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


@pytest.fixture(scope="module")
def problem():
    model, loss_fn, data = mlp()
    op = HessianOperator(model, loss_fn, data)
    H = op.to_dense()
    return model, loss_fn, data, op, 0.5 * (H + H.T)


def test_top_and_trace_and_density(problem):
    *_, op, H = problem
    ev = torch.linalg.eigvalsh(H)
    top = top_eigenvalues(op, k=3, tol=1e-8)
    assert torch.allclose(top.eigenvalues, ev.flip(0)[:3], rtol=1e-6)
    pw = top_eigenvalues(op, method="power", tol=1e-6)
    assert float(pw.eigenvalues[0]) == pytest.approx(float(ev.abs().max()), rel=1e-5)
    assert float(lambda_max(op, tol=1e-8).eigenvalues[0]) == pytest.approx(float(ev[-1]),
                                                                         rel=1e-7)
    est = trace(op, num_samples=45, generator=torch.Generator().manual_seed(0))
    assert est.method == "hutch++" and est.num_matvecs == 45
    assert abs(est.estimate - float(ev.sum())) < 5 * est.stderr + 1e-9
    dens = spectral_density(op, num_probes=3, num_steps=20)
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0, abs=1e-6)


def test_saddle_and_minimum_classification():
    # a deep linear network at 0 is a saddle: H = [[0, B], [B^T, 0]] has +-eigenvalues
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    for p in lin.parameters():
        nn.init.zeros_(p)
    X = torch.randn(30, 3, dtype=torch.float64)
    Y = X[:, :2] @ torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    op = HessianOperator(lin, nn.MSELoss(), (X, Y))
    dense_min = float(torch.linalg.eigvalsh(op.to_dense())[0])
    assert dense_min < -1e-3
    res = bottom_eigenvalues(op, tol=1e-6)
    assert res.classification == "saddle"
    assert float(res.eigenvalues[0]) == pytest.approx(dense_min, rel=1e-5)
    # linear least squares with full-rank data: a strict minimum
    reg = nn.Linear(3, 2).double()
    op2 = HessianOperator(reg, nn.MSELoss(), (X, Y))
    res2 = bottom_eigenvalues(op2, tol=1e-8)
    assert res2.classification == "minimum"
    assert float(res2.eigenvalues[0]) == pytest.approx(
        float(torch.linalg.eigvalsh(op2.to_dense())[0]), rel=1e-6)
    kappa = condition_number(op2, tol=1e-8)
    ev = torch.linalg.eigvalsh(op2.to_dense())
    assert kappa.value == pytest.approx(float(ev[-1] / ev[0]), rel=1e-5)
    assert math.isinf(condition_number(op, tol=1e-6).value)


def test_layer_sharpness_matches_dense_blocks(problem):
    *_, op, H = problem
    blocks = parameter_blocks(op)
    assert list(blocks) == ["0", "2"]
    ls = layer_sharpness(op, tol=1e-8)
    for name, sl in blocks.items():
        want = float(torch.linalg.eigvalsh(H[sl, sl])[-1])
        assert ls.lambda_max[name] == pytest.approx(want, rel=1e-6)
    assert set(layer_sharpness(op, group="param", tol=1e-3).lambda_max) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}


def test_epsilon_sharpness_quadratic():
    # L(w) = 1/2 w^T D w at w = 0 (g = 0): first step has no direction; at w0 != 0 the
    # best delta within rho is found and the value is within the quadratic bounds
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.5, -0.2]]))
    X = torch.eye(3, dtype=torch.float64) * torch.tensor([[2.0], [1.0], [0.5]]).double()
    y = torch.zeros(3, 1, dtype=torch.float64)
    res = epsilon_sharpness(model, nn.MSELoss(reduction="sum"), (X, y), rho=0.1, steps=10)
    w = model.weight.detach().reshape(-1)
    D = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)) * 2
    g = D @ w
    # true max over the ball is >= the SAM first-order value and <= rho||g|| + rho^2 lmax/2
    first = float(0.5 * (w + 0.1 * g / g.norm()) @ D @ (w + 0.1 * g / g.norm())
                  - 0.5 * w @ D @ w)
    assert first - 1e-12 <= res.value <= 0.1 * float(g.norm()) + 0.01 * 8.0 / 2 + 1e-12
    assert float(res.delta.norm()) == pytest.approx(0.1)


def test_stability_numbers_and_adam_preconditioned(problem):
    model, loss_fn, data, op, H = problem
    lam = float(torch.linalg.eigvalsh(H)[-1])
    rep = gd_stability(lam, lr=0.5)
    assert rep.ratio == pytest.approx(0.5 * lam) and rep.max_stable_lr == pytest.approx(2 / lam)
    sgd = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    assert stability_threshold(sgd) == pytest.approx(3.8)
    r = stability_report(op, sgd, tol=1e-8)
    assert r.sharpness == pytest.approx(lam, rel=1e-6) and r.threshold == pytest.approx(3.8)
    model, loss_fn, data = mlp(seed=1)  # a fresh model: Adam steps change it in place
    op = HessianOperator(model, loss_fn, data)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="step"):
        preconditioned_sharpness(op, adam)
    X, y = data
    for _ in range(3):
        adam.zero_grad()
        loss_fn(model(X), y).backward()
        adam.step()
    op2 = HessianOperator(model, loss_fn, data)
    H2 = op2.to_dense()
    P = torch.cat([(adam.state[p]["exp_avg_sq"] / (1 - 0.999 ** 3)).sqrt().reshape(-1) + 1e-8
                   for p in model.parameters()])
    # Adam's step is lr m / (1 - b1^t) / P: the momentum bias correction is part of the
    # preconditioner the stability model states (curvlab.diagnostics.stability_model)
    P = P * (1 - 0.9 ** 3)
    want = float(torch.linalg.eigvals(torch.diag(1 / P) @ H2).real.max())
    got = preconditioned_sharpness(op2, adam, tol=1e-9)
    assert float(got.eigenvalues[0]) == pytest.approx(want, rel=1e-6)
    rep2 = stability_report(op2, adam, tol=1e-9)
    assert rep2.preconditioned and rep2.threshold == pytest.approx(38.0)


def test_newton_decrement_and_update_size():
    torch.manual_seed(1)
    reg = nn.Linear(4, 1).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    op = HessianOperator(reg, nn.MSELoss(), (X, y))
    H = op.to_dense()
    g = op.objective.flat_grad()
    nd = newton_decrement(op, tol=1e-12)
    assert nd.value == pytest.approx(float(g @ torch.linalg.solve(H, g)) ** 0.5, rel=1e-7)
    assert nd.converged
    before = [p.detach().clone() for p in reg.parameters()]
    after = [p + 0.01 for p in before]
    norm = float(torch.cat([b.reshape(-1) for b in before]).norm())
    assert relative_update(before, after) == pytest.approx(0.01 * 5 ** 0.5 / norm)


def test_newton_decrement_rejects_indefinite(problem):
    *_, op, H = problem
    assert float(torch.linalg.eigvalsh(H)[0]) < 0  # an untrained MLP: indefinite Hessian
    with pytest.raises(ValueError, match="positive definite"):
        newton_decrement(op, max_iter=60)


def test_gradient_noise_full_batch_is_noiseless(problem):
    model, loss_fn, data, *_ = problem
    X, y = data
    full = gradient_noise(model, loss_fn, data, batch_size=X.shape[0], num_batches=2)
    assert full.mean_gap == pytest.approx(0.0, abs=1e-12)
    small = gradient_noise(model, loss_fn, data, batch_size=5, num_batches=20,
                           generator=torch.Generator().manual_seed(0))
    # ground truth: per-sample gradient covariance
    per = []
    for i in range(X.shape[0]):
        model.zero_grad()
        loss_fn(model(X[i:i + 1]), y[i:i + 1]).backward()
        per.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    G = torch.stack(per)
    tr_sigma = float(((G - G.mean(0)) ** 2).sum(1).mean())
    want = tr_sigma / float(G.mean(0).norm()) ** 2
    assert small.noise_scale == pytest.approx(want, rel=0.5)


class _DictModel(nn.Module):
    """Takes a dict batch (``features``) and returns logits, as Hugging Face models do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features):
        return self.net(features)


def test_gradient_noise_is_per_sample_for_summing_losses_and_dict_batches(problem):
    """With reduction="sum" the minibatch and full-batch gradients are sums over different
    numbers of samples: their gap measured the batch sizes, not the noise (noise scale 20.6
    against 204 for the same model with a mean loss, no error). Batch gradients are per-sample
    means now, so a summing loss, an Objective and a dict batch give the mean loss's values."""
    model, _, data, *_ = problem
    X, y = data

    def noise(*args, **kwargs):
        return gradient_noise(*args, batch_size=5, num_batches=20,
                              generator=torch.Generator().manual_seed(0), **kwargs)

    mean = noise(model, nn.CrossEntropyLoss(), data)
    summed = noise(model, nn.CrossEntropyLoss(reduction="sum"), data)
    objective = noise(Objective(model, nn.CrossEntropyLoss(reduction="sum"), data))
    as_dict = noise(_DictModel(model), nn.CrossEntropyLoss(),
                    {"features": X, "labels": y})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                         batch_size=len(X))
    from_loader = noise(Objective(model, nn.CrossEntropyLoss(), loader))
    for other in (summed, objective, as_dict, from_loader):
        for field in ("grad_norm", "mean_gap", "noise_scale"):
            assert getattr(other, field) == pytest.approx(getattr(mean, field), rel=1e-10)
    with pytest.raises(ValueError, match="one batch"):
        gradient_noise(Objective(model, nn.CrossEntropyLoss(), [data, data]))


def test_jacobian_singular_values_and_effective_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 5, dtype=torch.float64) * 1e-8  # tanh'(0) = 1: J is linear there
    spec = jacobian_singular_values(model, x, num_samples=4)
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    assert torch.allclose(spec.singular_values["0:Linear"][0], torch.linalg.svdvals(W1))
    assert torch.allclose(spec.singular_values["2:Linear"][0], torch.linalg.svdvals(W2 @ W1),
                          atol=1e-7)
    u, v = torch.randn(6, 1), torch.randn(1, 4)
    ranks = gradient_effective_rank({"w": u @ v, "b": torch.ones(3), "e": torch.eye(4)})
    assert ranks["w"] == pytest.approx(1.0, abs=1e-6) and ranks["e"] == pytest.approx(4.0)
    assert "b" not in ranks


@pytest.mark.parametrize("num_samples", [3, 4])
def test_jacobian_singular_values_through_prelu_equal_autograd(num_samples):
    """vmap over the samples of jacrev gave nn.PReLU's Jacobians wrong without an error
    when the number of samples equalled the layer width (3), and raised otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), nn.Linear(3, 3), nn.PReLU(),
                          nn.Linear(3, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    spec = jacobian_singular_values(model, x, num_samples=num_samples)
    for depth, key in enumerate(spec.singular_values, start=1):
        prefix = model[:depth]
        want = torch.stack([torch.linalg.svdvals(torch.autograd.functional.jacobian(
            lambda z, prefix=prefix: prefix(z[None]).reshape(-1), x[i]))
            for i in range(num_samples)])
        torch.testing.assert_close(spec.singular_values[key], want, rtol=1e-10, atol=1e-12)
