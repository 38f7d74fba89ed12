"""PSGD-Kron (curvlab.optim.psgd): the fit against dense float64 references of the author's
update and of the criterion's gradient, convergence to H^-1 on a Kronecker quadratic, the
fit schedule, resume, the stability rule and argument errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics.stability import stability_model
from curvlab.optim import PSGDKron
from curvlab.optim.psgd import fit_kron_, spectral_norm_lower_bound

D64 = torch.float64
ITERS = 300  # power iterations: the lower bound is then the exact norm in float64


def _spd(d, cond, g):
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    return U @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=D64)) @ U.T


def _triu(X):
    """The upper triangle (torch.triu's kernel took seconds on this loaded machine)."""
    r = torch.arange(X.shape[-1])
    return torch.where(r[:, None] <= r[None, :], X, 0.0)


def _lmax(S):
    return torch.linalg.eigvalsh(S)[-1]


def _procrustes(Q):
    """The author's procrustes_step2 with the exact norm of R."""
    R = Q.T - Q
    R = R / (torch.linalg.matrix_norm(R, 2) + torch.finfo(D64).smallest_normal)
    RQ, RRQ = R @ Q, R @ R @ Q
    t1, t2 = torch.trace(RQ), torch.trace(RRQ)
    a = min(float(-t1 / t2), 0.125) if t2 < 0 else 0.125
    return Q + a * (RQ + 0.5 * a * RRQ)


def _reference(Q1, Q2, H, V, geometry, mu, whitening=False):
    """One fit of the factors of a matrix block, written with dense matrices (from L = 0:
    L = ell, the exact largest eigenvalue)."""
    m, n = H.shape
    if geometry == "EQ":
        A = Q1 @ H @ Q2.T
        B = torch.linalg.inv(Q1).T @ V @ torch.linalg.inv(Q2)
        terms = [(A @ A.T, B @ B.T), (A.T @ A, B.T @ B)]
    else:
        Ph = Q1.T @ Q1 @ H @ Q2.T @ Q2
        if whitening:
            terms = [(Ph @ Ph.T, n * torch.eye(m, dtype=D64)),
                     (Ph.T @ Ph, m * torch.eye(n, dtype=D64))]
        else:
            terms = [(Ph @ Ph.T, V @ V.T), (Ph.T @ Ph, V.T @ V)]
    out = []
    for Q, (T1, T2) in zip((Q1, Q2), terms):
        if geometry == "Q0.5EQ1.5" and whitening:
            ell = _lmax(T1) + T2[0, 0]
        else:
            ell = _lmax(T1 + T2)
        E = T1 - T2
        if geometry == "EQ":
            out.append(Q - mu / ell * _triu(E) @ Q)
        else:
            out.append(_procrustes(Q - mu / ell * E @ Q))
    return out


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_fit_matches_dense_reference_of_the_authors_update(geometry):
    g = torch.Generator().manual_seed(0)
    m, n = 3, 4
    Q1 = torch.randn(m, m, generator=g, dtype=D64) + 3 * torch.eye(m, dtype=D64)
    Q2 = torch.randn(n, n, generator=g, dtype=D64) + 3 * torch.eye(n, dtype=D64)
    if geometry == "EQ":
        Q1, Q2 = _triu(Q1), _triu(Q2)
    H, V = torch.randn(m, n, generator=g, dtype=D64), torch.randn(m, n, generator=g, dtype=D64)
    Qs = [Q1.clone()[None], Q2.clone()[None]]
    Ls = [torch.zeros(1, dtype=D64), torch.zeros(1, dtype=D64)]
    # damping 0: the remaining noise is eps(float64) |h| (relative 1e-16)
    fit_kron_(Qs, Ls, H[None], V[None], geometry=geometry, whitening=False, lr=0.3,
              beta_l=0.9, damping=0.0, iterations=ITERS)
    ref = _reference(Q1, Q2, H, V, geometry, 0.3)
    for q, r in zip(Qs, ref):
        torch.testing.assert_close(q[0], r, rtol=1e-9, atol=1e-12)
    if geometry == "Q0.5EQ1.5":  # whitening: v integrated out (T2 = numel/d I)
        Qs = [Q1.clone()[None], Q2.clone()[None]]
        Ls = [torch.zeros(1, dtype=D64), torch.zeros(1, dtype=D64)]
        fit_kron_(Qs, Ls, H[None], None, geometry=geometry, whitening=True, lr=0.3,
                  beta_l=0.9, damping=0.0, iterations=ITERS)
        ref = _reference(Q1, Q2, H, None, geometry, 0.3, whitening=True)
        for q, r in zip(Qs, ref):
            torch.testing.assert_close(q[0], r, rtol=1e-9, atol=1e-12)


def test_eq_terms_are_the_criterions_lie_group_gradient():
    """Ground truth for the EQ fit: for Q = Q1 kron Q2 and Q1 <- (I + E) Q1, the derivative
    of c = ||Q h||^2 + ||Q^-T v||^2 at E = 0 is 2 (A A^T - B B^T); the fit moves E along
    -triu of it. Checked by autograd on the dense Kronecker criterion."""
    g = torch.Generator().manual_seed(1)
    m, n = 3, 2
    Q1 = _triu(torch.randn(m, m, generator=g, dtype=D64) + 3 * torch.eye(m, dtype=D64))
    Q2 = _triu(torch.randn(n, n, generator=g, dtype=D64) + 3 * torch.eye(n, dtype=D64))
    h, v = torch.randn(m * n, generator=g, dtype=D64), torch.randn(m * n, generator=g, dtype=D64)
    E = torch.zeros(m, m, dtype=D64, requires_grad=True)

    def criterion(E):
        Q = torch.kron((torch.eye(m, dtype=D64) + E) @ Q1, Q2)
        return (Q @ h).pow(2).sum() + torch.linalg.solve(Q.T, v).pow(2).sum()

    (grad,) = torch.autograd.grad(criterion(E), E)
    Qs = [Q1.clone()[None], Q2.clone()[None]]
    Ls = [torch.zeros(1, dtype=D64), torch.zeros(1, dtype=D64)]
    fit_kron_(Qs, Ls, h.view(1, m, n), v.view(1, m, n), geometry="EQ", whitening=False,
              lr=0.1, beta_l=0.9, damping=0.0, iterations=ITERS)
    step = Qs[0][0] @ torch.linalg.inv(Q1) - torch.eye(m, dtype=D64)  # = -mu/L triu(T1-T2)
    expected = -0.1 / Ls[0][0] * _triu(grad / 2)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


def test_spectral_norm_lower_bound():
    g = torch.Generator().manual_seed(2)
    S = torch.stack([_spd(6, 50.0, g) for _ in range(4)]).float()
    exact = torch.linalg.eigvalsh(S.double())[:, -1].float()
    est = spectral_norm_lower_bound(S, 2)
    assert bool((est <= exact * (1 + 1e-5)).all())
    assert bool((est >= 0.5 * exact).all())  # measured >= 0.97 here; a loose floor
    torch.testing.assert_close(spectral_norm_lower_bound(S, 200), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("geometry", "mu", "steps", "bound"), [
    ("Q0.5EQ1.5", 0.5, 60, 1e-3),  # measured 1.2e-4 (1.8e-1 after 20 fits)
    ("EQ", 1.0, 100, 2e-2),  # measured 7.4e-3 (5.0e-1 after 20 fits)
])
def test_hvp_fit_converges_to_the_inverse_hessian_of_a_kronecker_quadratic(geometry, mu, steps,
                                                                            bound):
    """f(W) = 1/2 <W, A W B> has the Hessian H = A kron B (SPD, condition 100); with exact
    pairs (v, H v) the criterion's minimizer is P = H^-1, which the Kronecker family holds
    exactly, and every pair's fit gradient vanishes there (linear convergence, no noise
    floor). lr = 0 keeps W (the Hessian is constant anyway)."""
    g = torch.Generator().manual_seed(0)
    A, B = _spd(5, 10.0, g), _spd(4, 10.0, g)
    H_inv = torch.kron(torch.linalg.inv(A), torch.linalg.inv(B))
    W = nn.Parameter(torch.randn(5, 4, generator=g, dtype=D64))
    opt = PSGDKron([W], lr=0.0, fit="hvp", momentum=0.0, max_skew=math.inf, seed=1,
                   geometry=geometry, lr_preconditioner=mu)

    def closure():
        return 0.5 * (W * (A @ W @ B)).sum()

    def error():
        Q0, Q1 = opt.state[W]["Q0"], opt.state[W]["Q1"]
        P = torch.kron(Q0.T @ Q0, Q1.T @ Q1)
        return float(torch.linalg.matrix_norm(P - H_inv) / torch.linalg.matrix_norm(H_inv))

    for _ in range(20):
        opt.step(closure)
    early = error()
    for _ in range(steps - 20):
        opt.step(closure)
    assert error() < bound and error() < 0.1 * early


def test_gradient_whitening_fits_the_inverse_square_root_of_the_gradient_covariance():
    """Whitening pairs (v, g), g ~ N(0, C1 kron C2): the criterion's minimizer is
    P = E[g g^T]^-1/2; with a constant fit step the error settles at a floor that grows with
    mu (measured 0.08-0.13 at mu = 0.05, 0.11-0.18 at 0.1)."""
    g = torch.Generator().manual_seed(0)
    C1, C2 = _spd(5, 10.0, g), _spd(4, 10.0, g)

    def power(S, p):
        w, U = torch.linalg.eigh(S)
        return U @ torch.diag(w ** p) @ U.T

    R1, R2 = power(C1, 0.5), power(C2, 0.5)
    target = torch.kron(power(C1, -0.5), power(C2, -0.5))
    W = nn.Parameter(torch.zeros(5, 4, dtype=D64))
    opt = PSGDKron([W], lr=0.0, momentum=0.0, whiten="gradient", max_skew=math.inf,
                   lr_preconditioner=0.05)

    def error():
        Q0, Q1 = opt.state[W]["Q0"], opt.state[W]["Q1"]
        P = torch.kron(Q0.T @ Q0, Q1.T @ Q1)
        return float(torch.linalg.matrix_norm(P - target) / torch.linalg.matrix_norm(target))

    errors = []
    for _ in range(200):
        W.grad = R1 @ torch.randn(5, 4, generator=g, dtype=D64) @ R2
        opt.step()
        errors.append(error())
    assert errors[-1] < 0.2 and errors[-1] < 0.5 * errors[0]


def test_coordinates_that_never_got_a_gradient_are_not_governed():
    """As for Shampoo / SOAP / Muon: a zero-gradient coordinate's q grows toward the damping
    bound (P -> I / damping), so the Hessian's rounding noise there would dominate."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = PSGDKron(model.parameters(), lr=0.01)
    bias = model[0].bias
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=g, dtype=D64)).pow(2).mean().backward()
        bias.grad[:2] = 0.0
        opt.step()
    out = stability_model(opt).inv_sqrt_preconditioner(bias, torch.ones_like(bias))
    assert torch.equal(out[:2], torch.zeros(2, dtype=out.dtype))
    assert bool((out[2:] > 0).all()) and bool(torch.isfinite(out).all())


def test_whitening_direction_is_the_preconditioned_momentum_and_the_stability_root():
    """With momentum 0 and no clip the step is lr P g; the stability rule's P^-1/2 is
    PSGD's symmetric P^1/2 per block (|q| for a vector), so applying it twice gives P g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = PSGDKron(model.parameters(), lr=0.1, momentum=0.0, whiten="gradient",
                   update_clip=None, max_skew=math.inf)
    X, y = torch.randn(16, 5, dtype=D64), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    rule = stability_model(opt)
    f = rule.inv_sqrt_preconditioner
    assert rule.name == "psgd" and rule.threshold == 2.0
    for p, b, gr in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(f(p, f(p, gr)), (b - p.detach()) / 0.1, rtol=1e-8, atol=1e-12)
    W = model[0].weight
    Q0, Q1 = opt.state[W]["Q0"], opt.state[W]["Q1"]
    torch.testing.assert_close(before[0] - W.detach(), 0.1 * Q0.T @ Q0 @ grads[0] @ Q1.T @ Q1,
                               rtol=1e-8, atol=1e-12)
    with_momentum = PSGDKron(model.parameters(), momentum=0.9)
    assert stability_model(with_momentum).threshold == pytest.approx(2 * 1.9 / 0.1)


