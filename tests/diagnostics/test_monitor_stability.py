"""The optimizer's stability rule (stability_model) and the monitor's regimes, non-finite
events and Ritz certification."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from curvlab.diagnostics import CurvatureMonitor, preconditioned_sharpness, stability_threshold
from curvlab.diagnostics.stability import (
    stability_model,
    stability_report,
    unwrap_optimizer,
)
from curvlab.linops import HessianOperator
from curvlab.optim.stability import StabilityModel, momentum_threshold


def _mlp(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, nn.MSELoss(), X, y


def _train(model, loss_fn, X, y, opt, steps, mon=None):
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)


def _dense_sharpness(model, loss_fn, X, y, inv_sqrt):
    """lambda_max(D H D) with D = P^{-1/2} applied parameter by parameter, densely."""
    op = HessianOperator(model, loss_fn, (X, y))
    H = op.to_dense()
    params = list(model.parameters())
    cols = []
    for j in range(H.shape[0]):
        e = torch.zeros(H.shape[0], dtype=H.dtype)
        e[j] = 1
        parts, i = [], 0
        for p in params:
            parts.append(inv_sqrt(p, e[i:i + p.numel()].reshape(p.shape)).reshape(-1))
            i += p.numel()
        cols.append(torch.cat(parts))
    D = torch.stack(cols, 1)
    return float(torch.linalg.eigvalsh(D.T @ H @ D)[-1])


class _Wrapper:
    def __init__(self, inner, attr="optimizer"):
        setattr(self, attr, inner)


class _StubPreconditioned(torch.optim.SGD):
    """An optimizer that states its own rule: P = diag(4) on weights, biases not governed."""

    def stability_model(self):
        def inv_sqrt(param, v):
            return v / 2 if param.dim() > 1 else torch.zeros_like(v)
        return StabilityModel("stub", self.param_groups[0]["lr"], 3.0, inv_sqrt, "a test")


class _StubUnbounded(torch.optim.SGD):
    def stability_model(self):
        return StabilityModel("muon_like", self.param_groups[0]["lr"], math.inf, None,
                              "normalized update")


def test_torch_sgd_thresholds_follow_momentum_rules():
    p = [nn.Parameter(torch.zeros(2))]
    cases = [(dict(lr=0.1), "gd", 2.0),
             (dict(lr=0.1, momentum=0.9), "heavy_ball", momentum_threshold(0.9)),
             (dict(lr=0.1, momentum=0.9, dampening=0.5), "heavy_ball",
              momentum_threshold(0.9, dampening=0.5)),
             (dict(lr=0.1, momentum=0.9, nesterov=True), "nesterov",
              momentum_threshold(0.9, nesterov=True))]
    for kw, name, c in cases:
        m = stability_model(torch.optim.SGD(p, **kw))
        assert (m.name, m.threshold, m.lr, m.preconditioned) == (name, pytest.approx(c), 0.1,
                                                                 False)
    assert momentum_threshold(0.9, ema=True) == pytest.approx(38.0)
    assert momentum_threshold(0.9, nesterov=True) == pytest.approx(3.8 / 2.8)


def test_adam_family_preconditioner_matches_dense_and_wrappers_are_seen_through():
    """Adam's rule through every wrapper: threshold 2 (1 + b1) / (1 - b1), and lr x
    lambda_max(P^{-1/2} H P^{-1/2}) with P = (1 - b1^t)(sqrt(v_hat) + eps) equal to dense."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model, loss_fn, X, y = _mlp()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), amsgrad=True)
    _train(model, loss_fn, X, y, adam, 4)
    wrapped = [_accelerated(adam), _Wrapper(adam),
               _Wrapper(_Wrapper(adam, "_optimizer")), LightningOptimizer(adam)]
    for w in wrapped:
        assert unwrap_optimizer(w) is adam
        m = stability_model(w)
        assert (m.name, m.threshold, m.lr) == ("adam", pytest.approx(18.0), 1e-2)
        assert stability_threshold(w) == pytest.approx(18.0)
    st = adam.state

    def inv_sqrt(p, v):
        t = float(st[p]["step"])
        P = (st[p]["max_exp_avg_sq"] / (1 - 0.99 ** t)).sqrt() + 1e-8
        return v / (P * (1 - 0.8 ** t)).sqrt()

    want = _dense_sharpness(model, loss_fn, X, y, inv_sqrt)
    op = HessianOperator(model, loss_fn, (X, y))
    got = preconditioned_sharpness(op, wrapped[0], tol=1e-10, max_iter=200)
    assert float(got.eigenvalues[0]) == pytest.approx(want, rel=1e-8)
    rep = stability_report(op, wrapped[0], tol=1e-10)
    assert rep.preconditioned and rep.ratio == pytest.approx(1e-2 * want, rel=1e-6)
    assert rep.threshold == pytest.approx(18.0)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=wrapped[0], every=1, tol=1e-8,
                           max_hvps=200)
    mon.step()
    assert mon.thresholds == {"lr_preconditioned_sharpness": pytest.approx(18.0)}
    assert mon.checks[0]["preconditioned_sharpness"] == pytest.approx(want, rel=1e-6)
    # only the governing eigenvalue by default (a second Lanczos run costs as much again)
    assert "lambda_max" not in mon.checks[0]
    assert mon.checks[0]["sharpness"] == mon.checks[0]["preconditioned_sharpness"]
    both = CurvatureMonitor(model, loss_fn, (X, y), optimizer=adam, every=1, tol=1e-8,
                            max_hvps=200, plain_sharpness=True)
    both.step()
    dense = torch.linalg.eigvalsh(HessianOperator(model, loss_fn, (X, y)).to_dense())[-1]
    assert both.checks[0]["lambda_max"] == pytest.approx(float(dense), rel=1e-6)


