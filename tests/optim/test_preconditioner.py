"""Shared preconditioner core: blocking, failure policy, robustness and resume of all three."""

import io
import math

import pytest
import torch
from torch import nn

import curvlab.optim.shampoo as shampoo_mod
from curvlab.linalg.matfuncs import MatrixFunctionError
from curvlab.optim import SOAP, Muon, Shampoo, muon_param_groups
from curvlab.optim.preconditioners import guarded_batched, max_abs, plan_blocks


# ----------------------------------------------------------------------------- blocking
def test_plan_never_merges_a_matrix_into_one_vector():
    plan = plan_blocks((128, 64), max_preconditioner_dim=8192)
    assert plan.merged_shape == (128, 64) and len(plan.blocks) == 1 and not plan.diagonal


def test_plan_merges_small_conv_dims_and_splits_large_dims():
    assert plan_blocks((64, 32, 3, 3), 1024).merged_shape == (64, 288)
    assert plan_blocks((16, 1, 3, 3), 1024).merged_shape == (16, 9)
    plan = plan_blocks((300, 100), 128)
    assert [b for b, _ in plan.blocks] == [(128, 100), (128, 100), (44, 100)]
    x = torch.arange(300 * 100).view(300, 100)
    covered = torch.cat([x[sl].reshape(-1) for _, sl in plan.blocks]).sort().values
    assert torch.equal(covered, x.reshape(-1))
    assert plan_blocks((300, 100), 128, merge_dims=False).merged_shape == (300, 100)


def test_plan_diagonal_for_vectors_scalars_and_huge_parameters():
    assert plan_blocks((10,), 1024).diagonal
    assert plan_blocks((), 1024).diagonal
    assert plan_blocks((1, 7, 1), 1024).diagonal
    assert plan_blocks((100, 100), 1024, diagonal_threshold=5000).diagonal
    assert not plan_blocks((100, 100), 1024, diagonal_threshold=10_000).diagonal


def test_guarded_batched_keeps_previous_for_failing_blocks_only():
    X = torch.stack([torch.eye(2), torch.full((2, 2), float("nan")), 2 * torch.eye(2)])
    prev = (torch.full((3, 2, 2), -1.0),)

    def fn(A):
        if not torch.isfinite(A).all():
            raise MatrixFunctionError("bad")
        return (A * 10,)

    (out,), failed = guarded_batched(fn, (X,), prev)
    assert failed == 1
    torch.testing.assert_close(out[0], 10 * torch.eye(2))
    torch.testing.assert_close(out[1], prev[0][1])
    torch.testing.assert_close(out[2], 20 * torch.eye(2))


def test_guarded_batched_checks_floating_outputs_only_and_in_float32_at_least():
    """The guard's finiteness check (one float32 sum per output, no isfinite tensor):
    a NaN / inf output is a failure, a float16 output whose float16 sum would overflow is
    not, and integer outputs (permutations) are not checked."""
    prev = (torch.zeros(2, 2, 2, dtype=torch.float16), torch.zeros(2, 2, dtype=torch.long))
    big = torch.full((2, 2, 2), 60000.0, dtype=torch.float16)  # sum 4.8e5 > float16 max
    order = torch.tensor([[1, 0], [0, 1]])
    (out, perm), failed = guarded_batched(lambda A: (A, order), (big,), prev)
    assert failed == 0 and torch.equal(out, big) and torch.equal(perm, order)
    for bad in (float("nan"), float("inf")):
        X = big.clone()
        X[1, 0, 0] = bad
        (out, _), failed = guarded_batched(lambda A: (A, order[:A.shape[0]]), (X,), prev)
        assert failed == 1 and torch.equal(out[1], prev[0][1]) and torch.equal(out[0], big[0])


def test_max_abs_bounds_magnitude_and_detects_nonfinite():
    assert 3.0 <= max_abs([torch.tensor([1.0, -3.0]), torch.tensor([2.0])]) <= 3.1623
    assert max_abs([torch.tensor([1e30, -3e30])]) >= torch.tensor(3e30).item()
    assert max_abs([torch.tensor([1e30, -3e30])]) < float("inf")
    assert math.isnan(max_abs([torch.tensor([1.0, float("nan")])]))
    assert max_abs([torch.tensor([1.0]), torch.tensor([float("-inf")])]) == float("inf")


# ----------------------------------------------------------------------------- all three
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


FACTORIES = {
    "shampoo": lambda m: Shampoo(m.parameters(), lr=1e-2, precondition_frequency=3,
                                 start_preconditioning_step=2, max_preconditioner_dim=6),
    "shampoo-qr": lambda m: Shampoo(m.parameters(), lr=1e-2, precondition_frequency=3,
                                    start_preconditioning_step=2, max_preconditioner_dim=6,
                                    root_method="qr"),
    "soap": lambda m: SOAP(m.parameters(), lr=1e-2, precondition_frequency=3,
                           max_preconditioner_dim=6),
    "muon": lambda m: Muon(muon_param_groups(m, lr=1e-2, adamw_lr=1e-2)),
}


def _state_tensors(opt):
    sd = opt.state_dict()
    out = [v for st in sd["state"].values() for v in st.values() if torch.is_tensor(v)]
    if "preconditioner" in sd:
        out += [v for g in sd["preconditioner"]["groups"] for v in g.values()]
    return out


