"""Laplace log marginal likelihood: against laplace-torch (float64) and a dense construction."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.diagnostics import laplace_log_marginal_likelihood as lml
from curvlab.linops import GGNOperator, HessianOperator, KFACOperator


def _data(outputs=3, regression=False, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (torch.randn(n, outputs, generator=g, dtype=torch.float64) if regression
         else torch.randint(0, outputs, (n,), generator=g))
    return X, y


def _mlp(outputs=3, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(),
                         nn.Linear(5, outputs, bias=bias)).double()


def _dense_reference(model, X, Y, *, regression, delta, sigma=1.0, T=1.0, mu0=0.0):
    """laplace-torch's formula from a dense float64 GGN of the summed negative
    log-likelihood built with torch.func (independent of curvlab's operators)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p: torch.func.functional_call(model, p, (X,))  # noqa: E731
    J = torch.func.jacrev(f)(params)
    out = f(params)
    k = out.shape[1]
    Jf = torch.cat([J[name].reshape(len(X) * k, -1) for name in params], dim=1)
    if regression:
        H = Jf.T @ Jf / sigma ** 2
        loglik = (-0.5 * float(((out - Y) ** 2).sum()) / (sigma ** 2 * T)
                  - Y.numel() * math.log(sigma * math.sqrt(2 * math.pi)))
    else:
        p = out.softmax(-1)
        L = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
        H = Jf.T @ L @ Jf
        loglik = -float(nn.functional.cross_entropy(out, Y, reduction="sum")) / T
    n = H.shape[0]
    P = H / T + delta * torch.eye(n, dtype=H.dtype)
    theta = torch.cat([v.reshape(-1) for v in params.values()])
    scatter = delta * float(((theta - mu0) ** 2).sum())
    return loglik - 0.5 * (float(torch.logdet(P)) - n * math.log(delta)) - 0.5 * scatter


@pytest.mark.parametrize("regression", [False, True])
def test_full_ggn_matches_dense_construction(regression):
    X, Y = _data(2 if regression else 3, regression)
    model = _mlp(2 if regression else 3)
    loss = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    kw = dict(sigma_noise=0.6) if regression else {}
    op = GGNOperator(model, loss, [(X[:25], Y[:25]), (X[25:], Y[25:])])
    ev = lml(op, prior_precision=0.7, temperature=1.3, prior_mean=0.1, **kw)
    ref = _dense_reference(model, X, Y, regression=regression, delta=0.7, sigma=kw.get(
        "sigma_noise", 1.0), T=1.3, mu0=0.1)
    assert ev.logdet.method == "dense" and ev.stderr == 0.0
    assert ev.value == pytest.approx(ref, abs=1e-9)
    # a summing loss is the same likelihood
    op_sum = GGNOperator(model, type(loss)(reduction="sum"), (X, Y))
    ev_sum = lml(op_sum, prior_precision=0.7, temperature=1.3, prior_mean=0.1, **kw)
    assert ev_sum.value == pytest.approx(ref, abs=1e-9)


def test_ignored_targets_give_the_likelihood_of_the_valid_ones_or_an_error():
    """Targets at ignore_index are not data: the evidence is that of the valid targets.
    Batches with different fractions of ignored targets are either weighted by their
    terms (then exact) or refused -- never a silently different likelihood."""
    X, y = _data()
    y = y.clone()
    y[:3] = -100
    y[25:35] = -100
    model = _mlp()
    keep = y != -100
    ref = _dense_reference(model, X[keep], y[keep], regression=False, delta=0.7)
    one = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert lml(one, prior_precision=0.7).value == pytest.approx(ref, abs=1e-9)
    two = GGNOperator(model, nn.CrossEntropyLoss(), [(X[:20], y[:20]), (X[20:], y[20:])])
    try:
        value = lml(two, prior_precision=0.7).value
    except ValueError as err:
        assert "weights its batches" in str(err)
    else:
        assert value == pytest.approx(ref, abs=1e-9)


def _laplace_torch(model, X, Y, likelihood, structure, **kw):
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import BackPackGGN

    # laplace-torch's default full-GGN backend (curvlinops) multiplies by a float32 identity
    # and is accurate to ~2e-7 only in float64; BackPACK's GGN is exact.
    backend = BackPackGGN if structure == "full" else None
    la = laplace.Laplace(model, likelihood, subset_of_weights="all",
                         hessian_structure=structure, backend=backend, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(DataLoader(TensorDataset(X, Y), batch_size=20))
    return float(la.log_marginal_likelihood())


def test_full_ggn_matches_laplace_torch_classification():
    X, y = _data()
    model = _mlp()
    ref = _laplace_torch(model, X, y, "classification", "full", prior_precision=0.7,
                         temperature=1.3)
    op = GGNOperator(model, nn.CrossEntropyLoss(), [(X[:20], y[:20]), (X[20:], y[20:])])
    assert lml(op, prior_precision=0.7, temperature=1.3).value == pytest.approx(ref, abs=1e-6)


def test_full_ggn_matches_laplace_torch_regression():
    X, Y = _data(2, regression=True)
    model = _mlp(2)
    ref = _laplace_torch(model, X, Y, "regression", "full", prior_precision=0.4,
                         sigma_noise=0.6, temperature=0.8, prior_mean=0.1)
    op = GGNOperator(model, nn.MSELoss(), (X, Y))
    ev = lml(op, prior_precision=0.4, sigma_noise=0.6, temperature=0.8, prior_mean=0.1)
    assert ev.value == pytest.approx(ref, abs=1e-6)


def test_kfac_matches_laplace_torch_kron():
    """laplace-torch's KronLaplace (GGN K-FAC, type-2) keeps biases in separate blocks;
    without biases both K-FACs are the same matrix."""
    X, y = _data()
    model = _mlp(bias=False)
    ref = _laplace_torch(model, X, y, "classification", "kron", prior_precision=0.7)
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher_type="exact")
    ev = lml(op, prior_precision=0.7)
    assert ev.logdet.method == "exact" and ev.num_matvecs == 0
    assert ev.value == pytest.approx(ref, abs=1e-6)


def test_slq_evidence_within_its_error_bar():
    X, y = _data(n=60)
    model = _mlp()
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    exact = lml(op, prior_precision=0.5)
    est = lml(op, prior_precision=0.5, method="slq", num_probes=20,
              generator=torch.Generator().manual_seed(0))
    assert est.logdet.method == "slq" and est.stderr > 0 and est.logdet.converged
    assert est.log_likelihood == exact.log_likelihood and est.scatter == exact.scatter
    assert abs(est.value - exact.value) <= 3 * est.stderr


def test_bad_input_is_refused():
    X, y = _data()
    model = _mlp()
    with pytest.raises(ValueError, match="linear in the model output"):  # its GGN is 0
        lml(GGNOperator(model, nn.NLLLoss(), (X, y)))
    with pytest.raises(ValueError, match="label smoothing"):
        lml(GGNOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (X, y)))
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="prior_precision"):
        lml(op, prior_precision=0.0)
    with pytest.raises(ValueError, match="regression"):
        lml(op, sigma_noise=2.0)
    with pytest.raises(TypeError, match="curvature operator"):
        lml(torch.eye(3))
    # a Hessian far from a minimum is indefinite: a clear error, not a NaN
    with pytest.raises(ValueError, match="positive definite"):
        lml(HessianOperator(model, nn.CrossEntropyLoss(), (X, y)), prior_precision=1e-6)


def test_causal_lm_with_its_own_loss_and_padded_batches():
    """A tiny GPT-2 with its own loss (loss_fn=None): the likelihood counts the valid
    shifted tokens, and 1, 2 or 4 padded batches give the same evidence."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                           attn_implementation="eager")
    model = tf.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (8, 6), generator=g)
    mask = (torch.arange(6)[None] < torch.randint(2, 7, (8,), generator=g)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}
    params = ["transformer.ln_f", "transformer.h.0.mlp.c_proj.bias"]  # 48 parameters
    with torch.no_grad():  # summed next-token NLL in float64 (HF's own loss is float32)
        logits = model(**batch).logits
    nll = float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32),
                                            batch["labels"][:, 1:].reshape(-1),
                                            reduction="sum"))
    values = []
    for k in (1, 2, 4):
        data = [{key: v[i:i + 8 // k] for key, v in batch.items()} for i in range(0, 8, 8 // k)]
        ev = lml(GGNOperator(model, None, data, params=params), prior_precision=2.0)
        assert ev.log_likelihood == pytest.approx(-nll, rel=1e-10)
        values.append(ev.value)
    assert values[1] == pytest.approx(values[0], abs=1e-8)
    assert values[2] == pytest.approx(values[0], abs=1e-8)
