"""
K-FAC and the natural gradient
==============================

The natural gradient preconditions with the Fisher ``F`` of the model's predictive
distribution (Amari 1998); for cross-entropy ``F`` equals the generalized Gauss-Newton
matrix. K-FAC (Martens & Grosse 2015) approximates each layer's block of ``F`` by a
Kronecker product ``A (x) G`` of the input second moment and the output-gradient second
moment, which is cheap to invert. For one sample through one linear layer the block *is*
a Kronecker product, so K-FAC is exact; averaging over samples is where the approximation
enters (the mean of Kronecker products is not the Kronecker product of the means).

**Checked:** for a single linear layer and one sample, the K-FAC matrix equals the exact
Fisher/GGN to 1e-12; with more samples it differs; one step of curvlab's
``NaturalGradient`` optimizer equals ``-(F + lambda I)^-1 g`` computed densely (relative
error < 1e-6).
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

from curvlab.linops import GGNOperator, KFACOperator
from curvlab.optim import NaturalGradient

torch.manual_seed(0)
layer = nn.Linear(6, 4).double()
loss_fn = nn.CrossEntropyLoss()
X, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 4, (64,))

errors = []
sizes = [1, 2, 4, 8, 16, 32, 64]
for n in sizes:
    data = (X[:n], y[:n])
    F = GGNOperator(layer, loss_fn, data).to_dense()
    K = KFACOperator(layer, loss_fn, data, fisher_type="exact").to_dense()
    errors.append(float((K - F).norm() / F.norm()))
print("relative error ||K-FAC - F|| / ||F|| by number of samples:",
      dict(zip(sizes, [f"{e:.1e}" for e in errors])))
assert errors[0] < 1e-12 and errors[-1] > 1e-3

# %%
# One natural-gradient step against a dense solve (``kl_clip=None``: the full damped step;
# by default a step is shortened to a KL divergence of about ``kl_clip / 2``).
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
damping = 1e-3
data = (X, y)
F = GGNOperator(model, loss_fn, data).to_dense()
model.zero_grad()
loss_fn(model(X), y).backward()
g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
expected = -torch.linalg.solve(F + damping * torch.eye(len(g), dtype=F.dtype), g)
before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
opt = NaturalGradient(model, lr=1.0, damping=damping, loss_fn=loss_fn, kl_clip=None,
                      cg_tol=1e-12, cg_max_iter=500)
opt.step(batch=data)
after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
rel = float(((after - before) - expected).norm() / expected.norm())
print(f"NaturalGradient step vs dense (F + lambda I)^-1 g: relative error {rel:.1e}")
assert rel < 1e-6

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(sizes[1:], errors[1:], marker="o")
ax.set_xlabel("samples in the batch")
ax.set_ylabel("||K-FAC - F|| / ||F||")
ax.set_title("K-FAC is exact for one sample (error 0), approximate for more")
fig.tight_layout()