def test_diagonal_factors_for_skewed_dims_and_one_lipschitz_constant_per_vector():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(12, 3))
    b1, b2 = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7))
    opt = PSGDKron([W, b1, b2], lr=1e-3)
    for _ in range(3):
        W.grad, b1.grad, b2.grad = torch.randn(12, 3), torch.randn(5), 10 * torch.randn(7)
        opt.step()
    assert opt.state[W]["Q0"].shape == (12,)  # 12^2 > 36: diagonal (max_skew = 1)
    assert opt.state[W]["Q1"].shape == (3, 3)
    for b in (b1, b2):
        L = opt.state[b]["L"]
        assert bool((L == L[0]).all()) and float(L[0]) > 0
    assert float(opt.state[b1]["L"][0]) != float(opt.state[b2]["L"][0])


def test_fit_schedule_frequency_and_probability():
    def fits(**kw):
        W = nn.Parameter(torch.zeros(4, 4))
        opt = PSGDKron([W], lr=1e-3, **kw)
        g = torch.Generator().manual_seed(0)
        for _ in range(80):
            W.grad = torch.randn(4, 4, generator=g)
            opt.step()
        return opt.stats()["refreshes"]

    assert fits() == 80
    assert fits(precondition_frequency=5) == 16  # steps 1, 6, 11, ...
    n = fits(precond_update_prob=0.25)  # step 1 always, then Bernoulli(0.25): 20.75 +- 3.9
    assert 8 <= n <= 35 and n == fits(precond_update_prob=0.25)  # seeded
    assert n != fits(precond_update_prob=0.25, seed=3)


