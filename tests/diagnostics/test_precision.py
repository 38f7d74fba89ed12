"""precision_check: error scales per dtype, unstable layers flagged, nothing modified."""

import copy

import pytest
import torch
from torch import nn

from curvlab.diagnostics.precision import precision_check


class NaiveSoftmax(nn.Module):
    """Softmax without max subtraction: exp overflows for logits above ~88."""

    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True)


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g)


def test_error_levels_match_dtype_and_nothing_changes():
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn(model(X), y).backward()
    opt.step()
    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters()]

    report = precision_check(model, loss_fn, (X, y), optimizer=opt)

    f32, bf16 = report.reports["float32"], report.reports["bfloat16"]
    assert 1e-9 < f32.loss_error < 1e-5 and 1e-9 < f32.grad_error < 1e-5
    assert 1e-4 < bf16.loss_error < 5e-2 and 1e-4 < bf16.grad_error < 5e-2
    assert f32.update_error < 1e-4 and bf16.update_error > f32.update_error
    assert not f32.flagged and not bf16.flagged
    assert set(report.matmul_precision) >= {"float32_matmul_precision"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k])
    for p, g in zip(model.parameters(), grads_before):
        assert torch.equal(p.grad, g)
    after = opt.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    for idx, st in opt_before["state"].items():
        for key, val in st.items():
            assert torch.equal(after["state"][idx][key], val)


def test_unstable_layer_is_the_worst_and_flagged_in_bf16_not_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10), Scale(300.0),
                          NaiveSoftmax())
    X, y = _data()

    def nll(p, t):
        return -torch.log(p[torch.arange(len(t)), t] + 1e-30).mean()

    report = precision_check(model, nll, (X, y), dtypes=("bfloat16", "float64"))
    bf16, f64 = report.reports["bfloat16"], report.reports["float64"]
    assert bf16.worst_layer.name == "4" and "4" in bf16.flagged
    assert bf16.flagged == ["4"]
    assert f64.flagged == [] and f64.loss_error == 0.0


def test_autocast_mode_and_bad_input():
    model, (X, y) = _mlp(), _data()
    report = precision_check(model, nn.CrossEntropyLoss(), (X, y), dtypes=("bfloat16",),
                             mode="autocast")
    assert report.reports["bfloat16"].mode == "autocast"
    assert 0 < report.reports["bfloat16"].grad_error < 5e-2
    with pytest.raises(ValueError, match="dtypes"):
        precision_check(model, nn.CrossEntropyLoss(), (X, y), dtypes=("int8",))
    with pytest.raises(ValueError, match="mode"):
        precision_check(model, nn.CrossEntropyLoss(), (X, y), mode="fp8")


def test_train_mode_dropout_draws_the_same_masks_in_every_dtype():
    """In train mode each dtype's run drew its own Dropout masks: the float32 gradient was
    "54% off" float64 (a tiny GPT-2), and each Dropout layer, run alone with a new mask,
    was flagged at ~4e6 rounding units. Every run and every layer-alone call now draws the
    same numbers, so train mode measures rounding as eval mode does; the caller's random
    state is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 64),
                          nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 10)).train()
    X, y = _data()
    state = torch.get_rng_state()
    report = precision_check(model, nn.CrossEntropyLoss(), (X, y))
    assert torch.equal(torch.get_rng_state(), state)
    f32, bf16 = report.reports["float32"], report.reports["bfloat16"]
    assert 1e-9 < f32.grad_error < 1e-5 and 1e-4 < bf16.grad_error < 5e-2
    assert not f32.flagged and not bf16.flagged
    for layer in f32.layers:
        if layer.name in ("2", "5"):  # the Dropout layers: exact in float32
            assert layer.local_error < 1e-6
