"""curvlab in a few lines: curvature of a model, a classical solver, an optimizer."""

import torch
from torch import nn

import curvlab
from curvlab.diagnostics import top_eigenvalues
from curvlab.linops import HessianOperator

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
X, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))   # matrix-free, n x n
print("lambda_max:", top_eigenvalues(H, k=1).eigenvalues, "after", H.num_matvecs, "HVPs")
res = curvlab.minimize(lambda x: ((1 - x[0])**2 + 100 * (x[1] - x[0]**2)**2), torch.zeros(2),
                       method="trust-ncg")
print(res.x, res.success, res.nit)
opt = curvlab.optim.SOAP(model.parameters(), lr=3e-3)       # a torch.optim optimizer
