"""What the HF and Lightning monitor callbacks share: the monitor batch, pausing an
optimizer's statistics hooks during monitor evaluations, and records -> loggable scalars."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from curvlab.diagnostics.monitor import CurvatureMonitor, MonitorEvent, unwrap_optimizer
from curvlab.objective import Objective


def first_examples(dataloader: Any, n: int) -> Any:
    """A fixed monitor batch: the first ``n`` examples of the loader's dataset, collated by
    its ``collate_fn`` (indexing the dataset leaves the loader and its sampler untouched,
    and a collator that draws random numbers, e.g. for masking, draws them from a fork of
    torch's random state, so training is the same with and without the monitor)."""
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    try:
        size = len(dataset)  # type: ignore[arg-type]
        examples = [dataset[i] for i in range(min(n, size))]  # type: ignore[index]
    except (TypeError, NotImplementedError, KeyError) as err:
        raise ValueError("cannot take the monitor batch from the training set (it is not an "
                         "indexable dataset); pass batch=... to the callback") from err
    if not examples or collate is None:
        raise ValueError("the training dataloader has no examples or no collate_fn; pass "
                         "batch=... to the callback")
    with torch.random.fork_rng(devices=[]):
        return collate(examples)


@contextlib.contextmanager
def monitor_context(optimizer: Any, model: torch.nn.Module) -> Iterator[None]:
    """Around a monitor step: the optimizer's statistics hooks paused; torch's random state
    (CPU and the model's CUDA devices) forked, so nothing the monitor does moves the
    training's random stream (dropout masks); fused attention
    (``scaled_dot_product_attention``) on its math backend, whose backward can be
    differentiated again (Hessian-vector products; the flash/memory-efficient kernels'
    backward cannot)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with (paused_statistics(optimizer), torch.random.fork_rng(devices=cuda),
          sdpa_kernel([SDPBackend.MATH])):
        yield


@contextlib.contextmanager
def paused_statistics(optimizer: Any) -> Iterator[None]:
    """Stop an optimizer that records statistics from forward/backward hooks (K-FAC) from
    recording the monitor's own evaluations."""
    opt = unwrap_optimizer(optimizer)
    with opt.paused() if hasattr(opt, "paused") else contextlib.nullcontext():
        yield


def scalars(record: dict[str, Any], events: list[MonitorEvent],
            prefix: str = "curvlab/") -> dict[str, float]:
    """The finite numbers of a monitor record, and each event's value under its kind."""
    out = {f"{prefix}{k}": float(v) for k, v in record.items()
           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
           and math.isfinite(v)}
    for e in events:
        out[f"{prefix}{e.kind}"] = e.value
        for field in ("horizon", "confidence"):  # the event's forecast
            v = getattr(e, field, None)
            if v is not None and math.isfinite(v):
                out[f"{prefix}{e.kind}_{field}"] = float(v)
    return out


def event_message(event: MonitorEvent) -> str:
    """``"[severity, regime] message"`` for the logs."""
    return f"[{event.severity}, {event.regime}] {event.message}"


def make_monitor(model: torch.nn.Module, loss_fn: Any, batch: Any, optimizer: Any,
                 seed: int, kwargs: dict[str, Any], collect: Any) -> CurvatureMonitor:
    """The callback's monitor: its own random generator (seeded), so its Lanczos starts
    never draw from the global random state the training loop uses. The monitor batch's
    loss is evaluated once here (one forward), so a batch or loss the monitor cannot use
    fails before training, not at the first check."""
    with monitor_context(optimizer, model), torch.no_grad():
        Objective(model, loss_fn, batch).loss()
    kwargs = dict(kwargs)
    if "generator" not in kwargs:
        device = next(model.parameters()).device
        kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
    kwargs["callbacks"] = [*kwargs.get("callbacks", ()), collect]
    return CurvatureMonitor(model, loss_fn, batch, optimizer=optimizer, **kwargs)
