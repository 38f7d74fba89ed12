"""Checkpoints written before the optimizer contract still load and resume.

``data/pre_contract_checkpoints.pt`` was written by commit 7c843f0 (the layout before
:mod:`curvlab.optim.base`): Shampoo and SOAP with their state under ``"preconditioner"``,
K-FAC / NaturalGradient / HessianFree with optimizer-wide state under a string key of
``state``, and the old setting names (``epsilon``, ``adamw_betas``, ``inv_update_freq``).
Each entry holds a model and optimizer checkpoint after 3 steps and the parameters that
code reached 3 steps later; the current code must resume to the same parameters (to
rounding: SOAP now adds Adam's eps after the bias correction, as torch's Adam does).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab.optim import KFAC, SOAP, HessianFree, Muon, NaturalGradient, Shampoo

DATA = Path(__file__).parent / "data" / "pre_contract_checkpoints.pt"
LOSS = nn.CrossEntropyLoss()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 6, generator=g).double(), torch.randint(0, 3, (16,), generator=g)


MAKE = {  # today's names for the settings the checkpoints were written with
    "shampoo": (lambda m: Shampoo(m.parameters(), lr=1e-2, precondition_frequency=2,
                                  start_preconditioning_step=1, eps=1e-10), "backward"),
    "soap": (lambda m: SOAP(m.parameters(), lr=1e-2, precondition_frequency=2), "backward"),
    "muon": (lambda m: Muon(m.parameters(), lr=1e-2, adam={"betas": (0.9, 0.99)}), "backward"),
    "kfac": (lambda m: KFAC(m, lr=0.05, damping=0.05, precondition_frequency=2), "backward"),
    "natural_gradient": (lambda m: NaturalGradient(m, lr=0.5, damping=0.1, loss_fn=LOSS,
                                                   kl_clip=None), "closure"),  # (no clip then)
    # the defaults of 7c843f0 (they changed for time budgets: bench_hessian_free_autoencoders)
    "hessian_free": (lambda m: HessianFree(m, LOSS, damping=1.0, cg_max_iter=250,
                                           adaptive_cg_budget=False,
                                           preconditioner="martens",
                                           curvature_batch_size=None,
                                           damping_factors=(1.5, 2 / 3)), "batch"),
}


def _step(style, m, opt, X, y):
    def closure():
        opt.zero_grad()
        loss = LOSS(m(X), y)
        loss.backward()
        return loss

    if style == "batch":
        return opt.step(batch=(X, y))
    if style == "closure":
        return opt.step(closure)
    closure()
    return opt.step()


@pytest.mark.parametrize("name", sorted(MAKE))
def test_pre_contract_checkpoint_resumes(name):
    saved = torch.load(DATA, weights_only=True)[name]
    make, style = MAKE[name]
    model = _model()
    model.load_state_dict(saved["model"])
    opt = make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted silently: no deprecation noise
        opt.load_state_dict(saved["opt"])
    for k in range(3, 6):
        _step(style, model, opt, *_batch(k))
    # SOAP: eps now after the bias correction (a relative change of ~eps / sqrt(v))
    tol = dict(rtol=1e-5, atol=1e-7) if name == "soap" else dict(rtol=1e-7, atol=1e-9)
    for p, q in zip(model.parameters(), saved["after"], strict=True):
        torch.testing.assert_close(p.detach(), q, **tol)
    # and the converted state is in today's layout: it round-trips as usual
    opt.load_state_dict(opt.state_dict())
