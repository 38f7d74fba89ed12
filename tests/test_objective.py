"""Objective: multi-batch accumulation, parameter subsets, train/eval mode."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.objective import Objective


def _problem(reduction="mean"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    X = torch.randn(11, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_batch_equals_one_big_batch(reduction):
    model, loss_fn, X, y = _problem(reduction)
    whole = Objective(model, loss_fn, (X, y))
    L, g = whole.loss_and_grad()
    # the reference: a plain autograd pass on the whole data, in eval mode
    model.eval()
    model.zero_grad()
    ref = loss_fn(model(X), y)
    ref.backward()
    ref_g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for data in ([(X[:3], y[:3]), (X[3:7], y[3:7]), (X[7:], y[7:])],
                 DataLoader(TensorDataset(X, y), batch_size=4)):
        obj = Objective(model, loss_fn, data)
        assert obj.num_samples == 11
        torch.testing.assert_close(obj.loss(), ref.detach(), rtol=1e-13, atol=0)
        Lb, gb = obj.loss_and_grad()
        torch.testing.assert_close(Lb, ref.detach(), rtol=1e-13, atol=0)
        torch.testing.assert_close(obj.flatten(gb), ref_g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(L, ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(whole.flat_grad(), ref_g, rtol=1e-12, atol=1e-15)
    assert sorted(g) == sorted(dict(model.named_parameters()))


def test_parameter_subsets_by_name_module_and_tensor():
    model, loss_fn, X, y = _problem()
    full = Objective(model, loss_fn, (X, y))
    assert full.num_params == 4 * 5 + 5 + 5 * 3 + 3
    by_name = Objective(model, loss_fn, (X, y), params=["3.weight", "0.bias"])
    assert list(by_name.params) == ["3.weight", "0.bias"]
    assert by_name.num_params == 15 + 5
    by_module = Objective(model, loss_fn, (X, y), params=model[3])
    assert list(by_module.params) == ["3.weight", "3.bias"]
    by_module_name = Objective(model, loss_fn, (X, y), params="3")
    assert list(by_module_name.params) == ["3.weight", "3.bias"]
    by_tensor = Objective(model, loss_fn, (X, y), params=[model[0].weight])
    assert list(by_tensor.params) == ["0.weight"]
    # the subset's gradient is the matching part of the full gradient
    g = full.loss_and_grad()[1]
    sub = by_module.loss_and_grad()[1]
    for k in sub:
        torch.testing.assert_close(sub[k], g[k], rtol=0, atol=0)
    # flatten / unflatten round trip, batched too
    v = torch.randn(by_name.num_params, dtype=torch.float64)
    assert torch.equal(by_name.flatten(by_name.unflatten(v)), v)
    V = torch.randn(3, by_name.num_params, dtype=torch.float64)
    assert torch.equal(by_name.flatten(by_name.unflatten(V, batched=True), batched=True), V)
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        Objective(model, loss_fn, (X, y), params="nope")
    with pytest.raises(ValueError, match="not a parameter"):
        Objective(model, loss_fn, (X, y), params=torch.zeros(3))
    with pytest.raises(ValueError, match="not part of the model"):
        Objective(model, loss_fn, (X, y), params=nn.Linear(2, 2))


def test_eval_mode_by_default_and_mode_restored():
    model, loss_fn, X, y = _problem()
    model.train()
    obj = Objective(model, loss_fn, (X, y))
    a, b = obj.loss(), obj.loss()
    assert torch.equal(a, b)  # Dropout off: deterministic
    model.eval()
    torch.testing.assert_close(a, loss_fn(model(X), y).detach(), rtol=1e-14, atol=0)
    model.train()
    obj.loss_and_grad()
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    stochastic = Objective(model, loss_fn, (X, y), train=True)
    torch.manual_seed(1)
    c = stochastic.loss()
    after = torch.rand(1)
    torch.manual_seed(2)
    d = stochastic.loss()
    assert not torch.equal(c, a)  # Dropout active in train mode
    assert torch.equal(c, d)  # one fixed mask: the objective is one function
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is untouched
    assert not model.training  # and the eval mode is restored


def test_callable_model_and_errors():
    W = torch.randn(3, 4, dtype=torch.float64)
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    obj = Objective(lambda p, x: x @ p["W"].T, nn.MSELoss(), (X, y), params={"W": W})
    L, g = obj.loss_and_grad()
    torch.testing.assert_close(g["W"], 2 * (X @ W.T - y).T @ X / y.numel())
    with pytest.raises(TypeError, match="callable model needs params"):
        Objective(lambda p, x: x, nn.MSELoss(), (X, y))
    with pytest.raises(ValueError, match="reduction"):
        Objective(nn.Linear(4, 3).double(), nn.MSELoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="data is required"):
        Objective(nn.Linear(4, 3).double(), nn.MSELoss(), None)
    with pytest.raises(TypeError, match="data must be"):
        Objective(nn.Linear(4, 3).double(), nn.MSELoss(), 3.0)
    with pytest.raises(ValueError, match="scalar"):
        Objective(nn.Linear(4, 3).double(), lambda o, t: (o - t) ** 2, (X, y)).loss()
    with pytest.raises(ValueError, match="expected"):
        obj.check_vector(torch.ones(5, dtype=torch.float64))


def test_building_an_objective_leaves_the_callers_rng_stream_alone():
    """A monitor check builds objectives inside a training loop: that must not shift the
    training run's Dropout masks or data order."""
    model, loss_fn, X, y = _problem()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for train in (False, True):
        Objective(model, loss_fn, (X, y), train=train).loss()
    assert torch.equal(torch.rand(3), expected)


