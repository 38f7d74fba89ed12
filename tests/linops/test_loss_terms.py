"""ignore_index, class weights and batch splits: every operator against dense float64 truth.

A mean loss divides by its number of loss terms (valid targets, or the sum of their class
weights), not by the number of samples. Several batches must reproduce one big batch, a
batch whose targets are all ignored contributes nothing, and the curvature must be that of
the valid targets. The truth here is written out with torch.autograd on the concatenated
data, never through curvlab.
"""

import pytest
import torch
from _linops_truth import Truth, mlp, rel_err
from torch import nn

from curvlab.linops import (
    DiagonalOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from curvlab.objective import Objective

N = 12
IGNORED = [1, 4, 5, 6, 7, 10]  # samples 4..7 form one whole batch when split in 4


def _data(layout: str):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    if layout == "flat":
        y = torch.randint(0, 3, (N,), generator=g)
        y[IGNORED] = -100
    else:  # a sequence model's (B, C, T) logits: positions ignored one by one
        y = torch.randint(0, 3, (N, 2), generator=g)
        y[IGNORED, 0] = -100
        y[[4, 5, 6, 7], 1] = -100
    return X, y


class SeqModel(nn.Module):
    """(B, 4) -> (B, 3 classes, 2 positions)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(0, d_out=6)

    def forward(self, x):
        return self.net(x).reshape(-1, 3, 2)


def _model(layout):
    return mlp(0) if layout == "flat" else SeqModel().double()


def _splits(X, y, k):
    size = N // k
    return [(X[i:i + size], y[i:i + size]) for i in range(0, N, size)]


def _per_term_ef(truth: Truth, loss_fn: nn.CrossEntropyLoss) -> torch.Tensor:
    """``sum_i (n_i / N) g_i g_i^T`` with ``g_i`` the gradient of sample ``i``'s own mean
    loss and ``n_i`` its normalizer (valid targets weighted by class)."""
    w = loss_fn.weight
    rows, n = [], []
    for i in range(N):
        yi = truth.y[i:i + 1]
        valid = yi != -100
        ni = float((w[yi.clamp_min(0)] * valid).sum()) if w is not None else float(valid.sum())
        if ni == 0:
            continue
        t = truth.theta.clone().requires_grad_(True)
        loss = loss_fn(truth.outputs(t, truth.X[i:i + 1]), yi)
        rows.append(torch.autograd.grad(loss, t)[0])
        n.append(ni)
    G, n = torch.stack(rows), torch.tensor(n, dtype=torch.float64)
    return (G.T * (n / n.sum())) @ G


def _objectives_over_splits_equal_dense_truth(model, loss_fn, X, y, H, G, EF):
    """For the data in 1, 2 and 4 batches: the objective's loss equals the loss on all of
    it, its Hessian, GGN and empirical Fisher equal the dense ``H``, ``G``, ``EF``, and the
    exact diagonals theirs; returns the objectives for further checks. ``G=None``: a loss
    linear in the model output, whose GGN (zero) is refused."""
    loss, objectives = loss_fn(model(X), y), []
    for k in (1, 2, 4):
        obj = Objective(model, loss_fn, _splits(X, y, k))
        torch.testing.assert_close(obj.loss(), loss.detach(), rtol=1e-12, atol=0)
        assert rel_err(HessianOperator(obj).to_dense(), H) < 1e-10
        if G is None:
            with pytest.raises(ValueError, match="linear in the model output"):
                GGNOperator(obj)
        else:
            assert rel_err(GGNOperator(obj).to_dense(), G) < 1e-10
        assert rel_err(EmpiricalFisherOperator(obj).to_dense(), EF) < 1e-10
        for curvature, dense in (("ggn", G), ("ef", EF), ("hessian", H)):
            if dense is None:
                continue
            diag = DiagonalOperator(obj, curvature=curvature, method="exact").diagonal
            assert rel_err(diag, dense.diagonal()) < 1e-10, (curvature, k)
        objectives.append(obj)
    return objectives


@pytest.mark.parametrize("layout", ["flat", "sequence"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_every_operator_over_batch_splits_equals_dense_truth(layout, weighted, smoothing):
    """With class weights and label smoothing a term's curvature weighs ``(1 - eps) w_y +
    eps mean(w)``: taking ``w_y`` gave a GGN 8% off the truth without an error."""
    X, y = _data(layout)
    model = _model(layout)
    weight = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64) if weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-100, label_smoothing=smoothing)
    truth = Truth(model, loss_fn, X, y)
    H, G = truth.hessian(), truth.ggn()
    EF = _per_term_ef(truth, loss_fn)
    for obj in _objectives_over_splits_equal_dense_truth(model, loss_fn, X, y, H, G, EF):
        if not weighted:  # a weighted cross-entropy is not a likelihood: Fisher refuses it
            assert rel_err(FisherOperator(obj).to_dense(), G) < 1e-10


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_divergence_batchmean_over_batch_splits_equals_dense_truth(log_target):
    """``nn.KLDivLoss(reduction="batchmean")`` (torch's recommended KL reduction: the sum
    over elements divided by the batch size) is a mean with one loss term per sample; it
    was refused ("reduction must be 'mean' or 'sum'")."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    p = torch.randn(N, 3, generator=g, dtype=torch.float64).softmax(-1)
    y = p.log() if log_target else p
    model = nn.Sequential(mlp(0), nn.LogSoftmax(-1))
    loss_fn = nn.KLDivLoss(reduction="batchmean", log_target=log_target)
    truth = Truth(model, loss_fn, X, y)
    H = truth.hessian()
    assert truth.ggn().abs().max() == 0  # KL is linear in the log-probabilities: GGN refused
    per_sample = truth.per_sample_grads()  # each sample's own batchmean loss (its sum)
    EF = per_sample.T @ per_sample / N
    _objectives_over_splits_equal_dense_truth(model, loss_fn, X, y, H, None, EF)
    with pytest.raises(ValueError, match="batchmean"):
        Objective(model, nn.MSELoss(), (X, y), reduction="batchmean")


def test_mc_fisher_with_ignored_targets_is_unbiased():
    X, y = _data("flat")
    model = _model("flat")
    loss_fn = nn.CrossEntropyLoss()
    G = Truth(model, loss_fn, X, y).ggn()
    F = FisherOperator(model, loss_fn, _splits(X, y, 4), mode="mc", num_samples=4000,
                       seed=0).to_dense()
    assert rel_err(F, G) < 0.05


def test_all_ignored_data_is_a_clear_error():
    X, y = _data("flat")
    with pytest.raises(ValueError, match="every target is ignored"):
        Objective(mlp(0), nn.CrossEntropyLoss(), (X, torch.full_like(y, -100))).loss()


def test_generators_are_read_once_and_give_the_list_answer():
    X, y = _data("flat")
    model, loss_fn = mlp(0), nn.CrossEntropyLoss()
    batches = _splits(X, y, 4)
    ref = GGNOperator(model, loss_fn, batches).to_dense()
    obj = Objective(model, loss_fn, (b for b in batches))
    assert obj.num_loss_terms == N - len(IGNORED)
    torch.testing.assert_close(obj.loss(), Objective(model, loss_fn, batches).loss(),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(GGNOperator(model, loss_fn, iter(batches)).to_dense(), ref,
                               rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="used up"):
        it = iter(batches)
        list(it)
        Objective(model, loss_fn, it)


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(2 * 2 * 2, 3)).double()


def test_train_mode_products_leave_buffers_unchanged_and_see_one_function():
    model = _bn_cnn()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    before = {k: b.clone() for k, b in model.named_buffers()}
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    for op in (HessianOperator(model, nn.CrossEntropyLoss(), data, train=True),
               GGNOperator(model, nn.CrossEntropyLoss(), data, train=True)):
        A = op.to_dense()
        # one fixed Dropout mask per batch: the products form one symmetric matrix
        torch.testing.assert_close(A, A.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.to_dense(), A, rtol=0, atol=0)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    assert model.training  # nn.Module default, restored


def test_natural_gradient_step_with_a_generator_batch_moves_like_a_list():
    from curvlab.optim import NaturalGradient

    X, y = _data("flat")
    y = y.clamp_min(0)
    moved = []
    for make in (lambda: [(X, y)], lambda: iter([(X, y)])):
        model = mlp(0)
        opt = NaturalGradient(model, lr=0.5, damping=1e-2, loss_fn=nn.CrossEntropyLoss(),
                              fisher_type="exact")
        opt.step(batch=make())
        moved.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.equal(moved[0], torch.cat([p.detach().reshape(-1)
                                                for p in mlp(0).parameters()]))
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-12, atol=1e-14)


