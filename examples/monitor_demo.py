"""Train past the edge of stability and watch CurvatureMonitor warn about it.

Full-batch gradient descent on 500 digits images (MSE on one-hot targets, tanh MLP) at a
learning rate that is stable at first: progressive sharpening drives lr x lambda_max
towards 2, the monitor forecasts the crossing from its trend and warns, and shortly after
the crossing the loss spikes (then GD settles at the edge of stability, Cohen et al. 2021).
Writes monitor_demo.png (loss next to lr x lambda_max, warnings marked) and
monitor_demo/monitor.jsonl.

Run: python examples/monitor_demo.py [--steps 800] [--out monitor_demo.png]
"""

import argparse

import torch
from torch import nn

from curvlab.bench.problems.digits import load_digits_tensors
from curvlab.diagnostics import CurvatureMonitor
from curvlab.diagnostics.plots import plot_monitor

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=800)
ap.add_argument("--lr", type=float, default=1.5)
ap.add_argument("--out", default="monitor_demo.png")
args = ap.parse_args()

(X, y), _ = load_digits_tensors()
X, Y = X[:500], nn.functional.one_hot(y[:500], 10).float()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 10))
loss_fn = nn.MSELoss()
opt = torch.optim.SGD(model.parameters(), lr=args.lr)

monitor = CurvatureMonitor(model, loss_fn, batch=(X, Y), optimizer=opt, every=10,  # line 1
                           track_every=1,
                           log_dir="monitor_demo")
for _ in range(args.steps):
    opt.zero_grad()
    loss = loss_fn(model(X), Y)
    loss.backward()
    opt.step()
    monitor.step(loss)                                                             # line 2

monitor.close()
for event in monitor.events:
    print(f"step {event.step:4d}  {event.kind:18s} {event.message}")
s = monitor.summary()
print(f"{s['checks']} checks, {s['hvps_per_check']:.2f} HVPs per check, "
      f"monitor overhead {100 * s['overhead']:.1f}% of wall time (full-batch GD on 500 "
      "images is cheap, so checks every 10 steps are relatively expensive here)")
print("plot:", plot_monitor(monitor, args.out, title=f"Full-batch GD, lr={args.lr}"))
