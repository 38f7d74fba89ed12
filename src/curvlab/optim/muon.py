r"""Muon: orthogonalized Nesterov momentum for matrix parameters, AdamW for the rest.

For a weight ``W`` (conv and higher-rank weights flattened to ``(out, in * ...)``):

.. math::
    B_t &= \mu B_{t-1} + (1-\mu) G_t, \qquad
    U_t = \begin{cases} (1-\mu) G_t + \mu B_t & \text{nesterov} \\ B_t \end{cases} \\
    O_t &= \mathrm{NS}(U_t) \approx \text{polar factor } U V^T \text{ of } U_t = U S V^T \\
    W_t &= (1 - \eta\lambda) W_{t-1} - \eta\, s(A, B)\, O_t

with the shape-aware scale ``s``: ``"original"`` ``sqrt(max(1, A/B))`` (Jordan et al.),
``"match_rms_adamw"`` ``0.2 sqrt(max(A, B))`` (Liu et al. 2025, Moonlight: the update RMS
matches AdamW's so AdamW's learning rate and weight decay carry over), ``"none"`` 1; ``A, B``
are the rows and columns of the flattened weight in its logical ``(out, in)`` orientation: a
group with ``transposed=True`` holds 2-D weights stored ``(in, out)`` (Hugging Face's
``Conv1D``, used by GPT-2), which Muon orthogonalizes and scales as their transpose, so such a
layer gets exactly the transpose of the update of the equivalent ``nn.Linear``. Parameters
of groups with ``use_muon=False`` (and, by default, parameters with fewer than 2 dimensions)
are updated by AdamW with the group's ``lr``, ``weight_decay`` and ``adam`` settings
(:mod:`curvlab.optim.adam`; moments in float32 for 16-bit parameters).
:func:`muon_param_groups` routes embeddings, the output head, biases and norms to AdamW
and marks ``Conv1D`` weights ``transposed`` in one line.

``NS`` is ``ns_steps`` Newton–Schulz iterations (:func:`curvlab.linalg.newton_schulz`) with
the coefficients ``ns_coefficients``: ``"quintic"`` (default; Jordan et al.'s
``(3.4445, -4.7750, 2.0315)`` at every iteration, singular values land in about
[0.7, 1.2]), ``"polar_express"`` (Amsel et al. 2025: a minimax-optimal quintic per
iteration, converging to ``U V^T``), one user ``(a, b, c)`` or a sequence of per-iteration
tuples. ``gram=True`` runs the same polynomials through the small Gram matrix of the
update (Gram Newton–Schulz, restarted every ``gram_restarts`` iterations): equal in
exact arithmetic, fewer multiply-adds for wide or tall matrices. On a CPU it is used only
for matrices at least :data:`CPU_GRAM_MIN_ASPECT` times wider than tall, the others run the
plain iteration: there its small square products are slow enough that Gram costs more
below that (bfloat16, 1 thread, 5 Polar Express iterations: Gram / plain time 1.33 at
256 x 512, 1.18 at 256 x 1024, 1.11 at 2 x 128 x 768, 0.85 at 2 x 128 x 1024, 0.85 at
2 x 64 x 1024).

``normalize="neuron"`` is NorMuon (Li et al. 2025): after orthogonalization each output
neuron (row ``i`` of the logical ``(out, in)`` matrix) is divided by the root of an EMA of
its mean square, and the result rescaled to the Frobenius norm of ``O_t``:

.. math::
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, \mathrm{mean}_j (O_t)_{ij}^2, \qquad
    \hat O_t = \mathrm{diag}(\sqrt{v_t} + \epsilon)^{-1} O_t, \qquad
    O_t \leftarrow \frac{\|O_t\|_F}{\|\hat O_t\|_F + \epsilon}\, \hat O_t

with ``epsilon = 1e-10`` and no bias correction, as in the authors' reference code (from
``v_0 = 0`` the first step gives every row the same RMS: the factor ``1 - beta_2`` cancels in
the rescaling). Because the update keeps the Frobenius norm of ``O_t``, the scale ``s``
(``adjust_lr``) keeps its meaning; ``"match_rms_adamw"`` gives the paper's step size
``0.2 sqrt(A B) / ||\hat O_t||_F`` when ``O_t`` is orthogonal. ``v`` is the state
``neuron_second_moment`` (``A`` entries; float32 for 16-bit parameters).

Matrices of one wide shape (``(A, B)`` and ``(B, A)`` alike: ``polar(U^T) = polar(U)^T``) are
orthogonalized together in one batched Newton–Schulz. The iteration
runs in ``ns_dtype``, by default (:func:`default_ns_dtype`) bfloat16 where the hardware
multiplies bfloat16 natively (CUDA; CPUs with AMX or AVX512-BF16, where it is 2.6x faster
than float32, measured on 4 x 128x512x128 batched products), as the authors' reference and
``torch.optim.Muon`` run it, except for small stacks on a CPU (:data:`CPU_BF16_MIN_WORK`:
there a bfloat16 product's fixed cost makes float32 up to 4x faster); elsewhere float32
(bfloat16 is emulated there, slower than float32), and float64 for float64 parameters on a
CPU.

Data parallel (``process_group``): under DDP the Newton–Schulz work is split over the ranks
(each matrix has an owner by a longest-processing-time schedule over ``A B min(A, B)``) and
the orthogonalized updates are all-gathered, so each rank runs about ``1/world_size`` of it
(:mod:`curvlab.optim.distributors.matrices`). Under FSDP2 (``fully_shard``, DTensor
parameters) the iteration must see the whole matrix, not a shard: each matrix's row shards
are sent to its owner only (one all-to-all for all matrices), the owner orthogonalizes it
and sends every rank its rows of the result (a second all-to-all), so no rank materializes
matrices it does not own; ``process_group`` must be the group the parameters are sharded
over (1-D mesh, ``Shard(0)``: ``fully_shard``'s default; other layouts are refused at
construction).

NorMuon's normalization runs on every rank after the orthogonalized updates are gathered
(DDP), so the state is identical everywhere. Under FSDP2 each rank holds only its rows of
each orthogonalized update: one all-reduce (for all matrices of a group) gives every rank
the whole rows' sums of squares ``r`` (the logical rows of an ``(in, out)`` weight run
across the shards: each rank adds its part of every row), from which ``v`` (whole, the
same on every rank) and both Frobenius norms follow; each rank then scales its rows.

References: Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks";
Liu et al. (2025), "Muon is scalable for LLM training"; Amsel, Persson, Musco, Gower (2025),
"The Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon
Algorithm"; Zhang, Amsel, Chen, Dao (2026), "Gram Newton-Schulz"; Li et al. (2025),
"NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import distributed as _dist
from curvlab.linalg.matfuncs import (
    coefficients_problem,
    gram_restart_indices,
    newton_schulz,
    ns_schedule,
)
from curvlab.optim.adam import (
    AdamConfig,
    adam_stability_preconditioner,
    adam_step_,
    foreach_scalar,
    moment_dtype,
)
from curvlab.optim.base import (
    CurvlabOptimizer,
    betas_rule,
    finite_nonnegative,
    finite_positive,
    one_of,
    optional,
    unit_interval,
)
from curvlab.optim.distributors.collectives import local_tensor
from curvlab.optim.distributors.matrices import matrix_distributor
from curvlab.optim.muon_plan import MuonPlan, group_plan
from curvlab.optim.stability import StabilityModel, ema_samples, momentum_threshold

logger = logging.getLogger(__name__)

__all__ = ["Muon", "muon_param_groups"]

_ADJUST = ("original", "match_rms_adamw", "none")
_NORMALIZE = (None, "neuron")
NORMUON_EPS = 1e-10  # the NorMuon authors' reference code
#: on a CPU, ``gram=True`` runs Gram Newton–Schulz only on matrices at least this many
#: times wider than tall (measured crossover, see the module docstring)
CPU_GRAM_MIN_ASPECT = 8
#: on a CPU with native bfloat16 products, a Newton–Schulz stack of ``k`` matrices
#: ``n x m`` (``n <= m``) iterates in bfloat16 only from this many multiply-adds ``k n^2 m``:
#: each bfloat16 product has a fixed cost (~40 us), so below it float32 is faster (measured
#: 5 quintic iterations, 1 thread: 64x128 float32 255 us vs bfloat16 661, 128x128 708 vs
#: 824, at 4.2e6 (128x256, 4 x 64x256, 64x1024) 0.85-1.02 x, 128x384 (6.3e6) 1.21 x,
#: 256x256 1.89 x slower in float32; 2 threads alike). Measured again on 2026-12-04
#: (float32 / bfloat16 time, medians of 40): 128x128 (2.1e6) 0.93-0.97, 128x192 and
#: 3 x 64x256 (3.1e6) 1.03 / 0.90, at 4.1e6-4.7e6 (160x160, 2 x 128x128, 128x256, 4 x
#: 64x256, 64x1024, 96x512) 1.06-1.38: the crossover moves with the machine's state
#: between ~3e6 and ~5e6; 4e6 sits between (the tiny GPT-2's 2 x 128x128 stack, float32
#: at 5e6: its step 1.01-1.05 x the peer's, 0.98-1.02 x in bfloat16). The rule goes by the
#: stack (one batched product pays the fixed cost once), so under DDP, where an owner
#: stacks only its own matrices, a matrix may iterate in float32 where one process
#: iterates it in bfloat16.
CPU_BF16_MIN_WORK = 4_000_000


def native_bfloat16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: CUDA, or a CPU with AMX
    tiles or the AVX512-BF16 instructions (oneDNN's bfloat16 kernels); other CPUs emulate
    bfloat16 through float32 conversions."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _cpu_has_bfloat16_kernels()


@functools.cache
def _cpu_has_bfloat16_kernels() -> bool:
    """The CPU probes, read once per process (the answer is asked on every Muon step)."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def default_ns_dtype(device: torch.device, param_dtype: torch.dtype,
                     shape: Sequence[int] | None = None) -> torch.dtype:
    """Muon's default Newton–Schulz dtype: float64 for float64 parameters on a CPU, else
    bfloat16 where :func:`native_bfloat16_matmul`, except on a CPU for a stack of
    ``shape`` ``(..., n, m)`` with fewer than :data:`CPU_BF16_MIN_WORK` multiply-adds
    ``k n^2 m`` (``n <= m``, ``k`` matrices), else float32."""
    if param_dtype == torch.float64 and device.type == "cpu":
        return torch.float64
    if not native_bfloat16_matmul(device):
        return torch.float32
    if device.type == "cpu" and shape is not None and len(shape) >= 2:
        n, m = sorted(shape[-2:])
        if math.prod(shape[:-2]) * n * n * m < CPU_BF16_MIN_WORK:
            return torch.float32
    return torch.bfloat16


