"""
The edge of stability in full-batch gradient descent
====================================================

Gradient descent with step ``eta`` on a quadratic is stable only while the sharpness
``lambda_max`` (the top Hessian eigenvalue) stays below ``2 / eta``. Training a network
with full-batch gradient descent, the sharpness rises ("progressive sharpening") until it
reaches ``2 / eta`` and then hovers there while the loss keeps decreasing non-monotonically
(Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability").

**Checked:** the sharpness starts below ``2 / eta``, rises to it, and over the last
third of the run stays within 25% of ``2 / eta`` (it never settles far above it).
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlab.diagnostics import lambda_max
from curvlab.linops import HessianOperator

digits = load_digits()
X = torch.tensor(digits.data[:300], dtype=torch.float32) / 16
Y = nn.functional.one_hot(torch.tensor(digits.target[:300]), 10).float()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 10))
loss_fn = nn.MSELoss()
eta = 1.0
opt = torch.optim.SGD(model.parameters(), lr=eta)

steps, every = 400, 20
losses, sharp, v0 = [], [], None
for step in range(steps + 1):
    if step % every == 0:
        eig = lambda_max(HessianOperator(model, loss_fn, (X, Y)), tol=1e-3, v0=v0)
        v0 = eig.eigenvectors[:, 0]
        sharp.append((step, float(eig.eigenvalues[0])))
    opt.zero_grad()
    loss = loss_fn(model(X), Y)
    loss.backward()
    losses.append(loss.item())
    opt.step()

s = torch.tensor([v for _, v in sharp])
print(f"2/eta = {2 / eta}; sharpness {[round(v, 2) for v in s.tolist()]}")
assert s[0] < 0.75 * 2 / eta
late = s[-len(s) // 3:]
assert ((late - 2 / eta).abs() <= 0.25 * 2 / eta).all()

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.plot(losses)
ax1.set_xlabel("step")
ax1.set_ylabel("training loss (MSE)")
ax2.plot([t for t, _ in sharp], s, marker="o", ms=3, label="lambda_max")
ax2.axhline(2 / eta, color="k", ls="--", label="2 / eta")
ax2.set_xlabel("step")
ax2.legend()
fig.suptitle(f"Full-batch gradient descent, eta = {eta}")
fig.tight_layout()
