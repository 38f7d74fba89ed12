"""SOAP equals Adam run in the explicitly rotated eigenbasis (float64 reference)."""

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.optim import SOAP


def _eigvecs_desc(A):
    _, Q = np.linalg.eigh(A)
    return Q[:, ::-1]


def test_soap_frequency_one_equals_adam_in_rotated_basis():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((5, 4))
    grads = [rng.standard_normal((5, 4)) for _ in range(6)]
    lr, b1, b2, sb, eps = 0.1, 0.9, 0.95, 0.8, 1e-8
    W = nn.Parameter(torch.tensor(W0))
    opt = SOAP([W], lr=lr, betas=(b1, b2), shampoo_beta=sb, eps=eps, precondition_frequency=1,
               eigenbasis_method="eigh")
    Wr, L, R = W0.copy(), np.zeros((5, 5)), np.zeros((4, 4))
    m, v = np.zeros((5, 4)), np.zeros((5, 4))
    QL, QR = np.eye(5), np.eye(4)  # set from the statistics after step 1
    for t, G in enumerate(grads, start=1):
        W.grad = torch.tensor(G)
        opt.step()
        if t > 1:  # step 1 only initializes the factors and the basis (Alg. 3)
            m = b1 * m + (1 - b1) * G
            g_rot = QL.T @ G @ QR  # step t uses the basis of the statistics of steps < t
            v = b2 * v + (1 - b2) * g_rot**2
            k = t - 1  # Adam restarts in the first basis
            N = (QL.T @ m @ QR) / (np.sqrt(v) + eps) * np.sqrt(1 - b2**k) / (1 - b1**k)
            Wr = Wr - lr * QL @ N @ QR.T
        np.testing.assert_allclose(W.detach().numpy(), Wr, rtol=1e-7, atol=1e-7)
        L = sb * L + (1 - sb) * G @ G.T
        R = sb * R + (1 - sb) * G.T @ G
        QL, QR = _eigvecs_desc(L), _eigvecs_desc(R)


