"""torch.distributed.checkpoint (DCP): saved on 2 ranks, resumed on 2 ranks bit for bit,
and resumed in one process (a different world size) continuing like one process that
never stopped."""

import _problems as P
import pytest
import torch
from scen_optim import DDP_VARIANTS, make, params, train
from test_optim import assert_params_equal, single_process

from curvlab.distributed import load_checkpoint


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
