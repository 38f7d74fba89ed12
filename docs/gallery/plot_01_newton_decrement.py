"""
Newton's method on a quadratic: one step, and the Newton decrement
==================================================================

On a strictly convex quadratic ``f(x) = 1/2 x^T A x - b^T x`` the quadratic model *is* the
function, so the Newton step ``-A^-1 g`` lands on the minimizer in one iteration, and half
the squared Newton decrement, ``lambda(x)^2 / 2 = g^T A^-1 g / 2``, is exactly the
suboptimality ``f(x) - f*`` (Boyd & Vandenberghe, *Convex Optimization*, sec. 9.5.1).
Gradient descent with exact line search needs many iterations when ``A`` is
ill-conditioned.

**Checked:** Newton takes 1 iteration; ``decrement^2 / 2 == f(x0) - f*`` to 1e-10
(computed matrix-free by Lanczos quadrature).
"""

import matplotlib.pyplot as plt
import torch

import curvlab
from curvlab.diagnostics import newton_decrement

torch.manual_seed(0)
n = 20
Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
A = Q @ torch.diag(torch.logspace(0, 2, n, dtype=torch.float64)) @ Q.T   # cond(A) = 100
b = torch.randn(n, dtype=torch.float64)


def f(x):
    return 0.5 * x @ A @ x - b @ x


x0 = torch.zeros(n, dtype=torch.float64)
x_star = torch.linalg.solve(A, b)
f_star = float(f(x_star))

newton = curvlab.minimize(f, x0, method="newton", gtol=1e-10, history=True)
gd = curvlab.minimize(f, x0, method="gd", line_search="exact", gtol=1e-10, history=True)
print(f"Newton: {newton.nit} iteration(s); gradient descent (exact line search): {gd.nit}")
assert newton.nit == 1
assert torch.allclose(newton.x, x_star, atol=1e-10)

# %%
# The decrement from Hessian-vector products only (``A`` as an operator; here a dense
# matrix, a curvlab.linops operator works the same way).
g0 = A @ x0 - b
dec = newton_decrement(A, g0)
print(f"decrement^2/2 = {dec.value ** 2 / 2:.12f}, f(x0) - f* = {float(f(x0)) - f_star:.12f}")
assert abs(dec.value ** 2 / 2 - (float(f(x0)) - f_star)) < 1e-10

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for res, label in [(gd, "gradient descent, exact line search"), (newton, "Newton")]:
    gaps = [max(h - f_star, 1e-16) for h in res.history["f"]]
    ax.semilogy(gaps, marker="o", ms=3, label=label)
ax.set_xlabel("iteration")
ax.set_ylabel("f(x) - f*")
ax.set_title("Quadratic, cond(A) = 100")
ax.legend()
fig.tight_layout()
