"""Hugging Face ``Trainer`` integration: curvlab optimizers and the curvature monitor.

Optimizers, through the Trainer's optimizer-factory convention (transformers >= 5: a
non-``Optimizer`` first element of ``optimizer_cls_and_kwargs`` is instantiated and called
with the model; the optimizer is then built by the Trainer, after the model is placed and
wrapped, and its state is saved and restored with the Trainer's checkpoints)::

    from curvlab.integrations import hf

    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs("muon", lr=0.02),
                      callbacks=[hf.CurvatureMonitorCallback(every=100)])

``name`` is ``"soap"``, ``"shampoo"``, ``"muon"`` or ``"kfac"`` with the parameter routing
of :func:`curvlab.integrations.build_optimizer` (Muon: hidden matrices, Conv1D included;
AdamW for embeddings, the tied head, biases and norms. K-FAC: hooks the model's layers).
``lr`` (and ``weight_decay``) must be given here: the Trainer does not pass
``TrainingArguments.learning_rate`` to an optimizer factory. Its LR scheduler still applies.
On older transformers, pass ``optimizers=(build_optimizer(model, name, lr=...), None)``.

:class:`CurvatureMonitorCallback` runs :class:`~curvlab.diagnostics.CurvatureMonitor`
after every optimizer step (``on_optimizer_step``: the gradients are still there; the
Trainer zeroes them before ``on_step_end``) on a fixed monitor batch (default: the first
``num_examples`` training examples through the Trainer's collator, passed to the model as
is; the model computes its own loss unless ``loss_fn`` is given). Its values
(``curvlab/lambda_max``, ``curvlab/lr_sharpness``, ...) and events (``curvlab/crossed``,
``curvlab/diverging``, ... with their forecast ``curvlab/<kind>_horizon`` and
``_confidence``) are added to the Trainer's logs at the step they were computed
(``state.log_history``, and the ``report_to`` integrations that run after the callback:
register it with ``trainer.callback_handler.callbacks.insert(0, callback)`` to put it
before them); event
messages go to ``logging`` and to ``log_history`` under ``curvlab/events``.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from curvlab.integrations._monitoring import (
    event_message,
    first_examples,
    make_monitor,
    monitor_context,
)
from curvlab.integrations._monitoring import scalars as _scalars
from curvlab.integrations.optimizers import _name, build_optimizer, unwrap_model

__all__ = ["CurvatureMonitorCallback", "CurvlabOptimizerFactory", "optimizer_cls_and_kwargs"]

logger = logging.getLogger(__name__)


class CurvlabOptimizerFactory:
    """The Trainer's optimizer factory: ``CurvlabOptimizerFactory()(model, name=..., **kw)``
    is :func:`curvlab.integrations.build_optimizer`."""

    def __call__(self, model: Any, name: Any = None, **kwargs: Any) -> Any:
        return build_optimizer(model, name, **kwargs)


def optimizer_cls_and_kwargs(name: Any, *, lr: float, **kwargs: Any) -> tuple[type, dict]:
    """``Trainer(optimizer_cls_and_kwargs=...)`` for a curvlab optimizer (module docstring);
    ``kwargs`` go to :func:`~curvlab.integrations.build_optimizer`."""
    _name(name)  # unknown names fail here, not at train()
    from transformers import trainer_optimizer

    if not hasattr(trainer_optimizer, "is_optimizer_factory"):
        raise RuntimeError("this transformers version has no optimizer factories; pass "
                           "Trainer(optimizers=(curvlab.integrations.build_optimizer(model, "
                           "name, lr=...), None)) instead")
    return CurvlabOptimizerFactory, {"name": name, "lr": lr, **kwargs}


class CurvatureMonitorCallback(TrainerCallback):
    """Run a :class:`~curvlab.diagnostics.CurvatureMonitor` in the Trainer (module docstring).

    Args:
        batch: the monitor batch as the collator makes it (a dict with ``labels`` for a
            model that computes its own loss), or an ``(inputs, targets)`` pair with
            ``loss_fn``. Default: the first ``num_examples`` training examples, collated.
        loss_fn: ``None`` (the model's own loss) or ``loss_fn(outputs, targets)``.
        num_examples: size of the default monitor batch.
        **monitor_kwargs: :class:`~curvlab.diagnostics.CurvatureMonitor` arguments
            (``every``, ``track_every``, ``max_hvps``, ``log_dir``, ...). Its random
            generator defaults to one seeded with ``TrainingArguments.seed``.

    The monitor's step counter follows ``state.global_step`` (checks fall on multiples of
    ``every`` also after resuming); it runs on the main process only.
    """

    def __init__(self, batch: Any = None, *, loss_fn: Any = None, num_examples: int = 16,
                 **monitor_kwargs: Any) -> None:
        self.batch, self.loss_fn, self.num_examples = batch, loss_fn, num_examples
        self.monitor_kwargs = monitor_kwargs
        self.monitor = None
        self._pending: dict[str, float] = {}
        self._messages: list[str] = []

    def _collect(self, monitor: Any, record: dict[str, Any], events: list[Any]) -> None:
        self._pending.update(_scalars(record, events))
        self._messages += [event_message(e) for e in events]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any):
        if not state.is_world_process_zero:
            return
        batch = self.batch
        if batch is None:
            batch = first_examples(train_dataloader, self.num_examples)
        self.monitor = make_monitor(unwrap_model(model), self.loss_fn, batch, optimizer,
                                    args.seed, self.monitor_kwargs, self._collect)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                          **kwargs: Any):
        if self.monitor is None:
            return
        self.monitor.step_count = state.global_step  # step() counts this update
        with monitor_context(optimizer, self.monitor.model):
            self.monitor.step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._pending or self._messages:
            control.should_log = True  # log the values at the step they belong to

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
        if not (self._pending or self._messages):
            return
        if logs is not None:
            logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
            if self._messages:
                state.log_history[-1]["curvlab/events"] = list(self._messages)
        self._pending, self._messages = {}, []

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.monitor is not None:
            self.monitor.close()
