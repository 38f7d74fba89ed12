"""Stability of the optimizer on the local quadratic model, and step-size diagnostics.

On ``L(theta) ~ 1/2 theta^T H theta``, gradient descent ``theta <- theta - lr g`` is stable
iff ``lr * lambda_max(H) < 2``; the largest stable learning rate is ``2 / lambda_max``.
Training at that edge is the "edge of stability" (Cohen et al., ICLR 2021). Momentum and
preconditioning move the threshold (:func:`stability_threshold`); for Adam-like
optimizers the relevant curvature is the *preconditioned sharpness*
``lambda_max(P^{-1} H)`` with ``P = diag(sqrt(v_hat) + eps)`` from the optimizer's own
second-moment state (Cohen et al., "Adaptive gradient methods at the edge of
stability", 2022).

Coordinates whose second moment is exactly 0 (they never received a nonzero gradient:
embedding rows of tokens absent from training, parameters a mask or the architecture cuts
off) are not governed: ``P = inf`` there, so ``P^{-1/2} = 0`` projects them out of the
preconditioned operator. Frozen at ``P = eps`` they would count with ``1 / eps`` (1e8 for
Adam) and the Hessian there, real or rounding noise, would dominate the ratio; yet the
frozen-``P`` model does not describe them: the first gradient sets ``v = (1 - b2) g^2``,
so Adam's first step there is ``lr (1 - b1) / sqrt(1 - b2)`` in size whatever the
curvature.

Also here: the Newton decrement, the relative update size and the minibatch gradient
noise.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curvlab.linalg.estimators import quadratic_form
from curvlab.linalg.krylov import EigenResult, lanczos
from curvlab.linalg.operator import MatvecOperator, as_operator
from curvlab.objective import Objective, sample_rows
from curvlab.optim.stability import StabilityModel, ema_samples, momentum_threshold

__all__ = ["stability_model", "unwrap_optimizer", "preconditioned_operator",
           "stability_threshold", "StabilityReport", "gd_stability", "stability_report",
           "adam_preconditioner", "preconditioned_sharpness", "NewtonDecrement",
           "newton_decrement", "relative_update", "GradientNoise", "gradient_noise"]

ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")  # kept for callers; see below
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
_WRAPPER_ATTRS = ("optimizer", "_optimizer")
_warned_unknown: set[str] = set()


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside framework wrappers: accelerate's ``AcceleratedOptimizer`` (the
    Hugging Face Trainer's) through ``.optimizer``, Lightning's ``LightningOptimizer``
    through ``._optimizer``, and wrappers of wrappers. Found by attribute, not class name:
    any object holding an optimizer (something with ``param_groups``), directly or through
    further wrappers, under one of those attributes is a wrapper."""
    def holds_optimizer(obj: Any, depth: int = 0) -> bool:
        if hasattr(obj, "param_groups"):
            return True
        return depth < 8 and any(holds_optimizer(getattr(obj, a), depth + 1)
                                 for a in _WRAPPER_ATTRS if getattr(obj, a, None) is not None)

    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        for attr in _WRAPPER_ATTRS:
            inner = getattr(optimizer, attr, None)
            if inner is not None and inner is not optimizer and holds_optimizer(inner):
                optimizer = inner
                break
        else:
            break
    return optimizer


