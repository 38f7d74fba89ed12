r"""Muon: orthogonalized Nesterov momentum for matrix parameters, AdamW for the rest.

For a weight ``W`` (conv and higher-rank weights flattened to ``(out, in * ...)``):

.. math::
    B_t &= \mu B_{t-1} + (1-\mu) G_t, \qquad
    U_t = \begin{cases} (1-\mu) G_t + \mu B_t & \text{nesterov} \\ B_t \end{cases} \\
    O_t &= \mathrm{NS}_5(U_t) \approx \text{polar factor of } U_t
        \quad\text{(quintic Newton–Schulz, coefficients (3.4445, -4.7750, 2.0315))} \\
    W_t &= (1 - \eta\lambda) W_{t-1} - \eta\, s(A, B)\, O_t

with the shape-aware scale ``s``: ``"original"`` ``sqrt(max(1, A/B))`` (Jordan et al.),
``"match_rms_adamw"`` ``0.2 sqrt(max(A, B))`` (Liu et al. 2025, Moonlight: the update RMS
matches AdamW's so AdamW's learning rate and weight decay carry over), ``"none"`` 1; ``A, B``
are the rows and columns of the flattened weight in its logical ``(out, in)`` orientation: a
group with ``transposed=True`` holds 2-D weights stored ``(in, out)`` (Hugging Face's
``Conv1D``, used by GPT-2), which Muon orthogonalizes and scales as their transpose, so such a
layer gets exactly the transpose of the update of the equivalent ``nn.Linear``. Parameters
of groups with ``use_muon=False`` (and, by default, parameters with fewer than 2 dimensions)
are updated by AdamW with the group's ``lr``, ``weight_decay``, ``adamw_betas`` and
``adamw_eps`` (the torch.optim.AdamW kernel). :func:`muon_param_groups` routes embeddings,
the output head, biases and norms to AdamW and marks ``Conv1D`` weights ``transposed`` in
one line.

Same-shape matrices are orthogonalized together in one batched Newton–Schulz. The iteration
runs in ``ns_dtype`` (default bfloat16 on CUDA, where tensor cores make it fast; elsewhere
float32, or float64 for float64 parameters: bfloat16 matmuls are slower than float32 on CPU).

Data parallel (``process_group``): under DDP the Newton–Schulz work is split over the ranks
(each matrix has an owner by a longest-processing-time schedule over ``A B min(A, B)``) and
the orthogonalized updates are all-gathered, so each rank runs about ``1/world_size`` of it
(:mod:`curvlab.optim._distributed`). Under FSDP2 (``fully_shard``, DTensor parameters) the
iteration must see the whole matrix, not a shard: each matrix's row shards are sent to its
owner only (one all-to-all for all matrices), the owner orthogonalizes it and sends every
rank its rows of the result (a second all-to-all), so no rank materializes matrices it does
not own; ``process_group`` must be the group the parameters are sharded over (1-D mesh,
``Shard(0)``: ``fully_shard``'s default; other layouts are refused at construction).

References: Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks";
Liu et al. (2025), "Muon is scalable for LLM training".
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw_kernel

from curvlab import distributed as _dist
from curvlab.linalg.matfuncs import NS_QUINTIC_COEFFICIENTS, newton_schulz
from curvlab.optim._distributed import (
    Timings,
    check_row_sharded,
    is_dtensor,
    local_tensor,
    lpt_schedule,
    newton_schulz_cost,
    shard_rows,
    share_rows,
)
from curvlab.optim._preconditioner import gradient_bound

logger = logging.getLogger(__name__)

__all__ = ["Muon", "muon_param_groups"]

_ADJUST = ("original", "match_rms_adamw", "none")


def _muon_scale(rule: str, shape: tuple[int, ...]) -> float:
    """The shape-aware scale ``s(A, B)`` for a weight of logical shape ``(out, in, ...)``."""
    A, B = shape[0], math.prod(shape[1:])
    if rule == "original":
        return math.sqrt(max(1.0, A / B))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return 1.0


class Muon(torch.optim.Optimizer):
    """Muon with an AdamW fallback (torch.optim API). See the module docstring.

    Args:
        params: parameters or param groups; a group may set ``use_muon`` (True/False; default:
            Muon for parameters with >= 2 dimensions, AdamW otherwise) and ``transposed``
            (default False: its 2-D weights are stored ``(in, out)``, like HF ``Conv1D``;
            :func:`muon_param_groups` sets it).
        lr: learning rate (of both methods unless a group overrides it).
        momentum, nesterov: Muon's momentum.
        weight_decay: decoupled weight decay ``p <- (1 - lr wd) p``.
        ns_steps, ns_coefficients, eps: Newton–Schulz iteration.
        adjust_lr: "original" (default), "match_rms_adamw" or "none" (see module docstring).
        ns_dtype: dtype of the Newton–Schulz iteration (default: bfloat16 on CUDA, else float32,
            float64 for float64 parameters).
        adamw_betas, adamw_eps: AdamW's hyperparameters for the non-Muon parameters.
        nonfinite: "skip" (default; the whole step is skipped and counted) or "raise"
            (FloatingPointError) for non-finite gradients. Finite gradients whose squares
            overflow saturate AdamW's second moment at the dtype's maximum.
        process_group: ``None``, ``"default"`` or a ``ProcessGroup``: split the
            Newton–Schulz work over its ranks (DDP), required for DTensor (FSDP2) parameters.
        compile: run the Newton–Schulz iteration through ``torch.compile`` (one graph per
            batch shape, compiled on first use; fuses the scaling and additions around the
            matmuls on GPUs). Off by default: compiling costs seconds.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_QUINTIC_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr: str = "original",
        ns_dtype: torch.dtype | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        nonfinite: str = "skip",
        process_group: Any = None,
        compile: bool = False,
    ) -> None:
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), eps=eps,
                        adjust_lr=adjust_lr, ns_dtype=ns_dtype, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps, use_muon=None, transposed=False)
        self.process_group = _dist.resolve_group(process_group)
        self._newton_schulz = (torch.compile(newton_schulz, fullgraph=True, dynamic=False)
                               if compile else newton_schulz)
        self.timings = Timings(enabled=self.process_group is not None)
        super().__init__(params, defaults)
        self._skipped = 0
        dtensors = [p for g in self.param_groups for p in g["params"] if is_dtensor(p)]
        if dtensors and self.process_group is None:
            raise ValueError("Muon got DTensor (FSDP2 fully_shard) parameters: pass "
                             "process_group (the group they are sharded over) so that "
                             "Newton–Schulz runs on whole matrices, not on local shards")
        if dtensors:
            check_row_sharded([p for g in self.param_groups for p in g["params"]],
                              self.process_group, "Muon")
        self._shard_rows: dict = {}  # cache of shard_rows

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if not g["lr"] >= 0:
            raise ValueError(f"lr must be >= 0, got {g['lr']}")
        if not 0.0 <= g["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {g['momentum']}")
        if g["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {g['weight_decay']}")
        if g["adjust_lr"] not in _ADJUST:
            raise ValueError(f"adjust_lr must be one of {_ADJUST}, got {g['adjust_lr']!r}")
        if int(g["ns_steps"]) < 0:
            raise ValueError(f"ns_steps must be >= 0, got {g['ns_steps']}")
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        sharded = any(is_dtensor(g) for g in grads)
        gmax = gradient_bound("Muon", grads, self.nonfinite,
                              self.process_group if sharded else None)
        if gmax is None:
            self._skipped += 1
            return loss
        for group in self.param_groups:
            muon_ps: list[Tensor] = []
            adam_ps: list[Tensor] = []
            for p in group["params"]:
                if p.grad is not None:
                    (muon_ps if self._uses_muon(group, p) else adam_ps).append(p)
            if muon_ps:
                self._muon_update(group, muon_ps)
            if adam_ps:
                self._adamw_update(group, adam_ps, gmax)
        return loss

    def _muon_update(self, group: dict[str, Any], ps: list[Tensor]) -> None:
        mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in ps]
        bufs = []
        for p in ps:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1.0 - mom)
        upd = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
        dtype = group["ns_dtype"]
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(ps):
            by_shape.setdefault((p.shape, p.dtype, p.device), []).append(i)
        if wd != 0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        pg = self.process_group
        order = [i for idx in by_shape.values() for i in idx]
        owners = lpt_schedule([newton_schulz_cost(ps[i].shape) for i in order],
                              _dist.world_size(pg))
        owner_of = dict(zip(order, owners, strict=True))

        transposed = bool(group.get("transposed", False))  # state dicts from before the key

        def orthogonalize(i_list: list[int], U: Tensor) -> Tensor:
            """Newton–Schulz of the stacked updates, in the weights' logical (out, in)
            orientation; returned in the stored orientation."""
            shape, pdtype, device = ps[i_list[0]].shape, ps[i_list[0]].dtype, U.device
            ns_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else
                                 torch.float64 if pdtype == torch.float64 else torch.float32)
            U = U.reshape(len(i_list), shape[0], -1)
            with self.timings.measure("precondition"):
                O = self._newton_schulz(U.mT if transposed else U, group["ns_steps"],
                                        group["ns_coefficients"], group["eps"],
                                        dtype=ns_dtype).to(pdtype)
            return O.mT if transposed else O

        if any(is_dtensor(u) for u in upd):
            directions = self._sharded_directions(ps, upd, order, owner_of, by_shape,
                                                  orthogonalize)
        else:
            directions = self._replicated_directions(ps, upd, owner_of, by_shape,
                                                     orthogonalize)
        for shape, idx in ((k[0], v) for k, v in by_shape.items()):
            logical = (shape[1], shape[0]) if transposed else tuple(shape)
            scale = -lr * _muon_scale(group["adjust_lr"], logical)
            torch._foreach_add_([local_tensor(ps[i]) for i in idx],
                                [directions[i] for i in idx], alpha=scale)

    def _replicated_directions(self, ps, upd, owner_of, by_shape, orthogonalize
                               ) -> dict[int, Tensor]:
        """Plain tensors (one process or DDP): each owner orthogonalizes its matrices, and
        every rank receives the owners' results (one all-gather)."""
        pg, me = self.process_group, _dist.rank(self.process_group)
        out, parts = {}, []
        for (shape, _, _), idx in by_shape.items():
            mine = [j for j, i in enumerate(idx) if owner_of[i] == me]
            O = torch.empty(len(idx), *shape, dtype=ps[idx[0]].dtype, device=upd[idx[0]].device)
            if mine:
                U = torch.stack([upd[idx[j]] for j in mine])
                O[mine] = orthogonalize([idx[j] for j in mine], U).reshape(len(mine), *shape)
            parts.append((O, [owner_of[i] for i in idx]))
            out.update(zip(idx, O.unbind(0), strict=True))
        share_rows(parts, pg, self.timings)
        return out

    def _sharded_directions(self, ps, upd, order, owner_of, by_shape, orthogonalize
                            ) -> dict[int, Tensor]:
        """FSDP2 (row-sharded DTensors): gather each matrix's update on its owner only (an
        all-to-all of the row shards), orthogonalize there, and send every rank its rows of
        the result (a second all-to-all). No rank holds more whole matrices than it owns.
        Returns this rank's shard of each direction."""
        pg, me = self.process_group, _dist.rank(self.process_group)
        local = {i: upd[i].to_local().reshape(-1, math.prod(ps[i].shape[1:])) for i in order}
        rows = shard_rows([ps[i] for i in order], self.process_group, self._shard_rows)
        xdtype = functools.reduce(torch.promote_types, (local[i].dtype for i in order))
        with self.timings.measure("communication"):
            full = _dist.gather_rows_to_owners([local[i].to(xdtype) for i in order], rows,
                                               [owner_of[i] for i in order], pg)
        results: dict[int, Tensor] = {}
        for idx in by_shape.values():
            mine = [i for i in idx if owner_of[i] == me]
            if mine:
                U = torch.stack([full[order.index(i)] for i in mine])
                O = orthogonalize(mine, U)
                results.update({order.index(i): o.reshape(full[order.index(i)].shape).to(xdtype)
                                for i, o in zip(mine, O.unbind(0), strict=True)})
        with self.timings.measure("communication"):
            shards = _dist.scatter_rows_from_owners(results, rows,
                                                    [owner_of[i] for i in order],
                                                    [local[i].shape[1] for i in order], pg,
                                                    xdtype, local[order[0]].device)
        return {i: sh.to(ps[i].dtype).view_as(local_tensor(ps[i]))
                for i, sh in zip(order, shards, strict=True)}

    def _adamw_update(self, group: dict[str, Any], ps: list[Tensor], gmax: float) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in ps:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        b1, b2 = group["adamw_betas"]
        _adamw_kernel(
            ps, [p.grad for p in ps], exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
            beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["adamw_eps"], maximize=False)
        big = torch.finfo(exp_avg_sqs[0].dtype).max
        if not gmax * gmax < big:  # g^2 overflowed: saturate the second moment instead of inf
            torch._foreach_clamp_max_(exp_avg_sqs, big)

    def stats(self) -> dict[str, Any]:
        """State memory (bytes), parameter counts per method, skipped steps."""
        mem = sum(v.numel() * v.element_size() for st in self.state.values()
                  for v in st.values() if isinstance(v, Tensor))
        n_muon = sum(1 for g in self.param_groups for p in g["params"] if self._uses_muon(g, p))
        n_all = sum(len(g["params"]) for g in self.param_groups)
        return {"preconditioner_memory_bytes": mem, "num_muon_params": n_muon,
                "num_adamw_params": n_all - n_muon, "refreshes": 0, "failures": 0,
                "skipped_steps": self._skipped}


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
