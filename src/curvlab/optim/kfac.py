"""K-FAC and EKFAC: Kronecker-factored natural-gradient optimizers.

Per Linear / Conv2d layer with gradient matrix ``M = [dW | db]`` (``d_out x d_in``) the
update direction is the damped Kronecker natural gradient (Martens & Grosse 2015;
Grosse & Martens 2016 for convolutions)

    U = (A (x) G + lambda I)^-1 M   =  Q_G [ (Q_G^T M Q_A) / (d_G d_A^T + lambda) ] Q_A^T

with ``A``, ``G`` exponential moving averages of the layer factors
(:mod:`curvlab.linops._kronecker`), ``A = Q_A diag(d_A) Q_A^T`` and ``G = Q_G diag(d_G)
Q_G^T`` (``inverse_method="eigen"``). ``inverse_method="inverse"`` uses Tikhonov factored
damping instead, ``U = (G + sqrt(lambda)/pi)^-1 M (A + pi sqrt(lambda))^-1``
(Martens & Grosse 2015, sec. 6.3). With ``eigenvalue_correction=True`` (EKFAC, George et
al. 2018) ``d_G d_A^T`` is replaced by a moving average of the per-sample squared
gradients in the Kronecker eigenbasis, ``E_n[(Q_G^T dW_n Q_A)^2]``.

The step is then scaled by the KL-clipping factor of Ba et al. (2017, sec. 5),
``nu = min(1, sqrt(kl_clip / (lr^2 sum <U, M>)))``, and applied with heavy-ball momentum:
``buf = momentum buf + nu U``, ``theta <- (1 - lr wd) theta - lr buf`` (decoupled weight
decay, as every curvlab optimizer).

Data parallel (``process_group``; given a ``DistributedDataParallel`` model K-FAC hooks
its ``.module`` and uses DDP's process group unless one is passed):
the factors are statistics of each rank's local activations and gradients, so they are
all-reduced weighted by the local sample counts (``A = sum_r n_r A_r / N``; upper
triangles, bucketed), as are the EKFAC scales; the eigendecompositions / inverses are
split over the ranks by a longest-processing-time schedule over ``d_A^3 + d_G^3`` and
shared (:mod:`curvlab.optim.distributors.collectives`). Every rank then holds the same state.
``fisher_type="mc"`` draws its own labels on each rank (a valid estimate, but not the
single-process random stream); ``adaptive_damping`` is not supported with a process group.

Factored layers: ``nn.Linear``, ungrouped ``nn.Conv2d``, HF transformers' ``Conv1D`` (the
transposed linear of GPT-2, weight stored ``(in, out)``; recognized without importing
transformers) and ``nn.Embedding`` (its input factor is exactly diagonal: the token counts;
not with EKFAC). A factor of dimension above ``max_factor_dim`` (a vocabulary-sized output
factor) is kept diagonal. A weight ``W`` (vocab x d) tied between an Embedding and a
Linear head (a language model's input embedding and output head) is preconditioned with
the head's Kronecker block by default (the embedding's use adds to the gradient, not to
the curvature; logged). With ``tied_weights="both"`` (and a bias-free head) it has the
curvature of both uses, ``G_H W A_H + diag(A_E) W G_E``; it is preconditioned in one
eigenbasis per side (of the curvature's partial trace over the other side) by the inverse
of the curvature's diagonal there plus damping, exact when the two factors of each side
commute (e.g. when both are diagonal, as the vocabulary side is above ``max_factor_dim``).
With EKFAC, ``inverse_method="inverse"`` or a head with a bias, only the head's use is
counted either way. The constructor logs
one line with the factored layers, the parameters left to the fallback (and their share),
the diagonal factors and the tied weights. Statistics are kept in float32 at least (bf16
autocast works). ``torch.compile``: the layer hooks run (as graph breaks) whether KFAC is
given the module or its compiled wrapper; a statistics step whose forward pass captured
nothing raises RuntimeError instead of silently keeping stale factors.

Parameters of other modules (LayerNorm, grouped convolutions, ...) are not
Kronecker-factored; they get the documented ``fallback``: ``"sgd"`` (the raw gradient,
default) or ``"adam"`` (a diagonal Adam-style direction ``m_hat / (sqrt(v_hat) + eps)``).
Both go through the same KL clipping and momentum. The Adam direction and the
non-finite checks come from the shared preconditioner core
(:mod:`curvlab.optim.preconditioners`); its blocked optimizer base does not fit K-FAC,
whose statistics come from layer hooks (activations and output gradients of a joined
``[W | b]`` block), not from gradient blocks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from curvlab import distributed as _dist
from curvlab.linops._kronecker import (
    MAX_FACTOR_DIM,
    KronLayer,
    LayerCapture,
    all_reduce_factors,
    check_rows_are_samples,
    curvature_pass,
    damped_factor_inverse,
    dense_factor,
    eigen_factor,
    eigenbasis_scale,
    factor_scale,
    factored_pi,
    find_layers,
    kron_apply,
    mean_diag,
    rotate,
    tied_embeddings,
    uncalled_layers_message,
    unrotate,
)
from curvlab.objective import input_samples, plain_checkpoints, unwrap_model
from curvlab.optim.adam import (
    AdamConfig,
    adam_directions_,
    adam_stability_preconditioner,
    moment_dtype,
)
from curvlab.optim.base import CurvlabOptimizer, apply_update_
from curvlab.optim.distributors.collectives import Timings, lpt_schedule, reject_dtensors
from curvlab.optim.preconditioners import max_abs
from curvlab.optim.stability import StabilityModel, momentum_threshold

__all__ = ["KFAC"]

logger = logging.getLogger(__name__)

_GLOBAL = "kfac"  # key of the optimizer-wide counters in self.state


class KFAC(CurvlabOptimizer):
    """K-FAC / EKFAC optimizer; hooks the Linear, Conv2d, HF Conv1D and Embedding layers of
    ``model``.

    Usage::

        opt = KFAC(model)  # lr=0.1, damping=0.03, kl_clip=1e-2
        loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()

    Statistics are captured on forward/backward passes run with gradients enabled
    (``torch.no_grad`` evaluation is ignored). With gradient accumulation, factors cover
    every micro-batch since the last step, and the accumulated gradient is taken to be the
    mean over all those samples (the usual ``(loss / k).backward()`` recipe).

    Args:
        model: the ``nn.Module`` whose layers are hooked.
        lr: learning rate.
        damping: Tikhonov damping ``lambda``. The defaults (damping 0.03, ``kl_clip``
            1e-2, momentum 0.5, ``precondition_frequency`` 5) come from a sweep on the digits MLP
            (``benchmarks/bench_curvature_optim.py``): without KL clipping, damping <= 0.1
            diverged there at lr >= 0.3 (and damping 0.03 at lr >= 0.1); with the clip,
            the step's KL bound, not ``lr``, sets the step size early in training.
        params: parameters or param groups (default: all trainable parameters of model).
            A layer's weight and bias must be in the same group.
        momentum, weight_decay: heavy-ball momentum and decoupled weight decay.
        stat_decay: EMA factor of the Kronecker factors (and EKFAC scales).
        factor_update_freq: capture statistics and update factors every this many steps.
        precondition_frequency: recompute eigendecompositions / inverses every this many
            steps (a multiple of ``factor_update_freq``).
        kl_clip: KL-clipping constant; ``None`` disables clipping.
        inverse_method: ``"eigen"`` (exact damped Kronecker inverse) or ``"inverse"``
            (factored Tikhonov damping with explicit inverses; its damping is refreshed
            with the inverses).
        eigenvalue_correction: EKFAC (needs ``inverse_method="eigen"``).
        fisher_type: ``"empirical"`` (gradients of the user's own backward pass, no extra
            cost) or ``"mc"`` (true Fisher: on statistics steps the last inputs are re-run
            with targets sampled from the model; needs ``loss_fn``).
        loss_fn: the training loss (for ``fisher_type="mc"``), e.g. ``nn.CrossEntropyLoss()``.
        adaptive_damping: Levenberg-Marquardt adjustment of ``damping`` from the reduction
            ratio (Martens & Grosse 2015, sec. 6.5); needs ``step(closure)``; every
            ``damping_adaptation_interval`` steps ``rho = (L(theta+delta) - L(theta)) /
            (g^T delta + delta^T (F + lambda) delta / 2)``; ``lambda *= omega`` if
            ``rho > 3/4``, ``lambda /= omega`` if ``rho < 1/4``, ``omega =
            damping_adaptation_decay ** interval``, clipped to ``[min_damping,
            max_damping]``. A step whose new loss is non-finite is undone.
        fallback: ``"sgd"`` or ``"adam"`` for parameters outside the factored layers.
        nonfinite: ``"skip"`` (default: a step with non-finite gradients, loss or
            statistics changes nothing and is counted in ``stats["skipped_steps"]``) or
            ``"raise"`` (FloatingPointError, nothing changed).
        process_group: ``None``, ``"default"`` or a ``ProcessGroup``: all-reduce the factors
            over its ranks and split the decompositions (see the module docstring). For a
            DDP-wrapped ``model``, None means DDP's own group.
        max_factor_dim: factors of a larger dimension are kept diagonal (eigh in float64 on
            one core: ~0.7 s at 1024, ~6 s at 2048, ~54 s at 4096, measured); None: never.
        approx, separate_weight_and_bias: K-FAC expand / reduce and one block per weight
            and bias, as for :class:`curvlab.linops.KFACOperator`.
        tied_weights: a weight tied between an embedding and a head is preconditioned with
            the curvature of the head's use only (``"head"``, default: the embedding's use
            adds to the gradient, not to the curvature; stated in the log) or of both uses
            (``"both"``, see the module docstring). Measured on the tiny-GPT-2 benchmark
            (benchmarks/bench_kfac_gpt2.py, loss after 40 steps, median of 3 seeds):
            "head" trained 2x faster with the MC Fisher, "both" 4% faster with the
            empirical one.

    ``opt.stats`` holds monitoring values of the last step: ``damping``, ``kl_clip_scale``,
    ``condition_numbers`` (per layer, of A and G, at the last inverse update),
    ``skipped_steps``, ``eigh_failures``, ``rho`` (adaptive damping).
    """


    renamed = {"inv_update_freq": "precondition_frequency"}

    supports_add_param_group = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.03,
        *,
        params: Iterable[Any] | None = None,
        momentum: float = 0.5,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_update_freq: int = 1,
        precondition_frequency: int = 5,
        kl_clip: float | None = 1e-2,
        inverse_method: str = "eigen",
        eigenvalue_correction: bool = False,
        fisher_type: str = "empirical",
        loss_fn: Any = None,
        mc_samples: int = 1,
        adaptive_damping: bool = False,
        damping_adaptation_interval: int = 5,
        damping_adaptation_decay: float = 0.95,
        min_damping: float = 1e-6,
        max_damping: float = 1e3,
        fallback: str = "sgd",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nonfinite: str = "skip",
        seed: int = 0,
        process_group: Any = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        approx: str = "expand",
        separate_weight_and_bias: bool = False,
        tied_weights: str = "head",
        **renamed: Any,
    ) -> None:
        inv_update_freq = self._renamed_kwargs(
            renamed, {"precondition_frequency": precondition_frequency})["precondition_frequency"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (its layers are hooked), got "
                            f"{type(model).__name__}")
        # torch.compile / DataParallel: the user's layers (compiled, they run the hooks
        # through graph breaks); DistributedDataParallel: its process group too
        model = unwrap_model(model, distributed=False)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if process_group is None:  # the replicas must all-reduce the factors too
                process_group = model.process_group
            model = unwrap_model(model.module, distributed=False)
        _positive(lr=lr, damping=damping, eps=eps)
        _in_range(momentum=momentum, stat_decay=stat_decay,
                  damping_adaptation_decay=damping_adaptation_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be positive or None (no clipping), got {kl_clip}")
        for name, val in (("factor_update_freq", factor_update_freq),
                          ("precondition_frequency", inv_update_freq),
                          ("damping_adaptation_interval", damping_adaptation_interval),
                          ("mc_samples", mc_samples)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if inv_update_freq % factor_update_freq:
            raise ValueError(f"precondition_frequency ({inv_update_freq}) must be a multiple of "
                             f"factor_update_freq ({factor_update_freq})")
        if inverse_method not in ("eigen", "inverse"):
            raise ValueError(f"inverse_method must be 'eigen' or 'inverse', got "
                             f"{inverse_method!r}")
        if eigenvalue_correction and inverse_method != "eigen":
            raise ValueError("eigenvalue_correction (EKFAC) needs inverse_method='eigen'")
        if fisher_type not in ("empirical", "mc"):
            raise ValueError(f"fisher_type must be 'empirical' or 'mc', got {fisher_type!r}")
        if fisher_type == "mc" and loss_fn is None:
            raise ValueError("fisher_type='mc' samples targets from the model: pass loss_fn, "
                             "e.g. nn.CrossEntropyLoss()")
        if fallback not in ("sgd", "adam"):
            raise ValueError(f"fallback must be 'sgd' or 'adam', got {fallback!r}")
        if not 0 < min_damping <= max_damping:
            raise ValueError("need 0 < min_damping <= max_damping")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.process_group = _dist.resolve_group(process_group)
        if self.process_group is not None and adaptive_damping:
            raise ValueError("adaptive_damping is not supported with a process_group (the "
                             "closure's loss is per rank); use a fixed damping")
        self.timings = Timings(enabled=self.process_group is not None)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        kl_clip=kl_clip)
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.model = model
        self.stat_decay = stat_decay
        self.factor_update_freq = factor_update_freq
        self.inv_update_freq = inv_update_freq
        self.inverse_method = inverse_method
        self.eigenvalue_correction = eigenvalue_correction
        self.fisher_type = fisher_type
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples
        self.adaptive_damping = adaptive_damping
        self.damping_adaptation_interval = damping_adaptation_interval
        self.damping_adaptation_decay = damping_adaptation_decay
        self.min_damping, self.max_damping = min_damping, max_damping
        self.fallback = fallback
        self.adam_betas = adam_betas
        self.eps = eps
        self.nonfinite = nonfinite
        self._generator = torch.Generator().manual_seed(seed)

        named = {}
        group_of = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                named[f"p{len(named)}"] = p
                group_of[id(p)] = gi
        tied = tied_embeddings(model)
        self._layers, others = find_layers(model, named, max_factor_dim=max_factor_dim,
                                           embeddings=not eigenvalue_correction,
                                           exclude=tied, approx=approx,
                                           separate_weight_and_bias=separate_weight_and_bias)
        self._layer_group = []
        for layer in self._layers:
            groups = {group_of[id(named[k])] for k in layer.keys}
            if len(groups) > 1:
                raise ValueError(f"weight and bias of layer {layer.name!r} are in different "
                                 "param groups; put them in the same group")
            self._layer_group.append(groups.pop())
        self._other = [named[k] for k in others]
        self._named = named
        # tied weights: the embedding's use is counted with the other layer's in one
        # preconditioner (eigen method, no EKFAC, the other layer without bias)
        self._tied: dict[int, KronLayer] = {}
        if tied_weights not in ("both", "head"):
            raise ValueError(f"tied_weights must be 'both' or 'head', got {tied_weights!r}")
        if tied_weights == "both" and inverse_method == "eigen" and not eigenvalue_correction:
            key_of = {id(p): k for k, p in named.items()}
            index = {L.name: i for i, L in enumerate(self._layers)}
            modules = dict(model.named_modules())
            for emb_name, other in tied.items():
                i, emb = index.get(other), modules[emb_name]
                if i is None or self._layers[i].bias is not None or \
                        self._layers[i].kind != "linear" or id(emb.weight) not in key_of:
                    continue
                E = KronLayer(emb_name, emb, key_of[id(emb.weight)], None, "embedding")
                E.diag_in = True
                E.diag_out = max_factor_dim is not None and E.d_out > max_factor_dim
                self._tied[i] = E
        self._all_layers = self._layers + list(self._tied.values())
        self._log_layout(model, tied, others)
        reject_dtensors(list(named.values()), "KFAC", "Wrap the model in "
                        "DistributedDataParallel and pass process_group instead.")
        # owner rank of each layer's eigendecompositions / inverses
        self._owners = lpt_schedule([float((0 if L.diag_in else L.d_in ** 3)
                                           + (0 if L.diag_out else L.d_out ** 3))
                                     for L in self._layers],
                                    _dist.world_size(self.process_group))
        self._local_n: list[int] = [0] * len(self._all_layers)
        self._global = {"step": 0}
        self._last: dict[str, Any] = {"eigh_failures": 0,
                                      "condition_numbers": {}}
        self._suspended = False
        self._inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        # the hooks hold the optimizer weakly and are removed when it is garbage collected,
        # so a discarded optimizer neither keeps recording nor keeps the model's hooks
        ref = weakref.ref(self)

        def capturing() -> bool:
            opt = ref()
            return opt is not None and opt._capturing and opt.fisher_type == "empirical"

        @torch.compiler.disable
        def record_inputs(module: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
            opt = ref()
            if opt is not None:
                opt._record_inputs(args, kwargs)

        self._capture = LayerCapture(self._all_layers, grads=True, enabled=capturing)
        self._pre_hook = model.register_forward_pre_hook(record_inputs, with_kwargs=True)
        # the samples of each captured forward pass (the N of the empirical Fisher's G)
        self._loss_samples: list[int | None] = []
        self._step_samples: float | None = None  # their sum, once confirmed (_collect)
        weakref.finalize(self, self._capture.remove)
        weakref.finalize(self, self._pre_hook.remove)

    def _log_layout(self, model: nn.Module, tied: dict[str, str], others: list[str]) -> None:
        """One log line: what is factored, what is not (with its share of the parameters),
        which factors are diagonal by the size rule, which tied weight is counted once."""
        total = sum(p.numel() for p in self._named.values()) or 1
        names = {id(p): n for n, p in model.named_parameters()}
        rest = [self._named[k] for k in others]
        n_rest = sum(p.numel() for p in rest)
        diag = [f"{L.name}.{'A' if side == 'in' else 'G'}" for L in self._layers
                for side in ("in", "out")
                if (L.diag_in if side == "in" else L.diag_out)
                and not (side == "in" and L.kind == "embedding")]
        parts = [f"K-FAC factors {len(self._layers)} layers "
                 f"({sum(p.numel() for L in self._layers for p in self._params_of(L))} "
                 f"of {total} parameters)",
                 f"not factored ({self.fallback} fallback): {len(rest)} tensors holding "
                 f"{100.0 * n_rest / total:.1f}% of the parameters "
                 f"[{', '.join(names.get(id(p), '?') for p in rest)}]"]
        if diag:
            parts.append(f"diagonal factors (dimension > max_factor_dim): {', '.join(diag)}")
        counted = {E.name for E in self._tied.values()}
        if counted:
            parts.append("tied weights, both uses counted (one shared eigenbasis per side): "
                         + ", ".join(f"{emb} = {other}" for emb, other in tied.items()
                                     if emb in counted))
        if set(tied) - counted:
            parts.append("tied weights, curvature of one use only: " + ", ".join(
                f"{emb} (embedding) = {other} (factored)" for emb, other in tied.items()
                if emb not in counted))
        logger.info("; ".join(parts))

    def _params_of(self, layer: KronLayer) -> list[torch.Tensor]:
        return [self._named[k] for k in layer.keys]

    #: compiled step: the per-layer damped Kronecker solves and the update
    compilable = True

    def compile_step(self, enabled: bool = True, *, backend: str = "inductor",
                     mode: str | None = None, options: dict[str, Any] | None = None) -> KFAC:
        """The per-step tensor work through ``torch.compile`` (:mod:`curvlab.optim.compiled`):
        each layer's damped Kronecker solve (:func:`damped_kron_solve`; one graph per layer
        kind and shapes, the damping a tensor input, so adaptive damping does not
        recompile) and the decoupled-weight-decay update. The statistics (layer hooks),
        the amortized eigendecompositions / inverses, the fallback's direction, KL
        clipping's one read of ``<U, g>`` and the finiteness check stay eager.
        ``enabled=False``: eager again. Returns ``self``."""
        super().compile_step(enabled, backend=backend, mode=mode, options=options)
        return self

    # ---- hooks and bookkeeping ------------------------------------------------------
    @property
    def _step(self) -> int:
        return self._global["step"]

    @property
    def _capturing(self) -> bool:
        return not self._suspended and self._step % self.factor_update_freq == 0

    def _record_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.fisher_type == "mc" and self._capturing and torch.is_grad_enabled():
            detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self._inputs.append((tuple(detach(a) for a in args),
                                 {k: detach(v) for k, v in kwargs.items()}))
        if self.fisher_type == "empirical" and self._capturing and torch.is_grad_enabled():
            self._loss_samples.append(input_samples((args, kwargs)))

    def _clear(self) -> None:
        self._capture.clear()
        self._inputs.clear()
        self._loss_samples.clear()

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (no further statistics are captured;
        they are also removed when the optimizer is garbage collected)."""
        self._capture.remove()
        self._pre_hook.remove()

    def _after_load(self) -> None:
        self._clear()

    def _extra_stats(self) -> dict[str, Any]:
        """Values of the last step (see the class docstring)."""
        return dict(self._last)

    def _state_template(self, p: torch.Tensor, group: dict[str, Any]
                        ) -> dict[str, tuple[int, ...] | None]:
        """Parameter-shaped entries and the layer's factors (of its first parameter)."""
        out: dict[str, tuple[int, ...] | None] = {
            k: tuple(p.shape) for k in ("momentum_buffer", "exp_avg", "exp_avg_sq")}
        for layer in self._layers:
            if self._named[layer.keys[0]] is p:
                a, g = layer.d_in, layer.d_out
                out["A"] = (a,) if layer.diag_in else (a, a)
                out["G"] = (g,) if layer.diag_out else (g, g)
                out.update(dict.fromkeys(("QA", "QG", "dA", "dG", "A_inv", "G_inv", "scale",
                                          "tA", "tG")))
        return out

    # ---- statistics -----------------------------------------------------------------
    def _layer_grad(self, layer: KronLayer) -> torch.Tensor | None:
        """``[dW | db]`` in the statistics dtype (None if a gradient is missing)."""
        w = self._named[layer.weight].grad if layer.weight is not None else None
        b = self._named[layer.bias].grad if layer.bias is not None else None
        if (layer.weight is not None and w is None) or (layer.bias is not None and b is None):
            return None
        return layer.block(w, b).to(layer.stat_dtype)

    def _reduction(self) -> str:
        return getattr(self.loss_fn, "reduction", "mean")

    def _collect(self) -> list[list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]] | None:
        """Per layer, per captured call: input rows, sample weights and output gradients
        (:func:`curvlab.linops._kronecker.curvature_pass`'s layout). Several recorded
        batches (gradient accumulation) enter like the batches of one objective: with
        weight ``n_b / N`` for a mean loss, 1 for a summing loss."""
        self._step_samples = None
        if self.fisher_type == "mc":
            if not self._inputs:
                return None
            batches = []
            self._suspended = True
            try:
                for args, kwargs in self._inputs:
                    # (a reentrant checkpoint refuses the pass's autograd.grad: a plain call)
                    with plain_checkpoints():
                        batches.append(curvature_pass(
                            self._all_layers, lambda a=args, k=kwargs: self.model(*a, **k),
                            self.loss_fn, None, "mc", reduction=self._reduction(),
                            mc_samples=self.mc_samples, generator=self._generator,
                            params=self._named, per_sample=self.eigenvalue_correction,
                            num_samples=input_samples((args, kwargs))))
            finally:
                self._suspended = False
            sizes = [max((float(om.sum()) for per_layer in got for _, om, _ in per_layer),
                         default=0.0) for got in batches]
            total = sum(sizes)
            calls: list[list[Any]] = [[] for _ in self._all_layers]
            for got, n_b in zip(batches, sizes, strict=True):
                root = math.sqrt(n_b / total) if self._reduction() == "mean" else 1.0
                for i, per_layer in enumerate(got):
                    calls[i].extend((a, om, [g * root for g in gs]) for a, om, gs in per_layer)
            return calls
        calls = [[(rec["a"], rec["a"].new_ones(rec["a"].shape[0]), [rec["g"]])
                  for rec in layer.records if "g" in rec] for layer in self._all_layers]
        if not any(calls):
            return None
        self._step_samples = self._confirmed_samples(calls)
        if self._step_samples is not None:  # (mc: checked in its curvature pass)
            samples = set(self._loss_samples)
            check_rows_are_samples([layer.name for layer, per_layer in zip(
                self._all_layers, calls, strict=True) for a, _, _ in per_layer
                if (self.eigenvalue_correction or layer.sums_positions)
                and a.shape[0] not in samples])
        # a layer not called while the others were, with a nonzero gradient: its weight was
        # applied by a parent (an idle layer's gradient is None or zero)
        uncalled = [layer.name for layer, per_layer in zip(self._layers, calls, strict=False)
                    if not per_layer and (g := self._layer_grad(layer)) is not None
                    and bool(g.any())]
        if uncalled:
            raise ValueError(uncalled_layers_message(uncalled))
        return calls

    def _confirmed_samples(self, calls: list) -> float | None:
        """The samples of this step's captured forward passes (the model inputs' first
        dimensions) if some factored layer saw each as its rows, else None (an input whose
        first tensor is not batched, e.g. a mask passed first, is not trusted)."""
        rows = {int(a.shape[0]) for per_layer in calls for a, _, _ in per_layer}
        if self._loss_samples and all(n is not None and n in rows for n in self._loss_samples):
            return float(sum(self._loss_samples))
        return None

    def _new_factors(self, calls):
        out = []
        for layer, per_layer in zip(self._all_layers, calls, strict=True):
            if not per_layer:
                out.append(None)
                continue
            n = float(sum(om.sum() for _, om, _ in per_layer))
            # the empirical G's N: the model's samples, not this layer's rows (which a
            # sequence-first or flattened input makes positions)
            scale = factor_scale(self.fisher_type, self._reduction(),
                                 self._step_samples if self._step_samples is not None else n)
            A = sum(layer.input_stat(a, om) for a, om, _ in per_layer) / n
            G = sum(layer.output_stat(g) for _, _, gs in per_layer for g in gs) * scale
            out.append((A, G, per_layer, n))
        if self.process_group is not None:  # A = sum_r n_r A_r / N (likewise G)
            live = [i for i, item in enumerate(out) if item is not None]
            for i in live:
                self._local_n[i] = out[i][3]
            mats = [out[i][j] * out[i][3] for i in live for j in (0, 1)]
            counts = torch.tensor([float(out[i][3]) for i in live], dtype=torch.float64,
                                  device=_dist.comm_device(self.process_group))
            all_reduce_factors(mats, self.process_group, self.timings)
            with self.timings.measure("communication"):
                _dist.all_reduce_sum(counts, self.process_group)
            for k, i in enumerate(live):
                N = float(counts[k])
                out[i] = (mats[2 * k] / N, mats[2 * k + 1] / N, out[i][2], N)
        return out

    def _all_reduce_mean(self, value: torch.Tensor, n_local: int, n_total: int) -> torch.Tensor:
        """``sum_r n_r value_r / N`` over the process group."""
        out = value * n_local
        with self.timings.measure("communication"):
            _dist.all_reduce_sum(out, self.process_group)
        return out / n_total

    @staticmethod
    def _side_keys(layer: KronLayer, method: str) -> tuple[list[str], list[str]]:
        """Decomposition keys of the full (shared by the owner) and the diagonal (computed
        by every rank, cheaply) factors of ``layer``."""
        sides = (("dA", "QA", "A_inv", layer.diag_in), ("dG", "QG", "G_inv", layer.diag_out))
        full, diag = [], []
        for d, q, inv, is_diag in sides:
            keys = [d, q] if method == "eigen" else [inv]
            (diag if is_diag else full).extend(keys)
        return full, diag

    def _share_inverses(self, fresh: list[int]) -> None:
        """Give every rank the owners' new eigendecompositions / inverses of ``fresh``
        layers (owner's values, zeros elsewhere, one summed all-reduce; a flag per layer
        says whether the owner has them, so a failed first decomposition stays absent).
        Diagonal factors are decomposed by every rank itself."""
        if self.process_group is None or not fresh:
            return
        me = _dist.rank(self.process_group)
        parts = []
        for i in fresh:
            layer = self._layers[i]
            st = self.state[self._named[layer.keys[0]]]
            keys, diag = self._side_keys(layer, self.inverse_method)
            A = st["A"]
            a, g = A.shape[0], st["G"].shape[0]
            shapes = {"dA": (a,), "QA": (a, a), "dG": (g,), "QG": (g, g), "A_inv": (a, a),
                      "G_inv": (g, g)}
            ok = self._owners[i] == me and all(k in st for k in keys + diag)
            flag = torch.full((1,), float(ok), dtype=A.dtype, device=A.device)
            # one memory layout on every rank (eigh returns column-major eigenvectors, and
            # BLAS rounds differently on them): the ranks' states stay bitwise equal
            vals = [st[k].clone(memory_format=torch.contiguous_format) if ok
                    else A.new_zeros(shapes[k]) for k in keys]
            parts.append((i, st, flag, keys, vals))
        with self.timings.measure("communication"):
            _dist.all_reduce_coalesced([t for _, _, f, _, v in parts for t in (f, *v)],
                                       self.process_group)
        for i, st, flag, keys, vals in parts:
            if float(flag) > 0.5:
                st.update(zip(keys, vals, strict=True))
                if self._owners[i] != me:
                    lam = self.param_groups[self._layer_group[i]]["damping"]
                    self._update_inverse(self._layers[i], st, lam, diag_only=True)

    def _update_inverse(self, layer: KronLayer, st: dict[str, Any], lam: float,
                        diag_only: bool = False) -> None:
        """Eigendecompositions (``"eigen"``) or factored-damping inverses (``"inverse"``)
        of the layer's factors; ``diag_only``: of its diagonal factors only."""
        A, G = st["A"], st["G"]
        todo = [(A, "A", layer.diag_in), (G, "G", layer.diag_out)]
        todo = [(X, n) for X, n, is_diag in todo if is_diag or not diag_only]
        try:
            if self.inverse_method == "eigen":
                for X, n in todo:
                    st["d" + n], st["Q" + n] = eigen_factor(X)
                dA, dG = st.get("dA"), st.get("dG")
            else:
                pi = factored_pi(A, G)
                root = math.sqrt(lam)
                delta = {"A": pi * root, "G": root / pi}
                for X, n in todo:
                    st[n + "_inv"] = damped_factor_inverse(X, delta[n])
                if diag_only:
                    return
                dA, dG = (X.double() if X.dim() == 1 else torch.linalg.eigvalsh(X.double())
                          for X in (A, G))
        except RuntimeError as err:
            self._last["eigh_failures"] += 1
            logger.warning("K-FAC: factor decomposition of layer %r failed (%s); keeping the "
                           "previous preconditioner", layer.name, err)
            return
        if dA is None or dG is None:
            return
        cond = lambda d: float(d.max() / d.min().clamp_min(1e-30))  # noqa: E731
        self._last["condition_numbers"][layer.name] = (cond(dA), cond(dG))

    def _ekfac_scale(self, st: dict[str, Any], per_layer) -> torch.Tensor:
        """``sum_n sum_u (Q_G^T (sum_t g_ntu a_nt^T) Q_A)^2``: the diagonal of the layer's
        curvature block in the Kronecker eigenbasis (times ``N`` for the empirical Fisher
        of a mean loss, as its factor ``G``)."""
        total, n = eigenbasis_scale(per_layer, st["QA"], st["QG"])
        if total is None:
            return st["G"].new_zeros(st["dG"].shape[0], st["dA"].shape[0])
        return total * factor_scale(
            self.fisher_type, self._reduction(),
            self._step_samples if self._step_samples is not None else n)

    # ---- preconditioning -------------------------------------------------------------
    def _precondition(self, st: dict[str, Any], M: torch.Tensor, lam: float,
                      power: float = 1.0) -> torch.Tensor:
        """``(C + lam)^{-power} M`` for the layer's Kronecker curvature ``C`` (``power``
        other than 1 needs the eigen method): :func:`damped_kron_solve` on the layer's
        factors, compiled per kind and shapes after :meth:`compile_step`."""
        if "tied" in st:
            kind, factors = "tied", tuple(st["tied"])
        elif self.inverse_method == "inverse":
            if power != 1.0:
                raise NotImplementedError("inverse_method='inverse' keeps no eigenbasis")
            kind, factors = "inverse", (st["G_inv"], st["A_inv"])
        elif self.eigenvalue_correction:
            kind, factors = "ekfac", (st["QG"], st["QA"], st["scale"])
        else:
            kind, factors = "eigen", (st["QG"], st["QA"], st["dG"], st["dA"])
        if self._step_compiler is None:
            return damped_kron_solve(M, factors, lam, kind, power)
        key = ("kron", kind, power, M.dtype, M.device, tuple(M.shape),
               tuple(None if f is None else (f.dtype, tuple(f.shape)) for f in factors))
        solve = self._step_compiler(damped_kron_solve, key)
        return solve(M, factors, self._step_compiler.scalars([lam], M.device)[0], kind, power)

    def stability_model(self) -> StabilityModel:
        """Heavy-ball momentum on the damped Kronecker-preconditioned gradient: stable while
        ``lr lambda_max(P^{-1/2} H P^{-1/2}) < 2 (1 + momentum)`` with ``P = A (x) G +
        damping`` per layer (the fallback parameters: ``P = I`` for "sgd", Adam's diagonal
        for "adam"). KL clipping only shrinks steps, so the bound is conservative. A layer's
        weight and bias share one block; here each is preconditioned with the other's part
        set to zero (block-diagonal in weight and bias: an estimate)."""
        if self.inverse_method != "eigen":
            raise NotImplementedError("K-FAC's stability model needs inverse_method='eigen'")
        group = self.param_groups[0]
        owner = {}
        for i, layer in enumerate(self._layers):
            for key in layer.keys:
                owner[id(self._named[key])] = i

        def inv_sqrt(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            i = owner.get(id(p))
            if i is None:  # fallback parameter
                st = self.state.get(p, {})
                if self.fallback == "adam" and "exp_avg_sq" in st:
                    config = AdamConfig(self.adam_betas, self.eps)
                    return v * adam_stability_preconditioner(
                        st["exp_avg_sq"], st["adam_step"], config).rsqrt().to(v.dtype)
                return v
            layer = self._layers[i]
            st = self.state[self._named[layer.keys[0]]]
            if "QA" not in st and "tied" not in st:
                return v / math.sqrt(self.param_groups[self._layer_group[i]]["damping"])
            is_weight = layer.weight is not None and self._named[layer.weight] is p
            w = v if is_weight else (torch.zeros_like(self._named[layer.weight])
                                     if layer.weight is not None else None)
            b = v if not is_weight else (torch.zeros_like(self._named[layer.bias])
                                         if layer.bias is not None else None)
            M = layer.block(w, b).to(layer.stat_dtype)
            lam = self.param_groups[self._layer_group[i]]["damping"]
            U = self._precondition(st, M, lam, power=0.5)
            return dict((id(q), u) for q, u in self._split(layer, U))[id(p)].to(v.dtype)

        return StabilityModel("kfac", float(group["lr"]),
                              momentum_threshold(float(group["momentum"])), inv_sqrt,
                              "damped Kronecker factors; weight and bias blocks separated")

    def _curvature_product(self, st: dict[str, Any], M: torch.Tensor) -> torch.Tensor:
        """The (undamped) Kronecker curvature block applied to ``M``."""
        if self.eigenvalue_correction:
            QA, QG = st["QA"], st["QG"]
            return unrotate(rotate(M, QG, QA) * st["scale"], QG, QA)
        out = kron_apply(st["G"], M, st["A"])
        if "tA" in st:  # a tied embedding's block: diag(A_E) M G_E on the (vocab, d) weight
            out = out + kron_apply(st["tA"], M, st["tG"])
        return out

    def _split(self, layer: KronLayer, U: torch.Tensor) -> list[tuple[torch.Tensor,
                                                                      torch.Tensor]]:
        w, b = layer.split(U)
        out = []
        if layer.weight is not None:
            p = self._named[layer.weight]
            out.append((p, w.to(p.dtype)))
        if layer.bias is not None:
            p = self._named[layer.bias]
            out.append((p, b.to(p.dtype)))
        return out

    # ---- the step --------------------------------------------------------------------
    def _nonfinite(self, what: str) -> None:
        self._clear()
        self._skip("nonfinite", what)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record no statistics from forward/backward passes run inside this context (e.g.
        a monitor's or an evaluation's passes through the same model)."""
        saved, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = saved

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One K-FAC step: the preconditioner's statistics (:meth:`update_statistics`),
        its refresh (:meth:`refresh`), the preconditioned directions
        (:meth:`precondition`), then KL clipping, momentum and the update
        (:meth:`_apply`)."""
        if self.adaptive_damping and closure is None:
            raise ValueError("adaptive_damping needs step(closure): the closure re-evaluates "
                             "the loss after the update")
        loss, bound = self._begin_step(closure, loss_checked=True)
        if bound is None:  # the base rule: non-finite or overflowing gradient or loss
            self._clear()
            return loss
        new = self._new_statistics()
        if new is False:
            return loss
        self.update_statistics(new)
        self.refresh(new)
        self._clear()
        directions, layer_dirs = self.precondition()
        return self._apply(directions, layer_dirs, closure, loss)

    def _new_statistics(self) -> list | None | bool:
        """This step's factors from the captured passes (None when it is not a statistics
        step, False when they are not finite: the step is then skipped, nothing changed)."""
        if self._step % self.factor_update_freq:
            return None
        with torch.enable_grad():
            calls = self._collect()
        if calls is None and self._capture._handles and any(
                self._layer_grad(layer) is not None for layer in self._layers):
            self._clear()
            raise RuntimeError(
                "K-FAC: the layers have gradients but no statistics were captured in this "
                "step's forward/backward pass (the model ran under torch.compile, whose "
                "compiled graph skips the optimizer's hooks, or outside autograd, or "
                "without the module KFAC was given). Run the uncompiled model on "
                "statistics steps, or call remove_hooks() to keep the current factors")
        if calls is None:
            return None
        new = self._new_factors(calls)
        if not _finite([t for item in new if item is not None for t in item[:2]]):
            self._nonfinite("curvature statistics")
            return False
        return new

    def update_statistics(self, new: list | None) -> None:
        """Factor EMAs ``F <- beta F + (1 - beta) F_new`` of every layer and of the
        embedding use of each tied weight (``new``: this step's factors, None on steps
        without statistics)."""
        beta = self.stat_decay
        if new is None:
            return
        for i, layer in enumerate(self._layers):
            st = self.state[self._named[layer.keys[0]]]
            if new[i] is not None:
                _ema(st, ("A", "G"), new[i][:2], beta)
        for k, i in enumerate(self._tied):
            st = self.state[self._named[self._layers[i].keys[0]]]
            item = new[len(self._layers) + k]
            if item is not None:
                _ema(st, ("tA", "tG"), item[:2], beta)

    def refresh(self, new: list | None) -> list[int]:
        """The amortized work: the inverses due (every ``precondition_frequency`` steps, or
        missing), each layer's by its owner rank and shared; then what depends on them:
        the shared eigenbases of tied weights and the EKFAC scales (a moving average of
        the per-sample second moments in the eigenbasis, restarted when the basis
        changes). Returns the layers whose inverses were recomputed."""
        beta = self.stat_decay
        me = _dist.rank(self.process_group)
        inv_step = self._step % self.inv_update_freq == 0
        fresh_layers: list[int] = []
        for i, layer in enumerate(self._layers):
            st = self.state[self._named[layer.keys[0]]]
            if "A" not in st:
                continue
            lam = self.param_groups[self._layer_group[i]]["damping"]
            if inv_step or ("QA" not in st and "A_inv" not in st):
                fresh_layers.append(i)
                if self._owners[i] == me:
                    with self.timings.measure("precondition"):
                        self._update_inverse(layer, st, lam)
        self._share_inverses(fresh_layers)
        for i in self._tied:  # the embedding use of a tied weight
            st = self.state[self._named[self._layers[i].keys[0]]]
            if "tA" in st and "A" in st and (i in fresh_layers or "tied" not in st):
                with self.timings.measure("precondition"):
                    st["tied"] = _tied_bases(st["G"], st["A"], st["tA"], st["tG"])
        if not self.eigenvalue_correction:
            return fresh_layers
        for i, layer in enumerate(self._layers):
            st = self.state[self._named[layer.keys[0]]]
            item = new[i] if new is not None else None
            if "QA" not in st:
                continue
            if item is not None:
                s = self._ekfac_scale(st, item[2])
                if self.process_group is not None:  # sum_r n_r s_r / N
                    s = self._all_reduce_mean(s, self._local_n[i], item[3])
                if i in fresh_layers or "scale" not in st:
                    st["scale"] = s
                else:
                    st["scale"].mul_(beta).add_(s, alpha=1 - beta)
            elif "scale" not in st:
                st["scale"] = st["dG"].unsqueeze(1) * st["dA"].unsqueeze(0)
        return fresh_layers

    def precondition(self) -> tuple[dict[int, list], list]:
        """Per param group, ``(param, direction, gradient)``: the damped Kronecker natural
        gradient of each factored layer (``M / damping`` before its first inverse), the
        fallback's direction for the other parameters; and ``(layer, M, U)`` per layer."""
        directions: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            gi: [] for gi in range(len(self.param_groups))}
        layer_dirs = []
        for i, layer in enumerate(self._layers):
            M = self._layer_grad(layer)
            st = self.state[self._named[layer.keys[0]]]
            gi = self._layer_group[i]
            lam = self.param_groups[gi]["damping"]
            if M is None:
                continue
            ready = "QA" in st if self.inverse_method == "eigen" else "A_inv" in st
            U = self._precondition(st, M, lam) if ready else M / lam
            layer_dirs.append((i, M, U))
            for p, u in self._split(layer, U):
                directions[gi].append((p, u, p.grad))
        for p in self._other:
            if p.grad is None:
                continue
            gi = next(j for j, g in enumerate(self.param_groups)
                      if any(q is p for q in g["params"]))
            directions[gi].append((p, self._fallback_direction(p), p.grad))
        return directions, layer_dirs

    def _apply(self, directions: dict[int, list], layer_dirs: list, closure: Any,
               loss: Any) -> Any:
        """KL clipping ``nu = min(1, sqrt(kl_clip / (lr^2 sum <U, g>)))``, heavy-ball
        momentum, decoupled weight decay and the update (all checked finite before a
        parameter changes); then adaptive damping when due."""
        k = self._step
        nus, updates = [], []
        for gi, group in enumerate(self.param_groups):
            items = directions[gi]
            if not items:
                continue
            nu = 1.0
            if group["kl_clip"] is not None:  # <U, g> per parameter, one host read
                vg = sum(_host_floats([(u * g).sum() for _, u, g in items])) * group["lr"] ** 2
                if vg > 0:
                    nu = min(1.0, math.sqrt(group["kl_clip"] / vg))
            nus.append(nu)
            for p, u, _ in items:
                d = u * nu
                buf = self.state[p].get("momentum_buffer")
                if group["momentum"] and buf is not None:
                    d = buf * group["momentum"] + d
                updates.append((p, d, group))
        if not _finite([d for _, d, _ in updates]):
            self._nonfinite("update")
            return loss
        saved = None
        if self._adapt_now(closure):  # to undo a step whose new loss is non-finite
            saved = [(p.detach().clone(), self.state[p].get("momentum_buffer"))
                     for p, _, _ in updates]
        by_group: dict[int, tuple[dict, list, list]] = {}
        for p, d, group in updates:
            if group["momentum"]:
                self.state[p]["momentum_buffer"] = d.clone()
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(p)
            entry[2].append(d)
        for group, ps, ds in by_group.values():  # foreach per device and dtype
            apply_update_(ps, ds, group["lr"], group["weight_decay"],
                          compiler=self._step_compiler)
        self._global["step"] = k + 1
        self._counters["steps"] += 1
        self._last.update(step=k + 1, kl_clip_scale=min(nus) if nus else 1.0,
                          damping=[g["damping"] for g in self.param_groups])
        if saved is not None:
            self._adapt_damping(closure, loss, updates, saved, layer_dirs)
        return loss

    def _fallback_direction(self, p: torch.Tensor) -> torch.Tensor:
        if self.fallback == "sgd":
            return p.grad
        st = self.state[p]
        if "exp_avg" not in st:
            dtype = moment_dtype(p.dtype)
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
            st["adam_step"] = 0
        st["adam_step"] += 1
        (d,) = adam_directions_([st["exp_avg"]], [st["exp_avg_sq"]], [p.grad],
                                [st["adam_step"]], AdamConfig(self.adam_betas, self.eps))
        return d.to(p.dtype)

    def _adapt_now(self, closure: Any) -> bool:
        return (self.adaptive_damping and closure is not None
                and (self._step + 1) % self.damping_adaptation_interval == 0)

    def _adapt_damping(self, closure, loss, updates, saved, layer_dirs) -> None:
        """Levenberg-Marquardt rule on rho = actual / predicted reduction (M&G 2015 6.5)."""
        steps = {id(p): -group["lr"] * d for p, d, group in updates}
        lam = self.param_groups[0]["damping"]
        pred = 0.0
        for i, M, _ in layer_dirs:
            layer = self._layers[i]
            w, b = (steps[id(self._named[k])] if k is not None else None
                    for k in (layer.weight, layer.bias))
            D = layer.block(w, b).to(M.dtype)
            st = self.state[self._named[layer.keys[0]]]
            FD = self._curvature_product(st, D)
            pred += float((M * D).sum()) + 0.5 * float((D * FD).sum() + lam * D.square().sum())
        for p in self._other:
            if id(p) in steps and p.grad is not None:
                s = steps[id(p)]
                pred += float((p.grad * s).sum()) + 0.5 * lam * float(s.square().sum())
        self._suspended = True
        try:
            with torch.enable_grad():
                new_loss = float(closure().detach())
        finally:
            self._suspended = False
            self._clear()
        old = float(loss)
        rho = (new_loss - old) / pred if pred < 0 else -math.inf
        if not math.isfinite(new_loss):
            for (p, _, _), (value, buf) in zip(updates, saved, strict=True):
                p.copy_(value)
                if buf is None:
                    self.state[p].pop("momentum_buffer", None)
                else:
                    self.state[p]["momentum_buffer"] = buf
            rho = -math.inf
            logger.warning("K-FAC: non-finite loss after the step; step undone, damping raised")
        omega = self.damping_adaptation_decay ** self.damping_adaptation_interval
        for group in self.param_groups:
            if rho > 0.75:
                group["damping"] = max(self.min_damping, group["damping"] * omega)
            elif rho < 0.25:
                group["damping"] = min(self.max_damping, group["damping"] / omega)
        self._last.update(rho=rho, damping=[g["damping"] for g in self.param_groups])


