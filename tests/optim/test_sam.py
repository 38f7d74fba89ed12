"""SAM / ASAM (curvlab.optim.sam) against hand-computed and dense references.

The contract items shared with every optimizer (resume through torch.save, distributed
checkpoint, param groups, lr schedulers, bad gradients, dtypes, invalid settings) run in
tests/optim/test_conformance.py ("sam").
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics.stability import stability_model
from curvlab.optim import (
    SAM,
    SOAP,
    KLShampoo,
    Shampoo,
    asam_param_groups,
    frozen_batchnorm_stats,
)

LOSS = nn.CrossEntropyLoss()


class Recorder(torch.optim.Optimizer):
    """A base optimizer that records the parameters and gradients its step sees."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, {"lr": lr})
        self.seen = []

    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g["params"]]
        self.seen.append(([p.detach().clone() for p in ps],
                          [p.grad.detach().clone() for p in ps]))


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(k=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)


def _closure(model, opt, X, y, seen=None):
    def closure():
        if seen is not None:
            seen.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        out = model(X)
        loss = LOSS(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
        loss.backward()
        return loss
    return closure


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_restores_parameters_bitwise(dtype, adaptive):
    model = _mlp(dtype=dtype)
    original = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), Recorder, rho=0.5, adaptive=adaptive)
    X, y = _batch(0, dtype)
    seen = []
    opt.step(_closure(model, opt, X, y, seen))
    w, perturbed = seen
    assert all(torch.equal(a, b) for a, b in zip(w, original, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(perturbed, original, strict=True))
    base_saw = opt.base_optimizer.seen[0][0]
    for got, want in zip(base_saw, original, strict=True):
        assert torch.equal(_bits(got), _bits(want))  # bit for bit, signed zeros included


def test_first_and_second_step_restore_bitwise_and_equal_step():
    model, twin = _mlp(), _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    opt2 = SAM(twin.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for k in range(3):
        X, y = _batch(k)
        opt.step(_closure(model, opt, X, y))
        LOSS(twin(X), y).backward()
        before = [p.detach().clone() for p in twin.parameters()]
        assert opt2.first_step(zero_grad=True)
        assert all(not torch.equal(a, p) for a, p in zip(before, twin.parameters(), strict=True))
        with pytest.raises(RuntimeError, match="second_step"):
            opt2.state_dict()
        LOSS(twin(X), y).backward()
        assert opt2.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_parameters_restored_when_the_second_closure_raises():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    original = [p.detach().clone() for p in model.parameters()]
    X, y = _batch()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        opt.zero_grad()
        loss = LOSS(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(original, model.parameters(), strict=True))
    opt.step(_closure(model, opt, X, y))  # and the optimizer is usable
    assert opt.stats()["steps"] == 1


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(10, 10, generator=g, dtype=torch.float64)
    A = M @ M.T / 10 + torch.eye(10, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    w0 = torch.randn(10, generator=g, dtype=torch.float64)
    return A, b, w0


def test_sam_step_on_a_quadratic_equals_the_formula_float64():
    """f(w) = 1/2 w^T A w - b^T w, w split over two groups (rho 0.05 and 0.2): e_i =
    rho_group(i) g_i / ||g|| with one norm over all parameters, then w - lr grad f(w + e)."""
    A, b, w0 = _quadratic()
    W = nn.Parameter(w0[:6].reshape(3, 2).clone())
    v = nn.Parameter(w0[6:].clone())
    lr = 0.1
    opt = SAM([{"params": [W]}, {"params": [v], "rho": 0.2}], torch.optim.SGD, rho=0.05,
              lr=lr)

    def closure():
        opt.zero_grad()
        w = torch.cat([W.reshape(-1), v])
        loss = 0.5 * w @ A @ w - b @ w
        loss.backward()
        return loss

    w = w0.clone()
    rho = torch.tensor([0.05] * 6 + [0.2] * 4, dtype=torch.float64)
    for _ in range(3):
        opt.step(closure)
        g = A @ w - b
        e = rho * g / torch.linalg.vector_norm(g)
        w = w - lr * (A @ (w + e) - b)
        got = torch.cat([W.detach().reshape(-1), v.detach()])
        torch.testing.assert_close(got, w, rtol=1e-13, atol=1e-15)


def test_asam_perturbation_matches_a_dense_reference():
    """e = rho T^2 g / ||T g||, T = diag(|w| + eta) on weights and 1 on biases (the ASAM
    authors' grouping), as dense float64 matrices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    rho, eta = 0.5, 0.01
    opt = SAM(asam_param_groups(model), Recorder, rho=rho, adaptive=True, eta=eta)
    assert [g["adaptive"] for g in opt.param_groups] == [True, False]
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    seen = []
    opt.step(_closure(model, opt, X, y, seen))
    names = [n for n, _ in model.named_parameters()]
    w = torch.cat([p.reshape(-1) for p in seen[0]])
    e_got = torch.cat([p.reshape(-1) for p in seen[1]]) - w
    params0 = dict(zip(names, [p.clone().requires_grad_() for p in seen[0]], strict=True))
    loss = LOSS(torch.func.functional_call(model, params0, (X,)), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params0.values()))])
    t = torch.cat([(p.abs() + eta if "weight" in n else torch.ones_like(p)).reshape(-1)
                   for n, p in zip(names, seen[0], strict=True)])
    T = torch.diag(t)
    e_ref = rho * T @ T @ g / torch.linalg.vector_norm(T @ g)
    torch.testing.assert_close(e_got, e_ref, rtol=1e-10, atol=1e-14)


def test_adaptive_on_every_parameter_scales_biases_too():
    """``SAM(params, adaptive=True)`` (davda54/sam's convention): T = |w| + eta everywhere."""
    torch.manual_seed(1)
    p = nn.Parameter(torch.tensor([2.0, -0.5, 0.0], dtype=torch.float64))
    opt = SAM([p], Recorder, rho=0.1, adaptive=True, eta=0.01)
    seen = []

    def closure():
        seen.append(p.detach().clone())
        opt.zero_grad()
        (p * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
        return torch.zeros(())

    opt.step(closure)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    t = seen[0].abs() + 0.01
    torch.testing.assert_close(seen[1] - seen[0], 0.1 * t * t * g / (t * g).norm())


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9,
                                                          "nesterov": True}),
                                     (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})])
