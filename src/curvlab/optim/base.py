"""The contract every curvlab optimizer implements (:class:`CurvlabOptimizer`).

One place for what every optimizer must do the same way at its edges:

* **Hyperparameters** are checked at construction and in ``add_param_group`` against the
  rules the optimizer declares (``hyperparameters``: name -> :data:`Rule`); a bad value is a
  ``ValueError`` naming it. Shared settings have one name everywhere (``lr``, ``betas``,
  ``eps``, ``weight_decay``, ``momentum``, ``damping``, ``precondition_frequency``; the
  table is ``docs/optimizers.md``); an old keyword in ``renamed`` still works, with a
  ``DeprecationWarning``. A parameter listed twice is refused (it would be updated twice).
* **Gradients** (:meth:`CurvlabOptimizer._gradient_bound`): one rule for every optimizer.
  A non-finite gradient, or a finite one so large that its squares overflow the statistics
  (``||G||_F^2 >= finfo(float32).max / 4`` for some gradient ``G``: a Kronecker statistic's
  entries are bounded by it; torch's Adam moves 0 there), skips
  the step with parameters and state bitwise unchanged (``nonfinite="skip"``, counted in
  :meth:`stats`) or raises ``FloatingPointError`` (``"raise"``). A learning rate that a
  scheduler made non-finite or negative raises.
* **Weight decay** is decoupled everywhere: ``p <- (1 - lr wd) p - lr d``
  (Loshchilov & Hutter 2019), :func:`apply_update_`.
* **State**: per-parameter state lives in ``self.state[p]`` (so torch's and
  ``torch.distributed.checkpoint``'s optimizer-state tooling sees it); optimizer-wide state
  (step counts of closure-based optimizers, random generators, counters, adaptive damping)
  goes through :meth:`_global_state` / :meth:`_load_global_state`, saved as
  ``param_groups[0]["_curvlab"]`` (a place ``torch.distributed.checkpoint`` keeps).
  ``load_state_dict`` checks the saved layout against the parameters first (clear error on
  a different model) and keeps the saved dtypes (torch's default would cast float32
  statistics of a bfloat16 parameter to bfloat16).
* :meth:`stats` returns the same keys everywhere (:data:`STATS_KEYS`) plus the optimizer's own.
* :meth:`stability_model` tells a curvature monitor when the step becomes unstable
  (:mod:`curvlab.optim.stability`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from curvlab.optim.stability import StabilityModel

logger = logging.getLogger(__name__)

__all__ = ["CurvlabOptimizer", "Rule", "STATS_KEYS", "apply_update_", "dense_grad",
           "finite_positive", "finite_nonnegative", "unit_interval", "betas_rule", "positive_int",
           "one_of", "float_dtype", "factorization_dtype", "optional"]

NONFINITE = ("skip", "raise")
#: The keys every optimizer's ``stats()`` has (each optimizer may add its own).
STATS_KEYS = ("steps", "skipped_steps", "skipped_nonfinite", "skipped_overflow", "refreshes",
              "refresh_failures", "state_bytes")
GLOBAL_KEY = "_curvlab"

#: A rule maps a value to None (valid) or to what it must be ("must be ...").
Rule = Callable[[Any], "str | None"]


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite_positive(x: Any) -> str | None:
    """Rule: a finite real number > 0."""
    return None if _is_real(x) and math.isfinite(x) and x > 0 else "must be finite and > 0"


def finite_nonnegative(x: Any) -> str | None:
    """Rule: a finite real number >= 0."""
    return None if _is_real(x) and math.isfinite(x) and x >= 0 else "must be finite and >= 0"


def unit_interval(x: Any) -> str | None:
    """Rule: a real number in ``[0, 1)``."""
    return None if _is_real(x) and 0 <= x < 1 else "must be in [0, 1)"


def betas_rule(x: Any) -> str | None:
    """Rule: a pair ``(beta1, beta2)``, each in ``[0, 1)``."""
    ok = isinstance(x, (tuple, list)) and len(x) == 2 and all(unit_interval(b) is None for b in x)
    return None if ok else "must be two numbers in [0, 1)"


def positive_int(x: Any) -> str | None:
    """Rule: an integer >= 1 (not a bool)."""
    return None if isinstance(x, int) and not isinstance(x, bool) and x >= 1 else \
        "must be an integer >= 1"


def one_of(*choices: Any) -> Rule:
    """A rule accepting exactly the values in ``choices``."""
    def rule(x: Any) -> str | None:
        return None if x in choices else f"must be one of {choices}"
    return rule


def optional(rule: Rule) -> Rule:
    """``rule``, or ``None``."""
    def check(x: Any) -> str | None:
        return None if x is None else rule(x)
    return check


def float_dtype(x: Any) -> str | None:
    """Rule: a floating-point ``torch.dtype``."""
    ok = isinstance(x, torch.dtype) and x.is_floating_point
    return None if ok else "must be a floating-point torch dtype"


def factorization_dtype(x: Any) -> str | None:
    """Dtypes in which eigendecompositions and roots work (torch's ``eigh`` has no 16-bit)."""
    return None if x in (torch.float32, torch.float64) else \
        "must be torch.float32 or torch.float64 (eigendecompositions need them)"


def dense_grad(p: Tensor) -> Tensor:
    """``p.grad`` as a dense tensor for optimizers that work on the flat gradient vector
    (L-BFGS, Hessian-free, natural gradient): zeros without one, densified if sparse (an
    ``nn.Embedding(sparse=True)``'s), as ``torch.optim.LBFGS`` gathers it."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def apply_update_(params: Sequence[Tensor], directions: Sequence[Tensor], lr: float,
                  weight_decay: float, compiler: Any = None) -> None:
    """``p <- (1 - lr wd) p - lr d`` for every pair (decoupled weight decay): foreach kernels
    per (device, dtype) of the parameters (one list of mixed devices or dtypes would send
    torch's foreach ops to their per-tensor slow path); directions are cast to their
    parameter's dtype. ``compiler``: a :class:`~curvlab.optim.compiled.StepCompiler`, which
    fuses both into one compiled kernel per group (``lr`` enters as a tensor, so a
    scheduler changing it does not recompile)."""
    if not params:
        return
    directions = [d if d.dtype == p.dtype else d.to(p.dtype)
                  for p, d in zip(params, directions, strict=True)]
    grouped = _group_tensors_by_device_and_dtype([list(params), directions])
    for (device, dtype), ((ps, ds), _) in grouped.items():
        if compiler is not None:
            kernel = compiler(_update_kernel_, ("update", device, dtype, len(ps)))
            kernel(ps, ds, *compiler.scalars([lr, 1.0 - lr * weight_decay], device))
            continue
        if weight_decay:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_add_(ps, ds, alpha=-lr)


def _update_kernel_(params: list[Tensor], directions: list[Tensor], lr: Tensor,
                    decay: Tensor) -> None:
    """The compiled form of :func:`apply_update_` (``decay = 1 - lr wd``)."""
    torch._foreach_mul_(params, decay)
    torch._foreach_sub_(params, torch._foreach_mul(directions, lr))


class CurvlabOptimizer(torch.optim.Optimizer):
    """Base class of curvlab's optimizers (see the module docstring for the contract).

    A subclass declares ``hyperparameters`` (rules of its group settings) and
    ``renamed`` (old keyword -> new), calls ``super().__init__(params, defaults,
    nonfinite=...)`` and implements ``step`` using :meth:`_begin_step` (closure, learning
    rates, gradient rule). Optional hooks: :meth:`_state_template` (the layout a loaded
    state must have), :meth:`_global_state` / :meth:`_load_global_state`,
    :meth:`_extra_stats`, :meth:`stability_model`.
    """

    hyperparameters: ClassVar[dict[str, Rule]] = {"lr": finite_nonnegative,
                                                  "weight_decay": finite_nonnegative}
    renamed: ClassVar[dict[str, str]] = {}
    #: the dtype in which the optimizer accumulates squared gradients (overflow rule)
    statistics_dtype: ClassVar[torch.dtype] = torch.float32
    #: False for optimizers that fix their parameters (or model layers) at construction
    supports_add_param_group: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "skip"
                 ) -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"{type(self).__name__}: nonfinite must be one of {NONFINITE}, "
                             f"got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._counters = dict.fromkeys(("steps", "skipped_nonfinite", "skipped_overflow",
                                        "refreshes", "refresh_failures"), 0)
        self._validating = False
        self._step_compiler: Any = None  # a StepCompiler after compile_step()
        super().__init__(params, defaults)
        self._validating = True
        for group in self.param_groups:
            self._validate_group(group)
        if not self.supports_add_param_group:  # a non-empty state: torch.distributed.
            for group in self.param_groups:   # checkpoint then never runs a dummy step
                for p in group["params"]:
                    self.state[p]
        seen: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter of shape "
                                     f"{tuple(p.shape)} appears twice (groups {seen[id(p)]} "
                                     f"and {gi}); it would be updated twice")
                seen[id(p)] = gi

    @classmethod
    def _renamed_kwargs(cls, kwargs: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Map deprecated keywords in ``kwargs`` onto ``current`` (the new names' values)."""
        out = dict(current)
        for old, value in kwargs.items():
            new = cls.renamed.get(old)
            if new is None:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {old!r}")
            warnings.warn(f"{cls.__name__}: {old!r} is renamed {new!r}", DeprecationWarning,
                          stacklevel=3)
            out[new] = value
        return out

    # ---- torch.compile ----------------------------------------------------------------
    def compile_step(self, enabled: bool = True, *, backend: str = "inductor",
                     mode: str | None = None, options: dict[str, Any] | None = None
                     ) -> CurvlabOptimizer:
        """Run the pure-tensor inner update of :meth:`step` through ``torch.compile``
        (``fullgraph``; see :mod:`curvlab.optim.compiled`); ``enabled=False`` returns to the
        eager step. The Python side of the step (closure, gradient rule, refreshes) stays
        eager; the state is shared, so state dicts move freely between the two. Returns
        ``self``. An optimizer without a compiled path raises ``NotImplementedError``."""
        if not self.compilable:
            why = f": {self.not_compilable_because}" if self.not_compilable_because else ""
            raise NotImplementedError(f"{type(self).__name__} has no compiled step path{why}")
        if not enabled:
            self._step_compiler = None
            return self
        from curvlab.optim.compiled import StepCompiler

        self._step_compiler = StepCompiler(backend, mode, options)
        return self

    #: whether :meth:`compile_step` is supported
    compilable: ClassVar[bool] = False
    #: why not (the refusal's message), for an optimizer without a compiled path
    not_compilable_because: ClassVar[str] = ""

    @property
    def step_compiled(self) -> bool:
        """Whether :meth:`compile_step` is on."""
        return self._step_compiler is not None

    # ---- hyperparameters ----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._validating and not self.supports_add_param_group:
            raise ValueError(f"{type(self).__name__} fixes its parameters at construction; "
                             "add_param_group is not supported (build a new optimizer)")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter is listed twice in one param "
                             "group; it would be updated twice")
        super().add_param_group({**param_group, "params": params})
        if self._validating:
            self._validate_group(self.param_groups[-1])

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check ``group`` against ``hyperparameters``; ValueError naming the bad setting."""
        for name, rule in self.hyperparameters.items():
            if name in group:
                why = rule(group[name])
                if why is not None:
                    raise ValueError(f"{type(self).__name__}: {name}={group[name]!r} {why}")
        for p in group["params"]:
            if not (p.is_floating_point() and not p.is_complex()):
                raise TypeError(f"{type(self).__name__} needs real floating-point parameters, "
                                f"got {p.dtype}")

    # ---- the step ------------------------------------------------------------------------
    def _begin_step(self, closure: Callable[[], Any] | None, grads: Sequence[Tensor] | None = None,
                    loss_checked: bool = False, process_group: Any = None
                    ) -> tuple[Any, float | None]:
        """Run the closure (with gradients enabled), check the learning rates and apply the
        gradient rule (:meth:`_gradient_bound`). Returns ``(loss, bound)``;
        ``bound`` is None when the step must be skipped (already counted and logged)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            if not (_is_real(lr) or isinstance(lr, Tensor)) or not math.isfinite(float(lr)) \
                    or float(lr) < 0:
                raise ValueError(f"{type(self).__name__}: lr={lr!r} at step time (set by a "
                                 "scheduler?) must be finite and >= 0")
        if grads is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if loss_checked and loss is not None and not bool(torch.isfinite(
                torch.as_tensor(loss).detach()).all()):
            self._skip("nonfinite", "loss")
            return loss, None
        return loss, self._gradient_bound(grads, process_group)

    def _gradient_bound(self, grads: Sequence[Tensor], group: Any = None) -> float | None:
        """The largest gradient norm over ``grads``, or None when the step is skipped: a
        non-finite entry, or squares that would overflow the statistics (see the module
        docstring).
        ``group``: a process group whose ranks must agree (max-reduced)."""
        if any(g.is_sparse for g in grads):
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        from curvlab.optim.distributors.collectives import local_tensor

        gmax = _max_norm([local_tensor(g) for g in grads])
        if group is not None:  # every rank takes the same decision (NaN does not max-reduce)
            from curvlab import distributed as _dist

            bad = math.isnan(gmax)
            t = torch.tensor([float(bad), 0.0 if bad else gmax], dtype=torch.float64,
                             device=_dist.comm_device(group))
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX, group=group)
            gmax = math.nan if t[0] > 0 else float(t[1])
        if math.isnan(gmax):
            self._skip("nonfinite", "gradient")
            return None
        if not gmax * gmax < self._overflow_threshold():
            self._skip("overflow", f"gradient (norm {gmax:.3g}: its squares overflow "
                       f"{self.statistics_dtype})")
            return None
        return gmax

    def _overflow_threshold(self) -> float:
        """A gradient with ``||G||_F^2`` at or above this skips the step: a statistic's entry
        (a sum of products of gradient entries) is at most ``||G||_F^2``."""
        return 0.25 * torch.finfo(self.statistics_dtype).max

    def _skip(self, kind: str, what: str) -> None:
        """Skip the step (``kind``: "nonfinite" or "overflow"), or raise under
        ``nonfinite="raise"``."""
        if self.nonfinite == "raise":
            adjective = "non-finite" if kind == "nonfinite" else "overflowing"
            raise FloatingPointError(f"{type(self).__name__}: {adjective} "
                                     f"{what}; nothing changed (pass nonfinite='skip' to skip "
                                     "such steps)")
        self._counters[f"skipped_{kind}"] += 1
        logger.warning("%s: %s %s; step skipped", type(self).__name__,
                       "non-finite" if kind == "nonfinite" else "overflowing", what)

    def _count_refresh(self, n: int = 1, failed: int = 0) -> None:
        self._counters["refreshes"] += n
        self._counters["refresh_failures"] += failed

    # ---- stats ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Run statistics; the keys of :data:`STATS_KEYS` are present for every optimizer."""
        c = self._counters
        out = {"steps": c["steps"],
               "skipped_steps": c["skipped_nonfinite"] + c["skipped_overflow"],
               "skipped_nonfinite": c["skipped_nonfinite"],
               "skipped_overflow": c["skipped_overflow"],
               "refreshes": c["refreshes"], "refresh_failures": c["refresh_failures"],
               "state_bytes": self._state_bytes()}
        out.update(self._extra_stats())
        return out

    def _state_bytes(self) -> int:
        seen: set = set()
        total = 0
        for st in self.state.values():
            values = [x for v in (st.values() if isinstance(st, dict) else ())
                      for x in (v if isinstance(v, (list, tuple)) else [v])]
            for v in values:
                if isinstance(v, Tensor):
                    key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.shape)
                    if key not in seen:
                        seen.add(key)
                        total += v.numel() * v.element_size()
        return total

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    # ---- monitor protocol ------------------------------------------------------------------
    def stability_model(self) -> StabilityModel:
        """The step's stability rule on the local quadratic model (see
        :mod:`curvlab.optim.stability`)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare a stability model")

    # ---- state dict ------------------------------------------------------------------------
    def _step_seed(self) -> int:
        """The train-mode seed (Dropout masks) of the objective an optimizer builds for this
        step (``curvlab.Objective(seed=...)``): a new one every step, as a training loop
        draws new masks, and a function of ``self._global["seed"]`` and ``["step"]``, so a
        resumed run draws the same ones. (With one seed for every step, a model with
        Dropout would be trained on one fixed mask.)"""
        return (self._global["seed"] * 1_000_003 + self._global["step"] * 7919) % 2**62

    def _global_state(self) -> dict[str, Any]:
        """Optimizer-wide state to checkpoint besides the counters: by default the dict
        ``self._global`` and the state of the generator ``self._generator``, if any."""
        out = dict(getattr(self, "_global", {}))
        generator = getattr(self, "_generator", None)
        if generator is not None:
            out["rng"] = generator.get_state()
        return out

    def _load_global_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_global_state` saved."""
        glob = getattr(self, "_global", None)
        if glob is not None:
            glob.update({k: v for k, v in state.items() if k in glob})
        if "rng" in state and getattr(self, "_generator", None) is not None:
            self._generator.set_state(state["rng"])

    def _state_template(self, p: Tensor, group: dict[str, Any]
                        ) -> dict[str, tuple[int, ...] | None] | None:
        """Shapes of the tensor state entries ``p`` may have (a loaded state is checked
        against them; a shape None: any); None: not checked."""
        return None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        glob = {"counters": dict(self._counters), **self._global_state()}
        groups = [dict(g) for g in sd["param_groups"]]
        if groups:
            groups[0][GLOBAL_KEY] = glob
        sd["param_groups"] = groups
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking that ``state_dict`` fits these parameters; saved state keeps
        its dtypes."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict \
                or "state" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: not an optimizer state dict (needs "
                             "'state' and 'param_groups')")
        from curvlab.optim._convert import convert_state_dict

        state_dict = convert_state_dict(self, state_dict)  # older layouts
        groups = [dict(g) for g in state_dict["param_groups"]]
        glob = groups[0].pop(GLOBAL_KEY, None) if groups else None
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state dict has {len(groups)} param "
                             f"groups, this optimizer {len(self.param_groups)} (a different "
                             "model or grouping)")
        params: list[Tensor] = []
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            missing = sorted(set(group) - set(saved) - {"params", "param_names"})
            if missing:
                raise ValueError(f"{name}.load_state_dict: param group {gi} of the state dict "
                                 f"lacks the settings {missing} (a state dict of another "
                                 "optimizer?)")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {gi} has "
                                 f"{len(saved['params'])} parameters in the state dict and "
                                 f"{len(group['params'])} here (a different model?)")
            params.extend(group["params"])
        index = {pid: params[k] for k, pid in
                 enumerate(pid for g in groups for pid in g["params"])}
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, saved_state in state_dict["state"].items():
            if pid not in index:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter {pid!r}")
            p = index[pid]
            template = self._state_template(p, group_of[id(p)])
            if template is None:
                continue
            for key, value in saved_state.items():
                if not isinstance(value, Tensor):
                    continue
                if key not in template:
                    raise ValueError(f"{name}.load_state_dict: unexpected state {key!r} for a "
                                     f"parameter of shape {tuple(p.shape)} (a state dict of "
                                     "another optimizer or configuration?)")
                if template[key] is not None and tuple(value.shape) != tuple(template[key]):
                    raise ValueError(f"{name}.load_state_dict: state {key!r} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(template[key])} "
                                     f"for a parameter of shape {tuple(p.shape)} (a state "
                                     "dict of a different model?)")
        # torch loads the param groups (hyperparameters); the state is ours, dtypes kept
        super().load_state_dict({"state": {}, "param_groups": groups})
        self._before_param_state_load(state_dict["state"], index)
        for pid, saved_state in state_dict["state"].items():
            p = index[pid]
            self.state[p] = self._load_param_state(p, saved_state)
        if glob is not None:
            self._counters.update(glob.get("counters", {}))
            self._load_global_state(glob)
        self._after_load()

    def _before_param_state_load(self, saved_state: dict[Any, dict[str, Any]],
                                 index: dict[Any, Tensor]) -> None:
        """Called after the param groups are loaded, before the per-parameter state."""

    def _load_param_state(self, p: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """Copy of one parameter's saved state on ``p``'s device, dtypes kept."""
        return {k: (v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                for k, v in saved.items()}

    def _after_load(self) -> None:
        """Rebuild derived structures after :meth:`load_state_dict`."""


def _max_norm(tensors: Iterable[Tensor]) -> float:
    """The largest Frobenius norm of ``tensors``: NaN if an entry is not finite, ``inf`` if
    all are finite but a norm overflows float32 (one fused norm per tensor; the exact
    check only when that overflows). 16-bit tensors are normed in float32."""
    tensors = [t for t in tensors]
    if not tensors:
        return 0.0
    wide = [t for t in tensors if t.dtype not in (torch.float16, torch.bfloat16)]
    norms = list(torch._foreach_norm(wide)) if wide else []
    norms += [torch.linalg.vector_norm(t, dtype=torch.float32)
              for t in tensors if t.dtype in (torch.float16, torch.bfloat16)]
    if any(n.dtype != norms[0].dtype or n.device != norms[0].device for n in norms):
        norms = [n.double().cpu() for n in norms]
    bound = float(torch.stack(norms).max())
    if math.isfinite(bound):
        return bound
    exact = torch._foreach_norm(tensors, float("inf"))
    finite = all(math.isfinite(float(n)) for n in exact)
    return math.inf if finite else math.nan