class _TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (as in GPT-2), and a buffer
    registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        d = torch.float64  # (Module.double() would untie the buffer)
        self.emb = nn.Embedding(6, 3, dtype=d)
        self.mid = nn.Linear(3, 3, dtype=d)
        self.out = nn.Linear(3, 6, bias=False, dtype=d)
        self.out.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor([1.5, 0.5, 2.0], dtype=d))
        self.mid.register_buffer("scale", self.scale)

    def forward(self, x):
        if self.training:  # a running statistic, updated through the second name
            self.mid.scale.add_(1.0)
        h = torch.tanh(self.mid(self.emb(x)) * self.mid.scale)
        return self.out(h * self.scale).movedim(-1, 1)


def test_tied_weights_stay_tied_in_evaluations():
    """A point's tensor replaces every name of a tied parameter (functional_call runs
    without its own tie search), so gradient and HVP see both uses of the weight."""
    torch.manual_seed(0)
    model = _TiedLM()
    x, y = torch.randint(0, 6, (4, 5)), torch.randint(0, 6, (4, 5))
    loss_fn = nn.CrossEntropyLoss()
    obj = Objective(model, loss_fn, (x, y))
    assert sorted(obj.params) == ["emb.weight", "mid.bias", "mid.weight"]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    _, g = obj.loss_and_grad()
    for k, p in obj.params.items():
        torch.testing.assert_close(g[k], p.grad, rtol=1e-12, atol=1e-14)
    # an evaluation at another point moves both uses of the tied weight (and reads the
    # module's own buffers under both of their names)
    point = {k: p.detach() + 0.1 for k, p in obj.params.items()}
    with torch.no_grad():
        for p in obj.params.values():
            p.add_(0.1)
        ref = loss_fn(model(x), y)
        for p in obj.params.values():
            p.sub_(0.1)
    torch.testing.assert_close(obj.loss(point), ref, rtol=1e-13, atol=0)
    # train mode evaluates on copies of the buffers, under every name they have
    before = model.scale.clone()
    Objective(model, loss_fn, (x, y), train=True).loss()
    assert torch.equal(model.scale, before) and model.mid.scale is model.scale


