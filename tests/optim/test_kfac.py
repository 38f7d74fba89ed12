"""KFAC optimizer against dense float64 references, and the optimizer conventions."""

import copy

import pytest
import torch
from _shared_models import AppliedThroughWeight, Layout
from torch import nn

from curvlab import Objective
from curvlab.linops import KFACOperator
from curvlab.optim import KFAC

D64 = torch.float64


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_step(model, X, y, loss_fn=None, **kw):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    kw = {"momentum": 0.0, "kl_clip": None, **kw}
    opt = KFAC(model, loss_fn=loss_fn, **kw)
    before = flat_params(model)
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    return before, flat_params(model), g, opt


def test_single_linear_single_sample_is_natural_gradient():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D64)
    X, y = torch.randn(1, 4, dtype=D64), torch.tensor([1])
    lr, lam = 0.5, 1e-2
    before, after, g, _ = one_step(model, X, y, lr=lr, damping=lam)
    F = torch.outer(g, g)  # the (empirical) Fisher of one sample
    ref = -lr * torch.linalg.solve(F + lam * torch.eye(15, dtype=D64), g)
    torch.testing.assert_close(after - before, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_preconditioned_gradient_matches_dense_kronecker(fisher_type):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(D64)
    X, y = torch.randn(8, 3, dtype=D64), torch.randint(0, 4, (8,))
    lam = 0.05
    op = KFACOperator(copy.deepcopy(model), nn.CrossEntropyLoss(), (X, y),
                      fisher_type=fisher_type, damping=lam, seed=3)
    before, after, g, _ = one_step(model, X, y, lr=1.0, damping=lam, fisher_type=fisher_type,
                                   seed=3)
    ref = -torch.linalg.solve(op.to_dense(), g)
    torch.testing.assert_close(after - before, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kw", [dict(approx="reduce"), dict(separate_weight_and_bias=True),
                                dict(approx="reduce", separate_weight_and_bias=True)])
def test_reduce_and_separate_blocks_match_the_operator(kw):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Flatten()).to(D64)
    X, y = torch.randn(6, 2, 3, dtype=D64), torch.randint(0, 8, (6,))
    lam = 0.05
    op = KFACOperator(copy.deepcopy(model), nn.CrossEntropyLoss(), (X, y),
                      fisher_type="mc", damping=lam, seed=3, **kw)
    before, after, g, _ = one_step(model, X, y, lr=1.0, damping=lam, fisher_type="mc",
                                   seed=3, **kw)
    ref = -torch.linalg.solve(op.to_dense(), g)
    torch.testing.assert_close(after - before, ref, atol=1e-10, rtol=1e-8)


def test_conv_net_matches_dense_kronecker_and_factored_mode():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 3)).to(D64)
    X, y = torch.randn(4, 2, 4, 4, dtype=D64), torch.randint(0, 3, (4,))
    lam = 0.1
    op = KFACOperator(copy.deepcopy(model), nn.CrossEntropyLoss(), (X, y),
                      fisher_type="empirical", damping=lam)
    m1 = copy.deepcopy(model)
    before, after, g, opt = one_step(m1, X, y, lr=1.0, damping=lam)
    torch.testing.assert_close(after - before, -torch.linalg.solve(op.to_dense(), g),
                               atol=1e-10, rtol=1e-8)
    assert set(opt.stats()["condition_numbers"]) == {"0", "3"}
    before, after, g, _ = one_step(copy.deepcopy(model), X, y, lr=1.0, damping=lam,
                                   inverse_method="inverse")
    ref = -op.inverse(lam, method="factored").matvec(g)
    torch.testing.assert_close(after - before, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("conv", [False, True])
def test_ekfac_uses_per_sample_eigenbasis_scales(conv):
    torch.manual_seed(3)
    if conv:  # several spatial positions: the per-sample gradient sums over them
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(12, 2)).to(D64)
        X = torch.randn(6, 2, 3, 3, dtype=D64)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D64)
        X = torch.randn(6, 3, dtype=D64)
    y = torch.randint(0, 2, (6,))
    lam = 0.1
    op = KFACOperator(copy.deepcopy(model), nn.CrossEntropyLoss(), (X, y),
                      fisher_type="empirical")
    # per-sample gradients of the per-sample loss, flat layout
    per = torch.stack([Objective(model, nn.CrossEntropyLoss(), (X[n:n + 1], y[n:n + 1]))
                       .flat_grad() for n in range(6)])
    blocks, n = [], op.shape[0]
    P = torch.zeros(n, n, dtype=D64)
    for layer, idx in zip(op.layers, op._index, strict=True):
        A, G = op.factors[layer.name]
        QA, QG = torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]
        Q = torch.kron(QG, QA)  # eigenbasis of G kron A (row-major [W | b])
        flat = idx.reshape(-1)
        s = ((per[:, flat] @ Q) ** 2).mean(0)
        block = Q @ torch.diag(1 / (s + lam)) @ Q.T
        P[flat.unsqueeze(1), flat.unsqueeze(0)] = block
        blocks.append(block)
    before, after, g, _ = one_step(model, X, y, lr=1.0, damping=lam,
                                   eigenvalue_correction=True)
    torch.testing.assert_close(after - before, -P @ g, atol=1e-10, rtol=1e-8)


