"""What a loss averages over: loss terms, their weights, and the normalizer.

A loss with ``reduction="mean"`` is a weighted average of *loss terms*,

    loss = sum_t c_t l_t / sum_t c_t,

and several batches reproduce one big batch only when each batch enters with weight
``n_b / N``, where ``n_b = sum_{t in b} c_t`` is the batch's *normalizer* (what torch divides
by) and ``N = sum_b n_b``. The terms and their weights ``c_t`` follow torch's definitions:

* ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class-index targets: one term per position
  (``targets.shape``), ``c_t = class_weight[y_t]`` (1 without ``weight=``) and ``c_t = 0``
  where ``y_t == ignore_index``;
* ``nn.CrossEntropyLoss`` with class-probability targets: one term per position, ``c_t = 1``;
* element-wise losses (``MSELoss``, ``L1Loss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``BCELoss``, ``BCEWithLogitsLoss``, ``KLDivLoss(reduction="mean")``, ...): one term per
  element of the targets, ``c_t = 1`` (``BCE``'s ``weight``/``pos_weight`` scale the terms but
  not the normalizer);
* ``KLDivLoss(reduction="batchmean")``: one term per sample;
* any other callable: assumed to average over the samples of the batch (one term per
  sample), the only rule that needs nothing but the batch size.

A batch whose normalizer is 0 (every target ignored) contributes exactly nothing: torch's
mean is 0/0 = NaN there, so it is skipped, not multiplied by 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["term_weights", "term_curvature_weights", "loss_normalizer", "is_known_mean_loss",
           "check_curved_in_outputs", "LossConvention",
           "ClassesLastCrossEntropyLoss",
           "match_convention", "model_loss_parts"]

_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss, nn.BCELoss,
                nn.BCEWithLogitsLoss, nn.KLDivLoss, nn.PoissonNLLLoss, nn.GaussianNLLLoss,
                nn.SoftMarginLoss, nn.MultiLabelSoftMarginLoss)


def _batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    raise TypeError("cannot infer the batch size: targets must be a batched tensor")


def is_known_mean_loss(loss_fn: Any) -> bool:
    """Whether :func:`term_weights` knows ``loss_fn``'s terms exactly (else: per sample)."""
    return isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss, *_ELEMENTWISE))


