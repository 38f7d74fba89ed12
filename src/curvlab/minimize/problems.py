"""Standard unconstrained test problems with known minima, as differentiable torch code.

Most are the least-squares problems of More, Garbow & Hillstrom, "Testing unconstrained
optimization software", ACM TOMS 7 (1981) ("MGH", problem numbers below), written as
residuals ``r(x)`` with ``f(x) = sum r_i(x)^2`` and MGH's standard starting points;
``fstar`` is the published minimum value (``None`` where several local minima are
reachable). :func:`logistic_regression` adds L2-regularized logistic regression on
scikit-learn's bundled breast-cancer data. Used by the tests, ``benchmarks/bench_minimize.py``
and the ``curvlab bench`` runner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["TestProblem", "mgh_problems", "logistic_regression", "rosenbrock", "NistProblem",
           "NIST_MODELS", "load_nist", "nist_problems"]


@dataclass(frozen=True)
class TestProblem:
    """``objective(x)`` on a 1-D tensor; ``residual(x)`` when it is a sum of squares."""

    name: str
    n: int
    x0: Sequence[float]
    objective: Callable[[torch.Tensor], torch.Tensor]
    fstar: float | None = None
    residual: Callable[[torch.Tensor], torch.Tensor] | None = None

    def start(self, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The standard starting point ``x0`` as a tensor."""
        return torch.tensor(list(self.x0), dtype=dtype, device=device)


def _ls(name: str, n: int, x0: Sequence[float], residual: Callable, fstar: float | None
        ) -> TestProblem:
    def objective(x: torch.Tensor) -> torch.Tensor:
        r = residual(x)
        return torch.dot(r, r)

    return TestProblem(f"{name} (n={n})", n, tuple(float(v) for v in x0), objective, fstar,
                       residual)


