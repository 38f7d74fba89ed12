"""NaturalGradient against the textbook natural-gradient step on logistic regression."""

import copy

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim import NaturalGradient

pytest.importorskip("curvlab.linops.fisher", reason="needs the Fisher operators (linops)")

D64 = torch.float64


def logistic_problem(seed=0, n=30, d=4, c=3):
    torch.manual_seed(seed)
    model = nn.Linear(d, c).to(D64)
    X, y = torch.randn(n, d, dtype=D64), torch.randint(0, c, (n,))
    return model, X, y


def textbook_fisher(model, X):
    """F = (1/N) sum_n (diag(p_n) - p_n p_n^T) kron [x_n; 1][x_n; 1]^T in the flat layout
    [W (row-major), b] of a linear softmax model."""
    with torch.no_grad():
        P = torch.softmax(model(X), dim=1)
    n, d = X.shape
    c = P.shape[1]
    F = torch.zeros(c * (d + 1), c * (d + 1), dtype=D64)
    for i in range(n):
        S = torch.diag(P[i]) - torch.outer(P[i], P[i])
        xa = torch.cat([X[i], torch.ones(1, dtype=D64)])
        F_aug = torch.kron(S, torch.outer(xa, xa))  # [W | b] row-major layout
        idx = torch.cat([torch.arange(c * d).reshape(c, d),
                         c * d + torch.arange(c).reshape(c, 1)], 1).reshape(-1)
        F[idx.unsqueeze(1), idx.unsqueeze(0)] += F_aug
    return F / n


@pytest.mark.parametrize("kl_clip", [None, 1e-2])
def test_logistic_regression_textbook_step(kl_clip):
    """``-lr nu (F + lambda I)^-1 g`` with the KL clip ``nu = min(1, sqrt(kl_clip / (lr^2
    <d, g>)))`` (engaged here: nu < 1)."""
    model, X, y = logistic_problem()
    lam, lr = 1e-3, 0.7
    F = textbook_fisher(model, X)
    g = Objective(model, nn.CrossEntropyLoss(), (X, y)).flat_grad()
    d = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=D64), g)
    nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / (lr ** 2 * float(d @ g))) ** 0.5)
    ref = -lr * nu * d
    before = torch.cat([model.weight.reshape(-1), model.bias]).detach().clone()
    opt = NaturalGradient(model, lr=lr, damping=lam, kl_clip=kl_clip, cg_tol=1e-12,
                          cg_max_iter=200)
    opt.step(batch=(X, y))
    after = torch.cat([model.weight.reshape(-1), model.bias]).detach()
    torch.testing.assert_close(after - before, ref, atol=1e-8, rtol=1e-7)
    assert opt.stats()["cg_residual"] <= 1e-12
    assert opt.stats()["kl_clip_scale"] == pytest.approx(nu, rel=1e-9)
    assert (nu < 0.5) if kl_clip else nu == 1.0


