"""Neural-network training runs for ``curvlab bench --suite nn``.

One run trains a problem's model with one optimizer at one learning rate and seed, under
a step budget and a wall-clock budget, and records the evaluation loss every
``eval_every`` steps together with the elapsed training time (evaluation excluded).
Steps to target is the first evaluation at or below the problem's target loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["NNProblem", "train_run", "digits_mlp_problem", "char_lm_problem"]


@dataclass
class NNProblem:
    """A model factory, a batch sampler and an evaluation set, plus the target loss."""

    name: str
    build: Callable[[int], nn.Module]                      # seed -> model
    sample: Callable[[torch.Generator], tuple[Any, Any]]   # generator -> (inputs, targets)
    eval_batch: tuple[Any, Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    target: float
    steps: int
    eval_every: int = 10


def digits_mlp_problem(steps: int = 400, batch_size: int = 128, target: float = 0.05
                       ) -> NNProblem:
    """The 64-128-128-10 ReLU MLP on scikit-learn's digits; eval = full training loss."""
    from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors

    (X, y), _ = load_digits_tensors()

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        return X[idx], y[idx]

    return NNProblem("digits_mlp", lambda seed: digits_mlp(seed=seed), sample, (X, y),
                     nn.CrossEntropyLoss(), target=target, steps=steps, eval_every=5)


class _SequenceCrossEntropy(nn.Module):
    """Cross-entropy over every position of ``(batch, time, vocab)`` logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1))


def char_lm_problem(steps: int = 300, quick: bool = False, target: float = 2.6) -> NNProblem:
    """A 2-layer character-level transformer (d_model 128) on the Python standard library's
    own source text; eval = validation loss in nats per character."""
    from curvlab.bench.problems.char_lm import char_batch, char_lm_model, load_char_corpus

    train, val, vocab = load_char_corpus(max_chars=300_000 if quick else 1_000_000)
    seq = 32
    gval = torch.Generator().manual_seed(1234)
    val_batch = [char_batch(val, 128, seq, gval)][0]
    d, layers = (64, 1) if quick else (128, 2)
    return NNProblem(
        "char_lm", lambda seed: char_lm_model(len(vocab), d, layers, 4, seq, seed),
        lambda gen: char_batch(train, 32, seq, gen), val_batch, _SequenceCrossEntropy(),
        target=target, steps=steps, eval_every=10)


def _evaluate(model: nn.Module, problem: NNProblem, device: str) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs, targets = (t.to(device) for t in problem.eval_batch)
        loss = float(problem.loss_fn(model(inputs), targets))
    model.train(was)
    return loss


def train_run(problem: NNProblem, make_optimizer: Callable[[nn.Module, float, str], Any],
              lr: float, seed: int, time_budget: float, progress: Callable[[float], None],
              device: str = "cpu") -> dict[str, Any]:
    """Train on ``device`` and return ``{"status", "metrics", "series"}`` for the bench
    runner; ``make_optimizer(model, lr, problem_name)`` builds the optimizer."""
    torch.manual_seed(seed)
    model = problem.build(seed).to(device)
    opt = make_optimizer(model, lr, problem.name)
    gen = torch.Generator().manual_seed(10_000 + seed)
    steps, times, losses = [0], [0.0], [_evaluate(model, problem, device)]
    train_time, status, step_times = 0.0, "ok", []
    for step in range(1, problem.steps + 1):
        inputs, targets = (t.to(device) for t in problem.sample(gen))

        def closure(inputs=inputs, targets=targets) -> torch.Tensor:
            opt.zero_grad()
            loss = problem.loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        loss = opt.step(closure)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        train_time += dt
        if loss is not None and not math.isfinite(float(loss.detach())):
            status = "diverged"
        if step % problem.eval_every == 0 or step == problem.steps or status != "ok":
            value = _evaluate(model, problem, device)
            steps.append(step)
            times.append(train_time)
            losses.append(value)
            if not math.isfinite(value) or value > 1e3 * max(losses[0], 1e-12):
                status = "diverged"
            progress(step / problem.steps)
        if status != "ok" or train_time > time_budget:
            break
    hit = next((i for i, v in enumerate(losses) if v <= problem.target), None)
    step_times.sort()
    metrics = {
        "final_loss": losses[-1],
        "best_loss": min((v for v in losses if math.isfinite(v)), default=math.inf),
        "steps_to_target": steps[hit] if hit is not None else None,
        "time_to_target": times[hit] if hit is not None else None,
        "step_time": step_times[len(step_times) // 2] if step_times else None,
        "steps_done": steps[-1],
        "train_time": train_time,
    }
    return {"status": status, "metrics": metrics,
            "series": {"step": steps, "time": times, "loss": losses}}
