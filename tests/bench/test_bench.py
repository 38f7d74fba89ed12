"""curvlab bench: records appended per run, resume, report numbers = measured numbers."""

import html.parser
import json
import statistics

import pytest

from curvlab.bench.compare import compare_results
from curvlab.bench.report import write_report
from curvlab.bench.runner import Task, load_results, run_tasks


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self._col = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append({})
        if tag == "td":
            self._col = attrs.get("data-col")

    def handle_data(self, data):
        if self._col:
            self.rows[-1][self._col] = data

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None


def test_report_numbers_are_rederived_from_results_json(tmp_path, toy):
    _problem, _tasks = toy
    problem = _problem()
    run_tasks(_tasks(problem) + _tasks(problem, method="torch.AdamW"), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 8 and "torch" in data["environment"]
    page = write_report(data["runs"], tmp_path).read_text()
    assert page.count("data:image/png;base64,") >= 2

    parser = _Cells()
    parser.feed(page)
    shown = {r["method"]: r for r in parser.rows if r.get("method")}
    for method in ("torch.SGD", "torch.AdamW"):
        runs = [r for r in data["runs"] if r["method"] == method]
        # independent re-derivation: best lr = lowest median final loss among lrs where
        # every seed reached the target with the fewest median steps
        by_lr = {}
        for r in runs:
            by_lr.setdefault(r["config"]["lr"], []).append(r)

        def key(item):
            steps = [r["metrics"]["steps_to_target"] for r in item[1]]
            med = statistics.median(steps) if None not in steps else float("inf")
            return med, statistics.median(r["metrics"]["final_loss"] for r in item[1])

        lr, best = min(by_lr.items(), key=key)
        assert float(shown[method]["lr"]) == lr
        final = statistics.median(r["metrics"]["final_loss"] for r in best)
        assert float(shown[method]["final_loss"]) == pytest.approx(final, rel=1e-3)
        steps = [r["metrics"]["steps_to_target"] for r in best]
        if None not in steps:
            assert float(shown[method]["steps_to_target"]) == statistics.median(steps)


def test_interrupted_run_resumes_without_losing_results(tmp_path, toy):
    _problem, _tasks = toy
    problem = _problem(steps=10)
    tasks = _tasks(problem)
    calls = []

    def killer(progress):
        raise KeyboardInterrupt  # what Ctrl-C / a kill does mid-run

    interrupted = tasks[:2] + [Task("nn", "toy", "killer", {"lr": 1}, killer)] + tasks[2:]
    with pytest.raises(KeyboardInterrupt):
        run_tasks(interrupted, tmp_path)
    assert len(load_results(tmp_path)) == 2
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write('{"key": "half-written')  # a write cut off by the kill

    def counting(task):
        def fn(progress):
            calls.append(task.key)
            return task.fn(progress)
        return Task(task.suite, task.problem, task.method, task.config, fn, seed=task.seed)

    records = run_tasks([counting(t) for t in tasks], tmp_path, resume=True)
    assert calls == [t.key for t in tasks[2:]]
    assert sorted(r["key"] for r in records) == sorted(t.key for t in tasks)
    assert sorted(r["key"] for r in load_results(tmp_path)) == sorted(t.key for t in tasks)


def test_failing_run_is_recorded_and_compare_reports_changes(tmp_path, toy):
    _problem, _tasks = toy
    problem = _problem(steps=10)

    def broken(progress):
        raise RuntimeError("boom")

    old = run_tasks(_tasks(problem, lrs=(0.1,), seeds=1) +
                    [Task("nn", "toy", "broken", {"lr": 1}, broken)], tmp_path / "old")
    assert [r["status"] for r in old] == ["ok", "error"]
    assert "boom" in old[1]["error"]
    rows = compare_results(tmp_path / "old" / "results.json", tmp_path / "old" / "results.json")
    assert rows and all(r["verdict"] == "same" for r in rows)
