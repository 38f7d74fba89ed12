"""CurvatureMonitor: correct sharpness, forecasts, warnings, logging and warm starts."""

import json

import pytest
import torch
from torch import nn

from curvlab.diagnostics import CurvatureMonitor, forecast_crossing
from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator


def test_forecast_crossing_exact_line():
    steps = [10, 20, 30, 40]
    assert forecast_crossing(steps, [0.5 + 0.01 * s for s in steps], 2.0) == pytest.approx(150)
    assert forecast_crossing(steps, [1.0, 0.9, 0.8, 0.7], 2.0) is None
    assert forecast_crossing([5], [1.0], 2.0) is None
    # the cautious forecast: identical on an exact line, later for a noisy rise, and
    # None when the rise is not significant
    line = [0.5 + 0.01 * s for s in steps]
    assert forecast_crossing(steps, line, 2.0, confidence=0.9) == pytest.approx(150)
    noisy = [0.5 + 0.01 * s + e for s, e in zip(steps, [0.02, -0.02, 0.02, -0.02],
                                                 strict=True)]
    point = forecast_crossing(steps, noisy, 2.0)
    assert forecast_crossing(steps, noisy, 2.0, confidence=0.9) > point
    flat = [1.0 + e for e in [-0.03, 0.03, -0.03, 0.04]]
    assert forecast_crossing(steps, flat, 2.0) is not None
    assert forecast_crossing(steps, flat, 2.0, confidence=0.9) is None


def regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = X @ torch.randn(5, 1, generator=g, dtype=torch.float64)
    return nn.Linear(5, 1).double(), nn.MSELoss(), X, y


def test_lr_ramp_on_fixed_curvature_warns_before_crossing(tmp_path):
    """Linear regression: H is constant, so lr x lambda_max grows exactly like the lr
    schedule; the forecast is exact and the events fire at the predictable checks."""
    model, loss_fn, X, y = regression()
    lam = float(torch.linalg.eigvalsh(HessianOperator(model, loss_fn, (X, y)).to_dense())[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.2 / lam)
    seen = []
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=10, tol=1e-8,
                           max_hvps=10, horizon=95, log_dir=tmp_path, adaptive=False,
                           callbacks=[lambda m, rec, ev: seen.append((rec["step"], len(ev)))])
    ratios = {}
    for step in range(1, 301):
        for group in opt.param_groups:  # lr x lambda = 0.205 + 0.01 * step
            group["lr"] = (0.205 + 0.01 * step) / lam
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
        ratios[step] = 0.205 + 0.01 * step
    checks = {c["step"]: c for c in mon.checks}
    for s, c in checks.items():
        assert c["lambda_max"] == pytest.approx(lam, rel=1e-6)
        assert c["lr_sharpness"] == pytest.approx(ratios[s], rel=1e-6)
    stab = [e for e in mon.events if e.kind in ("approaching", "crossed")]
    # crossing (ratio 2) at step 179.5: the first check with the forecast <= 95 steps ahead
    # and ratio >= 1 (min_ratio * 2) is step 90; the first check with ratio >= 2 is 180
    assert [(e.kind, e.step) for e in stab] == [("approaching", 90), ("crossed", 180)]
    assert stab[0].predicted_step == pytest.approx(179.5, abs=1e-6)
    assert stab[0].horizon == pytest.approx(89.5, abs=1e-6) and stab[0].confidence > 0.9
    # the rise is the lr schedule on a fixed curvature: both events are warnings
    assert [e.severity for e in stab] == ["warning", "warning"]
    lines = [json.loads(x) for x in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "lambda_max" in r] == sorted(checks)
    assert any(ev["kind"] == "approaching" for r in lines for ev in r["events"])
    assert [s for s, _ in seen if s in checks] == sorted(checks)
    assert mon.summary()["checks"] == 30 and 0 < mon.overhead < 1
    mon.close()