def test_rho_zero_is_the_base_optimizer_bitwise(base, kw):
    model, twin = _mlp(), _mlp()
    opt = SAM(model.parameters(), base, rho=0.0, **kw)
    ref = base(twin.parameters(), **kw)
    for k in range(4):
        X, y = _batch(k)
        opt.step(_closure(model, opt, X, y))
        ref.step(_closure(twin, ref, X, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def _make_soap(model):
    return SAM([{"params": [model[0].weight, model[0].bias]},
                {"params": list(model[2].parameters()), "rho": 0.2}], SOAP, rho=0.05,
               adaptive=True, lr=1e-2, precondition_frequency=2)


def _make_adamw(model):
    return SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2)


@pytest.mark.parametrize("make", [_make_soap, _make_adamw])
def test_state_dict_resumes_bitwise(make):
    model = _mlp()
    opt = make(model)
    for k in range(3):
        opt.step(_closure(model, opt, *_batch(k)))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for k in range(3, 6):
        opt.step(_closure(model, opt, *_batch(k)))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _mlp(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(model2)
    opt2.param_groups[-1]["rho"] = 7.0  # overwritten by the load
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[-1]["rho"] == opt.param_groups[-1]["rho"]
    assert opt2.stats()["steps"] == 3
    for k in range(3, 6):
        opt2.step(_closure(model2, opt2, *_batch(k)))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.stats()["steps"] == 6


def _flat_sam_reference(model, base, X, y, rho):
    """One SAM step by hand: gradient at w, e = rho g / ||g||, gradient at w + e, w back,
    the base optimizer's step."""
    ps = list(model.parameters())
    base.zero_grad()
    LOSS(model(X), y).backward()
    g = [p.grad.clone() for p in ps]
    norm = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in g]))
    saved = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, t in zip(ps, g, strict=True):
            p.add_(rho * t / norm)
    base.zero_grad()
    LOSS(model(X), y).backward()
    with torch.no_grad():
        for p, s in zip(ps, saved, strict=True):
            p.copy_(s)
    base.step()