def test_train_mode_calls_seed_only_the_cpu_generator(monkeypatch):
    """The fixed per-batch Dropout stream is set on the CPU generator itself:
    ``torch.manual_seed`` (which also queues a lazy seed, with a stack trace, for every
    accelerator backend) is not called per model call."""
    model, loss_fn, X, y = _problem()
    obj = Objective(model, loss_fn, (X, y), train=True)
    real, calls = torch.manual_seed, []
    monkeypatch.setattr(torch, "manual_seed", lambda s: calls.append(s) or real(s))
    a, b = obj.loss(), obj.loss_and_grad()[0]
    assert calls == []
    assert torch.equal(a, b)  # still one fixed mask


def test_active_dropout_warning_once_per_model(caplog):
    """Optimizers build objectives at every step (HessianFree three): the train-mode
    Dropout warning comes once per model, not at every construction."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    other = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    data = (torch.randn(8, 4), torch.randn(8, 3))
    with caplog.at_level("WARNING", logger="curvlab.objective"):
        for _ in range(3):
            Objective(model, nn.MSELoss(), data, train=True)
        Objective(other, nn.MSELoss(), data, train=True)
    assert caplog.text.count("active Dropout") == 2


def test_on_other_data_equals_a_new_objective_without_resolving_the_convention_again():
    """``objective.on(data)``: loss and gradient of a new Objective on ``data`` (a Hugging
    Face model's own loss: the convention resolved on the first data is reused, with no
    forward pass); the original keeps its data."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
                                  n_positions=16)
    lm = transformers.GPT2LMHeadModel(cfg).to(torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (8, 7), generator=g)
    mask = (torch.arange(7)[None] < torch.randint(3, 8, (8,), generator=g)[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}
    half = {k: v[:4] for k, v in batch.items()}
    obj = Objective(lm, None, batch)
    calls = []
    hook = lm.register_forward_hook(lambda *a: calls.append(1))
    sub = obj.on(half)
    hook.remove()
    assert calls == [] and sub.convention is obj.convention
    new = Objective(lm, None, half)
    for a, b in [(sub, new), (obj, Objective(lm, None, batch))]:
        la, ga = a.loss_and_grad()
        lb, gb = b.loss_and_grad()
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.flatten(ga), b.flatten(gb), rtol=1e-12, atol=0)


class _SparseEmbeddings(nn.Module):
    """A two-field classifier whose embeddings have sparse gradients (recommender-style
    models), or dense ones with ``sparse=False`` (the same function). (Not EmbeddingBag:
    torch has neither forward AD nor double backward for it, sparse or dense.)"""

    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(10, 4, sparse=sparse)
        self.item = nn.Embedding(7, 4, sparse=sparse)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.user(x[:, 0]) * self.item(x[:, 1] % 7)))


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator",
                                      "EmpiricalFisherOperator", "DiagonalOperator"])
