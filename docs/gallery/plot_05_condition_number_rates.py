"""
Gradient descent, momentum and Nesterov: the condition number sets the rate
===========================================================================

On a quadratic with Hessian eigenvalues in ``[mu, L]`` (condition number
``kappa = L / mu``) gradient descent with the step ``2 / (L + mu)`` contracts the error by
exactly ``(kappa - 1) / (kappa + 1)`` per iteration along the extreme eigenvectors
(Nesterov, *Lectures on Convex Optimization*, Thm. 2.1.15), so it needs ``O(kappa)``
iterations. Heavy-ball momentum (Polyak 1964) and Nesterov's accelerated gradient need
``O(sqrt(kappa))``.

**Checked:** the measured per-iteration contraction of ``f - f*`` for gradient descent is
``((kappa - 1) / (kappa + 1))^2`` to 1e-9; momentum and Nesterov reach ``f - f* <= 1e-12``
in at most a third of gradient descent's iterations at ``kappa = 100``.
"""

import math

import matplotlib.pyplot as plt
import torch

import curvlab

mu, L = 1.0, 100.0
kappa = L / mu
lam = torch.tensor([mu, 10.0, L], dtype=torch.float64)     # a diagonal quadratic


def f(x):
    return 0.5 * (lam * x * x).sum()


x0 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)   # on the extreme eigenvectors
gtol = 1e-7
gd = curvlab.minimize(f, x0, method="gd", lr=2 / (L + mu), gtol=gtol, max_iter=5000,
                      history=True)
hb = curvlab.minimize(f, x0, method="momentum", lr=4 / (math.sqrt(L) + math.sqrt(mu)) ** 2,
                      beta=((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2, gtol=gtol,
                      max_iter=5000, history=True)
nag = curvlab.minimize(f, x0, method="nesterov", gtol=gtol, max_iter=5000, history=True)

rho = (kappa - 1) / (kappa + 1)
fs = gd.history["f"]
measured = (fs[20] / fs[10]) ** (1 / 10)
print(f"gradient descent: contraction of f - f* {measured:.10f}, theory {rho ** 2:.10f}")
assert abs(measured - rho ** 2) < 1e-9


def iterations_to(res, tol=1e-12):
    return next(i for i, v in enumerate(res.history["f"]) if v <= tol)


n_gd, n_hb, n_nag = (iterations_to(r) for r in (gd, hb, nag))
print(f"iterations to f - f* <= 1e-12: GD {n_gd}, heavy ball {n_hb}, Nesterov {n_nag}")
assert n_hb <= n_gd / 3 and n_nag <= n_gd / 3

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for res, label in [(gd, "gradient descent, lr = 2/(L+mu)"), (hb, "heavy ball (optimal)"),
                   (nag, "Nesterov (backtracking, restarts)")]:
    ax.semilogy([max(v, 1e-30) for v in res.history["f"]], label=label)
k = torch.arange(len(gd.history["f"]))
ax.semilogy(k, fs[0] * rho ** (2 * k), "k:", label="theory for GD: rho^(2k)")
ax.set_ylim(1e-20, 1e3)
ax.set_xlabel("iteration")
ax.set_ylabel("f - f*")
ax.set_title(f"Quadratic, kappa = {kappa:.0f}")
ax.legend(fontsize=8)
fig.tight_layout()
