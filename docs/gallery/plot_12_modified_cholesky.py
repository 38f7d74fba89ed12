"""
Damped Newton with a modified Cholesky factorization
====================================================

Where the Hessian is indefinite the Newton step ``-H^-1 g`` need not point downhill: pure
Newton iterations are attracted to any stationary point, saddles included. A modified
Cholesky factorization replaces ``H`` by a positive-definite ``H + E`` (``E = 0`` when
``H`` is already positive definite), so ``-(H + E)^-1 g`` is a descent direction, and a
line search makes the method converge to a local minimizer (Nocedal & Wright, sec. 3.4;
Cheng & Higham 1998). ``curvlab.minimize(method="newton")`` does this.

On the double well ``f(x, y) = x^4 / 4 - x^2 / 2 + y^2 / 2`` (minima at ``(+-1, 0)``, a
saddle at the origin), started where ``d^2f/dx^2 = 3 x^2 - 1 < 0``:

**Checked:** the plain Newton step is an ascent direction there (``g^T p > 0``) and plain
Newton iterations converge to the saddle; the modified direction is a descent direction,
and ``curvlab.minimize(method="newton")`` converges to the minimizer ``(1, 0)``.
"""

import matplotlib.pyplot as plt
import torch

import curvlab
from curvlab.linalg import modified_cholesky


def f(z):
    x, y = z[0], z[1]
    return x ** 4 / 4 - x ** 2 / 2 + y ** 2 / 2


z0 = torch.tensor([0.3, 0.1], dtype=torch.float64)
g = torch.func.grad(f)(z0)
H = curvlab.hessian(f, z0)
fact = modified_cholesky(H)
p_newton = -torch.linalg.solve(H, g)
p_modified = -fact.solve(g)
print(f"eigenvalues of H: {torch.linalg.eigvalsh(H).tolist()}; modified: {fact.modified}")
print(f"g.p: plain Newton {float(g @ p_newton):+.3f}, modified {float(g @ p_modified):+.3f}")
assert fact.modified and float(g @ p_newton) > 0 > float(g @ p_modified)

# Plain Newton iterations, by hand.
z, plain = z0.clone(), [z0.clone()]
for _ in range(20):
    z = z - torch.linalg.solve(curvlab.hessian(f, z), torch.func.grad(f)(z))
    plain.append(z.clone())
res = curvlab.minimize(f, z0, method="newton", gtol=1e-10, return_all=True)
print(f"plain Newton ends at {z.tolist()}; curvlab newton: {res.x.tolist()} in {res.nit} "
      "iterations")
assert z.abs().max() < 1e-8                                   # the saddle
assert res.success and torch.allclose(res.x, torch.tensor([1.0, 0.0], dtype=torch.float64))

# %%
u = torch.linspace(-1.6, 1.6, 200, dtype=torch.float64)
U, V = torch.meshgrid(u, u, indexing="xy")
fig, ax = plt.subplots(figsize=(5.5, 4.5))
ax.contour(U, V, U ** 4 / 4 - U ** 2 / 2 + V ** 2 / 2, levels=30, cmap="Greys")
P = torch.stack(plain)
ax.plot(P[:, 0], P[:, 1], "o-", ms=3, label="plain Newton (to the saddle)")
M = torch.stack([torch.as_tensor(v) for v in res.allvecs])
ax.plot(M[:, 0], M[:, 1], "s-", ms=3, label="modified Cholesky + line search")
ax.plot([0], [0], "kx", ms=10)
ax.legend(fontsize=8)
ax.set_title("Newton on a double well")
fig.tight_layout()