def _restarts_rule(r: Any) -> str | None:
    try:
        gram_restart_indices(r, 0)
    except ValueError:
        return "must be a period k >= 1 or a tuple of iteration indices >= 1"
    return None


def _as_tuples(x: Any) -> Any:
    """Lists (of lists) as tuples, so a group's settings are hashable constants."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x



class Muon(CurvlabOptimizer):
    """Muon with an AdamW fallback (torch.optim API). See the module docstring.

    Args:
        params: parameters or param groups; a group may set ``use_muon`` (True/False; default:
            Muon for parameters with >= 2 dimensions, AdamW otherwise) and ``transposed``
            (default False: its 2-D weights are stored ``(in, out)``, like HF ``Conv1D``;
            :func:`muon_param_groups` sets it).
        lr: learning rate (of both methods unless a group overrides it).
        momentum, nesterov: Muon's momentum.
        weight_decay: decoupled weight decay ``p <- (1 - lr wd) p``.
        ns_steps, ns_coefficients, eps: Newton–Schulz iteration (``eps`` > 0 guards the
            normalization). ``ns_coefficients``: ``"quintic"`` (default), ``"polar_express"``,
            one ``(a, b, c)`` reused at every iteration, or a sequence of at least
            ``ns_steps`` per-iteration tuples (:func:`curvlab.linalg.matfuncs.ns_schedule`).
        gram, gram_restarts: Gram Newton–Schulz, restarted every ``gram_restarts``
            iterations (default 2) or before the (0-based) iterations of a tuple (its
            authors': ``(2,)``; see :func:`curvlab.linalg.newton_schulz`); on a CPU only
            for matrices at least :data:`CPU_GRAM_MIN_ASPECT` times wider than tall.
        normalize: None (Muon) or ``"neuron"`` (NorMuon: neuron-wise second-moment
            normalization after orthogonalization, see the module docstring).
        beta2: NorMuon's second-moment EMA factor (default 0.95, the authors').
        adjust_lr: "original" (default), "match_rms_adamw" or "none" (see module docstring).
        ns_dtype: dtype of the Newton–Schulz iteration (default :func:`default_ns_dtype`:
            bfloat16 where the hardware multiplies it natively, except small stacks on a
            CPU, else float32, float64 for float64 parameters).
        adam: :class:`~curvlab.optim.adam.AdamConfig` (or a dict of its fields) of the AdamW
            used for the non-Muon parameters (stored in the groups as ``adam_betas``,
            ``adam_eps``). ``adamw_betas`` / ``adamw_eps`` are deprecated aliases.
        nonfinite: "skip" (default) or "raise" for non-finite or overflowing gradients
            (:mod:`curvlab.optim.base`).
        process_group: ``None``, ``"default"`` or a ``ProcessGroup``: split the
            Newton–Schulz work over its ranks (DDP), required for DTensor (FSDP2) parameters.
        compile: :meth:`compile_step` at construction: the Newton–Schulz iteration through
            ``torch.compile`` (one graph per batch shape, compiled on first use; fuses the
            scaling and additions around the matmuls on GPUs) and the AdamW part compiled.
            Off by default: compiling costs seconds.
    """

    hyperparameters = {
        "lr": finite_positive, "weight_decay": finite_nonnegative, "momentum": unit_interval,
        "eps": finite_positive, "adam_betas": betas_rule, "adam_eps": finite_positive,
        "adjust_lr": one_of(*_ADJUST), "ns_dtype": optional(lambda d: None if isinstance(
            d, torch.dtype) and d.is_floating_point else "must be a floating torch dtype"),
        "ns_steps": lambda n: None if isinstance(n, int) and n >= 0 else
        "must be an integer >= 0",
        "ns_coefficients": coefficients_problem, "gram": one_of(False, True),
        "gram_restarts": _restarts_rule, "normalize": one_of(*_NORMALIZE),
        "beta2": unit_interval,
    }
    renamed = {"adamw_betas": "adam_betas", "adamw_eps": "adam_eps"}

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        ns_steps: int = 5,
        ns_coefficients: str | tuple = "quintic",
        eps: float = 1e-7,
        gram: bool = False,
        gram_restarts: int | tuple[int, ...] = 2,
        normalize: str | None = None,
        beta2: float = 0.95,
        adjust_lr: str = "original",
        ns_dtype: torch.dtype | None = None,
        adam: AdamConfig | dict | None = None,
        nonfinite: str = "skip",
        process_group: Any = None,
        compile: bool = False,
        **renamed: Any,
    ) -> None:
        adam = AdamConfig.of(adam)
        aux = self._renamed_kwargs(renamed, {"adam_betas": adam.betas, "adam_eps": adam.eps})
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=_as_tuples(ns_coefficients),
                        eps=eps, gram=gram, gram_restarts=_as_tuples(gram_restarts),
                        normalize=normalize, beta2=beta2,
                        adjust_lr=adjust_lr, ns_dtype=ns_dtype,
                        adam_betas=tuple(aux["adam_betas"]), adam_eps=aux["adam_eps"],
                        use_muon=None, transposed=False)
        self.process_group = _dist.resolve_group(process_group)
        self._plans: dict[int, MuonPlan] = {}  # id(group) -> its layout (muon_plan)
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.distributor = matrix_distributor(
            self.process_group, [p for g in self.param_groups for p in g["params"]], "Muon")
        self.timings = self.distributor.timings
        for g in self.param_groups:
            self._validate_group(g)
        if compile:
            self.compile_step()

    #: compiled step: Newton–Schulz per batch shape, and the AdamW part
    compilable = True

    def compile_step(self, enabled: bool = True, *, backend: str = "inductor",
                     mode: str | None = None, options: dict[str, Any] | None = None) -> Muon:
        """The Newton–Schulz iteration through ``torch.compile`` (``fullgraph``; one copy of
        its code per batch shape and setting, so many shapes or several optimizers in one
        process never meet dynamo's recompile limit; compiled on first use) and the AdamW
        part through the shared compiled Adam update (:mod:`curvlab.optim.compiled`);
        ``enabled=False``: eager again. ``Muon(..., compile=True)`` is the same at
        construction. Returns ``self``."""
        super().compile_step(enabled, backend=backend, mode=mode, options=options)
        return self

    def _validate_group(self, g: dict[str, Any]) -> None:
        super()._validate_group(g)
        try:
            ns_schedule(g["ns_coefficients"], g["ns_steps"])
        except ValueError as err:
            raise ValueError(f"Muon: {err}") from None
        if g["transposed"]:
            for p in g["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"transposed=True marks 2-D weights stored (in, out) (HF Conv1D), but a "
                        f"parameter of the group has shape {tuple(p.shape)}; put it in another "
                        "group")
        if g["use_muon"]:
            for p in g["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"use_muon=True but a parameter has shape {tuple(p.shape)}; Muon needs "
                        ">= 2 dimensions. Put biases/norms in a group with use_muon=False or use "
                        "curvlab.optim.muon_param_groups(model)")

    def _uses_muon(self, group: dict[str, Any], p: Tensor) -> bool:
        return bool(group["use_muon"]) if group["use_muon"] is not None else p.ndim >= 2

    def _plan(self, group: dict[str, Any]) -> MuonPlan:
        return group_plan(self._plans, group, self._uses_muon, self.distributor.owners)

    def _after_load(self) -> None:
        self._plans.clear()  # the loaded param groups are new dicts

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, gmax = self._begin_step(closure, process_group=self.distributor.gradient_group())
        if gmax is None:
            return loss
        self._counters["steps"] += 1
        for group in self.param_groups:
            plan = self._plan(group)
            if plan.muon:
                self._muon_update(group, plan)
            if plan.adam:
                self._adam_update(group, plan)
        return loss

    def _muon_update(self, group: dict[str, Any], plan: MuonPlan) -> None:
        mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        ps = plan.muon
        grads = [p.grad for p in ps]
        bufs = []
        for p in ps:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1.0 - mom)
        if wd != 0:
            torch._foreach_mul_(ps, foreach_scalar(ps)(1.0 - lr * wd))
        dtype = group["ns_dtype"]
        transposed = bool(group.get("transposed", False))  # state dicts from before the key

        def orthogonalize(i_list: list[int], U: Tensor, as_params: bool = True,
                          scratch: bool = False) -> Tensor:
            """Newton–Schulz of the stacked updates ``U`` of ``ps[i_list]``, in their
            dtype (``as_params=False``: in the iteration's); ``scratch``: ``U`` may be
            overwritten."""
            pdtype = ps[i_list[0]].dtype
            ns_dtype = dtype or default_ns_dtype(U.device, pdtype, U.shape)
            out_dtype = pdtype if as_params else ns_dtype
            gram = group["gram"] and _gram_pays(U)
            settings = (group["ns_steps"], group["ns_coefficients"], group["eps"],
                        group["gram_restarts"])
            fn = newton_schulz if self._step_compiler is None else self._step_compiler(
                newton_schulz, ("newton_schulz", tuple(U.shape), U.dtype, U.device, ns_dtype,
                                out_dtype, gram, settings))
            with self.timings.measure("precondition"):
                return fn(U, *settings[:3], dtype=ns_dtype, gram=gram,
                          gram_restarts=settings[3], out_dtype=out_dtype,
                          overwrite=scratch and self._step_compiler is None)

        # Newton–Schulz goes by the wide 2-D shape it iterates on (its result is
        # orientation-equivariant: polar(U^T) = polar(U)^T), so (A, B) and (B, A) matrices
        # are orthogonalized in one batch; scale and NorMuon go by stored shape
        if self.process_group is None:  # the updates written into the plan's buffers
            nesterov = group["nesterov"]
            directions = {}
            for key, idx in plan.by_ns.items():  # key: (wide shape, dtype, device)
                # eager, the buffer is in the iteration's dtype: rounded as written, not
                # converted in a pass of its own (compiled, the conversion is fused)
                buffer_dtype = key[1] if self._step_compiler is not None else (
                    dtype or default_ns_dtype(key[2], key[1], (len(idx), *key[0])))
                U, views = plan.buffer(key, buffer_dtype)  # (views shaped as the parameters
                #                                             where they can)
                for i, view in zip(idx, views, strict=True):
                    g, b = grads[i], bufs[i]
                    if g.shape != view.shape:
                        g, b = g.reshape(view.shape), b.reshape(view.shape)
                    if nesterov:  # G.lerp(B, mu), as torch.optim.Muon
                        torch.lerp(g, b, mom, out=view)
                    else:
                        view.copy_(b)
                O = orthogonalize(idx, U, as_params=False,  # (added in the iteration's
                                  scratch=True)                # dtype)
                for i, o in zip(idx, O.unbind(0), strict=True):
                    shape = ps[i].shape
                    directions[i] = o if o.shape == shape else plan.unmatrix(key, o, shape)
            params = ps
        else:
            upd = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
            directions = self.distributor.directions(ps, upd, plan.owner_of, plan.by_ns,
                                                     orthogonalize)
            params = [local_tensor(p) for p in ps]
        if group["normalize"] == "neuron":
            self._normalize_neurons(group, ps, directions, plan.by_shape, transposed)
        for idx, scale in zip(plan.by_shape.values(), plan.scales, strict=True):
            _add_([params[i] for i in idx], [directions[i] for i in idx], -lr * scale)

    def _normalize_neurons(self, group: dict[str, Any], ps: list[Tensor],
                           directions: dict[int, Tensor], by_shape: dict[tuple, list[int]],
                           transposed: bool) -> None:
        """NorMuon, in place on ``directions`` (see the module docstring): per output neuron
        (logical row), divide by the root of the EMA of its mean square; keep ``||O||_F``.
        Both Frobenius norms come from the rows' sums of squares ``r_i`` (``||O||_F^2 =
        sum_i r_i``, ``||O_hat||_F^2 = sum_i r_i / (sqrt(v_i) + eps)^2``), so the update is
        one pass over the stacked directions besides the one computing ``r``. Under FSDP2
        the directions are this rank's rows: ``r`` of the whole rows comes from one
        all-reduce (:meth:`~curvlab.optim.distributors.matrices.MatrixDistributor.
        whole_row_sums`), and ``v`` is whole and identical on every rank."""
        stacks = []
        for (shape, pdtype, _), idx in by_shape.items():
            dtype = moment_dtype(pdtype)
            rows, cols = (shape[1], shape[0]) if transposed else (shape[0], math.prod(shape[1:]))
            local_shape = directions[idx[0]].shape  # (FSDP2: this rank's rows)
            for i in idx:
                st = self.state[ps[i]]
                if "neuron_second_moment" not in st:
                    st["neuron_second_moment"] = torch.zeros(rows, dtype=dtype,
                                                             device=directions[i].device)
            D = torch.stack([directions[i] for i in idx],  # (converted as it is stacked)
                            out=torch.empty(len(idx), *local_shape, dtype=dtype,
                                            device=directions[idx[0]].device))
            D = D.mT if transposed else D.reshape(len(idx), local_shape[0],  # (k, out, in)
                                                    math.prod(local_shape[1:]))
            # rows' sums of squares (vector_norm over a strided dim, the transposed case,
            # is 13x slower on a CPU)
            stacks.append((idx, local_shape, pdtype, cols, D, D.square().sum(dim=-1)))
        sums = self.distributor.whole_row_sums([ps[entry[0][0]] for entry in stacks],
                                               [entry[-1] for entry in stacks],
                                               rows_sharded=not transposed)
        for (idx, local_shape, pdtype, cols, D, _), r in zip(stacks, sums, strict=True):
            V = torch.stack([self.state[ps[i]]["neuron_second_moment"] for i in idx])
            V.lerp_(r / cols, 1.0 - group["beta2"])
            inv = (V.sqrt() + NORMUON_EPS).reciprocal_()
            norm_d = r.sum(dim=-1, keepdim=True).sqrt_()
            norm_n = (r * inv.square()).sum(dim=-1, keepdim=True).sqrt_()
            scale = inv * (norm_d / (norm_n + NORMUON_EPS))
            if not transposed:  # FSDP2: this rank's rows
                scale = scale[:, self.distributor.local_rows(ps[idx[0]])]
            N = D * scale.unsqueeze(-1)
            N = (N.mT if transposed else N.reshape(len(idx), *local_shape)).to(pdtype)
            torch._foreach_copy_([self.state[ps[i]]["neuron_second_moment"] for i in idx],
                                 list(V.unbind(0)))
            directions.update(zip(idx, N.unbind(0), strict=True))

    def _adam_update(self, group: dict[str, Any], plan: MuonPlan) -> None:
        ps = plan.adam
        ms, vs, states = [], [], []
        for p in ps:
            st = self.state[p]
            if "exp_avg" not in st:
                dtype = moment_dtype(p.dtype)
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, dtype=dtype,
                                                 memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                    memory_format=torch.preserve_format)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            states.append(st)
        counts = plan.adam_steps.increment(states)
        config = _adam_config(tuple(group["adam_betas"]), group["adam_eps"])
        grads = [p.grad for p in ps]
        if self.process_group is not None:  # DTensor (FSDP2): the local shards
            ps, ms, vs, grads = ([local_tensor(t) for t in ts] for ts in (ps, ms, vs, grads))
        adam_step_(ps, ms, vs, grads, counts, config, group["lr"], group["weight_decay"],
                   compiler=self._step_compiler,
                   uniform=plan.adam_uniform and self.process_group is None,
                   step_tensors=[st["step"] for st in states])

    def _state_template(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        if self._uses_muon(group, p):
            rows = p.shape[1] if group.get("transposed") else p.shape[0]
            return {"momentum_buffer": tuple(p.shape), "neuron_second_moment": (rows,)}
        return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _extra_stats(self) -> dict[str, Any]:
        n_muon = sum(1 for g in self.param_groups for p in g["params"] if self._uses_muon(g, p))
        n_all = sum(len(g["params"]) for g in self.param_groups)
        return {"num_muon_params": n_muon, "num_adam_params": n_all - n_muon}

    def stability_model(self) -> StabilityModel:
        """Muon's orthogonalized step has a fixed size (``lr s`` in spectral norm; NorMuon's
        keeps the Frobenius norm of ``O``) whatever the curvature, so no ``lr x sharpness``
        bound governs it (NorMuon's ``neuron_second_moment`` does not change that: it
        rescales rows of a fixed-size step); the AdamW parameters follow
        Adam's rule (``2 (1 + b1) / (1 - b1)`` on the sharpness preconditioned by
        ``sqrt(v_hat) + eps``), measured on their block."""
        adam = {id(p): g for g in self.param_groups for p in g["params"]
                if not self._uses_muon(g, p)}
        group = next(iter(adam.values()), self.param_groups[0])
        if not adam:
            return StabilityModel("muon", float(group["lr"]), math.inf, None,
                                  "orthogonalized updates: no curvature bound")
        b1 = group["adam_betas"][0]

        def inv_sqrt(p: Tensor, v: Tensor) -> Tensor:
            g = adam.get(id(p))
            st = self.state.get(p, {})
            if g is None or "exp_avg_sq" not in st:
                return torch.zeros_like(v) if g is None else v
            P = adam_stability_preconditioner(st["exp_avg_sq"], int(st["step"]),
                                              AdamConfig(g["adam_betas"], g["adam_eps"]))
            return v * P.rsqrt().to(v.dtype)

        def samples() -> float:
            """Gradients the AdamW parameters' second moments average (fewest)."""
            return min((ema_samples(g["adam_betas"][1], float(self.state[p]["step"]))
                        if "step" in self.state.get(p, {}) else 0.0
                        for p, g in ((p, g) for g in self.param_groups for p in g["params"]
                                     if id(p) in adam)), default=math.inf)

        return StabilityModel("muon", float(group["lr"]), momentum_threshold(b1, ema=True),
                              inv_sqrt, "AdamW parameters only; Muon's orthogonalized "
                              "matrices have no curvature bound", samples)


