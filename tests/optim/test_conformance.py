"""The optimizer contract (curvlab.optim.base), checked on every curvlab optimizer.

A new optimizer joins by adding one :class:`Case` to ``CASES``: how to build it on a model
and how a training step calls it. Every test below then runs on it.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from curvlab.optim import (
    KFAC,
    KLSOAP,
    LBFGS,
    SAM,
    SOAP,
    HessianFree,
    KLShampoo,
    Muon,
    NaturalGradient,
    PSGDKron,
    Shampoo,
)
from curvlab.optim.base import STATS_KEYS

LOSS = nn.CrossEntropyLoss()


def _example(name: str):
    """A module of examples/ (the "new optimizer in one file" examples)."""
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DiagonalFisher = _example("diagonal_fisher_optimizer").DiagonalFisher
KroneckerAdaGrad = _example("kronecker_adagrad").KroneckerAdaGrad


@dataclass
class Case:
    """How to build (``make(model, params=None, **overrides)``) and step one optimizer."""

    make: Callable[..., torch.optim.Optimizer]
    style: str = "backward"  # "backward": loss.backward(); opt.step() | "closure" | "batch"
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    add_param_group: bool = True  # False: must refuse with a clear error
    gradient_rule: bool = True  # the base gradient rule (skip/raise on bad gradients)


def _params(model, params):
    return list(model.parameters()) if params is None else params


CASES: dict[str, Case] = {
    "shampoo": Case(
        lambda m, params=None, **kw: Shampoo(_params(m, params), **{
            "lr": 1e-2, "precondition_frequency": 2, "start_preconditioning_step": 1, **kw}),
        invalid=[({"lr": math.inf}, "lr"), ({"weight_decay": math.nan}, "weight_decay"),
                 ({"eps": 0.0}, "eps"), ({"adam": {"betas": (0.9, 1.0)}}, "betas"),
                 ({"compute_dtype": torch.bfloat16}, "compute_dtype"),
                 ({"compute_dtype": torch.int64}, "compute_dtype"),
                 ({"factor_dtype": torch.bfloat16}, "factor_dtype"),
                 ({"precondition_frequency": 0}, "precondition_frequency")]),
    "soap": Case(
        lambda m, params=None, **kw: SOAP(_params(m, params), **{
            "lr": 1e-2, "precondition_frequency": 2, **kw}),
        invalid=[({"lr": -1.0}, "lr"), ({"eps": 0.0}, "eps"), ({"betas": (0.9, 1.0)}, "betas"),
                 ({"factor_dtype": torch.bfloat16}, "factor_dtype"),
                 ({"weight_decay": math.inf}, "weight_decay")]),
    "kl_shampoo": Case(
        lambda m, params=None, **kw: KLShampoo(_params(m, params), **{
            "lr": 1e-2, "precondition_frequency": 2, **kw}),
        invalid=[({"lr": -1.0}, "lr"), ({"init_factor": 0.0}, "init_factor"),
                 ({"damping": math.nan}, "damping"), ({"betas": (0.9, 1.0)}, "betas"),
                 ({"start_preconditioning_step": 3}, "start_preconditioning_step"),
                 ({"max_inverse_sqrt": 0.0}, "max_inverse_sqrt")]),
    "kl_soap": Case(
        lambda m, params=None, **kw: KLSOAP(_params(m, params), **{
            "lr": 1e-2, "precondition_frequency": 2, **kw}),
        invalid=[({"eps": 0.0}, "eps"), ({"init_factor": -1.0}, "init_factor"),
                 ({"shampoo_beta": 1.5}, "shampoo_beta")]),
    "muon": Case(
        lambda m, params=None, **kw: Muon(_params(m, params), **{"lr": 1e-2, **kw}),
        invalid=[({"lr": math.inf}, "lr"), ({"weight_decay": math.nan}, "weight_decay"),
                 ({"adam": {"betas": (0.9, 1.0)}}, "betas"), ({"eps": 0.0}, "eps"),
                 ({"eps": -1e-7}, "eps"), ({"momentum": 1.0}, "momentum")]),
    "normuon": Case(  # NorMuon (neuron-wise second moment) on Polar Express, Gram iteration
        lambda m, params=None, **kw: Muon(_params(m, params), **{
            "lr": 1e-2, "normalize": "neuron", "ns_coefficients": "polar_express",
            "gram": True, **kw}),
        invalid=[({"beta2": 1.0}, "beta2"), ({"normalize": "row"}, "normalize"),
                 ({"ns_coefficients": "cubic"}, "ns_coefficients"),
                 ({"ns_coefficients": [(1.5, -0.5, 0.0)] * 2}, "ns_coefficients"),
                 ({"gram_restarts": 0}, "gram_restarts")]),
    "kfac": Case(
        lambda m, params=None, **kw: KFAC(m, **{"lr": 0.05, "damping": 0.05,
                                               "precondition_frequency": 2,
                                               "params": params, **kw}),
        add_param_group=False,
        invalid=[({"lr": math.inf}, "lr"), ({"damping": 0.0}, "damping"),
                 ({"min_damping": 1.0, "max_damping": 0.1}, "damping"),
                 ({"momentum": 1.0}, "momentum")]),
    "natural_gradient": Case(
        lambda m, params=None, **kw: NaturalGradient(m, **{"lr": 0.5, "damping": 0.1,
                                                          "loss_fn": LOSS, "params": params,
                                                          **kw}),
        style="closure", add_param_group=False, gradient_rule=False,
        invalid=[({"lr": math.inf}, "lr"), ({"damping": -1.0}, "damping"),
                 ({"momentum": 1.0}, "momentum")]),
    "hessian_free": Case(
        lambda m, params=None, **kw: HessianFree(m, LOSS, **{"params": params, **kw}),
        style="batch", add_param_group=False, gradient_rule=False,
        invalid=[({"lr": math.nan}, "lr"), ({"armijo_c": 1.5}, "armijo_c"),
                 ({"armijo_c": 0.0}, "armijo_c"),
                 ({"min_damping": 1.0, "max_damping": 0.1}, "damping")]),
    "diagonal_fisher": Case(
        lambda m, params=None, **kw: DiagonalFisher(_params(m, params), **{"lr": 1e-3, **kw}),
        invalid=[({"lr": math.inf}, "lr"), ({"damping": 0.0}, "damping"),
                 ({"betas": (0.9, 1.0)}, "betas")]),
    "kronecker_adagrad": Case(
        lambda m, params=None, **kw: KroneckerAdaGrad(_params(m, params), **{
            "lr": 1e-2, "precondition_frequency": 2, **kw}),
        invalid=[({"lr": math.inf}, "lr"), ({"eps": 0.0}, "eps"),
                 ({"precondition_frequency": 0}, "precondition_frequency")]),
    "psgd_kron": Case(
        lambda m, params=None, **kw: PSGDKron(_params(m, params), **{"lr": 1e-2, **kw}),
        invalid=[({"lr": math.inf}, "lr"), ({"weight_decay": math.nan}, "weight_decay"),
                 ({"lr_preconditioner": 0.0}, "lr_preconditioner"),
                 ({"precond_update_prob": 1.5}, "precond_update_prob"),
                 ({"fit": "newton"}, "fit"), ({"momentum": 1.0}, "momentum")]),
    "sam": Case(  # SAM around torch's SGD; its step needs a closure (two gradients)
        lambda m, params=None, **kw: SAM(_params(m, params), torch.optim.SGD, **{
            "lr": 0.05, "momentum": 0.9, "rho": 0.05, **kw}),
        style="closure",
        invalid=[({"rho": -0.1}, "rho"), ({"rho": math.nan}, "rho"), ({"eta": -1.0}, "eta"),
                 ({"adaptive": "yes"}, "adaptive")]),
    "lbfgs": Case(
        lambda m, params=None, **kw: LBFGS(_params(m, params), **{"max_iter": 3, **kw}),
        style="closure", add_param_group=False, gradient_rule=False,
        invalid=[({"lr": math.inf}, "lr"), ({"history_size": 0}, "history_size")]),
}


def _model(seed=0, hidden=8, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def _batch(k, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)


def _step(case, model, opt, X, y, corrupt=None):
    """One training step; ``corrupt(grads)`` edits the gradients before the update."""
    def closure():
        opt.zero_grad()
        loss = LOSS(model(X).float(), y)
        loss.backward()
        if corrupt is not None:
            corrupt([p.grad for p in model.parameters() if p.grad is not None])
        return loss

    if case.style == "batch":
        return opt.step(batch=(X, y))
    if case.style == "closure":
        return opt.step(closure)
    closure()
    return opt.step()


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [(k, v.clone() if torch.is_tensor(v) else v) for st in opt.state.values()
             for k, v in sorted(st.items()) if torch.is_tensor(v)]
    return params, state


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True)) and len(sa) == len(sb)
            and all(ka == kb and torch.equal(x, y) for (ka, x), (kb, y) in zip(sa, sb,
                                                                             strict=True)))


@pytest.fixture(params=sorted(CASES))
def name(request):
    return request.param


def test_exact_resume_through_torch_save_weights_only(name):
    case = CASES[name]
    model = _model()
    opt = case.make(model)
    for k in range(3):
        _step(case, model, opt, *_batch(k))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for k in range(3, 6):
        _step(case, model, opt, *_batch(k))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _model(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = case.make(model2)
    opt2.load_state_dict(ckpt["opt"])
    for k in range(3, 6):
        _step(case, model2, opt2, *_batch(k))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_distributed_checkpoint_state_dict_round_trip(name):
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    case = CASES[name]
    model = _model()
    opt = case.make(model)
    for k in range(3):
        _step(case, model, opt, *_batch(k))
    sd = get_optimizer_state_dict(model, opt)
    assert sd["state"], "the optimizer state must be visible to torch's tooling"
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = case.make(model2)
    set_optimizer_state_dict(model2, opt2, sd)
    for k in range(3, 5):
        _step(case, model, opt, *_batch(k))
        _step(case, model2, opt2, *_batch(k))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_add_param_group(name):
    case = CASES[name]
    model = _model()
    if not case.add_param_group:
        opt = case.make(model)
        with pytest.raises((ValueError, TypeError, NotImplementedError)):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
        return
    opt = case.make(model, params=list(model[0].parameters()))
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 1e-3})
    before = [p.detach().clone() for p in model.parameters()]
    for k in range(2):
        _step(case, model, opt, *_batch(k))
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_parameters_without_gradients_are_left_alone(name):
    case = CASES[name]
    model = _model()
    frozen = model[2].bias
    frozen.requires_grad_(False)
    opt = case.make(model)
    before = frozen.detach().clone()
    for k in range(3):
        _step(case, model, opt, *_batch(k))
    assert torch.equal(frozen, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_scheduler(name):
    case = CASES[name]
    model = _model()
    opt = case.make(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    for k in range(2):
        _step(case, model, opt, *_batch(k))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_bad_gradients_skip_with_everything_unchanged_or_raise(name, bad):
    case = CASES[name]
    if not case.gradient_rule:
        pytest.skip("computes its own gradient from the closure / batch (tested below)")
    value = {"nan": math.nan, "inf": math.inf, "huge": 1e25}[bad]

    def corrupt(grads):
        grads[0].view(-1)[0] = value

    model = _model()
    opt = case.make(model)
    for k in range(2):
        _step(case, model, opt, *_batch(k))
    before = _snapshot(model, opt)
    skipped = opt.stats()["skipped_steps"]
    _step(case, model, opt, *_batch(5), corrupt=corrupt)
    assert _same(before, _snapshot(model, opt))
    assert opt.stats()["skipped_steps"] == skipped + 1
    _step(case, model, opt, *_batch(6))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    raising = case.make(model, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        _step(case, model, raising, *_batch(5), corrupt=corrupt)


def test_nonfinite_loss_skips_closure_optimizers(name):
    case = CASES[name]
    if case.gradient_rule or name == "lbfgs":
        pytest.skip("covered by the gradient rule / LBFGS tests")
    model = _model()
    opt = case.make(model)
    _step(case, model, opt, *_batch(0))
    before = _snapshot(model, opt)
    X, y = _batch(1)
    X[0, 0] = math.nan
    _step(case, model, opt, X, y)
    assert _same(before, _snapshot(model, opt))
    assert opt.stats()["skipped_steps"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_parameter_dtypes(name, dtype):
    case = CASES[name]
    if name in ("natural_gradient", "hessian_free", "lbfgs") and dtype in (torch.float16,
                                                                         torch.bfloat16):
        pytest.skip("Krylov / line-search methods need float32 or float64 parameters")
    model = _model(dtype=dtype)
    opt = case.make(model)
    before = [p.detach().clone() for p in model.parameters()]
    for k in range(4):
        _step(case, model, opt, *_batch(k, dtype))
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert opt.stats()["skipped_steps"] == 0


def test_duplicate_parameters_refused(name):
    case = CASES[name]
    model = _model()
    w = model[0].weight
    with pytest.raises(ValueError, match="twice"):
        case.make(model, params=[w, w, *model[2].parameters()])


def test_state_dict_of_another_model_refused_at_load(name):
    case = CASES[name]
    model = _model()
    opt = case.make(model)
    for k in range(2):
        _step(case, model, opt, *_batch(k))
    other = _model(hidden=5)
    opt_other = case.make(other)
    with pytest.raises(ValueError, match="load_state_dict"):
        opt_other.load_state_dict(opt.state_dict())


def test_invalid_hyperparameters_refused_with_their_name(name):
    case = CASES[name]
    for kwargs, word in case.invalid:
        with pytest.raises(ValueError, match=word):
            case.make(_model(), **kwargs)


def test_stats_keys(name):
    case = CASES[name]
    model = _model()
    opt = case.make(model)
    _step(case, model, opt, *_batch(0))
    s = opt.stats()
    assert set(STATS_KEYS) <= set(s)
    assert s["steps"] == 1 and s["state_bytes"] > 0


def test_kronecker_adagrad_example_takes_the_shampoo_step():
    """The block-interface example composes as documented: statistics, then the refresh
    due at step 1, then the preconditioned direction (L + eps)^-1/4 G (R + eps)^-1/4."""
    torch.manual_seed(0)
    W = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    G = torch.randn(5, 3, dtype=torch.float64)
    opt = KroneckerAdaGrad([W], lr=0.1, eps=1e-3, precondition_frequency=1)
    before = W.detach().clone()
    W.grad = G.clone()
    opt.step()

    def root(A):
        w, Q = torch.linalg.eigh(A + 1e-3 * torch.eye(A.shape[0], dtype=A.dtype))
        return Q @ torch.diag(w ** -0.25) @ Q.T

    expected = before - 0.1 * root(G @ G.T) @ G @ root(G.T @ G)
    torch.testing.assert_close(W.detach(), expected, rtol=1e-10, atol=1e-12)
