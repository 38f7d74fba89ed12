"""Run benchmark tasks one by one, appending each result as soon as it is finished.

A *task* is one measured run (one problem x method x hyper-parameters x seed). Results
go to ``OUT/results.jsonl``, one JSON record per line, flushed and fsynced after every
run, so a killed benchmark loses at most the run in progress; ``resume=True`` skips the
tasks whose key is already recorded. ``OUT/results.json`` (the full list plus the
environment) is rewritten after every run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Task", "environment", "load_results", "run_tasks"]

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One measured run. ``fn(progress)`` returns ``{"metrics": {...}, "series": {...}}``;
    ``progress(fraction)`` may be called to report progress within the run."""

    suite: str
    problem: str
    method: str
    config: dict[str, Any]
    fn: Callable[[Callable[[float], None]], dict[str, Any]]
    seed: int = 0
    group: str = field(default="")

    @property
    def key(self) -> str:
        cfg = ",".join(f"{k}={self.config[k]}" for k in sorted(self.config))
        return f"{self.suite}/{self.problem}/{self.method}/seed={self.seed}/{cfg}"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device and threads: what a reader needs to interpret the numbers."""
    import numpy
    import scipy

    import curvlab

    env = {
        "curvlab": curvlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``results.jsonl`` or ``results.json`` (file or folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl" if (path / "results.jsonl").exists() else (
            path / "results.json")
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s line %d is incomplete (interrupted write); ignored",
                                path, i + 1)
        return records
    data = json.loads(path.read_text())
    return data["runs"] if isinstance(data, dict) else data


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "runs": records}, indent=1, default=float))
    tmp.replace(path)


def run_tasks(
    tasks: Sequence[Task],
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_start: Callable[[Task, int, int], None] | None = None,
    on_progress: Callable[[Task, float], None] | None = None,
    on_done: Callable[[Task, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` and return all records (earlier ones included when resuming).

    Without ``resume`` an existing ``results.jsonl`` in ``out_dir`` is moved aside to
    ``results.jsonl.bak`` rather than overwritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    if jsonl.exists() and not resume:
        jsonl.replace(out / "results.jsonl.bak")
    records = load_results(jsonl) if jsonl.exists() else []
    if records or jsonl.exists():  # drop a line cut off by a kill before appending
        tmp = jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
        tmp.replace(jsonl)
    done = {r["key"] for r in records}
    env = environment(device)
    todo = [t for t in tasks if t.key not in done]
    if resume and len(todo) < len(tasks):
        log.info("resuming: %d of %d runs already recorded", len(tasks) - len(todo), len(tasks))
    for i, task in enumerate(todo):
        if on_start:
            on_start(task, i, len(todo))
        record: dict[str, Any] = {
            "key": task.key, "suite": task.suite, "problem": task.problem,
            "method": task.method, "group": task.group or task.method, "seed": task.seed,
            "config": task.config, "environment": env,
        }
        t0 = time.perf_counter()
        try:
            result = task.fn(lambda frac, task=task: on_progress and on_progress(task, frac))
            record.update(status=result.get("status", "ok"), metrics=result.get("metrics", {}),
                          series=result.get("series", {}))
        except Exception as err:  # one failing run must not lose the others
            log.warning("run %s failed: %s", task.key, err)
            record.update(status="error", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=5), metrics={}, series={})
        record["wall_time"] = time.perf_counter() - t0
        _append(jsonl, record)
        records.append(record)
        _write_json(out / "results.json", env, records)
        if on_done:
            on_done(task, record)
    _write_json(out / "results.json", env, records)
    return records


def group_records(records: Iterable[dict[str, Any]], *fields: str) -> dict[tuple, list[dict]]:
    """Group records by the given top-level fields (e.g. ``"problem", "method"``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return groups
