"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes) and a small MLP on it."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_digits_tensors", "digits_mlp", "digits_autoencoder", "digits_problem"]


def load_digits_tensors(
    dtype: torch.dtype = torch.float32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Standardized digits features, split into ``(train, test)`` ``(X, y)`` pairs.

    Features are scaled to zero mean / unit variance with the training split's statistics;
    the scale is floored at 1 (a pixel almost constant on the training split would otherwise
    be blown up on the test split).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("the digits problem needs scikit-learn: "
                          "pip install scikit-learn") from err
    data = load_digits()
    X = torch.as_tensor(data.data, dtype=dtype)
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean = X[train_idx].mean(0)
    std = X[train_idx].std(0).clamp_min(1.0)
    X = (X - mean) / std
    return (X[train_idx], y[train_idx]), (X[test_idx], y[test_idx])


def _mlp(sizes: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def digits_mlp(hidden: tuple[int, ...] = (128, 128), seed: int = 0,
               dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A ReLU MLP 64 -> hidden... -> 10."""
    torch.manual_seed(seed)
    return _mlp((64, *hidden, 10), nn.ReLU).to(dtype)


ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                                            "relu": nn.ReLU}


def digits_autoencoder(sizes: tuple[int, ...] = (64, 32, 16, 8, 16, 32, 64), seed: int = 0,
                       activation: str = "sigmoid") -> nn.Sequential:
    """An autoencoder ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` ("sigmoid",
    "tanh" or "relu") hidden units, PyTorch's default initialization and a linear output
    layer (logits of the reconstructed pixels)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    torch.manual_seed(seed)
    return _mlp(sizes, ACTIVATIONS[activation])


def digits_problem(train_steps: int = 50, seed: int = 0, lr: float = 0.05,
                   batch_size: int = 128, dtype: torch.dtype = torch.float32):
    """The default model of ``curvlab diagnose``: a digits MLP trained briefly with SGD.

    Returns ``(model, loss_fn, (X_train, y_train))``.
    """
    (X, y), _ = load_digits_tensors(dtype=dtype, seed=seed)
    model = digits_mlp(seed=seed, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    return model, loss_fn, (X, y)
