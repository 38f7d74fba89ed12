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
are the rows and columns of the flattened weight. Parameters of groups with
``use_muon=False`` (and, by default, parameters with fewer than 2 dimensions) are updated by
AdamW with the group's ``lr``, ``weight_decay``, ``adamw_betas`` and ``adamw_eps`` (the
torch.optim.AdamW kernel). :func:`muon_param_groups` routes embeddings, the output head,
biases and norms to AdamW in one line.

Same-shape matrices are orthogonalized together in one batched Newton–Schulz. The iteration
runs in ``ns_dtype`` (default bfloat16 on CUDA, where tensor cores make it fast; elsewhere
float32, or float64 for float64 parameters: bfloat16 matmuls are slower than float32 on CPU).

Data parallel (``process_group``): under DDP the Newton–Schulz work is split over the ranks
(each matrix has an owner by a longest-processing-time schedule over ``A B min(A, B)``) and
the orthogonalized updates are all-gathered, so each rank runs about ``1/world_size`` of it
(:mod:`curvlab.optim._distributed`). Under FSDP2 (``fully_shard``, DTensor parameters) the
iteration must see the whole matrix, not a shard: the update is gathered
(``full_tensor()``), the owner orthogonalizes it, every rank receives the result and keeps
its own shard; ``process_group`` must then be the group the parameters are sharded over.

References: Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks";
Liu et al. (2025), "Muon is scalable for LLM training".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw_kernel

from curvlab import distributed as _dist
from curvlab.linalg.matfuncs import NS_QUINTIC_COEFFICIENTS, newton_schulz
from curvlab.optim._distributed import Timings, lpt_schedule, newton_schulz_cost, share_rows
from curvlab.optim._preconditioner import max_abs

logger = logging.getLogger(__name__)

__all__ = ["Muon", "muon_param_groups"]

_ADJUST = ("original", "match_rms_adamw", "none")


def _muon_scale(rule: str, shape: torch.Size) -> float:
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
            Muon for parameters with >= 2 dimensions, AdamW otherwise).
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
    ) -> None:
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), eps=eps,
                        adjust_lr=adjust_lr, ns_dtype=ns_dtype, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps, use_muon=None)
        self.process_group = _dist.resolve_group(process_group)
        self.timings = Timings()
        super().__init__(params, defaults)
        self._skipped = 0
        if self.process_group is None and any(
                _is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError("Muon got DTensor (FSDP2 fully_shard) parameters: pass "
                             "process_group (the group they are sharded over) so that "
                             "Newton–Schulz runs on whole matrices, not on local shards")

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
        if any(g.is_sparse for g in grads):
            raise TypeError("Muon does not support sparse gradients")
        gmax = max_abs(grads)
        if not math.isfinite(gmax):
            if self.nonfinite == "raise":
                raise FloatingPointError("Muon: non-finite gradient; pass nonfinite='skip' to "
                                         "skip such steps instead")
            self._skipped += 1
            logger.warning("Muon: non-finite gradient, step skipped")
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
        owners = lpt_schedule([newton_schulz_cost(shape) for (shape, _, _), idx in
                               by_shape.items() for _ in idx], _dist.world_size(pg))
        me, start, results = _dist.rank(pg), 0, []
        for (shape, pdtype, device), idx in by_shape.items():
            ns_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else
                                 torch.float64 if pdtype == torch.float64 else torch.float32)
            own = owners[start:start + len(idx)]
            start += len(idx)
            mine = [j for j, r in enumerate(own) if r == me]
            # a DTensor (FSDP2 shard) is gathered on every rank (a collective):
            # Newton–Schulz needs the whole matrix
            full = [_full(upd[i]).reshape(shape[0], -1) for i in idx]
            U = torch.stack([full[j] for j in mine]) if mine else None
            O = torch.empty(len(idx), *full[0].shape, dtype=pdtype, device=full[0].device)
            if mine:
                with self.timings.measure("precondition"):
                    O[mine] = newton_schulz(U, group["ns_steps"], group["ns_coefficients"],
                                            group["eps"], dtype=ns_dtype).to(pdtype)
            results.append((shape, idx, O, own))
        # every rank receives the owners' rows (one all-gather)
        share_rows([(O, own) for _, _, O, own in results], pg, self.timings)
        for shape, idx, O, _ in results:
            torch._foreach_add_([ps[i] for i in idx],
                                [_shard_like(o.view(shape), ps[i]) for i, o in
                                 zip(idx, O.unbind(0), strict=True)],
                                alpha=-lr * _muon_scale(group["adjust_lr"], shape))

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


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is gathered from its shards."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(full: Tensor, p: Tensor) -> Tensor:
    """``full`` laid out like ``p``: for a DTensor, this rank's shard (no communication)."""
    if not _is_dtensor(p):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def muon_param_groups(
    model: nn.Module,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.0,
    adamw_weight_decay: float = 0.0,
    head: nn.Module | str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`Muon`: hidden weight matrices use Muon, the rest AdamW.

    AdamW gets every parameter of ``nn.Embedding`` modules, of the output head (``head``:
    a module or its qualified name; default: the last ``nn.Linear`` in ``model.modules()``
    order), and every parameter with fewer than 2 dimensions (biases, norms, scalars).
    Shared (tied) parameters are listed once. Usage::

        opt = curvlab.optim.Muon(curvlab.optim.muon_param_groups(model), lr=0.02)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(head, str):
        head = model.get_submodule(head)
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    adamw_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                 for p in m.parameters()}
    if head is not None:
        adamw_ids |= {id(p) for p in head.parameters()}
    muon, other, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (other if id(p) in adamw_ids or p.ndim < 2 else muon).append(p)
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, "lr": lr, "weight_decay": weight_decay})
    if other:
        groups.append({"params": other, "use_muon": False, "lr": adamw_lr,
                       "weight_decay": adamw_weight_decay})
    return groups