def test_converges_on_linear_least_squares():
    torch.manual_seed(4)
    X = torch.randn(64, 5, dtype=D64)
    w_true = torch.randn(2, 5, dtype=D64)
    Y = X @ w_true.T + 0.01 * torch.randn(64, 2, dtype=D64)
    model = nn.Linear(5, 2).to(D64)
    opt = KFAC(model, lr=0.5, damping=1e-4, momentum=0.0, fisher_type="mc", kl_clip=None,
               loss_fn=nn.MSELoss(), stat_decay=0.9, inv_update_freq=1)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    Xa = torch.cat([X, torch.ones(64, 1, dtype=D64)], 1)
    sol = torch.linalg.lstsq(Xa, Y).solution.T
    torch.testing.assert_close(torch.cat([model.weight, model.bias[:, None]], 1).detach(), sol,
                               atol=1e-6, rtol=0)


def _train(model, opt, batches, closure_based=False):
    lf = nn.CrossEntropyLoss()
    for X, y in batches:
        def closure(X=X, y=y):
            opt.zero_grad()
            loss = lf(model(X), y)
            loss.backward()
            return loss
        if closure_based:
            opt.step(closure)
        else:
            closure()
            opt.step()


def _batches(seed, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,),
                                                                         generator=g))
            for _ in range(n)]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(),
                         nn.Linear(8, 3)).to(torch.float32)


@pytest.mark.parametrize("kw", [
    dict(fisher_type="mc", loss_fn=nn.CrossEntropyLoss(), eigenvalue_correction=True),
    dict(inverse_method="inverse", fallback="adam", weight_decay=1e-3),
    dict(adaptive_damping=True, damping_adaptation_interval=2),
])
def test_state_dict_round_trip_bit_for_bit(kw):
    kw = dict(lr=0.1, damping=0.1, inv_update_freq=3, **kw)
    closure_based = kw.get("adaptive_damping", False)
    model = _mlp()
    opt = KFAC(model, **kw)
    _train(model, opt, _batches(0, 4), closure_based)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rest = _batches(1, 5)
    _train(model, opt, rest, closure_based)
    model2 = _mlp(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = KFAC(model2, **{**kw, "damping": 0.7})
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, rest, closure_based)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["damping"] == opt2.param_groups[0]["damping"]


