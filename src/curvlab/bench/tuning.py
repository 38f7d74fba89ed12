"""Tune-then-evaluate: each optimizer at its own best learning rate, against a target set
by a reference optimizer (the protocol of ``benchmarks/bench_nn_optim.py``).

For every problem and optimizer spec:

1. tune: every lr of the spec's declared grid with the first seed; the chosen lr has the
   lowest area under the loss curve, :math:`\\frac1n\\sum_{k=1}^n L(t_k)` over the
   evaluations after step 0 (rewards both speed and final loss; ``inf`` for a run that
   did not finish: diverged or failed), ties by final loss, then grid order;
2. evaluate: the chosen lr with the other seeds;
3. target: the reference's (AdamW's) median over seeds of the evaluated loss nearest to
   ``target_fraction`` of the step budget (so the reference reaches it by construction,
   and the target is not chosen to suit anyone);
4. steps (and training time) to target: the first evaluation at or below the target,
   median over seeds, a seed that misses counting as ``inf`` (``None``: not reached by
   the median seed);
5. step time: every optimizer at its chosen lr on one fixed gradient, interleaved
   (:mod:`curvlab.bench.steptime`), one task per problem.

Stages 2 and 5 depend on the records of stage 1: :meth:`TunedStudy.stages` is for
:func:`curvlab.bench.runner.run_stages`, and every number of :meth:`TunedStudy.rows` is
derived from the records.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from curvlab.bench import steptime
from curvlab.bench.nn import NNProblem, nn_task
from curvlab.bench.optimizers import OptimizerSpec
from curvlab.bench.runner import Task

__all__ = ["TunedStudy", "area_under_curve", "reach"]

Stage = Callable[[list[dict[str, Any]]], list[Task]]


def _evaluations(record: dict[str, Any]) -> list[tuple[int, float, float]]:
    """``(step, loss, training time)`` of the evaluations after step 0."""
    s = record.get("series", {})
    return [(k, v, t) for k, v, t in zip(s.get("step", []), s.get("loss", []),
                                         s.get("time", []), strict=True) if k > 0]


def _finished(record: dict[str, Any]) -> bool:
    return record["status"] == "ok"


def area_under_curve(record: dict[str, Any]) -> float:
    """Mean evaluated loss after step 0; ``inf`` unless the run finished (status ok)."""
    evals = _evaluations(record)
    if not _finished(record) or not evals:
        return math.inf
    return statistics.mean(v for _, v, _ in evals)


def _final(record: dict[str, Any]) -> float:
    value = record["metrics"].get("final_loss")
    return value if _finished(record) and value is not None and math.isfinite(value) else math.inf


def reach(record: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """First evaluation (step, training time) with loss <= ``target``."""
    return next(((k, t) for k, v, t in _evaluations(record) if v <= target), (None, None))


def _median_or_none(values: list[float]) -> float | None:
    med = statistics.median(values)
    return None if math.isinf(med) else med


@dataclass
class TunedStudy:
    """Problems x optimizer specs x declared lr grids x seeds, tuned then evaluated."""

    suite: str
    problems: Sequence[NNProblem]
    specs: Sequence[OptimizerSpec]
    seeds: Sequence[int]
    quick: bool = False  # the middle lr of each grid only
    reference: str = "torch.AdamW"
    target_fraction: float = 0.75
    step_time_rounds: Mapping[str, int] = field(default_factory=dict)  # problem -> rounds
    #: also time the compiled variants (a second step-time task per problem); specs with a
    #: compiled variant but no grid on a problem are timed there (``_timed_only``)
    compiled_step_time: bool = False
    time_budget: float = math.inf
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        ref = next((s for s in self.specs if s.name == self.reference), None)
        if ref is None:
            raise ValueError(f"the reference {self.reference!r} (it sets the target) is not "
                             f"among the specs {[s.name for s in self.specs]}")
        for p in self.problems:
            if not ref.grid(p.name):
                raise ValueError(f"the reference {self.reference!r} declares no learning "
                                 f"rates for {p.name!r}, so no target can be set there")

    def _pairs(self) -> list[tuple[NNProblem, OptimizerSpec, tuple[float, ...]]]:
        return [(p, s, s.grid(p.name, self.quick)) for p in self.problems for s in self.specs
                if s.grid(p.name, self.quick)]

    def _task(self, problem: NNProblem, spec: OptimizerSpec, lr: float, seed: int) -> Task:
        return nn_task(self.suite, problem, spec, lr, seed, time_budget=self.time_budget,
                       device=self.device, config={"eval_every": problem.eval_every})

    def _runs(self, records: list[dict[str, Any]], problem: str, method: str
              ) -> list[dict[str, Any]]:
        return [r for r in records if r["problem"] == problem and r["method"] == method
                and r["suite"] == self.suite]

    def chosen_lr(self, records: list[dict[str, Any]], problem: NNProblem,
                  spec: OptimizerSpec) -> tuple[float, dict[float, float]] | None:
        """The tuned lr and every grid lr's area under the curve (``None`` before tuning)."""
        tuned = {r["config"]["lr"]: r for r in self._runs(records, problem.name, spec.name)
                 if r["seed"] == self.seeds[0]}
        grid = spec.grid(problem.name, self.quick)
        if not grid or any(lr not in tuned for lr in grid):
            return None
        aucs = {lr: area_under_curve(tuned[lr]) for lr in grid}
        best = min(grid, key=lambda lr: (aucs[lr], _final(tuned[lr])))
        return best, aucs

    def _timed_only(self, problem: NNProblem, entries: list[tuple[OptimizerSpec, float]],
                    compiled: bool) -> list[tuple[OptimizerSpec, float]]:
        """Specs step-timed on ``problem`` without being trained there (no grid on it), at
        the middle lr of their first grid (step time hardly depends on lr): the peers of an
        algorithm a curvlab entry runs there, so every curvlab step is compared with every
        installed implementation of its algorithm; with ``compiled``, also every spec with
        a compiled variant (compile-first peers)."""
        named = {s.name for s, _ in entries}
        ours = {s.algorithm for s, _ in entries if s.family == "curvlab"}
        extra = []
        for s in self.specs:
            if s.name in named or s.grid(problem.name) or not s.lrs:
                continue
            wanted = (s.make_compiled is not None) if compiled else (
                s.family == "peer" and s.algorithm in ours)
            if wanted:
                grid = next(iter(s.lrs.values()))
                extra.append((s, grid[len(grid) // 2]))
        return extra

    def stages(self) -> list[Stage]:
        """Tune (first seed, whole grid), evaluate (chosen lr, other seeds), step time."""

        def tune(records: list[dict[str, Any]]) -> list[Task]:
            return [self._task(p, s, lr, self.seeds[0]) for p, s, grid in self._pairs()
                    for lr in grid]

        def evaluate(records: list[dict[str, Any]]) -> list[Task]:
            tasks = []
            for p, s, _ in self._pairs():
                chosen = self.chosen_lr(records, p, s)
                if chosen is not None:
                    tasks += [self._task(p, s, chosen[0], seed) for seed in self.seeds[1:]]
            return tasks

        def step_time(records: list[dict[str, Any]]) -> list[Task]:
            tasks = []
            for p in self.problems:
                if p.name not in self.step_time_rounds:
                    continue
                entries = [(s, chosen[0]) for q, s, _ in self._pairs() if q is p
                           and (chosen := self.chosen_lr(records, p, s)) is not None]
                eager = entries + self._timed_only(p, entries, compiled=False)
                if entries:
                    tasks.append(steptime.step_time_task(p, eager,
                                                         self.step_time_rounds[p.name],
                                                         device=self.device))
                if not self.compiled_step_time:
                    continue
                extra = self._timed_only(p, entries, compiled=True)
                compiled = [(s, lr) for s, lr in entries + extra if s.make_compiled is not None]
                if compiled:
                    tasks.append(steptime.step_time_task(p, compiled,
                                                         self.step_time_rounds[p.name],
                                                         compiled=True, device=self.device))
            return tasks

        return [tune, evaluate, step_time]

    def target(self, records: list[dict[str, Any]], problem: NNProblem) -> float:
        """The reference's median-seed loss at ``target_fraction`` of the step budget."""
        ref = next(s for s in self.specs if s.name == self.reference)
        chosen = self.chosen_lr(records, problem, ref)
        runs = [r for r in self._runs(records, problem.name, ref.name)
                if chosen and r["config"]["lr"] == chosen[0] and r["seed"] in self.seeds]
        curves = [_evaluations(r) for r in runs]
        if not runs or not all(curves):
            raise ValueError(f"{problem.name}: no evaluated runs of the reference "
                             f"{self.reference} to set the target from")
        at = self.target_fraction * problem.steps
        return statistics.median(min(c, key=lambda e: abs(e[0] - at))[1] for c in curves)

    def rows(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per problem and spec (problem order, then spec order)."""
        rows = []
        for problem in self.problems:
            pairs = [(s, grid) for p, s, grid in self._pairs() if p is problem]
            if not pairs:
                continue
            target = self.target(records, problem)
            for spec, _ in pairs:
                chosen = self.chosen_lr(records, problem, spec)
                if chosen is None:
                    continue
                lr, aucs = chosen
                every = self._runs(records, problem.name, spec.name)
                runs = [r for r in every if r["config"]["lr"] == lr and r["seed"] in self.seeds]
                hits = [reach(r, target) for r in runs]
                steps = _median_or_none([k if k is not None else math.inf for k, _ in hits])
                walls = _median_or_none([t if t is not None else math.inf for _, t in hits])
                rows.append({
                    "problem": problem.name, "method": spec.name, "algorithm": spec.algorithm,
                    "family": spec.family, "lr": lr, "tuning": aucs,
                    "seeds": sorted(r["seed"] for r in runs), "target": target,
                    "steps_to_target": steps, "time_to_target": walls,
                    "final_loss": statistics.median(_final(r) for r in runs),
                    "errors": [r["error"] for r in every if r.get("error")],
                })
        return rows

    def step_times(self, records: list[dict[str, Any]], compiled: bool = False
                   ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], str]]:
        """``(problem, method) -> seconds`` and ``-> error`` (of the optimizers whose step
        raised) from the step-time records (``compiled``: of the compiled variants)."""
        times, errors = {}, {}
        for r in records:
            if r["suite"] == steptime.SUITE and r["status"] == "ok" \
                    and bool(r["config"].get("compiled")) == compiled:
                times.update({(r["problem"], m): t for m, t in r["metrics"]["times"].items()})
                errors.update({(r["problem"], m): e
                               for m, e in r["metrics"].get("errors", {}).items()})
        return times, errors

    def recompilations(self, records: list[dict[str, Any]]
                       ) -> dict[tuple[str, str], tuple[int, int]]:
        """``(problem, method) -> (k, n)``: a compiled variant that compiled anew during
        ``k`` of its ``n`` steps after the first (guards failing at every step make the
        compiled step time a compile time)."""
        return {(r["problem"], m): n for r in records
                if r["suite"] == steptime.SUITE and r["config"].get("compiled")
                and r["status"] == "ok" for m, n in r["metrics"].get("recompiled", {}).items()
                if isinstance(n, list)}

    def first_step_times(self, records: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
        """``(problem, method) -> seconds`` of the first (compiling) step of each compiled
        variant, from the compiled step-time records."""
        return {(r["problem"], m): t for r in records
                if r["suite"] == steptime.SUITE and r["config"].get("compiled")
                and r["status"] == "ok" for m, t in r["metrics"].get("first_step", {}).items()}
