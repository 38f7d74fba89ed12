"""Neural-network training runs for ``curvlab bench --suite nn`` and the benchmark scripts.

One run trains a problem's model with one optimizer at one learning rate and seed, under
a step budget and a wall-clock budget, and records the evaluation loss every
``eval_every`` steps together with the elapsed training time (optimizer step including
forward and backward; evaluation excluded). Steps to target is the first evaluation at
or below the problem's target loss.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvlab.bench.optimizers import OptimizerSpec
from curvlab.bench.runner import Task

__all__ = ["NNProblem", "train_run", "nn_task", "digits_mlp_problem", "char_lm_problem",
           "digits_autoencoder_problem", "DEEP_AUTOENCODER", "gpt2_problem"]


@dataclass
class NNProblem:
    """A model factory, a batch sampler and an evaluation set, plus the target loss.

    ``eval_fn(outputs, targets)`` is the evaluation metric (default ``loss_fn``); batches
    of the run with seed ``s`` come from ``torch.Generator().manual_seed(data_seed + s)``.
    ``target=None``: no fixed target (the protocol sets one from the records).
    """

    name: str
    build: Callable[[int], nn.Module]                      # seed -> model
    sample: Callable[[torch.Generator], tuple[Any, Any]]   # generator -> (inputs, targets)
    eval_batch: tuple[Any, Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    target: float | None
    steps: int
    eval_every: int = 10
    eval_fn: Callable[[Any, Any], torch.Tensor] | None = None
    data_seed: int = 10_000
    held_out: tuple[Any, Any] | None = None  # evaluated once at the end of a run


def digits_mlp_problem(steps: int = 400, batch_size: int = 128, target: float | None = 0.05,
                       eval_every: int = 5, data_seed: int = 10_000) -> NNProblem:
    """The 64-128-128-10 ReLU MLP on scikit-learn's digits; eval = full training loss."""
    from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors

    (X, y), _ = load_digits_tensors()

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        return X[idx], y[idx]

    return NNProblem("digits_mlp", lambda seed: digits_mlp(seed=seed), sample, (X, y),
                     nn.CrossEntropyLoss(), target=target, steps=steps, eval_every=eval_every,
                     data_seed=data_seed)