def stability_model(optimizer: Any) -> StabilityModel:
    """The stability rule of ``optimizer`` at its current state: ``lr * lambda_max(P^{-1/2}
    H P^{-1/2}) < threshold`` (see :mod:`curvlab.optim.stability`).

    Resolution: framework wrappers are unwrapped (:func:`unwrap_optimizer`); an optimizer
    with a callable ``stability_model()`` declares its own rule; torch's optimizers are
    known by type (SGD with momentum / dampening / Nesterov; Adam, AdamW, NAdam, RAdam,
    Adamax, RMSprop, Adagrad with their diagonal preconditioners from ``optimizer.state``);
    anything else gets the gradient-descent rule with a one-time warning and the note
    "unknown optimizer".

    Param groups with different learning rates or momenta: the rule is stated for the
    first group with ``lr > 0`` (``lr`` and threshold ``c``); a group ``g`` enters through
    its share ``(lr_g / c_g) / (lr / c)`` folded into ``P^{-1}`` (the same condition
    ``lr_g lambda < c_g`` per block); groups with ``lr = 0`` are not governed. An
    optimizer's own rule gets its groups' ``lr_g / lr`` folded in the same way (unless it
    says it did, ``StabilityModel.groups_scaled``).
    """
    opt = unwrap_optimizer(optimizer)
    own = getattr(opt, "stability_model", None)
    if callable(own):
        try:
            model = own()
        except NotImplementedError:  # declared by the base class, not stated: unknown rule
            model = None
        if model is not None:
            if not isinstance(model, StabilityModel):
                raise TypeError(f"{type(opt).__name__}.stability_model() returned "
                                f"{type(model).__name__}, expected a StabilityModel")
            return _with_group_lrs(opt, model)
    if not hasattr(opt, "param_groups"):
        raise TypeError(f"expected an optimizer (with param_groups), got {type(opt).__name__}")
    rule = _torch_rule(opt)
    if rule is None:
        name = type(opt).__name__
        if name not in _warned_unknown:
            _warned_unknown.add(name)
            warnings.warn(f"curvlab does not know the stability rule of {name}; using "
                          "gradient descent's (lr x lambda_max < 2). Give the optimizer a "
                          "stability_model() method to state its own.", stacklevel=2)
        lr = float(_reference_group(opt.param_groups).get("lr", math.nan))
        return StabilityModel("gd", lr, 2.0, _group_scaled(opt, lambda g: 2.0, None),
                              f"unknown optimizer {name}: gradient-descent rule",
                              groups_scaled=True)
    name, threshold_of, diag_of, note, samples_of = rule
    return _diagonal_model(opt, name, threshold_of, diag_of, note, samples_of)


def _reference_group(groups: list[dict]) -> dict:
    """The group whose ``lr`` a rule is stated for: the first with ``lr > 0`` (a frozen
    first group, ``lr = 0``, made every ratio 0 or raised), else the first."""
    return next((g for g in groups if float(g.get("lr", 0.0)) > 0), groups[0])