def _c(x: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def _ar(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi, dtype=x.dtype, device=x.device)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Chained Rosenbrock ``sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` (minimum 0 at 1)."""
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


# -- MGH residuals ---------------------------------------------------------------------

def _rosen(x):  # MGH 1 / 21 (extended)
    a, b = x[0::2], x[1::2]
    return torch.cat((10.0 * (b - a * a), 1.0 - a))


def _freudenstein_roth(x):  # MGH 2
    return torch.stack((-13.0 + x[0] + ((5.0 - x[1]) * x[1] - 2.0) * x[1],
                        -29.0 + x[0] + ((x[1] + 1.0) * x[1] - 14.0) * x[1]))


def _powell_badly_scaled(x):  # MGH 3
    return torch.stack((1e4 * x[0] * x[1] - 1.0,
                        torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001))


def _brown_badly_scaled(x):  # MGH 4
    return torch.stack((x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0))


def _beale(x):  # MGH 5
    i = _ar(x, 1, 4)
    return _c(x, [1.5, 2.25, 2.625]) - x[0] * (1.0 - x[1] ** i)


def _jennrich_sampson(x):  # MGH 6, m = 10
    i = _ar(x, 1, 11)
    return 2.0 + 2.0 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def _helical_valley(x):  # MGH 7
    theta = torch.atan(x[1] / x[0]) / (2.0 * math.pi) + 0.5 * (x[0] < 0).to(x.dtype)
    return torch.stack((10.0 * (x[2] - 10.0 * theta),
                        10.0 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1.0), x[2]))


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34,
           2.10, 4.39]


def _bard(x):  # MGH 8
    u = _ar(x, 1, 16)
    v = 16.0 - u
    w = torch.minimum(u, v)
    return _c(x, _BARD_Y) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989, 0.3521, 0.2420,
            0.1295, 0.0540, 0.0175, 0.0044, 0.0009]


def _gaussian(x):  # MGH 9
    t = (8.0 - _ar(x, 1, 16)) / 2.0
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _c(x, _GAUSS_Y)


def _box3d(x):  # MGH 12, m = 10
    t = 0.1 * _ar(x, 1, 11)
    return (torch.exp(-t * x[0]) - torch.exp(-t * x[1])
            - x[2] * (torch.exp(-t) - torch.exp(-10.0 * t)))


def _powell_singular(x):  # MGH 13 / 22 (extended)
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return torch.cat((a + 10.0 * b, math.sqrt(5.0) * (c - d), (b - 2.0 * c) ** 2,
                      math.sqrt(10.0) * (a - d) ** 2))


def _wood(x):  # MGH 14
    return torch.stack((10.0 * (x[1] - x[0] ** 2), 1.0 - x[0],
                        math.sqrt(90.0) * (x[3] - x[2] ** 2), 1.0 - x[2],
                        math.sqrt(10.0) * (x[1] + x[3] - 2.0),
                        (x[1] - x[3]) / math.sqrt(10.0)))


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235,
         0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def _kowalik_osborne(x):  # MGH 15
    u = _c(x, _KO_U)
    return _c(x, _KO_Y) - x[0] * (u * u + u * x[1]) / (u * u + u * x[2] + x[3])


def _brown_dennis(x):  # MGH 16, m = 20
    t = _ar(x, 1, 21) / 5.0
    return ((x[0] + t * x[1] - torch.exp(t)) ** 2
            + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2)


_OSB1_Y = [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
           0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
           0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406]


def _osborne1(x):  # MGH 17
    t = 10.0 * _ar(x, 0, 33)
    return _c(x, _OSB1_Y) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def _biggs_exp6(x):  # MGH 18, m = 13
    t = 0.1 * _ar(x, 1, 14)
    y = torch.exp(-t) - 5.0 * torch.exp(-10.0 * t) + 3.0 * torch.exp(-4.0 * t)
    return (x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1])
            + x[5] * torch.exp(-t * x[4]) - y)


def _watson(x):  # MGH 20
    n = x.numel()
    t = _ar(x, 1, 30) / 29.0
    j = _ar(x, 0, n)
    powers = t[:, None] ** j[None, :]  # t^(j-1) for j = 1..n
    s1 = (powers[:, :-1] * (j[1:] * x[1:])[None, :]).sum(1)  # sum (j-1) x_j t^(j-2)
    s2 = powers @ x
    return torch.cat((s1 - s2 ** 2 - 1.0, x[:1], (x[1] - x[0] ** 2 - 1.0).reshape(1)))


def _penalty1(x):  # MGH 23
    return torch.cat((math.sqrt(1e-5) * (x - 1.0), (torch.dot(x, x) - 0.25).reshape(1)))


def _variably_dimensioned(x):  # MGH 25
    s = torch.dot(_ar(x, 1, x.numel() + 1), x - 1.0).reshape(1)
    return torch.cat((x - 1.0, s, s * s))


def _trigonometric(x):  # MGH 26
    n = x.numel()
    i = _ar(x, 1, n + 1)
    return n - torch.cos(x).sum() + i * (1.0 - torch.cos(x)) - torch.sin(x)


def _brown_almost_linear(x):  # MGH 27
    n = x.numel()
    return torch.cat((x[:-1] + x.sum() - (n + 1.0), (torch.prod(x) - 1.0).reshape(1)))


def _boundary_value(x):  # MGH 28
    n = x.numel()
    h = 1.0 / (n + 1)
    t = h * _ar(x, 1, n + 1)
    xp = torch.nn.functional.pad(x, (1, 1))
    return 2.0 * x - xp[:-2] - xp[2:] + h * h * (x + t + 1.0) ** 3 / 2.0


def _integral_equation(x):  # MGH 29
    n = x.numel()
    h = 1.0 / (n + 1)
    t = h * _ar(x, 1, n + 1)
    c = (x + t + 1.0) ** 3
    left = torch.cumsum(t * c, 0)  # sum_{j <= i} t_j c_j
    right = (1.0 - t) * c
    right = torch.flip(torch.cumsum(torch.flip(right, (0,)), 0), (0,)) - right  # j > i
    return x + h * ((1.0 - t) * left + t * right) / 2.0


def _broyden_tridiagonal(x):  # MGH 30
    xp = torch.nn.functional.pad(x, (1, 1))
    return (3.0 - 2.0 * x) * x - xp[:-2] - 2.0 * xp[2:] + 1.0


def _broyden_banded(x):  # MGH 31: J_i = {j != i : max(1, i-5) <= j <= min(n, i+1)}
    n = x.numel()
    i = torch.arange(n, device=x.device)
    mask = ((i[None, :] >= i[:, None] - 5) & (i[None, :] <= i[:, None] + 1)
            & (i[None, :] != i[:, None])).to(x.dtype)
    return x * (2.0 + 5.0 * x * x) + 1.0 - mask @ (x * (1.0 + x))


def _linear_full_rank(x, m: int = 20):  # MGH 32
    n = x.numel()
    s = 2.0 / m * x.sum()
    return torch.cat((x - s - 1.0, (-s - 1.0).expand(m - n)))


def _chebyquad(x):  # MGH 35, m = n
    n = x.numel()
    y = 2.0 * x - 1.0
    T = [torch.ones_like(y), y]
    for _ in range(2, n + 1):
        T.append(2.0 * y * T[-1] - T[-2])
    exact = [-1.0 / (i * i - 1.0) if i % 2 == 0 else 0.0 for i in range(1, n + 1)]
    return torch.stack(T[1:]).mean(1) - _c(x, exact)


def mgh_problems() -> list[TestProblem]:
    """The suite: 29 instances of 24 MGH problems, n from 2 to 100 (see module doc)."""
    def ext(base: Sequence[float], n: int) -> list[float]:
        return [base[i % len(base)] for i in range(n)]

    P = [
        _ls("Rosenbrock", 2, [-1.2, 1.0], _rosen, 0.0),
        _ls("Freudenstein-Roth", 2, [0.5, -2.0], _freudenstein_roth, None),
        _ls("Powell badly scaled", 2, [0.0, 1.0], _powell_badly_scaled, 0.0),
        _ls("Brown badly scaled", 2, [1.0, 1.0], _brown_badly_scaled, 0.0),
        _ls("Beale", 2, [1.0, 1.0], _beale, 0.0),
        _ls("Jennrich-Sampson", 2, [0.3, 0.4], _jennrich_sampson, 124.362182355),
        _ls("Helical valley", 3, [-1.0, 0.0, 0.0], _helical_valley, 0.0),
        _ls("Bard", 3, [1.0, 1.0, 1.0], _bard, None),
        _ls("Gaussian", 3, [0.4, 1.0, 0.0], _gaussian, 1.12793276961e-8),
        _ls("Box 3D", 3, [0.0, 10.0, 20.0], _box3d, 0.0),
        _ls("Powell singular", 4, [3.0, -1.0, 0.0, 1.0], _powell_singular, 0.0),
        _ls("Wood", 4, [-3.0, -1.0, -3.0, -1.0], _wood, 0.0),
        _ls("Kowalik-Osborne", 4, [0.25, 0.39, 0.415, 0.39], _kowalik_osborne,
            3.07505603849e-4),
        _ls("Brown-Dennis", 4, [25.0, 5.0, -5.0, -1.0], _brown_dennis, 85822.2016263),
        _ls("Osborne 1", 5, [0.5, 1.5, -1.0, 0.01, 0.02], _osborne1, 5.46489469748e-5),
        _ls("Biggs EXP6", 6, [1.0, 2.0, 1.0, 1.0, 1.0, 1.0], _biggs_exp6, None),
        _ls("Watson", 6, [0.0] * 6, _watson, 2.28767005355e-3),
        _ls("Watson", 9, [0.0] * 9, _watson, 1.39976e-6),
        _ls("Penalty I", 10, list(range(1, 11)), _penalty1, 7.08765146709e-5),
        _ls("Variably dimensioned", 10, [1.0 - j / 10 for j in range(1, 11)],
            _variably_dimensioned, 0.0),
        _ls("Trigonometric", 10, [0.1] * 10, _trigonometric, None),
        _ls("Brown almost-linear", 10, [0.5] * 10, _brown_almost_linear, None),
        _ls("Chebyquad", 8, [j / 9 for j in range(1, 9)], _chebyquad, 3.51687372222e-3),
        _ls("Linear full rank", 10, [1.0] * 10, _linear_full_rank, 10.0),
        _ls("Extended Rosenbrock", 100, ext([-1.2, 1.0], 100), _rosen, 0.0),
        _ls("Extended Powell singular", 100, ext([3.0, -1.0, 0.0, 1.0], 100),
            _powell_singular, 0.0),
        _ls("Discrete boundary value", 50,
            [(j / 51) * (j / 51 - 1.0) for j in range(1, 51)], _boundary_value, 0.0),
        _ls("Discrete integral equation", 50,
            [(j / 51) * (j / 51 - 1.0) for j in range(1, 51)], _integral_equation, 0.0),
        _ls("Broyden tridiagonal", 100, [-1.0] * 100, _broyden_tridiagonal, 0.0),
        _ls("Broyden banded", 100, [-1.0] * 100, _broyden_banded, 0.0),
    ]
    return P


def logistic_regression(lam: float = 1e-2, dtype: torch.dtype = torch.float64,
                        device: torch.device | str | None = None) -> TestProblem:
    """``f(w) = mean(softplus(-y_i x_i^T w)) + lam/2 ||w||^2`` on scikit-learn's
    breast-cancer data (569 x 30, standardized, plus a bias column; ``y`` in {-1, 1})."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    X = torch.cat((X, torch.ones(X.shape[0], 1, dtype=torch.float64)), 1).to(dtype)
    y = (torch.as_tensor(y, dtype=dtype) * 2.0 - 1.0)
    if device is not None:
        X, y = X.to(device), y.to(device)
    yX = y[:, None] * X

    def objective(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(yX @ w)).mean() + 0.5 * lam * torch.dot(w, w)

    return TestProblem(f"Logistic regression (n={X.shape[1]})", X.shape[1],
                       (0.0,) * X.shape[1], objective, None)


# -- NIST StRD nonlinear regression ------------------------------------------------------

_PI = math.pi

#: The 27 NIST StRD models ``y = model(b, x)`` (``x`` is ``(m,)``, or ``(m, 2)`` for
#: Nelson, whose response is ``log y``), written as in each file's "Model" section.
NIST_MODELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Misra1a": lambda b, x: b[0] * (1 - torch.exp(-b[1] * x)),
    "Chwirut2": lambda b, x: torch.exp(-b[0] * x) / (b[1] + b[2] * x),
    "Chwirut1": lambda b, x: torch.exp(-b[0] * x) / (b[1] + b[2] * x),
    "Lanczos3": lambda b, x: (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x)
                              + b[4] * torch.exp(-b[5] * x)),
    "Gauss1": lambda b, x: (b[0] * torch.exp(-b[1] * x)
                            + b[2] * torch.exp(-(x - b[3]) ** 2 / b[4] ** 2)
                            + b[5] * torch.exp(-(x - b[6]) ** 2 / b[7] ** 2)),
    "Gauss2": lambda b, x: NIST_MODELS["Gauss1"](b, x),
    "DanWood": lambda b, x: b[0] * x ** b[1],
    "Misra1b": lambda b, x: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Kirby2": lambda b, x: ((b[0] + b[1] * x + b[2] * x ** 2)
                            / (1 + b[3] * x + b[4] * x ** 2)),
    "Hahn1": lambda b, x: ((b[0] + b[1] * x + b[2] * x ** 2 + b[3] * x ** 3)
                           / (1 + b[4] * x + b[5] * x ** 2 + b[6] * x ** 3)),
    "Nelson": lambda b, x: b[0] - b[1] * x[:, 0] * torch.exp(-b[2] * x[:, 1]),
    "MGH17": lambda b, x: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Lanczos1": lambda b, x: NIST_MODELS["Lanczos3"](b, x),
    "Lanczos2": lambda b, x: NIST_MODELS["Lanczos3"](b, x),
    "Gauss3": lambda b, x: NIST_MODELS["Gauss1"](b, x),
    "Misra1c": lambda b, x: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda b, x: b[0] * b[1] * x * (1 + b[1] * x) ** (-1),
    "Roszman1": lambda b, x: b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / _PI,
    "ENSO": lambda b, x: (b[0] + b[1] * torch.cos(2 * _PI * x / 12)
                          + b[2] * torch.sin(2 * _PI * x / 12)
                          + b[4] * torch.cos(2 * _PI * x / b[3])
                          + b[5] * torch.sin(2 * _PI * x / b[3])
                          + b[7] * torch.cos(2 * _PI * x / b[6])
                          + b[8] * torch.sin(2 * _PI * x / b[6])),
    "MGH09": lambda b, x: b[0] * (x ** 2 + x * b[1]) / (x ** 2 + x * b[2] + b[3]),
    "Thurber": lambda b, x: NIST_MODELS["Hahn1"](b, x),
    "BoxBOD": lambda b, x: b[0] * (1 - torch.exp(-b[1] * x)),
    "Rat42": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda b, x: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda b, x: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
    "Bennett5": lambda b, x: b[0] * (b[1] + x) ** (-1 / b[2]),
}


@dataclass(frozen=True)
class NistProblem:
    """One NIST StRD dataset: data ``x`` / ``y`` (float64), the two starting points,
    the certified parameters and residual sum of squares, and the model."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    starts: tuple[tuple[float, ...], tuple[float, ...]]
    certified: tuple[float, ...]
    certified_rss: float

    def residual(self, b: torch.Tensor) -> torch.Tensor:
        """``model(b, x) - y`` (``log y`` for Nelson), in the dtype of ``b``."""
        x = self.x.to(b.dtype) if self.x.device == b.device else self.x.to(b)
        y = self.y.to(x)
        if self.name == "Nelson":
            y = torch.log(y)
        return NIST_MODELS[self.name](b, x) - y

    def lre(self, b: Sequence[float]) -> float:
        """The smallest log relative error over the parameters, capped at 11 digits."""
        worst = 11.0
        for est, cert in zip(b, self.certified, strict=True):
            err = abs(float(est) - cert) / abs(cert)
            worst = min(worst, 11.0 if err == 0 else -math.log10(err))
        return max(worst, 0.0) if math.isfinite(worst) else 0.0


def load_nist(path: str, name: str) -> NistProblem:
    """Parse ``<path>/<name>.dat`` (the StRD file format: starting and certified values on
    the ``b1 = ...`` lines, ``Residual Sum of Squares:``, data after the ``Data:  y`` line)."""
    import os

    with open(os.path.join(path, f"{name}.dat")) as fh:
        lines = fh.read().splitlines()
    starts1, starts2, cert = [], [], []
    rss = math.nan
    data: list[list[float]] = []
    in_data = False
    for line in lines:
        s = line.split()
        if in_data:
            if s:
                data.append([float(v) for v in s])
            continue
        if len(s) >= 5 and s[0].startswith("b") and s[1] == "=":
            starts1.append(float(s[2]))
            starts2.append(float(s[3]))
            cert.append(float(s[4]))
        elif line.startswith("Residual Sum of Squares:"):
            rss = float(s[-1])
        elif s[:1] == ["Data:"] and len(s) > 1 and s[1] == "y":
            in_data = True
    arr = torch.tensor(data, dtype=torch.float64)
    x = arr[:, 1] if arr.shape[1] == 2 else arr[:, 1:]
    return NistProblem(name, x, arr[:, 0], (tuple(starts1), tuple(starts2)), tuple(cert), rss)


def nist_problems(path: str) -> list[NistProblem]:
    """All 27 NIST StRD nonlinear regression problems found in ``path`` (the directory of
    the ``.dat`` files), in NIST's order of difficulty (lower, average, higher)."""
    return [load_nist(path, name) for name in NIST_MODELS]