def _accelerated(opt):
    """accelerate's AcceleratedOptimizer around ``opt`` (what the HF Trainer hands its
    callbacks), leaving accelerate's global state as it was."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(cpu=True).prepare_optimizer(opt)
    finally:
        AcceleratorState._reset_state(True)


def test_trainer_wrapped_adamw_is_judged_as_adam():
    """The Trainer hands callbacks accelerate's AcceleratedOptimizer around torch's AdamW."""
    model, loss_fn, X, y = _mlp()
    opt = _accelerated(torch.optim.AdamW(model.parameters(), lr=3e-3))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    assert stability_threshold(opt) == pytest.approx(38.0)
    assert stability_model(opt).preconditioned


def test_param_groups_with_their_own_lr_enter_the_preconditioner():
    """lr_g lambda < c per block: a group at 4x the lr contributes 4 H to the ratio."""
    model, loss_fn, X, y = _mlp()
    w = [p for p in model.parameters() if p.dim() > 1]
    b = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.SGD([{"params": w, "lr": 0.1}, {"params": b, "lr": 0.4}])
    m = stability_model(opt)
    assert m.lr == 0.1 and m.preconditioned
    want = _dense_sharpness(model, loss_fn, X, y, lambda p, v: v * (2.0 if p.dim() == 1 else 1.0))
    op = HessianOperator(model, loss_fn, (X, y))
    assert float(preconditioned_sharpness(op, opt, tol=1e-10, max_iter=200).eigenvalues[0]) \
        == pytest.approx(want, rel=1e-8)


def test_protocol_optimizer_states_its_rule_and_unknown_ones_fall_back_once():
    model, loss_fn, X, y = _mlp()
    stub = _StubPreconditioned(model.parameters(), lr=0.05)
    wrapped = _Wrapper(stub)
    m = stability_model(wrapped)
    assert (m.name, m.threshold, m.lr) == ("stub", 3.0, 0.05)
    want = _dense_sharpness(model, loss_fn, X, y, m.inv_sqrt_preconditioner)
    op = HessianOperator(model, loss_fn, (X, y))
    assert float(preconditioned_sharpness(op, wrapped, tol=1e-10, max_iter=200)
                 .eigenvalues[0]) == pytest.approx(want, rel=1e-8)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=wrapped, every=1, tol=1e-8,
                           max_hvps=200)
    _train(model, loss_fn, X, y, stub, 1, mon)
    assert mon.thresholds == {"lr_preconditioned_sharpness": 3.0}
    want = _dense_sharpness(model, loss_fn, X, y, m.inv_sqrt_preconditioner)
    assert mon.checks[0]["lr_preconditioned_sharpness"] == pytest.approx(0.05 * want, rel=1e-6)

    class Mystery(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.3})

    with pytest.warns(UserWarning, match="Mystery"):
        m = stability_model(Mystery(model.parameters()))
    assert (m.name, m.threshold, m.lr) == ("gd", 2.0, 0.3) and "unknown" in m.note
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer class
        stability_model(Mystery(model.parameters()))
    with pytest.raises(TypeError, match="StabilityModel"):
        class Bad(torch.optim.SGD):
            def stability_model(self):
                return 2.0
        stability_model(Bad(model.parameters(), lr=0.1))


def test_unbounded_rule_gives_no_ratio_warnings():
    """A normalized update (threshold inf, e.g. Muon): sharpness recorded, no ratio events."""
    model, loss_fn, X, y = _mlp()
    opt = _StubUnbounded(model.parameters(), lr=50.0)  # far beyond 2 / lambda_max
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=1, stop_on_nonfinite=False)
    _train(model, loss_fn, X, y, opt, 5, mon)
    assert all(c["regime"] == "unbounded" for c in mon.checks if "regime" in c)
    assert not [e for e in mon.events if e.kind in ("approaching", "crossed", "diverging")]


def test_a_run_that_goes_to_nan_gives_events_not_exceptions(tmp_path):
    """Parameters, loss and gradients go NaN inside the loop: the monitor reports it once and
    stops itself (or keeps going), and never raises."""
    for stop in (True, False):
        model, loss_fn, X, y = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=2, track_every=1,
                               stop_on_nonfinite=stop, log_dir=tmp_path / str(stop))
        _train(model, loss_fn, X, y, opt, 4, mon)
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        _train(model, loss_fn, X, y, opt, 6, mon)  # NaN loss, gradients, parameters
        mon.check()  # called directly, too
        nonfinite = [e for e in mon.events if e.kind == "nonfinite"]
        assert len(nonfinite) == 1 and nonfinite[0].step == 5
        assert nonfinite[0].severity == "error" and nonfinite[0].regime == "nonfinite"
        assert nonfinite[0].horizon == 0 and nonfinite[0].confidence == 1.0
        assert mon.stopped is stop and mon.summary()["regime"] == "nonfinite"
        assert mon.warnings == nonfinite
        mon.close()
        assert "nonfinite" in (tmp_path / str(stop) / "monitor.jsonl").read_text()


def test_nonfinite_loss_alone_fires_an_event():
    model, loss_fn, X, y = _mlp()
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1, every=100, track_every=100)
    assert mon.step(torch.tensor(float("inf")))[0].kind == "nonfinite"


def _two_top_eigenvalues(gap):
    """A linear least-squares problem whose Hessian has eigenvalues 10, 10 - gap, 1, ... ."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 10.0 - gap, 1.0, 0.5, 0.2], dtype=torch.float64)
    X = Q @ torch.diag((s * 64 / 2).sqrt()) @ V.T  # MSE Hessian 2 X^T X / n = V diag(s) V^T
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    return model, nn.MSELoss(), X, y


