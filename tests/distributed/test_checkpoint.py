"""Checkpoints: saved on 2 ranks and resumed on 2 ranks bit for bit, or in one process (a
different world size) continuing like one process that never stopped; a save killed at
any point leaves the previous checkpoint loadable; loading never unpickles and reports a
bad checkpoint as a CheckpointError naming the file."""

import copy
import json
import os
import pickle
import random
import signal
import time
from collections import OrderedDict

import _problems as P
import pytest
import torch
from scen_optim import DDP_VARIANTS, make, params, train
from test_optim import assert_params_equal, single_process

from curvlab.distributed import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def dist_results(ranks):
    return [r["checkpoint"] for r in ranks]


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_resume_on_same_world_size_is_exact(dist_results, name):
    for res in dist_results:
        for got, want in zip(res[f"resumed/{name}"], res[f"continued/{name}"], strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_resume_on_one_process(dist_results, checkpoints, name):
    model = P.mlp()
    opt = make(name.partition("/")[0], model)
    state = load_checkpoint(checkpoints / name.replace("/", "-"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    train(name, model, opt, range(10, 20))
    assert_params_equal(params(model), single_process(name.partition("/")[0]))


# ---- one process: atomic saves, safe loads -----------------------------------------------
STEPS, END = 8, 12  # checkpoints of SOAP after 0..STEPS-1 steps; resumed runs go to END


@pytest.fixture(scope="module")
def history():
    """SOAP's (model, optimizer) state after each of STEPS steps (eigenbases from LAPACK
    included, column-major), and the parameters of the uninterrupted run at END."""
    model = P.mlp()
    opt = make("soap", model)
    states = []
    for k in range(STEPS):
        states.append({"step": k, "model": copy.deepcopy(model.state_dict()),
                       "optim": copy.deepcopy(opt.state_dict())})
        train("soap", model, opt, range(k, k + 1))
    train("soap", model, opt, range(STEPS, END))
    return states, params(model)


def _assert_same(got, want, path="state"):
    assert type(got) is type(want), path
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.stride() == want.stride(), path
        assert torch.equal(got, want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want or (got != got and want != want), path


def _resume(state):
    model = P.mlp()
    opt = make("soap", model)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    train("soap", model, opt, range(state["step"], END))
    return params(model)


def test_state_round_trips_exactly_and_resumes_bit_for_bit(tmp_path, history):
    states, final = history
    save_checkpoint(states[5], tmp_path / "ck")
    state = load_checkpoint(tmp_path / "ck")
    _assert_same(state, states[5])
    for got, want in zip(_resume(state), final, strict=True):
        assert torch.equal(got, want)


def test_every_supported_value_round_trips(tmp_path):
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    state = {
        "od": OrderedDict([("b", 1), ("a", 2)]), 0: (1.5, float("nan"), float("-inf")),
        "types": [None, True, "x", 2 ** 70, torch.bfloat16],
        "t": {"T": base.t(), "bf16": torch.randn(3, dtype=torch.bfloat16), "0d": torch.tensor(3),
              "empty": torch.zeros(0, 5), "bool": torch.tensor([True, False]),
              "complex": torch.randn(2, dtype=torch.complex64),
              "sliced": base[:, 1], "expanded": torch.ones(3, 1).expand(3, 4)},
    }
    save_checkpoint(state, tmp_path / "ck")
    got = load_checkpoint(tmp_path / "ck")
    assert got["t"]["T"].stride() == (1, 4)  # dense layouts keep their strides
    assert got["t"]["expanded"].is_contiguous() and got["t"]["sliced"].is_contiguous()
    for name in ("sliced", "expanded"):  # layouts with gaps/overlaps are saved contiguous
        assert torch.equal(got["t"][name], state["t"][name])
        got["t"][name], state["t"][name] = state["t"][name], state["t"][name]
    _assert_same(got, state)


def test_values_a_checkpoint_cannot_hold_are_named(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['optim'\]\['lr'\] is a numpy.float64"):
        save_checkpoint({"optim": {"lr": np.float64(0.1)}}, tmp_path / "ck")
    with pytest.raises(TypeError, match="keys must be str or int"):
        save_checkpoint({"a": {(1, 2): 3}}, tmp_path / "ck")
    assert not (tmp_path / "ck" / "manifest.json").exists()


def _child_saving_forever(states, path, done_fd):
    try:
        i = 1
        while True:
            save_checkpoint(states[i % len(states)], path)
            os.write(done_fd, b"x")  # one save completed
            i += 1
    finally:
        os._exit(0)


def test_a_save_killed_at_random_points_keeps_the_previous_checkpoint(tmp_path, history):
    """50 trials: a forked process saves over the checkpoint in a loop and is SIGKILLed
    after a random number of completed saves plus a random fraction of one save's time;
    the checkpoint then always loads as one of the saved states, exactly, and resumes bit
    for bit."""
    states, final = history
    path = tmp_path / "ck"
    durations = []
    for state in states[:3]:
        t0 = time.perf_counter()
        save_checkpoint(state, path)
        durations.append(time.perf_counter() - t0)
    save_checkpoint(states[0], path)
    one_save = sorted(durations)[1]
    rng = random.Random(0)
    seen, leftovers = set(), 0
    for _ in range(50):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(done_r)
            _child_saving_forever(states, path, done_w)
        os.close(done_w)
        for _ in range(rng.randint(0, 3)):
            assert os.read(done_r, 1) == b"x"
        time.sleep(rng.uniform(0.0, 1.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(done_r)
        leftovers += len(list(path.iterdir())) > 2  # killed inside a save
        state = load_checkpoint(path)
        _assert_same(state, states[state["step"]])
        if state["step"] not in seen:  # (equal states resume equally: once per step)
            for got, want in zip(_resume(state), final, strict=True):
                assert torch.equal(got, want)
        seen.add(state["step"])
    assert leftovers >= 10 and len(seen) >= 3  # kills landed inside saves; saves completed


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("target", ["fsync", "replace", "unlink"])
def test_a_save_interrupted_at_each_step_keeps_the_previous_checkpoint(
        tmp_path, history, monkeypatch, target):
    """Deterministic complement of the kill test: the save dies at the n-th call of each
    file-system step (write-out, rename, clean-up), for every n."""
    states, _ = history
    path = tmp_path / "ck"
    save_checkpoint(states[1], path)
    owner = type(path) if target == "unlink" else os
    real = getattr(owner, target)
    n = 0
    while True:
        calls = []

        def dying(*a, n=n, calls=calls, **k):
            calls.append(1)
            if len(calls) > n:
                raise _Killed
            return real(*a, **k)

        monkeypatch.setattr(owner, target, dying)
        try:
            save_checkpoint(states[2 + n % 2], path)
            finished = True
        except _Killed:
            finished = False
        monkeypatch.undo()
        state = load_checkpoint(path)
        assert state["step"] in (1, 2, 3)
        _assert_same(state, states[state["step"]])
        if finished:
            break
        n += 1
    assert n >= 1


def _corrupt(path, how):
    manifest = path / "manifest.json"
    m = json.loads(manifest.read_text())
    data = path / m["data"]
    if how == "flip":
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 1
        data.write_bytes(bytes(b))
    elif how == "truncate-data":
        data.write_bytes(data.read_bytes()[:-3])
    elif how == "missing-data":
        data.unlink()
    elif how == "truncate-manifest":
        manifest.write_text(manifest.read_text()[:-10])
    elif how == "no-manifest":
        manifest.unlink()
    elif how == "version":
        m["version"] = 99
        manifest.write_text(json.dumps(m))
    elif how == "layout":
        m["layout"] = {"dict": [["x", {"pickle": "gASVKAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOU"}]]}
        manifest.write_text(json.dumps(m))
    elif how == "tensor-entry":
        m["tensors"][0]["shape"] = [10 ** 6]
        manifest.write_text(json.dumps(m))
    elif how == "path":
        m["data"] = "../../etc/passwd"
        manifest.write_text(json.dumps(m))
    elif how == "binary":
        manifest.write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize("how, message", [
    ("flip", "SHA-256"), ("truncate-data", "truncated"), ("missing-data", "is missing"),
    ("truncate-manifest", "not valid JSON"), ("no-manifest", "no complete checkpoint"),
    ("version", "version 99"), ("layout", "layout entry state['x']"),
    ("tensor-entry", "tensor entry 0"), ("path", "'data'"), ("binary", "not valid JSON"),
])
def test_a_bad_checkpoint_is_an_ordinary_error_naming_the_file(tmp_path, history, how,
                                                                message):
    states, _ = history
    path = tmp_path / "ck"
    save_checkpoint(states[3], path)
    _corrupt(path, how)
    with pytest.raises(Exception) as info:  # an Exception, not a BaseException
        load_checkpoint(path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and message in str(info.value)


def test_loading_never_unpickles(tmp_path):
    """A torch.distributed.checkpoint folder (pickled metadata) is refused, and the
    payload in it never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "dcp"
    path.mkdir()
    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="torch.distributed.checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent")