def test_curvlab_shampoo_as_the_base_takes_its_step_at_the_perturbed_gradient():
    """Against SAM by hand around a second Shampoo. float64 model and eps 1e-4: with
    Shampoo's default eps (1e-12) and float32 factors, the inverse roots of the rank-1
    first statistics amplify rounding differences in the gradient to 1e-4."""
    model, twin = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    kw = {"lr": 1e-2, "eps": 1e-4, "precondition_frequency": 2, "start_preconditioning_step": 1}
    opt = SAM(model.parameters(), Shampoo, rho=0.1, **kw)
    ref = Shampoo(twin.parameters(), **kw)
    for k in range(4):
        X, y = _batch(k, torch.float64)
        opt.step(_closure(model, opt, X, y))
        _flat_sam_reference(twin, ref, X, y, 0.1)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.stats()["refreshes"] == ref.stats()["refreshes"] > 0
    assert opt.stats()["base"]["steps"] == 4


def test_param_groups_set_rho_per_group_and_add_param_group_fills_defaults():
    model = _mlp()
    opt = SAM(model[0].parameters(), Recorder, rho=0.3)
    opt.add_param_group({"params": model[2].parameters(), "rho": 0.0})
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[1]["adaptive"] is False
    assert opt.param_groups is opt.base_optimizer.param_groups
    seen = []
    opt.step(_closure(model, opt, *_batch(), seen))
    w, perturbed = seen
    assert all(not torch.equal(a, b) for a, b in zip(w[:2], perturbed[:2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(w[2:], perturbed[2:], strict=True))
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": -1.0})


def test_errors_name_the_problem():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    for bad in (-0.1, math.inf, math.nan, "0.05"):
        with pytest.raises(ValueError, match="rho"):
            SAM(model.parameters(), torch.optim.SGD, rho=bad, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        SAM(model.parameters(), torch.optim.SGD, eta=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="instance"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="LBFGS"):
        SAM(model.parameters(), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="rho"):  # Adadelta's own rho would be overwritten
        SAM(model.parameters(), torch.optim.Adadelta)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="learning rate"):  # the base optimizer's own check
        SAM(model.parameters(), torch.optim.SGD, lr=-1.0)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_gradient_at_the_perturbed_point_skips_or_raises(nonfinite):
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nonfinite=nonfinite)
    X, y = _batch()
    opt.step(_closure(model, opt, X, y))
    before = [p.detach().clone() for p in model.parameters()]
    state = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = LOSS(model(X), y)
        loss.backward()
        if len(calls) == 2:  # finite at w, NaN at w + e
            model[0].weight.grad[0, 0] = math.nan
        return loss

    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.stats()["skipped_nonfinite"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(s, opt.state[p]["momentum_buffer"])
               for s, p in zip(state, model.parameters(), strict=True))


def test_first_step_with_bad_gradients_skips_the_pair():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    LOSS(model(_batch()[0]), _batch()[1]).backward()
    model[2].bias.grad[0] = math.inf
    assert opt.first_step() is False
    assert opt.second_step() is False
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert opt.stats()["skipped_nonfinite"] == 1 and opt.stats()["steps"] == 0


def test_stability_model_is_the_base_optimizers():
    model = _mlp()
    sgd = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    rule = stability_model(sgd)  # how the monitor resolves it
    plain = stability_model(torch.optim.SGD(_mlp().parameters(), lr=0.1, momentum=0.9))
    assert (rule.name, rule.lr, rule.threshold) == (plain.name, plain.lr, plain.threshold)
    assert rule.threshold == pytest.approx(3.8) and "SAM" in rule.note
    adamw = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    adamw.step(_closure(model, adamw, *_batch()))
    rule = stability_model(adamw)
    inner = stability_model(adamw.base_optimizer)
    assert rule.name == "adam" and rule.threshold == inner.threshold
    v = torch.randn_like(model[0].weight)
    torch.testing.assert_close(rule.inv_sqrt_preconditioner(model[0].weight, v),
                               inner.inv_sqrt_preconditioner(model[0].weight, v))


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average
def test_model_argument_keeps_the_first_pass_batchnorm_statistics(momentum):
    X, y = _batch()
    stats = {}
    for freeze in (True, False):
        model = _bn_model()
        model[1].momentum = momentum
        ref = copy.deepcopy(model)
        ref(X)  # one training-mode forward at w
        opt = SAM(model.parameters(), Recorder, rho=0.5, model=model if freeze else None)
        opt.step(_closure(model, opt, X, y))
        stats[freeze] = [torch.equal(a, b) for a, b in zip(model[1].buffers(), ref[1].buffers(),
                                                            strict=True)]
    assert all(stats[True])
    assert not all(stats[False])  # without it the second pass moves them again


def test_frozen_batchnorm_stats_restores_on_error():
    model = _bn_model()
    before = [b.clone() for b in model[1].buffers()]
    with pytest.raises(KeyError), frozen_batchnorm_stats(model):
        model(torch.randn(5, 6))
        raise KeyError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, model[1].buffers(), strict=True))


