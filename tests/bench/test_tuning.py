"""Tune-then-evaluate through the runner's stages, the interleaved step time, and the
training-run behaviours the benchmark scripts rely on."""

import dataclasses
import math
import statistics

import pytest
import torch

from curvlab.bench.nn import digits_autoencoder_problem, nn_task, train_run
from curvlab.bench.optimizers import OptimizerSpec
from curvlab.bench.runner import Task, run_stages, run_tasks
from curvlab.bench.steptime import interleaved_step_times
from curvlab.bench.tuning import TunedStudy, area_under_curve, reach


def _adamw(m, lr, problem):
    return torch.optim.AdamW(m.parameters(), lr=lr)


def _sgd(m, lr, problem):
    return torch.optim.SGD(m.parameters(), lr=lr)


ADAMW = OptimizerSpec("torch.AdamW", _adamw, {"toy": (0.003, 0.03)}, "baseline", "adamw")
SGD = OptimizerSpec("torch.SGD", _sgd, {"toy": (0.05, 0.5)}, "baseline", "sgd")


def _study(problem):
    return TunedStudy("nn", [problem], [ADAMW, SGD], seeds=[0, 1],
                      step_time_rounds={"toy": 4})


def test_tuned_study_runs_in_stages_and_resumes(tmp_path, toy):
    make_problem, _ = toy
    study = _study(make_problem(steps=10))
    started = []

    def on_start(task, i, n):
        started.append(task.key)

    # a run stopped after the tuning stage, then resumed: only the rest runs
    tuned = run_stages(study.stages()[:1], tmp_path, on_start=on_start)
    assert {(r["method"], r["seed"]) for r in tuned} == {(m, 0) for m in ("torch.AdamW",
                                                                          "torch.SGD")}
    assert len(tuned) == 4
    started.clear()
    records = run_stages(study.stages(), tmp_path, resume=True, on_start=on_start)
    assert len(started) == 3 and len(records) == 7  # 2 evaluations + 1 step-time task

    problem = study.problems[0]
    for spec in (ADAMW, SGD):
        seed0 = {r["config"]["lr"]: r for r in tuned if r["method"] == spec.name}
        aucs = {lr: statistics.mean(v for k, v in zip(r["series"]["step"],
                                                      r["series"]["loss"]) if k > 0)
                for lr, r in seed0.items()}
        lr = min(aucs, key=aucs.get)
        assert study.chosen_lr(records, problem, spec) == (lr, aucs)
        evaluated = [r for r in records if r["method"] == spec.name and r["seed"] == 1]
        assert [r["config"]["lr"] for r in evaluated] == [lr]

    # target: AdamW's median over seeds of the evaluation nearest 75% of 10 steps (step 5)
    ref_lr = study.chosen_lr(records, problem, ADAMW)[0]
    ref = [r for r in records if r["method"] == "torch.AdamW" and r["config"]["lr"] == ref_lr]
    target = statistics.median(r["series"]["loss"][r["series"]["step"].index(5)] for r in ref)
    rows = study.rows(records)
    assert [r["method"] for r in rows] == ["torch.AdamW", "torch.SGD"]
    assert all(r["target"] == target for r in rows)
    adam = rows[0]
    assert adam["steps_to_target"] == statistics.median(reach(r, target)[0] for r in ref)
    times, errors = study.step_times(records)
    assert set(times) == {("toy", "torch.AdamW"), ("toy", "torch.SGD")} and errors == {}

    started.clear()  # everything recorded: nothing runs again, the same table comes out
    again = run_stages(study.stages(), tmp_path, resume=True, on_start=on_start)
    assert started == [] and study.rows(again) == rows


def test_study_needs_its_reference(toy):
    make_problem, _ = toy
    with pytest.raises(ValueError, match="reference"):
        TunedStudy("nn", [make_problem()], [SGD], seeds=[0])


def test_area_under_curve_and_reach_ignore_step_zero_and_unfinished_runs():
    record = {"status": "ok", "metrics": {},
              "series": {"step": [0, 5, 10], "loss": [0.1, 2.0, 1.0], "time": [0, 1, 2]}}
    assert area_under_curve(record) == 1.5
    assert reach(record, 1.5) == (10, 2) and reach(record, 0.5) == (None, None)
    assert area_under_curve({**record, "status": "diverged"}) == math.inf