@pytest.mark.parametrize("gap,converged", [(0.1, False), (3.0, True)])
def test_a_check_does_not_certify_a_ritz_value_with_a_neighbour_in_its_band(gap, converged):
    model, loss_fn, X, y = _two_top_eigenvalues(gap)
    H = HessianOperator(model, loss_fn, (X, y)).to_dense()
    assert torch.linalg.eigvalsh(H)[-2:].tolist() == pytest.approx([10 - gap, 10])
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.01, every=1,
                           generator=torch.Generator().manual_seed(0))
    mon.step()
    c = mon.checks[0]
    assert c["lambda_max_residual"] <= 0.03 * c["lambda_max"]  # the residual test passed
    assert c["lambda_max_ritz_gap"] == pytest.approx(gap, rel=1e-6)
    assert c["converged"] is converged


def test_runaway_on_a_quadratic_is_a_warning_with_a_forecast():
    """Noisy least squares at lr x lambda_max = 2.02 (> 2) from the start: nothing pulls the
    ratio back and the loss grows, so the runaway is confirmed at the second check (the
    first is already compared with the training losses recorded before it)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = X @ torch.randn(5, 1, generator=g, dtype=torch.float64) + torch.randn(
        64, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(5, 1).double(), nn.MSELoss()
    lam = float(torch.linalg.eigvalsh(HessianOperator(model, loss_fn, (X, y)).to_dense())[-1])
    opt = torch.optim.SGD(model.parameters(), lr=2.02 / lam)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=5, adaptive=False,
                           tol=1e-6)
    _train(model, loss_fn, X, y, opt, 40, mon)
    div = [e for e in mon.events if e.kind == "diverging"]
    assert [(e.step, e.severity, e.regime) for e in div] == [(10, "warning", "runaway")]
    # the forecast: the loss grows like 1.02^(2t) along the top direction
    assert div[0].horizon > 0 and div[0].confidence > 0.9
    assert div[0].predicted_step == pytest.approx(10 + div[0].horizon)
    assert [e.kind for e in mon.events if e.kind == "crossed"] == ["crossed"]


def test_gradient_jumps_fire_early_in_training():
    """jump_warmup counts records of the quantity, not steps: a spike at step 30 (record 3
    with track_every=10 and jump_warmup=2) is reported."""
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=1000, track_every=10,
                           jump_warmup=2, adaptive=False)
    for step in range(1, 41):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        if step == 30:
            for p in model.parameters():
                p.grad.mul_(1000.0)
        opt.step()
        mon.step(loss)
    assert ("grad_norm_jump", 30) in {(e.kind, e.step) for e in mon.events}


def _feed(mon, ratios, losses, every=200):
    """Drive the monitor's regime logic with a series of checks (ratio, monitor-batch loss)."""
    (tr,) = mon._trackers.values()
    events = []
    for i, (r, L) in enumerate(zip(ratios, losses, strict=True)):
        mon.step_count = (i + 1) * every
        events += mon._stability_events(tr, r, L, {})
    return events


