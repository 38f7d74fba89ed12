"""
Hessian-vector products and the Hessian spectrum of a transformer
=================================================================

A Hessian-vector product costs about two gradients (Pearlmutter 1994) and never forms the
``n x n`` Hessian. ``HessianOperator`` wraps any ``nn.Module`` + loss + data as a
matrix-free operator; ``loss_fn=None`` uses a Hugging Face model's own loss. Lanczos then
finds the extreme eigenvalues and stochastic Lanczos quadrature the spectral density
(Ghorbani, Krishnan & Xiao 2019) from a few dozen products. The model is a one-block GPT-2
built from a config (random weights: nothing is downloaded).

**Checked:** the product equals a central finite difference of gradients to 1e-6
(float64), ``u^T H v == v^T H u`` to 1e-10, and the top Ritz pair has a residual
``||H y - theta y|| <= 1e-3 |theta|``.
"""

import matplotlib.pyplot as plt
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import curvlab
from curvlab.diagnostics import spectral_density, top_eigenvalues
from curvlab.linops import HessianOperator

torch.manual_seed(0)
config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                    bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(config).double().eval()
ids = torch.randint(0, 32, (4, 8))
batch = {"input_ids": ids, "labels": ids}

H = HessianOperator(model, None, batch)          # None: the model's own (causal-LM) loss
n = H.shape[0]
print(f"{n} parameters")

# %%
# A product against finite differences of the gradient, and symmetry.
obj = curvlab.Objective(model, None, batch)
theta = obj.flatten(obj.param_tensors())
v = torch.randn(n, dtype=torch.float64)
v /= v.norm()
h = 1e-5


def grad_at(x):
    return obj.flat_grad(obj.unflatten(x))


fd = (grad_at(theta + h * v) - grad_at(theta - h * v)) / (2 * h)
Hv = H @ v
rel = float((Hv - fd).norm() / Hv.norm())
u = torch.randn(n, dtype=torch.float64)
sym = abs(float(u @ (H @ v) - v @ (H @ u)))
print(f"||Hv - finite difference|| / ||Hv|| = {rel:.2e};  |u.Hv - v.Hu| = {sym:.1e}")
assert rel < 1e-6 and sym < 1e-10

# %%
# The top eigenvalues by Lanczos, and the spectral density by SLQ.
H.num_matvecs = 0
top = top_eigenvalues(H, k=2, tol=1e-3, generator=torch.Generator().manual_seed(0))
y, theta1 = top.eigenvectors[:, 0], float(top.eigenvalues[0])
res = float((H @ y - theta1 * y).norm())
print(f"top eigenvalues {top.eigenvalues.tolist()} after {top.num_matvecs} HVPs; "
      f"residual {res:.1e}")
assert res <= 1e-3 * abs(theta1)
density = spectral_density(H, num_probes=2, num_steps=30,
                           generator=torch.Generator().manual_seed(0))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(density.grid, density.density.clamp_min(1e-8))
for lam in top.eigenvalues:
    ax.axvline(float(lam), color="C3", ls=":", lw=1)
ax.set_xlabel("eigenvalue")
ax.set_ylabel("density")
ax.set_title(f"Hessian spectrum, GPT-2 (1 block, n = {n}), {density.num_matvecs} HVPs")
fig.tight_layout()
