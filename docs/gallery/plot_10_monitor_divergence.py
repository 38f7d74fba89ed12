"""
Monitoring a run that diverges
==============================

``CurvatureMonitor`` watches a training run at the cost of a few Hessian-vector products
per check: it tracks ``lr x lambda_max`` against the optimizer's stability threshold (2 for
gradient descent), forecasts when the trend crosses it, and raises events. Here a
learning-rate schedule that grows 3% per step pushes full-batch gradient descent past
``2 / lambda_max``: the loss then explodes within a few steps.

**Checked:** the monitor's first warning comes before the loss first exceeds 10x its
minimum, and the warning says the schedule drives the rise.
"""

import math

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlab.diagnostics import CurvatureMonitor

digits = load_digits()
X = torch.tensor(digits.data[:300], dtype=torch.float32) / 16
Y = nn.functional.one_hot(torch.tensor(digits.target[:300]), 10).float()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
loss_fn = nn.MSELoss()
opt = torch.optim.SGD(model.parameters(), lr=0.2)
schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.03)

monitor = CurvatureMonitor(model, loss_fn, batch=(X, Y), optimizer=opt, every=5,
                           track_every=1)
losses = []
for _ in range(200):
    opt.zero_grad()
    loss = loss_fn(model(X), Y)
    loss.backward()
    opt.step()
    monitor.step(loss)
    schedule.step()
    losses.append(loss.item())
    if not math.isfinite(losses[-1]) or losses[-1] > 1e3:
        break
monitor.close()

for event in monitor.events:
    print(f"step {event.step:4d}  {event.kind:14s} {event.severity:8s} {event.message}")
blowup = next(i + 1 for i, v in enumerate(losses) if v > 10 * min(losses[: i + 1]))
first_warning = monitor.warnings[0]
print(f"first warning at step {first_warning.step}; loss > 10x its minimum at step {blowup}")
assert first_warning.step < blowup
assert "schedule" in first_warning.message

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.semilogy(range(1, len(losses) + 1), losses)
ax1.set_xlabel("step")
ax1.set_ylabel("training loss")
checks = monitor.checks
ax2.plot([c["step"] for c in checks], [c["lr_sharpness"] for c in checks], marker="o", ms=3,
         label="lr x lambda_max")
ax2.axhline(2, color="k", ls="--", label="threshold (GD)")
for ax in (ax1, ax2):
    ax.axvline(first_warning.step, color="C3", ls=":", label="first warning")
ax2.set_xlabel("step")
ax2.legend(fontsize=8)
fig.tight_layout()