def damped_kron_solve(M: torch.Tensor, factors: tuple, lam: float | torch.Tensor, kind: str,
                      power: float = 1.0) -> torch.Tensor:
    """``(C + lam)^{-power} M`` for a layer's Kronecker curvature ``C`` from its ``factors``
    (a pure tensor function: :meth:`KFAC._precondition` calls it eagerly or compiled;
    ``lam`` a number or a 0-d tensor):

    * ``"eigen"`` ``(Q_G, Q_A, d_G, d_A)``: ``Q_G [(Q_G^T M Q_A) / (d_G d_A^T + lam)^p] Q_A^T``;
    * ``"ekfac"`` ``(Q_G, Q_A, s)``: the same with the eigenvalue-corrected ``s``;
    * ``"tied"`` ``(P, Q, gamma, delta, alpha, beta)``: denominator
      ``gamma alpha^T + delta beta^T + lam`` in the bases ``P``, ``Q`` (:func:`_tied_bases`);
    * ``"inverse"`` ``(G^-1, A^-1)`` (factored damping, already in the inverses; ``p = 1``).

    A basis ``None`` is the identity of a diagonal factor."""
    if kind == "inverse":
        G_inv, A_inv = factors
        return kron_apply(G_inv, M, A_inv)
    if kind == "tied":
        QG, QA, gam, dlt, alp, bet = factors
        denom = gam.unsqueeze(1) * alp.unsqueeze(0) + dlt.unsqueeze(1) * bet.unsqueeze(0) + lam
    elif kind == "ekfac":
        QG, QA, scale = factors
        denom = scale + lam
    else:
        QG, QA, dG, dA = factors
        denom = dG.unsqueeze(1) * dA.unsqueeze(0) + lam
    return unrotate(rotate(M, QG, QA) / denom ** power, QG, QA)


