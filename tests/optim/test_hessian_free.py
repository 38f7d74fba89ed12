"""HessianFree against dense Gauss-Newton references."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlab import Objective
from curvlab.optim import HessianFree

D64 = torch.float64


def dense_gn(model, loss_fn, X, y):
    obj = Objective(model, loss_fn, (X, y))
    theta = obj.flatten(obj.param_tensors())
    out = lambda t: functional_call(model, obj.unflatten(t), (X,))  # noqa: E731
    J = jacrev(out)(theta).reshape(-1, theta.numel())
    z = out(theta).detach()
    H = hessian(lambda z_: loss_fn(z_, y))(z).reshape(z.numel(), z.numel())
    return J.T @ H @ J, obj.flat_grad()


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D64)
    X, y = torch.randn(20, 3, dtype=D64), torch.randint(0, 3, (20,))
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("preconditioner", [None, "martens"])
def test_cg_solves_the_damped_gauss_newton_system(preconditioner):
    model, lf, X, y = small_problem()
    G, g = dense_gn(model, lf, X, y)
    lam = 0.3
    opt = HessianFree(model, lf, damping=lam, cg_max_iter=60, cg_min_iter=60, cg_tol=1e-12,
                      warm_start=0.0, preconditioner=preconditioner)
    opt.step(batch=(X, y))
    d = torch.cat([opt.state[p]["cg_direction"].reshape(-1) for p in model.parameters()])
    ref = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=D64), -g)
    torch.testing.assert_close(d, ref, atol=1e-8, rtol=1e-8)


def test_converges_on_least_squares_in_few_steps():
    torch.manual_seed(1)
    X = torch.randn(50, 4, dtype=D64)
    Y = X @ torch.randn(4, 2, dtype=D64) + 0.1 * torch.randn(50, 2, dtype=D64)
    model = nn.Linear(4, 2).to(D64)
    opt = HessianFree(model, nn.MSELoss(), damping=1e-3, cg_tol=1e-10, cg_max_iter=50)
    for _ in range(8):
        opt.step(batch=(X, Y))
    Xa = torch.cat([X, torch.ones(50, 1, dtype=D64)], 1)
    sol = torch.linalg.lstsq(Xa, Y).solution.T
    torch.testing.assert_close(torch.cat([model.weight, model.bias[:, None]], 1).detach(), sol,
                               atol=1e-6, rtol=0)


def test_decreases_loss_and_adapts_damping_with_closure():
    model, lf, X, y = small_problem(2)
    opt = HessianFree(model, lf, damping=1.0)

    def closure():
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss
    losses = [float(opt.step(closure, batch=(X, y)).detach()) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    assert opt.stats()["damping"] < 1.0  # good reduction ratios lower the damping
    assert opt.stats()["cg_iterations"] >= 1


def test_state_dict_round_trip_and_param_groups():
    model, lf, X, y = small_problem(3)
    mk = lambda m: HessianFree(m, lf, params=[  # noqa: E731
        {"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.5}])
    opt = mk(model)
    for _ in range(2):
        opt.step(batch=(X, y))
    sm, so = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(batch=(X[:10], y[:10]))
    model2 = small_problem(9)[0]
    model2.load_state_dict(sm)
    opt2 = mk(model2)
    opt2.load_state_dict(so)
    for _ in range(2):
        opt2.step(batch=(X[:10], y[:10]))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    # a zero learning rate freezes its group
    frozen = HessianFree(model2, lf, params=[{"params": model2[0].parameters(), "lr": 1e-30},
                                             {"params": model2[2].parameters()}])
    w = model2[0].weight.clone()
    frozen.step(batch=(X, y))
    torch.testing.assert_close(model2[0].weight, w, atol=1e-20, rtol=0)


def test_nonfinite_batch_changes_nothing():
    model, lf, X, y = small_problem(4)
    opt = HessianFree(model, lf)
    before = copy.deepcopy(model.state_dict())
    Xb = X.clone()
    Xb[0, 0] = float("nan")
    opt.step(batch=(Xb, y))
    assert opt.stats()["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(FloatingPointError):
        HessianFree(model, lf, nonfinite="raise").step(batch=(Xb, y))
    with pytest.raises(ValueError, match="batch"):
        opt.step()
    with pytest.raises(ValueError, match="one"):
        opt.step(batch=[(X[:5], y[:5]), (X[5:], y[5:])])
    with pytest.raises(ValueError):
        HessianFree(model, lf, damping=-1)


def test_closure_only_step_equals_the_batch_step():
    model, lf, X, y = small_problem(5)
    twin = copy.deepcopy(model)
    kw = dict(damping=0.5, preconditioner=None, cg_max_iter=30)
    HessianFree(model, lf, **kw).step(batch=(X, y))
    opt = HessianFree(twin, lf, **kw)

    def closure():
        opt.zero_grad()
        loss = lf(twin(X), y)
        loss.backward()
        return loss
    opt.step(closure)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
    l1 = HessianFree(twin, nn.L1Loss())
    with pytest.raises(ValueError, match="batch="):
        l1.step(lambda: nn.L1Loss()(twin(X), torch.zeros(20, 3, dtype=D64)))
