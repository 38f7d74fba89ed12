"""The plot functions write non-empty PNGs from real results."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics import CurvatureMonitor, layer_sharpness, spectral_density
from curvlab.diagnostics.plots import (
    plot_eigenvalues,
    plot_layer_sharpness,
    plot_monitor,
    plot_spectral_density,
)
from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator

pytest.importorskip("matplotlib")

PNG = b"\x89PNG"


def test_plots_write_pngs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (X, y))
    paths = [
        plot_spectral_density(spectral_density(op, num_probes=2, num_steps=10, deflate=2),
                              tmp_path / "density.png"),
        plot_eigenvalues(lanczos(op, 3, tol=1e-3), tmp_path / "top.png"),
        plot_layer_sharpness(layer_sharpness(op, tol=1e-2), tmp_path / "sub" / "layers.png"),
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = CurvatureMonitor(model, loss_fn, (X, y), optimizer=opt, every=2, track_every=1)
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon._event("approaching", "lr_sharpness", 1.0, 2.0, "test marker", 20.0)
    paths.append(plot_monitor(mon, tmp_path / "monitor.png"))
    for p in paths:
        data = open(p, "rb").read()
        assert data[:4] == PNG and len(data) > 5000
