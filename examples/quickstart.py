"""curvlab in ten lines: exact curvature of a model, matrix-free."""

import torch
from torch import nn

import curvlab
from curvlab.linops import HessianOperator

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
X, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))   # H of the loss w.r.t. all params
v = torch.randn(H.shape[0])
print("||Hv|| =", (H @ v).norm().item(), "after", H.num_matvecs, "HVP")
print("HVP of a plain function:", curvlab.hvp(lambda x: (x**4).sum(), torch.ones(3), torch.ones(3)))