def test_sparse_embedding_gradients_give_the_dense_models_curvature(operator):
    """autograd has no double backward through a sparse embedding gradient and flat vectors
    cannot hold one: evaluations run the embeddings dense (``module.sparse`` restored)."""
    import curvlab.linops as linops

    X = torch.randint(0, 10, (12, 2))
    y = torch.randint(0, 3, (12,))
    sparse, dense = (_SparseEmbeddings(s).double() for s in (True, False))
    cls = getattr(linops, operator)
    got = cls(sparse, nn.CrossEntropyLoss(), (X, y)).to_dense()
    want = cls(dense, nn.CrossEntropyLoss(), (X, y)).to_dense()
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    g = Objective(sparse, nn.CrossEntropyLoss(), (X, y), train=True).flat_grad()
    torch.testing.assert_close(g, Objective(dense, nn.CrossEntropyLoss(), (X, y)).flat_grad())
    assert sparse.user.sparse and sparse.item.sparse
    nn.functional.cross_entropy(sparse(X), y).backward()  # the user's own passes: still sparse
    assert sparse.user.weight.grad.is_sparse


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_weight_norm_hessian_equals_the_written_out_function(api, dim):
    """PyTorch's fused weight-norm kernel has a wrong double backward (torch 2.13: the
    Hessian in ``v`` off by ~30%, not symmetric): evaluations run the composite
    ``g v / ||v||`` instead, and the Hessian equals that of the function written out."""
    import warnings

    from torch.func import hessian

    from curvlab.linops import HessianOperator

    torch.manual_seed(0)
    first = nn.Linear(4, 5)
    if api == "parametrizations":
        first = nn.utils.parametrizations.weight_norm(first, dim=dim)
        g_name, v_name = ("0.parametrizations.weight.original0",
                          "0.parametrizations.weight.original1")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated in torch)
            first = nn.utils.weight_norm(first, dim=dim)
        g_name, v_name = "0.weight_g", "0.weight_v"
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    obj = op.objective

    def written_out(theta):
        p = obj.unflatten(theta)
        v = p[v_name]
        W = p[g_name] * v / v.norm(dim=1 - dim, keepdim=True)  # (norms over the other dim)
        h = torch.tanh(X @ W.T + p["0.bias"])
        return nn.functional.cross_entropy(h @ p["2.weight"].T + p["2.bias"], y)

    theta = obj.flatten(obj.param_tensors())
    torch.testing.assert_close(written_out(theta), obj.loss())
    want = hessian(written_out)(theta)
    torch.testing.assert_close(op.to_dense(), want, rtol=1e-10, atol=1e-12)
    patched = [o for m in model.modules() for o in (m, *m._forward_pre_hooks.values())
               if {"forward", "compute_weight"} & set(vars(o))]
    assert not patched  # the module is back as it was


# ---- wrapped models: torch.compile and DataParallel ---------------------------------------
def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_give_the_curvature_of_the_model_inside(wrap):
    """A torch.compile-d model refused double backward ("aot_autograd does not currently
    support double backward") and DataParallel the stateless API; both wrap the same
    function, so the operators unwrap them (parameter names with the wrapper's prefix
    select the same parameters)."""
    from curvlab.linops import GGNOperator, HessianOperator, KFACOperator

    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    plain = _small_cnn()
    inner = _small_cnn()
    wrapped = (torch.compile(inner, backend="aot_eager") if wrap == "compile"
               else nn.DataParallel(inner))
    for op in (HessianOperator, GGNOperator, KFACOperator):
        torch.testing.assert_close(op(wrapped, loss_fn, (X, y)).to_dense(),
                                   op(plain, loss_fn, (X, y)).to_dense(), rtol=1e-12, atol=0)
    prefix = "_orig_mod." if wrap == "compile" else "module."
    name = next(n for n, _ in wrapped.named_parameters())
    assert name.startswith(prefix)
    obj = Objective(wrapped, loss_fn, (X, y), params=[name, prefix + "3"])
    assert list(obj.params) == ["0.weight", "3.weight", "3.bias"]


