"""KL-Shampoo and KL-SOAP against a dense float64 reference of Lin et al.'s equations, and the
KL fit's fixed point on matrix-normal gradients."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn

from curvlab.optim import KLSOAP, SOAP, KLShampoo, Shampoo
from curvlab.optim.kl_shampoo import kl_statistics

D64 = torch.float64


def _orthogonal(d, g):
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))[0]


def _unfold(G, i):
    """Mode-i unfolding: rows mode i, columns the other modes in order (last fastest)."""
    return G.movedim(i, 0).reshape(G.shape[i], -1)


@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 2), (2, 3, 2, 2)])
def test_kl_statistics_match_the_dense_definition(shape):
    """S_i = (d_i / N) G_(i) (kron_{j != i} Q_j diag(inv_j) Q_j^T) G_(i)^T, and its diagonal
    in the basis Q_i, written with explicit Kronecker products."""
    g = torch.Generator().manual_seed(0)
    B, N = 2, math.prod(shape)
    G = torch.randn(B, *shape, generator=g, dtype=D64)
    Qs = [torch.stack([_orthogonal(d, g) for _ in range(B)]) for d in shape]
    inv = [torch.rand(B, d, generator=g, dtype=D64) + 0.1 for d in shape]
    stats, diags = kl_statistics(G, Qs, inv)
    for b, i in itertools.product(range(B), range(len(shape))):
        others = [Qs[j][b] @ torch.diag(inv[j][b]) @ Qs[j][b].T
                  for j in range(len(shape)) if j != i]
        K = others[0]
        for M in others[1:]:
            K = torch.kron(K, M)
        Gi = _unfold(G[b], i)
        S = shape[i] / N * Gi @ K @ Gi.T
        torch.testing.assert_close(stats[i][b], S, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(diags[i][b], torch.diag(Qs[i][b].T @ S @ Qs[i][b]),
                                   rtol=1e-12, atol=1e-14)


class DenseKL:
    """Lin et al.'s KL-Shampoo / KL-SOAP on one matrix, with dense Kronecker matrices.

    Step 1: ``L = (1 - beta) G G^T / n``, ``R = (1 - beta) G^T G / m``, eigenbases by eigh
    (descending), ``lambda = init``, no update. Step s > 1: the direction from the state of
    steps < s (KL-Shampoo: ``vec D = P^{-1} vec m`` with the dense
    ``P = (Q_R kron Q_L) diag(sqrt(lambda_R kron lambda_L) + eps) (Q_R kron Q_L)^T``;
    KL-SOAP: bias-corrected Adam in the basis), then ``L += (1 - beta)(G R^-1 G^T / n - L)``
    with the dense ``R^-1 = Q_R diag(1 / lambda_R) Q_R^T`` (and for R), ``lambda`` the EMA
    of ``diag(Q^T dL Q)`` (+ damping * mean(1 / lambda_other)) floored at
    ``max(10, min(d, 4000))^-2``, then every ``freq`` steps one QR power step with the
    columns sorted by their Rayleigh quotients (lambda, v follow their columns)."""

    def __init__(self, m, n, b1, b2, beta, eps, init, damping, freq, soap):
        self.m, self.n, self.b1, self.b2, self.beta, self.eps = m, n, b1, b2, beta, eps
        self.damping, self.freq, self.soap, self.s = damping, freq, soap, 0
        self.L, self.R = torch.zeros(m, m, dtype=D64), torch.zeros(n, n, dtype=D64)
        self.lam = [torch.full((m,), init, dtype=D64), torch.full((n,), init, dtype=D64)]
        self.M, self.V = torch.zeros(m, n, dtype=D64), torch.zeros(m, n, dtype=D64)
        self.floors = [1.0 / max(10, min(d, 4000)) ** 2 for d in (m, n)]
        self.permuted = False

    def step(self, G):
        self.s += 1
        m, n, beta = self.m, self.n, self.beta
        if self.s == 1:
            self.L, self.R = (1 - beta) * G @ G.T / n, (1 - beta) * G.T @ G / m
            self.Q = [torch.linalg.eigh(F)[1].flip(-1) for F in (self.L, self.R)]
            return torch.zeros_like(G)
        QL, QR = self.Q
        self.M = self.b1 * self.M + (1 - self.b1) * G
        if self.soap:
            t = self.s - 1
            self.V = self.b2 * self.V + (1 - self.b2) * (QL.T @ G @ QR) ** 2
            N = (QL.T @ self.M @ QR) / (1 - self.b1**t) / (
                (self.V / (1 - self.b2**t)).sqrt() + self.eps)
            D = QL @ N @ QR.T
        else:
            Q = torch.kron(QR, QL)
            s = (torch.kron(self.lam[1], self.lam[0])).sqrt() + self.eps
            P = Q @ torch.diag(s) @ Q.T
            vecM = self.M.T.reshape(-1)  # column-major vec: (B kron A) vec X = vec(A X B^T)
            D = torch.linalg.solve(P, vecM).reshape(n, m).T
        Linv = QL @ torch.diag(1 / self.lam[0]) @ QL.T
        Rinv = QR @ torch.diag(1 / self.lam[1]) @ QR.T
        dL, dR = G @ Rinv @ G.T / n, G.T @ Linv @ G / m
        extra = [self.damping * (1 / self.lam[1]).mean(), self.damping * (1 / self.lam[0]).mean()]
        new = [torch.clamp(beta * lam + (1 - beta) * (torch.diag(Q.T @ dF @ Q) + e), min=f)
               for lam, Q, dF, e, f in zip(self.lam, self.Q, (dL, dR), extra, self.floors)]
        self.lam = new
        self.L, self.R = beta * self.L + (1 - beta) * dL, beta * self.R + (1 - beta) * dR
        if (self.s - 1) % self.freq == 0:
            orders = []
            for i, F in enumerate((self.L, self.R)):
                order = torch.argsort(torch.diag(self.Q[i].T @ F @ self.Q[i]), descending=True)
                self.permuted |= not torch.equal(order, torch.arange(len(order)))
                self.Q[i] = torch.linalg.qr(F @ self.Q[i][:, order])[0]
                self.lam[i] = self.lam[i][order]
                orders.append(order)
            self.V = self.V[orders[0]][:, orders[1]]
        return D


def _gradients(steps, m, n, g):
    """Gradients whose dominant row moves (row 0, then row m - 1): the QR refreshes reorder
    the basis, so the eigenvalues must follow their columns."""
    out = []
    for s in range(steps):
        scale = torch.ones(m, 1, dtype=D64)
        scale[0 if s < steps // 2 else m - 1] = 4.0
        out.append(scale * torch.randn(m, n, generator=g, dtype=D64))
    return out


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
@pytest.mark.parametrize("scale,damping", [(1.0, 0.0), (0.003, 0.0), (1.0, 1e-3)])
def test_step_and_factors_match_the_dense_reference(cls, scale, damping):
    """Every direction (from the parameter change at lr 1) and the final factors,
    eigenvalues and eigenbases match the dense reference; scale 0.003 drives eigenvalues
    onto the floor, damping > 0 adds the trace term."""
    m, n, steps, freq = 5, 3, 9, 3
    b1, b2, beta, eps, init = 0.8, 0.9, 0.7, 1e-8, 0.1
    g = torch.Generator().manual_seed(3)
    grads = [scale * G for G in _gradients(steps, m, n, g)]
    W = nn.Parameter(torch.zeros(m, n, dtype=D64))
    opt = cls([W], lr=1.0, betas=(b1, b2), shampoo_beta=beta, eps=eps, init_factor=init,
              damping=damping, precondition_frequency=freq)
    ref = DenseKL(m, n, b1, b2, beta, eps, init, damping, freq, soap=cls is KLSOAP)
    for s, G in enumerate(grads, start=1):
        before = W.detach().clone()
        W.grad = G.clone()
        opt.step()
        torch.testing.assert_close(before - W.detach(), ref.step(G), rtol=1e-9, atol=1e-12)
        if s == 1:  # rank-3 factors: the eigenbasis of their null space is any basis of it;
            for i, F in enumerate((ref.L, ref.R)):  # the reference takes the optimizer's
                Q = opt.state[W][f"Q{i}"]
                T = Q.T @ F @ Q
                torch.testing.assert_close(T, torch.diag(torch.diag(T)), atol=1e-12, rtol=0)
                assert bool((torch.diag(T).diff() <= 1e-12).all())  # descending
                ref.Q[i] = Q.clone()
    st = opt.state[W]
    torch.testing.assert_close(st["F0"], ref.L, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(st["F1"], ref.R, rtol=1e-10, atol=1e-14)
    for i in range(2):
        torch.testing.assert_close(st[f"lam{i}"], ref.lam[i], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(st[f"Q{i}"].abs(), ref.Q[i].abs(), rtol=1e-8, atol=1e-10)
    assert ref.permuted  # a refresh reordered the basis
    floored = any(bool((lam == f).any()) for lam, f in zip(ref.lam, ref.floors))
    assert floored == (scale < 1)


def _spd(d, cond, g):
    Q = _orthogonal(d, g)
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=D64)) @ Q.T


def test_fixed_point_recovers_the_kronecker_covariance():
    """G = L0^{1/2} Z R0^{1/2} (Z iid standard normal), cov(vec G) = R0 kron L0: the KL fit's
    fixed point is (c L0, R0 / c). 64 independent blocks (one (256, 3) parameter split into
    (4, 3) blocks), EMA beta = 0.99 over 400 steps, lr 0: per block the factors normalized
    by c = tr(F_L) / tr(L0) are L0 and R0, and so are the preconditioner's own factors
    Q diag(lambda) Q^T; the average over blocks is within 3% (measured 0.5-1.6% for
    seeds 1-3; the Kronecker product R kron L 0.8-2.1%, per block at most 12-16%). The
    one-sided (Shampoo) statistics E[G G^T] / n, E[G^T G] / m of the same gradients are off
    by tr(L0) tr(R0) / (m n) = 12 in the product (measured error 10.8): the assertion can
    fail."""
    m, n, blocks, steps = 4, 3, 64, 400
    g = torch.Generator().manual_seed(1)
    L0, R0 = _spd(m, 10.0, g), _spd(n, 5.0, g)
    Lh, Rh = torch.linalg.cholesky(L0), torch.linalg.cholesky(R0)
    W = nn.Parameter(torch.zeros(blocks * m, n, dtype=D64))
    # a start far below the fixed point's scale: 0.99^400 = 1.8% of the start remains, and
    # the first gradient's (flattened) spectrum left R 3.7% off
    opt = KLShampoo([W], lr=0.0, shampoo_beta=0.99, precondition_frequency=10,
                    max_preconditioner_dim=m, init_factor=0.1)
    one_sided = [torch.zeros(blocks, m, m, dtype=D64), torch.zeros(blocks, n, n, dtype=D64)]
    for _ in range(steps):
        G = Lh @ torch.randn(blocks, m, n, generator=g, dtype=D64) @ Rh.T
        W.grad = G.reshape(blocks * m, n)
        opt.step()
        one_sided[0].lerp_(G @ G.mT / n, 0.01)
        one_sided[1].lerp_(G.mT @ G / m, 0.01)
    st = opt._whole_state()[0]
    assert st["F0"].shape == (blocks, m, m)

    def rel(A, B):
        return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))

    lam_factors = [st[f"Q{i}"] @ torch.diag_embed(st[f"lam{i}"]) @ st[f"Q{i}"].mT
                   for i in range(2)]
    for FL, FR in ((st["F0"], st["F1"]), lam_factors):
        c = FL.diagonal(dim1=-2, dim2=-1).sum(-1) / torch.trace(L0)
        L_hat, R_hat = FL / c.view(-1, 1, 1), FR * c.view(-1, 1, 1)
        assert rel(L_hat.mean(0), L0) < 0.03 and rel(R_hat.mean(0), R0) < 0.03
        per_block = [max(rel(a, L0), rel(b, R0)) for a, b in zip(L_hat, R_hat)]
        assert max(per_block) < 0.25  # EMA noise of one block (measured median ~0.07)
        kron = torch.stack([torch.kron(b, a) for a, b in zip(FL, FR)]).mean(0)
        assert rel(kron, torch.kron(R0, L0)) < 0.03
    shampoo = torch.stack([torch.kron(b, a) for a, b in zip(*one_sided)]).mean(0)
    assert rel(shampoo, torch.kron(R0, L0)) > 1.0


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4)).double()


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        X = torch.randn(8, 2, 6, 6, generator=g, dtype=D64)
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_state_dict_resumes_bitwise(cls):
    """Through torch.save / torch.load(weights_only=True) into a new model and optimizer,
    with an order-4 conv block (merge_dims=False), a matrix and diagonal parameters, across
    QR refreshes."""
    def make(model):
        return cls(model.parameters(), lr=1e-2, precondition_frequency=2, merge_dims=False)

    model = _model()
    opt = make(model)
    _train(model, opt, 4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert "lam3" in opt.state[model[0].weight]  # the conv weight is one order-4 block
    _train(model, opt, 5, seed=2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, 5, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


def _twice(rule, p, x):
    f = rule.inv_sqrt_preconditioner
    return f(p, f(p, x))


def test_kl_shampoo_stability_model_reproduces_the_step():
    """The step is -lr P^-1 m: P^-1/2 applied twice to the step's momentum gives it, with
    P from the state the step used (blocks: eigenbasis and eigenvalues of steps < t; the
    diagonal parameters: Adam's, after the step). Threshold 2 (1 + b1) / (1 - b1)."""
    model = _model()
    opt = KLShampoo(model.parameters(), lr=0.01, precondition_frequency=2)
    _train(model, opt, 4, seed=1)
    before_opt = KLShampoo(model.parameters(), lr=0.01, precondition_frequency=2)
    before_opt.load_state_dict(opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, seed=7)  # a refresh step: the rule of the state before it
    for p, b in zip(model.parameters(), before, strict=True):
        rule = (before_opt if p.ndim > 1 else opt).stability_model()
        assert rule.threshold == pytest.approx(2 * 1.9 / 0.1)
        expected = -(p.detach() - b) / 0.01
        m = opt.state[p]["m"].reshape(p.shape)
        torch.testing.assert_close(_twice(rule, p, m), expected, rtol=1e-9, atol=1e-12)


def test_kl_soap_stability_model_reproduces_the_step():
    """SOAP's rule: after a step without refresh, P = Q (sqrt(v_hat) + eps) Q^T (bias
    corrections folded in) reproduces it for every parameter."""
    model = _model()
    opt = KLSOAP(model.parameters(), lr=0.01, precondition_frequency=3)
    _train(model, opt, 4, seed=1)  # refreshes at 1 and 4; step 5 has none
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, seed=7)
    rule = opt.stability_model()
    assert rule.name == "kl_soap"
    for p, b in zip(model.parameters(), before, strict=True):
        expected = -(p.detach() - b) / 0.01
        m = opt.state[p]["m"].reshape(p.shape)  # the conv weight's block is (3, 18)
        torch.testing.assert_close(_twice(rule, p, m), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_trains_a_small_network(cls):
    model = _model()
    opt = cls(model.parameters(), lr=1e-2, precondition_frequency=2)
    X = torch.randn(16, 2, 6, 6, dtype=D64)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(X).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert opt.stats()["num_blocks"] == 2 and opt.stats()["num_diagonal_params"] == 2


def test_kl_shampoo_keeps_no_second_moment_and_bad_settings_are_named():
    W, V = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3, 2))
    opts = KLShampoo([W]), KLSOAP([V])
    for p, opt in zip((W, V), opts):
        p.grad = torch.ones(3, 2)
        opt.step()
    assert "v" not in opts[0].state[W] and "v" in opts[1].state[V]
    for kw, name in [({"init_factor": 0.0}, "init_factor"), ({"damping": -1.0}, "damping"),
                     ({"max_inverse_sqrt": math.inf}, "max_inverse_sqrt"),
                     ({"start_preconditioning_step": 2}, "start_preconditioning_step")]:
        with pytest.raises(ValueError, match=name):
            KLShampoo([W], **kw)
    with pytest.raises(ValueError, match="init_factor"):
        KLSOAP([{"params": [W], "init_factor": -1.0}])


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP, SOAP, Shampoo])
def test_stacked_order_four_blocks(cls):
    """Two conv weights of one shape with merge_dims=False stack as two order-4 blocks;
    mode_product broadcast the (B, d, d) factors wrongly over (B, a, b, c, d) blocks and
    the step raised for B > 1 (also Shampoo's and SOAP's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 3, 3, padding=1)).double()
    kw = {"start_preconditioning_step": 1} if cls is Shampoo else {}
    opt = cls(model.parameters(), lr=1e-2, merge_dims=False, precondition_frequency=1, **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 5, 5, dtype=D64)).pow(2).mean().backward()
        opt.step()
    assert opt.stats()["num_blocks"] == 2 and opt.stats()["num_block_shapes"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("shape,dim", [((12, 3), 4), ((6, 2, 3), 6)])
def test_gradient_init_spectrum_matches_its_definition(shape, dim):
    """After the initialization step, per block and mode, with the unfoldings' statistics
    F_i = (1 - beta) (d_i / N) G_(i) G_(i)^T written out densely and e_i = diag(Q_i^T F_i
    Q_i): lambda_i = (e_i + rms(e_i)) s^{1/k} / mean(e_i + rms(e_i)), s = mean(G^2), so the
    Kronecker product's mean is s; a block with a zero gradient starts at 0.1."""
    beta = 0.9
    g = torch.Generator().manual_seed(4)
    W = nn.Parameter(torch.zeros(*shape, dtype=D64))
    opt = KLShampoo([W], shampoo_beta=beta, max_preconditioner_dim=dim, merge_dims=False)
    grad = torch.randn(*shape, generator=g, dtype=D64)  # unit scale: above the floor 1/c^2
    grad[:shape[0] // 3] = 0.0  # the first block (of three along dim 0, or the only one's rows)
    W.grad = grad.clone()
    opt.step()
    st = opt._whole_state()[0]
    blocks = grad.reshape(-1, dim, *shape[1:]) if len(shape) == 2 else grad.unsqueeze(0)
    k = blocks.ndim - 1
    for b, G in enumerate(blocks):
        s = float(G.square().mean())
        lams = [st[f"lam{i}"][b] for i in range(k)]
        if s == 0.0:
            assert all(bool((lam == 0.1).all()) for lam in lams)
            continue
        for i in range(k):
            U = _unfold(G, i)
            F = (1 - beta) * U @ U.T * G.shape[i] / G.numel()
            Q = st[f"Q{i}"][b]
            e = torch.diag(Q.T @ F @ Q).clamp_min(0.0)
            shifted = e + e.square().mean().sqrt()
            torch.testing.assert_close(lams[i], shifted * s ** (1 / k) / shifted.mean(),
                                       rtol=1e-10, atol=0.0)
        kron = lams[0]
        for lam in lams[1:]:
            kron = torch.kron(kron, lam)
        assert kron.mean().item() == pytest.approx(s, rel=1e-10)


def test_first_steps_have_the_gradient_scale():
    """With gradients of RMS 1e-3 the first moving step is lr (1 - beta_1) O(1) per element,
    as momentum SGD on unit-scale gradients (the floors 1/128^2, 1/64^2 are below
    sqrt(mean g^2)): measured 1.17. The prototype's constant start
    0.1 divides by sqrt(0.1 * 0.1) instead of sqrt(mean g^2) = 1e-3: 100x smaller steps,
    decaying only at rate 1 - beta over hundreds of steps (measured 0.010)."""
    g = torch.Generator().manual_seed(0)
    lr, b1 = 1e-2, 0.9
    ratios = {}
    for init in ("gradient", 0.1):
        W = nn.Parameter(torch.zeros(128, 64, dtype=D64))
        opt = KLShampoo([W], lr=lr, betas=(b1, 0.98), init_factor=init)
        for _ in range(2):
            W.grad = 1e-3 * torch.randn(128, 64, generator=g, dtype=D64)
            before = W.detach().clone()
            opt.step()
        rms = float((W.detach() - before).square().mean().sqrt())
        ratios[init] = rms / (lr * (1 - b1))
    assert 0.3 < ratios["gradient"] < 3.0
    assert ratios[0.1] < 0.03
