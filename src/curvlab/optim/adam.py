r"""Adam's diagonal direction, written once (Kingma & Ba 2015, Alg. 1).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
    d_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

with ``epsilon`` added after the square root of the bias-corrected second moment, as in
``torch.optim.Adam``. Every curvlab optimizer that needs a diagonal method uses this one:
Shampoo's grafting, SOAP (in its eigenbasis and for its diagonal parameters), Muon's
non-matrix parameters and K-FAC's fallback. Moments of float16 / bfloat16 parameters are
kept in float32 (:func:`moment_dtype`): in float16 ``(1 - 0.999) g^2`` underflows to 0 for
``|g| < 8e-3`` and ``eps = 1e-8`` rounds to 0, and the step becomes ``m / 0``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["AdamConfig", "moment_dtype", "adam_moments_", "adam_normalize", "adam_directions_",
           "adam_step_", "adam_preconditioner", "foreach_scalar",
           "adam_stability_preconditioner"]


@dataclass(frozen=True)
class AdamConfig:
    """Hyperparameters of the Adam direction (shared by every optimizer that uses one).

    ``betas``: decay of the first and second moments, each in [0, 1); ``eps`` > 0;
    ``bias_correction``: divide the moments by ``1 - beta^t``.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bias_correction: bool = True

    def __post_init__(self) -> None:
        b = tuple(float(x) for x in self.betas)
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ValueError(f"AdamConfig: betas must be two numbers in [0, 1), got "
                             f"{self.betas!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"AdamConfig: eps must be finite and > 0, got {self.eps!r}")
        object.__setattr__(self, "betas", b)

    @classmethod
    def of(cls, value: AdamConfig | dict | None, **defaults) -> AdamConfig:
        """An AdamConfig from an AdamConfig, a dict of its fields, or None (defaults)."""
        if isinstance(value, AdamConfig):
            return value
        if value is None:
            return cls(**defaults)
        if isinstance(value, dict):
            return cls(**{**defaults, **value})
        raise TypeError(f"expected an AdamConfig or a dict, got {type(value).__name__}")


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of Adam's moments for parameters of ``dtype``: float32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def adam_moments_(m: Tensor | None, v: Tensor, g: Tensor, config: AdamConfig) -> None:
    """In place: ``m <- b1 m + (1 - b1) g`` (if ``m`` is given), ``v <- b2 v + (1 - b2) g^2``."""
    b1, b2 = config.betas
    if m is not None:
        m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)


def adam_normalize(m: Tensor, v: Tensor, step: int, config: AdamConfig,
                   inplace: bool = False) -> Tensor:
    """``(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` (a new tensor, or ``m`` itself
    overwritten with ``inplace``)."""
    denom = adam_preconditioner(v, step, config)
    c1 = 1.0 - config.betas[0] ** step if config.bias_correction else 1.0
    out = m.div_(denom) if inplace else torch.div(m, denom)
    return out.div_(c1) if c1 != 1.0 else out


def _moments_and_denominators(ms: Sequence[Tensor], vs: Sequence[Tensor],
                              grads: Sequence[Tensor], steps: Sequence[int],
                              config: AdamConfig) -> tuple[list[Tensor], list[float]]:
    """Update the moments in place; return ``sqrt(v_hat) + eps`` and ``1 - b1^t`` per tensor
    (in ``torch.optim.Adam``'s foreach order, so results match it bitwise)."""
    b1, b2 = config.betas
    gs = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, ms, strict=True)]
    scalar = foreach_scalar(vs)
    torch._foreach_lerp_(list(ms), gs, 1.0 - b1)
    torch._foreach_mul_(list(vs), scalar(b2))
    torch._foreach_addcmul_(list(vs), gs, gs, value=1.0 - b2)
    if config.bias_correction:
        c1 = [1.0 - b1 ** t for t in steps]
        c2 = [(1.0 - b2 ** t) ** 0.5 for t in steps]
    else:
        c1 = c2 = [1.0] * len(ms)
    denom = list(torch._foreach_sqrt(list(vs)))
    if len(set(c2)) == 1:  # one step count (the usual case): one scalar
        torch._foreach_div_(denom, scalar(c2[0]))
    else:
        torch._foreach_div_(denom, c2)
    eps = scalar(config.eps)  # (add_ of one 0-d tensor is as slow as of the number)
    torch._foreach_add_(denom, [eps] * len(denom) if isinstance(eps, Tensor) else eps)
    return denom, c1


@functools.lru_cache(maxsize=256)
def _cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    return torch.scalar_tensor(value, dtype=dtype)  # (one dispatch; torch.tensor: three)


