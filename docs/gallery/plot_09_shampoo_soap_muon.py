"""
Shampoo, SOAP and Muon side by side on digits
=============================================

Three structured preconditioners for matrix-shaped weights ``W`` (``m x n``):

* **Shampoo** (Gupta, Koren & Singer 2018; Anil et al. 2020) preconditions with the
  Kronecker factors ``L = sum G G^T``, ``R = sum G^T G``: ``W -= lr L^-1/4 G R^-1/4``
  (here grafted to Adam's step size).
* **SOAP** (Vyas et al. 2024) runs Adam in the eigenbasis of Shampoo's factors,
  refreshed every ``precondition_frequency`` steps.
* **Muon** (Jordan et al. 2024) orthogonalizes the momentum with a Newton-Schulz iteration,
  ``W -= lr UV^T`` for the momentum ``U S V^T``; embeddings, biases and heads use AdamW
  (``muon_param_groups`` routes them).

All three are ``torch.optim`` optimizers with the same contract (``docs/optimizers.md``).

**Checked:** from the same initialization and 100 full-batch steps on 500 digits each of
Shampoo, SOAP and Muon lowers the training loss below 10% of its initial value, and at
least as far as SGD with momentum (learning rates from a coarse grid).
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlab.optim import SOAP, Muon, Shampoo, muon_param_groups

digits = load_digits()
X = torch.tensor(digits.data[:500], dtype=torch.float32) / 16
y = torch.tensor(digits.target[:500])
loss_fn = nn.CrossEntropyLoss()


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


optimizers = {
    "SGD + momentum (lr 0.1)": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Shampoo (lr 3e-3)": lambda m: Shampoo(m.parameters(), lr=3e-3),
    "SOAP (lr 1e-2)": lambda m: SOAP(m.parameters(), lr=1e-2),
    "Muon (lr 0.02)": lambda m: Muon(muon_param_groups(m, lr=0.02, adamw_lr=3e-3)),
}
curves = {}
for name, make_opt in optimizers.items():
    model = make_model()
    opt = make_opt(model)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    curves[name] = losses
    print(f"{name:26s} loss {losses[0]:.3f} -> {losses[-1]:.4f}")

sgd = curves["SGD + momentum (lr 0.1)"][-1]
for name, losses in curves.items():
    if not name.startswith("SGD"):
        assert losses[-1] < 0.1 * losses[0] and losses[-1] <= sgd, name

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, losses in curves.items():
    ax.semilogy(losses, label=name)
ax.set_xlabel("step (full batch)")
ax.set_ylabel("training loss")
ax.set_title("Digits MLP (64-64-64-10)")
ax.legend(fontsize=8)
fig.tight_layout()
