"""least_squares: LM and Gauss-Newton on standard fits, against scipy and known minima."""

import numpy as np
import pytest
import scipy.optimize as so
import torch

from curvlab.minimize import least_squares
from curvlab.minimize.problems import mgh_problems

T = torch.linspace(0, 4, 40, dtype=torch.float64)
TRUE = torch.tensor([2.5, 1.3, 0.5], dtype=torch.float64)


def _data(outliers=False):
    g = torch.Generator().manual_seed(0)
    y = TRUE[0] * torch.exp(-TRUE[1] * T) + TRUE[2] + 0.02 * torch.randn(40, generator=g,
                                                                        dtype=torch.float64)
    if outliers:
        y[::7] += 3.0
    return y


def _resid(y):
    return lambda p: p[0] * torch.exp(-p[1] * T) + p[2] - y


def _scipy(y, loss):
    t, yy = T.numpy(), y.numpy()
    r = so.least_squares(lambda p: p[0] * np.exp(-p[1] * t) + p[2] - yy, np.ones(3),
                         loss=loss, method="lm" if loss == "linear" else "trf",
                         xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return torch.from_numpy(r.x)


@pytest.mark.parametrize("method", ["lm", "gauss-newton"])
@pytest.mark.parametrize("jac_mode", ["dense", "matrix-free"])
def test_exponential_fit_matches_scipy(method, jac_mode):
    y = _data()
    res = least_squares(_resid(y), torch.ones(3, dtype=torch.float64), method,
                        jac_mode=jac_mode)
    assert res.success, res.message
    torch.testing.assert_close(res.x, _scipy(y, "linear"), rtol=1e-7, atol=1e-8)
    r = _resid(y)(res.x)
    assert float(res.cost) == pytest.approx(0.5 * float(r @ r), rel=1e-12)
    torch.testing.assert_close(res.fun, r)
    if jac_mode == "matrix-free":
        assert res.njvp > 0 and res.jac is None  # njev counts linearizations


def _scipy_soft_l1(z):
    """scipy's soft_l1 as a callable loss: rows rho, rho', rho''."""
    t = np.sqrt(1 + z)
    return np.stack([2 * (t - 1), 1 / t, -0.5 / t ** 3])


@pytest.mark.parametrize("loss", ["huber", "soft_l1", "cauchy", "arctan", _scipy_soft_l1])
def test_robust_losses_match_scipy(loss):
    """scipy's five losses and a callable one (arctan and callables were refused)."""
    y = _data(outliers=True)
    res = least_squares(_resid(y), torch.ones(3, dtype=torch.float64), "lm", loss=loss)
    assert res.success, res.message
    # scipy's own answer (tolerances 1e-15) is 1e-6 away from a gtol=1e-14 solution
    torch.testing.assert_close(res.x, _scipy(y, loss), rtol=1e-5, atol=1e-6)
    if loss == "huber":
        return
    # the robust fit is closer to the truth than the plain one on data with outliers
    plain = least_squares(_resid(y), torch.ones(3, dtype=torch.float64), "lm")
    assert float((res.x - TRUE).norm()) < float((plain.x - TRUE).norm())


PROBLEMS = {p.name: p for p in mgh_problems()}


@pytest.mark.parametrize("name", ["Rosenbrock (n=2)", "Beale (n=2)", "Box 3D (n=3)",
                                  "Kowalik-Osborne (n=4)", "Osborne 1 (n=5)",
                                  "Linear full rank (n=10)", "Helical valley (n=3)",
                                  "Discrete boundary value (n=50)"])
def test_lm_on_mgh(name):
    p = PROBLEMS[name]
    res = least_squares(p.residual, p.start(), "lm")
    assert res.success, res.message
    # MGH reports f = sum r^2 = 2 F
    assert 2 * float(res.cost) == pytest.approx(p.fstar, rel=1e-6, abs=1e-12)


def test_nonfinite_trial_rejected_and_errors():
    # residual blows up (NaN) for x < 0: LM must reject those trials
    res = least_squares(lambda x: torch.sqrt(x) - 0.5, torch.tensor([4.0], dtype=torch.float64),
                        "lm")
    assert res.success and torch.isfinite(res.x).all()
    torch.testing.assert_close(res.x, torch.tensor([0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        least_squares(lambda x: x, torch.ones(2), "newton")
    with pytest.raises(ValueError, match="loss"):
        least_squares(lambda x: x, torch.ones(2), loss="tanh")
    res = least_squares(lambda x: torch.exp(x) + 1.0, torch.zeros(1, dtype=torch.float64),
                        max_iter=5)
    assert not res.success and res.status in (1, 6)
