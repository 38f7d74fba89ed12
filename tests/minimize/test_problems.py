"""The MGH-style suite reproduces its published minima (More, Garbow & Hillstrom 1981).

LM runs to gtol=1e-12 (not reachable on every problem in float64); only f is checked.
"""

import pytest
import torch

from curvlab.minimize import least_squares
from curvlab.minimize.problems import logistic_regression, mgh_problems

KNOWN = [p for p in mgh_problems() if p.fstar is not None]


def test_suite_shape():
    probs = mgh_problems()
    assert len(probs) >= 20
    assert len({p.name for p in probs}) == len(probs)
    assert {p.n for p in probs} >= {2, 3, 4, 10, 50, 100}
    for p in probs:
        x0 = p.start()
        assert x0.shape == (p.n,)
        f = p.objective(x0)
        r = p.residual(x0)
        assert torch.isfinite(f) and f == pytest.approx(float(r @ r), rel=1e-12)
        assert p.start(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("p", KNOWN, ids=[p.name for p in KNOWN])
def test_published_minimum_is_reached(p):
    res = least_squares(p.residual, p.start(), "lm", max_iter=500)
    # MGH's f is sum r^2 = 2 F
    assert 2 * float(res.cost) == pytest.approx(p.fstar, rel=1e-5, abs=1e-12)  # 6 digits


def test_logistic_regression_problem():
    p = logistic_regression()
    assert p.n == 31
    x0 = p.start()
    assert float(p.objective(x0)) == pytest.approx(torch.log(torch.tensor(2.0)).item())