@functools.lru_cache(maxsize=64)
def _adam_config(betas: tuple[float, float], eps: float) -> AdamConfig:
    """A group's AdamConfig (frozen; validated once, not at every step)."""
    return AdamConfig(betas, eps)


def _add_(params: list[Tensor], directions: list[Tensor], alpha: float) -> None:
    """``p += alpha d``: one foreach kernel, or per tensor when the dtypes differ (a
    bfloat16 direction added to a float32 parameter: torch's foreach slow path costs 25%
    more than the loop on a CPU; either is exact: bfloat16 widens to float32 exactly)."""
    if all(d.dtype == p.dtype for p, d in zip(params, directions, strict=True)):
        torch._foreach_add_(params, directions, alpha=alpha)
        return
    for p, d in zip(params, directions, strict=True):
        p.add_(d, alpha=alpha)


def _gram_pays(U: Tensor) -> bool:
    """Whether Gram Newton–Schulz is worth it for the (stacked) matrices ``U``: everywhere
    but on a CPU, where only from :data:`CPU_GRAM_MIN_ASPECT`."""
    n, m = sorted(U.shape[-2:])
    return U.device.type != "cpu" or m >= CPU_GRAM_MIN_ASPECT * n


def transposed_linear_class() -> type | None:
    """Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``; a linear layer whose weight
    is stored ``(in, out)``) if transformers is already imported, else None: a model cannot
    hold one unless transformers is loaded, so curvlab never imports it itself."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def muon_param_groups(
    model: nn.Module,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.0,
    adamw_weight_decay: float = 0.0,
    head: nn.Module | str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`Muon`: hidden weight matrices use Muon, the rest AdamW.

    AdamW gets every parameter of ``nn.Embedding`` modules and of the input embeddings
    (``model.get_input_embeddings()`` on Hugging Face models), of the output head (``head``:
    a module or its qualified name; default: ``model.get_output_embeddings()`` when the
    model has one, else the last ``nn.Linear`` in ``model.modules()`` order), and every
    parameter with fewer than 2 dimensions (biases, norms, scalars). A head tied to the
    embedding is one parameter and listed once. Weights of Hugging Face ``Conv1D`` layers
    (stored ``(in, out)``) go to a Muon group with ``transposed=True``. Usage::

        opt = curvlab.optim.Muon(curvlab.optim.muon_param_groups(model), lr=0.02)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(head, str):
        head = model.get_submodule(head)
    if head is None and callable(getattr(model, "get_output_embeddings", None)):
        head = model.get_output_embeddings()
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if callable(getattr(model, "get_input_embeddings", None)):
        emb = model.get_input_embeddings()
        if isinstance(emb, nn.Module):
            embeddings.append(emb)
    adamw_ids = {id(p) for m in embeddings for p in m.parameters()}
    if head is not None:
        adamw_ids |= {id(p) for p in head.parameters()}
    conv1d = transposed_linear_class()
    transposed_ids = ({id(m.weight) for m in model.modules() if isinstance(m, conv1d)}
                      if conv1d is not None else set())
    muon, muon_t, other, seen = [], [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in adamw_ids or p.ndim < 2:
            other.append(p)
        else:
            (muon_t if id(p) in transposed_ids and p.ndim == 2 else muon).append(p)
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, "lr": lr, "weight_decay": weight_decay})
    if muon_t:
        groups.append({"params": muon_t, "use_muon": True, "transposed": True, "lr": lr,
                       "weight_decay": weight_decay})
    if other:
        groups.append({"params": other, "use_muon": False, "lr": adamw_lr,
                       "weight_decay": adamw_weight_decay})
    return groups
