"""curvlab.optim.LBFGS: full-batch L-BFGS with a closure."""

import pytest
import torch

from curvlab.optim import LBFGS


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(6, 1, generator=g, dtype=torch.float64) > 0).double().squeeze(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 1)).double()
    return X, y, model


def _closure(opt, model, X, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(X).squeeze(1), y) + 1e-2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss
    return closure


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_converges_to_dense_newton_optimum():
    X, y, model = _problem()
    opt = LBFGS(model.parameters(), max_iter=200, gtol=1e-9)
    opt.step(_closure(opt, model, X, y))
    res = opt.result
    assert res.success and res.grad_norm <= 1e-9
    # reference: Newton on the same objective with a dense Hessian
    def f(w):
        z = X @ w[:6] + w[6]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 1e-2 * (w ** 2).sum()
    w = torch.zeros(7, dtype=torch.float64)
    for _ in range(30):
        g = torch.func.grad(f)(w)
        w = w - torch.linalg.solve(torch.func.hessian(f)(w), g)
    torch.testing.assert_close(_flat(model), w, rtol=1e-7, atol=1e-8)
    assert float(res.fun) == pytest.approx(float(f(w)), abs=1e-12)
    # the gradients left in .grad belong to the returned parameters
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads, res.grad)


def test_matches_minimize_lbfgs_iterates():
    from curvlab.minimize import minimize

    X, y, model = _problem(1)
    w0 = _flat(model).clone()
    opt = LBFGS(model.parameters(), max_iter=15)
    opt.step(_closure(opt, model, X, y))

    def f(w):
        z = X @ w[:6] + w[6]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 1e-2 * (w ** 2).sum()
    ref = minimize(f, w0, "lbfgs", max_iter=15)
    torch.testing.assert_close(_flat(model), ref.x, rtol=1e-10, atol=1e-12)
    assert opt.result.nfev == ref.nfev


def test_state_dict_resume_is_exact():
    X, y, model_a = _problem(2)
    _, _, model_b = _problem(2)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = LBFGS(model_a.parameters(), max_iter=4, gtol=1e-12)
    for _ in range(3):
        opt_a.step(_closure(opt_a, model_a, X, y))
    # b: two steps, save, new optimizer, load, one more step
    opt_b = LBFGS(model_b.parameters(), max_iter=4, gtol=1e-12)
    for _ in range(2):
        opt_b.step(_closure(opt_b, model_b, X, y))
    sd = opt_b.state_dict()
    opt_c = LBFGS(model_b.parameters(), max_iter=4, gtol=1e-12)
    opt_c.load_state_dict(sd)
    opt_c.step(_closure(opt_c, model_b, X, y))
    assert torch.equal(_flat(model_a), _flat(model_b))


def test_non_finite_loss_is_not_written_into_params():
    X, y, model = _problem(3)
    before = _flat(model).clone()
    opt = LBFGS(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(X).sum() * float("nan")
        loss.backward()
        return loss

    opt.step(closure)
    assert not opt.result.success and opt.result.status == 4
    assert torch.equal(_flat(model), before)


def test_lr_scheduler_and_errors():
    X, y, model = _problem(4)
    opt = LBFGS(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(opt, model, X, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="history_size"):
        LBFGS(model.parameters(), history_size=0)
    with pytest.raises(ValueError, match="single parameter group"):
        LBFGS([{"params": [model[0].weight]}, {"params": [model[0].bias]}])
