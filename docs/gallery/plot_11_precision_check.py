"""
Precision cross-check: bfloat16 and float32 against float64
===========================================================

Training in low precision is only safe if the loss, gradient and update it computes are
close to the exact ones. ``precision_check`` recomputes them in each dtype (``mode="cast"``:
the model and inputs cast to it) and compares with a float64 reference: relative errors
of the loss, the gradient, and the optimizer's update, and per layer how much the error
grows through it. The machine epsilon sets the scale: ``2^-7 = 7.8e-3`` for bfloat16,
``2^-23 = 1.2e-7`` for float32 (Higham, *Accuracy and Stability of Numerical Algorithms*).

**Checked:** every relative error is below 100 machine epsilons of its dtype, and bfloat16's
gradient error is more than 1000 times float32's.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlab.diagnostics import precision_check

digits = load_digits()
X = torch.tensor(digits.data[:256], dtype=torch.float32) / 16
y = torch.tensor(digits.target[:256])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
report = precision_check(model, nn.CrossEntropyLoss(), (X, y), ("bfloat16", "float32"),
                         optimizer=opt)
errors = {}
for name, rep in report.reports.items():
    errors[name] = {"loss": rep.loss_error, "gradient": rep.grad_error,
                    "update": rep.update_error}
    print(f"{name:9s} eps={rep.eps:.1e}  " + "  ".join(f"{k} {v:.1e}"
                                                  for k, v in errors[name].items()))
    assert all(v < 100 * rep.eps for v in errors[name].values()), name
assert errors["bfloat16"]["gradient"] > 1000 * errors["float32"]["gradient"]

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
kinds = list(errors["float32"])
for i, name in enumerate(errors):
    ax.bar([k + 0.4 * i for k in range(len(kinds))], [errors[name][k] for k in kinds],
           width=0.4, label=name)
ax.set_yscale("log")
ax.set_xticks([k + 0.2 for k in range(len(kinds))], kinds)
ax.set_ylabel("relative error vs float64")
ax.legend()
fig.tight_layout()
