"""The bench suites' building blocks on real solvers and optimizers."""

import math

import pytest
import torch
from torch import nn

from curvlab.bench.classical import classical_tasks
from curvlab.bench.optimizers import REGISTRY, available
from curvlab.bench.suites import SuiteOptions, build_tasks


def test_classical_task_verifies_the_gradient_and_records_the_path():
    tasks, _ = classical_tasks(quick=True)
    task = next(t for t in tasks if t.problem.startswith("Rosenbrock") and
                t.method == "curvlab lbfgs")
    result = task.fn(lambda frac: None)
    m = result["metrics"]
    assert result["status"] == "ok" and m["solved"] and m["grad_inf"] <= 1e-5
    path = result["series"]["path"]
    assert len(path) > 5 and path[0] != path[-1]
    assert all(abs(c - 1) < 1e-4 for c in path[-1])


@pytest.mark.parametrize("name", [n for n in REGISTRY if REGISTRY[n].missing() is None])
def test_every_installed_optimizer_takes_a_finite_step(name):
    spec = REGISTRY[name]
    problem = "digits_mlp" if "digits_mlp" in spec.lrs else "char_lm"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    X, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    opt = spec.make(model, spec.lrs[problem][0], problem)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(closure)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_suites_list_tasks_and_skip_missing_peers_with_a_notice():
    specs, notices = available()
    assert any(s.family == "curvlab" for s in specs)
    assert any("DistributedShampoo" in n for n in notices)
    tasks, _ = build_tasks("nn", SuiteOptions(quick=True, seeds=2))
    assert {t.method for t in tasks} >= {"torch.AdamW", "curvlab.SOAP", "curvlab.KFAC"}
    assert all(math.isfinite(t.config["lr"]) for t in tasks)
    with pytest.raises(ValueError, match="suite"):
        build_tasks("everything", SuiteOptions())