def foreach_scalar(tensors: Sequence[Tensor]) -> Callable[[float], float | Tensor]:
    """How to pass a scalar to foreach ops on ``tensors``: on a CPU, a cached 0-d tensor of
    their dtype (torch's Scalar overloads wrap the number into a tensor for every tensor of
    the list there: ``_foreach_mul_`` of 4 small tensors 21 us, with a 0-d tensor 7 us; the
    same value: a Python scalar is rounded to the tensors' dtype as well); elsewhere the
    number."""
    dtype = tensors[0].dtype if tensors else None
    if dtype in (torch.float32, torch.float64) and all(
            t.device.type == "cpu" and t.dtype == dtype for t in tensors):
        return lambda x: _cpu_scalar(float(x), dtype)
    return lambda x: x


def adam_directions_(ms: Sequence[Tensor], vs: Sequence[Tensor], grads: Sequence[Tensor],
                     steps: Sequence[int], config: AdamConfig) -> list[Tensor]:
    """Batched (``torch._foreach``) moments update and directions ``m_hat / (sqrt(v_hat) +
    eps)`` of several tensors; each has its own step count (a parameter may have missed a
    step without gradient). Gradients are cast to the moments' dtype."""
    if not ms:
        return []
    denom, c1 = _moments_and_denominators(ms, vs, grads, steps, config)
    out = list(torch._foreach_div(list(ms), denom))
    torch._foreach_div_(out, c1)
    return out


def adam_step_(params: Sequence[Tensor], ms: Sequence[Tensor], vs: Sequence[Tensor],
               grads: Sequence[Tensor], steps: Sequence[int], config: AdamConfig, lr: float,
               weight_decay: float = 0.0, compiler: Any = None, uniform: bool = False,
               step_tensors: Sequence[Tensor] | None = None) -> None:
    """One AdamW step in place: ``p <- (1 - lr wd) p - lr m_hat / (sqrt(v_hat) + eps)``
    (bitwise ``torch.optim.AdamW(foreach=True)`` when the moments have the parameters'
    dtype). Foreach kernels per (device, dtype) of the parameters.

    ``step_tensors``: the counts ``steps`` as torch's optimizers store them (0-d float32,
    already incremented). Where they live on the parameters' device and parameters,
    gradients and moments share one dtype and are contiguous (:func:`_fusable`), the group
    runs as torch's fused AdamW kernel
    (bitwise ``torch.optim.AdamW(fused=True)``; it and the foreach step differ by float
    rounding): one dispatch instead of eight, 30 instead of 64 us for a small model's
    four bias and head tensors on a CPU.

    ``compiler``: a :class:`~curvlab.optim.compiled.StepCompiler`: the whole update of a
    (device, dtype) group runs as one compiled graph (:func:`_adam_kernel_`); ``lr`` and the
    bias corrections enter as tensors (no recompilation as they change, no host sync);
    equal to the eager step to float32 rounding (inductor fuses and reorders the scalar
    arithmetic), not bitwise. ``uniform``: the caller knows that the parameters share one
    device and dtype (the grouping is skipped: ~10 us of a small model's step on a CPU)."""
    if not params:
        return
    if uniform and compiler is None:
        _adam_step_eager_(list(params), list(ms), list(vs), list(grads), list(steps), config,
                          lr, weight_decay, step_tensors)
        return
    grouped = _group_tensors_by_device_and_dtype(
        [list(params), list(ms), list(vs), list(grads)], with_indices=True)
    for (device, dtype), ((ps, ms_, vs_, gs), idx) in grouped.items():
        st = [steps[i] for i in idx]
        if compiler is None:
            _adam_step_eager_(ps, ms_, vs_, gs, st, config, lr, weight_decay,
                              None if step_tensors is None else [step_tensors[i] for i in idx])
            continue
        b1, b2 = config.betas
        if config.bias_correction:
            c1 = [1.0 - b1 ** t for t in st]
            c2 = [(1.0 - b2 ** t) ** 0.5 for t in st]
        else:
            c1 = c2 = [1.0] * len(st)
        # the decay 1 - lr wd, per tensor -lr / c1 and c2: one transfer, 0-d views
        scal = compiler.scalars([1.0 - lr * weight_decay] + [-lr / c for c in c1] + c2,
                                device)
        kernel = compiler(_adam_kernel_, ("adam", device, dtype, len(ps)))
        kernel(ps, ms_, vs_, gs, scal[0], list(scal[1:1 + len(ps)]),
               list(scal[1 + len(ps):]), b1, b2, config.eps)


