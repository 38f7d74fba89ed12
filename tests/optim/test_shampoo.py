"""Shampoo against a hand-computed float64 textbook update; blocking; options."""

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.optim import Shampoo


def _root(A, p):
    w, Q = np.linalg.eigh(A)
    return (Q * w ** (-1.0 / p)) @ Q.T


def _two_layer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))
    X = torch.randn(16, 3, dtype=torch.float64)
    Y = torch.randn(16, 2, dtype=torch.float64)
    return model.double(), X, Y


def _hand_grads(W1, W2, X, Y):
    """Gradients of mean squared error of W2 tanh(W1 x), derived by hand."""
    H = np.tanh(X @ W1.T)                    # (N, 4)
    E = H @ W2.T - Y                         # (N, 2)
    n = E.size
    gW2 = 2.0 / n * E.T @ H
    gH = 2.0 / n * E @ W2 * (1 - H**2)
    gW1 = gH.T @ X
    return gW1, gW2


def test_textbook_shampoo_on_two_layer_model():
    """L_t = eps I + sum G G^T, R_t likewise, W <- W - lr L^{-1/4} G R^{-1/4} (Gupta et al.)."""
    model, X, Y = _two_layer()
    lr, eps, steps = 0.1, 1e-4, 6
    opt = Shampoo(model.parameters(), lr=lr, betas=(0.0, 1.0), eps=eps, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1)
    Ws = [model[0].weight.detach().numpy().copy(), model[2].weight.detach().numpy().copy()]
    Ls = [np.zeros((W.shape[0],) * 2) for W in Ws]
    Rs = [np.zeros((W.shape[1],) * 2) for W in Ws]
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()
        grads = _hand_grads(Ws[0], Ws[1], X.numpy(), Y.numpy())
        for i, G in enumerate(grads):
            Ls[i] += G @ G.T
            Rs[i] += G.T @ G
            L = _root(Ls[i] + eps * np.eye(len(Ls[i])), 4)
            R = _root(Rs[i] + eps * np.eye(len(Rs[i])), 4)
            Ws[i] = Ws[i] - lr * L @ G @ R
    np.testing.assert_allclose(model[0].weight.detach().numpy(), Ws[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model[2].weight.detach().numpy(), Ws[1], rtol=1e-9, atol=1e-12)


def test_blocked_shampoo_preconditions_each_block_separately():
    """A 6x4 weight with max_preconditioner_dim=3 is two 3x4 blocks with their own factors."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, betas=(0.0, 1.0), eps=1e-3, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1,
                  max_preconditioner_dim=4)
    G = torch.randn(6, 4, dtype=torch.float64)
    W0 = W.detach().clone()
    W.grad = G.clone()
    opt.step()
    expected = []
    for Gb in (G[:4].numpy(), G[4:].numpy()):
        L = _root(Gb @ Gb.T + 1e-3 * np.eye(len(Gb)), 4)
        R = _root(Gb.T @ Gb + 1e-3 * np.eye(4), 4)
        expected.append(L @ Gb @ R)
    np.testing.assert_allclose((W0 - W.detach()).numpy(), np.concatenate(expected), rtol=1e-9)
    assert opt.stats()["num_blocks"] == 2


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (9, 9)])
def test_equal_blocks_along_any_dimension(shape):
    """Blocks of one shape are stacked; the update is reassembled in the right places."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, betas=(0.0, 1.0), eps=1e-3, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1,
                  max_preconditioner_dim=4)
    G = torch.randn(shape, dtype=torch.float64)
    W.grad = G.clone()
    opt.step()
    expected = np.zeros(shape)
    for _, sl in opt._groups[0].members[0][1].blocks:
        Gb = G[sl].numpy()
        L = _root(Gb @ Gb.T + 1e-3 * np.eye(Gb.shape[0]), 4)
        R = _root(Gb.T @ Gb + 1e-3 * np.eye(Gb.shape[1]), 4)
        expected[sl] = L @ Gb @ R
    np.testing.assert_allclose(-W.detach().numpy(), expected, rtol=1e-9)


def test_grafting_gives_block_update_the_norm_of_adam():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, betas=(0.0, 0.999), grafting="adam", adam={"eps": 1e-8},
                  start_preconditioning_step=1, precondition_frequency=1)
    G = torch.randn(5, 3, dtype=torch.float64)
    W0 = W.detach().clone()
    W.grad = G
    opt.step()
    # first Adam step: m_hat / (sqrt(v_hat) + eps) = sign(G) (up to eps) -> norm sqrt(15)
    step = (W0 - W.detach())
    assert step.norm().item() == pytest.approx(15**0.5, rel=1e-6)
    # and the direction is Shampoo's, not Adam's
    Gn = G.numpy()
    P = _root(0.001 * Gn @ Gn.T / 0.001 + 1e-12 * np.eye(5), 4) @ Gn @ _root(
        Gn.T @ Gn + 1e-12 * np.eye(3), 4)
    np.testing.assert_allclose(step.numpy() / step.norm().item(), P / np.linalg.norm(P),
                               rtol=1e-5, atol=1e-8)


