"""The compiled step (``compile_step``, curvlab.optim.compiled) against the eager step.

Tolerances: inductor fuses the elementwise chain of an update and evaluates its scalar
arithmetic in its own order (e.g. ``m / (sqrt(v) / c2 + eps) * (-lr / c1)`` as one fused
expression with the scalars read from float64 0-d inputs), so a compiled step agrees with
the eager one to float32 rounding, not bitwise: a few ulps per step, which the eigenbasis
refreshes of SOAP amplify a little over steps. The checks use ``rtol=atol=1e-5`` on
parameters of order 1 after a handful of steps (a wrong formula, a missed bias correction
or a stale scalar moves them by > 1e-3).

The compiled tests are marked ``slow`` (deselect with ``-m "not slow"``): each compiles a
few graphs of a tiny model (seconds each on a quiet machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.optim import KFAC, KLSOAP, SOAP, KLShampoo, PSGDKron, Shampoo
from curvlab.optim.adam import AdamConfig, adam_step_, moment_dtype
from curvlab.optim.base import apply_update_
from curvlab.optim.compiled import StepCompiler, inductor_available

TOL = dict(rtol=1e-5, atol=1e-5)
needs_inductor = pytest.mark.skipif(inductor_available() is not None,
                                    reason=f"inductor cannot run here: {inductor_available()}")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL)


# ---- eager path: foreach grouped by device and dtype (fast) ---------------------------------
def test_apply_update_mixed_dtypes_equals_per_tensor_update():
    torch.manual_seed(0)
    ps = [torch.randn(5, dtype=dt) for dt in (torch.float32, torch.float64, torch.bfloat16,
                                              torch.float32)]
    ds = [torch.randn(5, dtype=torch.float32) for _ in ps]
    ref = [p.clone() for p in ps]
    for p, d in zip(ref, ds, strict=True):
        p.mul_(1 - 0.1 * 0.01).add_(d.to(p.dtype), alpha=-0.1)
    apply_update_(ps, ds, 0.1, 0.01)
    for p, r in zip(ps, ref, strict=True):
        assert p.dtype == r.dtype
        torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_adam_step_mixed_dtypes_and_steps_equals_each_group_alone():
    torch.manual_seed(0)
    ps = [torch.randn(4, 3), torch.randn(3, dtype=torch.float64), torch.randn(2)]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [3, 1, 2]
    cfg = AdamConfig()
    ref = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(ps, ms, vs, strict=True)]
    for k, (p, m, v) in enumerate(ref):  # each tensor alone: the ungrouped computation
        adam_step_([p], [m], [v], [gs[k]], [steps[k]], cfg, 1e-2, 0.1)
    adam_step_(ps, ms, vs, gs, steps, cfg, 1e-2, 0.1)
    for p, (r, _, _) in zip(ps, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_adam_step_with_step_tensors_is_torch_fused_adamw_and_falls_back_per_group():
    """With ``step_tensors`` each (device, dtype) group whose moments share the parameters'
    dtype is bitwise ``torch.optim.AdamW(fused=True)`` (per-tensor step counts included);
    a bfloat16 parameter (float32 moments) takes the foreach step."""
    torch.manual_seed(0)
    ps = [torch.randn(50, 40), torch.randn(2000, dtype=torch.float64), torch.randn(20),
          torch.randn(3).bfloat16()]
    ms = [torch.zeros_like(p, dtype=moment_dtype(p.dtype)) for p in ps]
    vs = [torch.zeros_like(m) for m in ms]
    refs = [nn.Parameter(p.clone()) for p in ps[:3]]
    fused = [torch.optim.AdamW([r], lr=1e-2, weight_decay=0.1, fused=True) for r in refs]
    bf = ps[3].clone()
    bf_m, bf_v = torch.zeros(3), torch.zeros(3)
    counts = torch.zeros(4)
    cfg = AdamConfig()
    skip = {0: (2,), 1: (), 2: (1, 4), 3: ()}  # steps without a gradient, per tensor
    for t in range(12):  # (the foreach step differs from the fused one by then)
        live = [k for k in range(4) if t not in skip[k]]
        gs = {k: torch.randn_like(ps[k]) for k in live}
        counts[live] += 1
        adam_step_([ps[k] for k in live], [ms[k] for k in live], [vs[k] for k in live],
                   [gs[k] for k in live], [int(counts[k]) for k in live], cfg, 1e-2, 0.1,
                   step_tensors=[counts[k] for k in live])
        for k in live:
            if k < 3:
                refs[k].grad = gs[k]
                fused[k].step()
            else:
                adam_step_([bf], [bf_m], [bf_v], [gs[k]], [int(counts[k])], cfg, 1e-2, 0.1)
    for p, r in zip(ps[:3], refs, strict=True):
        torch.testing.assert_close(p, r.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ps[3], bf, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed_grad", "transposed_param", "channels_last"])
def test_adam_step_with_step_tensors_keeps_strided_tensors_off_the_fused_kernel(layout):
    """torch's fused kernel pairs the tensors' storage linearly: a gradient laid out unlike
    its parameter would be updated entry by entry wrongly (0.06 off in three steps). Such
    groups take the foreach step: equal to it bitwise."""
    torch.manual_seed(0)
    if layout == "channels_last":
        p0 = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
        g = torch.randn(4, 3, 5, 5)
    elif layout == "transposed_grad":
        p0, g = torch.randn(3, 5), torch.randn(5, 3).t()
    else:
        p0, g = torch.randn(5, 3).t(), torch.randn(3, 5)
    runs = []
    for fused in (True, False):
        p = p0.clone(memory_format=torch.preserve_format)
        m = torch.zeros_like(p, memory_format=torch.preserve_format)
        v = torch.zeros_like(p, memory_format=torch.preserve_format)
        count = torch.zeros(())
        for k in range(1, 4):
            count += 1
            adam_step_([p], [m], [v], [g], [k], AdamConfig(), 1e-2, 0.1,
                       step_tensors=[count] if fused else None)
        runs.append(p)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


class _TiedLM(nn.Module):
    """An embedding tied to a bias-free head, a factored layer and a LayerNorm between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mid(self.emb(ids))))).transpose(1, 2)


