"""The command line as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

from curvlab.cli import load_factory, main
from curvlab.diagnostics import curvature_summary

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    X = torch.randn(64, 4)
    return model, nn.MSELoss(), (X, X.sum(1, keepdim=True))

def not_a_triple():
    return 42
'''


def test_diagnose_user_factory_prints_table(tmp_path, capsys):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY)
    assert main(["diagnose", f"{path}:make", "--quick", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for metric in ("gradient norm", "lambda_max", "trace estimate", "max stable SGD lr"):
        assert metric in out


@pytest.mark.parametrize("target, message", [
    ("missing.py:make", "no such file"),
    ("{path}:absent", "no callable"),
    ("{path}:not_a_triple", "(model, loss_fn, data)"),
    ("{path}", "FILE.py:FACTORY"),
])
def test_diagnose_bad_target_is_a_clear_error(tmp_path, capsys, target, message):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY)
    assert main(["diagnose", target.format(path=path), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().out


def test_module_entry_point_writes_a_report(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY)
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "diagnose", f"{path}:make", "--quick",
         "--out", str(tmp_path / "report")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lambda_max" in proc.stdout
    assert (tmp_path / "report" / "index.html").is_file()


def test_cnn_example_is_a_valid_factory():
    model, loss_fn, data = load_factory(str(ROOT / "examples" / "digits_cnn.py") + ":make")()
    s = curvature_summary(model, loss_fn, data, trace_samples=6, tol=1e-2)
    assert s.num_params == sum(p.numel() for p in model.parameters())
    assert s.lambda_max > 0 and s.num_samples > 1000