def test_defaults_train_a_digits_mlp():
    """At its defaults (lr 1, damping 1e-3) the unclipped full step on a batch Fisher of
    rank <= samples x classes took the loss from 2.3 to 1e4-1e5 within 30 steps on the
    digits MLPs; the KL clip (default 1e-2) keeps every step a trust-region step."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = NaturalGradient(model, loss_fn=nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(0)
    losses = [float(opt.step(batch=(X[idx], y[idx])))
              for idx in (torch.randint(0, len(X), (128,), generator=g) for _ in range(30))]
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(X), y))
    assert max(losses) <= losses[0] + 0.05 and final < 0.5, (max(losses), final)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_other_fishers_solve_their_system(fisher_type):
    model, X, y = logistic_problem(1)
    opt = NaturalGradient(model, damping=0.1, fisher_type=fisher_type, cg_tol=1e-12,
                          cg_max_iter=200, seed=4, kl_clip=None)
    F = opt.fisher((X, y)).to_dense()
    opt._generator.manual_seed(4)  # the step draws the same labels again
    g = Objective(model, nn.CrossEntropyLoss(), (X, y)).flat_grad()
    ref = -torch.linalg.solve(F + 0.1 * torch.eye(F.shape[0], dtype=D64), g)
    before = torch.cat([model.weight.reshape(-1), model.bias]).detach().clone()
    opt.step(batch=(X, y))
    after = torch.cat([model.weight.reshape(-1), model.bias]).detach()
    torch.testing.assert_close(after - before, ref, atol=1e-8, rtol=1e-7)


def test_converges_to_the_logistic_regression_optimum():
    model, X, y = logistic_problem(2, n=40)
    opt = NaturalGradient(model, lr=1.0, damping=1e-4, weight_decay=0.0)
    obj = Objective(model, nn.CrossEntropyLoss(), (X, y))
    for _ in range(15):
        opt.step(batch=(X, y))
    # the optimum of an unregularized separable-ish problem has a small gradient
    assert obj.flat_grad().norm() < 1e-3 * (1 + float(obj.loss()))


def test_state_dict_closure_groups_and_nonfinite():
    model, X, y = logistic_problem(3)
    lf = nn.CrossEntropyLoss()
    mk = lambda m: NaturalGradient(m, lr=0.5, fisher_type="mc", momentum=0.5, params=[  # noqa: E731
        {"params": [m.weight]}, {"params": [m.bias], "lr": 0.1}])
    opt = mk(model)

    def closure(model=model, opt=opt):
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss
    opt.step(closure, batch=(X, y))
    sm, so = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(batch=(X, y))
    model2 = logistic_problem(7)[0]
    model2.load_state_dict(sm)
    opt2 = mk(model2)
    opt2.load_state_dict(so)
    for _ in range(2):
        opt2.step(batch=(X, y))
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    Xb = X.clone()
    Xb[0, 0] = float("inf")
    w = model.weight.clone()
    opt.step(batch=(Xb, y))
    assert torch.equal(model.weight, w) and opt.stats()["skipped_steps"] == 1
    with pytest.raises(ValueError, match="batch"):
        opt.step()
    with pytest.raises(ValueError, match="fisher_type"):
        NaturalGradient(model, fisher_type="kfac")


def test_closure_only_step_uses_the_closure_inputs():
    model, X, y = logistic_problem(5)
    twin = copy.deepcopy(model)
    NaturalGradient(model, damping=0.1, cg_tol=1e-12).step(batch=(X, y))
    opt = NaturalGradient(twin, damping=0.1, cg_tol=1e-12)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(twin(X), y)
        loss.backward()
        return loss
    opt.step(closure)
    torch.testing.assert_close(twin.weight, model.weight, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="'exact' or 'mc'"):
        NaturalGradient(twin, fisher_type="empirical").step(closure)


def test_weight_decay_is_decoupled_with_momentum():
    """``buf = mu buf + d``, ``theta <- (1 - lr wd) theta - lr buf`` (the contract's decoupled
    decay; it used to enter the momentum as ``wd theta`` added to ``d``): two steps against
    the formula with the solver's directions."""
    model, X, y = logistic_problem(5)
    lr, wd, mu = 0.5, 0.1, 0.9
    opt = NaturalGradient(model, lr=lr, damping=0.1, momentum=mu, weight_decay=wd,
                          cg_tol=1e-12, cg_max_iter=200, kl_clip=None)
    theta = torch.cat([model.weight.reshape(-1), model.bias]).detach().clone()
    buf = torch.zeros_like(theta)
    for _ in range(2):
        opt.step(batch=(X, y))
        d = torch.cat([opt.state[model.weight]["direction"].reshape(-1),
                       opt.state[model.bias]["direction"]])
        buf = mu * buf + d
        theta = (1 - lr * wd) * theta - lr * buf
    after = torch.cat([model.weight.reshape(-1), model.bias]).detach()
    torch.testing.assert_close(after, theta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_hugging_face_dict_batch_with_the_models_own_loss(fisher_type, monkeypatch):
    """``loss_fn=None`` on a dict batch with ``"labels"`` (padded, -100) is the model's own
    loss (it was replaced by a plain cross-entropy, which failed on the sequence logits): the
    step solves the damped system of the dense Fisher of that loss. The step resolves the
    model's loss convention once (its Fisher reuses the gradient objective's: twice before)."""
    transformers = pytest.importorskip("transformers")
    from curvlab.linops.fisher import EmpiricalFisherOperator, FisherOperator

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
                                  n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).to(D64).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (6, 7), generator=g)
    mask = (torch.arange(7)[None] < torch.randint(3, 8, (6,), generator=g)[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}
    params = [model.transformer.ln_f.weight, model.transformer.ln_f.bias,
              model.transformer.h[0].mlp.c_proj.bias]
    op = FisherOperator if fisher_type == "exact" else EmpiricalFisherOperator
    F = op(model, None, batch, params).to_dense()
    grad = Objective(model, None, batch, params).flat_grad()
    lr, lam = 0.5, 0.1
    expected = -lr * torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=D64), grad)
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    opt = NaturalGradient(model, lr=lr, damping=lam, fisher_type=fisher_type, params=params,
                          cg_tol=1e-12, cg_max_iter=200, kl_clip=None)
    calls = []
    resolve = Objective._resolve_model_loss
    monkeypatch.setattr(Objective, "_resolve_model_loss",
                        lambda self: calls.append(1) or resolve(self))
    opt.step(batch=batch)
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after - before, expected, rtol=1e-8, atol=1e-10)
    assert len(calls) == 1


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("how", ["batch", "closure"])
def test_parameters_the_loss_does_not_reach_are_left_alone(how):
    """As torch's optimizers skip a parameter whose ``.grad`` is None: no step, no weight
    decay (it shrank a layer the loss never uses by ``lr wd`` every step)."""
    torch.manual_seed(0)
    model = _WithUnusedLayer().to(D64)
    X, y = torch.randn(16, 4, dtype=D64), torch.randint(0, 3, (16,))
    lf = nn.CrossEntropyLoss()
    opt = NaturalGradient(model, lr=0.5, damping=0.1, weight_decay=0.1, momentum=0.5,
                          loss_fn=lf)
    unused = [p.detach().clone() for p in model.unused.parameters()]
    used = [p.detach().clone() for p in model.used.parameters()]

    def closure():
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(batch=(X, y)) if how == "batch" else opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(unused, model.unused.parameters()))
    assert not any(torch.equal(a, p) for a, p in zip(used, model.used.parameters()))
    assert opt.state[model.used.weight]["direction"] is not None