def _with_group_lrs(opt: Any, model: StabilityModel) -> StabilityModel:
    """``model`` (an optimizer's own rule, stated for its first group's ``lr``) with every
    group's ``lr_g / lr`` folded into ``P^{-1}`` for its parameters (``lr = 0``: not
    governed), as for torch's optimizers. The curvlab optimizers' rules used the first
    group's ``lr`` for every parameter: with layer-wise learning rates (a head at 50x the
    first group's) the ratio was understated 50x."""
    groups = getattr(opt, "param_groups", None)
    if model.groups_scaled or not groups or not math.isfinite(model.threshold):
        return model
    ref = float(_reference_group(groups).get("lr", 0.0))
    shares = {id(p): (float(g.get("lr", ref)) / ref if ref > 0 else 0.0)
              for g in groups for p in g["params"]}
    if all(s == 1.0 for s in shares.values()) and ref == model.lr:
        return dataclasses.replace(model, groups_scaled=True)
    base = model.inv_sqrt_preconditioner

    def inv_sqrt(param: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        share = shares.get(id(param), 1.0)
        if share <= 0:
            return torch.zeros_like(v)
        out = v if base is None else base(param, v)
        return out if share == 1.0 else out * math.sqrt(share)

    return dataclasses.replace(model, lr=ref, inv_sqrt_preconditioner=inv_sqrt,
                               groups_scaled=True)


def _torch_rule(opt: Any) -> tuple[str, Callable, Callable | None, str, Callable | None] | None:
    """``(name, threshold(group), P_diag(group, state) or None, note, samples(group, state)
    or None)`` for torch's optimizers (``samples``: the gradients ``P``'s statistics
    average, :func:`~curvlab.optim.stability.ema_samples`)."""
    if isinstance(opt, torch.optim.SGD):
        def sgd(g: dict) -> float:
            return momentum_threshold(g.get("momentum", 0.0), dampening=g.get("dampening", 0.0),
                                      nesterov=g.get("nesterov", False))
        g0 = opt.param_groups[0]
        name = ("nesterov" if g0.get("nesterov") else
                "heavy_ball" if g0.get("momentum", 0.0) else "gd")
        return name, sgd, None, "torch.optim.SGD on the local quadratic", None
    if isinstance(opt, torch.optim.NAdam):
        return ("adam", lambda g: momentum_threshold(g["betas"][0], ema=True), _nadam_diag,
                "torch.optim.NAdam: Adam's P frozen; its Nesterov mix of g and m and its "
                "momentum schedule folded into the lr (threshold as Adam's)",
                _beta2_samples("betas", 1))
    if isinstance(opt, torch.optim.RAdam):
        return ("adam", lambda g: momentum_threshold(g["betas"][0], ema=True), _radam_diag,
                "torch.optim.RAdam: P = (sqrt(v) + eps) / sqrt(1 - b2^t) frozen, the "
                "rectification r_t folded into the lr (P = 1 before rho_t > 5)",
                _beta2_samples("betas", 1))
    if isinstance(opt, _ADAM_TYPES):
        return ("adam", lambda g: momentum_threshold(g["betas"][0], ema=True), _adam_diag,
                f"torch.optim.{type(opt).__name__}: P = sqrt(v / (1 - b2^t)) + eps frozen "
                "(Cohen et al. 2022), lr / (1 - b1^t) for the momentum bias correction",
                _beta2_samples("betas", 1))
    if isinstance(opt, torch.optim.Adamax):
        return ("adam", lambda g: momentum_threshold(g["betas"][0], ema=True), _adamax_diag,
                "torch.optim.Adamax: P = u = max(b2 u, |g| + eps) frozen",
                _beta2_samples("betas", 1))
    if isinstance(opt, torch.optim.RMSprop):
        return ("rmsprop", lambda g: momentum_threshold(g.get("momentum", 0.0)), _rmsprop_diag,
                "torch.optim.RMSprop: P = sqrt(v) + eps frozen (heavy-ball momentum)",
                _beta2_samples("alpha"))
    if isinstance(opt, torch.optim.Adagrad):
        return ("adagrad", lambda g: 2.0, _adagrad_diag,
                "torch.optim.Adagrad: P = sqrt(sum g^2) + eps frozen, lr decay applied",
                lambda g, st: ema_samples(1.0, _step_of(st)))
    return None


def _beta2_samples(key: str, index: int | None = None) -> Callable[[dict, dict], float]:
    """``samples(group, state)`` of an EMA second moment with decay ``group[key]`` (its
    ``index``-th entry for a tuple of betas)."""
    def samples(group: dict, state: dict) -> float:
        beta = group[key] if index is None else group[key][index]
        return ema_samples(float(beta), _step_of(state))
    return samples


def _step_of(state: dict) -> float:
    step = state.get("step", 0)
    return float(step)


def _ungoverned(P: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """``P`` with ``inf`` where the second moment is exactly 0 (never a nonzero gradient:
    projected out of the preconditioned operator, see the module docstring)."""
    return P.masked_fill(second_moment == 0, math.inf)


def _adam_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    """``(P, lr factor)``: Adam divides ``m / (1 - b1^t)`` by ``sqrt(v / (1 - b2^t)) + eps``
    (``inf`` where ``v = 0``)."""
    if "exp_avg_sq" not in state:
        return None
    b1, b2 = group["betas"]
    t = _step_of(state)
    v = state.get("max_exp_avg_sq", state["exp_avg_sq"]) if group.get("amsgrad") else \
        state["exp_avg_sq"]
    v_hat = v / (1 - b2 ** t) if t > 0 else v
    return _ungoverned(v_hat.sqrt() + group["eps"], v), 1.0 / (1 - b1 ** t) if t > 0 else 1.0


def _nadam_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    """NAdam's next step (torch's form): ``x -= lr (c_g g + c_m m') / P`` with Adam's
    ``P``, ``m' = b1 m + (1 - b1) g``, ``c_g = (1 - mu) / (1 - prod mu)``, ``c_m = mu' /
    (1 - prod mu mu')`` and ``mu_t = b1 (1 - 0.96^(t psi) / 2)`` (Dozat 2016; ~0.45 early,
    0.52 at step 1000 for psi 0.004). On a quadratic the state ``(x, lr m)`` is stable iff
    ``a = lr lambda < min(2 (1 + b1) / (c_g (1 + b1) + c_m (1 - b1)), (1 + b1) / (b1 c_g))``
    (Jury's conditions on its 2x2 recurrence; Adam: ``c_g = 0``, ``2 (1 + b1) / (1 - b1)``).
    Returned as Adam's ``P`` with the lr factor ``2 (1 + b1) / (1 - b1) / a*``, so Adam's
    threshold applies: at ``b1 = 0.9`` NAdam's own is 13.6 asymptotically and ~3.5 while
    ``mu ~ 0.45``, not Adam's 38."""
    if "exp_avg_sq" not in state:
        return None
    b1, b2 = group["betas"]
    t = _step_of(state) + 1  # the next step
    psi = group.get("momentum_decay", 4e-3)
    mu, mu_next = (b1 * (1.0 - 0.5 * 0.96 ** (k * psi)) for k in (t, t + 1))
    prod = float(state.get("mu_product", 1.0)) * mu
    c_g, c_m = (1.0 - mu) / (1.0 - prod), mu_next / (1.0 - prod * mu_next)
    a1 = 2 * (1 + b1) / (c_g * (1 + b1) + c_m * (1 - b1))
    a_star = min(a1, (1 + b1) / (b1 * c_g)) if c_g > 0 else a1
    v = state["exp_avg_sq"]
    bc2 = 1 - b2 ** (t - 1) if t > 1 else 1.0
    return (_ungoverned((v / bc2).sqrt() + group["eps"], v),
            momentum_threshold(b1, ema=True) / a_star)


def _radam_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    """RAdam's next step (Liu et al. 2020, torch's form): ``lr r_t m_hat / P`` with ``P =
    (sqrt(v) + eps) / sqrt(1 - b2^t)`` and the rectification ``r_t`` once the length of the
    approximated moving average ``rho_t > 5``, plain momentum (``P = 1``) before. ``r_t``
    is ~0.2 at step 100 and ~0.65 at step 1000 (b2 = 0.999): without it the ratio was
    overstated ~5x / ~1.5x there."""
    if "exp_avg_sq" not in state:
        return None
    b1, b2 = group["betas"]
    t = _step_of(state) + 1  # the next step (v: the current one's)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2 ** t / bc2
    v = state["exp_avg_sq"]
    if rho_t <= 5.0:
        return torch.ones_like(v), 1.0 / bc1
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    bc2_now = 1 - b2 ** (t - 1) if t > 1 else 1.0
    return _ungoverned((v.sqrt() + group["eps"]) / math.sqrt(bc2_now), v), rect / bc1


def _adamax_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    """Adamax divides by ``u = max(b2 u, |g| + eps)`` itself (eps inside the max: ``u +
    eps`` counted it twice, halving the ratio where ``|g| << eps``)."""
    if "exp_inf" not in state:
        return None
    t = _step_of(state)
    return (_ungoverned(state["exp_inf"].clone(), state["exp_inf"]),
            1.0 / (1 - group["betas"][0] ** t) if t > 0 else 1.0)


def _rmsprop_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    if "square_avg" not in state:
        return None
    v = state["square_avg"]
    if group.get("centered") and "grad_avg" in state:
        v = v - state["grad_avg"] ** 2
    return _ungoverned(v.clamp_min(0).sqrt() + group["eps"], state["square_avg"]), 1.0


def _adagrad_diag(group: dict, state: dict) -> tuple[torch.Tensor, float] | None:
    if "sum" not in state:
        return None
    t = _step_of(state)
    return (_ungoverned(state["sum"].sqrt() + group["eps"], state["sum"]),
            1.0 / (1 + max(t - 1, 0) * group.get("lr_decay", 0)))


def _group_scaled(opt: Any, threshold_of: Callable, diag_of: Callable | None
                  ) -> Callable | None:
    """``P^{-1/2}`` with each group's ``(lr_g / c_g) / (lr / c)`` folded in; None when that
    is the identity (one plain rule for every parameter)."""
    groups = opt.param_groups
    ref = _reference_group(groups)
    lr0, c0 = float(ref["lr"]), threshold_of(ref)
    shares = {}
    for g in groups:
        share = (float(g["lr"]) / threshold_of(g)) / (lr0 / c0) if lr0 > 0 else 0.0
        for p in g["params"]:
            shares[id(p)] = (share, g)
    if diag_of is None and all(s == 1.0 for s, _ in shares.values()):
        return None

    def inv_sqrt(param: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        share, group = shares.get(id(param), (0.0, None))
        if share <= 0:
            return torch.zeros_like(v)
        scale = math.sqrt(share)
        if diag_of is None:
            return v * scale
        state = opt.state.get(param, {})
        # the diagonal is kept until the optimizer changes the state (tensor versions count
        # in-place updates): a Lanczos run applies it twice per product
        key = (v.dtype, tuple((k, id(t), t._version) if isinstance(t, torch.Tensor)
                              else (k, t) for k, t in state.items()))
        hit = cache.get(id(param))
        if hit is None or hit[0] != key:
            diag = diag_of(group, state)
            if diag is None:
                raise ValueError("the optimizer has no second-moment state yet; take at least "
                                 "one optimizer step first")
            P, lr_factor = diag
            hit = cache[id(param)] = (key, P.to(v.dtype).rsqrt() * (scale * math.sqrt(lr_factor)))
        return v * hit[1]

    cache: dict[int, tuple[Any, torch.Tensor]] = {}
    return inv_sqrt


def _diagonal_model(opt: Any, name: str, threshold_of: Callable, diag_of: Callable | None,
                    note: str, samples_of: Callable | None = None) -> StabilityModel:
    g0 = _reference_group(opt.param_groups)
    samples = None
    if samples_of is not None:
        def samples() -> float:
            """The fewest gradients any governed parameter's statistics average."""
            counts = [samples_of(g, opt.state[p]) for g in opt.param_groups if g["lr"] > 0
                      for p in g["params"] if opt.state.get(p)]
            return min(counts, default=0.0)
    return StabilityModel(name, float(g0["lr"]), float(threshold_of(g0)),
                          _group_scaled(opt, threshold_of, diag_of), note, samples,
                          groups_scaled=True)


def stability_threshold(optimizer: Any = None, *, momentum: float = 0.0,
                        dampening: float = 0.0, nesterov: bool = False,
                        ema_momentum: bool = False) -> float:
    """The critical value ``c`` of ``lr * lambda`` above which the optimizer diverges on a
    quadratic with curvature ``lambda`` (for preconditioned optimizers: of the
    preconditioned curvature). With an optimizer: ``stability_model(optimizer).threshold``
    (:func:`stability_model`); without: :func:`curvlab.optim.stability.momentum_threshold`
    of the given momentum rule (gradient descent 2, heavy ball ``2 (1 + mu) / (1 - d)``,
    Nesterov ``2 (1 + mu) / (1 + 2 mu)``, Adam's EMA momentum ``2 (1 + b1) / (1 - b1)``,
    38 for ``b1 = 0.9``).
    """
    if optimizer is not None:
        return stability_model(optimizer).threshold
    return momentum_threshold(momentum, dampening=dampening, nesterov=nesterov,
                              ema=ema_momentum)


@dataclass
class StabilityReport:
    """``ratio = lr * sharpness``; the step is stable on the quadratic model iff
    ``ratio < threshold``; ``max_stable_lr = threshold / sharpness``."""

    sharpness: float
    lr: float
    threshold: float
    ratio: float
    max_stable_lr: float
    stable: bool
    preconditioned: bool = False
    num_matvecs: int = 0


def gd_stability(sharpness: float, lr: float, threshold: float = 2.0) -> StabilityReport:
    """Stability numbers from a known sharpness (``lambda_max`` or the preconditioned one)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    ratio = lr * sharpness
    max_lr = threshold / sharpness if sharpness > 0 else math.inf
    return StabilityReport(float(sharpness), float(lr), float(threshold), float(ratio),
                           float(max_lr), bool(ratio < threshold))


def adam_preconditioner(op: Any, optimizer: Any) -> torch.Tensor:
    """The flat diagonal ``P = sqrt(v / (1 - b2^t)) + eps`` that an Adam-like optimizer
    (torch's Adam, AdamW, NAdam, RAdam; wrappers unwrapped) divides its step by, in the
    operator's parameter order (from ``optimizer.state``); ``inf`` where ``v = 0`` (not
    governed, see the module docstring)."""
    objective = getattr(op, "objective", None)
    if objective is None:
        raise TypeError("op must be a curvature operator built on the optimizer's model "
                        "parameters (e.g. HessianOperator(model, loss_fn, batch))")
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, _ADAM_TYPES):
        raise TypeError(f"optimizer must be Adam-like (torch's Adam, AdamW, NAdam, RAdam), got "
                        f"{type(opt).__name__}")
    lookup = {id(p): (group, opt.state.get(p, {}))
              for group in opt.param_groups for p in group["params"]}
    pieces = []
    for name, p in objective.params.items():
        if id(p) not in lookup:
            raise ValueError(f"parameter {name!r} is not managed by the optimizer")
        diag = _adam_diag(*lookup[id(p)])
        if diag is None:
            raise ValueError("the optimizer has no second-moment state yet; take at least one "
                             "optimizer step first")
        pieces.append(diag[0].reshape(-1))
    return torch.cat(pieces).to(dtype=objective.dtype)


def preconditioned_operator(op: Any, preconditioner: Any) -> Any:
    """The symmetric ``P^{-1/2} H P^{-1/2}`` (same eigenvalues as ``P^{-1} H``) for
    ``preconditioner`` a positive flat diagonal ``P`` (a tensor; ``inf`` entries project
    their coordinates out), a
    :class:`~curvlab.optim.stability.StabilityModel` (its ``inv_sqrt_preconditioner``,
    parameter by parameter) or an optimizer (through :func:`stability_model`)."""
    A = as_operator(op)
    if isinstance(preconditioner, torch.Tensor):
        if preconditioner.shape != (A.n,):
            raise ValueError(f"preconditioner has shape {tuple(preconditioner.shape)}, "
                             f"expected ({A.n},)")
        if not (preconditioner > 0).all():
            raise ValueError("preconditioner must be positive")
        s = preconditioner.to(dtype=A.dtype, device=A.device).rsqrt()
        # D A D with A already checked symmetric by as_operator: no second check
        return MatvecOperator(lambda v: s * A.matvec(s * v), A.n, dtype=A.dtype,
                              device=A.device,
                              matmat=lambda V: s[:, None] * A.matmat(s[:, None] * V),
                              check_symmetry=False)
    model = (preconditioner if isinstance(preconditioner, StabilityModel)
             else stability_model(preconditioner))
    if model.inv_sqrt_preconditioner is None:
        return A
    objective = getattr(op, "objective", None)
    if objective is None:
        raise TypeError("op must be a curvature operator built on the optimizer's model "
                        "parameters (e.g. HessianOperator(model, loss_fn, batch))")
    params, f = objective.params, model.inv_sqrt_preconditioner

    def scale(v: torch.Tensor) -> torch.Tensor:
        parts = objective.unflatten(v)
        return objective.flatten({k: f(params[k], parts[k]) for k in parts}).to(v.dtype)

    def matmat(V: torch.Tensor) -> torch.Tensor:
        D = torch.stack([scale(V[:, j]) for j in range(V.shape[1])], 1)
        HD = A.matmat(D)
        return torch.stack([scale(HD[:, j]) for j in range(V.shape[1])], 1)

    return MatvecOperator(lambda v: scale(A.matvec(scale(v))), A.n, dtype=A.dtype,
                          device=A.device, matmat=matmat, check_symmetry=False)


def preconditioned_sharpness(op: Any, preconditioner: Any, *,
                             tol: float = 1e-3, v0: torch.Tensor | None = None,
                             max_iter: int | None = None, num_vectors: int | None = None,
                             min_iter: int = 1,
                             generator: torch.Generator | None = None) -> EigenResult:
    """``lambda_max(P^{-1} H)`` for ``P`` a positive flat diagonal (a tensor), a
    :class:`~curvlab.optim.stability.StabilityModel`, or an optimizer whose stability model
    defines it (:func:`stability_model`: Adam's ``diag(sqrt(v_hat) + eps)``, a curvlab
    optimizer's own preconditioner, ...).

    Computed as the top eigenpair of the symmetric ``P^{-1/2} H P^{-1/2}``
    (:func:`preconditioned_operator`; same eigenvalues); the returned eigenvectors are of
    that symmetric operator. ``v0``, ``num_vectors`` and ``min_iter`` are passed to
    :func:`~curvlab.linalg.lanczos` (warm starts).
    """
    return lanczos(preconditioned_operator(op, preconditioner), 1, tol=tol, v0=v0,
                   max_iter=max_iter, num_vectors=num_vectors, min_iter=min_iter,
                   generator=generator)


def stability_report(op: Any, optimizer: Any, *, tol: float = 1e-3,
                     generator: torch.Generator | None = None) -> StabilityReport:
    """Sharpness, ``lr x sharpness`` and the largest stable learning rate for ``optimizer``
    under its stability model (:func:`stability_model`): the plain sharpness for (momentum)
    SGD, the preconditioned sharpness in the optimizer's own preconditioner otherwise."""
    model = stability_model(optimizer)
    res = (preconditioned_sharpness(op, model, tol=tol, generator=generator)
           if model.preconditioned else lanczos(op, 1, tol=tol, generator=generator))
    rep = gd_stability(float(res.eigenvalues[0]), model.lr, model.threshold)
    rep.preconditioned, rep.num_matvecs = model.preconditioned, res.num_matvecs
    return rep


@dataclass
class NewtonDecrement:
    """``value = sqrt(g^T (H + damping I)^{-1} g)``; the Newton step decreases the
    quadratic model by ``value^2 / 2`` (Boyd & Vandenberghe, *Convex Optimization*,
    sec. 9.5.1). ``value / ||g||`` near ``1 / sqrt(lambda)`` says along which curvature
    the gradient points."""

    value: float
    predicted_decrease: float
    grad_norm: float
    num_matvecs: int
    converged: bool


def newton_decrement(op: Any, grad: torch.Tensor | None = None, *, damping: float = 0.0,
                     tol: float = 1e-6, max_iter: int = 100) -> NewtonDecrement:
    """Newton decrement by Lanczos quadrature of ``f(x) = 1 / (x + damping)`` (the Krylov
    equivalent of solving with CG). ``grad`` defaults to the objective's full gradient.

    Raises ValueError if ``H + damping I`` shows a non-positive Ritz value: the decrement
    is then undefined (use a Gauss-Newton operator or more damping).
    """
    if grad is None:
        objective = getattr(op, "objective", None)
        if objective is None:
            raise TypeError("pass grad=..., or an operator built on an Objective")
        grad = objective.flat_grad(getattr(op, "point", None))
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    q = quadratic_form(op, grad, lambda t: 1.0 / (t + damping), tol=tol, max_iter=max_iter)
    if q.ritz_values.size and float(np.min(q.ritz_values)) + damping <= 0:
        raise ValueError(f"H + damping I is not positive definite (a Ritz value "
                         f"{float(np.min(q.ritz_values)):.3g} + damping {damping} <= 0); "
                         "increase damping or use a Gauss-Newton operator")
    value = math.sqrt(max(q.value, 0.0))
    return NewtonDecrement(value, 0.5 * value ** 2, float(grad.double().norm()),
                           q.num_matvecs, q.converged)


def _as_flat(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1)
    if isinstance(x, Mapping):
        x = x.values()
    if isinstance(x, torch.nn.Module):
        x = x.parameters()
    if isinstance(x, Iterable):
        parts = [t.detach().reshape(-1) for t in x]
        if parts:
            return torch.cat(parts)
    raise TypeError("expected a tensor, a dict or an iterable of tensors, or a module")


def relative_update(before: Any, after: Any) -> float:
    """``||theta_after - theta_before|| / ||theta_before||`` (tensors, dicts, iterables of
    tensors or modules). Values around 1e-3 are typical of healthy training; sudden
    jumps precede instabilities."""
    a, b = _as_flat(before), _as_flat(after)
    if a.shape != b.shape:
        raise ValueError(f"before and after have {a.numel()} and {b.numel()} entries")
    den = float(a.double().norm())
    return float((b - a).double().norm()) / den if den > 0 else math.inf


@dataclass
class GradientNoise:
    """Minibatch-vs-full-batch gradient gap.

    ``relative_gap = mean ||g_B - g|| / ||g||``; ``noise_scale = B tr(Sigma) / ||g||^2``
    with ``tr(Sigma) ~ B mean ||g_B - g||^2`` is the "simple noise scale" ``B_simple``
    (McCandlish et al., "An empirical model of large-batch training", 2018, eq. 2.8):
    batch sizes well below it are noise dominated.
    """

    grad_norm: float
    minibatch_grad_norm: float
    mean_gap: float
    relative_gap: float
    noise_scale: float
    batch_size: int
    num_batches: int


def gradient_noise(model: Any, loss_fn: Any = None, data: Any = None, *, batch_size: int = 32,
                   num_batches: int = 10, params: Any = None,
                   generator: torch.Generator | None = None) -> GradientNoise:
    """Compare ``num_batches`` random minibatch gradients (size ``batch_size``, drawn
    without replacement within a batch) with the full-batch gradient on ``data``, one batch
    (an ``(inputs, targets)`` pair or a dict batch; the tensors of its first dimension are
    indexed), or on an :class:`~curvlab.objective.Objective` of one batch (its reduction,
    mode and parameters are kept). Gradients are per-sample means: a summing loss
    (``reduction="sum"``) has its batch gradients divided by their numbers of samples, so
    ``Sigma`` is the covariance of per-sample gradients either way."""
    if isinstance(model, Objective):
        objective = model
        if len(objective.data) != 1:
            raise ValueError(f"gradient_noise needs an Objective of one batch, got "
                             f"{len(objective.data)}")
        data = next(iter(objective.data))
    else:
        if not (isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and len(data) == 2
                                              and isinstance(data[1], torch.Tensor))):
            raise TypeError("data must be one batch: an (inputs, targets) pair or a dict batch")
        names = list(params) if isinstance(params, Mapping) else params
        objective = Objective(model, loss_fn, data, names)
    N = objective.num_samples
    if not (isinstance(batch_size, int) and 1 <= batch_size <= N):
        raise ValueError(f"batch_size must be an int in [1, {N}], got {batch_size!r}")
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an int >= 2, got {num_batches!r}")

    def mean_grad(obj: Objective, n: int) -> torch.Tensor:
        g = obj.flat_grad().double()
        return g / n if obj.reduction == "sum" else g

    full = mean_grad(objective, N)
    gaps, norms = [], []
    for _ in range(num_batches):
        idx = torch.randperm(N, generator=generator)[:batch_size]
        gb = mean_grad(objective.on(sample_rows(data, idx)), batch_size)
        gaps.append(float((gb - full).norm()))
        norms.append(float(gb.norm()))
    gn = float(full.norm())
    mean_gap = sum(gaps) / len(gaps)
    mean_sq = sum(g * g for g in gaps) / len(gaps)
    # without replacement: E||g_B - g||^2 = tr(Sigma) / B * (N - B) / (N - 1)
    fpc = (N - batch_size) / (N - 1) if N > 1 else 1.0
    tr_sigma = batch_size * mean_sq / fpc if fpc > 0 else 0.0
    return GradientNoise(gn, sum(norms) / len(norms), mean_gap,
                         mean_gap / gn if gn > 0 else math.inf,
                         tr_sigma / gn ** 2 if gn > 0 else math.inf, batch_size, num_batches)