def test_deepcopy_continues_identically():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step(_closure(model, opt, *_batch(0)))
    bundle = copy.deepcopy({"model": model, "opt": opt})  # the copy steps the copied model
    model2, opt2 = bundle["model"], bundle["opt"]
    assert opt2.state is opt2.base_optimizer.state and len(opt2.state) == 4
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    for k in range(1, 3):
        opt.step(_closure(model, opt, *_batch(k)))
        opt2.step(_closure(model2, opt2, *_batch(k)))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loads_a_state_dict_of_the_plain_base_optimizer():
    """Warm start from a checkpoint of the base optimizer alone: SAM's settings stay."""
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.step(_closure(model, sgd, *_batch(0)))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["rho"] == 0.2
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"],
                       sgd.state[model[0].weight]["momentum_buffer"])
    opt.step(_closure(model, opt, *_batch(1)))


def test_compile_step_compiles_the_base_step_and_equals_eager():
    """SAM(KLShampoo).compile_step() switches the base's compiled step on (dynamo's eager
    backend here: traced fullgraph, no code generation); 4 SAM steps equal the eager ones to
    float rounding. (Not SOAP or Shampoo: on this 6-8-3 MLP their Adam-in-the-eigenbasis /
    inverse roots of rank-deficient early factors turn float32 rounding differences of
    1e-8 into 4e-4 - 9e-4 within four steps, compiled or not.) A base without a compiled path
    refuses by name."""
    runs = []
    for compiled in (False, True):
        model = _mlp()
        opt = SAM(model.parameters(), KLShampoo, rho=0.1, lr=1e-2, precondition_frequency=2)
        if compiled:
            assert opt.compilable and opt.compile_step(backend="eager") is opt
            assert opt.step_compiled and opt.base_optimizer.step_compiled
        for k in range(4):
            X, y = _batch(k)
            opt.step(_closure(model, opt, X, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    plain = SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    assert not plain.compilable and not plain.step_compiled
    with pytest.raises(NotImplementedError, match="SGD has no compiled step path"):
        plain.compile_step()
