"""The evaluator's gradient and Hessian-vector products against ``torch.autograd`` and
closed forms, on the engine fast path and on the public fallback."""

import pytest
import torch

from curvlab.minimize.evaluator import Evaluator, _grad


def _cubic(x):
    return (x ** 3).sum() + x[0] * x[1]


def _closed_form(x):
    g = 3 * x ** 2
    g[0] += x[1]
    g[1] += x[0]
    H = torch.diag(6 * x)
    H[0, 1] = H[1, 0] = 1.0
    return g, H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_matches_autograd_and_closed_form(dtype):
    x = torch.tensor([0.5, -1.5, 2.0], dtype=dtype, requires_grad=True)
    y = _cubic(x)
    one = torch.ones((), dtype=dtype)
    g = _grad(y, x, one, retain_graph=True, create_graph=True)
    (ref,) = torch.autograd.grad(y, x, one, create_graph=True)
    g_cf, H_cf = _closed_form(x.detach())
    torch.testing.assert_close(g.detach(), ref.detach())
    torch.testing.assert_close(g.detach(), g_cf)
    assert g.requires_grad  # the graph is recorded for the products
    for v in torch.eye(3, dtype=dtype):
        torch.testing.assert_close(_grad(g, x, v, retain_graph=True), H_cf @ v)


def test_grad_unused_input_and_fallbacks():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    z = torch.ones(2, dtype=torch.float64, requires_grad=True)
    y = (x ** 2).sum()
    one = torch.ones((), dtype=torch.float64)
    assert _grad(y, z, one, retain_graph=True) is None
    g = _grad(y, x, one, retain_graph=True, create_graph=True)
    # a grad-output of the wrong shape takes the public path and its error
    with pytest.raises(RuntimeError, match="shape"):
        _grad(g, x, torch.ones(3, dtype=torch.float64), retain_graph=True)
    # a tensor subclass takes the public path too
    class Sub(torch.Tensor):
        pass

    v = torch.tensor([1.0, 0.0], dtype=torch.float64).as_subclass(Sub)
    torch.testing.assert_close(torch.as_tensor(_grad(g, x, v, retain_graph=True)),
                               torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_evaluator_products_and_counts():
    x = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    ev = Evaluator(_cubic, x.shape)
    f, g, product = ev.fgh(x)
    g_cf, H_cf = _closed_form(x)
    assert float(f) == pytest.approx(float(_cubic(x)))
    torch.testing.assert_close(g, g_cf)
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(product(v), H_cf @ v)
    torch.testing.assert_close(ev.hess(x, product), H_cf)
    assert (ev.nfev, ev.ngev, ev.nhvp, ev.nhess) == (1, 1, 1, 1)
    f2, g2 = ev.fg(x)
    torch.testing.assert_close(g2, g_cf)
    assert (ev.nfev, ev.ngev) == (2, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_grad_matches_is_grads_batched(dtype):
    """The direct batched backward equals ``autograd.grad(..., is_grads_batched=True)`` and
    the closed-form Hessian; other shapes and unused inputs take the public path."""
    from curvlab.minimize.evaluator import _batched_grad

    x = torch.tensor([0.5, -1.5, 2.0], dtype=dtype, requires_grad=True)
    g = _grad(_cubic(x), x, torch.ones((), dtype=dtype), retain_graph=True,
              create_graph=True)
    V = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=dtype)
    (ref,) = torch.autograd.grad(g, x, V, retain_graph=True, is_grads_batched=True)
    H_cf = _closed_form(x.detach())[1]
    torch.testing.assert_close(_batched_grad(g, x, V), ref)
    torch.testing.assert_close(_batched_grad(g, x, V), V @ H_cf)
    assert _batched_grad(g, torch.ones(3, dtype=dtype, requires_grad=True), V) is None
    with pytest.raises(RuntimeError):
        _batched_grad(g, x, torch.ones(2, 4, dtype=dtype))
    # the batching mode is left even after an error: plain autograd still works
    torch.testing.assert_close(_grad(g, x, V[0], retain_graph=True), H_cf @ V[0])


# --- the fast path's self-check and its switch -------------------------------------------

import logging  # noqa: E402

import curvlab.minimize.evaluator as evmod  # noqa: E402
from curvlab.minimize import minimize  # noqa: E402


@pytest.fixture
def rearmed(monkeypatch):
    """A fresh self-check for the test; the process state is restored afterwards."""
    evmod.set_fast_autograd(True)
    yield monkeypatch
    monkeypatch.undo()
    evmod.set_fast_autograd(None)


def _rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _counting(fn, calls, shift=0.0, fail=False):
    def run(*args):
        calls.append(1)
        if fail:
            raise RuntimeError("private API changed")
        out = fn(*args)
        return tuple(None if o is None else o + shift for o in out)
    return run


@pytest.mark.parametrize("broken", ["wrong", "raises"])
@pytest.mark.parametrize("method", ["lbfgs", "trust-exact"])
def test_broken_fast_path_falls_back_to_autograd(rearmed, caplog, broken, method):
    # the private engine entry point returns a wrong gradient, whose zero is elsewhere (or
    # raises): the first use
    # checks it against torch.autograd.grad, logs once and never uses it again
    calls = []
    rearmed.setattr(evmod, "_RUN_BACKWARD", _counting(
        evmod._RUN_BACKWARD, calls, shift=0.5, fail=broken == "raises"))
    x0 = torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="curvlab.minimize.evaluator"):
        for _ in range(2):
            res = minimize(_rosen, x0, method)
            assert res.success, res.message
            torch.testing.assert_close(res.x, torch.ones(3, dtype=torch.float64), atol=1e-5,
                                       rtol=0)
    assert not evmod.fast_autograd_enabled("grad")
    warnings = [r for r in caplog.records if "fast path" in r.getMessage()]
    kinds = 2 if method == "trust-exact" else 1  # the batched kind checks itself too
    assert len(warnings) == kinds and len(calls) == kinds


def test_fast_path_is_used_once_it_agrees(rearmed):
    calls = []
    rearmed.setattr(evmod, "_RUN_BACKWARD", _counting(evmod._RUN_BACKWARD, calls))
    res = minimize(_rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), "lbfgs")
    assert res.success and evmod.fast_autograd_enabled("grad")
    assert len(calls) == res.ngev  # every gradient went through the engine entry point


def test_switch_off_uses_the_public_api(rearmed):
    calls = []
    rearmed.setattr(evmod, "_RUN_BACKWARD", _counting(evmod._RUN_BACKWARD, calls))
    rearmed.setenv("CURVLAB_FAST_AUTOGRAD", "0")
    evmod.set_fast_autograd(None)  # re-reads the environment
    assert not evmod.fast_autograd_enabled("grad")
    for method in ("lbfgs", "trust-exact"):
        res = minimize(_rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), method)
        assert res.success
    assert calls == []
    evmod.set_fast_autograd(True)
    assert evmod.fast_autograd_enabled("grad")
