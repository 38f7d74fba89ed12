"""Cross-check a training step in low precision against float64.

``precision_check`` runs the loss, the gradient and (optionally) one optimizer update on
copies of the model (and optimizer) in each requested dtype and in float64, and reports
relative errors ``||x_low - x_64|| / ||x_64||`` overall and per layer. Per layer it
reports the accumulated error of the layer's output in the low-precision forward pass,
of its parameter gradient and update, and its *local* error: the layer alone run in low
precision on the float64 run's input (rounded to the dtype). The local error isolates the
layer's own instability from the error it inherits; the layer is flagged when
``local_error > flag_factor * eps(dtype)``, i.e. it loses far more than the unit roundoff
of the dtype explains (a stable layer loses a few eps). The real model and optimizer are
never touched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from curvlab.losses import model_loss_parts
from curvlab.objective import call_model, logits_or_output, split_batch

__all__ = ["LayerPrecision", "PrecisionReport", "precision_check"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}


@dataclass(frozen=True)
class LayerPrecision:
    """Relative errors of one layer against float64 (NaN where not applicable)."""

    name: str
    local_error: float
    output_error: float
    grad_error: float
    update_error: float
    amplification: float  # local_error / eps(dtype)
    flagged: bool


@dataclass
class DtypeReport:
    dtype: str
    mode: str
    eps: float
    loss_error: float
    grad_error: float
    update_error: float
    layers: list[LayerPrecision] = field(default_factory=list)

    @property
    def worst_layer(self) -> LayerPrecision | None:
        finite = [layer for layer in self.layers if not math.isnan(layer.amplification)]
        return max(finite, key=lambda layer: layer.amplification) if finite else None

    @property
    def flagged(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.flagged]


@dataclass
class PrecisionReport:
    """Per-dtype reports plus the matmul precision settings in force."""

    reports: dict[str, DtypeReport]
    matmul_precision: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary: the matmul precision and, per dtype, the errors and
        the worst layer."""
        out = {"matmul_precision": self.matmul_precision, "dtypes": {}}
        for name, rep in self.reports.items():
            worst = rep.worst_layer
            out["dtypes"][name] = {
                "mode": rep.mode, "eps": rep.eps, "loss_error": rep.loss_error,
                "grad_error": rep.grad_error, "update_error": rep.update_error,
                "worst_layer": worst.name if worst else None, "flagged": rep.flagged,
                "layers": [layer.__dict__ for layer in rep.layers],
            }
        return out


def _rel(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if a is None or ref is None:
        return math.nan
    ref = ref.double()
    num = (a.double() - ref).norm()
    den = ref.norm()
    if not torch.isfinite(num):
        return math.inf
    return float(num / den) if den > 0 else float(num)


def _matmul_settings() -> dict[str, Any]:
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def _copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, clone: nn.Module
                    ) -> torch.optim.Optimizer:
    """The same optimizer class and state, over ``clone``'s parameters."""
    index = {id(p): name for name, p in model.named_parameters()}
    clone_params = dict(clone.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        try:
            mapped = [clone_params[index[id(p)]] for p in group["params"]]
        except KeyError as err:
            raise ValueError("optimizer holds parameters that are not in the model") from err
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mapped})
    try:
        new = type(optimizer)(groups)
    except TypeError as err:
        raise TypeError(f"cannot rebuild {type(optimizer).__name__} from its param_groups; "
                        "precision_check supports torch.optim-style optimizers") from err
    new.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return new


#: the seed of every dtype's run (the same Dropout masks in each)
RUN_SEED = 0