def _fusable(params: list[Tensor], ms: list[Tensor], vs: list[Tensor], grads: list[Tensor],
             step_tensors: list[Tensor], config: AdamConfig) -> bool:
    """Whether torch's fused AdamW kernel computes this (one device and dtype) group's step:
    bias-corrected, one floating dtype throughout, the step counts beside the parameters,
    and every tensor contiguous: the kernel walks the four tensors' storage in one linear
    order, so a transposed or channels-last gradient beside a contiguous parameter (or the
    reverse) would be paired entry by entry wrongly, without an error (measured: 0.06 off
    after three steps)."""
    p0 = params[0]
    return (config.bias_correction and p0.device.type in _FUSED_DEVICES
            and p0.dtype in (torch.float32, torch.float64)
            and all(t.dtype == p0.dtype and t.is_contiguous()
                    for ts in (params, ms, vs, grads) for t in ts)
            and all(s.device == p0.device for s in step_tensors))


_FUSED_DEVICES = ("cpu", "cuda") if hasattr(torch, "_fused_adamw_") else ()


def _adam_step_eager_(params: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                      grads: list[Tensor], steps: list[int], config: AdamConfig, lr: float,
                      weight_decay: float, step_tensors: list[Tensor] | None = None) -> None:
    if step_tensors is not None and _fusable(params, ms, vs, grads, step_tensors, config):
        b1, b2 = config.betas
        torch._fused_adamw_(params, grads, ms, vs, [], step_tensors, lr=lr, beta1=b1,
                            beta2=b2, weight_decay=weight_decay, eps=config.eps,
                            amsgrad=False, maximize=False)
        return
    if weight_decay:
        torch._foreach_mul_(params, foreach_scalar(params)(1.0 - lr * weight_decay))
    denom, c1 = _moments_and_denominators(ms, vs, grads, steps, config)
    same = [k for k, p in enumerate(params) if p.dtype == ms[k].dtype]
    if same:
        torch._foreach_addcdiv_([params[k] for k in same], [ms[k] for k in same],
                                [denom[k] for k in same], [-lr / c1[k] for k in same])
    for k, p in enumerate(params):
        if p.dtype != ms[k].dtype:
            p.add_((ms[k] / denom[k]).to(p.dtype), alpha=-lr / c1[k])


def _adam_kernel_(params: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                  grads: list[Tensor], decay: Tensor, neg_lr_c1: list[Tensor],
                  c2: list[Tensor], b1: float, b2: float, eps: float) -> None:
    """The compiled AdamW update (one graph): ``p <- decay p + (-lr / c1) m / (sqrt(v) / c2
    + eps)`` with ``c1 = 1 - b1^t``, ``c2 = sqrt(1 - b2^t)`` per tensor."""
    gs = [g.to(m.dtype) for g, m in zip(grads, ms)]
    torch._foreach_lerp_(ms, gs, 1.0 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
    torch._foreach_mul_(params, decay)
    for p, m, v, a, c in zip(params, ms, vs, neg_lr_c1, c2):
        p.add_((m / (v.sqrt() / c + eps) * a).to(p.dtype))


def adam_preconditioner(v: Tensor, step: int, config: AdamConfig) -> Tensor:
    """The diagonal ``P = sqrt(v / (1 - b2^t)) + eps`` the direction is divided by (what a
    monitor needs for Adam's preconditioned sharpness)."""
    c2 = (1.0 - config.betas[1] ** step) ** 0.5 if config.bias_correction else 1.0
    return v.sqrt().div_(c2).add_(config.eps)


def adam_stability_preconditioner(v: Tensor, step: int, config: AdamConfig) -> Tensor:
    """``P`` of Adam's step ``d = P^{-1} m`` with the first moment's bias correction folded
    in: ``(sqrt(v_hat) + eps) (1 - b1^t)`` (what a monitor compares with the threshold
    ``2 (1 + b1) / (1 - b1)``; as :func:`curvlab.diagnostics.stability.stability_model`
    does for torch's Adam). Coordinates whose second moment is exactly 0 never received a
    nonzero gradient (a conv bias before BatchNorm, unused embedding rows): they are not
    governed by the rule, ``P = inf`` there (``P^{-1/2} = 0`` projects them out; frozen at
    ``P = eps`` the Hessian's rounding noise there, times ``1 / eps``, dominated the
    ratio)."""
    c1 = 1.0 - config.betas[0] ** step if config.bias_correction and step > 0 else 1.0
    return adam_preconditioner(v, step, config).mul_(c1).masked_fill_(v == 0, math.inf)
