"""PyTorch Lightning integration: the curvature monitor as a ``Callback``.

::

    from curvlab.integrations import build_optimizer
    from curvlab.integrations.lightning import CurvatureMonitorCallback

    class LitLM(L.LightningModule):
        def configure_optimizers(self):
            return build_optimizer(self.model, "muon", lr=0.02)   # or "soap", "kfac", ...

    trainer = L.Trainer(callbacks=[CurvatureMonitorCallback(every=100, model=lit.model)])

After every optimizer step (``on_train_batch_end`` when ``global_step`` advanced: Lightning
zeroes gradients before the backward pass, so the step's gradients are still there) the
callback runs :class:`~curvlab.diagnostics.CurvatureMonitor` and writes its values
(``curvlab/lambda_max``, ...) and events (``curvlab/crossed``, ``curvlab/diverging``, ...,
with their forecast ``curvlab/<kind>_horizon`` and ``_confidence``) to the Trainer's
loggers (``logger.log_metrics`` at ``global_step``); event messages also go to
``logging``. Works with ``lightning.pytorch`` (preferred) or ``pytorch_lightning``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from curvlab.integrations._monitoring import first_examples, make_monitor, monitor_context
from curvlab.integrations._monitoring import scalars as _scalars

__all__ = ["CurvatureMonitorCallback"]

logger = logging.getLogger(__name__)


class CurvatureMonitorCallback(pl.Callback):
    """Run a :class:`~curvlab.diagnostics.CurvatureMonitor` in a Lightning Trainer.

    Args:
        batch: the fixed monitor batch, passed to ``model`` as is: a dict of keyword
            arguments (with ``labels`` for a model that computes its own loss) or an
            ``(inputs, targets)`` pair for ``loss_fn``. Default: the first
            ``num_examples`` examples of the training set, collated by its DataLoader.
        loss_fn: ``None`` (the model's own loss) or ``loss_fn(outputs, targets)``.
        model: the ``nn.Module`` whose curvature is measured (default: the
            LightningModule; give the inner model when the LightningModule's ``forward``
            is not the model's, e.g. ``lit.model`` for a wrapped Hugging Face model).
        **monitor_kwargs: :class:`~curvlab.diagnostics.CurvatureMonitor` arguments
            (``every``, ``track_every``, ...); its generator defaults to one seeded with 0.

    The monitor follows ``trainer.global_step`` and runs on global rank zero only.
    """

    def __init__(self, batch: Any = None, *, loss_fn: Any = None, model: Any = None,
                 num_examples: int = 16, seed: int = 0, **monitor_kwargs: Any) -> None:
        self.batch, self.loss_fn, self.model = batch, loss_fn, model
        self.num_examples, self.seed, self.monitor_kwargs = num_examples, seed, monitor_kwargs
        self.monitor = None
        self._pending: dict[str, float] = {}
        self._seen = -1

    def _collect(self, monitor: Any, record: dict[str, Any], events: list[Any]) -> None:
        self._pending.update(_scalars(record, events))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        batch = self.batch
        if batch is None:
            batch = first_examples(trainer.train_dataloader, self.num_examples)
        self.monitor = make_monitor(self.model if self.model is not None else pl_module,
                                    self.loss_fn, batch, trainer.optimizers[0], self.seed,
                                    self.monitor_kwargs, self._collect)
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None or trainer.global_step == self._seen:
            return  # no optimizer step on this batch (gradient accumulation)
        self._seen = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.monitor.step_count = trainer.global_step - 1  # step() counts this update
        with monitor_context(trainer.optimizers[0], self.monitor.model):
            self.monitor.step(loss)
        if self._pending:  # straight to the loggers: on_step values of pl_module.log would
            for lg in trainer.loggers:  # only reach them every log_every_n_steps
                lg.log_metrics(self._pending, step=trainer.global_step)
            self._pending = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
