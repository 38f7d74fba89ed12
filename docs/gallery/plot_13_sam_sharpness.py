"""
SAM finds flatter minima
========================

Sharpness-aware minimization (Foret et al. 2021) takes the base optimizer's step with the
gradient at the worst nearby point, ``w + e`` with ``e = rho g / ||g||``: it descends on
``max_{||e|| <= rho} L(w + e) ~ L(w) + rho ||g||``, which penalizes sharp regions.
``curvlab.optim.SAM`` wraps any torch optimizer (here SGD with momentum); its
``step(closure)`` calls the closure twice and restores ``w`` bit for bit before the base
step. The radius matters: on this small network, at this loss, ``rho = 0.05`` (the
paper's CIFAR value) changed ``lambda_max`` by 1%, ``rho = 0.3`` by a quarter, ``rho = 1``
halved it (measured when this example was written).

**Checked:** training the same ReLU MLP on 500 digits from the same initialization, full
batch, until the training loss first falls below 0.05, SAM(SGD) with ``rho = 0.3`` arrives
at a top Hessian eigenvalue ``lambda_max`` (curvlab's Lanczos on the exact Hessian) at
least 10% below SGD's.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator
from curvlab.optim import SAM

digits = load_digits()
X = torch.tensor(digits.data[:500], dtype=torch.float32) / 16
y = torch.tensor(digits.target[:500])
loss_fn = nn.CrossEntropyLoss()
LEVEL = 0.05


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(make_opt):
    """Full-batch steps until the training loss falls below LEVEL; the loss curve."""
    model = make_model()
    opt = make_opt(model)
    losses = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    while not losses or losses[-1] >= LEVEL:
        losses.append(float(opt.step(closure).detach()))
        assert len(losses) < 5000
    return model, losses


runs = {
    "SGD (lr 0.1, momentum 0.9)":
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "SAM(SGD), rho 0.3":
        lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9),
}
sharpness, curves = {}, {}
for name, make_opt in runs.items():
    model, curves[name] = train(make_opt)
    op = HessianOperator(model, loss_fn, (X, y))
    sharpness[name] = float(lanczos(op, 1, tol=1e-6).eigenvalues[0])
    print(f"{name:28s} {len(curves[name]):4d} steps to loss < {LEVEL}: "
          f"lambda_max = {sharpness[name]:.3f}")

sgd, sam = sharpness.values()
assert sam < 0.9 * sgd, (sam, sgd)

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, losses in curves.items():
    ax.semilogy(losses, label=f"{name}: lambda_max {sharpness[name]:.2f}")
ax.axhline(LEVEL, color="0.5", ls="--", lw=0.8)
ax.set_xlabel("step (full batch)")
ax.set_ylabel("training loss")
ax.set_title("Same loss, different sharpness")
ax.legend(fontsize=8)
fig.tight_layout()
