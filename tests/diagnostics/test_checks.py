"""Finite-difference gradient / HVP checks: they pass on correct derivatives and catch
wrong ones, for tensor functions and for model + loss + data, in float64 and float32."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.diagnostics import CheckResult, gradient_check, hvp_check
from curvlab.objective import Objective


def f(z):
    flat = z.reshape(-1)
    return (torch.sin(z) ** 2).sum() + (z**4).sum() / 5 + flat[0] * flat[-1]


class WrongGradSquare(torch.autograd.Function):
    """x^2 with a 10% wrong backward (old-style Function: no setup_context)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.2 * x * g


class DetachedBackwardCube(torch.autograd.Function):
    """x^3 with a correct gradient whose backward is not differentiable (HVP = 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x.detach() ** 2 * g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_correct_derivatives_pass(dtype, mode):
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    r = gradient_check(f, x, mode=mode)
    assert isinstance(r, CheckResult) and r.passed and bool(r)
    assert r.rel_error < (1e-8 if dtype == torch.float64 else 1e-3)
    assert r.num_evals == (2 if mode == "directional" else 28)
    h = hvp_check(f, x, mode=mode)
    assert h.passed and h.rel_error < (1e-8 if dtype == torch.float64 else 1e-3)
    assert r.step == pytest.approx(torch.finfo(dtype).eps ** (1 / 3) * float(x.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_wrong_derivatives_fail(dtype, mode):
    x = torch.randn(5, generator=torch.Generator().manual_seed(1)).to(dtype)
    r = gradient_check(lambda z: WrongGradSquare.apply(z).sum(), x, mode=mode)
    assert not r.passed and r.rel_error > 0.05
    cube = lambda z: DetachedBackwardCube.apply(z).sum()  # noqa: E731
    assert gradient_check(cube, x, mode=mode).passed
    h = hvp_check(cube, x, mode=mode)
    assert not h.passed and h.rel_error > 0.5
    # a user-supplied derivative is checked instead of autograd's
    assert not gradient_check(f, x, mode=mode, grad_fn=lambda z: 2 * z).passed
    hand = hvp_check(cube, x, mode=mode, product_fn=lambda z, v: 6 * z * v)
    assert hand.passed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_loss_data_and_objective(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    X, y = torch.randn(10, 3, dtype=dtype), torch.randint(0, 2, (10,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss_fn = nn.CrossEntropyLoss()
    for mode in ("directional", "full"):
        assert gradient_check(model, loss_fn=loss_fn, data=data, mode=mode).passed
        assert hvp_check(model, loss_fn=loss_fn, data=data, mode=mode).passed
    obj = Objective(model, loss_fn, data, params=model[2])
    r = gradient_check(obj, mode="full")
    assert r.passed and r.num_evals == 2 * obj.num_params
    # at another point than the current parameters
    x = obj.flatten(obj.param_tensors()) + 0.1
    assert hvp_check(obj, x).passed
    # a hand-written gradient that ignores the second batch is caught
    first = Objective(model, loss_fn, data[0], params=model[2])
    assert not gradient_check(obj, mode="full", grad_fn=lambda t: first.flat_grad(
        first.unflatten(t))).passed


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), scale=st.floats(0.1, 3.0))
def test_property_correct_passes_and_perturbed_fails(n, seed, scale):
    x = scale * torch.randn(n, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
    g = lambda z: torch.exp(0.3 * z).sum() + (z**2).sum()  # noqa: E731
    assert gradient_check(g, x, mode="full").passed
    assert hvp_check(g, x, mode="full").passed
    true_grad = lambda z: 0.3 * torch.exp(0.3 * z) + 2 * z  # noqa: E731
    assert gradient_check(g, x, mode="full", grad_fn=true_grad).passed
    bad = lambda z: true_grad(z) * 1.01  # noqa: E731
    assert not gradient_check(g, x, mode="full", grad_fn=bad).passed


def test_bad_input():
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        gradient_check(f, x, mode="partial")
    with pytest.raises(TypeError, match="floating-point tensor"):
        gradient_check(f, [1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        gradient_check(lambda z: z * 2, x)
    with pytest.raises(ValueError, match="direction"):
        hvp_check(f, x, direction=torch.zeros(3))
    with pytest.raises(TypeError, match="callable"):
        gradient_check(3, x)
    with pytest.raises(ValueError, match="positive"):
        gradient_check(f, x, step=0.0)
