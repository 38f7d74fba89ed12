"""Each optimizer's stability model (the monitor protocol) against the step it takes.

On a step with no refresh the update is ``-lr P^{-1} m`` (``m`` the momentum the step
used, ``P`` the preconditioner with the bias corrections folded in); applying the
model's ``P^{-1/2}`` twice to ``m`` must give exactly that update.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics.stability import stability_model
from curvlab.optim import KFAC, SOAP, Muon, Shampoo


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()


def _model(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(),
                         nn.Linear(5, 3, bias=bias)).double()


class _Wrapper:  # a framework wrapper (accelerate's AcceleratedOptimizer holds .optimizer)
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _twice(model_rule, p, x):
    f = model_rule.inv_sqrt_preconditioner
    return f(p, f(p, x))


@pytest.mark.parametrize("name", ["soap", "soap_two_groups", "shampoo_diagonal", "muon_adam",
                                  "normuon_adam"])
def test_inverse_sqrt_preconditioner_reproduces_the_step(name):
    model = _model()
    if name.startswith("soap"):
        params = ([{"params": [p for p in model.parameters() if p.ndim > 1]},
                   {"params": [p for p in model.parameters() if p.ndim == 1]}]
                  if name == "soap_two_groups" else model.parameters())
        opt = SOAP(params, lr=0.01, precondition_frequency=3)
        moment = "m"
        steps = 4  # refreshes at 1 and 4 happen after the update; step 5 uses the basis
    elif name == "shampoo_diagonal":
        opt = Shampoo(model.parameters(), lr=0.01, precondition_frequency=100)
        moment = "m"
        steps = 3
    else:
        opt = Muon(model.parameters(), lr=0.01,  # NorMuon's state must not confuse it
                   normalize="neuron" if name == "normuon_adam" else None)
        moment = "exp_avg"
        steps = 3
    _train(model, opt, steps)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, seed=7)
    rule = stability_model(_Wrapper(opt))
    assert rule.threshold == pytest.approx(
        2 * (1 + opt.param_groups[0].get("betas", (0.9,))[0])
        / (1 - opt.param_groups[0].get("betas", (0.9,))[0]))
    for p, b in zip(model.parameters(), before, strict=True):
        if not name.startswith("soap") and p.ndim > 1:  # Shampoo blocks, Muon matrices
            continue
        m = opt.state[p][moment]
        expected = -(p.detach() - b) / opt.param_groups[0]["lr"]
        torch.testing.assert_close(_twice(rule, p, m), expected, rtol=1e-9, atol=1e-12)


def test_muon_matrices_are_not_governed():
    model = _model()
    opt = Muon(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    rule = stability_model(opt)
    w = model[0].weight
    assert torch.equal(rule.inv_sqrt_preconditioner(w, torch.ones_like(w)), torch.zeros_like(w))
    assert rule.name == "muon" and rule.threshold == pytest.approx(38.0)
    only_matrices = Muon([model[0].weight], lr=0.01)
    assert stability_model(only_matrices).threshold == math.inf


def test_kfac_rule_reproduces_its_step():
    model = _model(bias=False)
    opt = KFAC(model, lr=0.05, damping=0.1, momentum=0.0, kl_clip=None,
               precondition_frequency=2)
    _train(model, opt, 3)  # inverses at steps 1 and 3 (k = 0, 2): step 4 uses step 3's
    before = [p.detach().clone() for p in model.parameters()]
    rule = stability_model(opt)
    assert rule.threshold == pytest.approx(2.0)  # momentum 0: gradient descent's
    g = torch.Generator().manual_seed(7)
    opt.zero_grad()
    model(torch.randn(16, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    rule = stability_model(opt)
    for p, b, gr in zip(model.parameters(), before, grads, strict=True):
        expected = -(p.detach() - b) / 0.05
        torch.testing.assert_close(_twice(rule, p, gr), expected, rtol=1e-8, atol=1e-12)
    with_momentum = KFAC(_model(), momentum=0.5)
    assert stability_model(with_momentum).threshold == pytest.approx(3.0)


def test_optimizers_without_a_stated_rule_get_the_documented_fallback():
    """NaturalGradient (a fixed-lr step through a CG solve with the batch Fisher: P is not
    available per parameter), HessianFree with lr > 1 and K-FAC with the plain inverse
    inherit the base's undeclared stability_model: a monitor must fall back (with a
    warning), not crash at construction."""
    from curvlab.optim import HessianFree, NaturalGradient

    model = _model()
    for opt in (NaturalGradient(model), HessianFree(model, nn.MSELoss(), lr=2.0),
                KFAC(_model(), inverse_method="inverse")):
        with pytest.warns(UserWarning, match="does not know the stability rule"):
            import curvlab.diagnostics.stability as st
            st._warned_unknown.discard(type(opt).__name__)
            rule = stability_model(opt)
        assert rule.threshold == 2.0 and "unknown optimizer" in rule.note


def test_line_search_optimizers_state_no_curvature_bound():
    """LBFGS and HessianFree (one lr <= 1) accept a step only if it passes a
    sufficient-decrease test, so lr x sharpness says nothing about divergence: the
    gradient-descent fallback judged HessianFree at lr 1 unstable as soon as the
    sharpness exceeded 2 (false warnings on every healthy run)."""
    import warnings

    from curvlab.optim import LBFGS, HessianFree

    model = _model()
    for opt in (LBFGS(model.parameters()), HessianFree(model, nn.MSELoss())):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rule = stability_model(opt)
        assert rule.name == "line_search" and rule.threshold == math.inf
        assert not rule.preconditioned


@pytest.mark.parametrize("make", [
    lambda ps: Shampoo(ps, lr=0.01, grafting="adam", precondition_frequency=2),
    lambda ps: SOAP(ps, lr=0.01, precondition_frequency=2),
    lambda ps: Muon(ps, lr=0.01),
])
def test_coordinates_that_never_got_a_gradient_are_not_governed(make):
    """A coordinate whose gradient is always exactly 0 (a conv bias before BatchNorm) has
    second moment 0; its P^-1/2 was 1/sqrt(eps) (~1e4 for Adam's 1e-8), so the Hessian's
    rounding noise there dominated the preconditioned sharpness (ratios ~1e5 x the
    threshold on a healthy CNN). Those coordinates never move: P^-1/2 = 0 there."""
    model = _model()
    opt = make(model.parameters())
    bias = model[0].bias
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
        bias.grad[:2] = 0.0  # two coordinates never receive a gradient
        opt.step()
    out = stability_model(opt).inv_sqrt_preconditioner(bias, torch.ones_like(bias))
    assert torch.equal(out[:2], torch.zeros(2, dtype=out.dtype))
    assert bool((out[2:] > 0).all()) and bool(torch.isfinite(out).all())
