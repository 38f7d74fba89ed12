"""benchmarks/bench_nn_optim.py and bench_curvature_optim.py declare their tasks for the
runner: the declarations build, and their tables come from the records."""

import argparse
import importlib.util
import math
from pathlib import Path

import pytest

from curvlab.bench.optimizers import REGISTRY

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nn_script():
    return _script("bench_nn_optim")


@pytest.fixture(scope="module")
def curvature_script():
    return _script("bench_curvature_optim")


def test_nn_optim_declares_tune_evaluate_tasks(nn_script):
    args = argparse.Namespace(quick=True, tasks="digits,charlm", seeds=3, only="")
    study = nn_script.study(args)
    assert [p.name for p in study.problems] == ["digits_mlp", "char_lm"]
    assert all(p.target is None for p in study.problems)  # set by AdamW's runs
    tune = study.stages()[0]([])
    expected = {(p, s.name, s.grid(p, quick=True)[0]) for s in REGISTRY.values()
                for p in ("digits_mlp", "char_lm")
                if not s.step_batch and s.missing() is None and s.lrs.get(p)}
    assert {(t.problem, t.method, t.config["lr"]) for t in tune} == expected
    assert {t.seed for t in tune} == {0} and len({t.key for t in tune}) == len(tune)
    # --only keeps the reference that sets the target
    only = nn_script.study(argparse.Namespace(quick=False, tasks="digits", seeds=2, only="muon"))
    assert list(only.seeds) == [0, 1]
    assert {s.name for s in only.specs} == {"torch.AdamW"} | {
        n for n in REGISTRY if "muon" in n.lower() and REGISTRY[n].missing() is None}
    with pytest.raises(SystemExit, match="unknown"):
        nn_script.study(argparse.Namespace(quick=True, tasks="mnist", seeds=1, only=""))


def test_curvature_optim_declares_grid_and_autoencoder_tasks(curvature_script):
    cs = curvature_script
    quick = cs.digits_tasks(quick=True, seeds=[0])
    assert [(t.method, t.config["lr"]) for t in quick][:6] == [
        ("torch.SGD", 0.1), ("torch.AdamW", 0.003), ("curvlab.KFAC", 0.1),
        ("curvlab.EKFAC", 0.1), ("curvlab.HessianFree", 1.0), ("curvlab.NaturalGradient", 1.0)]
    full = cs.digits_tasks(quick=False, seeds=[0, 1, 2])
    assert {t.config["steps"] for t in full if t.method in cs.EXPENSIVE} == {cs.EXPENSIVE_CAP}
    assert {t.config["steps"] for t in full if t.method not in cs.EXPENSIVE} == {400}
    assert len({t.key for t in full}) == len(full)

    (hf,) = cs.hf_autoencoder_tasks([0], budget=2.0)
    assert hf.method == "curvlab.HessianFree" and hf.config["time_budget"] == 2.0
    record = {"key": hf.key, "problem": hf.problem, "method": hf.method, "seed": 0,
              "status": "ok", "metrics": {"train_time": 2.5, "final_loss": 0.04,
                                          "steps_done": 20}}
    adam = cs.adamw_autoencoder_tasks([record], quick=False)
    assert [t.config["lr"] for t in adam] == list(cs.ADAMW.lrs["digits_autoencoder"])
    assert {t.config["time_budget"] for t in adam} == {2.5}  # the time HF took

    finals = {3e-3: 0.05, 1e-2: 0.02, 3e-2: math.inf}
    records = [record] + [{"key": t.key, "problem": t.problem, "method": t.method, "seed": 0,
                           "config": t.config, "status": "ok",
                           "metrics": {"final_loss": finals[t.config["lr"]], "steps_done": 9}}
                          for t in adam]
    (row,) = cs.autoencoder_summary(records, quick=False)["rows"]
    assert row["best_adamw"] == 0.02 and row["ratio_hf_over_adamw"] == pytest.approx(2.0)


def test_curvature_digits_summary_needs_every_seed_at_target(curvature_script):
    def rec(method, lr, seed, hit, final):
        return {"problem": "digits_mlp", "method": method, "seed": seed, "status": "ok",
                "config": {"lr": lr, "steps": 40, "target": 0.05},
                "metrics": {"steps_to_target": hit, "final_loss": final, "step_time": 1e-3}}

    records = [rec("a", 0.1, 0, 10, 0.01), rec("a", 0.1, 1, None, 0.2),
               rec("a", 0.3, 0, 20, 0.03), rec("a", 0.3, 1, 30, 0.04)]
    summary = curvature_script.digits_summary(records, quick=True, seeds=[0, 1])
    first, second = summary["rows"]
    assert first["median_steps_to_target"] is None and first["hits"] == [10, None]
    assert second["median_steps_to_target"] == 25
    assert summary["best"]["a"]["lr"] == 0.3


def test_an_out_ending_in_json_names_the_summary_beside_its_folder(tmp_path):
    from curvlab.bench.script_args import output_paths

    assert output_paths(tmp_path / "old.json") == (tmp_path / "old", tmp_path / "old.json")
    assert output_paths(tmp_path / "run") == (tmp_path / "run", tmp_path / "run" / "summary.json")


def _run_script(name, *argv, timeout=600):
    import subprocess
    import sys

    env = {**__import__("os").environ,
           "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_gpu_refuses_politely_without_an_accelerator(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("an accelerator is present: the script would run")
    gpu = _script("bench_gpu")
    assert gpu.accelerator() is None
    monkeypatch.setattr("sys.argv", ["bench_gpu.py", "--out", str(tmp_path / "out")])
    assert gpu.main() == gpu.NO_ACCELERATOR == 2
    out = capsys.readouterr().out
    assert ("found no accelerator" in out and "--dry-run" in out) or "transformers" in out
    assert not (tmp_path / "out").exists()


def test_bench_gpu_dry_run_end_to_end(tmp_path):
    """Every stage at toy size on the CPU: tuning runs, target, eager step times, table."""
    pytest.importorskip("transformers")
    out = tmp_path / "gpu"
    res = _run_script("bench_gpu", "--dry-run", "--no-compile", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["device"] == "cpu"
    methods = {r["method"] for r in summary["rows"]}
    assert {"torch.AdamW", "curvlab.Shampoo", "curvlab.SOAP"} <= methods
    assert summary["step_time_s"]["curvlab.SOAP"] > 0
    assert "target loss" in res.stdout and "step ms" in res.stdout
