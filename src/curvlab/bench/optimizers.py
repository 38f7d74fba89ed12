"""The optimizers ``curvlab bench`` compares, each with a declared learning-rate grid.

Every entry builds an optimizer for ``(model, lr, problem name)``; entries whose package is
not installed report why and are skipped with a one-line notice. Grids are declared here
per problem, not tuned per run, and every optimizer gets the same step and time budget.
Shampoo/SOAP entries (ours and peers) share one refresh frequency per problem.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerSpec", "REGISTRY", "available", "PairedOptimizer", "CompiledStep"]

# digits: ~100-400 steps, bases refreshed every step; char LM: every 10 steps
FREQ = {"digits_mlp": 1, "char_lm": 10}
SOAP_BETAS = (0.9, 0.99)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Callable[[nn.Module, float, str], Any]
    lrs: dict[str, tuple[float, ...]]  # problem -> declared grid (absent: not run there)
    family: str  # "baseline", "curvlab" or "peer"
    algorithm: str  # for "fastest implementation of the same algorithm" comparisons
    requires: str | None = None  # importable module the entry needs
    quick: bool = True  # part of --quick
    note: str = ""
    step_batch: bool = False  # stepped as step(closure, batch=(inputs, targets))
    closure: bool = True  # False (with step_batch): step(batch=...), loss and gradient its own
    #: its step reads statistics that its hooks capture in this step's forward/backward
    #: (K-FAC): a step-time session runs that pass, untimed, before each timed step
    hooks: bool = False
    #: the same optimizer with its step compiled (None: no compiled variant); timed only
    make_compiled: Callable[[nn.Module, float, str], Any] | None = None
    #: compilation is a process-wide switch (heavyball): its eager and compiled variants
    #: cannot be timed in one session
    compile_global: bool = False

    def __post_init__(self) -> None:
        if not (self.closure or self.step_batch):
            raise ValueError(f"{self.name}: an optimizer stepped without a closure needs "
                             "step_batch=True (it computes the gradient from the batch)")

    def grid(self, problem: str, quick: bool = False) -> tuple[float, ...]:
        """The declared learning rates on ``problem`` (``quick``: the middle one)."""
        lrs = self.lrs.get(problem, ())
        return (lrs[len(lrs) // 2],) if quick and lrs else lrs

    def missing(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            how = self.note or "pip install -e '.[bench]'"
            return f"{self.name}: '{self.requires}' is not installed ({how})"
        return None


class PairedOptimizer:
    """Optimizers stepped in order after one closure: torch Muon for matrices + AdamW for
    the rest; kfac-pytorch's preconditioner (its ``step()`` rewrites ``.grad``) + SGD."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            if hasattr(part, "zero_grad"):  # (kfac-pytorch's preconditioner has none)
                part.zero_grad(set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


class CompiledStep:
    """A torch optimizer whose ``step()`` runs through ``torch.compile`` (torch's recipe for
    compiling its optimizers; graph breaks allowed)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self._step = torch.compile(opt.step, fullgraph=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss


def _problem_freq(problem: str) -> int:
    return FREQ.get(problem, 10)


def _adamw_compiled(m: nn.Module, lr: float, problem: str) -> Any:
    return CompiledStep(_adamw(m, lr, problem))


def _compiled(make: Callable[[nn.Module, float, str], Any]
              ) -> Callable[[nn.Module, float, str], Any]:
    """A curvlab entry with ``compile_step()``."""
    def make_compiled(m: nn.Module, lr: float, problem: str) -> Any:
        return make(m, lr, problem).compile_step()
    return make_compiled


def _muon_compiled(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import Muon, muon_param_groups

    return Muon(muon_param_groups(m, lr=lr, adamw_lr=lr), lr=lr, adjust_lr="match_rms_adamw",
                compile=True)


def _sgd(m: nn.Module, lr: float, problem: str) -> Any:
    return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True)


def _adamw(m: nn.Module, lr: float, problem: str) -> Any:
    return torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)


def _shampoo(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import Shampoo

    return Shampoo(m.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-12,
                   precondition_frequency=_problem_freq(problem), start_preconditioning_step=1,
                   max_preconditioner_dim=128, grafting="adam")


def _soap(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import SOAP

    return SOAP(m.parameters(), lr=lr, betas=SOAP_BETAS,
                precondition_frequency=_problem_freq(problem), max_preconditioner_dim=128)


def _kl_shampoo(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import KLShampoo

    # its eigenvalues (the step's scale) follow the gradients at rate 1 - shampoo_beta:
    # 0.95 (heavyball's KL peers' default), not 0.99
    return KLShampoo(m.parameters(), lr=lr, betas=SOAP_BETAS, shampoo_beta=0.95,
                     precondition_frequency=_problem_freq(problem), max_preconditioner_dim=128)


def _kl_soap(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import KLSOAP

    return KLSOAP(m.parameters(), lr=lr, betas=SOAP_BETAS,
                  precondition_frequency=_problem_freq(problem), max_preconditioner_dim=128)


def _muon(m: nn.Module, lr: float, problem: str, **variant: Any) -> Any:
    from curvlab.optim import Muon, muon_param_groups

    return Muon(muon_param_groups(m, lr=lr, adamw_lr=lr), lr=lr, adjust_lr="match_rms_adamw",
                **variant)


def _torch_muon(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import muon_param_groups

    matrices, rest = muon_param_groups(m)[:2]
    return PairedOptimizer(
        torch.optim.Muon(matrices["params"], lr=lr, weight_decay=0.0,
                         adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest["params"], lr=lr, weight_decay=0.0))


def _torch_muon_compiled(m: nn.Module, lr: float, problem: str) -> Any:
    muon, adamw = _torch_muon(m, lr, problem).parts
    return PairedOptimizer(CompiledStep(muon), CompiledStep(adamw))


def _psgd(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import PSGDKron

    return PSGDKron(m.parameters(), lr=lr, max_preconditioner_dim=128)


def _kfac(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import KFAC

    return KFAC(m, lr=lr)


def _ekfac(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import KFAC

    return KFAC(m, lr=lr, eigenvalue_correction=True)


def _hessian_free(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import HessianFree

    return HessianFree(m, nn.CrossEntropyLoss(), lr=lr, cg_max_iter=20)


def _natural_gradient(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import NaturalGradient

    return NaturalGradient(m, lr=lr, damping=0.1, cg_max_iter=20)


def _sam_sgd(m: nn.Module, lr: float, problem: str) -> Any:
    from curvlab.optim import SAM

    return SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9, nesterov=True)


def _kfac_pytorch(m: nn.Module, lr: float, problem: str) -> Any:
    import kfac  # kfac-pytorch

    return PairedOptimizer(kfac.preconditioner.KFACPreconditioner(m, damping=0.1),
                           torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))


def _po_soap(m: nn.Module, lr: float, problem: str) -> Any:
    from pytorch_optimizer import SOAP as PeerSOAP

    return PeerSOAP(m.parameters(), lr=lr, betas=SOAP_BETAS, weight_decay=0.0,
                    precondition_frequency=_problem_freq(problem))


def _heavyball(name: str, compiled: bool = False, soap_like: bool = False
               ) -> Callable[[nn.Module, float, str], Any]:
    """heavyball's ``name`` with weight decay off; ``soap_like``: SOAP's betas and this
    problem's refresh frequency, no refresh schedule (as every Shampoo/SOAP entry here).

    ``compiled``: as heavyball means it (``compile_step=True``, its fused kernels on), in
    torch.compile's default mode: heavyball's own default, "max-autotune-no-cudagraphs",
    benchmarks kernels at compile time (minutes on a CPU). heavyball reads the mode from a
    module global at every call, so its eager and compiled entries never run in one
    timing session (``compile_global``)."""

    def make(m: nn.Module, lr: float, problem: str) -> Any:
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = "default" if compiled else None
        extra: dict[str, Any] = {}
        if soap_like:
            extra = {"betas": SOAP_BETAS, "precondition_frequency": _problem_freq(problem),
                     "use_precond_schedule": False}
        return getattr(heavyball, name)(m.parameters(), lr=lr, weight_decay=0.0,
                                        compile_step=compiled, **extra)
    return make


def _po_kron(m: nn.Module, lr: float, problem: str) -> Any:
    from pytorch_optimizer import Kron

    return Kron(m.parameters(), lr=lr)


def _po_muon(cls: str = "Muon", **variant: Any) -> Callable[[nn.Module, float, str], Any]:
    """pytorch-optimizer's Muon / NorMuon: Newton-Schulz on the matrices (``use_muon``),
    its own AdamW on the rest (the split of :func:`curvlab.optim.muon_param_groups`)."""

    def make(m: nn.Module, lr: float, problem: str) -> Any:
        import pytorch_optimizer

        from curvlab.optim import muon_param_groups

        matrices, rest = muon_param_groups(m)[:2]
        return getattr(pytorch_optimizer, cls)(
            [{"params": matrices["params"], "use_muon": True},
             {"params": rest["params"], "use_muon": False}],
            lr=lr, adamw_lr=lr, adamw_wd=0.0, weight_decay=0.0, use_adjusted_lr=True,
            **variant)
    return make


def _po_shampoo(m: nn.Module, lr: float, problem: str) -> Any:
    from pytorch_optimizer import Shampoo as PeerShampoo

    return PeerShampoo(m.parameters(), lr=lr, preconditioning_compute_steps=_problem_freq(problem))


def _po_scalable(m: nn.Module, lr: float, problem: str) -> Any:
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    return ScalableShampoo(m.parameters(), lr=lr, betas=(0.9, 0.99),
                           start_preconditioning_step=1,
                           preconditioning_compute_steps=_problem_freq(problem), block_size=128,
                           graft_type=LayerWiseGrafting.RMSPROP)


# the tiny GPT-2 ("gpt2") shares the char-level transformer's grids (same data and scale)
ADAM_GRID = {"digits_mlp": (3e-3, 1e-2, 2e-2), "char_lm": (1e-3, 3e-3, 1e-2),
             "gpt2": (1e-3, 3e-3, 1e-2)}
MUON_GRID = {"digits_mlp": (3e-3, 1e-2, 2e-2), "char_lm": (3e-3, 1e-2, 2e-2),
             "gpt2": (3e-3, 1e-2, 2e-2)}
# digits (150 steps, batch 256, one seed, measured): final loss 0.0046 at lr 1e-2, 0.043 at
# 3e-3 (AdamW 0.0053 at its best 3e-2); char LM not measured: the author's rule, momentum
# whitening steps ~sqrt((1 + b) / (1 - b)) = 4.4x Adam's at equal lr
PSGD_GRID = {"digits_mlp": (3e-3, 1e-2, 3e-2), "char_lm": (3e-4, 1e-3, 3e-3),
             "gpt2": (3e-4, 1e-3, 3e-3)}
# KL-Shampoo (its spectrum from the first gradient, init_factor="gradient"; measured
# 2026-12-02, 3 seeds): best lr 1e-2 on both transformer tasks (3e-2 diverges to a final
# loss 2.45); on digits (seed 0) 1e-2 / 2e-2 / 3e-2 / 5e-2 ended at 0.0065 / 0.0023 /
# 0.0039 / 0.07 (5e-2, the fastest to the target on seed 0, missed it on seeds 1 and 2)
KL_SHAMPOO_GRID = {"digits_mlp": (1e-2, 2e-2, 3e-2), "char_lm": (3e-3, 1e-2, 3e-2),
                   "gpt2": (3e-3, 1e-2, 3e-2)}
# peers trained on digits only (timed on every task: TunedStudy's timed-only peers)
PEER_GRID_ADAM = {"digits_mlp": ADAM_GRID["digits_mlp"]}
PEER_GRID_MUON = {"digits_mlp": MUON_GRID["digits_mlp"]}
PEER_GRID_PSGD = {"digits_mlp": PSGD_GRID["digits_mlp"]}
KFAC_GRID = {"digits_mlp": (0.03, 0.1, 0.3), "char_lm": (0.03, 0.1, 0.3),
             "gpt2": (0.03, 0.1, 0.3)}

REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec("torch.AdamW", _adamw, ADAM_GRID, "baseline", "adamw",
                  make_compiled=_adamw_compiled),
    OptimizerSpec("torch.SGD", _sgd, {"digits_mlp": (0.03, 0.1, 0.3),
                                      "char_lm": (0.1, 0.3, 1.0), "gpt2": (0.1, 0.3, 1.0)},
                  "baseline", "sgd"),
    OptimizerSpec("curvlab.Shampoo", _shampoo, ADAM_GRID, "curvlab", "shampoo",
                  make_compiled=_compiled(_shampoo)),
    OptimizerSpec("curvlab.SOAP", _soap, ADAM_GRID, "curvlab", "soap",
                  make_compiled=_compiled(_soap)),
    OptimizerSpec("curvlab.Muon", _muon, MUON_GRID, "curvlab", "muon",
                  make_compiled=_muon_compiled),
    OptimizerSpec("curvlab.KLShampoo", _kl_shampoo, KL_SHAMPOO_GRID, "curvlab", "kl-shampoo",
                  quick=False, make_compiled=_compiled(_kl_shampoo)),
    OptimizerSpec("curvlab.KLSOAP", _kl_soap, ADAM_GRID, "curvlab", "kl-soap", quick=False,
                  make_compiled=_compiled(_kl_soap)),
    OptimizerSpec("curvlab.PSGDKron", _psgd, PSGD_GRID, "curvlab", "psgd-kron",
                  make_compiled=_compiled(_psgd)),
    # Muon variants (issue 19): Polar Express coefficients; the same through Gram
    # Newton-Schulz (equal in exact arithmetic: one algorithm, two implementations); NorMuon
    # on Polar Express (as nanochat runs it)
    OptimizerSpec("curvlab.Muon+PolarExpress", functools.partial(
        _muon, ns_coefficients="polar_express"), MUON_GRID, "curvlab", "muon-polar-express",
        quick=False),
    OptimizerSpec("curvlab.Muon+PolarExpress+Gram", functools.partial(
        _muon, ns_coefficients="polar_express", gram=True), MUON_GRID, "curvlab",
        "muon-polar-express", quick=False, note="Gram Newton-Schulz, restarted every 2"),
    OptimizerSpec("curvlab.NorMuon", functools.partial(
        _muon, ns_coefficients="polar_express", normalize="neuron"), MUON_GRID, "curvlab",
        "normuon", quick=False),
    OptimizerSpec("curvlab.KFAC", _kfac, KFAC_GRID, "curvlab", "kfac", hooks=True,
                  make_compiled=_compiled(_kfac)),
    OptimizerSpec("curvlab.EKFAC", _ekfac, KFAC_GRID, "curvlab", "ekfac", quick=False,
                  hooks=True, make_compiled=_compiled(_ekfac)),
    OptimizerSpec("curvlab.HessianFree", _hessian_free, {"digits_mlp": (1.0,)}, "curvlab",
                  "hessian-free", quick=False, step_batch=True),
    OptimizerSpec("curvlab.NaturalGradient", _natural_gradient, {"digits_mlp": (0.3, 1.0)},
                  "curvlab", "natural-gradient", quick=False, note="small models only",
                  step_batch=True),
    # SAM aims at flatter minima, not speed: two forward-backward passes per step, and
    # its step needs the closure (no step time on a fixed gradient). benchmarks/bench_sam.py
    OptimizerSpec("curvlab.SAM-SGD", _sam_sgd, {"digits_mlp": (0.03, 0.1, 0.3)}, "curvlab",
                  "sam", quick=False, note="2 forward-backward passes per step"),
    OptimizerSpec("torch.Muon", _torch_muon, MUON_GRID, "peer", "muon", quick=False,
                  note="+ torch AdamW for non-matrix parameters",
                  make_compiled=_torch_muon_compiled),
    OptimizerSpec("pytorch-optimizer.Muon", _po_muon(), PEER_GRID_MUON, "peer", "muon",
                  requires="pytorch_optimizer", quick=False),
    OptimizerSpec("pytorch-optimizer.Muon+PolarExpress", _po_muon(ns_coeffs="polar_express"),
                  PEER_GRID_MUON, "peer", "muon-polar-express", requires="pytorch_optimizer",
                  quick=False),
    OptimizerSpec("pytorch-optimizer.NorMuon", _po_muon("NorMuon", ns_coeffs="polar_express"),
                  PEER_GRID_MUON, "peer", "normuon", requires="pytorch_optimizer",
                  quick=False),
    OptimizerSpec("pytorch-optimizer.SOAP", _po_soap, ADAM_GRID, "peer", "soap",
                  requires="pytorch_optimizer", quick=False),
    OptimizerSpec("pytorch-optimizer.Kron", _po_kron, PEER_GRID_PSGD, "peer", "psgd-kron",
                  requires="pytorch_optimizer", quick=False),
    # heavyball eager costs ~20-40x AdamW's step on the transformers: trained on digits,
    # step-timed on the transformers (TunedStudy's timed-only peers)
    OptimizerSpec("heavyball.SOAP", _heavyball("SOAP", soap_like=True), PEER_GRID_ADAM,
                  "peer", "soap", requires="heavyball", quick=False, note="uncompiled",
                  make_compiled=_heavyball("SOAP", True, soap_like=True), compile_global=True),
    OptimizerSpec("heavyball.KLShampoo", _heavyball("KLShampoo", soap_like=True),
                  {"digits_mlp": KL_SHAMPOO_GRID["digits_mlp"]}, "peer", "kl-shampoo",
                  requires="heavyball", quick=False,
                  note="uncompiled", compile_global=True,
                  make_compiled=_heavyball("KLShampoo", True, soap_like=True)),
    OptimizerSpec("heavyball.KLSOAP", _heavyball("KLSOAP", soap_like=True), PEER_GRID_ADAM,
                  "peer", "kl-soap", requires="heavyball", quick=False, note="uncompiled",
                  make_compiled=_heavyball("KLSOAP", True, soap_like=True), compile_global=True),
    OptimizerSpec("heavyball.PSGDKron", _heavyball("PSGDKron"), PEER_GRID_PSGD, "peer",
                  "psgd-kron", requires="heavyball", quick=False, note="uncompiled",
                  make_compiled=_heavyball("PSGDKron", True), compile_global=True),
    OptimizerSpec("pytorch-optimizer.Shampoo", _po_shampoo,
                  {"digits_mlp": (0.03, 0.1, 0.3), "char_lm": (0.03, 0.1, 0.3),
                   "gpt2": (0.03, 0.1, 0.3)}, "peer",
                  "shampoo", requires="pytorch_optimizer", quick=False),
    OptimizerSpec("pytorch-optimizer.ScalableShampoo", _po_scalable, ADAM_GRID, "peer",
                  "shampoo", requires="pytorch_optimizer", quick=False),
    OptimizerSpec("kfac-pytorch", _kfac_pytorch, {"digits_mlp": KFAC_GRID["digits_mlp"]}, "peer",
                  "kfac", requires="kfac", quick=False, hooks=True,
                  note="kfac-pytorch is not on PyPI (the 'kfac' there is TensorFlow's)"),
    OptimizerSpec("DistributedShampoo", lambda m, lr, p: None, ADAM_GRID, "peer", "shampoo",
                  requires="distributed_shampoo", quick=False, note="not installable from PyPI"),
]}


def available(names: list[str] | None = None) -> tuple[list[OptimizerSpec], list[str]]:
    """The installed entries among ``names`` (default all) and notices for the others."""
    specs, notices = [], []
    for name in names or list(REGISTRY):
        if name not in REGISTRY:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(REGISTRY)}")
        spec = REGISTRY[name]
        reason = spec.missing()
        if reason:
            notices.append(reason)
        else:
            specs.append(spec)
    return specs, notices