def test_exponent_override_and_newton_root_match_eigh():
    torch.manual_seed(0)
    G = torch.randn(4, 3, dtype=torch.float64)
    outs = []
    for method in ("eigh", "newton"):
        W = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
        opt = Shampoo([W], lr=1.0, betas=(0.0, 1.0), eps=1e-2, grafting="none",
                      precondition_frequency=1, start_preconditioning_step=1,
                      exponent_override=2, root_method=method)
        W.grad = G.clone()
        opt.step()
        outs.append(-W.detach().numpy())
    Gn = G.numpy()
    ref = _root(Gn @ Gn.T + 1e-2 * np.eye(4), 2) @ Gn @ _root(Gn.T @ Gn + 1e-2 * np.eye(3), 2)
    np.testing.assert_allclose(outs[0], ref, rtol=1e-9)
    np.testing.assert_allclose(outs[1], ref, rtol=1e-7)


def test_qr_root_method_converges_to_the_eigh_root():
    """With a fixed factor, repeated warm-started QR refreshes reach the exact inverse root."""
    torch.manual_seed(0)
    G = torch.randn(6, 4, dtype=torch.float64)
    roots = {}
    for method in ("eigh", "qr"):
        W = nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
        opt = Shampoo([W], lr=0.0, betas=(0.0, 1e-9), eps=1e-2, grafting="none",
                      precondition_frequency=1, start_preconditioning_step=1,
                      use_bias_correction=False, root_method=method)
        for _ in range(60):
            W.grad = G.clone()
            opt.step()
        roots[method] = [opt._whole_state()[0][f"R{i}"][0]
                         for i in range(2)]
    for a, b in zip(roots["eigh"], roots["qr"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_amortization_refreshes_on_schedule():
    W = nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([W], precondition_frequency=3, start_preconditioning_step=2)
    for _ in range(8):
        W.grad = torch.randn(4, 3)
        opt.step()
    # refreshes at steps 2, 5, 8; two factors each
    assert opt.stats()["refreshes"] == 6


def test_bf16_parameters_use_float32_state_and_stay_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).to(torch.bfloat16)
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=2,
                  start_preconditioning_step=2)
    X = torch.randn(32, 8, dtype=torch.bfloat16)
    for _ in range(5):
        opt.zero_grad()
        model(X).float().pow(2).mean().backward()
        opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    st = opt._whole_state()
    assert all(v.dtype == torch.float32 for g in st for v in g.values())


def test_lr_scheduler_and_param_groups():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    opt = Shampoo([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b0 = b.detach().clone()
    a0 = a.detach().clone()
    a.grad, b.grad = torch.ones(3, 3), torch.ones(3, 3)
    opt.step()
    sched.step()
    assert torch.equal(b.detach(), b0) and not torch.equal(a.detach(), a0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_converges_on_linear_regression():
    torch.manual_seed(0)
    Wtrue = torch.randn(3, 5)
    X = torch.randn(200, 5)
    Y = X @ Wtrue.T
    model = nn.Linear(5, 3, bias=False)
    opt = Shampoo(model.parameters(), lr=0.05, precondition_frequency=5,
                  start_preconditioning_step=5)
    for _ in range(300):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()
    assert ((model(X) - Y) ** 2).mean().item() < 1e-4


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="grafting"):
        Shampoo(p, grafting="lion")
    with pytest.raises(ValueError, match="betas"):
        Shampoo(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="precondition_frequency"):
        Shampoo(p, precondition_frequency=0)
    with pytest.raises(ValueError, match="nonfinite"):
        Shampoo(p, nonfinite="ignore")
    with pytest.raises(ValueError, match="max_preconditioner_dim"):
        Shampoo(p, max_preconditioner_dim=0)


def test_order_three_tensor_uses_one_factor_per_mode():
    """For a 3-D block: F_i = G_(i) G_(i)^T, update G x_1 F_1^{-1/6} x_2 F_2^{-1/6} x_3 ..."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.zeros(3, 4, 5, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, betas=(0.0, 1.0), eps=1e-3, grafting="none",
                  precondition_frequency=1, start_preconditioning_step=1, merge_dims=False)
    G = torch.randn(3, 4, 5, dtype=torch.float64)
    W.grad = G.clone()
    opt.step()
    Gn = G.numpy()
    Rs = []
    for i in range(3):
        Gi = np.moveaxis(Gn, i, 0).reshape(Gn.shape[i], -1)
        Rs.append(_root(Gi @ Gi.T + 1e-3 * np.eye(Gn.shape[i]), 6))
    ref = np.einsum("ai,bj,ck,ijk->abc", Rs[0], Rs[1], Rs[2], Gn)
    np.testing.assert_allclose(-W.detach().numpy(), ref, rtol=1e-9)
