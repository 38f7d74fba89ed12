"""Exact (matrix-free) natural gradient descent for small models.

Amari (1998), "Natural gradient works efficiently in learning"; Martens (2020), "New
insights and perspectives on the natural gradient method", sec. 5-6. Each step on a batch:

    solve (F + lambda I) d = g   by conjugate gradients (``curvlab.linalg.cg``: at most
                                 ``cg_max_iter`` products, relative residual ``cg_tol``,
                                 warm-started from the last d)
    nu = min(1, sqrt(kl_clip / (lr^2 <d, g>)))          (KL clipping)
    buf = momentum buf + nu d,   theta <- (1 - lr weight_decay) theta - lr buf

KL clipping is the trust region of the natural gradient (Pascanu & Bengio 2014,
"Revisiting natural gradient for deep networks": the step that decreases the loss most
for a given KL divergence between the model's predictive distributions before and after
it, ``KL ~ lr^2 d^T F d / 2``; the form and constant of K-FAC, Martens & Grosse 2015,
sec. 10, and :class:`curvlab.optim.KFAC`). ``<d, g> = d^T (F + lambda I) d`` costs no
product. Without it the full step ``lr = 1`` solves the damped system of a batch Fisher of
rank at most (samples x classes): on the digits MLPs (64-32-10 and 64-128-10, batches of
32-512, damping 1e-3) the loss rose from 2.3 to 1e4-1e5 within 30 steps.

with ``F`` the Fisher of the model's predictive distribution on the batch, through
curvlab's operators: ``fisher_type="exact"`` (:class:`curvlab.linops.FisherOperator`,
equal to the GGN for cross-entropy and MSE), ``"mc"`` (Monte-Carlo Fisher from sampled
labels) or ``"empirical"`` (:class:`curvlab.linops.EmpiricalFisherOperator`). Every CG
iteration costs one Fisher-vector product (a JVP and a VJP), so this is meant for small
models; :class:`curvlab.optim.KFAC` is the scalable approximation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from curvlab.linalg.cg import cg
from curvlab.objective import Objective
from curvlab.optim._batch_capture import InputRecorder
from curvlab.optim.base import CurvlabOptimizer, apply_update_, dense_grad

__all__ = ["NaturalGradient"]

logger = logging.getLogger(__name__)

_GLOBAL = "natural_gradient"


class NaturalGradient(CurvlabOptimizer):
    """Natural gradient with a damped-CG solve: ``opt.step(closure, batch=(inputs, targets))``.

    Args:
        model: the ``nn.Module``.
        lr: learning rate (1 is the full natural-gradient step, within the KL clip).
        damping: ``lambda`` of ``F + lambda I`` (default 1e-3).
        kl_clip: the largest ``lr^2 <d, g>`` of a step (about twice the KL divergence it
            makes between the model's predictions; default 1e-2, as K-FAC's); None
            disables clipping (the full damped step).
        loss_fn: the training loss (default: the model's own loss on a dict batch with
            ``"labels"``, a Hugging Face batch, else ``nn.CrossEntropyLoss()``); ``"exact"``
            and ``"mc"`` need cross-entropy or MSE (the Fisher of their likelihood).
        fisher_type: ``"exact"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: sampled labels per input for ``"mc"``.
        params: parameters or param groups (default: all trainable parameters).
        momentum, weight_decay: heavy-ball momentum; decoupled weight decay (the contract's,
            :func:`curvlab.optim.base.apply_update_`; it once entered the momentum as an
            L2 term added to the direction).
        cg_max_iter, cg_tol: CG budget and relative-residual tolerance.
        warm_start: start CG from the previous direction.
        nonfinite: ``"skip"`` (default) or ``"raise"`` on a non-finite loss, gradient or
            direction; parameters and state are unchanged either way.
        seed: seed of the label sampling of ``"mc"`` and, for a model in train mode, of
            each step's Dropout masks (new masks every step).

    ``batch`` gives the data the Fisher is built on; ``closure`` (optional) computes the
    loss and ``.grad``, otherwise the gradient is computed on ``batch``. With a closure
    and no batch (``"exact"``/``"mc"`` only: their Fisher does not use the targets) the
    Fisher is built on the inputs of the closure's forward pass. ``opt.stats``:
    ``cg_iterations``, ``cg_residual``, ``damping``, ``kl_clip_scale`` (``nu``),
    ``skipped_steps``.
    """

    not_compilable_because = (
        "its step is a loop of closure evaluations and autograd products (conjugate gradients) "
        "whose length depends on the values it reads; the products dominate its time and are "
        "autograd calls either way")

    supports_add_param_group = False

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = 1e-3, *,
                 kl_clip: float | None = 1e-2, loss_fn: Any = None,
                 fisher_type: str = "exact", mc_samples: int = 1,
                 params: Iterable[Any] | None = None, momentum: float = 0.0,
                 weight_decay: float = 0.0, cg_max_iter: int = 100, cg_tol: float = 1e-6,
                 warm_start: bool = True, nonfinite: str = "skip", seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, val in (("lr", lr), ("damping", damping), ("cg_tol", cg_tol)):
            if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
                raise ValueError(f"{name} must be a positive number, got {val!r}")
        if kl_clip is not None and not (isinstance(kl_clip, (int, float)) and kl_clip > 0
                                        and math.isfinite(kl_clip)):
            raise ValueError(f"kl_clip must be a positive number or None (no clipping), got "
                             f"{kl_clip!r}")
        if fisher_type not in ("exact", "mc", "empirical"):
            raise ValueError(f"fisher_type must be 'exact', 'mc' or 'empirical', got "
                             f"{fisher_type!r}")
        for name, val in (("cg_max_iter", cg_max_iter), ("mc_samples", mc_samples)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, damping=damping, momentum=momentum,
                                      weight_decay=weight_decay), nonfinite=nonfinite)
        self.model = model
        self.kl_clip = kl_clip
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self._model_loss = loss_fn is None  # then a dict batch with labels: the model loss
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.cg_max_iter, self.cg_tol, self.warm_start = cg_max_iter, cg_tol, warm_start
        self.nonfinite = nonfinite
        self._generator = torch.Generator().manual_seed(seed)
        self._recorder = InputRecorder(model, self)
        self._global = {"step": 0, "seed": int(seed)}
        self._last: dict[str, Any] = {}

    def fisher(self, batch: Any, loss_fn: Any = ...) -> Any:
        """The curvlab Fisher operator of the current parameters on ``batch`` (``loss_fn``:
        default, the optimizer's loss for this batch)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if loss_fn is ...:
            loss_fn = self._loss_for(batch)
        # the model's own mode (buffers are left unchanged)
        return self._fisher_of(Objective(self.model, loss_fn, batch, params,
                                         train=self.model.training, seed=self._step_seed()))

    def _fisher_of(self, objective: Objective) -> Any:
        """The Fisher operator of ``objective`` (of its data, loss convention and mode)."""
        from curvlab.linops.fisher import EmpiricalFisherOperator, FisherOperator

        if self.fisher_type == "empirical":
            return EmpiricalFisherOperator(objective)
        return FisherOperator(objective, mode=self.fisher_type, num_samples=self.mc_samples,
                              generator=self._generator)

    def _loss_for(self, batch: Any) -> Any:
        """``loss_fn``; without one, on a dict batch carrying ``"labels"`` (a Hugging Face
        collator's output) the model's own loss (``None``, :mod:`curvlab.objective`),
        else cross-entropy."""
        if self._model_loss and isinstance(batch, Mapping) and "labels" in batch:
            return None
        return self.loss_fn

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *,
             batch: Any = None) -> torch.Tensor | None:
        """One step: solve ``(F + damping I) d = g`` by CG, then the momentum update.

        Args:
            closure: re-evaluates the loss and its gradient (``loss.backward()``); the
                Fisher is then computed on the inputs and targets that ``loss_fn`` saw.
            batch: ``(inputs, targets)`` to compute the loss, gradient and Fisher on
                instead (no closure needed).

        Returns:
            The loss before the step (from the closure or on ``batch``).
        """
        if batch is None and (closure is None or self.fisher_type == "empirical"):
            raise ValueError("NaturalGradient.step needs batch=(inputs, targets) (the data the "
                             "Fisher is computed on), or a closure with fisher_type 'exact' or "
                             "'mc'")
        params = [p for g in self.param_groups for p in g["params"]]
        loss_fn = self._loss_for(batch)  # (before the batch is read into the objective's form)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if batch is None:
                batch = self._recorder.batch(self.loss_fn, "NaturalGradient")
            g = torch.cat([dense_grad(p).reshape(-1) for p in params])
            reached = {id(p) for p in params if p.grad is not None}
        else:
            obj = Objective(self.model, loss_fn, batch, params, train=self.model.training,
                            seed=self._step_seed())
            batch = obj.data  # read once (a generator would be used up by this pass)
            names: set[str] = set()  # a training step's one pass:
            loss, grads = obj.loss_and_grad(keep_buffers=True, reached=names)
            g = obj.flatten(grads)
            reached = {id(obj.params[k]) for k in names}
        if not (bool(torch.isfinite(torch.as_tensor(loss)).all())
                and bool(torch.isfinite(g).all())):
            self._skip("nonfinite", "loss or gradient")
            return loss
        rng = self._generator.get_state()
        with torch.enable_grad():  # (on the step's objective: its loss convention, resolved)
            F = self.fisher(batch, loss_fn) if closure is not None else self._fisher_of(
                obj.on(batch))
        lam_of = torch.cat([torch.full((p.numel(),), grp["damping"], dtype=p.dtype,
                                       device=p.device)
                            for grp in self.param_groups for p in grp["params"]])
        prev = [self.state[p].get("direction") for p in params]
        x0 = (torch.cat([d.reshape(-1) for d in prev])
              if self.warm_start and all(d is not None for d in prev) else torch.zeros_like(g))

        def matvec(v: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return F.matvec(v) + lam_of * v

        sol = cg(matvec, g, x0=x0 if bool(x0.any()) else None, rtol=self.cg_tol,
                 max_iter=self.cg_max_iter)
        d, iters = sol.x, sol.iterations
        gnorm = float(g.norm())
        res = sol.residual_norm / gnorm if gnorm > 0 else 0.0
        if not bool(torch.isfinite(d).all()):
            self._generator.set_state(rng)
            self._skip("nonfinite", "natural-gradient direction")
            return loss
        nu = self._kl_clip_scale(d, g)
        i = 0
        for grp in self.param_groups:
            updates, stepped = [], []
            for p in grp["params"]:
                n = p.numel()
                dp = d[i:i + n].reshape(p.shape)
                i += n
                self.state[p]["direction"] = dp.clone()  # (0 where the loss does not reach)
                if id(p) not in reached:  # as torch's optimizers skip a None .grad: no
                    continue  # step, no weight decay, no momentum for it
                stepped.append(p)
                u = dp * nu if nu != 1.0 else dp
                if grp["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    u = u if buf is None else buf * grp["momentum"] + u
                    self.state[p]["momentum_buffer"] = u.clone()
                updates.append(u)
            apply_update_(stepped, updates, grp["lr"], grp["weight_decay"])
        self._global["step"] += 1
        self._counters["steps"] += 1
        self._last.update(cg_iterations=iters, cg_residual=res, kl_clip_scale=nu,
                          damping=[grp["damping"] for grp in self.param_groups])
        return loss

    def _kl_clip_scale(self, d: torch.Tensor, g: torch.Tensor) -> float:
        """``nu = min(1, sqrt(kl_clip / sum_groups lr^2 <d, g>))`` (1 without clipping)."""
        if self.kl_clip is None:
            return 1.0
        vg, i = 0.0, 0
        for grp in self.param_groups:
            n = sum(p.numel() for p in grp["params"])
            vg += grp["lr"] ** 2 * float(d[i:i + n].dot(g[i:i + n]))
            i += n
        return min(1.0, math.sqrt(self.kl_clip / vg)) if vg > 0 else 1.0

    def _extra_stats(self) -> dict[str, Any]:
        """Values of the last step (see the class docstring)."""
        return dict(self._last)

    def _state_template(self, p: torch.Tensor, group: dict[str, Any]
                        ) -> dict[str, tuple[int, ...]]:
        return dict.fromkeys(("direction", "momentum_buffer"), tuple(p.shape))