def _ema(st: dict[str, Any], keys: tuple[str, str], values: Sequence[torch.Tensor],
         beta: float) -> None:
    """``st[k] <- beta st[k] + (1 - beta) v`` for each key (the first value: a copy)."""
    for k, v in zip(keys, values, strict=True):
        if k not in st:
            st[k] = v.clone()
        else:
            st[k].mul_(beta).add_(v, alpha=1 - beta)


def _shared_basis(X: torch.Tensor, Y: torch.Tensor, wx: float, wy: float
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The eigenbasis ``Q`` of ``wx X + wy Y`` and the diagonals of ``X`` and ``Y`` in it
    (exact for both when they commute; the identity if both are diagonal)."""
    if X.dim() == 1 and Y.dim() == 1:
        return None, X, Y
    Xd, Yd = dense_factor(X), dense_factor(Y)
    _, Q = eigen_factor(wx * Xd + wy * Yd)
    return Q, (Q * (Xd @ Q)).sum(0), (Q * (Yd @ Q)).sum(0)


def _tied_bases(G: torch.Tensor, A: torch.Tensor, A_emb: torch.Tensor,
                G_emb: torch.Tensor) -> tuple[Any, ...]:
    """Preconditioner of a weight ``W`` (vocab x d) used by a layer (block ``G W A``) and by
    an embedding (block ``diag(A_emb) W G_emb``): in the eigenbases ``P`` and ``Q`` of the
    curvature's partial traces over the other side, ``tr(A) G + tr(G_emb) A_emb`` (vocab
    side) and ``tr(G) A + tr(A_emb) G_emb`` (d side), ``(G (x) A + A_emb (x) G_emb +
    lambda)^-1`` is approximated by the inverse of its diagonal ``gamma alpha^T + delta
    beta^T + lambda`` (exact when the two factors of each side commute, e.g. when both are
    diagonal)."""
    tr = lambda X: mean_diag(X) * X.shape[0]  # noqa: E731
    P, gam, dlt = _shared_basis(G, A_emb, tr(A), tr(G_emb))
    Q, alp, bet = _shared_basis(A, G_emb, tr(G), tr(A_emb))
    return P, Q, gam, dlt, alp, bet


def _host_floats(values: list[torch.Tensor]) -> list[float]:
    """The 0-d tensors ``values`` as Python floats, read in one transfer (per device)."""
    if len({v.device for v in values}) > 1:
        return [float(v) for v in values]
    return torch.stack([v.double() for v in values]).tolist()


def _finite(tensors: list[torch.Tensor]) -> bool:
    """Every entry of every tensor is finite (one host sync, the core's ``max_abs``)."""
    return not tensors or math.isfinite(max_abs(tensors))


def _positive(**values: float) -> None:
    for name, val in values.items():
        if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
            raise ValueError(f"{name} must be a positive number, got {val!r}")


def _in_range(**values: float) -> None:
    for name, val in values.items():
        if not (isinstance(val, (int, float)) and 0 <= val < 1):
            raise ValueError(f"{name} must be in [0, 1), got {val!r}")
