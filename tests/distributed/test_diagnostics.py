"""Data-parallel Objective and curvature operators (2 gloo processes on CPU) equal the
single-process values on the whole data set (float64)."""

import _problems as P
import pytest
import torch
from scen_diagnostics import quantities
from torch import nn

from curvlab.linops import HessianOperator
from curvlab.objective import Objective


@pytest.fixture(scope="module")
def dist_results(ranks):
    return [r["diagnostics"] for r in ranks]


@pytest.fixture(scope="module")
def reference():
    X, y = P.data()
    return quantities(Objective(P.model(), nn.CrossEntropyLoss(), P.whole(X, y)))


@pytest.mark.parametrize("key", ["num_samples", "loss", "loss_and_grad", "grad", "hvp", "hvp1",
                                 "ggn", "diag", "kfac", "kfac_inverse",
                                 "lambda_max", "trace"])
def test_matches_single_process(dist_results, reference, key):
    for res in dist_results:
        got, want = torch.as_tensor(res[key]), torch.as_tensor(reference[key])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_lambda_max_is_the_full_data_top_eigenvalue(dist_results):
    """Against the dense float64 Hessian of the whole data set."""
    X, y = P.data()
    H = HessianOperator(Objective(P.model(), nn.CrossEntropyLoss(), P.whole(X, y))).to_dense()
    top = float(torch.linalg.eigvalsh(H)[-1])
    for res in dist_results:
        for key in ("lambda_max", "lambda_max_unseeded"):
            assert abs(float(res[key]) - top) <= 1e-8 * abs(top)


def test_unseeded_probes_agree_across_ranks(dist_results):
    a, b = (r["diag_hutch"] for r in dist_results)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rank_dependent_vector_is_refused(dist_results):
    for res in dist_results:
        assert "differs across ranks" in res["mismatch_error"]


def test_process_group_argument_is_checked():
    X, y = P.data()
    with pytest.raises(ValueError, match="init_process_group"):
        Objective(P.model(), nn.CrossEntropyLoss(), (X, y), process_group="default")
    with pytest.raises(ValueError, match="'default'"):
        Objective(P.model(), nn.CrossEntropyLoss(), (X, y), process_group="world")
    with pytest.raises(TypeError, match="ProcessGroup"):
        Objective(P.model(), nn.CrossEntropyLoss(), (X, y), process_group=2)
