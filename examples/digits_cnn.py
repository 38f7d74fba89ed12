"""A small CNN on scikit-learn's 8x8 digits, for `curvlab diagnose`:

    curvlab diagnose examples/digits_cnn.py:make

`make()` returns (model, loss_fn, data): the contract of any user factory.
"""

import torch
from torch import nn

from curvlab.bench.problems.digits import load_digits_tensors


def make(train_steps: int = 100, seed: int = 0):
    (X, y), _ = load_digits_tensors(seed=seed)
    X = X.reshape(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(train_steps):
        idx = torch.arange(step * 64, step * 64 + 64) % len(y)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    # Data may be one (inputs, targets) batch, a list of batches or a DataLoader.
    batches = list(zip(X.split(512), y.split(512)))
    return model, loss_fn, batches


if __name__ == "__main__":
    model, loss_fn, batches = make()
    print(sum(loss_fn(model(X), y).item() * len(y) for X, y in batches) / 1438)