class _FrequencyScaled(nn.Module):
    def __init__(self, scale: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 3, scale_grad_by_freq=scale)
        self.bag = nn.EmbeddingBag(6, 3, mode="sum", scale_grad_by_freq=scale)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1) + self.bag(x))


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator"])
def test_frequency_scaled_embedding_gradients_give_the_losss_curvature(operator):
    """scale_grad_by_freq=True divides each row's gradient by its token's count in the
    batch: not the derivative of the forward, so curvature products mixing it with
    forward-mode ones were asymmetric (GGN 11%, Hessian 25%) and not the loss's curvature.
    Evaluations run the embeddings unscaled (the flag restored afterwards)."""
    import curvlab.linops as linops

    x = torch.tensor([[1, 2, 1, 1], [3, 1, 0, 0], [4, 5, 1, 0]])
    y = torch.tensor([0, 1, 3])
    scaled, plain = (_FrequencyScaled(s).double() for s in (True, False))
    cls = getattr(linops, operator)
    got = cls(scaled, nn.CrossEntropyLoss(), (x, y)).to_dense()
    want = cls(plain, nn.CrossEntropyLoss(), (x, y)).to_dense()
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert scaled.emb.scale_grad_by_freq and scaled.bag.scale_grad_by_freq


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "offsets_last"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_bag_is_evaluated_in_a_form_with_second_derivatives(mode, layout,
                                                                      padding_idx):
    """nn.EmbeddingBag's kernel has no double backward (every Hessian / GGN product raised
    NotImplementedError): the objective evaluates it as a lookup and a reduction with the
    same value and gradient, whose Hessian equals the dense one of the written-out bags."""
    from curvlab.linops import HessianOperator
    from curvlab.objective import _embedding_bag

    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx,
                          include_last_offset=layout == "offsets_last").double()
    g = torch.Generator().manual_seed(1)
    if layout == "2d":
        x, offsets = torch.randint(0, 10, (5, 3), generator=g), None
    else:
        x = torch.randint(0, 10, (11,), generator=g)
        offsets = torch.tensor([0, 2, 2, 7] + ([11] if layout == "offsets_last" else []))
    weights = (torch.rand(x.shape, generator=g, dtype=torch.float64) if mode == "sum"
               else None)
    torch.testing.assert_close(_embedding_bag(bag, x, offsets, weights),
                               bag(x, offsets, weights), rtol=1e-14, atol=1e-15)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = bag, nn.Linear(4, 3).double()

        def forward(self, inputs):
            return self.head(torch.tanh(self.bag(inputs, offsets, weights)))

    model = Model()
    n = model(x).shape[0]
    y = torch.randint(0, 3, (n,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    grad_kernel = torch.autograd.grad(loss_fn(model(x), y), bag.weight)[0]
    obj = Objective(model, loss_fn, (x, y))
    torch.testing.assert_close(obj.loss_and_grad()[1]["bag.weight"], grad_kernel,
                               rtol=1e-12, atol=1e-14)
    H = HessianOperator(obj).to_dense()
    W, b = model.head.weight.detach(), model.head.bias.detach()

    def written_out(flat):  # the bags summed by hand from the rows they hold
        emb = flat[:40].reshape(10, 4)
        w2, b2 = flat[40:52].reshape(3, 4), flat[52:]
        rows = x if x.dim() == 2 else None
        if rows is None:
            starts = offsets[:-1] if layout == "offsets_last" else offsets
            ends = torch.cat([starts[1:], torch.tensor([11])])
            groups = [x[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
            wgroups = ([weights[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
                       if weights is not None else [None] * len(groups))
        else:
            groups = list(rows)
            wgroups = list(weights) if weights is not None else [None] * len(groups)
        outs = []
        for ids, wts in zip(groups, wgroups):
            keep = ids != padding_idx if padding_idx is not None else torch.ones_like(ids) > 0
            vecs = emb[ids[keep]]
            if wts is not None:
                vecs = vecs * wts[keep, None]
            if vecs.shape[0] == 0:
                outs.append(torch.zeros(4, dtype=torch.float64))
            elif mode == "sum":
                outs.append(vecs.sum(0))
            elif mode == "mean":
                outs.append(vecs.mean(0))
            else:
                outs.append(vecs.amax(0))
        return loss_fn(torch.tanh(torch.stack(outs)) @ w2.T + b2, y)

    theta = torch.cat([bag.weight.detach().reshape(-1), W.reshape(-1), b])
    torch.testing.assert_close(H, torch.autograd.functional.hessian(written_out, theta),
                               rtol=1e-10, atol=1e-12)


def test_rnn_models_are_evaluated_without_cudnn():
    """cuDNN's RNN backward has no derivative ('Double backwards is not supported for CuDNN
    RNNs'): on a GPU every Hessian product of an LSTM / GRU model raised. The objective's
    evaluations switch cuDNN off for models with RNN layers (and restore the setting);
    checked here by what the forward pass sees."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            seen.append(torch.backends.cudnn.enabled)
            return self.head(self.rnn(x)[0][:, -1])

    before = torch.backends.cudnn.enabled
    X, y = torch.randn(5, 3, 3), torch.randint(0, 2, (5,))
    Objective(Recorder(), nn.CrossEntropyLoss(), (X, y)).loss()
    assert seen == [False] and torch.backends.cudnn.enabled == before
    plain = nn.Sequential(nn.Linear(3, 2))
    plain.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.enabled))
    Objective(plain, nn.CrossEntropyLoss(), (X[:, 0], y)).loss()
    assert seen[-1] == before  # other models keep the user's setting


def test_tied_parameters_are_selected_by_any_of_their_names():
    """A language model's output layer shares the embedding's weight: named_parameters()
    lists it once (under the embedding), so params=['lm_head.weight'] was refused as
    'neither a parameter nor a module name'. Every name of the tensor selects it, under the
    name named_parameters() keeps."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)).mean(1))

    model = Tied()
    X, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    by_head = Objective(model, nn.CrossEntropyLoss(), (X, y), params=["head.weight"])
    by_module = Objective(model, nn.CrossEntropyLoss(), (X, y), params=["head"])
    assert list(by_head.params) == list(by_module.params) == ["emb.weight"]
    assert by_head.params["emb.weight"] is model.emb.weight


_CONVERTS_IN_FORWARD = '''
import torch
from torch import nn
from curvlab.linops import DiagonalOperator, GGNOperator


class Router(nn.Module):
    """Converts its classifier in every forward (as Switch Transformers' router does)."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        self.classifier = self.classifier.to(torch.float32)
        return self.classifier(x)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Router())
X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
params = list(model[0].parameters())
diag = DiagonalOperator(model, nn.CrossEntropyLoss(), (X, y), params).diagonal
dense = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), params).to_dense().diagonal()
assert float((diag - dense).abs().max()) <= 1e-5 * float(dense.abs().max()), (diag, dense)
assert model[2].classifier.weight.dtype == torch.float32
print("ok")
'''


def test_a_module_that_converts_itself_in_forward_does_not_crash_per_sample_evaluations():
    """``self.classifier = self.classifier.to(dtype)`` in a forward (Switch Transformers,
    NLLB-MoE routers) made the exact diagonal's ``vmap(vjp(...))`` crash the process with
    a segmentation fault (torch 2.13) when the converted weights were not differentiated.
    The objective's evaluations skip conversions that change nothing. Run in a subprocess:
    without the fix the interpreter dies."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _CONVERTS_IN_FORWARD], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_parameters_of_several_dtypes_and_conversions_in_forward_are_clear_errors():
    """Flat vectors have one dtype: a model mixing float32 and float64 parameters failed
    inside a product ("v leaf 2 has dtype torch.float32, expected torch.float64"); it is
    refused when the objective is built, naming the parameters. A module converting its
    own weights to another dtype in forward (Switch Transformers' router in a float64 or
    bfloat16 model) is refused by name instead of changing the evaluated parameters."""
    from curvlab.linops import HessianOperator

    mixed = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3).double())
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match="share one dtype.*'2.weight'"):
        Objective(mixed, nn.CrossEntropyLoss(), (X, y))
    obj = Objective(mixed, nn.CrossEntropyLoss(), (X, y), params=list(mixed[0].parameters()))
    assert obj.dtype == torch.float32  # one dtype selected: fine

    class Converts(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x):
            self.inner = self.inner.to(torch.float32)
            return self.inner(x.float())

    model = nn.Sequential(nn.Linear(4, 4), Converts()).double()
    with pytest.raises(TypeError, match="Linear converts itself with .to"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X.double(), y)).to_dense()
    assert model[1].inner.weight.dtype == torch.float64  # the model was left as it was


class _Augmented(torch.utils.data.Dataset):
    """Adds fresh noise to every input it serves (random augmentation)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.3 * torch.randn_like(self.X[i]), self.y[i]


def test_data_that_changes_between_passes_is_refused():
    """Each evaluation of an objective reads its DataLoader again. A shuffled loader with
    drop_last=True or random augmentation gave other data at each Hessian product (two
    products of one vector 60% / 27% apart, a 'converged' Lanczos top eigenvalue): a
    ValueError now. A plain shuffle in eval mode changes nothing (equal to a list of
    batches); in train mode, where batch statistics and Dropout streams depend on which
    samples share a batch, it is refused too. A pass left early is not a changed pass."""
    from curvlab.linops import HessianOperator

    torch.manual_seed(0)
    X, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    changing = {
        "shuffle_drop_last": DataLoader(TensorDataset(X, y), batch_size=24, shuffle=True,
                                        drop_last=True),
        "augmented": DataLoader(_Augmented(X, y), batch_size=16),
    }
    for loader in changing.values():
        op = HessianOperator(model, loss_fn, loader)
        with pytest.raises(ValueError, match="the data changed between two passes"):
            for _ in range(3):
                op.matvec(v)
    ref = HessianOperator(model, loss_fn, [(X[i:i + 16], y[i:i + 16])
                                           for i in range(0, 64, 16)]).matvec(v)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    op = HessianOperator(model, loss_fn, shuffled)
    for _ in range(3):
        torch.testing.assert_close(op.matvec(v), ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="in train mode, any shuffling"):
        op = HessianOperator(model, loss_fn, shuffled, train=True)
        for _ in range(3):
            op.matvec(v)
    ordered = DataLoader(TensorDataset(X, y), batch_size=16)
    obj = Objective(model, loss_fn, ordered, train=True)
    next(iter(obj.batches()))  # a pass left after one batch
    for _ in range(2):
        obj.flat_grad()


class _Checkpointed(nn.Module):
    """An MLP whose middle block runs under torch.utils.checkpoint (reentrant or not),
    fed by the data directly (``first=True``) or by a layer before it."""

    def __init__(self, reentrant, first):
        super().__init__()
        self.reentrant, self.first = reentrant, first
        self.inp = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = x if self.first else torch.tanh(self.inp(x))
        if self.reentrant is None:
            return self.head(self.block(h))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h,
                                                           use_reentrant=self.reentrant))


@pytest.mark.parametrize("first", [True, False], ids=["block_on_data", "block_after_layer"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_in_a_models_own_forward(reentrant, first):
    """Reentrant torch.utils.checkpoint recomputes its block in the backward pass with the
    module's own parameters: fed by the data, the block's curvature was missing with no
    error (Hessian 97%, GGN 75%, K-FAC 46% off); after a layer, every product raised. It is
    a plain call during curvlab's evaluations (and K-FAC's Monte-Carlo pass) now."""
    from curvlab.linops import GGNOperator, HessianOperator, KFACOperator
    from curvlab.optim import KFAC

    torch.manual_seed(0)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    plain = _Checkpointed(None, first).double()
    model = _Checkpointed(reentrant, first).double()
    model.load_state_dict(plain.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    for op in (HessianOperator, GGNOperator, KFACOperator):
        torch.testing.assert_close(op(model, loss_fn, (X, y)).to_dense(),
                                   op(plain, loss_fn, (X, y)).to_dense(), rtol=1e-12,
                                   atol=1e-14)
    if first:
        return  # (the block on the data trains no parameter of it with reentrant checkpoints)
    factors = []
    for net in (plain, model):
        opt = KFAC(net, loss_fn=loss_fn, fisher_type="mc", lr=0.1)
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
        factors.append([opt.state[p]["A"] for n, p in net.named_parameters()
                        if n.endswith("weight")])
    for a, b in zip(*factors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