def test_edge_of_stability_is_not_a_warning_and_runaway_is():
    """The recorded shape of gradient descent at the edge of stability (bench scenario (a),
    f = 1.5: ratio hovering 2.0-2.2, loss falling with small rises) gives information
    events only; the same ratios with the loss making new highs give a warning."""
    model, loss_fn, X, y = _mlp()
    ratios = [2.45, 2.34, 2.23, 2.18, 2.17, 2.13, 2.17, 2.06, 2.12, 2.11, 2.04, 2.03]
    eos_losses = [.0105, .0064, .0043, .0028, .0024, .0019, .0017, .0013, .0013, .0015, .0012,
                  .0011]
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    events = _feed(mon, ratios, eos_losses)
    assert [e.kind for e in events] == ["crossed"] and not mon.warnings
    assert events[0].regime == "edge_of_stability"
    runaway = [0.01 * 1.5 ** i for i in range(len(ratios))]
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    events = _feed(mon, ratios, runaway)
    assert [e.kind for e in mon.warnings] == ["diverging"]
    assert mon.warnings[0].step == 600  # the third check: two confirmations after the first
    assert mon.warnings[0].regime == "runaway"


def test_coordinates_that_never_received_a_gradient_are_not_governed():
    """An embedding row of a token absent from training has v = 0 exactly: frozen at
    P = eps its curvature on the monitor batch would count 1 / eps times (ratio ~1e5 x the
    healthy value); it is projected out, and the ratio equals the one on the trained rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 5, (32, 3), generator=g)  # token 5 never in training
    y = torch.randint(0, 3, (32,), generator=g)
    Xm = X.clone()
    Xm[:8, 0] = 5  # ... but in the monitor batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    _train(model, loss_fn, X, y, opt, 5)
    v = opt.state[model[0].weight]["exp_avg_sq"]
    assert (v[5] == 0).all() and (v[:5] > 0).all()
    op = HessianOperator(model, loss_fn, (Xm, y))
    ratio = stability_report(op, opt, tol=1e-6).ratio
    # reference: the same rule with the row's P set by hand to infinity
    inv = stability_model(opt).inv_sqrt_preconditioner

    def without_row(p, x):
        out = inv(p, x)
        if p is model[0].weight:
            out = out.clone()
            out[5] = 0
        return out

    lam = _dense_sharpness(model, loss_fn, Xm, y, without_row)
    assert ratio == pytest.approx(opt.param_groups[0]["lr"] * lam, rel=1e-4)
    assert ratio < 38


def test_monitor_on_a_conv_batchnorm_net_measures_the_trained_function():
    """A conv bias before BatchNorm: the trained (train-mode) function does not depend on
    it, its gradient is rounding noise and Adam's P there ~eps. In eval mode (running
    statistics) it has curvature, which 1 / P scaled to ~4e3 x the healthy ratio; the
    monitor evaluates such a model in train mode."""
    torch.manual_seed(0)
    X = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 4)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, tol=1e-3,
                           generator=torch.Generator().manual_seed(0))
    _train(model, loss_fn, X, y, opt, 4, mon)  # checks at steps 1 and 4
    assert mon.checks[-1]["step"] == 4
    ratio = mon.checks[-1]["lr_preconditioned_sharpness"]
    # the healthy value: the trained function with the bias projected out
    inv = stability_model(opt).inv_sqrt_preconditioner

    def without_bias(p, x):
        return torch.zeros_like(x) if p is model[0].bias else inv(p, x)

    with torch.no_grad():
        op = HessianOperator(model, loss_fn, (X, y), train=True)
    healthy = opt.param_groups[0]["lr"] * float(
        preconditioned_sharpness(op, StabilityModel("adam", 1.0, 38.0, without_bias),
                                 tol=1e-6).eigenvalues[0])
    assert ratio == pytest.approx(healthy, rel=5e-2)
    assert ratio < 38 and not mon.warnings


def test_a_blow_up_faster_than_confirmation_is_warned_at_the_first_check():
    """lr x lambda_max = 20 on least squares: the top mode grows 19x per step and the loss
    passes 10x its start at step 2. The first check (step 1) sees the ratio beyond the
    threshold and the loss risen from the training loss before it; on that growth the loss
    blows up before a confirming check at step 2 could run, so it warns at once."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = X @ torch.randn(5, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(5, 1).double(), nn.MSELoss()
    lam = float(torch.linalg.eigvalsh(HessianOperator(model, loss_fn, (X, y)).to_dense())[-1])
    opt = torch.optim.SGD(model.parameters(), lr=20 / lam)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, tol=1e-6)
    _train(model, loss_fn, X, y, opt, 1, mon)
    assert [(e.step, e.kind, e.regime) for e in mon.warnings] == [(1, "diverging", "runaway")]
    assert mon.warnings[0].horizon is not None and mon.warnings[0].horizon <= 1