def test_run_stages_feeds_each_stage_the_records_before_it(tmp_path):
    seen = []

    def task(name, value):
        return Task("t", "p", name, {}, lambda progress: {"metrics": {"v": value}})

    def second(records):
        seen.append([r["method"] for r in records])
        return [task("b", records[0]["metrics"]["v"] + 1)]

    records = run_stages([lambda records: [task("a", 1)], second], tmp_path)
    assert seen == [["a"]] and [r["metrics"]["v"] for r in records] == [1, 2]
    # a record of a task no stage declares this time stays in the file, is not returned
    only_b = run_stages([lambda records: [task("b", 2)]], tmp_path, resume=True)
    assert [r["method"] for r in only_b] == ["b"]


def test_train_run_evaluates_where_the_time_budget_stops_it(toy):
    make_problem, _ = toy
    result = train_run(make_problem(steps=50), _sgd, 0.1, 0, 0.0, lambda f: None)
    m, s = result["metrics"], result["series"]
    assert result["status"] == "ok" and m["steps_done"] == 1 and s["step"] == [0, 1]
    assert m["final_loss"] == s["loss"][-1] != s["loss"][0]


class _Failing(torch.optim.SGD):
    """SGD whose third step raises, as a peer's failed matrix function does."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise torch.linalg.LinAlgError("linalg.svd: failed to converge")
        return super().step(closure)


def test_train_run_records_an_optimizer_failure_with_the_curve_so_far(tmp_path, toy):
    make_problem, _ = toy
    problem = make_problem(steps=10)
    problem.eval_every = 1
    spec = OptimizerSpec("failing", lambda m, lr, p: _Failing(m.parameters(), lr=lr),
                         {"toy": (0.1,)}, "peer", "sgd")
    (record,) = run_tasks([nn_task("nn", problem, spec, 0.1, 0)], tmp_path)
    assert record["status"] == "error" and "LinAlgError" in record["error"]
    assert record["series"]["step"] == [0, 1, 2] and record["metrics"]["steps_done"] == 2
    assert record["metrics"]["final_loss"] == math.inf


class _BatchOptimizer(torch.optim.SGD):
    def step(self, closure=None, *, batch=None):
        self.seen = (closure is not None, batch is not None)
        if closure is None:  # its own loss and gradient from the batch
            x, y = batch
            self.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            super().step()
            return loss
        return super().step(closure)


@pytest.mark.parametrize("closure", [True, False])
def test_specs_that_take_the_batch_get_it(toy, closure):
    make_problem, _ = toy
    made = []

    def make(m, lr, problem):
        opt = _BatchOptimizer(m.parameters(), lr=lr)
        opt.model = m
        made.append(opt)
        return opt

    spec = OptimizerSpec("batched", make, {"toy": (0.1,)}, "curvlab", "x", step_batch=True,
                         closure=closure)
    result = nn_task("nn", make_problem(steps=3), spec, 0.1, 0).fn(lambda f: None)
    assert result["status"] == "ok" and made[0].seen == (closure, True)


def test_a_spec_without_closure_must_take_the_batch():
    with pytest.raises(ValueError, match="step_batch"):
        OptimizerSpec("x", _sgd, {}, "curvlab", "x", closure=False)


def test_interleaved_step_times(toy):
    make_problem, _ = toy
    problem = make_problem()
    failing = OptimizerSpec("failing", lambda m, lr, p: _Failing(m.parameters(), lr=lr),
                            {}, "peer", "sgd")
    times, errors = interleaved_step_times(
        problem, [(ADAMW, 0.01), (SGD, 0.1), (failing, 0.1)], rounds=4)
    assert set(times) == {"torch.AdamW", "torch.SGD", "failing"}
    assert all(t > 0 for t in times.values())
    assert list(errors) == ["failing"] and "LinAlgError" in errors["failing"]
    batched = OptimizerSpec("hf", _sgd, {}, "curvlab", "hf", step_batch=True)
    with pytest.raises(ValueError, match="fixed gradient"):
        interleaved_step_times(problem, [(batched, 1.0)], rounds=4)


def test_step_time_of_an_optimizer_whose_hooks_capture_statistics(toy):
    """K-FAC's step reads the statistics its hooks record in this step's forward/backward:
    with ``hooks=True`` the session runs that pass (untimed) before each timed step; without
    it every step raises (no statistics captured) and K-FAC gets no time."""
    from curvlab.bench.optimizers import REGISTRY

    make_problem, _ = toy
    kfac = REGISTRY["curvlab.KFAC"]
    assert kfac.hooks
    times, errors = interleaved_step_times(make_problem(), [(ADAMW, 0.01), (kfac, 0.1)],
                                           rounds=6)
    assert not errors and times["curvlab.KFAC"] > 0
    plain = dataclasses.replace(kfac, hooks=False)
    times, errors = interleaved_step_times(make_problem(), [(plain, 0.1)], rounds=6)
    assert "no statistics were captured" in errors["curvlab.KFAC"]


def test_autoencoder_problem_evaluates_the_reconstruction_error():
    problem = digits_autoencoder_problem(batch_size=None, steps=1)
    X = problem.eval_batch[0]
    assert X.min() >= 0 and X.max() <= 1 and problem.sample(None)[0] is X
    result = train_run(problem, _adamw, 0.0, 0, math.inf, lambda f: None)
    model = problem.build(0)
    with torch.no_grad():
        mse = float((torch.sigmoid(model(X)) - X).square().mean())
    assert result["series"]["loss"][0] == pytest.approx(mse, rel=1e-6)


def test_study_needs_the_reference_on_every_problem(toy):
    make_problem, _ = toy
    elsewhere = OptimizerSpec("torch.AdamW", _adamw, {"other": (0.01,)}, "baseline", "adamw")
    with pytest.raises(ValueError, match="no learning rates for 'toy'"):
        TunedStudy("nn", [make_problem()], [elsewhere, SGD], seeds=[0])


def test_deep_autoencoder_problems_units_split_and_clock():
    """The activation sets the hidden units; test_fraction holds out a disjoint split whose
    error train_run reports; the clock argument measures the training time."""
    from curvlab.bench.nn import DEEP_AUTOENCODER

    problem = digits_autoencoder_problem(batch_size=8, steps=2, activation="relu",
                                         sizes=DEEP_AUTOENCODER, test_fraction=0.2)
    assert problem.name == "digits_autoencoder_relu_64-256-128-64-16-64-128-256-64_test0.2"
    model = problem.build(0)
    assert [type(m).__name__ for m in model[1::2]] == ["ReLU"] * 7
    assert [m.out_features for m in model[::2]] == list(DEEP_AUTOENCODER[1:])
    train, test = problem.eval_batch[0], problem.held_out[0]
    assert (len(train), len(test)) == (1438, 359)
    full = digits_autoencoder_problem().eval_batch[0]  # the two splits partition the data
    torch.testing.assert_close(torch.cat([train, test]).sum(0), full.sum(0))
    ticks = iter(range(100))
    result = train_run(problem, _adamw, 0.0, 0, math.inf, lambda f: None,
                       clock=lambda: float(next(ticks)))
    assert result["metrics"]["train_time"] == 2.0  # one tick per step
    with torch.no_grad():
        mse = float((torch.sigmoid(problem.build(0)(test)) - test).square().mean())
    assert result["metrics"]["held_out_loss"] == pytest.approx(mse, rel=1e-6)
    assert "held_out_loss" not in train_run(digits_autoencoder_problem(batch_size=8, steps=1),
                                            _adamw, 0.0, 0, math.inf,
                                            lambda f: None)["metrics"]
    with pytest.raises(ValueError, match="activation"):
        digits_autoencoder_problem(activation="gelu").build(0)
    with pytest.raises(ValueError, match="test_fraction"):
        digits_autoencoder_problem(test_fraction=1.0)


def test_compiled_step_time_session_times_each_compiled_variant_beside_its_eager_one(
        toy, tmp_path):
    make_problem, _ = toy
    problem = make_problem()
    made = []

    def compiled_sgd(m, lr, p):  # stands in for a compiled optimizer (no compilation here)
        made.append(lr)
        return torch.optim.SGD(m.parameters(), lr=lr)

    sgd = OptimizerSpec("torch.SGD", _sgd, {"toy": (0.1,)}, "baseline", "sgd",
                        make_compiled=compiled_sgd)
    glob = OptimizerSpec("global", _sgd, {"other": (0.2,)}, "peer", "sgd",
                         make_compiled=compiled_sgd, compile_global=True)
    first = {}
    times, errors = interleaved_step_times(problem, [(ADAMW, 0.01), (sgd, 0.1), (glob, 0.2)],
                                           rounds=4, compiled=True, first_step=first)
    # AdamW has no compiled variant; a compile_global spec has no eager twin
    assert set(times) == {"torch.SGD", "torch.SGD [eager]", "global"} == set(first)
    assert sorted(made) == [0.1, 0.2] and not errors
    # the study's compiled session: the compiled variants (at their chosen lr) and, for a
    # spec without a grid on the problem, its first grid's middle lr; the eager twins
    # beside them; kept apart from the eager session's times
    study = TunedStudy("nn", [problem], [ADAMW, sgd, glob], seeds=[0],
                       step_time_rounds={"toy": 4}, compiled_step_time=True)
    made.clear()
    records = run_stages(study.stages(), tmp_path)
    assert set(study.step_times(records)[0]) == {("toy", "torch.AdamW"), ("toy", "torch.SGD")}
    assert set(study.step_times(records, compiled=True)[0]) == {
        ("toy", "torch.SGD"), ("toy", "torch.SGD [eager]"), ("toy", "global")}
    assert sorted(made) == [0.1, 0.2]


def test_peers_of_a_curvlab_algorithm_are_step_timed_where_they_are_not_trained(
        toy, tmp_path):
    """Every curvlab step is compared with every installed implementation of its
    algorithm: a peer trained elsewhere only (no grid here) is step-timed here, at its
    first grid's middle lr; peers of algorithms no curvlab entry runs here are not."""
    make_problem, _ = toy
    made = []

    def sgd_logged(m, lr, p):
        made.append(lr)
        return torch.optim.SGD(m.parameters(), lr=lr)

    ours = OptimizerSpec("curvlab.X", _sgd, {"toy": (0.1,)}, "curvlab", "x")
    peer = OptimizerSpec("peer.X", sgd_logged, {"other": (0.2, 0.3, 0.4)}, "peer", "x")
    other = OptimizerSpec("peer.Y", sgd_logged, {"other": (0.5,)}, "peer", "y")
    study = TunedStudy("nn", [make_problem()], [ADAMW, ours, peer, other], seeds=[0],
                       step_time_rounds={"toy": 3})
    records = run_stages(study.stages(), tmp_path)
    assert set(study.step_times(records)[0]) == {
        ("toy", "torch.AdamW"), ("toy", "curvlab.X"), ("toy", "peer.X")}
    assert made == [0.3]  # built once, for the step time only (never trained here)
    assert [r["method"] for r in study.rows(records)] == ["torch.AdamW", "curvlab.X"]