def test_optimizer_batch_steps_run_in_the_models_mode():
    """NaturalGradient / HessianFree step(batch=...) evaluate the model in its own mode:
    a training step updates BatchNorm statistics once, as a plain forward would."""
    from curvlab.optim import HessianFree, NaturalGradient

    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    for make in (lambda m: NaturalGradient(m, lr=0.1, damping=1e-1,
                                           loss_fn=nn.CrossEntropyLoss()),
                 lambda m: HessianFree(m, nn.CrossEntropyLoss())):
        model = _bn_cnn()
        model.train()
        ref = _bn_cnn()
        ref.train()
        with torch.no_grad():
            ref(X)  # one training forward: the statistics a step should leave
        make(model).step(batch=(X, y))
        bn, bn_ref = model[1], ref[1]
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-12, atol=0)
        assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("loss_fn", [nn.NLLLoss(), nn.KLDivLoss(reduction="batchmean"),
                                     nn.L1Loss()])
def test_a_loss_linear_in_the_outputs_has_its_zero_ggn_refused(loss_fn):
    """A model ending in LogSoftmax with NLLLoss (or KLDivLoss; L1 is piecewise linear): the
    loss's Hessian in the outputs is 0, so the GGN, its diagonal and exact K-FAC were all
    exactly 0 with no error (HessianFree then took damping-only steps). They raise now and
    say what to do; the Hessian and the empirical Fisher still work."""
    from curvlab.linops import KFACOperator

    g = torch.Generator().manual_seed(5)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    model = nn.Sequential(mlp(0), nn.LogSoftmax(-1))
    if isinstance(loss_fn, nn.NLLLoss):
        y = torch.randint(0, 3, (N,), generator=g)
    elif isinstance(loss_fn, nn.KLDivLoss):
        y = torch.randn(N, 3, generator=g, dtype=torch.float64).softmax(-1)
    else:
        y = torch.randn(N, 3, generator=g, dtype=torch.float64)
    assert Truth(model, loss_fn, X, y).ggn().abs().max() == 0
    for build in (lambda: GGNOperator(model, loss_fn, (X, y)),
                  lambda: DiagonalOperator(model, loss_fn, (X, y)),
                  lambda: KFACOperator(model, loss_fn, (X, y), fisher_type="exact")):
        with pytest.raises(ValueError, match="linear in the model output"):
            build()
    assert HessianOperator(model, loss_fn, (X, y)).to_dense().abs().max() > 0
    assert EmpiricalFisherOperator(model, loss_fn, (X, y)).to_dense().abs().max() > 0