def _train_lm(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 7, (3, 5), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), ids).backward()
        opt.step()


def test_compile_step_refused_where_there_is_no_compiled_path():
    from curvlab.optim import LBFGS

    opt = LBFGS([nn.Parameter(torch.zeros(2))])
    with pytest.raises(NotImplementedError, match="no compiled step path: .*line search"):
        opt.compile_step()


def test_compile_step_switches_on_and_off():
    model = _model()
    opt = Shampoo(model.parameters(), lr=1e-2)
    assert not opt.step_compiled
    assert opt.compile_step(backend="eager") is opt and opt.step_compiled
    assert not opt.compile_step(False).step_compiled
    _train(model, opt, 1)  # the eager step again


# ---- compiled == eager (slow: compiles) ------------------------------------------------------
@pytest.mark.slow
@needs_inductor
def test_compiled_adam_step_equals_eager_without_recompiling_per_step():
    torch.manual_seed(0)
    ps = [torch.randn(4, 3), torch.randn(3)]
    gs_all = [[torch.randn_like(p) for p in ps] for _ in range(4)]
    state = {name: ([p.clone() for p in ps], [torch.zeros_like(p) for p in ps],
                    [torch.zeros_like(p) for p in ps]) for name in ("eager", "compiled")}
    compiler = StepCompiler()
    cfg = AdamConfig()
    graphs = None
    for t, gs in enumerate(gs_all, start=1):
        lr = 1e-2 / t  # a schedule: lr changes every step
        steps = [t, max(t - 1, 1)]  # the second tensor missed a step
        adam_step_(*state["eager"], gs, steps, cfg, lr, 0.1)
        adam_step_(*state["compiled"], gs, steps, cfg, lr, 0.1, compiler=compiler)
        if t == 2:
            graphs = _graphs()
    assert _graphs() == graphs, "a new lr / step count recompiled"
    for a, b in zip(state["eager"], state["compiled"], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **TOL)