def _run(model: nn.Module, loss_fn: Any, batch: tuple[Any, torch.Tensor],
         optimizer: torch.optim.Optimizer | None, original: nn.Module, dtype: torch.dtype,
         autocast: bool) -> dict[str, Any]:
    """Loss, per-module outputs, gradients and update on a copy of ``model`` in ``dtype``."""
    param_dtype = torch.float32 if autocast else dtype
    clone = copy.deepcopy(model).to(param_dtype)
    clone.train(model.training)
    opt = _copy_optimizer(optimizer, original, clone) if optimizer is not None else None
    outputs: dict[str, torch.Tensor] = {}
    layer_inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in _leaf_modules(clone):
        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor) and len(args) == 1 and isinstance(args[0],
                                                                               torch.Tensor):
                outputs[name] = out.detach()
                layer_inputs[name] = args[0].detach()
        hooks.append(module.register_forward_hook(hook))
    inputs, targets = split_batch(batch, model_loss=loss_fn is None)

    def cast(t: Any) -> Any:
        return t.to(param_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        inputs, targets = tree_map(cast, inputs), tree_map(cast, targets)
        device = next(clone.parameters()).device
        ctx = (torch.autocast(device_type=device.type, dtype=dtype) if autocast
               else torch.autocast(device_type=device.type, enabled=False))
        # every dtype's run draws the same random numbers (Dropout masks in train mode:
        # with independent draws the float32 gradient of a tiny GPT-2 was 54% "off" its
        # float64 one); the caller's random state is left as it was
        devices = [device] if device.type == "cuda" else []
        with ctx, torch.random.fork_rng(devices=devices):
            torch.manual_seed(RUN_SEED)
            out = call_model(clone, inputs)
            # loss_fn=None: the model's own loss, computed as in training
            loss = (model_loss_parts(out)[0] if loss_fn is None
                    else loss_fn(logits_or_output(out), targets))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("precision_check needs a scalar loss: loss_fn must return one "
                             "(or, with loss_fn=None, the model must return 'loss' given the "
                             "batch's labels)")
        clone.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {k: (p.grad.detach().clone() if p.grad is not None else None)
             for k, p in clone.named_parameters()}
    update = None
    stepped = clone
    if opt is not None:  # step a copy so the returned model keeps the evaluated weights
        stepped = copy.deepcopy(clone)
        for p, q in zip(stepped.parameters(), clone.parameters()):
            p.grad = None if q.grad is None else q.grad.clone()
        opt = _copy_optimizer(opt, clone, stepped)
        opt.step()
        update = {k: p.detach() - q.detach()
                  for (k, p), q in zip(stepped.named_parameters(), clone.parameters())}
    return {"loss": loss.detach(), "outputs": outputs, "inputs": layer_inputs, "grads": grads,
            "update": update, "model": clone}


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def _local_errors(low_model: nn.Module, ref: dict[str, Any], dtype: torch.dtype,
                  autocast: bool) -> dict[str, float]:
    """Each leaf module of ``low_model`` alone on the float64 input rounded to ``dtype``,
    against the float64 module on that input. Both calls draw the same random numbers
    (``RUN_SEED``): a Dropout layer in train mode drew a new mask for the module alone and
    was flagged with ~4e6 rounding units of "error" against the forward's output."""
    errors = {}
    modules = dict(_leaf_modules(low_model))
    ref_modules = dict(_leaf_modules(ref["model"]))
    in_dtype = torch.float32 if autocast else dtype
    for name, x64 in ref["inputs"].items():
        x = x64.to(in_dtype) if x64.is_floating_point() else x64
        device = x.device
        ctx = (torch.autocast(device_type=device.type, dtype=dtype) if autocast
               else torch.autocast(device_type=device.type, enabled=False))
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            with ctx:
                torch.manual_seed(RUN_SEED)
                out = modules[name](x)
            torch.manual_seed(RUN_SEED)
            want = ref_modules[name](x64)
        errors[name] = _rel(out, want)
    return errors


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _group(tree: dict[str, torch.Tensor | None] | None) -> dict[str, torch.Tensor]:
    """Concatenate parameter tensors by owning module."""
    if tree is None:
        return {}
    out: dict[str, list[torch.Tensor]] = {}
    for k, t in tree.items():
        if t is not None:
            out.setdefault(_owner(k), []).append(t.reshape(-1).double())
    return {k: torch.cat(v) for k, v in out.items()}


def _flat(tree: dict[str, torch.Tensor | None] | None) -> torch.Tensor | None:
    if not tree:
        return None
    parts = [t.reshape(-1).double() for t in tree.values() if t is not None]
    return torch.cat(parts) if parts else None


def precision_check(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    dtypes: Sequence[str | torch.dtype] = ("bfloat16", "float32"),
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "cast",
    flag_factor: float = 16.0,
) -> PrecisionReport:
    """Relative errors of loss, gradient and optimizer update in each of ``dtypes``
    against float64, overall and per layer, on one (small) batch: an ``(inputs, targets)``
    pair or a dict batch; ``loss_fn=None`` uses the model's own loss (``output.loss``).

    ``mode="cast"`` converts the model copy to the dtype; ``mode="autocast"`` keeps
    float32 parameters and runs the forward pass under ``torch.autocast(dtype)``, as mixed
    precision training does. A layer is flagged when its local error exceeds
    ``flag_factor * eps(dtype)``. Cost: one forward/backward (and optimizer step) per
    dtype, plus one in float64; the model and optimizer passed in are not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("cast", "autocast"):
        raise ValueError(f"mode must be 'cast' or 'autocast', got {mode!r}")
    if not (isinstance(batch, Mapping) or isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("batch must be an (inputs, targets) pair or a dict batch (the model's "
                        "keyword arguments with 'labels')")
    resolved = []
    for d in dtypes:
        dt = _DTYPES.get(d) if isinstance(d, str) else d
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"dtypes: {d!r} is not one of {sorted(_DTYPES)}")
        resolved.append(dt)

    ref = _run(model, loss_fn, batch, optimizer, model, torch.float64, autocast=False)
    ref_grads, ref_updates = _group(ref["grads"]), _group(ref["update"])
    reports = {}
    for dt in resolved:
        use_autocast = mode == "autocast" and dt in (torch.bfloat16, torch.float16)
        low = _run(model, loss_fn, batch, optimizer, model, dt, autocast=use_autocast)
        eps = torch.finfo(dt).eps
        grads, updates = _group(low["grads"]), _group(low["update"])
        local = _local_errors(low["model"], ref, dt, use_autocast)
        names = list(dict.fromkeys([*ref["outputs"], *ref_grads]))
        layers = []
        for name in names:
            amp = local.get(name, math.nan) / eps
            layers.append(LayerPrecision(
                name, local_error=local.get(name, math.nan),
                output_error=_rel(low["outputs"].get(name), ref["outputs"].get(name)),
                grad_error=_rel(grads.get(name), ref_grads.get(name)),
                update_error=_rel(updates.get(name), ref_updates.get(name)),
                amplification=amp, flagged=bool(amp > flag_factor)))
        reports[str(dt).replace("torch.", "")] = DtypeReport(
            dtype=str(dt).replace("torch.", ""), mode="autocast" if use_autocast else "cast",
            eps=eps, loss_error=_rel(low["loss"], ref["loss"]),
            grad_error=_rel(_flat(low["grads"]), _flat(ref["grads"])),
            update_error=_rel(_flat(low["update"]), _flat(ref["update"])), layers=layers)
    return PrecisionReport(reports=reports, matmul_precision=_matmul_settings())
