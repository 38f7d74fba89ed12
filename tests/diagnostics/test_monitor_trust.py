"""CurvatureMonitor's numerical-trust metrics: rho of the last update and precision checks."""

import json

import pytest
import torch
from torch import nn

import curvlab.diagnostics.monitor as monitor_module
from curvlab.diagnostics import CurvatureMonitor


def _regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = X @ torch.randn(5, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(5, 1).double(), nn.MSELoss(), X, y


def _mlp():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    return model, nn.MSELoss(), X, y


def test_rho_of_gd_step_on_a_quadratic_is_one_and_logged(tmp_path):
    model, loss_fn, X, y = _regression()  # MSE of a linear model: quadratic in the params
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=3, track_every=1,
                           quadratic_fit=True, adaptive=False, log_dir=tmp_path,
                           generator=torch.Generator().manual_seed(0))
    for _ in range(9):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    assert [c["step"] for c in mon.checks] == [3, 6, 9]
    for c in mon.checks:
        assert c["update_loss_change"] < 0
        assert c["rho"] == pytest.approx(1.0, abs=1e-8)
    assert [s for s, _ in mon.history["rho"]] == [3, 6, 9]
    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    logged = [r["rho"] for r in lines if "rho" in r]
    assert logged == pytest.approx([c["rho"] for c in mon.checks])


def test_rho_matches_dense_taylor_model_and_costs_one_hvp(monkeypatch):
    products = {"n": 0}
    real = monitor_module.hvp_fn

    def counting(f, x):
        loss, grad, product = real(f, x)

        def counted(v, batched=False):
            products["n"] += next(iter(v.values())).shape[0] if batched else 1
            return product(v, batched)
        return loss, grad, counted

    monkeypatch.setattr(monitor_module, "hvp_fn", counting)
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kw = dict(optimizer=opt, every=2, track_every=1, max_hvps=30, tol=1e-6, adaptive=False)
    with_fit = CurvatureMonitor(model, loss_fn, (X, y), quadratic_fit=True,
                                generator=torch.Generator().manual_seed(0), **kw)
    without = CurvatureMonitor(model, loss_fn, (X, y),
                               generator=torch.Generator().manual_seed(0), **kw)
    costs = {"fit": [], "plain": []}
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, parts, (X,)), y)

    for step in range(1, 7):
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        for key, mon in (("fit", with_fit), ("plain", without)):
            n0 = products["n"]
            mon.step(loss)
            if step % 2 == 0:
                costs[key].append(products["n"] - n0)
        if step % 2 == 0:  # dense float64 ground truth for rho at the new point
            now = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            d = now - before
            g = torch.func.grad(f)(now)
            H = torch.autograd.functional.hessian(f, now)
            predicted = float(g @ d - 0.5 * d @ H @ d)
            actual = float(f(now) - f(before))
            assert with_fit.checks[-1]["rho"] == pytest.approx(actual / predicted, rel=1e-8)
    assert costs["fit"] == [c + 1 for c in costs["plain"]]
    assert [c["num_hvps"] for c in with_fit.checks] == costs["fit"]
    assert "rho" not in without.checks[-1]


def test_precision_every_records_errors_in_jsonl(tmp_path):
    model, loss_fn, X, y = _mlp()
    model = model.float()
    X, y = X.float(), y.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=100, track_every=100,
                           precision_every=2, log_dir=tmp_path)
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    assert [r["step"] for r in mon.precision] == [2, 4]
    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    recs = [r for r in lines if "precision" in r]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        bf, f32 = r["precision"]["bfloat16"], r["precision"]["float32"]
        # bfloat16 keeps 8 bits of mantissa, float32 24: errors near their unit roundoffs
        assert 1e-5 < bf["grad_error"] < 0.5 and f32["grad_error"] < 1e-4
        assert bf["grad_error"] > 10 * f32["grad_error"]
        assert 0 < bf["update_error"] < 0.5  # the optimizer's update was checked too
        assert bf["worst_layer"] in {"0", "1", "2"} and isinstance(bf["flagged"], list)
        assert "float32_matmul_precision" in r["matmul_precision"]
    assert len(mon.history["precision_bfloat16_grad_error"]) == 2


def test_precision_every_must_be_positive():
    model, loss_fn, X, y = _regression()
    with pytest.raises(ValueError, match="precision_every"):
        CurvatureMonitor(model, loss_fn, (X, y), lr=0.1, precision_every=0)
