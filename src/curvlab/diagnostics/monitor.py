"""A curvature monitor for any PyTorch training loop.

Two lines::

    monitor = CurvatureMonitor(model, loss_fn, batch=(X[:256], y[:256]), optimizer=opt)
    ...
    opt.step(); monitor.step(loss)          # inside the loop, after the optimizer step

What it measures. Every ``track_every`` steps: the loss, the gradient norm, the relative
update size ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||`` (a parameter snapshot is taken
the step before) and the parameter norm ``||theta_{t-1}||`` (AdamW at too high a learning
rate on a tiny GPT-2: the norm, falling under weight decay for 500 steps, turned and grew
70% in the 50 steps before the loss spiked; the output logits grew only with the spike).
At each *check*: the optimizer's stability ratio on a fixed *monitor batch* (so
successive checks see the same function), the loss there (``check_loss``), the largest
output magnitude (``output_max``: the logits of a classifier or language model, from the
forward the check runs anyway) and how many gradients the preconditioner averages
(``preconditioner_samples``). The optimizer's rule comes from
:func:`~curvlab.diagnostics.stability.stability_model` (wrappers unwrapped; curvlab's
optimizers declare theirs; torch's SGD / Adam family / RMSprop / Adagrad are known): the
step is stable on the local quadratic iff ``lr x lambda_max(P^{-1/2} H P^{-1/2}) <
threshold`` with ``P`` the optimizer's own preconditioner (identity for SGD: the ratio is
``lr_sharpness``; else ``lr_preconditioned_sharpness``), recorded as ``sharpness``
(``lambda_max`` of the plain Hessian too with ``plain_sharpness=True``). Eigenvalues come
from Lanczos warm-started from the previous check's top two Ritz vectors, within
``max_hvps`` Hessian-vector products; a check reports its residual and is not called
converged while another Ritz value lies within the
tolerance band of the top one (it may be the top eigenvalue the warm start missed).

When it checks. At steps 1, 4, 16, ... below ``every`` (fast blow-ups happen early), then
every ``every`` steps; sooner when a forecast crossing is near (at least four checks before
it) and, above the threshold, twice as often after each check that saw both the ratio and
the monitor-batch loss rise (back to ``every`` once they stop), at the step after a
suspicious check (ratio beyond the threshold and the loss at a new high: confirm or clear
it at once): frequent checks only while something is happening, and at the step after a
gradient-norm or update-size jump; when that check finds the ratio beyond the edge, the
interval starts over from 1 and doubles back to ``every`` (``adaptive=False``: exactly
every ``every`` steps).

Regimes (``record["regime"]`` and every event's ``regime``):

* ``"stable"``: ratio below ``rearm`` x threshold; ``"sharpening"`` when its trend is
  forecast to reach the threshold within ``horizon`` steps.
* ``"edge_of_stability"``: ratio at or above ``rearm`` x threshold but self-stabilizing:
  the sharpness is pulled back or the monitor-batch loss keeps falling. Gradient descent
  and adaptive methods train there for long stretches while the loss falls (Cohen et al.,
  ICLR 2021; "Adaptive gradient methods at the edge of stability", 2022), so this is not a
  warning.
* ``"runaway"``: at ``confirm`` consecutive checks, the ratio above the threshold and
  either the monitor-batch loss at a new high over the last ``window`` checks (at the edge
  of stability it fluctuates but trends down, below its earlier values) with the ratio
  *not* pulled back (within ``tol``), or the loss above its value at the first check (all
  progress lost) and either at a new high or the ratio not pulled back (an adaptive
  preconditioner can pull the ratio back while the loss still explodes; after a spike the
  loss oscillates far above where training was, below the spike's peak): the dynamics
  failed to self-stabilize. A suspicious check is
  followed by another at the next step; when the loss, on its observed growth (the
  blow-up forecast below, which also uses the training losses recorded since the
  previous checks), reaches 10x its first value before that next check, the first
  suspicious check is runaway already (no time to confirm).
* ``"unsettled"``: the optimizer's preconditioner averages fewer than ``settle_samples``
  gradients (Adam's first ~10 steps). The rule freezes ``P``; while one gradient is a large
  part of ``v`` a growing oscillation raises ``P`` at once, and the ratio of healthy AdamW
  runs measured 70-80000 x the threshold there. The ratio is recorded, not forecast from
  and not reported as a crossing; only a loss that blows up before the next check (below)
  makes it runaway.
* ``"progress_lost"``: the monitor-batch loss is back at its value at the start (within
  10% of the progress made) after training had lowered it by at least 10%, whatever the
  ratio, once the preconditioner is settled (AdamW at lr 0.1 on the tiny GPT-2 bounced
  back at step 4, then trained): SGD with momentum warmed up too fast catapults a CNN
  into a flat region at chance level (loss 0.16 back to 2.3 = ln 10, lr x sharpness 0.2
  against 3.8) thousands of steps before the loss explodes.
* ``"nonfinite"``: parameters, loss, gradients or curvature are NaN / inf.

Events (``monitor.events``, logging, the JSONL file, TensorBoard, callbacks) carry
``regime``, ``severity`` and a forecast: ``predicted_step``, ``horizon`` (steps ahead)
and ``confidence``:

* ``"approaching"``: the ratio's least-squares trend over the last ``window``
  checks reaches the threshold within ``horizon`` steps even with the slope at its lower
  ``confidence`` bound (:func:`forecast_crossing`); ``confidence`` is the probability of a
  crossing within the horizon under that fit (Student t). Reaching the edge of stability
  by sharpening is what healthy training does: information. When the rise is driven by
  the learning-rate schedule (the lr grew over the window and accounts for at least half
  of the ratio's log-rise), it is a warning: self-stabilization lowers the sharpness, it
  cannot undo a schedule that pushes ``lr`` past ``threshold / sharpness``.
* ``"crossed"``: the ratio passed the threshold (regime edge of stability until proven
  otherwise); information, or a warning when driven by the schedule (as above).
* ``"progress_lost"`` (warning): the regime above; re-armed once the loss is back below
  half the progress.
* ``"diverging"`` (warning): the runaway regime; the forecast is the step at which the
  monitor-batch loss, on its current exponential trend, exceeds 10x its value at the first
  check.
* ``"nonfinite"`` (error): NaN / inf parameters, loss, gradient or curvature. The monitor
  never raises into the training loop: a failing check becomes an event (``"nonfinite"``,
  or ``"check_failed"`` with the error), and after a non-finite event the monitor stops
  itself (``stop_on_nonfinite``, default) or keeps going.
* ``"grad_norm_jump"`` / ``"update_ratio_jump"`` (info): above ``jump_factor`` times their
  running (EMA) level, after ``jump_warmup`` records.

Each kind fires once per episode and re-arms when the ratio falls back below ``rearm`` of
the threshold (or the jumping quantity returns to its level). ``monitor.warnings`` are the
events of severity warning or error.

Cost is measured: ``monitor.overhead`` is the fraction of wall time since the first
``step`` spent inside the monitor.

Optional metrics of numerical trust:

* ``quadratic_fit=True``: each check also records ``rho``, how well the local quadratic
  model explains the last optimizer update ``d = theta_t - theta_{t-1}`` (a parameter
  snapshot is taken the step before each check). With ``f``, ``g``, ``H`` at ``theta_t`` on
  the monitor batch (the gradient graph the check builds anyway),
  ``rho = (f(theta_t) - f(theta_{t-1})) / (g.d - d.H d / 2)``: the actual loss change over
  the second-order Taylor prediction (Nocedal & Wright, eq. 4.4, expanded at the new
  point). Cost: one HVP and one forward per check. It is 1 on a quadratic; far from 1 the
  step is outside the region where curvature-based step sizes and damping can be trusted.
* ``precision_every=N``: every ``N`` steps, :func:`~curvlab.diagnostics.precision_check`
  on the monitor batch (with the optimizer, if given) in ``precision_dtypes``; its errors
  against float64, worst and flagged layers go to ``monitor.precision`` and the JSONL.
  Cost: one forward + backward (+ optimizer step on copies) per dtype plus one in float64.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from curvlab.autodiff import hvp_fn
from curvlab.diagnostics.precision import precision_check
from curvlab.diagnostics.stability import (
    preconditioned_operator,
    stability_model,
    unwrap_optimizer,
)
from curvlab.linalg.krylov import EigenResult, lanczos
from curvlab.linops.hessian import HessianOperator
from curvlab.objective import is_batched, sample_rows
from curvlab.optim.stability import StabilityModel

__all__ = ["CurvatureMonitor", "MonitorEvent", "forecast_crossing", "linear_trend",
           "unwrap_optimizer"]

log = logging.getLogger(__name__)

SEVERITY = {"diverging": "warning", "progress_lost": "warning", "nonfinite": "error",
            "check_failed": "error"}


@dataclass
class MonitorEvent:
    """An event raised by the monitor (see the module docstring for the kinds).

    ``predicted_step`` / ``horizon`` / ``confidence``: the event's forecast (the crossing
    step of an ``"approaching"`` event, the blow-up step of a ``"diverging"`` one, else
    the current crossing forecast of the stability ratio, or None when there is none);
    ``horizon = predicted_step - step``; ``regime`` what the monitor saw; ``severity``
    ``"info"``, ``"warning"`` or ``"error"``."""

    step: int
    kind: str
    metric: str
    value: float
    threshold: float
    message: str
    predicted_step: float | None = None
    horizon: float | None = None
    confidence: float | None = None
    regime: str = ""
    severity: str = "info"


@dataclass
class LinearTrend:
    """Ordinary least squares ``v ~ a + b s``: ``slope`` b, its standard error ``se``
    (inf with fewer than 3 points), the fitted value at the last step, and ``dof``."""

    slope: float
    se: float
    last_step: float
    fitted_last: float
    dof: int

    def prob_slope_above(self, value: float) -> float:
        """P(true slope > value) under the fit (Student t with ``dof`` degrees of freedom)."""
        if self.dof < 1 or not math.isfinite(self.se):
            return 0.5 if self.slope == value else float(self.slope > value)
        if self.se == 0:
            return float(self.slope > value)
        from scipy.stats import t

        return float(t.cdf((self.slope - value) / self.se, self.dof))


def linear_trend(steps: Iterable[float], values: Iterable[float]) -> LinearTrend | None:
    """The least-squares line through ``(steps, values)``; None with fewer than two distinct
    steps or non-finite values."""
    s = np.asarray(list(steps), dtype=float)
    v = np.asarray(list(values), dtype=float)
    if len(s) < 2 or np.ptp(s) == 0 or not (np.isfinite(s).all() and np.isfinite(v).all()):
        return None
    slope, intercept = np.polyfit(s, v, 1)
    se = math.inf
    if len(s) > 2:
        resid = v - (intercept + slope * s)
        se = math.sqrt(float(resid @ resid) / (len(s) - 2)
                       / float(((s - s.mean()) ** 2).sum()))
    return LinearTrend(float(slope), se, float(s[-1]), float(intercept + slope * s[-1]),
                       len(s) - 2)


def forecast_crossing(steps: Iterable[float], values: Iterable[float], threshold: float,
                      confidence: float = 0.0) -> float | None:
    """The step at which the least-squares line through ``(steps, values)`` reaches
    ``threshold``; None when the trend is flat or falling.

    With ``confidence = p > 0`` the slope is replaced by its one-sided lower ``p``
    confidence bound ``b - t_{p, m-2} se(b)`` (ordinary least squares, Student t) and the
    line is anchored at the fitted value of the last point: a conservative (later) crossing
    step, None unless the rise is significant. Noise in short windows then does not turn
    into confident forecasts.
    """
    tr = linear_trend(steps, values)
    if tr is None or not math.isfinite(threshold):
        return None
    if confidence > 0:
        if tr.dof < 1:
            return None
        from scipy.stats import t

        low = tr.slope - float(t.ppf(confidence, tr.dof)) * tr.se
        if not low > 0:
            return None
        return float(tr.last_step + (threshold - tr.fitted_last) / low)
    if not tr.slope > 0:
        return None
    return float(tr.last_step + (threshold - tr.fitted_last) / tr.slope)


class _RecordingHessian(HessianOperator):
    """The Hessian of the single monitor batch that also keeps the loss, gradient and the
    largest output magnitude of the graph it records (for ``rho`` without a second
    forward/backward at the same point)."""

    loss: torch.Tensor | None = None
    grad: dict[str, torch.Tensor] | None = None
    output_max: torch.Tensor | None = None

    def refresh(self) -> None:
        super().refresh()
        self.loss = self.grad = self.output_max = None

    def release(self) -> None:
        """Drop the recorded graph, the loss, gradient and parameter copy between checks."""
        self._product = None
        self.loss = self.grad = self.output_max = None
        self.point = {}

    def _batch_product(self, inputs: Any, targets: torch.Tensor):
        obj = self.objective

        def record_output(module: Any, args: Any, out: Any) -> None:
            logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if isinstance(logits, torch.Tensor) and logits.is_floating_point():
                self.output_max = logits.detach().abs().amax()

        hook = obj.model.register_forward_hook(record_output)
        try:
            with obj.mode():
                loss, grad, product = hvp_fn(lambda p: obj.batch_loss(p, inputs, targets),
                                             self.point)
        finally:
            hook.remove()
        self.loss, self.grad = loss, grad
        return product


@dataclass
class _Tracker:
    """Stability-ratio series for one sharpness kind with its warning state."""

    name: str
    threshold: float
    steps: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    suspicious: int = 0
    unsettled: bool = False
    best_loss: float = math.inf
    armed: dict[str, bool] = field(default_factory=lambda: {"approaching": True,
                                                            "crossed": True,
                                                            "diverging": True,
                                                            "progress_lost": True})


def _batch_statistics(model: Any) -> bool:
    """Whether ``model`` holds a BatchNorm layer in training mode (normalizing by the
    statistics of the batch)."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