def test_warm_start_is_cheap_and_every_check_is_right():
    """At every check: the warm-started lambda_max is within its residual (and tol) of the
    dense truth, and costs well under a cold Lanczos run at the same point."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    X = torch.randn(128, 8, generator=g)
    y = torch.randint(0, 3, (128,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    truth, cold = {}, []

    def compare(mon, record, events):
        if "lambda_max" in record:
            op = HessianOperator(model, loss_fn, (X, y))
            truth[record["step"]] = torch.linalg.eigvalsh(op.to_dense().double())
            cold.append(lanczos(op, 1, tol=mon.tol, generator=torch.Generator().manual_seed(
                record["step"])).num_matvecs)

    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=10, callbacks=[compare])
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    for c in mon.checks:
        assert c["converged"]
        # the residual bounds the distance to *an* eigenvalue; tol the error of lambda_max
        # (early checks at steps 1, 4 included, where the top two are 1-4% apart)
        nearest = float((truth[c["step"]] - c["lambda_max"]).abs().min())
        assert nearest <= c["lambda_max_residual"] * 1.01 + 1e-6
        assert abs(c["lambda_max"] - float(truth[c["step"]][-1])) <= mon.tol * float(
            truth[c["step"]][-1])
    warm = [c["num_hvps"] for c in mon.checks[1:]]
    assert sum(warm) / len(warm) <= 0.7 * sum(cold[1:]) / len(cold[1:])


def test_adam_uses_preconditioned_threshold_and_jumps_fire():
    model, loss_fn, X, y = regression(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=5, track_every=1,
                           jump_warmup=5)
    for step in range(1, 31):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        if step == 25:  # an artificial gradient spike
            for p in model.parameters():
                p.grad.mul_(1000.0)
        opt.step()
        mon.step(loss)
    assert "lr_preconditioned_sharpness" in mon.checks[-1]
    assert mon.thresholds == {"lr_preconditioned_sharpness": pytest.approx(38.0)}
    kinds = {(e.kind, e.step) for e in mon.events}
    assert ("grad_norm_jump", 25) in kinds


def test_monitor_arguments():
    model, loss_fn, X, y = regression()
    with pytest.raises(ValueError, match="optimizer"):
        CurvatureMonitor(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match="batch"):
        CurvatureMonitor(model, loss_fn, lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, data=(X, y), batch_size=16, lr=0.1,
                           generator=torch.Generator().manual_seed(0))
    assert mon.batch[0].shape == (16, 5)
    # inputs as a dict (keyword arguments of the model) are sampled row by row too; they
    # were left whole beside 16 sampled targets
    dict_data = ({"input": X, "unused_flag": True}, y)
    mon = CurvatureMonitor(model, loss_fn, data=dict_data, batch_size=16, lr=0.1,
                           generator=torch.Generator().manual_seed(0))
    assert mon.batch[0]["input"].shape == (16, 5) and mon.batch[1].shape == (16, 1)
    assert mon.batch[0]["unused_flag"] is True


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_summing_loss_is_scaled_to_a_training_batch(optimizer):
    """A summing loss: the monitor batch (64 samples) sums 8x the terms of a training batch
    (8), so its lr x sharpness was 8x the training loss's (a false runaway warning at step 1
    on digits, no error). train_batch_size is now required and scales the monitor batch's
    curvature and loss: the same training as a mean loss with lr x 8 (SGD) gives the same
    ratios, the loss x 8; Adam (invariant to the loss scale) the same ratios too."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    runs = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.5 if reduction == "mean" else 0.5 / 8)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        kwargs = {"train_batch_size": 8} if reduction == "sum" else {}
        mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=4, adaptive=False,
                               generator=torch.Generator().manual_seed(1), **kwargs)
        for t in range(12):
            idx = slice(8 * (t % 8), 8 * (t % 8) + 8)
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            mon.step(loss)
        runs[reduction] = mon
    mean, summed = runs["mean"], runs["sum"]
    assert len(mean.checks) == len(summed.checks) == 3
    for a, b in zip(mean.checks, summed.checks, strict=True):
        ratio = "lr_sharpness" if optimizer == "sgd" else "lr_preconditioned_sharpness"
        assert b[ratio] == pytest.approx(a[ratio], rel=1e-6)
        assert b["check_loss"] == pytest.approx(8 * a["check_loss"], rel=1e-6)  # Adam: eps
    assert [e.kind for e in summed.events] == [e.kind for e in mean.events]
    model = nn.Linear(5, 3).double()
    with pytest.raises(ValueError, match="train_batch_size"):
        CurvatureMonitor(model, nn.CrossEntropyLoss(reduction="sum"), (X, y), lr=0.1)
    with pytest.raises(ValueError, match="reduction='sum'"):
        CurvatureMonitor(model, nn.CrossEntropyLoss(), (X, y), lr=0.1, train_batch_size=8)
