"""Every command-line failure a user can cause: exit status 2 and one line naming the
problem and the fix, never a traceback (table-driven, as a new user would run them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = '''
import sys
import torch
from torch import nn

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

def _data(d=4):
    X = torch.randn(32, d)
    return X, X[:, :1].clone()

def raises():
    raise ValueError("boom in the factory")

def loss_is_a_string():
    return _mlp(), "mse", _data()

def shapes_mismatch():
    return _mlp(), nn.MSELoss(), _data(d=5)

def no_parameters():
    return nn.Sequential(nn.Tanh()), nn.MSELoss(), _data()

def frozen():
    model = _mlp().requires_grad_(False)
    return model, nn.MSELoss(), _data()

def nan_data():
    X, y = _data()
    X[3, 1] = float("nan")
    return _mlp(), nn.MSELoss(), (X, y)

def exits():
    sys.exit(0)

def nan_loss():
    model = _mlp()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    return model, nn.MSELoss(), _data()
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "model.py").write_text(FACTORIES)
    (d / "broken.py").write_text("def make(:\n    pass\n")
    (d / "crashes.py").write_text("import torch\nraise RuntimeError('at import')\n")
    (d / "a_file").write_text("not a folder")
    (d / "corrupt.json").write_text('{"runs": [')
    (d / "not_runs.json").write_text('{"runs": [{"key": 3}]}')
    (d / "binary.json").write_bytes(b"\xff\xfe\x00")
    ro = d / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return d


def _unwritable(files):
    if os.geteuid() != 0:
        return files / "read-only" / "out"
    if os.access("/sys", os.W_OK) and Path("/sys").is_dir():  # root: a read-only file system
        probe = Path("/sys/curvlab-write-probe")
        try:
            probe.mkdir()
        except OSError:
            return probe / "out"
        probe.rmdir()
    pytest.skip("no unwritable folder available to this user")


DIAGNOSE = [
    ("model.py:raises", [], "raised ValueError: boom in the factory at"),
    ("broken.py:make", [], "syntax error"),
    ("crashes.py:make", [], "importing"),
    ("model.py:loss_is_a_string", [], "loss_fn must be callable"),
    ("model.py:shapes_mismatch", [], "mat1 and mat2 shapes cannot be multiplied"),
    ("model.py:no_parameters", [], "no trainable parameters"),
    ("model.py:frozen", [], "no trainable parameters"),
    ("model.py:nan_data", [], "NaN/inf value(s) in data[0]"),
    ("model.py:nan_loss", [], "needs a finite loss"),
    ("model.py:exits", [], "called sys.exit(0)"),
    ("model.py:frozen", ["--out", "{files}/a_file"], "is a file"),
    ("model.py:frozen", ["--out", "{files}/a_file/sub"], "is a file"),
    ("model.py:frozen", ["--out", "UNWRITABLE"], "not writable"),
    ("model.py:frozen", ["--seed", "-1"], "--seed: must be an integer >= 0"),
    ("model.py:frozen", ["--k", "x"], "--k: invalid int value"),
    ("model.py:frozen", ["--lr", "nan"], "lr must be a positive number"),
]

BENCH = [
    (["--out", "UNWRITABLE", "--suite", "classical"], "not writable"),
    (["--out", "{files}/a_file"], "is a file"),
    (["--compare", "{files}/corrupt.json", "{files}/corrupt.json"], "is not valid JSON"),
    (["--compare", "{files}/binary.json", "{files}/corrupt.json"], "is not valid JSON"),
    (["--compare", "{files}/not_runs.json", "{files}/not_runs.json"], "not a benchmark record"),
    (["--compare", "{files}/missing.json", "{files}/corrupt.json"], "no results at"),
    (["--seeds", "-1"], "--seeds: must be an integer >= 1"),
    (["--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--time-budget", "-5"], "--time-budget: must be a finite number > 0"),
    (["--time-budget", "inf"], "--time-budget: must be a finite number > 0"),
    (["--resume", "--overwrite"], "not allowed with argument"),
    (["--device", "toaster"], "is not a torch device"),
    (["--suite", "everything"], "invalid choice"),
]


def _one_error_line(capsys, message):
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("target, extra, message", DIAGNOSE)
def test_diagnose_errors(files, tmp_path, capsys, target, extra, message):
    extra = [_unwritable(files) if a == "UNWRITABLE" else a.format(files=files)
             for a in extra]
    argv = ["diagnose", f"{files}/{target}", "--quick", "--out", str(tmp_path / "r"),
            *map(str, extra)]
    assert main(argv) == 2
    _one_error_line(capsys, message)


@pytest.mark.parametrize("argv, message", BENCH)
def test_bench_errors(files, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out lands here, if anything goes wrong
    argv = [str(_unwritable(files)) if a == "UNWRITABLE" else a.format(files=files)
            for a in argv]
    assert main(["bench", *argv]) == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "curvlab-bench").exists()


def test_the_process_prints_one_line_and_exits_2(files):
    proc = subprocess.run([sys.executable, "-m", "curvlab", "diagnose", "model.py:exits"],
                          cwd=files, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert proc.stderr == "" and proc.stdout.count("\n") == 1
    assert proc.stdout.startswith("error: model.py:exits called sys.exit(0)")