def test_a_held_stability_model_follows_the_optimizer_state():
    """The diagonal P^{-1/2} is cached between products, not across optimizer steps."""
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, loss_fn, X, y, opt, 2)
    held = stability_model(opt).inv_sqrt_preconditioner
    p = next(model.parameters())
    x = torch.randn_like(p)
    before = held(p, x)
    _train(model, loss_fn, X, y, opt, 1)
    after = held(p, x)
    assert torch.equal(after, stability_model(opt).inv_sqrt_preconditioner(p, x))
    assert not torch.equal(before, after)


@pytest.mark.parametrize("name,lr", [("shampoo", 1e-3), ("soap", 1e-3), ("muon", 0.02)])
def test_curvlab_optimizers_on_a_conv_batchnorm_net_stay_below_their_threshold(name, lr):
    """Their Adam parts see the conv biases before BatchNorm as Adam does: in eval mode the
    ratio was 3e3-2e4 x its train-mode value; the monitor checks the trained function.
    Checked at step 8: SOAP's ratio passes through a transient over its first steps (its
    second moments hold 1-3 samples; lr x lambda 9e6 at step 2, 74 or 196 at step 4 with
    2 or 1 threads) and settles by step 6 (22 with either)."""
    from curvlab.integrations import build_optimizer

    torch.manual_seed(0)
    X = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, name, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=4, adaptive=False,
                           generator=torch.Generator().manual_seed(0))
    _train(model, loss_fn, X, y, opt, 8, mon)
    assert mon.checks[-1]["step"] == 8
    ratio = mon.checks[-1]["lr_preconditioned_sharpness"]
    assert 0 < ratio < mon.stability.threshold and not mon.warnings


def test_parameter_norm_is_tracked_with_the_update_size():
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=100, track_every=5)
    _train(model, loss_fn, X, y, opt, 9, mon)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    _train(model, loss_fn, X, y, opt, 1, mon)  # step 10: tracked, snapshot taken at step 9
    (step, norm), = mon.history["param_norm"][-1:]
    assert step == 10 and norm == pytest.approx(float(before.double().norm()), rel=1e-12)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert mon.history["update_ratio"][-1][1] == pytest.approx(
        float((after - before).double().norm()) / norm, rel=1e-9)