class _CountingSGD(torch.optim.SGD):
    """SGD whose step can pretend torch.compile compiled a frame (a failing guard)."""

    def __init__(self, params, lr, recompile=False):
        super().__init__(params, lr=lr)
        self.recompile, self.calls = recompile, 0

    def step(self, closure=None):
        self.calls += 1
        if self.recompile:
            from torch._dynamo.utils import counters

            counters["frames"]["ok"] += 1
        return super().step(closure)


def test_step_time_reports_recompiling_variants_and_stops_at_the_time_cap(toy):
    make_problem, _ = toy
    built = {}

    def maker(name, recompile):
        def make(m, lr, p):
            built[name] = _CountingSGD(m.parameters(), lr, recompile)
            return built[name]
        return make

    steady = OptimizerSpec("steady", maker("steady", False), {"toy": (0.1,)}, "peer", "x")
    again = OptimizerSpec("again", maker("again", True), {"toy": (0.1,)}, "peer", "x")
    recompiled = {}
    times, errors = interleaved_step_times(make_problem(), [(steady, 0.1), (again, 0.1)],
                                           rounds=12, recompiled=recompiled)
    # every step after the first compiled a frame: [11, 11]; the steady one is not listed
    assert recompiled == {"again": [11, 11]} and set(times) == {"steady", "again"}
    assert not errors
    times, _ = interleaved_step_times(make_problem(), [(steady, 0.1), (again, 0.1)],
                                      rounds=12, max_seconds=0.0)
    assert built["steady"].calls == built["again"].calls == 1  # stopped after the cap
    assert set(times) == {"steady", "again"}  # timed on the step it made


def test_a_variant_that_raises_after_its_first_step_gets_no_time(toy):
    """Its only step may be a compilation: an error, not a step time (heavyball's compiled
    PSGD-Kron, whose second step hits a graph break under fullgraph)."""
    make_problem, _ = toy
    failing = OptimizerSpec("failing", lambda m, lr, p: _FailingAfterFirst(m.parameters(),
                                                                          lr=lr), {}, "peer",
                            "sgd")
    times, errors = interleaved_step_times(make_problem(), [(ADAMW, 0.01), (failing, 0.1)],
                                           rounds=8)
    assert set(times) == {"torch.AdamW"} and list(errors) == ["failing"]


class _FailingAfterFirst(torch.optim.SGD):
    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 1:
            raise RuntimeError("graph break")
        return super().step(closure)