def _train(model, opt, steps, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        X = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        (model(X).pow(2).mean() * scale).backward()
        opt.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_from_checkpoint_is_bit_for_bit(name):
    model = _model()
    opt = FACTORIES[name](model)
    _train(model, opt, 4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 7, seed=2)  # crosses refreshes at steps 5 and 8
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = _model(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = FACTORIES[name](model2)
    opt2.load_state_dict(ckpt["opt"])
    assert all(t.device == torch.device("cpu") for t in _state_tensors(opt2))
    _train(model2, opt2, 7, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30, 1e-15, 1e15])
def test_extreme_gradient_scales_never_produce_nonfinite_values(name, scale):
    model = _model()
    opt = FACTORIES[name](model)
    _train(model, opt, 7, seed=0, scale=scale)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in _state_tensors(opt)
               if t.is_floating_point() and t.ndim > 0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_rank_deficient_statistics_stay_finite(name):
    model = _model()
    opt = FACTORIES[name](model)
    X = torch.randn(1, 6).expand(16, 6)  # every sample identical: rank-1 gradients
    for _ in range(7):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step_or_raises(name, bad):
    model = _model()
    opt = FACTORIES[name](model)
    _train(model, opt, 3, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [t.clone() for t in _state_tensors(opt)]
    opt.zero_grad()
    model(torch.randn(4, 6)).pow(2).mean().backward()
    next(model.parameters()).grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), state_before, strict=True))
    assert opt.stats()["skipped_steps"] == 1
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        opt.step()


def test_failed_root_keeps_previous_preconditioner_and_is_counted(monkeypatch):
    model = _model()
    opt = FACTORIES["shampoo"](model)
    _train(model, opt, 2, seed=0)  # first refresh at step 2
    roots = [g["R0"].clone() for g in opt._whole_state() if "R0" in g]

    def broken(*args, **kwargs):
        raise MatrixFunctionError("injected failure")

    monkeypatch.setattr(shampoo_mod, "matrix_inverse_root", broken)
    _train(model, opt, 3, seed=1)  # refresh at step 5 fails for every block
    after = [g["R0"] for g in opt._whole_state() if "R0" in g]
    assert all(torch.equal(a, b) for a, b in zip(roots, after, strict=True))
    s = opt.stats()
    assert s["refresh_failures"] == s["num_blocks"] * 2  # two factors per block
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_params_without_gradients_are_left_alone():
    model = _model()
    opt = FACTORIES["shampoo"](model)
    frozen = model[2].weight
    before = frozen.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)


def test_stats_report_memory_and_counts():
    model = _model()
    opt = FACTORIES["soap"](model)
    _train(model, opt, 4, seed=0)
    s = opt.stats()
    assert s["state_bytes"] > 0
    assert s["num_diagonal_params"] == 3  # biases
    assert s["refreshes"] > 0 and s["refresh_failures"] == 0


def test_load_state_dict_rejects_foreign_checkpoints():
    model = _model()
    opt = FACTORIES["shampoo"](model)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=1.0).state_dict())


def test_add_param_group_after_the_first_step_keeps_the_state():
    model = _model()
    opt = Shampoo(list(model[0].parameters()), lr=1e-2)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.0})
    _train(model, opt, 2, seed=0)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    opt.add_param_group({"params": list(model[4].parameters())})
    assert len(opt.param_groups) == 3
    after = opt.state[model[0].weight]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _train(model, opt, 1, seed=1)
    assert opt.state[model[4].weight]["step"] == 1


def test_one_process_gets_the_local_distributor_and_bad_modes_are_refused():
    """The blocked base delegates data parallelism to one distributor object chosen from
    ``process_group`` and ``distributed_mode`` (the multi-process ones are exercised in
    tests/distributed)."""
    from curvlab.optim.distributors import BlockDistributor

    p = torch.zeros(4, 3, requires_grad=True)
    opt = Shampoo([p])
    assert type(opt.distributor) is BlockDistributor and opt.timings is opt.distributor.timings
    with pytest.raises(ValueError, match="distributed_mode"):
        Shampoo([p], distributed_mode="ring")


def test_an_incomplete_preconditioner_is_refused_at_construction():
    """The declared interface is checked when the optimizer is built (naming the missing
    hooks), not at the first step that needs one."""
    from curvlab.optim.preconditioners import BlockedPreconditionerOptimizer

    class NoPrecondition(BlockedPreconditionerOptimizer):
        def _init_block_state(self, group, shape, n, dtype, device):
            return {}

        def _init_diagonal_state(self, group, n, dtype, device):
            return {}

        def _update_statistics(self, group, st, G, step):
            pass

        def _diagonal_direction(self, group, st, g, step):
            return g

    defaults = dict(lr=0.1, weight_decay=0.0, max_preconditioner_dim=8, merge_dims=True,
                    precondition_frequency=1, start_preconditioning_step=1,
                    diagonal_threshold=None, max_state_ratio=8.0)
    with pytest.raises(TypeError, match="_refresh_blocks, _precondition"):
        NoPrecondition([torch.zeros(3, 3, requires_grad=True)], defaults)