@pytest.mark.slow
@needs_inductor
@pytest.mark.parametrize("cls,kwargs", [
    (Shampoo, dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2,
                   weight_decay=0.1)),
    (SOAP, dict(lr=1e-2, precondition_frequency=3, weight_decay=0.1)),
    # the KL fits: their statistics switch to IEEE float32 around the compiled call
    (KLShampoo, dict(lr=1e-2, precondition_frequency=3, weight_decay=0.1)),
    (KLSOAP, dict(lr=1e-2, precondition_frequency=3, weight_decay=0.1)),
    # PSGD: fits on a random half of the steps (host draws), dense and diagonal factors,
    # diagonal parameters (the other fits: tests/optim/test_psgd.py, dynamo's eager backend)
    (PSGDKron, dict(lr=1e-2, precond_update_prob=0.5, weight_decay=0.1)),
], ids=["shampoo", "soap", "kl-shampoo", "kl-soap", "psgd"])
def test_compiled_step_equals_eager_and_resumes_both_ways(cls, kwargs):
    """8 steps (refreshes at 2, 5, 8 for Shampoo; 1, 4, 7 for SOAP): compiled == eager,
    graphs stop growing; then the eager state continues in the compiled optimizer (the same
    instance: no new compilation) and the compiled state in a new eager one."""
    eager, comp = _model(), _model()
    oe = cls(eager.parameters(), **kwargs)
    oc = cls(comp.parameters(), **kwargs).compile_step()
    before = _graphs()
    _train(eager, oe, 5)
    _train(comp, oc, 5)
    graphs = _graphs()
    assert graphs > before, "the compiled step compiled nothing"
    _train(eager, oe, 3, seed=2)
    _train(comp, oc, 3, seed=2)
    assert _graphs() == graphs, "steps after the first compiled ones recompiled"
    _close(eager, comp)
    assert oc.stats()["steps"] == 8
    c2e = copy.deepcopy(comp)  # compiled -> eager
    o_c2e = cls(c2e.parameters(), **kwargs)
    o_c2e.load_state_dict(oc.state_dict())
    with torch.no_grad():  # eager -> compiled
        for p, q in zip(comp.parameters(), eager.parameters(), strict=True):
            p.copy_(q)
    oc.load_state_dict(copy.deepcopy(oe.state_dict()))
    for m, o in ((eager, oe), (comp, oc), (c2e, o_c2e)):
        _train(m, o, 3, seed=3)
    _close(eager, comp)
    _close(eager, c2e)
    assert _graphs() == graphs, "loading a state dict recompiled"


@pytest.mark.parametrize("cls,ieee", [(KLSOAP, True), (KLShampoo, True), (SOAP, False)])
def test_compiled_step_of_the_kl_fits_runs_in_ieee_float32(cls, ieee):
    """The KL fits' statistics run in IEEE float32 (``high_precision_matmul``), which
    dynamo cannot trace: the compiled per-step update is called inside the switch (SOAP's,
    whose eager step makes no switch there, is not). The compiled function is replaced by
    a recorder of the matmul precision it would run under."""
    mkldnn = torch.backends.mkldnn.matmul
    seen = []

    class Recorder(StepCompiler):
        def __call__(self, fn, key=None):
            def run(*args):
                if key[0] == "blocks":  # the blocks' per-step update (not the Adam parts)
                    seen.append(mkldnn.fp32_precision)
                return fn(*args)
            return run

    model = _model()
    opt = cls(model.parameters(), lr=1e-2, precondition_frequency=3)
    opt._step_compiler = Recorder()  # (what compile_step installs, minus compilation)
    before = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"  # a user's reduced precision
    try:
        _train(model, opt, 3)
    finally:
        mkldnn.fp32_precision = before
    assert seen and set(seen) == {"ieee" if ieee else "bf16"}


@pytest.mark.slow
@needs_inductor
@pytest.mark.parametrize("kwargs", [
    dict(weight_decay=0.1),  # eigen
    dict(inverse_method="inverse"),
    dict(eigenvalue_correction=True, kl_clip=None, momentum=0.0),  # EKFAC
    dict(tied_weights="both", fallback="adam"),  # the tied weight's bases, Adam fallback
], ids=["eigen", "inverse", "ekfac", "tied-adam"])
def test_compiled_kfac_equals_eager_and_resumes(kwargs):
    """K-FAC's compiled solves and update == the eager step over 8 steps (inverses
    refreshed at 0, 3, 6), no recompilation after the first steps nor when the damping
    changes (a tensor input), and a state dict resumes in either."""
    tied = "tied_weights" in kwargs
    make, train = (_TiedLM, _train_lm) if tied else (_model, _train)
    kwargs = dict(lr=0.05, damping=0.1, precondition_frequency=3, **kwargs)
    eager, comp = make(), make()
    oe, oc = KFAC(eager, **kwargs), KFAC(comp, **kwargs).compile_step()
    before = _graphs()
    train(eager, oe, 5)
    train(comp, oc, 5)
    graphs = _graphs()
    assert graphs > before, "the compiled step compiled nothing"
    for o in (oe, oc):
        o.param_groups[0]["damping"] = 0.07
    train(eager, oe, 3, seed=2)
    train(comp, oc, 3, seed=2)
    assert _graphs() == graphs, "a later step or a new damping recompiled"
    _close(eager, comp)
    assert oc.stats()["steps"] == 8
    oc.load_state_dict(copy.deepcopy(oe.state_dict()))  # eager -> compiled
    with torch.no_grad():
        for p, q in zip(comp.parameters(), eager.parameters(), strict=True):
            p.copy_(q)
    train(eager, oe, 2, seed=3)
    train(comp, oc, 2, seed=3)
    _close(eager, comp)
