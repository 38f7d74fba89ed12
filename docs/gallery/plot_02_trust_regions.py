"""
Trust regions on the Rosenbrock function
========================================

A trust-region method minimizes the quadratic model ``m(p) = f + g^T p + 1/2 p^T H p``
inside a ball ``||p|| <= Delta`` and grows or shrinks ``Delta`` by how well the model
predicted the actual decrease (Nocedal & Wright, ch. 4). The subproblem solvers trade
accuracy for cost: the Cauchy point (steepest descent in the model), dogleg,
Steihaug-CG (``trust-ncg``, Hessian-vector products only) and the nearly exact
More-Sorensen solution (``trust-exact``).

**Checked:** every variant reaches ``||grad||_inf <= 1e-8`` at ``(1, 1)``; the better the
subproblem solution, the fewer iterations (``trust-exact`` and ``trust-ncg`` need far
fewer than the Cauchy point).
"""

import matplotlib.pyplot as plt
import torch

import curvlab
from curvlab.minimize.problems import rosenbrock

x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
results = {}
for method in ["trust-cauchy", "dogleg", "trust-ncg", "trust-exact"]:
    res = curvlab.minimize(rosenbrock, x0, method=method, gtol=1e-8, max_iter=20000,
                           return_all=True)
    results[method] = res
    print(f"{method:13s} success={res.success} nit={res.nit:5d} x={res.x.tolist()}")
    assert res.success and torch.allclose(res.x, torch.ones(2, dtype=torch.float64), atol=1e-6)
assert results["trust-exact"].nit < results["trust-cauchy"].nit / 10
assert results["trust-ncg"].nit < results["trust-cauchy"].nit / 10

# %%
# The paths on the banana-shaped valley.
u = torch.linspace(-1.5, 1.5, 200, dtype=torch.float64)
v = torch.linspace(-0.5, 1.5, 200, dtype=torch.float64)
U, V = torch.meshgrid(u, v, indexing="xy")
Z = (1 - U) ** 2 + 100 * (V - U ** 2) ** 2
fig, ax = plt.subplots(figsize=(6, 4))
ax.contour(U, V, torch.log10(Z + 1e-3), levels=20, cmap="Greys")
for method, res in results.items():
    path = torch.stack([torch.as_tensor(p) for p in res.allvecs])
    ax.plot(path[:, 0], path[:, 1], marker=".", ms=3, lw=1, label=f"{method} ({res.nit})")
ax.plot([1], [1], "k*", ms=12)
ax.set_xlim(-1.5, 1.5)
ax.set_ylim(-0.5, 1.5)
ax.legend(fontsize=8)
ax.set_title("Trust-region paths (iterations in brackets)")
fig.tight_layout()