class _SequenceCrossEntropy(nn.Module):
    """Cross-entropy over every position of ``(batch, time, vocab)`` logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1))


def char_lm_problem(steps: int = 300, quick: bool = False, target: float | None = 2.6,
                    batch_size: int = 32, val_size: int = 128, eval_every: int = 10,
                    data_seed: int = 10_000) -> NNProblem:
    """A 2-layer character-level transformer (d_model 128; ``quick``: 1 layer, d_model 64,
    a shorter corpus) on the Python standard library's own source text, context 32;
    eval = validation loss in nats per character on ``val_size`` fixed windows."""
    from curvlab.bench.problems.char_lm import char_batch, char_lm_model, load_char_corpus

    train, val, vocab = load_char_corpus(max_chars=300_000 if quick else 1_000_000)
    seq = 32
    val_batch = char_batch(val, val_size, seq, torch.Generator().manual_seed(1234))
    d, layers = (64, 1) if quick else (128, 2)
    return NNProblem(
        "char_lm", lambda seed: char_lm_model(len(vocab), d, layers, 4, seq, seed),
        lambda gen: char_batch(train, batch_size, seq, gen), val_batch, _SequenceCrossEntropy(),
        target=target, steps=steps, eval_every=eval_every, data_seed=data_seed)


def gpt2_problem(steps: int = 300, quick: bool = False, target: float | None = 2.6,
                 batch_size: int = 32, val_size: int = 128, eval_every: int = 10,
                 data_seed: int = 10_000) -> NNProblem:
    """A tiny GPT-2 (``transformers``, random weights, default attention, no dropout;
    2 layers, d_model 128, 4 heads; ``quick``: 1 layer, d_model 64) on the same text,
    windows and evaluation as :func:`char_lm_problem`. Needs ``transformers``
    (:func:`curvlab.bench.problems.gpt2.gpt2_available`)."""
    from curvlab.bench.problems.char_lm import char_batch, load_char_corpus
    from curvlab.bench.problems.gpt2 import gpt2_model

    train, val, vocab = load_char_corpus(max_chars=300_000 if quick else 1_000_000)
    seq = 32
    val_batch = char_batch(val, val_size, seq, torch.Generator().manual_seed(1234))
    d, layers = (64, 1) if quick else (128, 2)
    return NNProblem(
        "gpt2", lambda seed: gpt2_model(len(vocab), d, layers, 4, seq, seed),
        lambda gen: char_batch(train, batch_size, seq, gen), val_batch, _SequenceCrossEntropy(),
        target=target, steps=steps, eval_every=eval_every, data_seed=data_seed)


def _reconstruction_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - targets).square().mean()


DEEP_AUTOENCODER = (64, 256, 128, 64, 16, 64, 128, 256, 64)


def digits_autoencoder_problem(batch_size: int | None = 128, steps: int = 10**9,
                               eval_every: int = 100, data_seed: int = 0,
                               activation: str = "sigmoid",
                               sizes: tuple[int, ...] | None = None,
                               test_fraction: float = 0.0) -> NNProblem:
    """The deep autoencoder of Hinton & Salakhutdinov (2006) / Martens (2010) at digits
    scale: by default 64-32-16-8-16-32-64 sigmoid (``sizes``: the layer widths, e.g.
    :data:`DEEP_AUTOENCODER`; ``activation``: "sigmoid", "tanh" or "relu" hidden units)
    on the digits pixels in [0, 1], logistic outputs (loss: binary cross-entropy with
    logits); eval = reconstruction error (mean squared error of the sigmoid outputs) on
    all 1797 images, or with ``test_fraction > 0`` on the training split, the rest held
    out (``NNProblem.held_out``, the split drawn with seed 0). ``batch_size=None``: full
    batch. The default step budget is unbounded: runs are meant to stop at a time budget.
    The name is "digits_autoencoder" for the defaults, else it names what differs."""
    from sklearn.datasets import load_digits

    from curvlab.bench.problems.digits import digits_autoencoder

    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    X = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float32)
    held_out = None
    if test_fraction > 0:
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        n_test = int(round(test_fraction * len(X)))
        held_out = (X[perm[:n_test]], X[perm[:n_test]])
        X = X[perm[n_test:]]
    arch = tuple(sizes) if sizes is not None else (64, 32, 16, 8, 16, 32, 64)

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size is None:
            return X, X
        idx = torch.randint(0, len(X), (batch_size,), generator=gen)
        return X[idx], X[idx]

    name = "digits_autoencoder"
    if activation != "sigmoid" or sizes is not None:
        name += f"_{activation}" + ("" if sizes is None else "_" + "-".join(map(str, arch)))
    if test_fraction > 0:
        name += f"_test{test_fraction:g}"
    return NNProblem(name, lambda seed: digits_autoencoder(arch, seed=seed, activation=activation),
                     sample, (X, X), nn.BCEWithLogitsLoss(), target=None, steps=steps,
                     eval_every=eval_every, eval_fn=_reconstruction_error, data_seed=data_seed,
                     held_out=held_out)


def _evaluate(model: nn.Module, problem: NNProblem, device: str,
              batch: tuple[Any, Any] | None = None) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs, targets = (t.to(device) for t in (batch or problem.eval_batch))
        loss = float((problem.eval_fn or problem.loss_fn)(model(inputs), targets))
    model.train(was)
    return loss


def train_run(problem: NNProblem, make_optimizer: Callable[[nn.Module, float, str], Any],
              lr: float, seed: int, time_budget: float, progress: Callable[[float], None],
              device: str = "cpu", step_batch: bool = False, use_closure: bool = True,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Train on ``device`` and return ``{"status", "metrics", "series"}`` for the bench
    runner; ``make_optimizer(model, lr, problem_name)`` builds the optimizer.

    The run stops after ``problem.steps`` steps, once the training time exceeds
    ``time_budget`` seconds (the model is evaluated there), or on divergence (a non-finite
    loss, or an evaluation above 1000x the initial one: status ``"diverged"``). A
    ``RuntimeError`` raised by the optimizer's step (e.g. a peer's failed matrix
    function) ends the run with status ``"error"``, the message in ``"error"``, and the
    curve up to there (final loss ``inf``). ``step_batch``: call
    ``opt.step(closure, batch=(inputs, targets))`` (optimizers that take the batch
    explicitly: Hessian-free, natural gradient), without the closure if not
    ``use_closure`` (the optimizer computes loss and gradient itself). A problem with a
    ``held_out`` batch adds its final evaluation as metric ``"held_out_loss"``. ``clock``
    measures the training time (default wall time; ``time.process_time``, this process's
    CPU time, makes budgets comparable on a shared machine when torch runs one thread).
    """
    torch.manual_seed(seed)
    model = problem.build(seed).to(device)
    opt = make_optimizer(model, lr, problem.name)
    gen = torch.Generator().manual_seed(problem.data_seed + seed)
    steps, times, losses = [0], [0.0], [_evaluate(model, problem, device)]
    train_time, status, step_times, error, done = 0.0, "ok", [], None, 0
    for step in range(1, problem.steps + 1):
        inputs, targets = (t.to(device) for t in problem.sample(gen))

        def closure(inputs=inputs, targets=targets) -> torch.Tensor:
            opt.zero_grad()
            loss = problem.loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        t0 = clock()
        try:
            if not step_batch:
                loss = opt.step(closure)
            elif use_closure:
                loss = opt.step(closure, batch=(inputs, targets))
            else:
                loss = opt.step(batch=(inputs, targets))
        except RuntimeError as err:
            status, error = "error", f"step {step}: {type(err).__name__}: {err}"
            break
        dt = clock() - t0
        done = step
        step_times.append(dt)
        train_time += dt
        if loss is not None and not math.isfinite(float(loss.detach())):
            status = "diverged"
        out_of_time = train_time > time_budget
        if (step % problem.eval_every == 0 or step == problem.steps or status != "ok"
                or out_of_time):
            value = _evaluate(model, problem, device)
            steps.append(step)
            times.append(train_time)
            losses.append(value)
            if not math.isfinite(value) or value > 1e3 * max(losses[0], 1e-12):
                status = "diverged"
            progress(max(step / problem.steps,
                         min(train_time / time_budget, 1.0) if time_budget > 0 else 1.0))
        if status != "ok" or out_of_time:
            break
    target = problem.target
    hit = (None if target is None
           else next((i for i, v in enumerate(losses) if v <= target), None))
    metrics = {
        "final_loss": math.inf if status == "error" else losses[-1],
        "best_loss": min((v for v in losses if math.isfinite(v)), default=math.inf),
        "steps_to_target": steps[hit] if hit is not None else None,
        "time_to_target": times[hit] if hit is not None else None,
        "step_time": statistics.median(step_times) if step_times else None,
        "steps_done": done,
        "train_time": train_time,
    }
    if problem.held_out is not None and status != "error":
        metrics["held_out_loss"] = _evaluate(model, problem, device, problem.held_out)
    result = {"status": status, "metrics": metrics,
              "series": {"step": steps, "time": times, "loss": losses}}
    if error is not None:
        result["error"] = error
    return result


def nn_task(suite: str, problem: NNProblem, spec: OptimizerSpec, lr: float, seed: int, *,
            time_budget: float = math.inf, device: str = "cpu",
            config: dict[str, Any] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> Task:
    """One :func:`train_run` of ``spec`` at ``lr`` as a runner task; its key names the
    problem, the method, the seed, ``lr``, the step budget, the target and ``config``
    (``clock``: see :func:`train_run`)."""

    def fn(progress: Callable[[float], None]) -> dict[str, Any]:
        return train_run(problem, spec.make, lr, seed, time_budget, progress, device,
                         step_batch=spec.step_batch, use_closure=spec.closure, clock=clock)

    return Task(suite, problem.name, spec.name,
                {"lr": lr, "steps": problem.steps, "target": problem.target, **(config or {})},
                fn, seed=seed)