def _sample_rows(data: Any, size: int, generator: torch.Generator | None) -> Any:
    """The same random ``size`` rows of every batched tensor of ``(inputs, targets)`` (the
    inputs a tensor, a tuple or a dict of them) or of a dict batch."""
    leaves = [t for t in tree_flatten(data)[0] if is_batched(t)]
    if not leaves or not isinstance(data, (Mapping, tuple, list)) or (
            not isinstance(data, Mapping) and len(data) != 2):
        raise TypeError("data must be an (inputs, targets) pair of tensors (inputs may be a "
                        "dict or tuple of tensors) or a dict of tensors")
    idx = torch.randperm(leaves[0].shape[0], generator=generator)[:size]
    return sample_rows(data if isinstance(data, Mapping) else tuple(data), idx)


class CurvatureMonitor:
    """Track curvature and stability during training (see the module docstring).

    Args:
        model: the ``nn.Module`` being trained.
        loss_fn: ``loss_fn(outputs, targets)`` (a mean; a summing loss needs
            ``train_batch_size``), or None when the model computes its own loss (Hugging
            Face models; see :class:`curvlab.Objective`).
        batch: the fixed monitor batch: ``(inputs, targets)`` or a dict batch.
            Alternatively give ``data`` (one ``(inputs, targets)`` pair of tensors or one
            dict of tensors) and ``batch_size`` to sample rows once with ``generator``.
        optimizer: the optimizer (its stability rule, learning rate and preconditioner
            through :func:`~curvlab.diagnostics.stability.stability_model`; framework
            wrappers are unwrapped). Without it pass ``lr`` (gradient-descent rule).
        every: steps between curvature checks once past the early checks (module
            docstring). A check costs about as much as 5-10 training steps (building the
            gradient graph on the monitor batch, then a few warm-started HVPs per
            eigenvalue; the first check, from a random start, up to ``max_hvps``): with the
            default 200 the monitor added 7-8% wall time to 2000 AdamW steps of a tiny
            GPT-2 (``benchmarks/bench_monitor_overhead.py``, under load).
        track_every: steps between loss / gradient-norm / update-size records.
        max_hvps: Hessian-vector products allowed per eigenvalue computation.
        tol: Lanczos relative residual tolerance. It bounds the relative error of the
            top Ritz value as an eigenvalue (see :mod:`curvlab.linalg.krylov`); 3% is ample
            for a stability threshold.
        window, horizon, confidence, rearm: forecast and warning settings (module
            docstring); ``horizon`` is in steps and defaults to ``30 * every``.
        min_ratio: an ``"approaching"`` event needs the ratio at ``min_ratio`` x threshold.
        confirm: consecutive suspicious checks (ratio and loss rising beyond the
            threshold) that make the runaway regime.
        settle_samples: the preconditioner is settled once its statistics average this
            many gradients (:attr:`~curvlab.optim.stability.StabilityModel.preconditioner_samples`;
            Adam: ``(1 - b2^t) / (1 - b2)``, i.e. ``t`` early on); before, the regime is
            ``"unsettled"`` (module docstring).
        adaptive: check early and more often when a crossing is near or the ratio and the
            loss rise beyond the threshold (module docstring); False checks exactly every
            ``every`` steps.
        stop_on_nonfinite: after a ``"nonfinite"`` event, stop checking (True) or keep
            going (events re-arm once everything is finite again).
        plain_sharpness: also compute ``lambda_max`` of the plain Hessian when the rule is
            preconditioned (None: only when it is the governing ratio; each eigenvalue is a
            separate Lanczos run, so this doubles a preconditioned check's HVPs). Every
            check records the governing one as ``sharpness``.
        jump_factor, jump_warmup: jump detection (a value above ``jump_factor`` times its
            EMA, after ``jump_warmup`` records of it).
        smoothing: EMA factor for the smoothed series (``s <- a s + (1 - a) x``).
        log_dir: if given, writes ``monitor.jsonl`` there (and TensorBoard scalars when
            the ``tensorboard`` package is installed).
        callbacks: callables ``cb(monitor, record: dict, events: list[MonitorEvent])``
            called after every check and after every event.
        quadratic_fit: also record ``rho`` of the last update at each check (module
            docstring; one extra HVP and one forward per check).
        precision_every: if given, run a precision check every this many steps.
        precision_dtypes: dtypes compared against float64 by the precision check.
        train: evaluate the monitor batch in train mode (:class:`curvlab.Objective`; one
            fixed Dropout mask). None (default): True when the model holds a BatchNorm
            layer in training mode, else eval mode. Batch statistics make the trained
            function invariant to shifts before the normalization (a conv bias before
            BatchNorm); with the running statistics of eval mode those directions have
            curvature that training never sees, and an Adam-like preconditioner, whose
            ``v`` there is rounding noise, scales it by ~``1 / eps`` (measured: ratio
            4e3 x the healthy value on a small conv + BatchNorm net).
        train_batch_size: samples per training batch, required with a summing loss
            (``reduction="sum"``): the training loss is then a sum over that many samples,
            and the monitor batch's Hessian and loss are multiplied by ``train_batch_size /
            (its samples)`` so that ratios, thresholds and losses are the training loss's
            (a mean loss needs no scale: its curvature does not grow with the batch).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None, batch: Any = None, *,
                 data: Any = None, batch_size: int = 256,
                 optimizer: Any = None, lr: float | None = None,
                 every: int = 200, track_every: int = 20, max_hvps: int = 20,
                 tol: float = 3e-2, window: int = 5,
                 horizon: int | None = None, confidence: float = 0.9,
                 min_ratio: float = 0.5, rearm: float = 0.8, confirm: int = 2,
                 settle_samples: float = 10.0,
                 adaptive: bool = True, stop_on_nonfinite: bool = True,
                 plain_sharpness: bool | None = None,
                 jump_factor: float = 5.0, jump_warmup: int = 5, smoothing: float = 0.8,
                 log_dir: str | os.PathLike | None = None,
                 callbacks: Iterable[Callable] = (), params: Any = None,
                 generator: torch.Generator | None = None, quadratic_fit: bool = False,
                 precision_every: int | None = None,
                 precision_dtypes: tuple[str, ...] = ("bfloat16", "float32"),
                 train: bool | None = None, train_batch_size: int | None = None) -> None:
        if optimizer is None and lr is None:
            raise ValueError("pass optimizer=... (or lr=... for a hand-written update)")
        summing = getattr(loss_fn, "reduction", "mean") == "sum"
        if summing and train_batch_size is None:
            raise ValueError(
                "loss_fn sums over samples (reduction='sum'): its Hessian on the monitor batch "
                "grows with the batch's size, so its stability ratio is not the training "
                "loss's; pass train_batch_size= (the samples per training batch) and the "
                "monitor scales its batch's curvature and loss to a training batch")
        if train_batch_size is not None and not (summing and isinstance(train_batch_size, int)
                                                 and train_batch_size >= 1):
            raise ValueError(f"train_batch_size (a positive int) is for a loss_fn with "
                             f"reduction='sum', got {train_batch_size!r} with "
                             f"{'a summing' if summing else 'a non-summing'} loss_fn")
        self.train_batch_size = train_batch_size
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        for name, value in (("every", every), ("track_every", track_every),
                            ("max_hvps", max_hvps), ("window", window), ("confirm", confirm)):
            if not isinstance(value, int) or value < (2 if name == "window" else 1):
                raise ValueError(f"{name} must be a positive int (window >= 2), got {value!r}")
        if batch is None:
            if data is None:
                raise ValueError("pass batch=(inputs, targets) or a dict batch, or data=... "
                                 "and batch_size=...")
            batch = _sample_rows(data, batch_size, generator)
        self.model, self.loss_fn, self.batch, self.params = model, loss_fn, batch, params
        self.train = (_batch_statistics(model) if train is None else bool(train))
        self.optimizer, self._lr = optimizer, lr
        self.every, self.max_hvps, self.tol = every, max_hvps, tol
        self.track_every = track_every
        self.window, self.min_ratio, self.rearm = window, min_ratio, rearm
        self.confirm, self.adaptive = confirm, bool(adaptive)
        if not settle_samples >= 0:
            raise ValueError(f"settle_samples must be >= 0, got {settle_samples!r}")
        self.settle_samples = float(settle_samples)
        self.plain_sharpness = plain_sharpness
        self.stop_on_nonfinite, self.stopped = bool(stop_on_nonfinite), False
        self.horizon = 30 * every if horizon is None else horizon
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence must be in [0, 1), got {confidence!r}")
        self.confidence = confidence
        self.jump_factor, self.jump_warmup, self.smoothing = jump_factor, jump_warmup, smoothing
        self.callbacks = list(callbacks)
        self.generator = generator
        if precision_every is not None and (not isinstance(precision_every, int)
                                            or precision_every < 1):
            raise ValueError(f"precision_every must be a positive int or None, got "
                             f"{precision_every!r}")
        self.quadratic_fit, self.precision_every = bool(quadratic_fit), precision_every
        self.precision_dtypes = tuple(precision_dtypes)
        self.precision: list[dict[str, Any]] = []
        self._check_prev: dict[str, torch.Tensor] | None = None
        self._check_prev_step = -1
        self.step_count = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.smoothed: dict[str, list[tuple[int, float]]] = {}
        self.events: list[MonitorEvent] = []
        self.checks: list[dict[str, Any]] = []
        self.monitor_time = 0.0
        self._t0: float | None = None
        self._prev: list[torch.Tensor] | None = None
        self._prev_step = -1
        self._ema: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._jump_armed: dict[str, bool] = {}
        self._nonfinite_armed = True
        self._vec: dict[str, torch.Tensor] = {}
        self._op: _RecordingHessian | None = None
        self._forecast: tuple[float | None, float | None, float | None] = (None, None, None)
        self.regime = "stable"
        self._interval = every
        self._watch = False  # the next check was called by a jump of a cheap signal
        self._next_check = (1 if self.adaptive and every > 1 else every)
        self._last_check = 0
        # the stability ratio that governs the optimizer: lr x lambda_max for (momentum)
        # SGD, lr x the preconditioned sharpness in the optimizer's own preconditioner
        self.stability = (stability_model(optimizer) if optimizer is not None
                          else StabilityModel("gd", float(lr), 2.0, None, "lr given, no optimizer"))
        name = ("lr_preconditioned_sharpness" if self.stability.preconditioned
                else "lr_sharpness")
        self._trackers = {name: _Tracker(name, self.stability.threshold)}
        self._jsonl = None
        self._tb = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = open(os.path.join(log_dir, "monitor.jsonl"), "a")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; writing JSONL only")
            else:
                self._tb = SummaryWriter(log_dir)

    # ---- public ------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The learning rate of the stability rule (the optimizer's current ``lr``)."""
        return float(self.stability.lr) if self.optimizer is not None else float(self._lr)

    @property
    def thresholds(self) -> dict[str, float]:
        """The warned stability ratio(s) and their thresholds, e.g. ``{"lr_sharpness": 2}``."""
        return {name: tr.threshold for name, tr in self._trackers.items()}

    @property
    def warnings(self) -> list[MonitorEvent]:
        """The events of severity ``"warning"`` or ``"error"`` (module docstring)."""
        return [e for e in self.events if e.severity != "info"]

    @property
    def overhead(self) -> float:
        """Fraction of wall time since the first ``step`` spent in the monitor."""
        if self._t0 is None:
            return 0.0
        total = time.perf_counter() - self._t0
        return self.monitor_time / total if total > 0 else 0.0

    @property
    def hvps_per_check(self) -> float:
        """Mean Hessian-vector products per check."""
        n = [c["num_hvps"] for c in self.checks]
        return float(np.mean(n)) if n else 0.0

    def step(self, loss: Any = None) -> list[MonitorEvent]:
        """Record one training step (call after ``optimizer.step()``); every
        ``track_every`` steps record the loss, gradient norm and update size, at check
        steps also compute curvature. Returns the events this step raised; never raises
        on non-finite values (they become ``"nonfinite"`` events)."""
        start = time.perf_counter()
        if self._t0 is None:
            self._t0 = start
        self.step_count += 1
        if self.stopped:
            self.monitor_time += time.perf_counter() - start
            return []
        if self.step_count > self._next_check:  # the step counter was moved (resume)
            self._next_check = self._following_check(self.step_count - 1)
        checked = self.step_count == self._next_check
        tracked = self.step_count % self.track_every == 0
        precision = bool(self.precision_every) and self.step_count % self.precision_every == 0
        events: list[MonitorEvent] = []
        if loss is not None:
            value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            if not math.isfinite(value):
                events += self._nonfinite("loss", value)
            elif tracked or checked:
                self._record("loss", value)
        if self.stopped:
            self.monitor_time += time.perf_counter() - start
            return events
        if not (tracked or checked or precision):
            if (self.step_count + 1) % self.track_every == 0:
                self._snapshot()
            self._before_next()
            self.monitor_time += time.perf_counter() - start
            return events
        if tracked:
            events += self._cheap_metrics()
        if checked and not self.stopped:
            events += self.check()
        if precision and not self.stopped:
            try:
                self.check_precision()
            except (RuntimeError, ValueError, ArithmeticError) as err:
                log.warning("step %d: precision check failed: %s", self.step_count, err)
        self._before_next()
        self.monitor_time += time.perf_counter() - start
        return events

    def _before_next(self) -> None:
        """Snapshots the next step needs: the parameters before the next check (``rho``),
        and before the next tracked step (its update size)."""
        if self.quadratic_fit and self.step_count + 1 == self._next_check:
            self._snapshot_for_check()

    def check(self) -> list[MonitorEvent]:
        """Compute the curvature metrics now (also called by :meth:`step`). Never raises
        on a numerical failure: non-finite parameters or curvature give a ``"nonfinite"``
        event, any other failure of the computation a ``"check_failed"`` event."""
        self._last_check = self.step_count
        try:
            if not self._params_finite():
                events = self._nonfinite("parameters", math.nan)
            else:
                events = self._check()
        except (RuntimeError, ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
            if not self._params_finite():
                events = self._nonfinite("parameters", math.nan)
            else:
                events = [self._event("check_failed", "lambda_max", math.nan, math.nan,
                                      f"the curvature check failed: {err}")]
                self._emit({"step": self.step_count}, events)
        self._next_check = self._following_check(self.step_count)
        return events

    def _check(self) -> list[MonitorEvent]:
        if self.optimizer is not None:
            self.stability = stability_model(self.optimizer)
        # one operator for the whole run, re-read at each check: building the objective
        # again costs forward passes (a Hugging Face model's own loss is matched on the batch)
        op = self._op
        if op is None:
            op = self._op = _RecordingHessian(self.model, self.loss_fn, self.batch, self.params,
                                              train=self.train)
        else:
            op.refresh()
        try:
            return self._check_with(op)
        finally:
            op.release()

    def _check_with(self, op: _RecordingHessian) -> list[MonitorEvent]:
        record: dict[str, Any] = {"step": self.step_count, "lr": self.lr, "num_hvps": 0,
                                  "stability_rule": self.stability.name}
        # a summing loss: the monitor batch's sum, scaled to a training batch's
        scale = (1.0 if self.train_batch_size is None
                 else self.train_batch_size / op.objective.num_samples)
        values: dict[str, float] = {}
        plain = (not self.stability.preconditioned if self.plain_sharpness is None
                 else self.plain_sharpness)
        if plain:
            res = self._top_eigen("lambda_max", op)
            lam = scale * float(res.eigenvalues[0])
            record.update(self._convergence("lambda_max", res, scale))
            record["num_hvps"] += res.num_matvecs
            values.update(lambda_max=lam, lr_sharpness=self.lr * lam, sharpness=lam)
        if self.stability.preconditioned:
            pre = self._top_eigen("preconditioned", preconditioned_operator(op, self.stability))
            plam = scale * float(pre.eigenvalues[0])
            conv = self._convergence("preconditioned_sharpness", pre, scale)
            if not plain:  # the governing eigenvalue's certificate is the check's
                conv["converged"] = conv.pop("preconditioned_sharpness_converged")
            record.update(conv)
            record["num_hvps"] += pre.num_matvecs
            values.update(preconditioned_sharpness=plam, lr_preconditioned_sharpness=self.lr * plam,
                          sharpness=plam)
        if op.loss is not None:
            values["check_loss"] = scale * float(op.loss)
        if op.output_max is not None:
            values["output_max"] = float(op.output_max)
        if self.quadratic_fit and self._check_prev_step == self.step_count - 1:
            fit = self._update_fit(op)
            record["num_hvps"] += 1
            record.update(fit)
            values["rho"] = fit["rho"]
        if not all(math.isfinite(v) for k, v in values.items() if k != "rho"):
            bad = next(k for k, v in values.items() if k != "rho" and not math.isfinite(v))
            return self._nonfinite(bad, values[bad])
        for k, v in values.items():
            self._record(k, v)
            record[k] = v
        events: list[MonitorEvent] = []
        for tr in self._trackers.values():
            tr.threshold = self.stability.threshold
            events += self._stability_events(tr, values[tr.name], values.get("check_loss"),
                                             record)
        for k in ("loss", "grad_norm", "update_ratio", "param_norm"):
            if k in self.history:
                record[k] = self.history[k][-1][1]
        record["overhead"] = self.overhead
        self.checks.append(record)
        self._emit(record, events)
        return events

    def _top_eigen(self, key: str, op: Any) -> EigenResult:
        res = lanczos(op, 1, tol=self.tol, max_iter=self.max_hvps,
                      **self._warm_start(key, op.shape[0]), generator=self.generator)
        self._vec[key] = res.eigenvectors.detach()
        return res

    def _convergence(self, name: str, res: EigenResult, scale: float = 1.0) -> dict[str, Any]:
        """The check's residual and whether its top Ritz value is certified: the residual
        test passed *and* no other Ritz value lies within the tolerance band
        ``max(tol |theta_1|, residual)`` of it (then the two are not resolved: the top
        one may be a second eigenvalue the warm start locked onto, with the true top
        close or not yet found). The residual and gap are recorded times ``scale`` (in the
        units of the recorded eigenvalue)."""
        theta = float(res.eigenvalues[0])
        residual = float(res.residuals[0])
        band = max(self.tol * abs(theta), residual)
        others = np.sort(np.asarray(res.ritz_values, dtype=float))[::-1][1:] \
            if res.ritz_values is not None else np.array([])
        gap = float(theta - others[0]) if others.size else math.inf
        converged = bool(res.converged) and gap > band
        if res.converged and not converged:
            log.info("step %d: %s Ritz values %.4g and %.4g are within the tolerance band "
                     "%.3g; not called converged", self.step_count, name, theta,
                     float(others[0]), band)
        prefix = "" if name == "lambda_max" else f"{name}_"
        return {f"{prefix}converged": converged, f"{name}_residual": scale * residual,
                f"{name}_ritz_gap": scale * gap}

    def _following_check(self, step: int) -> int:
        """The next check step after ``step`` (module docstring, "When it checks")."""
        regular = (step // self.every + 1) * self.every
        if not self.adaptive:
            return regular
        tr = next(iter(self._trackers.values()))
        watch, self._watch = self._watch, False
        current = bool(tr.ratios) and tr.steps[-1] == step and math.isfinite(tr.threshold)
        at_edge = current and tr.ratios[-1] >= self.rearm * tr.threshold
        if at_edge and watch:  # a check called by a jump found the ratio at the edge:
            self._interval = 1  # the interval starts over from 1 (and doubles)
            return min(step + 1, regular)
        if tr.suspicious and current:
            return step + 1  # confirm or clear a suspected runaway at once
        if step < self.every and self._interval >= self.every:  # early: powers of four
            nxt = 1
            while nxt <= step:
                nxt *= 4
            return min(nxt, regular)
        interval = self.every
        if current:
            if at_edge:  # beyond (or at) the edge: halve after a suspicious check, else relax
                self._interval = (max(1, self._interval // 2) if tr.suspicious
                                  else min(self.every, 2 * self._interval))
                interval = self._interval
            else:
                self._interval = self.every
                predicted = self._forecast[0]
                if predicted is not None and predicted - step < 4 * self.every:
                    interval = int(min(self.every, max(1, (predicted - step) / 4)))
        return min(step + interval, regular)

    def check_precision(self) -> dict[str, Any]:
        """Run :func:`~curvlab.diagnostics.precision_check` on the monitor batch now (also
        called by :meth:`step` every ``precision_every`` steps); returns the JSONL record."""
        report = precision_check(self.model, self.loss_fn, self.batch, self.precision_dtypes,
                                 self.optimizer)
        summary = {}
        for name, rep in report.reports.items():
            worst = rep.worst_layer
            summary[name] = {"loss_error": rep.loss_error, "grad_error": rep.grad_error,
                             "update_error": rep.update_error,
                             "worst_layer": worst.name if worst else None,
                             "worst_amplification": worst.amplification if worst else None,
                             "flagged": rep.flagged}
            self._record(f"precision_{name}_grad_error", rep.grad_error)
        record = {"step": self.step_count, "precision": summary,
                  "matmul_precision": report.matmul_precision}
        self.precision.append(record)
        self._emit(record, [])
        return record

    def _update_fit(self, op: _RecordingHessian) -> dict[str, float]:
        """``rho`` of the last update from the check's own gradient graph (see the module
        docstring): one HVP plus one forward at the previous parameters."""
        obj = op.objective
        prev = {k: self._check_prev[k] for k in op.point}
        d = obj.flatten({k: op.point[k] - prev[k] for k in op.point})
        hd = op.matvec(d)  # the lanczos run recorded the graph (and op.loss, op.grad)
        g = obj.flatten(op.grad)
        (_, X, y), = obj.batches()
        with torch.no_grad(), obj.mode():
            f_prev = float(obj.batch_loss(prev, X, y))
        f_now = float(op.loss)
        gd, dhd = float(g @ d), float(d @ hd)
        predicted = gd - 0.5 * dhd
        actual = f_now - f_prev
        dd = float(d @ d)
        return {"rho": actual / predicted if predicted != 0 else math.nan,
                "update_loss_change": actual, "update_predicted_change": predicted,
                "update_curvature": dhd / dd if dd > 0 else math.nan}

    def _snapshot_for_check(self) -> None:
        """Copy the parameters the next check's ``rho`` starts from."""
        with torch.no_grad():
            self._check_prev = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        self._check_prev_step = self.step_count

    def _warm_start(self, key: str, n: int) -> dict[str, Any]:
        """Lanczos arguments for a warm start from the previous top two Ritz vectors
        ``y1, y2``: start at ``y1 + 0.1 y2`` and take at least two steps, so the Krylov space
        holds both directions. From ``y1`` alone one step suffices to pass the residual
        test when ``y1`` has become an eigenvector of the *second* eigenvalue (the top two
        swapped), and the estimate then locks onto it (measured: 3.5% low for hundreds of
        steps in the edge-of-stability benchmark); this costs ~0.1-0.2 HVPs per check.

        A cold start (the first check) takes at least the ``m`` steps after which a top
        Ritz value from a random start is below ``(1 - tol) lambda_max`` with probability
        at most 10%: ``1.648 sqrt(n) exp(-sqrt(tol) (2m - 1)) <= 0.1`` (Kuczynski &
        Wozniakowski, SIAM J. Matrix Anal. Appl. 13, 1992, Thm. 4.2), within ``max_hvps``.
        The residual test alone stops as soon as *some* eigenvalue is matched, which from
        a random start can be the second (measured: 4% low on a small MLP whose top two
        eigenvalues are 4% apart)."""
        Y = self._vec.get(key)
        out: dict[str, Any] = {"num_vectors": min(2, n)}
        if Y is not None:
            out["v0"] = Y[:, 0] + 0.1 * Y[:, 1] if Y.shape[1] > 1 else Y[:, 0]
            out["min_iter"] = 2
        else:
            m = (math.log(1.648 * math.sqrt(n) / 0.1) / math.sqrt(self.tol) + 1) / 2
            out["min_iter"] = int(min(self.max_hvps, n, math.ceil(m)))
        return out

    def close(self) -> None:
        """Flush and close the log files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def summary(self) -> dict[str, Any]:
        """Counts and costs: steps, checks, events by kind, warnings, the current regime,
        HVPs per check, overhead."""
        kinds: dict[str, int] = {}
        for e in self.events:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return {"steps": self.step_count, "checks": len(self.checks), "events": kinds,
                "warnings": len(self.warnings), "regime": self.regime,
                "stability_rule": self.stability.name, "threshold": self.stability.threshold,
                "hvps_per_check": self.hvps_per_check, "overhead": self.overhead,
                "monitor_seconds": self.monitor_time, "stopped": self.stopped}

    # ---- internals ----------------------------------------------------------------
    def _record(self, name: str, value: float) -> None:
        self.history.setdefault(name, []).append((self.step_count, value))
        ema = self.smoothed.setdefault(name, [])
        prev = ema[-1][1] if ema else value
        a = self.smoothing
        ema.append((self.step_count, a * prev + (1 - a) * value if math.isfinite(prev)
                    else value))

    def _params_finite(self) -> bool:
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            return bool(torch.stack(torch._foreach_norm(params)).isfinite().all()) \
                if params else True

    def _nonfinite(self, metric: str, value: float) -> list[MonitorEvent]:
        """A ``"nonfinite"`` event (once per episode); stops the monitor if so configured."""
        self.regime = "nonfinite"
        if not self._nonfinite_armed:
            return []
        self._nonfinite_armed = False
        action = ("the monitor stops" if self.stop_on_nonfinite
                  else "the monitor keeps going")
        event = self._event("nonfinite", metric, value, math.nan,
                            f"{metric} is not finite ({value}); {action}",
                            self.step_count, 1.0)
        self._emit({"step": self.step_count, "regime": "nonfinite"}, [event])
        if self.stop_on_nonfinite:
            self.stopped = True
        return [event]

    def _cheap_metrics(self) -> list[MonitorEvent]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        update = self._prev is not None and self._prev_step == self.step_count - 1
        events: list[MonitorEvent] = []
        with torch.no_grad():  # few fused ops and one host sync: this runs every few steps
            norms = torch._foreach_norm(grads + (self._prev if update else []))
            if update:
                torch._foreach_sub_(self._prev, params)  # the snapshot becomes -update
                norms += torch._foreach_norm(self._prev)
                self._prev_step = -1
            sq = (torch.stack(norms).double().square() if norms
                  else torch.zeros(0, dtype=torch.float64))
            k, m = len(grads), len(params) if update else 0
            parts = torch.stack([sq[:k].sum(), sq[k:k + m].sum(), sq[k + m:].sum()]).sqrt()
            gn, den, num = parts.tolist()
        if grads:
            if not math.isfinite(gn):
                return self._nonfinite("grad_norm", gn)
            self._record("grad_norm", gn)
            events += self._jump("grad_norm", gn)
        if update:
            if not (math.isfinite(num) and math.isfinite(den)):
                return events + self._nonfinite("parameters", num)
            ratio = num / den if den > 0 else math.inf
            self._record("update_ratio", ratio)
            self._record("param_norm", den)
            events += self._jump("update_ratio", ratio)
        if self._nonfinite_armed is False and not self.stop_on_nonfinite:
            self._nonfinite_armed = True  # finite again: re-arm
        if self.track_every == 1:
            self._snapshot()
        if events:
            self._emit({"step": self.step_count}, events)
            if self.adaptive:  # a cheap signal jumped: check the curvature at the next step
                self._next_check = min(self._next_check, self.step_count + 1)
                self._watch = True
        return events

    def _snapshot(self) -> None:
        """Copy the parameters (to measure the next step's update)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            if self._prev is None:
                self._prev = [p.detach().clone() for p in params]
            else:
                torch._foreach_copy_(self._prev, params)
        self._prev_step = self.step_count

    def _jump(self, name: str, value: float) -> list[MonitorEvent]:
        ema = self._ema.get(name)
        self._count[name] = self._count.get(name, 0) + 1
        events = []
        if ema is not None and self._count[name] > self.jump_warmup and math.isfinite(ema):
            if value > self.jump_factor * ema:
                if self._jump_armed.get(name, True):
                    self._jump_armed[name] = False
                    events.append(self._event(
                        f"{name}_jump", name, value, self.jump_factor * ema,
                        f"{name} jumped to {value:.3g} ({value / ema:.1f}x its running level)"))
            else:
                self._jump_armed[name] = True
        self._ema[name] = value if ema is None else 0.9 * ema + 0.1 * value
        return events

    def _stability_events(self, tr: _Tracker, ratio: float, loss: float | None,
                          record: dict[str, Any]) -> list[MonitorEvent]:
        """Forecast, regime and events of one stability ratio at a check (module
        docstring)."""
        samples = self.stability.preconditioner_samples
        n = samples() if samples is not None else math.inf
        settled = n >= self.settle_samples
        record["preconditioner_samples"] = n
        if settled and tr.unsettled:  # the ratios so far were not stability bounds
            tr.steps.clear(), tr.ratios.clear(), tr.losses.clear(), tr.lrs.clear()
        tr.unsettled = not settled
        prev_ratio = tr.ratios[-1] if tr.ratios else None
        tr.steps.append(self.step_count)
        tr.ratios.append(ratio)
        tr.losses.append(math.nan if loss is None else loss)
        tr.lrs.append(self.lr)
        c = tr.threshold
        record[f"{tr.name}_threshold"] = c
        if not math.isfinite(c):  # no curvature bound (a normalized update)
            self.regime = record["regime"] = "unbounded"
            record[f"{tr.name}_forecast"] = None
            return []
        events = []
        steps, ratios = tr.steps[-self.window:], tr.ratios[-self.window:]
        predicted = forecast_crossing(steps, ratios, c)
        cautious = forecast_crossing(steps, ratios, c, self.confidence)
        trend = linear_trend(steps, ratios)
        prob = None
        if trend is not None and len(steps) >= 3:
            prob = trend.prob_slope_above((c - trend.fitted_last) / self.horizon)
        ahead = predicted - self.step_count if predicted is not None else None
        # driven by the schedule: the learning rate grew over the window and accounts for
        # at least half of the ratio's (log) rise. Self-stabilization acts on the sharpness;
        # it cannot undo a schedule that pushes lr past threshold / sharpness.
        lrs = tr.lrs[-self.window:]
        d_lr = math.log(lrs[-1] / lrs[0]) if lrs[0] > 0 and lrs[-1] > 0 else 0.0
        d_ratio = (math.log(ratios[-1] / ratios[0]) if ratios[0] > 0 and ratios[-1] > 0
                   else 0.0)
        schedule = d_lr > 0 and d_lr >= 0.5 * d_ratio
        record["schedule_driven"] = schedule
        level = "warning" if schedule else "info"
        self._forecast = ((predicted, ahead, prob) if predicted is not None
                          and predicted >= self.step_count else (None, None, None))
        record[f"{tr.name}_forecast"] = predicted
        record[f"{tr.name}_forecast_confidence"] = prob
        # suspicious: beyond the threshold, the monitor-batch loss at a new high over the
        # window (at the edge of stability it fluctuates below its earlier values while
        # trending down), and either the ratio not pulled back (within the check's accuracy
        # tol) or, held back by a preconditioner that grows with the blow-up (Adam's v),
        # the loss above its value at the first check (all progress lost)
        # earlier loss values: the checks of the window and the training losses recorded
        # since its start (the training loss of step s is at the parameters before step s's
        # update: the first check already has the loss before training as its reference)
        since = tr.steps[-self.window - 1] if len(tr.steps) > self.window else -1
        recent = [v for v in tr.losses[-self.window - 1:-1] if math.isfinite(v)]
        trained = [v for s, v in self.history.get("loss", []) if s > since and math.isfinite(v)]
        recent += trained
        new_high = loss is not None and bool(recent) and loss > max(recent)
        first_loss = next((v for v in ([v for _, v in self.history.get("loss", [])[:1]]
                                       + tr.losses) if math.isfinite(v)), math.nan)
        held = prev_ratio is not None and ratio >= (1 - self.tol) * prev_ratio
        lost = loss is not None and loss > first_loss
        rising = (new_high and held) or (lost and (new_high or held))
        tr.suspicious = tr.suspicious + 1 if (ratio >= c and rising) else 0
        # no time to confirm: the loss, on its observed growth, blows up before the next
        # check (one step on) could confirm it; while the preconditioner is not settled
        # (its ratio is not a stability bound yet) this is the only way to a runaway
        ahead_blowup = (self._blowup_forecast(tr)[1]
                        if tr.suspicious > 0 and (tr.suspicious < self.confirm or not settled)
                        and self.adaptive else None)
        hurry = ahead_blowup is not None and ahead_blowup <= 1
        # progress lost: the monitor-batch loss is back at its start after training had
        # lowered it (by at least 10%): 90% of the progress undone, whatever the ratio
        # (a catapult into a flat region at chance level measures a small sharpness);
        # not while an adaptive preconditioner is forming (Adam's first steps bounce)
        if loss is not None and math.isfinite(loss):
            tr.best_loss = min(tr.best_loss, loss)
        progress = first_loss - tr.best_loss
        significant = math.isfinite(progress) and progress >= 0.1 * abs(first_loss)
        lost_progress = (settled and significant and loss is not None
                         and loss >= first_loss - 0.1 * progress)
        if significant and loss is not None and loss < first_loss - 0.5 * progress:
            tr.armed["progress_lost"] = True
        if (tr.suspicious >= self.confirm and settled) or hurry:
            regime = "runaway"
        elif lost_progress:
            regime = "progress_lost"
        elif not settled:
            regime = "unsettled"
        elif ratio >= self.rearm * c:
            regime = "edge_of_stability"
        elif cautious is not None and cautious - self.step_count <= self.horizon:
            regime = "sharpening"
        else:
            regime = "stable"
        self.regime = record["regime"] = regime
        record["suspicious_checks"] = tr.suspicious
        if ratio < self.rearm * c:
            tr.armed["crossed"] = tr.armed["diverging"] = True
            if cautious is None or cautious - self.step_count > self.horizon:
                tr.armed["approaching"] = True
        if regime == "runaway" and tr.armed["diverging"]:
            tr.armed["diverging"] = tr.armed["crossed"] = tr.armed["approaching"] = False
            at, ahead, conf = self._blowup_forecast(tr)
            why = ("not pulled back while the loss rose" if new_high and held else
                   f"while the loss ({loss:.3g}) is above its first value ({first_loss:.3g}): "
                   "the progress of training is lost")
            events.append(self._event(
                "diverging", tr.name, ratio, c,
                f"runaway: {tr.name} = {ratio:.3g} beyond the threshold {c:.3g} {why}, at "
                f"{tr.suspicious} consecutive checks"
                + (" (not waiting for confirmation: on its growth the loss blows up before "
                   "the next check)" if tr.suspicious < self.confirm else "")
                + (f"; the loss reaches 10x its first value at step {at:.0f} "
                   f"({ahead:.0f} steps ahead) on its trend" if at is not None else ""),
                at, conf, regime))
        elif regime == "progress_lost" and tr.armed["progress_lost"]:
            tr.armed["progress_lost"] = False
            events.append(self._event(
                "progress_lost", "check_loss", loss, first_loss,
                f"the monitor-batch loss {loss:.3g} is back at its start {first_loss:.3g} "
                f"(training had lowered it to {tr.best_loss:.3g}): the progress is lost "
                f"({tr.name} = {ratio:.3g}, threshold {c:.3g})"))
        elif ratio >= c and tr.armed["crossed"] and settled:
            tr.armed["crossed"] = tr.armed["approaching"] = False
            events.append(self._event(
                "crossed", tr.name, ratio, c,
                f"{tr.name} = {ratio:.3g} passed the stability threshold {c:.3g} "
                + ("pushed by the learning-rate schedule (lower the peak lr or lengthen the "
                   "warmup)" if schedule else
                   "(edge of stability: watching whether it self-stabilizes)"),
                self.step_count, 1.0, "edge_of_stability", level))
        elif (settled and tr.armed["approaching"] and len(tr.ratios) >= min(3, self.window)
              and ratio >= self.min_ratio * c and cautious is not None and predicted is not None
              and cautious - self.step_count <= self.horizon):
            tr.armed["approaching"] = False
            events.append(self._event(
                "approaching", tr.name, ratio, c,
                f"{tr.name} = {ratio:.3g} is forecast to reach {c:.3g} at step "
                f"{predicted:.0f} ({predicted - self.step_count:.0f} steps ahead; by step "
                f"{cautious:.0f} at {100 * self.confidence:.0f}% confidence)"
                + (", pushed by the learning-rate schedule" if schedule else ""), predicted,
                prob, regime, level))
        return events

    def _blowup_forecast(self, tr: _Tracker) -> tuple[float | None, float | None, float | None]:
        """When the loss, on the exponential trend of the last ``confirm + 1`` checks'
        monitor-batch losses and the training losses recorded since the check before them
        (the training loss of step ``s`` is placed at ``s - 1``: it is taken before step
        ``s``'s update), from the last of them within 20% of their minimum on (at least
        three), reaches 10x the first loss observed: ``(step, steps ahead, P(rising))``."""
        k = self.confirm + 1
        i0 = max(0, len(tr.steps) - k)
        since = tr.steps[i0 - 1] if i0 > 0 else 0
        points = list(zip(tr.steps[i0:], tr.losses[i0:]))
        points += [(s - 1, v) for s, v in self.history.get("loss", [])
                   if since <= s - 1 < self.step_count]
        observed = [v for _, v in self.history.get("loss", [])[:1]] + tr.losses
        first = next((v for v in observed if math.isfinite(v) and v > 0), None)
        if first is None or not all(math.isfinite(v) and v > 0 for _, v in points):
            return None, None, None
        points.sort()
        # the rise: from the last point still at the floor of these losses (within the 20%
        # of mini-batch noise) on; a spike after a long plateau is not averaged with it
        floor = min(v for _, v in points)
        start = max(i for i, (_, v) in enumerate(points) if v <= 1.2 * floor)
        points = points[max(0, min(start, len(points) - 3)):]
        trend = linear_trend([s for s, _ in points], [math.log(v) for _, v in points])
        if trend is None or not trend.slope > 0:
            return None, None, None
        at = max(float(self.step_count),
                 trend.last_step + (math.log(10 * first) - trend.fitted_last) / trend.slope)
        return at, at - self.step_count, trend.prob_slope_above(0.0)

    def _event(self, kind: str, metric: str, value: float, threshold: float, message: str,
               predicted: float | None = None, confidence: float | None = None,
               regime: str | None = None, severity: str | None = None) -> MonitorEvent:
        if predicted is None and kind != "approaching":  # the current crossing forecast
            predicted, _, confidence = self._forecast
        event = MonitorEvent(self.step_count, kind, metric, float(value), float(threshold),
                             message, predicted,
                             None if predicted is None else float(predicted - self.step_count),
                             confidence, regime or self.regime,
                             severity or SEVERITY.get(kind, "info"))
        self.events.append(event)
        level = logging.WARNING if event.severity != "info" else logging.INFO
        log.log(level, "step %d: %s", self.step_count, message)
        return event

    def _emit(self, record: dict[str, Any], events: list[MonitorEvent]) -> None:
        if self._jsonl is not None:
            out = dict(record, events=[asdict(e) for e in events])
            self._jsonl.write(json.dumps(out, default=float) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"curvlab/{k}", v, record["step"])
            for e in events:
                self._tb.add_scalar(f"curvlab/event/{e.kind}", e.value, e.step)
                if e.horizon is not None:
                    self._tb.add_scalar(f"curvlab/event/{e.kind}_horizon", e.horizon, e.step)
                self._tb.add_text("curvlab/events", f"[{e.severity}] {e.message}", e.step)
        for cb in self.callbacks:
            cb(self, record, events)
