"""Autodiff primitives against dense float64 ground truth."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvlab
from curvlab.autodiff import HVP_MODES

D = torch.float64




def _problem(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=D)
    A = A @ A.T

    def f(x):
        return 0.5 * x @ A @ x + torch.sin(x).sum() + (x**4).sum() / 12

    x = torch.randn(n, generator=g, dtype=D)
    H = A - torch.diag(torch.sin(x)) + torch.diag(x**2)
    return f, x, H, g


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       mode=st.sampled_from(HVP_MODES))
def test_hvp_matches_dense_hessian(n, k, seed, mode):
    f, x, H, g = _problem(n, seed)
    v = torch.randn(n, generator=g, dtype=D)
    V = torch.randn(k, n, generator=g, dtype=D)
    torch.testing.assert_close(curvlab.hvp(f, x, v, mode=mode), H @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(curvlab.hvp(f, x, V, batched=True, mode=mode), V @ H.T,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(curvlab.hessian(f, x), H, rtol=1e-10, atol=1e-10)


def test_hvp_on_parameter_dict_and_linear_function():
    f, x, H, g = _problem(5, 0)
    b = torch.randn(3, generator=g, dtype=D)
    fd = lambda p: f(p["a"]) + (p["b"] ** 3).sum()  # noqa: E731
    v = {"a": torch.randn(5, generator=g, dtype=D), "b": torch.ones(3, dtype=D)}
    out = curvlab.hvp(fd, {"a": x, "b": b}, v)
    torch.testing.assert_close(out["a"], H @ v["a"])
    torch.testing.assert_close(out["b"], 6 * b)
    assert torch.equal(curvlab.hvp(lambda z: 2 * z.sum(), x, v["a"]), torch.zeros(5, dtype=D))


def test_hvp_fn_reuses_graph_and_returns_gradient():
    f, x, H, g = _problem(6, 1)
    val, grad, product = curvlab.hvp_fn(f, x)
    torch.testing.assert_close(val, f(x))
    torch.testing.assert_close(grad, curvlab.grad(f, x))
    for _ in range(3):
        v = torch.randn(6, generator=g, dtype=D)
        torch.testing.assert_close(product(v), H @ v)


def test_jvp_vjp_jacobian_gnvp():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(7, 4, generator=g, dtype=D)
    net = lambda x: torch.tanh(W @ x)  # noqa: E731
    x, v, u = torch.randn(4, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D), torch.randn(7, generator=g, dtype=D)
    J = torch.autograd.functional.jacobian(net, x)
    for mode in ("auto", "forward", "reverse"):
        torch.testing.assert_close(curvlab.jacobian(net, x, mode=mode), J)
    torch.testing.assert_close(curvlab.jvp(net, x, v)[1], J @ v)
    torch.testing.assert_close(curvlab.vjp(net, x, u)[1], J.T @ u)
    loss = lambda o: (o**2).sum() + o.prod()  # noqa: E731
    HL = torch.autograd.functional.hessian(loss, net(x))
    torch.testing.assert_close(curvlab.gnvp(net, loss, x, v), J.T @ HL @ J @ v)
    V = torch.randn(3, 4, generator=g, dtype=D)
    torch.testing.assert_close(curvlab.gnvp(net, loss, x, V, batched=True), V @ (J.T @ HL @ J).T)


def test_bad_input_gets_clear_errors():
    f, x, _, _ = _problem(3, 0)
    with pytest.raises(ValueError, match="scalar"):
        curvlab.hvp(lambda z: z * 2, x, x)
    with pytest.raises(TypeError, match="dtype"):
        curvlab.hvp(f, x, x.float())
    with pytest.raises(ValueError, match="shape"):
        curvlab.hvp(f, x, torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="mode"):
        curvlab.hvp(f, x, x, mode="magic")
