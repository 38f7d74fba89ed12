"""Shampoo, SOAP, K-FAC and Muon (and NorMuon) under DDP (2 gloo ranks, each with half of
every global batch, the refresh / Newton-Schulz work split over the ranks) reach the
parameters of one process on the whole batch after 20 steps (float64, 1e-6 relative); FSDP2
works for Muon (and NorMuon, its neurons along the shards' rows or across them) and for
Shampoo / SOAP in the allgather mode, and is refused at construction by the others."""

import functools

import _problems as P
import pytest
import torch
from scen_optim import DDP_VARIANTS, KFAC_DIAG, STEPS, make, neuron_moments, params, train

from curvlab.optim import KFAC, Shampoo
from curvlab.optim.distributors.collectives import eigh_cost, lpt_schedule


@pytest.fixture(scope="module")
def dist_results(ranks):
    return [r["optim"] for r in ranks]


@functools.cache
def single_process(name: str) -> list[torch.Tensor]:
    """Parameters after ``STEPS`` steps of one process on the whole batches (cached)."""
    model = P.mlp()
    train(name, model, make(name, model), range(STEPS))
    return params(model)


def assert_params_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        err = float((g - w).norm() / w.norm())
        assert err < 1e-6, err


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_ddp_equals_single_process(dist_results, name):
    want = single_process(name.partition("/")[0])
    moved = [float((w - p0).norm()) for w, p0 in zip(want, params(P.mlp()), strict=True)]
    assert min(moved) > 1e-3  # the comparison is not between untrained models
    for res in dist_results:
        assert_params_equal(res[f"ddp/{name}"], want)


def test_kfac_given_the_ddp_model_uses_its_group(dist_results):
    """KFAC(ddp_model) without process_group all-reduces over DDP's group (no drift)."""
    want = single_process("kfac")
    for res in dist_results:
        assert_params_equal(res["ddp_given/kfac"], want)


@pytest.mark.parametrize("variant", list(KFAC_DIAG))
def test_kfac_with_diagonal_factors_equals_single_process(dist_results, variant):
    model = P.mlp()
    opt = KFAC(model, lr=0.1, damping=0.1, precondition_frequency=3, **KFAC_DIAG[variant])
    assert sum(L.diag_in + L.diag_out for L in opt._layers) == 3
    train("kfac", model, opt, range(STEPS))
    for res in dist_results:
        assert_params_equal(res[f"ddp/{variant}"], params(model))


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_work_is_split(dist_results, name):
    """Each rank did some of the sharded work and communicated."""
    for res in dist_results:
        t = res[f"timings/{name}"]
        assert t["precondition"] > 0 and t["communication"] > 0


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_allgather_mode_keeps_only_own_blocks(dist_results, name):
    """"allgather" trades per-step communication for memory: each rank holds the state of
    the blocks it owns (plus the replicated diagonal state of 1-D parameters)."""
    whole = dist_results[0][f"stats/{name}"]["state_bytes"]
    shares = [res[f"stats/{name}/allgather"]["state_bytes"]
              for res in dist_results]
    assert max(shares) < whole  # nobody holds it all...
    assert sum(shares) >= whole  # ...and together they do (biases' diagonal state: twice)


@pytest.mark.parametrize("name", ["muon", "normuon", "normuon_t", "shampoo/allgather",
                                  "soap/allgather"])
def test_fsdp2_equals_single_process(dist_results, name):
    for res in dist_results:
        assert_params_equal(res[f"fsdp/{name}"], single_process(name.partition("/")[0]))
        assert res[f"fsdp_timings/{name}"]["communication"] > 0  # shards went to the owners
    # every rank preconditioned something (the work is split, not repeated)
    assert all(res[f"fsdp_timings/{name}"].get("precondition", 0) > 0 for res in dist_results)


@pytest.mark.parametrize("name", ["shampoo/allgather", "soap/allgather"])
def test_fsdp2_state_dict_is_whole_on_every_rank(dist_results, name):
    """Each rank holds its parameters' blocks; state_dict() assembles all of them."""
    a, b = (res[f"fsdp_state/{name}"] for res in dist_results)
    for ga, gb in zip(a, b, strict=True):
        assert ga.keys() == gb.keys()
        for k in ga:
            assert torch.equal(ga[k], gb[k])
    model = P.mlp()
    opt = make(name.partition("/")[0], model)
    train(name, model, opt, range(STEPS))  # one process: the same state, computed whole
    for ga, gw in zip(a, opt._whole_state(), strict=True):
        for k in ga:
            err = float((ga[k] - gw[k]).norm() / gw[k].norm().clamp_min(1e-300))
            assert err < 1e-6, (k, err)


@pytest.mark.parametrize("name", ["normuon", "normuon_t"])
def test_fsdp2_normuon_second_moment_is_whole_on_every_rank(dist_results, name):
    """Each rank holds only its rows of the update, but ``v`` of every neuron, the same on
    every rank and equal to one process's."""
    model = P.mlp()
    opt = make(name, model)
    train(name, model, opt, range(STEPS))
    want = neuron_moments(opt)
    assert len(want) == 3 and all(bool((v > 0).all()) for v in want)
    for res in dist_results:
        got = res[f"fsdp_state/{name}"]
        assert [v.shape for v in got] == [v.shape for v in want]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


def test_fsdp2_unsupported_modes_are_refused(dist_results):
    for res in dist_results:
        assert "does not support DTensor parameters" in res["fsdp/kfac"]
        for name in ("shampoo", "soap"):
            assert "distributed_mode='allgather'" in res[f"fsdp/{name}"]


def test_lpt_schedule_balances():
    costs = [eigh_cost(s) for s in [(100, 100), (80, 80), (60, 60), (50, 50), (10, 10)]]
    owners = lpt_schedule(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert owners[0] != owners[1]  # the two largest blocks go to different ranks
    assert max(loads) <= 4 / 3 * max(sum(costs) / 2, max(costs))  # Graham's LPT bound
    assert lpt_schedule(costs, 1) == [0] * len(costs)


def test_single_process_ignores_process_group_none():
    model = P.mlp()
    assert Shampoo(model.parameters()).process_group is None
    with pytest.raises(ValueError, match="init_process_group"):
        KFAC(model, process_group="default")


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_ranks_stay_bitwise_identical(dist_results, name):
    for a, b in zip(dist_results[0][f"ddp/{name}"], dist_results[1][f"ddp/{name}"], strict=True):
        assert torch.equal(a, b)
