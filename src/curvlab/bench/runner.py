"""Run benchmark tasks one by one, appending each result as soon as it is finished.

A *task* is one measured run (one problem x method x hyper-parameters x seed). Results
go to ``OUT/results.jsonl``, one JSON record per line, flushed and fsynced after every
run, so a killed benchmark loses at most the run in progress; ``resume=True`` skips the
tasks whose key is already recorded. ``OUT/results.json`` (the full list plus the
environment) is rewritten after every run.

Nothing is lost and nothing is mixed:

* one run per folder: :func:`lock_out_dir` holds an exclusive ``flock`` on ``OUT/bench.lock``
  (which names the holder: pid, host, start time, command) for the whole run; a second run
  on the same folder gets :class:`OutDirBusy`. The kernel releases the lock when the
  holder dies, so a killed run leaves no stale lock.
* every file is written through a temporary file unique to the writer and renamed into
  place (:func:`write_atomic`); only ``results.jsonl`` is appended to.
* without ``resume`` the results of an earlier run in ``OUT`` are moved to
  ``OUT/earlier-<time>/`` (deleted only with ``overwrite=True``), never overwritten.
* with ``resume`` every valid record is kept (the first one of each key); lines that are
  not records (cut off by a kill, corrupt, duplicates) are logged and moved verbatim to
  ``OUT/results.jsonl.invalid-<time>``, never dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Task", "environment", "load_results", "run_tasks", "run_stages", "lock_out_dir",
           "OutDirBusy", "ResultsError", "write_atomic", "check_record"]

log = logging.getLogger(__name__)

LOCK_NAME = "bench.lock"
RESULT_FILES = ("results.jsonl", "results.json", "report.html", "results.jsonl.bak")
# (results.jsonl.bak: what earlier versions kept of the run before)


class OutDirBusy(RuntimeError):
    """The output folder is locked by another running benchmark."""


class ResultsError(ValueError):
    """A results file that is not valid (the message names the file and the problem)."""


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


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling unique to this writer (pid and
    a random token), fsynced and renamed into place: readers see the old or the new file,
    and concurrent writers never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_HELD: dict[Path, int] = {}  # folders this process has locked -> nesting depth


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError, OSError):
        return "holder not yet recorded"


@contextlib.contextmanager
def lock_out_dir(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder ``out`` (created if missing) while the
    block runs; raise :class:`OutDirBusy` naming the holder if another process has it.
    Re-entrant within one process."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        log.warning("no file locking on this platform: do not run two benchmarks on %s", out)
        yield out
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirBusy(f"{out} is in use by another curvlab bench run ({_holder(fd)}); "
                             "wait for it to finish or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = 1
        try:
            yield out
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def check_record(record: Any) -> str | None:
    """Why ``record`` is not a benchmark record (``None`` if it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    for name in ("key", "suite", "problem", "method", "status"):
        if not isinstance(record.get(name), str):
            return f"no string {name!r}"
    for name in ("config", "metrics"):
        if not isinstance(record.get(name), dict):
            return f"no {name!r} object"
    return None


def _parse_lines(raw: bytes) -> tuple[list[bytes], list[dict[str, Any]],
                                      list[tuple[int, str, bytes]]]:
    """Split a ``results.jsonl`` into valid lines / records (first record of each key)
    and invalid ``(line number, reason, line)``."""
    lines = raw.split(b"\n")
    cut = not raw.endswith(b"\n")  # the last line lacks its newline: an interrupted write
    if not cut:
        lines.pop()
    good, records, bad = [], [], []
    first: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line.decode("utf-8"))
            why = check_record(rec)
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        except (ValueError, RecursionError):
            why = "not valid JSON"
        if why is None and rec["key"] in first:
            why = f"a second record for key {rec['key']!r} (the first is line {first[rec['key']]})"
        if why is not None:
            if cut and i == len(lines):
                why += " (the last line, cut off: an interrupted write)"
            bad.append((i, why, line))
            continue
        first[rec["key"]] = i
        good.append(line)
        records.append(rec)
    return good, records, bad


def _describe(path: Path, bad: list[tuple[int, str, bytes]]) -> str:
    shown = "; ".join(f"line {i}: {why}" for i, why, _ in bad[:10])
    return f"{path}: {len(bad)} invalid line(s) ({shown}{'; ...' if len(bad) > 10 else ''})"


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``results.jsonl`` or ``results.json`` (file or folder).

    From a ``results.jsonl`` the valid records (first of each key); invalid lines are
    logged (the file is not changed). A ``results.json`` must be valid throughout:
    otherwise :class:`ResultsError` names the file and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl" if (path / "results.jsonl").exists() else (
            path / "results.json")
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        _, records, bad = _parse_lines(raw)
        if bad:
            log.warning("%s; they are ignored", _describe(path, bad))
        return records
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise ResultsError(f"{path} is not valid JSON ({err}); pass a results.json or "
                           "results.jsonl written by curvlab bench") from None
    runs = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(runs, list):
        raise ResultsError(f"{path} holds no list of runs; pass a results.json or "
                           "results.jsonl written by curvlab bench")
    for i, rec in enumerate(runs):
        why = check_record(rec)
        if why is not None:
            raise ResultsError(f"{path}: run {i} is not a benchmark record ({why})")
    return runs


