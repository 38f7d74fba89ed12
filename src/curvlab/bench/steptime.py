"""Optimizer step time on one fixed gradient, interleaved so machine noise hits all alike.

Every optimizer gets its own copy of one model (``problem.build(seed)``) and the gradient
of one batch; each round steps every optimizer once (the ``.grad`` restored before each
step: some peers free it), and every 10 rounds the parameters are reset (a repeated fixed
gradient would otherwise run them off). The time of one optimizer is the median over the
rounds after a warm-up of ``min(5, rounds // 4)``. Only ``optimizer.step()`` is timed:
forward and backward are the same for everyone and excluded.

``compiled=True`` times each spec's compiled variant (``OptimizerSpec.make_compiled``;
specs without one are left out) and, interleaved with it, its eager variant (named
``name + " [eager]"``; not for ``compile_global`` specs, whose compilation is a
process-wide switch), so that the compiled / eager ratio sees the same machine noise; the
warm-up rounds absorb the compilation, whose cost shows in the first step's time
(``metrics["first_step"]``). A variant that compiles again during the timed rounds
(guards that fail every step) is reported with how often (``metrics["recompiled"]``:
``[k, n]``, a frame compiled during ``k`` of its ``n`` steps after the first), and any
optimizer whose steps
have used ``max_seconds`` in all stops there (its median over the steps it made): a
recompile at every step on a CPU costs tens of seconds, which must not hold up the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from curvlab.bench.nn import NNProblem
from curvlab.bench.optimizers import OptimizerSpec
from curvlab.bench.runner import Task

__all__ = ["interleaved_step_times", "step_time_task", "SUITE"]

SUITE = "step-time"  # the records' suite (not an ``nn`` training run)
EAGER = " [eager]"  # suffix of the eager variants timed in a compiled session


def interleaved_step_times(problem: NNProblem, entries: Sequence[tuple[OptimizerSpec, float]],
                           rounds: int, seed: int = 0, compiled: bool = False,
                           first_step: dict[str, float] | None = None, device: str = "cpu",
                           recompiled: dict[str, int] | None = None,
                           max_seconds: float = 60.0
                           ) -> tuple[dict[str, float], dict[str, str]]:
    """Median ``step()`` seconds of each ``(spec, lr)``, and the first error of each
    optimizer whose step raised (skipped rounds). Each step sees one fixed gradient; an
    optimizer whose hooks capture statistics in the forward/backward pass
    (``spec.hooks``: K-FAC) gets that pass on the fixed batch instead, untimed, before each
    timed step. An optimizer with no timed step after the warm-up is absent from
    the times. ``compiled``: the specs' compiled variants; ``first_step``: filled with the
    seconds of each optimizer's first step (with ``compiled``: its compilation);
    ``device``: where the models live (an accelerator is synchronized around each timed
    step, so the time is the step's work, not its launch); ``recompiled``: filled with
    ``[k, n]`` for each optimizer that compiled a frame during ``k`` of its ``n`` steps after
    the first (recompilation; a few graphs early in a run are normal, one per step is a
    guard failing every step); ``max_seconds``: an optimizer whose steps have taken this
    long in all is not stepped again."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for spec, _ in entries:
        if spec.step_batch:
            raise ValueError(f"{spec.name} takes step(closure, batch=...): its step computes "
                             "its own gradient, so it cannot be timed on a fixed gradient")
    if compiled:  # each compiled variant, and beside it the eager one (same noise)
        entries = [e for spec, lr in entries if spec.make_compiled is not None
                   for e in [(dataclasses.replace(spec, make=spec.make_compiled), lr)]
                   + ([] if spec.compile_global else
                      [(dataclasses.replace(spec, name=spec.name + EAGER), lr)])]
    base = problem.build(seed).to(device)
    x, y = (t.to(device) for t in
            problem.sample(torch.Generator().manual_seed(problem.data_seed + seed)))
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" \
        else (lambda: None)
    runs = []
    for spec, lr in entries:
        model = copy.deepcopy(base)
        opt = spec.make(model, lr, problem.name)
        grads = []
        if not spec.hooks:  # (a hooks optimizer would record this pass too)
            problem.loss_fn(model(x), y).backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
        runs.append((spec.name, opt, model, grads, spec.hooks))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    errors: dict[str, str] = {}
    skip = min(5, rounds // 4)
    from torch._dynamo.utils import counters  # (torch._dynamo is imported lazily)

    frames = counters["frames"]
    for r in range(rounds):
        for name, opt, model, grads, hooks in runs:
            if times[name] and sum(times[name]) >= max_seconds:
                continue
            saved = [p.detach().clone() for p in model.parameters()]
            if hooks:  # the pass the optimizer's hooks capture statistics from
                model.zero_grad()
                problem.loss_fn(model(x), y).backward()
            else:
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad = g.clone()
            sync()
            compiled_frames = frames["ok"]
            t0 = time.perf_counter()
            try:
                opt.step()
                sync()
            except Exception as err:  # recorded: this optimizer cannot be timed this way
                errors.setdefault(name, f"round {r}: {type(err).__name__}: {err}")
                continue
            times[name].append(time.perf_counter() - t0)
            if recompiled is not None and len(times[name]) > 1:
                later = recompiled.setdefault(name, [0, 0])  # [compiled anew, steps]
                later[0] += frames["ok"] > compiled_frames
                later[1] += 1
            if r == 0 and first_step is not None:
                first_step[name] = times[name][0]
            if r % 10 == 9:
                with torch.no_grad():
                    for p, s in zip(model.parameters(), saved, strict=True):
                        p.copy_(s)
    # the steps after the warm-up; an optimizer stopped by max_seconds before then: all its
    # steps, unless one raised (then its only steps may be a compilation: no time)
    medians = {name: statistics.median(ts[skip:] or ts) for name, ts in times.items()
               if ts[skip:] or (ts and name not in errors)}
    if recompiled is not None:  # only the variants that compiled anew after their first step
        for name in [n for n, (k, _) in recompiled.items() if not k]:
            del recompiled[name]
    return medians, errors


def step_time_task(problem: NNProblem, entries: Sequence[tuple[OptimizerSpec, float]],
                   rounds: int, compiled: bool = False, device: str = "cpu") -> Task:
    """One runner task measuring every ``(spec, lr)`` of ``entries`` together (``compiled``:
    their compiled variants); its record holds ``metrics["times"]`` (method -> seconds),
    ``metrics["errors"]`` (method -> first error), ``metrics["first_step"]`` (method ->
    seconds of the first step) and ``metrics["recompiled"]`` (method -> ``[k, n]``: compiled
    anew during k of its n steps after the first)."""

    def fn(progress: Callable[[float], None]) -> dict[str, Any]:
        first: dict[str, float] = {}
        recompiled: dict[str, int] = {}
        times, errors = interleaved_step_times(problem, entries, rounds, compiled=compiled,
                                               first_step=first, device=device,
                                               recompiled=recompiled)
        progress(1.0)
        return {"metrics": {"times": times, "errors": errors, "first_step": first,
                            "recompiled": recompiled}}

    lrs = ";".join(f"{spec.name}@{lr:g}" for spec, lr in entries
                   if not compiled or spec.make_compiled is not None)
    config: dict[str, Any] = {"rounds": rounds, "lrs": lrs}
    if compiled:
        config["compiled"] = True
    if device != "cpu":
        config["device"] = device
    return Task(SUITE, problem.name, "interleaved-compiled" if compiled else "interleaved",
                config, fn)
