"""share_rows delivers every owner's rows to all ranks; row-sharded matrices are
assembled on their owners only and split back (2 gloo ranks)."""

import pytest
import torch
from scen_collectives import MATRICES, expected, matrix


@pytest.fixture(scope="module")
def results(ranks):
    return [r["collectives"] for r in ranks]


def test_share_rows_gives_every_rank_the_owners_rows(results):
    for res in results:
        for got, want in zip(res["parts"], expected(), strict=True):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)
        assert res["timings"]["communication"] > 0


def test_rows_gather_on_the_owner_and_scatter_back(results):
    for rank, res in enumerate(results):
        owned = [k for k, (_, _, o) in enumerate(MATRICES) if o == rank]
        assert sorted(res["gathered"]) == owned  # only the owner holds the whole matrix
        for k in owned:
            assert torch.equal(res["gathered"][k], matrix(k))
        for shard, back in zip(res["shards"], res["scattered"], strict=True):
            assert back.shape == shard.shape
            assert torch.equal(back, 2 * shard)