def test_a_jump_that_finds_the_ratio_at_the_edge_is_watched_closely():
    """Minibatch SGD on least squares; the learning rate is raised 2.5x at step 51
    (lr x lambda_max 0.7 -> 1.75, at the edge): the update size jumps at the next tracked
    step, the check it calls finds the ratio beyond rearm x threshold, and the following
    checks come 1, 2, 4, ... steps apart (before: the next one ``every`` steps later, or at
    the next power of four early in training)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=g, dtype=torch.float64)
    y = X @ torch.randn(5, 1, generator=g, dtype=torch.float64) + torch.randn(
        256, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(5, 1).double(), nn.MSELoss()
    lam = float(torch.linalg.eigvalsh(HessianOperator(model, loss_fn, (X, y)).to_dense())[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.7 / lam)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=100, track_every=5,
                           jump_factor=2.0, jump_warmup=2, tol=1e-6)

    def train(n):
        for _ in range(n):
            i = torch.randint(0, 256, (16,), generator=g)
            opt.zero_grad()
            loss = loss_fn(model(X[i]), y[i])
            loss.backward()
            opt.step()
            mon.step(loss)

    train(50)
    opt.param_groups[0]["lr"] *= 2.5
    train(25)
    jump = next(e.step for e in mon.events if e.kind == "update_ratio_jump")
    after = [c["step"] for c in mon.checks if c["step"] > jump]
    assert after[:5] == [jump + 1, jump + 2, jump + 4, jump + 8, jump + 16]
    assert all(e.kind != "diverging" for e in mon.events)  # stable at 1.75 < 2


def test_preconditioner_samples_count_the_gradients_in_the_second_moment():
    """``ema_samples`` is the inverse weight of the newest gradient in a bias-corrected EMA
    (t early on, 1 / (1 - beta) in the limit); every adaptive rule reports it for its own
    second moment, and a fixed preconditioner reports none."""
    from curvlab.optim import KLSOAP, SOAP, KLShampoo, Muon, Shampoo
    from curvlab.optim.stability import ema_samples

    assert ema_samples(0.999, 0) == 0.0
    assert ema_samples(1.0, 7) == 7.0
    for beta, t in ((0.999, 3), (0.9, 5), (0.95, 400)):
        w = [(1 - beta) * beta ** (t - 1 - i) for i in range(t)]  # EMA weights from zero
        assert ema_samples(beta, t) == pytest.approx(sum(w) / w[-1], rel=1e-12)
    model, loss_fn, X, y = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert stability_model(sgd).preconditioner_samples is None
    # SOAP's (and the KL variants') first step initializes the eigenbasis and restarts the
    # statistics: 2 gradients after 3
    for make, b2, t in ((lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.99)), .99, 3),
                        (lambda ps: Shampoo(ps, lr=1e-3), 0.999, 3),
                        (lambda ps: SOAP(ps, lr=1e-3, betas=(0.95, 0.95)), 0.95, 2),
                        (lambda ps: Muon(ps, lr=1e-3), 0.999, 3),
                        (lambda ps: KLShampoo(ps, lr=1e-3), 0.98, 2),
                        (lambda ps: KLSOAP(ps, lr=1e-3), 0.98, 2)):
        model, loss_fn, X, y = _mlp()
        opt = make(model.parameters())
        _train(model, loss_fn, X, y, opt, 3)
        n = stability_model(opt).preconditioner_samples()
        assert n == pytest.approx(ema_samples(b2, t)), type(opt).__name__


def test_an_unsettled_preconditioner_is_not_reported_as_a_crossing():
    """Adam's first steps: v averages one or two gradients and the frozen-P ratio is far
    beyond the threshold on a run that trains fine. Those checks are "unsettled", not
    crossings; once v averages settle_samples gradients the ratio is judged again."""
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)  # step 1: ratio 54 (threshold 38)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=1, adaptive=False)
    _train(model, loss_fn, X, y, opt, 14, mon)
    early = [c for c in mon.checks if c["step"] <= 10]  # (1 - 0.999^t) / 0.001 < 10
    assert max(c["lr_preconditioned_sharpness"] for c in early) > 38  # beyond the threshold
    assert {c["regime"] for c in early} == {"unsettled"}
    assert [c["preconditioner_samples"] for c in early] == pytest.approx(
        [(1 - 0.999 ** t) / 0.001 for t in range(1, 11)])
    assert all(e.step > 10 for e in mon.events), [(e.step, e.kind) for e in mon.events]
    assert {c["regime"] for c in mon.checks if c["step"] > 10} <= {
        "stable", "sharpening", "edge_of_stability"}
    assert not mon.warnings


def test_a_loss_oscillating_far_above_its_start_after_a_spike_is_runaway():
    """After a spike the loss oscillates below the spike's peak but far above where training
    began, the ratio held beyond the threshold (recorded: AdamW lr 0.3 on the tiny GPT-2,
    steps 581-582, which blew up at 590). A new high is not needed to confirm: the
    progress of training is lost."""
    model, loss_fn, X, y = _mlp()
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    _feed(mon, [1.0, 1.1, 1.0, 50.0, 2000.0], [3.3, 3.29, 3.28, 22.9, 18.4])
    assert [(e.step, e.kind, e.regime) for e in mon.warnings] == [(1000, "diverging", "runaway")]
    assert "progress of training is lost" in mon.warnings[0].message
    # pulled back below the threshold while the loss recovers: no confirmation
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    _feed(mon, [1.0, 1.1, 1.0, 50.0, 1.5], [3.3, 3.29, 3.28, 22.9, 18.4])
    assert not mon.warnings


def test_a_check_records_the_largest_output_of_the_monitor_batch():
    """``output_max`` is max |model(batch)| at the checked parameters (a language model's
    logits from its output object), from the check's own forward."""
    model, loss_fn, X, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=3, adaptive=False)
    _train(model, loss_fn, X, y, opt, 3, mon)
    with torch.no_grad():
        assert mon.checks[-1]["output_max"] == pytest.approx(float(model(X).abs().max()),
                                                              rel=1e-12)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 40, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    mon = CurvatureMonitor(lm, None, batch, optimizer=opt, every=1, adaptive=False)
    opt.zero_grad()
    out = lm(**batch)
    out.loss.backward()
    opt.step()
    mon.step(out.loss)
    lm.eval()
    with torch.no_grad():
        expected = float(lm(**batch).logits.abs().max())
    assert mon.checks[-1]["output_max"] == pytest.approx(expected, rel=1e-5)


