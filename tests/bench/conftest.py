"""A tiny NN benchmark problem shared by the bench tests; the folder is put on sys.path
(the suite runs in pytest's importlib mode) for the synthetic task list."""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvlab.bench.nn import NNProblem, train_run  # noqa: E402
from curvlab.bench.runner import Task  # noqa: E402


def _problem(steps=30):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = (X[:, 0] > 0).long()

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def sample(gen):
        idx = torch.randint(0, 256, (32,), generator=gen)
        return X[idx], y[idx]

    return NNProblem("toy", build, sample, (X, y), nn.CrossEntropyLoss(), target=0.45,
                     steps=steps, eval_every=5)


def _tasks(problem, lrs=(0.05, 0.2), seeds=2, method="torch.SGD"):
    tasks = []
    for lr in lrs:
        for seed in range(seeds):
            def fn(progress, lr=lr, seed=seed):
                return train_run(problem, lambda m, lr, _: torch.optim.SGD(m.parameters(), lr=lr),
                                 lr, seed, 60.0, progress)
            tasks.append(Task("nn", problem.name, method, {"lr": lr, "target": problem.target},
                              fn, seed=seed))
    return tasks


@pytest.fixture
def toy():
    """``(make_problem(steps), make_tasks(problem, lrs, seeds, method))``."""
    return _problem, _tasks