def term_weights(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """The weights ``c_t`` of the loss terms of one batch, shaped like the terms.

    Class-index targets of cross-entropy / NLL give one weight per position (``0`` where
    ignored, the class weight otherwise); element-wise losses one ``1`` per element; any
    other loss one ``1`` per sample (see the module docstring).
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and isinstance(
            targets, torch.Tensor) and not torch.is_floating_point(targets):
        valid = targets != loss_fn.ignore_index
        weight = getattr(loss_fn, "weight", None)
        if weight is None:
            return valid.to(torch.get_default_dtype())
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        return weight.to(targets.device)[safe] * valid
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # class probabilities along dim 1
        if targets.dim() < 2:
            raise ValueError("CrossEntropyLoss with probability targets needs (B, C, ...) targets")
        shape = (targets.shape[0], *targets.shape[2:])
        return torch.ones(shape, dtype=targets.dtype, device=targets.device)
    if isinstance(loss_fn, nn.KLDivLoss) and loss_fn.reduction == "batchmean":
        return torch.ones(_batch_size(targets), device=targets.device)
    if isinstance(loss_fn, _ELEMENTWISE) and isinstance(targets, torch.Tensor):
        return torch.ones(targets.shape, dtype=torch.get_default_dtype(), device=targets.device)
    return torch.ones(_batch_size(targets))


def term_curvature_weights(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """The weight ``h_t`` of each term's curvature, ``d^2 (c_t l_t) / dz_t^2 = h_t
    (diag(p_t) - p_t p_t^T)`` for cross-entropy: :func:`term_weights` except for
    ``nn.CrossEntropyLoss`` with class weights *and* label smoothing ``eps`` on class
    indices, whose term is ``(1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c)``
    (torch's definition; the normalizer stays ``sum_t w_{y_t}``), so ``h_t = (1 - eps)
    w_{y_t} + eps mean_c(w_c)`` (0 where ignored). Every ``-log p_c`` has the same Hessian
    in the logits, so only the weights differ from the unsmoothed loss."""
    c = term_weights(loss_fn, targets)
    eps = float(getattr(loss_fn, "label_smoothing", 0.0))
    weight = getattr(loss_fn, "weight", None)
    if (not isinstance(loss_fn, nn.CrossEntropyLoss) or eps == 0.0 or weight is None
            or torch.is_floating_point(targets)):
        return c
    valid = (targets != loss_fn.ignore_index).to(c.dtype)
    return (1 - eps) * c + eps * weight.to(device=c.device, dtype=c.dtype).mean() * valid


def check_curved_in_outputs(loss_fn: Any, what: str) -> None:
    """ValueError for a loss that is (piecewise) linear in the model output: its Hessian
    there is zero, so a Gauss-Newton matrix split at the model output (``what``) is zero,
    with no error (a model ending in ``LogSoftmax`` with ``NLLLoss``: GGN, K-FAC and the
    GGN diagonal were exactly 0). ``NLLLoss`` / ``KLDivLoss`` take log-probabilities, a
    linear function of them; ``L1Loss`` and the margin losses are piecewise linear."""
    linear = (nn.NLLLoss, nn.KLDivLoss, nn.L1Loss, nn.HingeEmbeddingLoss,
              nn.MultiLabelMarginLoss)
    if not (isinstance(loss_fn, linear)
            or (isinstance(loss_fn, nn.MultiMarginLoss) and loss_fn.p == 1)):
        return
    name = type(loss_fn).__name__
    hint = (" End the model at the logits z and use nn.CrossEntropyLoss: NLLLoss of "
            "log_softmax(z) is CrossEntropyLoss of z, and KLDivLoss of log_softmax(z) against "
            "probabilities t is CrossEntropyLoss(z, t) up to a constant."
            if isinstance(loss_fn, (nn.NLLLoss, nn.KLDivLoss)) else
            " Use the Hessian, the empirical Fisher, or a smooth loss (nn.HuberLoss, "
            "nn.SmoothL1Loss).")
    raise ValueError(f"{what}: {name} is (piecewise) linear in the model output, so its "
                     f"Hessian there, and the {what}, is zero.{hint}")


def loss_normalizer(loss_fn: Any, targets: Any) -> float:
    """``n_b = sum_t c_t``: what ``loss_fn(outputs, targets)`` with ``reduction="mean"``
    divides the summed terms by (number of valid targets, sum of their class weights,
    number of elements, or the batch size for an unknown loss)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor to weight the batch, got "
                        f"{type(targets).__name__}")
    return float(term_weights(loss_fn, targets).sum())


# ---- losses the model computes itself (loss_fn=None) -------------------------------------

@dataclass(frozen=True)
class LossConvention:
    """How a model that computes its own loss turns its logits and labels into it: the
    standard loss ``loss_fn`` applied to ``prediction(logits)`` and ``target(labels)``.

    Hugging Face heads use four: causal language models shift the labels by one
    (``logits[:, :-1]`` predicts ``labels[:, 1:]``), masked-LM / token- and sequence-
    classification heads do not, all with cross-entropy ignoring ``-100`` and averaging over
    the remaining tokens; single-output regression heads use MSE, multi-label heads
    ``BCEWithLogitsLoss``. Logits keep their samples first and move the classes to dim 1
    (``(B, C, T)``), the layout ``nn.CrossEntropyLoss`` reads, so per-sample machinery
    (empirical Fisher, exact diagonals) still sees one row per input sequence.
    """

    name: str
    loss_fn: nn.Module
    prediction: Callable[[torch.Tensor], torch.Tensor]
    target: Callable[[torch.Tensor], torch.Tensor]


def _classes_to_dim1(logits: torch.Tensor) -> torch.Tensor:
    return logits.movedim(-1, 1) if logits.dim() > 2 else logits


class ClassesLastCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` on ``(B, C, d...)`` inputs with class-index targets,
    evaluated with the classes moved back last and the positions flattened, ``(N, C)``
    against ``(N,)``: the same value (mean, sum and ignored targets are defined over
    positions), but torch's kernels on the ``(B, C, T)`` view of ``(B, T, C)`` logits read
    the classes with a stride and cost ~2x more (gradient and double backward;
    ``benchmarks/bench_hf.py``). The loss of the model-loss conventions."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if (input.dim() > 2 and self.reduction != "none"
                and not torch.is_floating_point(target)):
            input = input.movedim(1, -1).reshape(-1, input.shape[1])
            target = target.reshape(-1)
        return super().forward(input, target)


def _float32_if_16bit(z: torch.Tensor) -> torch.Tensor:
    """16-bit logits in float32, as Hugging Face's language-model losses take them
    (``logits.float()`` in ``ForCausalLMLoss``, ``ForMaskedLMLoss``, ...)."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _conventions(ignore_index: int = -100) -> list[LossConvention]:
    ce = ClassesLastCrossEntropyLoss(ignore_index=ignore_index)
    return [
        LossConvention("causal-lm (labels shifted by one, cross-entropy, ignore -100)", ce,
                       lambda z: _classes_to_dim1(_float32_if_16bit(z[:, :-1])),
                       lambda y: y[:, 1:]),
        LossConvention("cross-entropy on labels (ignore -100)", ce,
                       lambda z: _classes_to_dim1(_float32_if_16bit(z)), lambda y: y),
        LossConvention("regression (MSE)", nn.MSELoss(),
                       lambda z: z.squeeze(-1) if z.shape[-1] == 1 else z, lambda y: y),
        LossConvention("multi-label (BCEWithLogitsLoss)", nn.BCEWithLogitsLoss(),
                       lambda z: z, lambda y: y),
    ]


def model_loss_parts(output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(loss, logits)`` of a model output: a ``ModelOutput`` / dict with ``"loss"`` and
    ``"logits"`` keys (either may be missing: None), or a tensor (the logits)."""
    if isinstance(output, torch.Tensor):
        return None, output
    if isinstance(output, Mapping):
        return output.get("loss"), output.get("logits")
    return getattr(output, "loss", None), getattr(output, "logits", None)


def match_convention(output: Any, labels: torch.Tensor) -> LossConvention:
    """The convention that reproduces the model's own ``output.loss`` from its logits and
    ``labels`` (checked numerically: relative tolerance 1e-5, or twice the rounding unit of
    16-bit logits).

    Raises ValueError naming what is missing or what was tried, so the caller can pass an
    explicit ``loss_fn`` instead of getting a silently different quantity.
    """
    loss, logits = model_loss_parts(output)
    if loss is None or logits is None:
        raise ValueError(
            "loss_fn=None needs a model that returns its own loss and logits (an output with "
            "'loss' and 'logits', as Hugging Face models do when the batch has 'labels'); "
            f"got {type(output).__name__} without "
            f"{' and '.join(k for k, v in (('loss', loss), ('logits', logits)) if v is None)}"
            "; pass loss_fn explicitly")
    if not isinstance(labels, torch.Tensor):
        raise ValueError("loss_fn=None needs the labels in the batch (a 'labels' tensor)")
    loss = loss.detach().reshape(())
    logits = logits.detach()
    if not bool(torch.isfinite(loss)):
        bad = "" if bool(torch.isfinite(logits).all()) else (
            f" (its logits hold {int((~torch.isfinite(logits)).sum())} non-finite values)")
        raise ValueError(f"loss_fn=None: the model's own loss on this batch is "
                         f"{float(loss)}{bad}, so its convention cannot be read from it; check "
                         "the model on this batch (dtype, attention mask) or pass loss_fn")
    # relative tolerances: Hugging Face computes its language-model losses in float32
    # whatever the model's dtype (as the conventions do), but e.g. sequence-classification
    # losses in the logits' dtype, which for 16-bit logits differs by that dtype's rounding:
    # the loose tolerance is tried only if no convention matches the tight one, and its
    # match must leave every other convention more than 3x the tolerance away
    tols = [1e-5]
    if logits.dtype in (torch.float16, torch.bfloat16):
        tols.append(2 * torch.finfo(logits.dtype).eps)
    tried, values = [], []
    with torch.no_grad():
        for conv in _conventions():
            regression = isinstance(conv.loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss))
            if regression != torch.is_floating_point(labels):
                continue
            try:
                z, y = conv.prediction(logits), conv.target(labels)
                if regression and z.shape != y.shape:
                    continue
                value = conv.loss_fn(z, y.to(z.dtype) if regression else y)
            except (RuntimeError, ValueError, IndexError):
                continue
            tried.append(f"{conv.name}: {float(value):.6g}")
            if value.shape == ():
                values.append((conv, value))
    rel = [(conv, abs(float(value) - float(loss)) / max(abs(float(loss)), 1e-30))
           for conv, value in values]
    matches: list[LossConvention] = []
    for tier, tol in enumerate(tols):
        matches = [conv for conv, r in rel if r <= tol]
        if tier > 0 and len(matches) == 1 and any(
                conv is not matches[0] and r <= 3 * tol for conv, r in rel):
            matches = [conv for conv, r in rel if r <= 3 * tol]  # too close to tell apart
        if matches:
            break
    if len(matches) == 1:
        return matches[0]
    if matches:
        coarse = (" (its 16-bit loss is too coarse to tell them apart on this batch)"
                  if len(tols) > 1 and not any(r <= tols[0] for _, r in rel) else "")
        raise ValueError(
            f"loss_fn=None: the model's own loss {float(loss):.6g} is matched by several loss "
            f"conventions ({'; '.join(tried)}){coarse}; pass loss_fn (and targets) explicitly")
    raise ValueError(
        f"loss_fn=None: the model's own loss {float(loss):.6g} matches none of the loss "
        f"conventions curvlab knows ({'; '.join(tried) or 'none applied to these shapes'}); "
        "pass loss_fn (and targets) explicitly")