def test_a_loss_back_at_its_start_after_training_is_progress_lost_whatever_the_ratio():
    """Recorded shape (bench scenario (c), SGD momentum warmed up over 6000 steps to an
    over-aggressive peak): the loss fell to 0.16, a catapult threw the CNN into a flat region
    at chance level (2.3 = ln 10) with lr x sharpness 0.2 against 3.8, and the loss exploded
    3400 steps later. The return to the start is the warning; the ratio cannot give it."""
    model, loss_fn, X, y = _mlp()
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    _feed(mon, [0.1, 0.5, 0.8, 1.0, 0.2, 0.3], [2.29, 1.36, 0.16, 1.8, 2.33, 2.4])
    assert [(e.step, e.kind, e.regime) for e in mon.warnings] == [
        (1000, "progress_lost", "progress_lost")]
    assert mon.checks == [] and mon.regime == "progress_lost"
    # it re-arms once the loss is back below half the progress, and fires again
    _feed_more = [(0.3, 0.5), (0.3, 2.35)]
    (tr,) = mon._trackers.values()
    for r, L in _feed_more:
        mon.step_count += 200
        mon._stability_events(tr, r, L, {})
    assert [e.step for e in mon.warnings] == [1000, 1600]
    # a healthy run's noise (the loss rising back part of the way) is not lost progress
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    _feed(mon, [0.1, 0.5, 0.8, 1.0, 0.9, 0.9], [2.29, 1.36, 0.6, 1.5, 1.9, 1.2])
    assert not mon.warnings
    # nor is the bounce of an adaptive preconditioner still forming (Adam's first steps;
    # recorded: AdamW lr 0.1 on the tiny GPT-2 at step 4, a run that then trained)
    mon = CurvatureMonitor(model, loss_fn, (X, y), lr=0.1)
    mon.stability = StabilityModel("adam", 0.1, 2.0, None, "forming",
                                   preconditioner_samples=lambda: 4.0)
    _feed(mon, [0.1, 0.5, 0.8, 1.0, 0.2, 0.3], [2.29, 1.36, 0.16, 1.8, 2.33, 2.4])
    assert not mon.warnings


class _Quadratic(nn.Module):
    """``f(x) = sum_i lam_i x_i^2 / 2`` as a model (output ``x``) and loss, from ``x0``."""

    LAM = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)

    def __init__(self, x0=1e-20):
        super().__init__()
        self.x = nn.Parameter(torch.full((3,), x0, dtype=torch.float64))

    def forward(self, inputs):
        return self.x.unsqueeze(0) + 0 * inputs

    @classmethod
    def loss(cls, z, y):
        return 0.5 * (cls.LAM * z[0] ** 2).sum()


