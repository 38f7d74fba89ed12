"""Edge cases that ruined training silently before the optimizer contract (one test each)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import curvlab.optim.preconditioners.base as preconditioner_mod
import curvlab.optim.shampoo as shampoo_mod
from curvlab.linalg.matfuncs import MatrixFunctionError
from curvlab.optim import SOAP, Muon, Shampoo
from curvlab.optim.preconditioners import guarded_batched


def test_muon_on_float16_keeps_biases_finite():
    """AdamW's second moment of a float16 bias underflowed and eps=1e-8 rounded to 0:
    inf biases after one step in 12 of 20 seeds."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).half()
        opt = Muon(model.parameters(), lr=0.02)
        X = torch.randn(32, 8).half()
        model(X).float().pow(2).mean().mul(1e-3).backward()  # small gradients
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), seed
        assert opt.stats()["skipped_steps"] == 0
        assert opt.state[model[0].bias]["exp_avg_sq"].dtype == torch.float32


def test_shampoo_grafting_beta2_of_one_is_refused():
    """grafting_beta2=1.0 froze the parameters (bias correction 1 - 1^t = 0)."""
    p = [nn.Parameter(torch.zeros(4, 4))]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="betas"):
        Shampoo(p, grafting_beta2=1.0)


def test_old_keyword_names_still_work_with_a_warning():
    p = [nn.Parameter(torch.zeros(4, 4))]
    with pytest.warns(DeprecationWarning, match="eps"):
        opt = Shampoo(p, epsilon=1e-10)
    assert opt.param_groups[0]["eps"] == 1e-10
    with pytest.warns(DeprecationWarning, match="adam_betas"):
        opt = Muon(p, adamw_betas=(0.8, 0.99))
    assert opt.param_groups[0]["adam_betas"] == (0.8, 0.99)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Muon(p, no_such_setting=1)


@pytest.mark.parametrize("cls", [Shampoo, SOAP])
@pytest.mark.parametrize("shape", [(20000, 2), (20000, 64)])
def test_thin_or_huge_matrices_get_the_diagonal_method(cls, shape, caplog, monkeypatch):
    """A (20000, 2) parameter (0.15 MiB) got 155 MiB of state; a (50000, 64) embedding
    415 MiB, without a warning."""
    monkeypatch.setattr(preconditioner_mod, "_LOGGED_RATIOS", set())  # warned once per shape
    p = nn.Parameter(torch.randn(*shape) * 0.01)
    opt = cls([p], lr=1e-3)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
    s = opt.stats()
    assert s["num_blocks"] == 0 and s["num_diagonal_params"] == 1
    assert s["state_bytes"] <= 4 * p.numel() * p.element_size()
    assert "diagonal method" in caplog.text
    # the limit can be lifted; then the cost is stated
    caplog.clear()
    small = nn.Parameter(torch.zeros(4096, 2))
    with caplog.at_level(logging.WARNING):
        opt = cls([small], max_state_ratio=None)
        small.grad = torch.randn_like(small)
        opt.step()
    assert opt.stats()["num_blocks"] > 0 and "Kronecker factors" in caplog.text


def test_a_root_that_overflows_the_state_dtype_keeps_the_previous_one():
    """Finiteness was checked in float64 before the cast to float32 overflowed."""
    F = torch.eye(3).expand(2, 3, 3).clone()
    prev = torch.full((2, 3, 3), 7.0)

    def cast_overflow(F):
        big = torch.full(F.shape, 1e300, dtype=torch.float64)
        assert torch.isfinite(big).all()  # finite where it was computed
        return (big.to(torch.float32),)

    (out,), failed = guarded_batched(cast_overflow, (F,), (prev,))
    assert failed == 2 and torch.equal(out, prev)


def test_a_refresh_that_always_fails_is_an_error(monkeypatch):
    """A preconditioner that can never be computed silently fell back forever."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=1,
                  start_preconditioning_step=1)

    def broken(*args, **kwargs):
        raise MatrixFunctionError("injected")

    monkeypatch.setattr(shampoo_mod, "matrix_inverse_root", broken)
    with pytest.raises(RuntimeError, match="refreshes in a row"):
        for _ in range(opt.max_refresh_failures + 1):
            opt.zero_grad()
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
    assert opt.stats()["refresh_failures"] >= opt.max_refresh_failures


@pytest.mark.parametrize("cls", [Shampoo, SOAP, Muon])
def test_a_scheduler_that_makes_lr_non_finite_raises(cls):
    p = nn.Parameter(torch.randn(4, 4))
    opt = cls([p])
    opt.param_groups[0]["lr"] = math.inf
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr"):
        opt.step()


class _TwoFields(nn.Module):
    """Embeddings with sparse gradients (``sparse=False``: the same function, dense)."""

    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(10, 4, sparse=sparse)
        self.item = nn.Embedding(7, 4, sparse=sparse)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.user(x[:, 0]) * self.item(x[:, 1])))


def _flat_vector_optimizers():
    from curvlab.optim import LBFGS, HessianFree, NaturalGradient

    loss = nn.CrossEntropyLoss()
    # (the Gauss-Newton diagonal: "auto" takes K-FAC for the dense model only, which has
    # Kronecker factors for embeddings with dense gradients)
    hf = lambda m: HessianFree(m, loss, cg_max_iter=5, preconditioner="ggn")  # noqa: E731
    return {"lbfgs": (lambda m: LBFGS(m.parameters(), max_iter=3), False),
            "hessian_free": (hf, True), "hessian_free/closure": (hf, False),
            "natural_gradient": (lambda m: NaturalGradient(m, loss_fn=loss), True),
            "natural_gradient/closure": (lambda m: NaturalGradient(m, loss_fn=loss), False)}


@pytest.mark.parametrize("name", list(_flat_vector_optimizers()))
def test_flat_vector_optimizers_take_sparse_gradients_as_the_dense_model(name):
    """L-BFGS, Hessian-free and natural gradient work on the flat gradient vector: a
    sparse embedding gradient is densified (as torch.optim.LBFGS does), and the run equals
    the dense model's."""
    make, use_batch = _flat_vector_optimizers()[name]
    X = torch.stack([torch.randint(0, 10, (24,)), torch.randint(0, 7, (24,))], dim=1)
    y = torch.randint(0, 3, (24,))
    finals = []
    for sparse in (True, False):
        model = _TwoFields(sparse).double()
        opt = make(model)

        def closure(opt=opt, model=model):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(batch=(X, y)) if use_batch else opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    moved = _TwoFields(False).double()
    assert max(float((a - b.detach()).abs().max())
               for a, b in zip(finals[1], moved.parameters())) > 1e-3
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [Shampoo, SOAP, Muon])
def test_elementwise_state_optimizers_refuse_sparse_gradients(cls):
    model = _TwoFields(True)
    opt = cls(model.parameters(), lr=0.01)
    X = torch.stack([torch.randint(0, 10, (8,)), torch.randint(0, 7, (8,))], dim=1)
    nn.functional.cross_entropy(model(X), torch.zeros(8, dtype=torch.long)).backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