def test_first_step_initializes_and_adam_restarts_at_later_start():
    # start_preconditioning_step=3: two Adam steps in the identity basis, step 3 moves
    # nothing and zeroes the moments, step 4 is Adam's first step in the eigenbasis
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    soap = SOAP([a], lr=0.01, betas=(0.9, 0.99), start_preconditioning_step=3,
                precondition_frequency=100, eigenbasis_method="eigh")
    adam = torch.optim.Adam([b], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    gs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    for g in gs[:2]:
        a.grad, b.grad = g.clone(), g.clone()
        soap.step()
        adam.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    before = a.detach().clone()
    a.grad = gs[2].clone()
    soap.step()
    assert torch.equal(a.detach(), before)
    st = soap._whole_state()[0]
    assert not st["m"].any() and not st["v"].any()
    a.grad = gs[3].clone()
    soap.step()
    # Adam's first step in the basis: every rotated coordinate moves by lr (up to eps)
    QL, QR = st["Q0"][0], st["Q1"][0]
    step_rot = QL.T @ (a.detach() - before) @ QR
    g_rot = QL.T @ gs[3] @ QR
    torch.testing.assert_close(step_rot, -0.01 * torch.sign(g_rot), rtol=1e-6, atol=1e-9)


def test_soap_before_first_refresh_is_adam():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    soap = SOAP([a], lr=0.01, betas=(0.9, 0.99), start_preconditioning_step=100)
    adam = torch.optim.Adam([b], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        g = torch.randn(4, 3, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        soap.step()
        adam.step()
    # Adam's eps placement differs by the bias-correction factor: agreement to ~eps
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_qr_refresh_permutes_second_moment_with_the_basis():
    W = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    opt = SOAP([W], lr=0.0, betas=(0.0, 0.5), shampoo_beta=0.0, precondition_frequency=1)

    def v():
        return opt._whole_state()[0]["v"][0]

    # step 1 initializes: eigh of the row factor diag(9, 0, 1) gives the basis (e0, e2, e1),
    # of the column factor diag(9, 1) the basis (f0, f1); Adam's moments stay zero
    W.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(v(), torch.zeros(3, 2, dtype=torch.float64))
    # step 2: the gradient in that basis is [[1, 0], [0, 5], [0, 0]] -> v = 0.5 g^2;
    # then QR: row factor diag(1, 0, 25) has estimated eigenvalues (1, 25, 0) in the old
    # basis -> rows of v swap; column factor diag(1, 25) -> columns swap too.
    W.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(v(), torch.tensor([[12.5, 0.0], [0.0, 0.5], [0.0, 0.0]],
                                                 dtype=torch.float64))
    Q0 = opt._whole_state()[0]["Q0"][0]
    torch.testing.assert_close(Q0[:, :2].abs(), torch.tensor(
        [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_soap_conv_weight_and_1d_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=2)
    X = torch.randn(8, 2, 6, 6)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(X).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    s = opt.stats()
    assert s["num_diagonal_params"] == 2 and s["num_blocks"] == 2


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="eigenbasis_method"):
        SOAP(p, eigenbasis_method="svd")
    with pytest.raises(ValueError, match="betas"):
        SOAP(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        SOAP(p, eps=0.0)


@pytest.mark.parametrize("n", [1, 3])
def test_permute_modes_matches_explicit_indexing(n):
    from curvlab.optim.soap import _permute_modes

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, 3, 5, generator=g)
    orders = [torch.stack([torch.randperm(d, generator=g) for _ in range(n)]) for d in (4, 3, 5)]
    out = _permute_modes(X, orders)
    for b in range(n):
        ref = X[b][orders[0][b]][:, orders[1][b]][:, :, orders[2][b]]
        assert torch.equal(out[b], ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_block_direction_is_zeroed_and_counted(monkeypatch, bad):
    # two 4x4 blocks of one 8x4 weight share a block group; one entry of block 1 is bad
    W = nn.Parameter(torch.ones(8, 4))
    opt = SOAP([W], lr=0.1, max_preconditioner_dim=4)
    real = SOAP._block_direction

    def poisoned(self, group, st, G, step):
        D = real(self, group, st, G, step).clone()
        D[1, 2, 3] = bad
        return D

    monkeypatch.setattr(SOAP, "_block_direction", poisoned)
    for _ in range(2):  # step 1 initializes (direction 0), step 2 moves
        W.grad = torch.randn(8, 4)
        opt.step()
    assert torch.isfinite(W).all()
    assert torch.equal(W.detach()[4:], torch.ones(4, 4))
    assert not torch.equal(W.detach()[:4], torch.ones(4, 4))
    assert opt.stats()["nonfinite_block_updates"] == 2


def test_huge_finite_block_direction_is_kept(monkeypatch):
    # the entries' sum overflows (the quick check fails), but every entry is finite: the
    # exact per-block check keeps the block
    W = nn.Parameter(torch.zeros(4, 4))
    opt = SOAP([W], lr=1.0, max_preconditioner_dim=4)
    monkeypatch.setattr(SOAP, "_block_direction",
                        lambda self, group, st, G, step: torch.full_like(G, -3e38))
    W.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(W.detach(), torch.full((4, 4), 3e38))
    assert opt.stats()["nonfinite_block_updates"] == 0


def test_max_abs_mixed_dtypes():
    from curvlab.optim.preconditioners import max_abs

    x = [torch.tensor([3.0], dtype=torch.float16), torch.tensor([-4.0], dtype=torch.float64)]
    assert max_abs(x) == 4.0
    mixed_nan = [torch.tensor([1.0], dtype=torch.float16), torch.tensor([float("nan")])]
    assert max_abs(mixed_nan) != max_abs(mixed_nan)  # NaN


def test_state_stays_contiguous_across_qr_refreshes():
    # checkpoint templates (torch.distributed.checkpoint) assume the state's layout
    W = nn.Parameter(torch.randn(6, 5))
    opt = SOAP([W], lr=0.01, precondition_frequency=1)
    for _ in range(4):
        W.grad = torch.randn(6, 5)
        opt.step()
    groups = opt._whole_state()
    assert all(t.is_contiguous() for g in groups for t in g.values())
    assert all(t.is_contiguous() for g in opt._groups for t in g.state.values())


def test_batched_qr_refresh_across_block_shapes_equals_per_group_refresh(monkeypatch):
    # factor sizes 6 and 4 are shared by several block shapes: one batched call per size
    def run(per_group):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                              nn.Linear(6, 4)).double()
        params = list(model.parameters())
        # two param groups refreshing at different steps (2: 3, 5, 7, 9; 3: 4, 7)
        opt = SOAP([{"params": params[:4]}, {"params": params[4:], "precondition_frequency": 3}],
                   lr=1e-2, precondition_frequency=2)
        if per_group:
            def one_by_one(states):
                for st in states:
                    opt._refresh_basis(opt.param_groups[0], st, 2)
            monkeypatch.setattr(opt, "_refresh_qr_batched", one_by_one)
        g = torch.Generator().manual_seed(1)
        for k in range(9):
            X = torch.randn(16, 4, generator=g, dtype=torch.float64)
            opt.zero_grad()
            model(X).pow(2).mean().backward()
            if k % 3 == 2:  # some steps without the middle layer: its blocks sit out
                params[2].grad = params[3].grad = None
            opt.step()
        return [p.detach() for p in model.parameters()], opt.stats()["refreshes"]

    (batched, nb), (ref, nr) = run(False), run(True)
    assert nb == nr > 0
    for a, b in zip(batched, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