def _grows(opt_cls, lr, steps, **kw):
    """Whether the iterates of ``opt_cls`` on the quadratic grow over the second half of
    ``steps`` (eps = 1e3 dominates sqrt(v): a linear recurrence with P ~ eps), and the
    run's model and optimizer."""
    model = _Quadratic()
    opt = opt_cls(model.parameters(), lr=lr, eps=1e3, **kw)
    mid = None
    for t in range(steps):
        opt.zero_grad()
        _Quadratic.loss(model(torch.zeros(1, 1, dtype=torch.float64)), None).backward()
        opt.step()
        size = float(model.x.detach().abs().max())
        if t == steps // 2:
            mid = size
        if not math.isfinite(size) or size > 1e2:
            return True, model, opt
    return size > mid, model, opt


@pytest.mark.parametrize("name", ["NAdam", "RAdam", "Adamax", "Adam", "RMSprop"])
def test_adam_family_ratios_place_the_edge_where_the_iterates_start_to_grow(name):
    """NAdam mixes the gradient into its step (Nesterov) with a momentum schedule that
    starts near b1 / 2: on a quadratic it diverges at lr x lambda(P^-1 H) ~ 3.5 (b1 = 0.9,
    momentum_decay 0), not at Adam's 38, so the ratio read 0.09 of the threshold at the
    edge. RAdam multiplies its step by the rectification r_t (0.2 at step 100, 0.87 at
    step 3000): the ratio overstated it by 1 / r_t. Adamax divides by u = max(b2 u, |g| +
    eps) (eps inside): u + eps halved its ratio where |g| << eps. At 0.9x the lr the
    stability model calls critical the iterates decay; at 1.1x they grow (Adam and RMSprop
    as the reference)."""
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    kw = {"momentum_decay": 0.0} if name == "NAdam" else {}
    cls = getattr(torch.optim, name)
    steps = 3000 if name == "RAdam" else 600
    _, model, opt = _grows(cls, 1.0, steps, **kw)
    rep = stability_report(HessianOperator(model, _Quadratic.loss, data), opt, tol=1e-10)
    critical = rep.lr * rep.threshold / rep.ratio
    assert not _grows(cls, 0.9 * critical, steps, **kw)[0]
    assert _grows(cls, 1.1 * critical, steps, **kw)[0]


@pytest.mark.parametrize("name", ["SGD", "Adam", "SOAP", "Shampoo", "KLShampoo", "PSGDKron"])
@pytest.mark.parametrize("first_lr", [0.0, 1e-3])
def test_the_ratio_follows_each_groups_own_lr(name, first_lr):
    """A first param group at lr 0 (a frozen part) made stability_report raise "lr must be
    > 0" (and a monitor's ratio 0); curvlab's optimizers stated their rule with the first
    group's lr for every parameter, so a model trained at 50x that lr in a second group read
    a 50x smaller ratio (SOAP 12.5 against 626). Each group's lr now enters its parameters'
    block: the ratio equals the one-group run's."""
    import curvlab.optim as cl

    make = {"SGD": lambda g: torch.optim.SGD(g, lr=0.1),
            "Adam": lambda g: torch.optim.Adam(g, lr=0.01),
            "SOAP": lambda g: cl.SOAP(g, lr=0.01), "Shampoo": lambda g: cl.Shampoo(g, lr=0.01),
            "KLShampoo": lambda g: cl.KLShampoo(g, lr=0.01),
            "PSGDKron": lambda g: cl.PSGDKron(g, lr=0.01)}[name]
    model, loss_fn, X, y = _mlp()
    ratios = []
    for grouped in (False, True):
        torch.manual_seed(0)
        net = copy.deepcopy(model)
        params = list(net.parameters())
        extra = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
        groups = ([{"params": [extra], "lr": first_lr}] if grouped else []) + \
            [{"params": params, "lr": 0.05}]
        opt = make(groups)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(net(X), y).backward()
            extra.grad = torch.zeros_like(extra)
            opt.step()
        rep = stability_report(HessianOperator(net, loss_fn, (X, y)), opt, tol=1e-9)
        ratios.append(rep.ratio)
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-6)
