r"""``SAM``: sharpness-aware minimization around any torch optimizer, and ASAM.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021) minimizes ``max_{||e|| <= rho} L(w + e)`` through the
first-order maximizer of the inner problem:

.. math::
    g = \nabla L(w), \qquad e(w) = \rho\, \frac{g}{\lVert g \rVert}, \qquad
    w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w + e(w))\big).

ASAM (``adaptive=True``; Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021) takes the maximizer over the
ellipsoid ``||T^{-1} e|| <= rho`` with the element-wise ``T = |w| + eta``:

.. math::
    e(w) = \rho\, \frac{T^2 g}{\lVert T g \rVert}.

Conventions, checked against the authors' code (google-research/sam, SamsungLabs/ASAM) and
the widely used davda54/sam:

* The norm ``||g||`` (``||T g||``) is one norm over every parameter with a gradient, across
  all param groups; each group scales its parameters' perturbation by its own ``rho`` (and
  uses its own ``adaptive`` / ``eta``). A parameter in a non-adaptive group has ``T = 1``.
* ``eta`` defaults to 0.01, the ``ASAM`` class default of SamsungLabs/ASAM (its CIFAR
  example passes 0.0; davda54/sam uses ``T = |w|``, i.e. ``eta = 0``). The ASAM authors
  scale only parameters whose name contains ``"weight"`` (normalization-layer weights
  included; biases get ``T = 1``);
  :func:`asam_param_groups` builds that grouping. ``SAM(model.parameters(),
  adaptive=True)`` scales every parameter (as davda54/sam does).
* A zero gradient gives no perturbation (``e = 0``; the reference codes add 1e-12 or 1e-16
  to the norm instead; otherwise the quotient here is exact).
* ``rho = 0`` leaves a group unperturbed: the step is the base optimizer's step on the
  gradient at ``w`` (bitwise, given a deterministic closure).
* ASAM's authors suggest about 10x SAM's radius (rho 0.5-2 rather than 0.05).

**The step.** ``step(closure)`` calls the closure at ``w`` (its loss is returned), perturbs
to ``w + e``, calls the closure again, puts ``w`` back **bit for bit** (the parameters are
saved before the perturbation and copied back; subtracting ``e`` would not round-trip in
floating point, least of all in bfloat16 / float16) and calls the base optimizer's
``step()``, which sees the gradient at ``w + e``. If the closure raises during the second
pass, ``w`` is restored before the error propagates. For loops of your own (gradient
scaling, accumulation, DDP ``no_sync`` for per-replica perturbations as in the paper):
``loss.backward(); opt.first_step(zero_grad=True); loss_fn(model(x), y).backward();
opt.second_step(zero_grad=True)``. Everything between the two calls sees the perturbed
parameters; ``state_dict`` / ``load_state_dict`` there raise. Mixed precision: bfloat16
autocast inside the closure works as is; an fp16 ``GradScaler`` cannot drive SAM
(``scaler.step(opt)`` calls ``step()`` without a closure).

**BatchNorm.** Both forward passes run in training mode, so a BatchNorm layer would update
its running statistics twice per step, the second time at the perturbed weights (the
google-research code keeps the first pass's statistics; davda54/sam sets the momentum to
0 in the second pass). :func:`frozen_batchnorm_stats` restores the running statistics
after a block bitwise (the forward still normalizes with the batch's statistics);
``SAM(..., model=model)`` applies it to the second pass of ``step(closure)``.

**The base optimizer** is a class or factory called as ``base_optimizer(param_groups,
**kwargs)`` (``torch.optim.SGD``, ``torch.optim.AdamW``, curvlab's ``Shampoo`` / ``SOAP``
/ ``Muon``, ``functools.partial(...)``), so SAM and its base share one list of param
groups: an lr scheduler on the SAM object drives the base, and ``rho`` / ``adaptive`` /
``eta`` can be set per group. An optimizer instance is refused (it would own its groups).
Optimizers that need their own closure (L-BFGS) or a model rather than parameters (K-FAC,
natural gradient, Hessian-free) cannot be wrapped. Keyword arguments that SAM itself takes
(``rho``, ``adaptive``, ``eta``, ``model``, ``nonfinite``) are not forwarded; pass a
``functools.partial`` to give the base its own ``nonfinite``.

**The optimizer contract.** The per-parameter state is the base optimizer's
(``opt.state is opt.base_optimizer.state``); ``state_dict()`` is the base's plus SAM's
counters and the parameter shapes (checked at load: a state dict of another model is
refused); resumes are bitwise. Non-finite or overflowing gradients, at ``w`` or at
``w + e``, skip the whole step with parameters and state unchanged (or raise, with
``nonfinite="raise"``), checked before the base optimizer sees them. Because its step needs
a closure, SAM creates its base's (empty) per-parameter state entries up front:
``torch.distributed.checkpoint`` initializes an optimizer without state by calling
``step(closure=None)``, which SAM refuses.

**Monitor protocol.** :meth:`SAM.stability_model` is the base optimizer's rule
(:func:`curvlab.diagnostics.stability.stability_model` of the base). This is an upper
bound: SAM's extra term ``rho H g / ||g||`` lowers the edge further, by an amount that
depends on ``||g||`` (Long & Bartlett, "Sharpness-Aware Minimization and the Edge of
Stability", 2023: the SAM edge lies below gradient descent's ``2 / lr``).

Cost: two forward-backward passes per step and one saved copy of the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlab.optim.base import CurvlabOptimizer, Rule, finite_nonnegative
from curvlab.optim.stability import StabilityModel

__all__ = ["SAM", "asam_param_groups", "frozen_batchnorm_stats"]

_KEY = "_curvlab_sam"  # SAM's counters and parameter shapes in param_groups[0]
_OWN = ("rho", "adaptive", "eta")


def _boolean(x: Any) -> str | None:
    return None if isinstance(x, bool) else "must be True or False"


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) of every BatchNorm / InstanceNorm layer of ``module`` that
    tracks them, bitwise, when the block exits. Forward passes inside still normalize with
    the batch statistics in training mode; only the running averages are left as they were
    (SAM's second pass: :mod:`curvlab.optim.sam`)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            buffers = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                       if b is not None]
            saved.append((buffers, [b.clone() for b in buffers]))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for b, c in zip(buffers, copies, strict=True):
                    b.copy_(c)


def asam_param_groups(model: nn.Module, **group: Any) -> list[dict[str, Any]]:
    """The ASAM authors' grouping (SamsungLabs/ASAM): parameters whose name contains
    ``"weight"`` are scaled by ``T = |w| + eta``; the others (biases) get ``T = 1``
    (``adaptive=False``) and the same ``rho``. ``group``: settings for both groups.
    Use with ``SAM(asam_param_groups(model), base, adaptive=True, rho=...)``."""
    weights, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (weights if "weight" in name else others).append(p)
    groups = [{"params": weights, **group}]
    if others:
        groups.append({"params": others, **group, "adaptive": False})
    return groups


class SAM(CurvlabOptimizer):
    """Sharpness-aware minimization (ASAM with ``adaptive=True``) around a base optimizer;
    the math, the conventions and the contract are in :mod:`curvlab.optim.sam`.

    Args:
        params: parameters or param groups (groups may set ``rho``, ``adaptive``, ``eta``
            and any setting of the base optimizer).
        base_optimizer: an optimizer class or factory, called as
            ``base_optimizer(param_groups, **base_kwargs)``.
        rho: radius of the perturbation (``>= 0``; 0: no perturbation).
        adaptive: ASAM's perturbation ``rho T^2 g / ||T g||`` with ``T = |w| + eta``.
        eta: ASAM's offset in ``T`` (``>= 0``).
        model: if given, ``step(closure)`` runs its second closure call inside
            :func:`frozen_batchnorm_stats` (``model``).
        nonfinite: ``"skip"`` or ``"raise"`` on non-finite / overflowing gradients or
            losses at ``w`` or ``w + e``.
        **base_kwargs: the base optimizer's settings (``lr``, ``momentum``, ...).

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)  # the loss at w; the update uses the gradient at w + e
    """

    hyperparameters: ClassVar[dict[str, Rule]] = {"rho": finite_nonnegative,
                                                  "adaptive": _boolean,
                                                  "eta": finite_nonnegative}

    def __init__(self, params: Any, base_optimizer: Callable[..., torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, *,
                 model: nn.Module | None = None, nonfinite: str = "skip",
                 **base_kwargs: Any) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("SAM: base_optimizer must be an optimizer class or factory, not an "
                            f"instance ({type(base_optimizer).__name__}); pass the class and its "
                            "settings, e.g. SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)")
        if not callable(base_optimizer):
            raise TypeError("SAM: base_optimizer must be an optimizer class or factory, got "
                            f"{type(base_optimizer).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"SAM: model must be an nn.Module, got {type(model).__name__}")
        self._model = model
        self._backup: list[tuple[Tensor, Tensor]] | None = None
        self._first_skipped = False
        own = {"rho": rho, "adaptive": adaptive, "eta": eta}
        super().__init__(params, own, nonfinite=nonfinite)
        base = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"SAM: base_optimizer(...) returned {type(base).__name__}, "
                            "expected a torch.optim.Optimizer")
        from curvlab.optim.lbfgs import LBFGS

        if isinstance(base, (torch.optim.LBFGS, LBFGS)):
            raise TypeError(f"SAM cannot wrap {type(base).__name__}: it evaluates its own "
                            "closure (line search) while SAM's base step takes a gradient")
        clash = sorted(set(_OWN) & set(base.defaults))
        if clash:
            raise ValueError(f"SAM: {type(base).__name__} has its own setting(s) {clash}, which "
                             "SAM's param-group keys would overwrite; wrap another optimizer")
        self.base_optimizer = base
        self.__dict__.pop("_own_groups", None)
        self.__dict__.pop("_own_state", None)
        self._own_defaults = own
        self.defaults = {**base.defaults, **own}
        self._touch_state()

    # ---- SAM and its base share param groups and state ---------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The param groups, shared with the base optimizer (a scheduler on SAM drives it)."""
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_own_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = value
        else:
            self.__dict__["_own_groups"] = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The per-parameter state: the base optimizer's."""
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value: Any) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle: the base optimizer included
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _touch_state(self) -> None:
        """An (empty) state entry for every parameter (see the module docstring)."""
        state = self.state
        for group in self.param_groups:
            for p in group["params"]:
                if p not in state:
                    state[p] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during construction
            super().add_param_group(param_group)
            return
        self._refuse_while_perturbed("add_param_group")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group = {**self._own_defaults, **param_group, "params": params}
        self._validate_group(group)
        base.add_param_group(group)
        self._touch_state()

    # ---- the perturbation --------------------------------------------------------------------
    def _grads_ok(self) -> bool:
        """The learning rates and the contract's gradient rule (counts / raises)."""
        return self._begin_step(None)[1] is not None

    @torch.no_grad()
    def _perturb(self) -> None:
        """Save ``w`` and move to ``w + e`` (the module docstring's ``e``)."""
        items = []  # (p, group, compute dtype)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    work = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) \
                        else p.dtype
                    items.append((p, group, work))
        if not items:
            self._backup = []
            return

        def scaled(p: Tensor, group: dict[str, Any], work: torch.dtype) -> Tensor:
            g = p.grad.to(work)
            if group["adaptive"]:
                return g * (p.detach().to(work).abs() + group["eta"])
            return g

        device = items[0][0].device  # one norm over all parameters, in the widest dtype
        wide = torch.float64 if any(w == torch.float64 for *_, w in items) else torch.float32
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(scaled(p, g, w)).to(device=device, dtype=wide)
            for p, g, w in items]))
        backup = []
        for p, group, work in items:
            rho = group["rho"]
            if rho == 0:
                continue
            backup.append((p, p.detach().clone()))
            e = p.grad.to(work)
            if group["adaptive"]:
                t = p.detach().to(work).abs() + group["eta"]
                e = e * t * t
            scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
            e = e * scale.to(device=p.device, dtype=work)
            if p.dtype == work:
                p.add_(e)
            else:  # one rounding to the parameter's dtype
                p.copy_(p.to(work) + e)
        self._backup = backup

    @torch.no_grad()
    def _restore(self) -> None:
        """Copy the saved ``w`` back (bitwise)."""
        for p, saved in self._backup or ():
            p.copy_(saved)
        self._backup = None

    def _refuse_while_perturbed(self, what: str) -> None:
        if self._backup is not None:
            raise RuntimeError(f"SAM.{what} between first_step and second_step: the parameters "
                               "are perturbed; call second_step first")

    # ---- the steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move to ``w + e`` using the gradients in ``.grad`` (the gradient at ``w``).
        Returns False when the gradients are not finite (the step is skipped: nothing
        moves, and the matching :meth:`second_step` does nothing)."""
        self._refuse_while_perturbed("first_step")
        if self._first_skipped:
            raise RuntimeError("SAM.first_step called twice without second_step")
        if not self._grads_ok():
            self._first_skipped = True
        else:
            self._perturb()
        if zero_grad:
            self.zero_grad()
        return not self._first_skipped

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore ``w`` (bitwise) and take the base optimizer's step with the gradients in
        ``.grad`` (the gradient at ``w + e``). Returns False when the step was skipped."""
        if self._first_skipped:
            self._first_skipped = False
            if zero_grad:
                self.zero_grad()
            return False
        if self._backup is None:
            raise RuntimeError("SAM.second_step without first_step")
        self._restore()
        done = self._base_step()
        if zero_grad:
            self.zero_grad()
        return done

    def _base_step(self) -> bool:
        if not self._grads_ok():
            return False
        self.base_optimizer.step()
        self._counters["steps"] += 1
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step: the closure at ``w`` (its loss is returned), the perturbation, the
        closure at ``w + e``, ``w`` restored bitwise, the base optimizer's step. The closure
        must zero the gradients, compute the loss and call ``backward()``."""
        if closure is None:
            raise ValueError("SAM.step needs a closure (it evaluates the gradient at w and at "
                             "w + e); or call first_step() and second_step() around your own "
                             "second backward pass")
        self._refuse_while_perturbed("step")
        if self._first_skipped:
            raise RuntimeError("SAM.step after a skipped first_step: call second_step first")
        loss, bound = self._begin_step(closure, loss_checked=True)
        if bound is None:
            return loss
        self._perturb()
        try:
            freeze = frozen_batchnorm_stats(self._model) if self._model is not None \
                else nullcontext()
            with torch.enable_grad(), freeze:
                perturbed_loss = closure()
        finally:
            self._restore()
        if perturbed_loss is not None and not bool(
                torch.isfinite(torch.as_tensor(perturbed_loss).detach()).all()):
            self._skip("nonfinite", "loss at the perturbed point w + e")
            return loss
        self._base_step()
        return loss

    # ---- compiled step -----------------------------------------------------------------------
    @property  # type: ignore[override]
    def compilable(self) -> bool:
        """Whether the base optimizer has a compiled step path (``compile_step``)."""
        return bool(getattr(self.base_optimizer, "compilable", False))

    def compile_step(self, enabled: bool = True, *, backend: str = "inductor",
                     mode: str | None = None, options: dict[str, Any] | None = None) -> SAM:
        """Compile the base optimizer's step (its :meth:`compile_step`); the perturbation
        and the restore (a few foreach kernels and one norm per step) stay eager. A base
        without a compiled path (a torch optimizer, LBFGS-like ones) raises
        ``NotImplementedError``."""
        if not self.compilable:
            raise NotImplementedError(
                f"SAM: the base optimizer {type(self.base_optimizer).__name__} has no compiled "
                "step path (curvlab's Shampoo, SOAP, KL-Shampoo, KL-SOAP and PSGD-Kron have "
                "one; a torch optimizer compiles with torch.compile of its own step)")
        self.base_optimizer.compile_step(enabled, backend=backend, mode=mode, options=options)
        return self

    @property
    def step_compiled(self) -> bool:
        """Whether the base optimizer's compiled step is on."""
        return bool(getattr(self.base_optimizer, "step_compiled", False))

    # ---- contract ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The contract's keys for SAM's steps; ``refreshes`` from the base optimizer when it
        counts them; ``"base"``: the base optimizer's own ``stats()`` if it has one."""
        out = super().stats()
        base_stats = getattr(self.base_optimizer, "stats", None)
        if callable(base_stats):
            inner = base_stats()
            out["refreshes"] = inner.get("refreshes", 0)
            out["refresh_failures"] = inner.get("refresh_failures", 0)
            out["base"] = inner
        return out

    def stability_model(self) -> StabilityModel:
        """The base optimizer's stability rule (an upper bound for SAM; see the module
        docstring)."""
        from curvlab.diagnostics.stability import stability_model

        model = stability_model(self.base_optimizer)
        note = "SAM: the base optimizer's rule (SAM's own edge is lower, Long & Bartlett 2023)"
        return dataclasses.replace(model, note=f"{model.note}; {note}" if model.note else note)

    def state_dict(self) -> dict[str, Any]:
        self._refuse_while_perturbed("state_dict")
        sd = self.base_optimizer.state_dict()
        groups = [dict(g) for g in sd["param_groups"]]
        if groups:
            groups[0][_KEY] = {"counters": dict(self._counters),
                               "shapes": [[list(p.shape) for p in g["params"]]
                                          for g in self.param_groups]}
        return {**sd, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking the groups and parameter shapes against these parameters."""
        self._refuse_while_perturbed("load_state_dict")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict \
                or "state" not in state_dict:
            raise ValueError("SAM.load_state_dict: not an optimizer state dict (needs 'state' "
                             "and 'param_groups')")
        groups = [dict(g) for g in state_dict["param_groups"]]
        own = groups[0].pop(_KEY, None) if groups else None
        if len(groups) != len(self.param_groups):
            raise ValueError(f"SAM.load_state_dict: the state dict has {len(groups)} param "
                             f"groups, this optimizer {len(self.param_groups)} (a different "
                             "model or grouping)")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            for key in _OWN:  # a state dict of the plain base optimizer: SAM's settings kept
                saved.setdefault(key, group[key])
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"SAM.load_state_dict: param group {gi} has "
                                 f"{len(saved['params'])} parameters in the state dict and "
                                 f"{len(group['params'])} here (a different model?)")
            shapes = own["shapes"][gi] if own and "shapes" in own else None
            for k, p in enumerate(group["params"]):
                if shapes is not None and tuple(shapes[k]) != tuple(p.shape):
                    raise ValueError(f"SAM.load_state_dict: parameter {k} of group {gi} has "
                                     f"shape {tuple(shapes[k])} in the state dict and "
                                     f"{tuple(p.shape)} here (a different model?)")
        state = state_dict["state"]
        if not isinstance(self.base_optimizer, CurvlabOptimizer):
            # torch's loader keeps the given tensors, shared with the state dict's owner
            state = {pid: {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                     for pid, st in state.items()}
        self.base_optimizer.load_state_dict({**state_dict, "state": state,
                                             "param_groups": groups})
        if own is not None:
            self._counters.update(own.get("counters", {}))
        self._touch_state()
