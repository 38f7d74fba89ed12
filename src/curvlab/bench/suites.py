"""The task lists of ``curvlab bench --suite classical|nn|curvature|all``."""

from __future__ import annotations

from dataclasses import dataclass

from curvlab.bench.nn import NNProblem, char_lm_problem, digits_mlp_problem, nn_task
from curvlab.bench.optimizers import available
from curvlab.bench.runner import Task

__all__ = ["SuiteOptions", "build_tasks", "SUITES"]

SUITES = ("classical", "nn", "curvature")


@dataclass(frozen=True)
class SuiteOptions:
    quick: bool = False
    seeds: int = 3
    device: str = "cpu"
    time_budget: float = 60.0  # seconds of training per NN run


def _nn_problems(opts: SuiteOptions) -> list[NNProblem]:
    if opts.quick:
        return [digits_mlp_problem(steps=150)]
    return [digits_mlp_problem(steps=600), char_lm_problem(steps=300)]


def _nn_tasks(opts: SuiteOptions) -> tuple[list[Task], list[str]]:
    specs, notices = available()
    if opts.quick:
        specs = [s for s in specs if s.quick]
    tasks = [nn_task("nn", problem, spec, lr, seed, time_budget=opts.time_budget,
                     device=opts.device)
             for problem in _nn_problems(opts) for spec in specs
             for lr in spec.grid(problem.name, opts.quick) for seed in range(opts.seeds)]
    return tasks, notices


def build_tasks(suite: str, opts: SuiteOptions) -> tuple[list[Task], list[str]]:
    """Tasks of ``suite`` (or of every suite for ``"all"``) and skip notices."""
    if suite == "all":
        tasks, notices = [], []
        for name in SUITES:
            t, n = build_tasks(name, opts)
            tasks += t
            notices += n
        return tasks, notices
    if suite == "nn":
        return _nn_tasks(opts)
    if suite == "classical":
        from curvlab.bench.classical import classical_tasks

        return classical_tasks(opts.quick)
    if suite == "curvature":
        from curvlab.bench.curvature import curvature_tasks

        return curvature_tasks(opts.quick), []
    raise ValueError(f"suite must be one of {(*SUITES, 'all')}, got {suite!r}")
