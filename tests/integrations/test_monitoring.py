"""Pieces the framework callbacks share, and curvlab's optional-dependency rule."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from curvlab.diagnostics import CurvatureMonitor
from curvlab.integrations import build_optimizer
from curvlab.integrations._monitoring import first_examples


def test_import_curvlab_needs_neither_transformers_nor_lightning():
    code = ("import sys, curvlab, curvlab.optim, curvlab.diagnostics, curvlab.integrations; "
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Wrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer (what the HF Trainer hands its callbacks):
    an Optimizer delegating to the one in ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_monitor_sees_through_optimizer_wrappers():
    """The monitor must still recognize Adam inside a wrapper and warn on its
    preconditioned sharpness (threshold 38)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    wrapped = _Wrapper(_Wrapper(adam))
    X, y = torch.randn(8, 3), torch.randn(8, 1)
    mon = CurvatureMonitor(model, nn.MSELoss(), (X, y), optimizer=wrapped, every=1)
    assert mon.thresholds == {"lr_preconditioned_sharpness": pytest.approx(38.0)}
    nn.MSELoss()(model(X), y).backward()
    wrapped.step()
    mon.step()
    assert "preconditioned_sharpness" in mon.checks[0]


def test_first_examples_collates_without_touching_the_random_state():
    data = [(torch.tensor([float(i)]), torch.tensor(i)) for i in range(10)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    state = torch.get_rng_state()
    X, y = first_examples(loader, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert X.tolist() == [[0.0], [1.0], [2.0]] and y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="batch="):
        first_examples(object(), 3)


def test_build_optimizer_weight_decay_only_on_matrices_and_ties_once():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 5))
    model[2].weight = model[0].weight  # tied head
    opt = build_optimizer(model, "soap", lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [2]  # the tied matrix, once
    assert sorted(p.ndim for p in no_decay["params"]) == [1, 1, 1]
    with pytest.raises(ValueError, match="closure"):
        build_optimizer(model, "HessianFree", lr=1.0)


def test_first_examples_keeps_a_random_collator_off_the_training_stream():
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4,
                                         collate_fn=lambda xs: torch.rand(len(xs)))
    state = torch.get_rng_state()
    assert first_examples(loader, 3).shape == (3,)
    assert torch.equal(torch.get_rng_state(), state)


def test_make_monitor_refuses_an_unusable_batch_before_training():
    from curvlab.integrations._monitoring import make_monitor

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((TypeError, ValueError)):
        make_monitor(model, nn.MSELoss(), "not a batch", opt, 0, {}, lambda *a: None)


def test_monitor_context_keeps_the_monitor_off_the_training_random_stream():
    from curvlab.integrations._monitoring import monitor_context

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = torch.get_rng_state()
    with monitor_context(opt, model):
        torch.rand(3)  # e.g. an Objective drawing its dropout seed
    assert torch.equal(torch.get_rng_state(), state)
