"""curvlab bench loses nothing: one run per --out (the other refuses, naming it), kills
followed by --resume give one record per key and the report of a clean run, earlier
results are never overwritten silently, invalid lines are quarantined, not dropped."""

import json
import os
import random
import signal
import threading
import time

import pytest
from _synthetic_bench import METHODS, PROBLEMS, synthetic_tasks
from test_bench import _Cells

from curvlab.bench import suites
from curvlab.bench.report import summarize
from curvlab.bench.runner import (
    OutDirBusy,
    ResultsError,
    load_results,
    lock_out_dir,
    run_tasks,
    write_atomic,
)
from curvlab.cli import main

N_TASKS = PROBLEMS * len(METHODS)


def _fork_bench(out, *args, delay=0.02):
    """``curvlab bench --out OUT ARGS`` on the synthetic tasks in a forked process (no
    interpreter start-up); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            suites.build_tasks = synthetic_tasks
            os.environ["SYNTH_DELAY"] = str(delay)
            code = main(["bench", "--out", str(out), *args])
        finally:
            os._exit(code)
    return pid


def _exit_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _lines(out):
    path = out / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait(cond, timeout=120.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _table_rows(out):
    parser = _Cells()
    parser.feed((out / "report.html").read_text())
    return [r for r in parser.rows if r]


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(suites, "build_tasks", synthetic_tasks)
    monkeypatch.setenv("SYNTH_DELAY", "0")


@pytest.fixture
def clean(tmp_path_factory, synthetic):
    out = tmp_path_factory.mktemp("clean")
    assert main(["bench", "--out", str(out)]) == 0
    return out


def test_a_second_run_on_the_same_out_refuses_and_names_the_first(tmp_path, synthetic,
                                                                  capsys):
    first = _fork_bench(tmp_path, delay=0.03)
    _wait(lambda: _lines(tmp_path) >= 2)
    assert main(["bench", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().out.strip()
    assert err.count("\n") == 0 and "in use by another curvlab bench run" in err
    assert f"pid {first} on " in err
    assert _exit_code(first) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == len({r["key"] for r in records}) == N_TASKS
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == N_TASKS


def test_kills_then_resume_give_one_record_per_key_and_the_clean_report(tmp_path, clean,
                                                                       capsys):
    rng = random.Random(1)
    for i in range(2):  # SIGKILL at a random point of a run (and of a resumed run)
        pid = _fork_bench(tmp_path, *(["--resume"] if i else []))
        target = _lines(tmp_path) + rng.randint(1, 10)
        _wait(lambda t=target: _lines(tmp_path) >= t)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        assert _exit_code(pid) == -signal.SIGKILL
        assert 0 < _lines(tmp_path) < N_TASKS
    assert main(["bench", "--out", str(tmp_path), "--resume"]) == 0
    keys = [json.loads(line)["key"] for line in
            (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(t.key for t in synthetic_tasks()[0])  # once each
    assert not list(tmp_path.glob(".*.tmp"))  # temporary files of killed writers removed
    got, want = load_results(tmp_path), load_results(clean)
    assert summarize(got) == summarize(want)
    assert summarize(got)["classical"][0]["problems"] == PROBLEMS
    strip = ("environment", "wall_time")
    assert (sorted(({k: v for k, v in r.items() if k not in strip} for r in got),
                   key=lambda r: r["key"])
            == sorted(({k: v for k, v in r.items() if k not in strip} for r in want),
                      key=lambda r: r["key"]))
    assert _table_rows(tmp_path) == _table_rows(clean)


def test_a_rerun_keeps_the_earlier_results_unless_told(tmp_path, synthetic):
    assert main(["bench", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "results.jsonl").read_bytes()
    report = (tmp_path / "report.html").read_bytes()
    assert main(["bench", "--out", str(tmp_path)]) == 0
    assert main(["bench", "--out", str(tmp_path)]) == 0
    earlier = sorted(tmp_path.glob("earlier-*"))
    assert len(earlier) == 2
    for d in earlier:
        assert {p.name for p in d.iterdir()} == {"results.jsonl", "results.json", "report.html"}
    assert (earlier[0] / "results.jsonl").read_bytes() == first
    assert (earlier[0] / "report.html").read_bytes() == report
    assert main(["bench", "--out", str(tmp_path), "--overwrite"]) == 0
    assert len(sorted(tmp_path.glob("earlier-*"))) == 2
    assert len(load_results(tmp_path)) == N_TASKS


def test_resume_keeps_every_valid_record_and_quarantines_the_rest(tmp_path, synthetic,
                                                                  caplog):
    tasks = synthetic_tasks()[0][:6]
    run_tasks(tasks[:3], tmp_path)
    jsonl = tmp_path / "results.jsonl"
    good = jsonl.read_bytes().splitlines(keepends=True)
    bad = [b'{"key": "cut off in the middle\n', b'[1, 2, 3]\n', b'{"key": "k"}\n',
           b"\xff\xfe not utf-8\n", good[0]]
    jsonl.write_bytes(good[0] + bad[0] + good[1] + bad[1] + bad[2] + bad[3] + good[2] +
                      bad[4] + b'{"key": "cut by a kill')
    records = run_tasks(tasks, tmp_path, resume=True)
    assert sorted(r["key"] for r in records) == sorted(t.key for t in tasks)
    lines = jsonl.read_bytes().splitlines(keepends=True)
    assert lines[:3] == good  # the valid records, byte for byte, in order
    assert len(lines) == len(tasks)
    (quarantine,) = tmp_path.glob("results.jsonl.invalid-*")
    assert quarantine.read_bytes() == b"".join(bad) + b'{"key": "cut by a kill\n'
    message = " ".join(r.getMessage() for r in caplog.records)
    assert summarize(records) == summarize(run_tasks(tasks, tmp_path / "clean"))
    for why in ("line 2: not valid JSON", "line 4: a JSON list, not a record",
                "line 5: no string 'suite'", "line 6: not UTF-8 text",
                "line 8: a second record for key", "interrupted write"):
        assert why in message


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the lock until killed
        try:
            with lock_out_dir(tmp_path):
                os.write(go, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        with pytest.raises(OutDirBusy, match=f"pid {pid} on .*, started "):
            with lock_out_dir(tmp_path):
                pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with lock_out_dir(tmp_path), lock_out_dir(tmp_path):  # free again; re-entrant
        pass


def test_concurrent_atomic_writes_use_their_own_temporary_files(tmp_path):
    path, errors = tmp_path / "results.json", []

    def writer(tag):
        try:
            for i in range(200):
                write_atomic(path, json.dumps({"writer": tag, "i": i}))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("text, message", [
    ('{"runs": [', "is not valid JSON"), ('{"environment": {}}', "holds no list of runs"),
    ('{"runs": [{"key": 1}]}', "run 0 is not a benchmark record"),
])
def test_a_bad_results_json_is_a_results_error(tmp_path, text, message):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ResultsError, match=message):
        load_results(tmp_path / "results.json")