def _hvp_run(model, opt, X, y, ks):
    for k in ks:
        def closure(k=k):
            opt.zero_grad()
            return nn.functional.cross_entropy(model(X[k]), y[k])
        opt.step(closure)


def test_hvp_mode_resumes_bitwise_with_its_random_generators():
    torch.manual_seed(0)
    X, y = torch.randn(6, 16, 6), torch.randint(0, 3, (6, 16))

    def make(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, PSGDKron(model.parameters(), lr=0.1, fit="hvp",
                               precond_update_prob=0.5, geometry="EQ")

    model, opt = make()
    _hvp_run(model, opt, X, y, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _hvp_run(model, opt, X, y, range(3, 6))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = make(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _hvp_run(model2, opt2, X, y, range(3, 6))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"fit": "newton"}, "fit"), ({"geometry": "QEQ"}, "geometry"),
    ({"lr_preconditioner": 0.0}, "lr_preconditioner"),
    ({"lr_preconditioner": 1.5}, "lr_preconditioner"),
    ({"precond_update_prob": 0.0}, "precond_update_prob"),
    ({"momentum": 1.0}, "momentum"), ({"momentum": 0.0}, "momentum"),
    ({"damping": -1.0}, "damping"), ({"update_clip": (0.0, 1.0)}, "update_clip"),
    ({"update_clip": "yes"}, "update_clip"), ({"norm_iterations": 0}, "norm_iterations"),
    ({"max_skew": -1.0}, "max_skew"), ({"precond_init_scale": 0.0}, "precond_init_scale"),
    ({"lipschitz_beta": 1.0}, "lipschitz_beta"), ({"whiten": "both"}, "whiten"),
])
def test_bad_arguments_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PSGDKron([nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_hvp_mode_needs_a_closure_that_does_not_call_backward():
    model = nn.Linear(3, 2)
    X = torch.randn(4, 3)
    opt = PSGDKron(model.parameters(), fit="hvp")
    with pytest.raises(ValueError, match="closure"):
        opt.step()

    def backward_closure():
        loss = model(X).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must not call backward"):
        opt.step(backward_closure)


class _SDPA(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (on CPU a fused kernel whose
    backward has no derivative)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (batch, 1 head, L, 4)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).mean((1, 2)))


def test_hvp_fit_through_fused_attention_uses_the_math_kernels(monkeypatch):
    from curvlab import autodiff

    monkeypatch.setattr(autodiff.attention_kernels, "math", False)
    torch.manual_seed(0)
    model = _SDPA()  # float32: the fused kernel (float64 runs the math backend)
    X, y = torch.randn(8, 5, 4), torch.randint(0, 2, (8,))
    opt = PSGDKron(model.parameters(), lr=0.1, fit="hvp")

    def closure():
        return nn.functional.cross_entropy(model(X), y)

    for _ in range(2):
        opt.step(closure)
    assert autodiff.attention_kernels.math  # learned from the missing derivative
    assert opt.stats()["steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    dict(geometry="EQ", whiten="gradient", precond_init_scale=0.5), dict(fit="hvp", lr=0.1),
], ids=["eq", "hvp"])
def test_compiled_step_traces_every_fit_whole_and_equals_eager(kwargs):
    """compile_step with dynamo's eager backend (traced with fullgraph=True, run by the
    eager kernels, no code generation): every fit variant's pure parts trace without a
    graph break and the steps equal the eager ones to float32 rounding (the compiled
    parameter update takes lr as a float64 tensor: a few ulps), on a model with
    dense and diagonal factors and diagonal parameters, fitting on a random half of the
    steps. (The inductor-compiled step: tests/optim/test_compiled_step.py.)"""
    torch.manual_seed(0)
    X, y = torch.randn(6, 16, 6), torch.randint(0, 3, (6, 16))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = PSGDKron(model.parameters(), precond_update_prob=0.5, **kwargs)
        if compiled:
            opt.compile_step(backend="eager")
        if opt.param_groups[0]["fit"] == "hvp":
            _hvp_run(model, opt, X, y, range(6))
        else:
            for k in range(6):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[k]), y[k]).backward()
                opt.step()
        assert opt.stats()["refreshes"] > 1
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
