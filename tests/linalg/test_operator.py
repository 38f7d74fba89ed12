"""Symmetry checks where a user's operator enters curvlab's linear algebra (as_operator)."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics.spectrum import top_eigenvalues, trace
from curvlab.linalg import MatvecOperator, as_operator, lanczos, logdet, slq
from curvlab.linops import HessianOperator

from ._problems import matrix_with_spectrum

NONSYM = torch.tensor([[1.0, 100.0], [0.0, 2.0]], dtype=torch.float64)  # eigenvalues 1, 2


class DuckOperator:
    """A user's operator object: ``matvec`` and ``shape``, nothing else."""

    def __init__(self, A):
        self.A, self.shape, self.dtype = A, tuple(A.shape), A.dtype

    def matvec(self, v):
        return self.A @ v


@pytest.mark.parametrize("wrap", ["dense", "matvec", "duck"])
def test_nonsymmetric_operator_is_refused(wrap):
    """Issue 15: Lanczos on [[1, 100], [0, 2]] returned a 'top eigenvalue' of 10.3 (77.7 on
    other draws) with no error; every entry point now refuses it."""
    op = {"dense": NONSYM, "matvec": MatvecOperator(lambda v: NONSYM @ v, 2),
          "duck": DuckOperator(NONSYM)}[wrap]
    with pytest.raises(ValueError, match="not symmetric"):
        top_eigenvalues(op)


def test_nonsymmetric_refused_by_estimators_and_logdet():
    A = matrix_with_spectrum(torch.linspace(1, 2, 40), seed=0)
    A[0, 1] += 0.5  # relative asymmetry ~ 0.06
    for fn in (lambda op: trace(op, 12), lambda op: slq(op, 2, 5),
               lambda op: logdet(op, method="slq"), lambda op: logdet(op, method="dense")):
        with pytest.raises(ValueError, match="not symmetric"):
            fn(A)
        with pytest.raises(ValueError, match="not symmetric"):
            fn(MatvecOperator(lambda v: A @ v, 40))


def test_small_relative_asymmetry_is_caught_by_the_random_test():
    """The random test measures ||A - A^T||_F / ||A||_F, not diluted by sqrt(n)."""
    n = 400
    A = matrix_with_spectrum(torch.linspace(1, 2, n), seed=1)
    K = torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    K = (K - K.T) / float(torch.linalg.matrix_norm(K - K.T)) * float(torch.linalg.matrix_norm(A))
    bad = A + 1e-5 * K  # symmetric part A, skew part 1e-5 relative (1000x the tolerance)
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos(MatvecOperator(lambda v: bad @ v, n), 1)


def test_symmetric_up_to_rounding_passes():
    """float32 matrices and float32 autograd Hessian-vector products are symmetric only
    up to rounding: accepted."""
    A = matrix_with_spectrum(torch.linspace(-1, 3, 60), seed=3)
    A32 = A.float()
    A32[0, 1] += 1e-6  # rounding-level asymmetry
    top_eigenvalues(A32)
    top_eigenvalues(MatvecOperator(lambda v: A32 @ v, 60, dtype=torch.float32))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    X, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))  # float32 products
    for seed in range(5):  # as a user's matvec: checked, accepted
        as_operator(MatvecOperator(lambda v, s=seed: op.matvec(v) * (1 + s), op.shape[0],
                                   dtype=torch.float32))


def test_curvlab_operators_are_not_checked_and_user_operators_once():
    """curvlab's own operators cost no extra products; a user's MatvecOperator is checked
    on first use only (two products, counted), and check_symmetry=False opts out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    res = lanczos(op, 1, tol=1e-8)
    assert res.num_matvecs == res.num_iters == op.num_matvecs
    A = matrix_with_spectrum(torch.linspace(1, 2, 30), seed=4)
    user = MatvecOperator(lambda v: A @ v, 30)
    first = lanczos(user, 1, tol=1e-8)
    assert first.num_matvecs == first.num_iters + 2
    second = lanczos(user, 1, tol=1e-8)
    assert second.num_matvecs == second.num_iters
    noisy = MatvecOperator(lambda v: NONSYM @ v, 2, check_symmetry=False)
    assert lanczos(noisy, 1).num_matvecs >= 1  # the user's responsibility now
