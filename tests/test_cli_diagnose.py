"""`curvlab diagnose`: the report folder against dense float64 ground truth, --lr,
--precision and bad input."""

import importlib.util
import json
import math

import pytest
import torch

from curvlab import cli
from curvlab.cli import main

FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (50,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)

def not_a_model():
    return "model", None, None

def in_bfloat16():
    model, loss_fn, (X, y) = make()
    return model.to(torch.bfloat16), loss_fn, (X.to(torch.bfloat16), y)

def with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(6, 2)).double().train()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (50,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)
'''


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "small_model.py"
    path.write_text(FACTORY)
    return path


def _dense(path):
    spec = importlib.util.spec_from_file_location("_dense_user", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, loss_fn, (X, y) = mod.make()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, parts, (X,)), y)

    return f, flat, torch.autograd.functional.hessian(f, flat)


@pytest.fixture(scope="module")
def report(user_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    code = main(["diagnose", f"{user_file}:make", "--out", str(out), "--k", "3",
                 "--trace-samples", "30", "--lr", "0.7", "--precision"])
    assert code == 0
    return out


def test_report_folder_is_complete_and_self_contained(report):
    for name in ("report.json", "index.html", "top_eigenvalues.png", "spectral_density.png",
                 "layer_sharpness.png"):
        assert (report / name).stat().st_size > 0, name
    page = (report / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert ".png\"" not in page  # no links to files next to it: the page travels alone
    for section in ("Top eigenvalues", "Bottom eigenvalue", "Trace", "Stability",
                    "Per-layer sharpness", "Spectral density", "Quadratic model fit",
                    "Numerical precision"):
        assert section in page, section


def test_report_numbers_match_dense_hessian(report, user_file):
    n = json.loads((report / "report.json").read_text())
    f, flat, H = _dense(user_file)
    ev = torch.linalg.eigvalsh(H)
    top = n["top_eigenvalues"]
    assert top["converged"] and len(top["values"]) == 3
    for got, want in zip(top["values"], ev.flip(0)[:3].tolist()):
        assert abs(got - want) <= 2e-3 * abs(want)
    assert n["lambda_max"] == top["values"][0]
    bot = n["bottom_eigenvalue"]
    assert bot["value"] >= ev[0].item() - 1e-9  # a Ritz value is never below lambda_min
    assert abs(bot["value"] - ev[0].item()) <= 2e-3 * ev.abs().max().item()
    lo, hi = ev[0].item(), ev[-1].item()
    assert bot["classification"] == ("saddle" if lo < -1e-3 * hi else
                                     "minimum" if lo > 1e-3 * hi else "flat")
    tr = n["trace"]
    assert abs(tr["estimate"] - torch.trace(H).item()) <= 4 * tr["stderr"] + 1e-9
    assert tr["ci95"][0] <= tr["estimate"] <= tr["ci95"][1]
    assert n["grad_norm"] == pytest.approx(torch.func.grad(f)(flat).norm().item(), rel=1e-10)
    # per-layer sharpness = top eigenvalue of each module's diagonal block
    blocks = {"0": slice(0, 24), "2": slice(24, 38)}
    assert set(n["layer_sharpness"]) == set(blocks)
    for name, sl in blocks.items():
        want = torch.linalg.eigvalsh(H[sl, sl])[-1].item()
        assert n["layer_sharpness"][name]["lambda_max"] == pytest.approx(want, rel=2e-2)
    # the cost table adds up to the printed HVP count
    assert n["num_hvps"] == sum(c["hvps"] for c in n["cost"].values()) > 0


def test_stability_table_uses_given_lr(report):
    n = json.loads((report / "report.json").read_text())
    lam = n["lambda_max"]
    rows = {r["optimizer"].split(" ")[0] + (" nesterov" if "Nesterov" in r["optimizer"]
                                             else ""): r for r in n["stability"]}
    gd = rows["gradient"]
    assert gd["threshold"] == 2 and gd["max_stable_lr"] == pytest.approx(2 / lam)
    assert gd["lr_sharpness"] == pytest.approx(0.7 * lam)
    assert gd["stable"] == (0.7 * lam < 2)
    assert rows["SGD"]["threshold"] == pytest.approx(2 * 1.9)
    assert rows["SGD nesterov"]["threshold"] == pytest.approx(2 * 1.9 / 2.8)
    assert rows["Adam"]["threshold"] == pytest.approx(38) and rows["Adam"]["stable"] is None


def test_quadratic_fit_and_precision_sections(report):
    n = json.loads((report / "report.json").read_text())
    q = n["quadratic_fit"]
    assert q["step_unit"] == "1 / lambda_max"
    assert q["step_sizes"][0] == pytest.approx(q["step_multiples"][0] / n["lambda_max"])
    assert q["directional_derivative"] == pytest.approx(-n["grad_norm"] ** 2, rel=1e-8)
    assert abs(q["rho"][0] - 1) < 1e-2  # tiny steps: the quadratic model is exact
    assert 1.5 < q["slope_first"] < 2.5
    p = n["precision"]
    assert set(p["dtypes"]) == {"bfloat16", "float32"}
    assert p["dtypes"]["bfloat16"]["grad_error"] > p["dtypes"]["float32"]["grad_error"]
    assert "float32_matmul_precision" in p["matmul_precision"]


def test_precision_table_in_terminal_and_plain_progress(user_file, tmp_path, capsys,
                                                         monkeypatch):
    def plain(self):
        self.rich = None
    monkeypatch.setattr(cli._Console, "__init__", plain)
    assert main(["diagnose", f"{user_file}:make", "--quick", "--precision",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "[1/8] gradient" in out and "[8/8] precision" in out
    assert "precision vs float64" in out and "bfloat16" in out
    assert "Hessian-vector products" in out and "lr x lambda_max" in out
    n = json.loads((tmp_path / "r" / "report.json").read_text())
    assert n["top_eigenvalues"]["values"] and len(n["top_eigenvalues"]["values"]) == 2
    assert all(v is None or math.isfinite(v) for v in n["top_eigenvalues"]["residuals"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "lr must be a positive number"),
    (["--trace-samples", "3"], "trace_samples must be >= 6"),
    (["--k", "0"], "k must be a positive int"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
])
def test_bad_options_are_clear_errors(user_file, tmp_path, capsys, argv, message):
    assert main(["diagnose", f"{user_file}:make", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_factory_without_module_is_a_clear_error(user_file, tmp_path, capsys):
    assert main(["diagnose", f"{user_file}:not_a_model", "--out", str(tmp_path / "r")]) == 2
    assert "must be an nn.Module" in capsys.readouterr().out


def test_report_states_the_mode_of_batchnorm_and_dropout(user_file, tmp_path, capsys):
    """A model with BatchNorm / Dropout is evaluated in eval mode (the objectives' default)
    even when the factory returns it in train mode: the report says so (it did not)."""
    out = tmp_path / "bn"
    assert main(["diagnose", f"{user_file}:with_batchnorm", "--out", str(out), "--quick"]) == 0
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["mode"] == "eval" and numbers["model_in_train_mode"] is True
    assert numbers["mode_dependent_layers"] == ["BatchNorm1d", "Dropout"]
    printed = capsys.readouterr().out
    assert "came in train mode" in printed and "BatchNorm1d, Dropout" in printed
    assert "eval (BatchNorm1d, Dropout)" in (out / "index.html").read_text()
    plain = tmp_path / "plain"
    assert main(["diagnose", f"{user_file}:make", "--out", str(plain), "--quick"]) == 0
    assert json.loads((plain / "report.json").read_text())["mode_dependent_layers"] == []
    assert "running statistics" not in capsys.readouterr().out


def test_a_bfloat16_model_is_diagnosed(user_file, tmp_path, capsys):
    """Hutch++ orthogonalized its probes in the operator's dtype, and QR has no bfloat16
    CPU kernel: diagnose raised NotImplementedError on a bfloat16 model. Its numbers now
    agree with the float64 model's to bfloat16 rounding, and the terminal says the Taylor
    slopes are rounding-dominated."""
    out64, out16 = tmp_path / "f64", tmp_path / "bf16"
    assert main(["diagnose", f"{user_file}:make", "--out", str(out64), "--quick"]) == 0
    capsys.readouterr()
    assert main(["diagnose", f"{user_file}:in_bfloat16", "--out", str(out16), "--quick"]) == 0
    assert "bfloat16 roundoff flattens them" in capsys.readouterr().out
    n64, n16 = (json.loads((o / "report.json").read_text()) for o in (out64, out16))
    assert n16["lambda_max"] == pytest.approx(n64["lambda_max"], rel=0.05)
    assert math.isfinite(n16["trace"]["estimate"])


def test_a_summing_loss_is_flagged_in_the_stability_section(user_file, tmp_path, capsys):
    """With reduction="sum", lambda_max is the full-data sum's (N / B times a B-sample
    batch's): the report recorded the same stability table as for a mean loss with no hint.
    The reduction is now in report.json, and the page and terminal say what it means."""
    path = tmp_path / "summing.py"
    path.write_text(FACTORY + '''
def summing():
    model, _, data = make()
    return model, nn.CrossEntropyLoss(reduction="sum"), data
''')
    out = tmp_path / "sum"
    assert main(["diagnose", f"{path}:summing", "--out", str(out), "--quick",
                 "--lr", "0.01"]) == 0
    n = json.loads((out / "report.json").read_text())
    assert n["reduction"] == "sum" and n["num_loss_terms"] is None
    assert "The loss sums over its 50 samples" in (out / "index.html").read_text()
    assert "the loss sums over the samples" in capsys.readouterr().out
    mean = tmp_path / "mean"
    assert main(["diagnose", f"{user_file}:make", "--out", str(mean), "--quick"]) == 0
    assert json.loads((mean / "report.json").read_text())["reduction"] == "mean"
    assert "sums over" not in (mean / "index.html").read_text()