def test_nonfinite_gradient_skips_or_raises():
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    _train(model, opt, _batches(0, 2))
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    X, y = _batches(1, 1)[0]
    X[0, 0] = float("nan")
    _train(model, opt, [(X, y)])
    assert opt.stats()["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])
    after = opt.state_dict()
    for key, st in state["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, after["state"][key][name])
    opt_r = KFAC(model, lr=0.1, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        _train(model, opt_r, [(X, y)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])


def test_param_groups_schedulers_and_fallback():
    torch.manual_seed(6)
    model = _mlp()
    opt = KFAC(model, lr=0.1, kl_clip=None, momentum=0.0, params=[
        {"params": list(model[0].parameters()) + list(model[1].parameters())},
        {"params": model[3].parameters(), "lr": 0.0}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    last = copy.deepcopy(model)
    X, y = _batches(2, 1)[0]
    _train(model, opt, [(X, y)])
    assert torch.equal(model[3].weight, last[3].weight)  # lr 0 group untouched
    # LayerNorm parameters get the documented SGD fallback: -lr * grad
    torch.testing.assert_close(model[1].weight - last[1].weight, -0.1 * model[1].weight.grad)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match="same group"):
        KFAC(model, params=[{"params": [model[0].weight]}, {"params": [model[0].bias]}])


def test_no_grad_evaluation_and_gradient_accumulation():
    torch.manual_seed(7)
    X, y = torch.randn(16, 6, dtype=D64), torch.randint(0, 3, (16,))
    lf = nn.CrossEntropyLoss()
    ref = _mlp().to(D64)
    acc = copy.deepcopy(ref)
    o1, o2 = KFAC(ref, lr=0.1), KFAC(acc, lr=0.1)
    for _ in range(3):
        o1.zero_grad()
        lf(ref(X), y).backward()
        with torch.no_grad():
            ref(torch.randn(5, 6, dtype=D64))  # evaluation must not touch the statistics
        o1.step()
        o2.zero_grad()
        for sl in (slice(0, 8), slice(8, 16)):
            (lf(acc(X[sl]), y[sl]) / 2).backward()
        o2.step()
    for p, q in zip(ref.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10)


def test_adaptive_damping_moves_in_the_right_direction():
    torch.manual_seed(8)
    X = torch.randn(64, 5, dtype=D64)
    Y = X @ torch.randn(5, 2, dtype=D64)
    lf = nn.MSELoss()
    for lr, expect in ((1.0, "down"), (5.0, "up")):
        model = nn.Linear(5, 2).to(D64)
        opt = KFAC(model, lr=lr, damping=1e-2, momentum=0.0, kl_clip=None, fisher_type="mc",
                   loss_fn=lf, adaptive_damping=True, damping_adaptation_interval=1,
                   mc_samples=64)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = lf(model(X), Y)
            loss.backward()
            return loss
        opt.step(closure)
        d = opt.param_groups[0]["damping"]
        assert (d < 1e-2) if expect == "down" else (d > 1e-2), (lr, d, opt.stats()["rho"])
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_kl_clip_none_and_bad_arguments():
    model = _mlp()
    opt = KFAC(model, kl_clip=None)
    _train(model, opt, _batches(0, 2))
    assert opt.stats()["kl_clip_scale"] == 1.0
    opt = KFAC(model, kl_clip=1e-8)
    _train(model, opt, _batches(0, 1))
    assert opt.stats()["kl_clip_scale"] < 1.0
    for bad in (dict(lr=-1), dict(damping=0), dict(kl_clip=0), dict(inv_update_freq=3,
                factor_update_freq=2), dict(fisher_type="mc"), dict(fallback="x"),
                dict(eigenvalue_correction=True, inverse_method="inverse")):
        with pytest.raises(ValueError):
            KFAC(model, **bad)
    with pytest.raises(TypeError):
        KFAC(model.parameters())


def test_failed_decomposition_keeps_the_previous_preconditioner(monkeypatch):
    model = _mlp()
    opt = KFAC(model, inv_update_freq=1, kl_clip=None)
    _train(model, opt, _batches(0, 1))
    st = opt.state[model[0].weight]
    QA = st["QA"].clone()
    real = torch.linalg.eigh

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    before = copy.deepcopy(model.state_dict())
    _train(model, opt, _batches(1, 1))
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert opt.stats()["eigh_failures"] >= 1
    assert torch.equal(st["QA"], QA)  # previous eigenbasis kept, factors still updated
    changed = [not torch.equal(v, before[k]) for k, v in model.state_dict().items()]
    assert all(torch.isfinite(p).all() for p in model.parameters()) and any(changed)


def test_adaptive_damping_undoes_a_step_with_nonfinite_new_loss():
    model = _mlp()
    opt = KFAC(model, adaptive_damping=True, damping_adaptation_interval=1)
    X, y = _batches(3, 1)[0]
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        calls.append(1)
        return loss if len(calls) == 1 else loss * float("nan")
    before = copy.deepcopy(model.state_dict())
    opt.step(closure)
    assert len(calls) == 2 and opt.param_groups[0]["damping"] > 0.03
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())


def test_discarded_optimizer_removes_its_hooks():
    import gc

    model = _mlp()
    opt = KFAC(model)
    assert model._forward_pre_hooks and model[0]._forward_hooks
    del opt
    gc.collect()
    assert not model._forward_pre_hooks and not model[0]._forward_hooks


def test_paused_records_no_statistics():
    """Passes through the model inside ``paused()`` (a monitor's, an evaluation's) leave
    the K-FAC statistics as they were."""
    from curvlab.optim import KFAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, lr=0.1, fisher_type="empirical")
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with opt.paused():
        nn.functional.cross_entropy(model(X), y).backward()
    assert opt._collect() is None or not any(opt._collect())
    model.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    assert opt._collect()


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_a_layer_applied_through_its_weight_is_refused_and_attention_out_proj_falls_back(
        fisher_type):
    """A layer whose weight a parent applies itself got no statistics and, silently, no
    K-FAC step (left to the fallback without a word); the first statistics step raises
    now. nn.MultiheadAttention's out_proj is left to the fallback from the start (logged),
    and its update is the fallback's SGD step."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    model = AppliedThroughWeight()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, lr=0.1, fisher_type=fisher_type, loss_fn=loss_fn)
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match=r"\['proj'\] were not called"):
        opt.step()

    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(enc, nn.Flatten(), nn.Linear(40, 3))
    Xs, ys = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    opt = KFAC(model, lr=0.1, fisher_type=fisher_type, momentum=0.0, kl_clip=None,
               loss_fn=loss_fn)
    out_proj = enc.self_attn.out_proj.weight
    before = out_proj.detach().clone()
    loss_fn(model(Xs), ys).backward()
    grad = out_proj.grad.clone()
    opt.step()
    assert grad.abs().max() > 0
    torch.testing.assert_close(out_proj.detach(), before - 0.1 * grad)


@pytest.mark.parametrize("layout", ["seq_first", "flat"])
def test_empirical_kfac_steps_do_not_depend_on_the_layers_input_layout(layout):
    """The optimizer's empirical G used each layer's row count as N (sequence-first: the
    positions; flattened: samples x positions): the same function in another layout took
    other steps (a tiny nn.TransformerEncoderLayer with batch_first=False: 2.5e-2 apart
    after 3 steps). N is the model output's samples now."""
    torch.manual_seed(1)
    X, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    params = {}
    for name in ("batch_first", layout):
        model = Layout(name).double()
        opt = KFAC(model, lr=0.1, fisher_type="empirical")
        for _ in range(3):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(X), y).backward()
            opt.step()
        params[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(params[layout], params["batch_first"], rtol=1e-10, atol=1e-12)
    # EKFAC (per-sample gradients) and K-FAC reduce (per-sample averages): rows = samples
    for fisher_type in ("empirical", "mc"):
        for kwargs in (dict(eigenvalue_correction=True), dict(approx="reduce")):
            model = Layout(layout).double()
            opt = KFAC(model, lr=0.1, fisher_type=fisher_type, loss_fn=nn.CrossEntropyLoss(),
                       **kwargs)
            nn.CrossEntropyLoss()(model(X), y).backward()
            with pytest.raises(ValueError, match="K-FAC reduce need"):
                opt.step()


def test_an_unbatched_first_input_does_not_set_the_samples():
    """The empirical G's N is the model input's first dimension only when a factored
    layer sees it as its rows: a model called with a (T, T) mask first keeps the steps of
    the same model called with its batch first."""
    from curvlab.linops._kronecker import batch_samples

    assert batch_samples([6, 24], 6, 12) == 6
    assert batch_samples([1], 6, 6) == 6  # a broadcast layer alone: the output confirms
    assert batch_samples([6, 6, 24], 5, 7) == 6  # untrusted candidates: most common rows
    assert batch_samples([6, 24], 4, 6) == 6  # a (4, 4) mask first: the output's

    class MaskFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inner = nn.Linear(3, 5)
            self.head = nn.Linear(5, 4)

        def forward(self, mask, x):  # mask: (T, T), x: (N, T, 3)
            h = torch.einsum("st,nth->nsh", mask, torch.tanh(self.inner(x)))
            return self.head(h.mean(1))

    torch.manual_seed(1)
    X, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    mask = torch.tril(torch.ones(4, 4, dtype=torch.float64))
    out = []
    for first in ("mask", "x"):
        model = MaskFirst().double()
        call = (lambda m=model: m(mask, X)) if first == "mask" else \
            (lambda m=model: m(x=X, mask=mask))
        opt = KFAC(model, lr=0.1, fisher_type="empirical")
        for _ in range(3):
            opt.zero_grad()
            nn.CrossEntropyLoss()(call(), y).backward()
            opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)
