"""
Gauss-Newton and Levenberg-Marquardt on a NIST regression problem
=================================================================

For a nonlinear least-squares problem ``min 1/2 ||r(b)||^2`` the Gauss-Newton matrix
``J^T J`` drops the residual-curvature term of the Hessian; Gauss-Newton solves
``J h = -r`` each step, Levenberg-Marquardt solves ``(J^T J + mu D^T D) h = -J^T r`` and
adapts ``mu`` like a trust region (More 1978). NIST's Statistical Reference Datasets
certify the solution of each problem to 11 digits; MGH10 (Meyer's thermistor model,
``y = b1 exp(b2 / (x + b3))``) is in the "higher difficulty" class: the residual spans six
orders of magnitude and the parameters are badly scaled.

**Checked:** from NIST's second starting point Levenberg-Marquardt matches all certified
parameters to at least 6 significant digits (log relative error >= 6) and the certified
residual sum of squares to 1e-6 relatively. Undamped Gauss-Newton, from the same start, reports
success only with a correct answer (``success`` implies log relative error >= 6).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch

import curvlab
from curvlab.minimize.problems import load_nist

# The StRD files curvlab's tests use (the dataset is public domain, from NIST).
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()
DATA = HERE.parents[1] / "tests" / "minimize" / "data"
prob = load_nist(str(DATA), "MGH10")
b0 = torch.tensor(prob.starts[1], dtype=torch.float64)

lm = curvlab.least_squares(prob.residual, b0, method="lm", history=True)
gn = curvlab.least_squares(prob.residual, b0, method="gauss-newton", history=True)
rss = float((prob.residual(lm.x) ** 2).sum())
print(f"LM: nit={lm.nit} success={lm.success} b={lm.x.tolist()}")
print(f"   certified b={list(prob.certified)}; log relative error {prob.lre(lm.x.tolist()):.1f}")
print(f"   RSS {rss:.10e} (certified {prob.certified_rss:.10e})")
print(f"Gauss-Newton: nit={gn.nit} success={gn.success} LRE {prob.lre(gn.x.tolist()):.1f}")
assert prob.lre(lm.x.tolist()) >= 6
assert abs(rss - prob.certified_rss) <= 1e-6 * prob.certified_rss
assert gn.success == (prob.lre(gn.x.tolist()) >= 6)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.semilogy(prob.x, prob.y, "ko", label="NIST data")
xs = torch.linspace(float(prob.x.min()), float(prob.x.max()), 200, dtype=torch.float64)
b = lm.x
ax1.semilogy(xs, b[0] * torch.exp(b[1] / (xs + b[2])), label="LM fit")
ax1.set_xlabel("x")
ax1.set_ylabel("y")
ax1.legend()
for res, label in [(lm, "Levenberg-Marquardt"), (gn, "Gauss-Newton")]:
    ax2.semilogy(res.history["f"], label=label)
ax2.set_xlabel("iteration")
ax2.set_ylabel("1/2 ||r||^2")
ax2.legend()
fig.suptitle("MGH10 (NIST StRD, higher difficulty)")
fig.tight_layout()