def _stamp(path: Path | None = None) -> str:
    t = path.stat().st_mtime if path is not None else time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def _recover(out: Path) -> list[dict[str, Any]]:
    """For ``resume``: the valid records of ``results.jsonl``; invalid lines are moved
    verbatim to ``results.jsonl.invalid-<time>`` (and logged), and the file is rewritten
    with the valid lines only when something was moved or the last line was cut off."""
    jsonl = out / "results.jsonl"
    if not jsonl.exists():
        return []
    raw = jsonl.read_bytes()
    good, records, bad = _parse_lines(raw)
    if bad:
        quarantine = out / f"results.jsonl.invalid-{_stamp()}-{secrets.token_hex(2)}"
        write_atomic(quarantine, b"".join(line + b"\n" for _, _, line in bad))
        log.warning("%s; moved to %s", _describe(jsonl, bad), quarantine)
    if bad or (raw and not raw.endswith(b"\n")):
        write_atomic(jsonl, b"".join(line + b"\n" for line in good))
    return records


def _set_aside(out: Path, overwrite: bool) -> None:
    """Move the results of an earlier run out of the way (into ``earlier-<time>/``), or
    delete them with ``overwrite``."""
    found = [out / name for name in RESULT_FILES if (out / name).exists()]
    found += sorted(out.glob("results.jsonl.invalid-*"))
    if not found:
        return
    if overwrite:
        for p in found:
            p.unlink()
        log.warning("overwrite: deleted the earlier results in %s", out)
        return
    base = out / f"earlier-{_stamp(found[0])}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    log.warning("kept the earlier results of %s in %s (resume=True continues them, "
                "overwrite=True discards them)", out, dest)


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    write_atomic(path, json.dumps({"environment": env, "runs": records}, indent=1,
                                  default=float))


def run_tasks(
    tasks: Sequence[Task],
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    on_start: Callable[[Task, int, int], None] | None = None,
    on_progress: Callable[[Task, float], None] | None = None,
    on_done: Callable[[Task, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` and return all records (earlier ones included when resuming), holding
    the lock on ``out_dir`` throughout (:class:`OutDirBusy` if another run has it).

    Without ``resume`` the results of an earlier run in ``out_dir`` are moved to
    ``out_dir/earlier-<time>/`` (deleted with ``overwrite=True``); with ``resume`` the
    recorded runs are kept and skipped (invalid lines quarantined, see the module doc).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the "
                         "earlier results, overwrite discards them")
    with lock_out_dir(out_dir) as out:
        for p in out.glob(".*.tmp"):  # left by a killed writer (none is running: we hold the lock)
            if any(p.name.startswith(f".{name}.") for name in RESULT_FILES):
                p.unlink()
        jsonl = out / "results.jsonl"
        if resume:
            records = _recover(out)
        else:
            _set_aside(out, overwrite)
            records = []
        done = {r["key"] for r in records}
        env = environment(device)
        todo = [t for t in tasks if t.key not in done]
        if resume and len(todo) < len(tasks):
            log.info("resuming: %d of %d runs already recorded", len(tasks) - len(todo),
                     len(tasks))
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
                record.update(status=result.get("status", "ok"),
                              metrics=result.get("metrics", {}),
                              series=result.get("series", {}))
                if "error" in result:  # a run that failed but kept what it measured
                    record["error"] = str(result["error"])
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


def run_stages(
    stages: Sequence[Callable[[list[dict[str, Any]]], Sequence[Task]]],
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`run_tasks` for task lists that depend on earlier results (e.g. tune a
    learning rate on one seed, then run the chosen one on the others).

    Each stage is called with the records of the stages before it and returns its tasks;
    all runs go to the one ``out_dir/results.jsonl`` under one lock (the first stage
    starts or resumes it as ``resume`` / ``overwrite`` say, the later ones continue it).
    Returns the records of the tasks the stages declared (on resume, a record of a
    task no stage declares this time is kept in the file but not returned).
    """
    declared: set[str] = set()
    records: list[dict[str, Any]] = []
    with lock_out_dir(out_dir):
        for i, build in enumerate(stages):
            tasks = list(build([r for r in records if r["key"] in declared]))
            declared.update(t.key for t in tasks)
            records = run_tasks(tasks, out_dir, resume=resume or i > 0,
                                overwrite=overwrite and i == 0, **kwargs)
    return [r for r in records if r["key"] in declared]


def group_records(records: Iterable[dict[str, Any]], *fields: str) -> dict[tuple, list[dict]]:
    """Group records by the given top-level fields (e.g. ``"problem", "method"``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return groups
