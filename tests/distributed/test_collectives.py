"""share_rows delivers every owner's rows to all ranks (2 gloo ranks)."""

import pytest
import torch
from scen_collectives import expected


@pytest.fixture(scope="module")
def results(ranks):
    return [r["collectives"] for r in ranks]


def test_share_rows_gives_every_rank_the_owners_rows(results):
    for res in results:
        for got, want in zip(res["parts"], expected(), strict=True):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)
        assert res["timings"]["communication"] > 0
