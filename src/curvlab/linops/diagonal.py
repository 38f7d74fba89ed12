"""Diagonals of curvature matrices (exact or Hutchinson estimates) as diagonal operators."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.func as tf
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from curvlab.autodiff import one_sample_at_a_time
from curvlab.distributed import synced_generator
from curvlab.linops._kronecker import sample_scores, symmetric_eigh
from curvlab.linops._outputspace import (
    Linearization,
    has_canonical_hessian,
    loss_on_outputs,
    loss_term_scale,
    per_sample_losses,
    per_sample_output_grads,
    per_sample_output_hessians,
    sample_weights,
)
from curvlab.linops.base import CurvatureOperator
from curvlab.linops.fisher import EmpiricalFisherOperator
from curvlab.linops.ggn import GGNOperator
from curvlab.linops.hessian import HessianOperator
from curvlab.losses import check_curved_in_outputs
from curvlab.objective import Objective, is_batched, sample_rows

logger = logging.getLogger(__name__)

__all__ = ["DiagonalOperator", "DIAGONAL_CURVATURES", "DIAGONAL_METHODS"]

DIAGONAL_CURVATURES = ("ggn", "hessian", "ef")
DIAGONAL_METHODS = ("exact", "hutchinson", "mc")
_OPERATORS = {"ggn": GGNOperator, "hessian": HessianOperator, "ef": EmpiricalFisherOperator}


class DiagonalOperator(CurvatureOperator):
    """``D = diag(A)`` of a curvature matrix ``A`` (GGN, Hessian or empirical Fisher),
    applied elementwise; the vector is ``.diagonal``.

    ``method="exact"``:

    * ``"ggn"``: ``diag(J^T H J) = sum_i sum_r lambda_ir (J_i^T q_ir)^2`` with
      ``c_i H_i = Q_i diag(lambda_i) Q_i^T`` the eigendecomposition of sample ``i``'s
      weighted output-space loss Hessian (a symmetric factorization; ``H_i = L L^T`` when
      ``H_i`` is PSD). Vectorized over samples with ``vmap`` (in chunks of ``chunk_size``
      samples; a model vmap cannot batch, as Hugging Face models that check their attention
      masks on the host or packed / multi-layer RNNs, runs one sample at a time), one VJP
      per output dimension and sample (cf. Dangel, Kunstner & Hennig
      2020, "BackPACK", sec. 2.3). Needs a loss that is a mean or sum of per-sample losses
      and samples processed independently: every sample's outputs evaluated alone (the
      primal outputs of its VJPs) must equal its rows of the batch's outputs (no BatchNorm
      or dropout in train mode, no batch-dependent masks or routing; ValueError otherwise).
      The output Hessians are decomposed in float64.
    * ``"ef"``: ``diag(EF) = c sum_i g_i^2`` from per-sample gradients, chunked likewise.
    * ``"hessian"``: ``e_j^T H e_j`` from batched HVPs with blocks of unit vectors (``n``
      HVPs in total; for small models).

    ``method="hutchinson"``: ``diag(A) ~ (1/S) sum_s z_s * (A z_s)`` with Rademacher
    ``z_s`` (Bekas, Kokiopoulou & Saad 2007, "An estimator for the diagonal of a matrix"),
    ``num_samples`` products in blocks of ``chunk_size``, seeded by ``seed``.

    ``method="mc"`` (``"ggn"`` of ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
    ``nn.BCEWithLogitsLoss``, whose output Hessian is the Fisher of a sampled target):
    ``diag(G) ~ (1/S) sum_s (J^T u_s)^2`` with ``u_{s,t} = sqrt(c_t) s_t``, ``s_t`` the
    score of loss term ``t`` at a target drawn from the model
    (:func:`curvlab.linops._kronecker.sample_scores`, ``E[s_t s_t^T] = H_t``) and ``c_t``
    the term's weight in the loss. Terms draw independently, so ``E[u u^T] = diag(c_t
    H_t)`` and ``E[(J^T u)^2] = diag(J^T C H J) = diag(G)``: unbiased, one backward pass
    per draw on the whole batch (cheaper than the per-sample squares of BackPACK's
    ``DiagGGNMC``, Dangel et al. 2020, at a higher variance: its cross-sample terms
    average to zero instead of being absent). ``num_samples`` draws, seeded by ``seed``.

    :meth:`from_vector` wraps a given diagonal; :meth:`refresh` recomputes it.
    """

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, curvature: str = "ggn", method: str = "exact", num_samples: int = 100,
                 seed: int | None = None, chunk_size: int = 64, train: bool = False) -> None:
        if curvature not in DIAGONAL_CURVATURES:
            raise ValueError(f"curvature must be one of {DIAGONAL_CURVATURES}, got {curvature!r}")
        if method not in DIAGONAL_METHODS:
            raise ValueError(f"method must be one of {DIAGONAL_METHODS}, got {method!r}")
        for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if method == "mc" and curvature != "ggn":
            raise ValueError("method='mc' estimates the GGN diagonal from sampled targets; "
                             f"got curvature={curvature!r}")
        self.curvature, self.method = curvature, method
        self.num_samples, self.seed, self.chunk_size = num_samples, seed, chunk_size
        self._per_sample_loop = False  # set once vmap could not batch the model
        self._batching_checked: set[tuple] = set()  # chunk shapes vmap was checked on
        super().__init__(model, loss_fn, data, params, train=train)

    @classmethod
    def from_vector(cls, diagonal: torch.Tensor) -> DiagonalOperator:
        """The diagonal operator ``diag(diagonal)`` for a given 1-D tensor."""
        if not isinstance(diagonal, torch.Tensor) or diagonal.dim() != 1:
            raise ValueError("diagonal must be a 1-D tensor")
        op = cls.__new__(cls)
        op.objective = None  # type: ignore[assignment]
        op.curvature, op.method = None, None
        op.diagonal = diagonal.detach()
        op.num_matvecs = 0
        return op

    # ---- shape and checks (from the vector, so from_vector works without an objective) --
    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``, ``n`` the number of parameters."""
        n = self.diagonal.shape[0]
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors the operator acts on."""
        return self.diagonal.dtype

    @property
    def device(self) -> torch.device:
        """The device of the vectors the operator acts on."""
        return self.diagonal.device

    def _check(self, v: Any, name: str, columns: bool) -> None:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        n = self.shape[0]
        ok = v.dim() == 2 and v.shape[0] == n if columns else v.dim() == 1 and v.shape[0] == n
        if not ok:
            raise ValueError(f"{name} has shape {tuple(v.shape)}, expected "
                             f"{f'({n}, k)' if columns else f'({n},)'}")
        if v.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {v.dtype}, expected {self.dtype}; convert with "
                            f".to({self.dtype})")
        if v.device != self.device:
            raise ValueError(f"{name} is on {v.device}, expected {self.device}")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self._check(v, "v", columns=False)
        self.num_matvecs += 1
        return self.diagonal * v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._check(V, "V", columns=True)
        self.num_matvecs += V.shape[1]
        return self.diagonal.unsqueeze(1) * V

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        return V * self.diagonal

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        return torch.diag(self.diagonal)

    # ---- computing the diagonal ------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the parameters and recompute the diagonal (no-op for :meth:`from_vector`)."""
        if self.objective is None:
            return
        if self.curvature == "ggn":
            check_curved_in_outputs(self.objective.loss_fn, "Gauss-Newton diagonal")
        super().refresh()
        if self.method == "hutchinson":
            self.diagonal = self._hutchinson()
        elif self.method == "mc":
            self.diagonal = self._monte_carlo()
        elif self.curvature == "hessian":
            self.diagonal = self._exact_hessian()
        else:
            self.diagonal = self._exact_output_space()

    def _hutchinson(self) -> torch.Tensor:
        obj = self.objective
        op = _OPERATORS[self.curvature](obj)
        # probes agree on all ranks of a data-parallel objective (None: single process)
        gen = synced_generator(self.seed, obj.process_group, obj.device)
        n = obj.num_params
        total = torch.zeros(n, dtype=obj.dtype, device=obj.device)
        for start in range(0, self.num_samples, self.chunk_size):
            k = min(self.chunk_size, self.num_samples - start)
            Z = torch.randint(0, 2, (n, k), generator=gen, device=obj.device).to(obj.dtype)
            Z = 2 * Z - 1
            total += (Z * op.matmat(Z)).sum(dim=1)
        return total / self.num_samples

    def _monte_carlo(self) -> torch.Tensor:
        obj = self.objective
        gen = synced_generator(self.seed, obj.process_group, obj.device)
        total = torch.zeros(obj.num_params, dtype=obj.dtype, device=obj.device)
        for w, x, y in obj.batches():
            lin = Linearization(obj, self.point, x, reusable=True)
            if not has_canonical_hessian(obj, y):
                raise ValueError("method='mc' needs a loss whose output Hessian is the Fisher "
                                 "of its sampled targets: nn.CrossEntropyLoss on class "
                                 "indices, nn.MSELoss, nn.BCEWithLogitsLoss without weight / "
                                 f"pos_weight; got {type(obj.loss_fn).__name__}; use "
                                 "method='exact' or 'hutchinson'")
            root = loss_term_scale(obj, w, lin.value, y)
            root = root.sqrt() if isinstance(root, torch.Tensor) else math.sqrt(root)
            for start in range(0, self.num_samples, self.chunk_size):
                k = min(self.chunk_size, self.num_samples - start)
                U = torch.stack([sample_scores(obj.loss_fn, lin.value, gen) for _ in range(k)])
                total += lin.vjp(U * root).square().sum(dim=0)
        return obj.all_reduce(total) / self.num_samples

    def _exact_hessian(self) -> torch.Tensor:
        obj = self.objective
        op = HessianOperator(obj)
        n = obj.num_params
        out = torch.empty(n, dtype=obj.dtype, device=obj.device)
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            E = torch.zeros(n, stop - start, dtype=obj.dtype, device=obj.device)
            idx = torch.arange(start, stop, device=obj.device)
            E[idx, idx - start] = 1
            out[start:stop] = op.matmat(E)[idx, idx - start]
        return out

    def _exact_output_space(self) -> torch.Tensor:
        obj = self.objective
        if obj.train and isinstance(obj.model, nn.Module) and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in obj.model.modules()):
            raise ValueError("the exact diagonal evaluates samples one at a time, which "
                             "BatchNorm in train mode does not allow; use train=False or "
                             "method='hutchinson'")
        total = torch.zeros(obj.num_params, dtype=obj.dtype, device=obj.device)
        for w, x, y in obj.batches():
            with torch.no_grad(), obj.mode():
                out = obj.outputs(self.point, x)
            if not isinstance(out, torch.Tensor) or out.dim() == 0:
                raise TypeError("the exact diagonal needs a model returning one batched "
                                "tensor of outputs")
            c = sample_weights(obj, w, out, y).unsqueeze(1)
            if self.curvature == "ef":
                factors = per_sample_output_grads(obj, out, y).reshape(out.shape[0], -1, 1)
                eigvals = c
            else:
                _check_separable(obj, w, c, out, y)
                eigvals, factors = symmetric_eigh(per_sample_output_hessians(obj, out, y))
                eigvals = c * eigvals
            # the squared vjps are in the parameters' dtype, the factors in the outputs'
            # (they differ for a model with float32 logits and float64 weights: Mamba)
            total += self._sum_squared_vjps(x, out, factors, eigvals.to(total.dtype))
        return obj.all_reduce(total)  # data-parallel objective: sum the ranks' shards

    def _check_samples_independent(self, alone: torch.Tensor, out: torch.Tensor,
                                   first: int) -> None:
        """Raise (ValueError) unless ``alone`` (the outputs of samples ``first, first + 1,
        ...`` each evaluated alone: the primal outputs of their VJPs) equals their rows of the
        batch's outputs ``out`` (to 1e-4 of the outputs' scale, 4 rounding units for 16-bit
        outputs: the rounding of a batch of one may differ, and transformers' float32 norms
        inside a float64 model round at ~1e-7). The exact diagonal evaluates samples one at
        a time; a model that mixes the samples of its batch (batch statistics, masks built
        from a sample's position in the batch, dropout masks drawn per batch,
        capacity-limited routing) has other per-sample Jacobians, and the diagonal would be
        wrong without an error. Every sample is compared, at no extra forward pass."""
        rows = out[first:first + alone.shape[0]]
        scale = float(out.abs().max()) if out.numel() else 0.0
        tol = max(1e-4, 4 * torch.finfo(out.dtype).eps) if out.is_floating_point() else 1e-4
        if alone.shape == rows.shape:
            err = (alone.detach().to(rows.dtype) - rows).abs().reshape(rows.shape[0], -1)
            worst = err.amax(dim=1) if err.numel() else err.new_zeros(rows.shape[0])
            bad = (~(worst <= tol * scale)).nonzero()
            if not bad.numel():
                return
            i = first + int(bad[0])
        else:
            i = first
        raise ValueError(
            f"the exact diagonal evaluates samples one at a time, but sample {i} alone gives "
            "other outputs than in its batch: the model mixes the samples of a batch "
            "(train-mode dropout or batch statistics, masks or routing that depend on the "
            "batch) or draws random numbers in its forward; use train=False if the mode is "
            "the cause, or method='hutchinson' / 'mc'")

    def _sum_squared_vjps(self, inputs: Any, out: torch.Tensor, factors: torch.Tensor,
                          eigvals: torch.Tensor) -> torch.Tensor:
        """``sum_i sum_r eigvals[i, r] * (J_i^T factors[i, :, r])^2`` over the batch, whose
        outputs are ``out`` (each sample's own are checked against them)."""
        obj = self.objective
        names = list(self.point)
        out_shape = out.shape[1:]
        batched = tree_flatten(tree_map(is_batched, inputs))[0]

        def batch_of_one(x_i: Any) -> Any:
            """One sample's inputs as a batch of one (its batched leaves unsqueezed)."""
            flat, spec = tree_flatten(x_i)
            return tree_unflatten([t.unsqueeze(0) if b else t
                                   for t, b in zip(flat, batched, strict=True)], spec)

        def one_sample(x_i: Any, q_i: torch.Tensor, lam_i: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
            """Sample ``i``'s squared-VJP row (one tensor per parameter) and its outputs."""
            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return obj.outputs(p, batch_of_one(x_i))[0]

            alone, vjp_fn = tf.vjp(f, self.point)
            cols = q_i.T.reshape(q_i.shape[1], *out_shape)
            g = tf.vmap(vjp_fn)(cols)[0]
            return ([lam_i @ (gk * gk) for gk in (g[k].reshape(cols.shape[0], -1)
                                                  for k in names)], alone)

        def one_sample_autograd(x_i: Any, q_i: torch.Tensor, lam_i: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
            """``one_sample`` by plain autograd, one output direction at a time: for models
            no torch.func transform can run (packed sequences)."""
            point = {k: v.detach().requires_grad_(True) for k, v in self.point.items()}
            with torch.enable_grad():
                out = obj.outputs(point, batch_of_one(x_i))[0]
            cols = q_i.T.reshape(q_i.shape[1], *out_shape)
            rows = []
            for r, col in enumerate(cols):
                grads = torch.autograd.grad(out, list(point.values()), col, allow_unused=True,
                                            retain_graph=r < len(cols) - 1)
                rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if gp is None
                                       else gp.reshape(-1)
                                       for p, gp in zip(point.values(), grads, strict=True)]))
            return lam_i @ torch.stack(rows).square(), out.detach()

        batch = factors.shape[0]
        total = torch.zeros(obj.num_params, dtype=obj.dtype, device=obj.device)
        with obj.mode():
            for start in range(0, batch, self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                x = sample_rows(inputs, sl)
                if not self._per_sample_loop:
                    try:
                        parts, alone = tf.vmap(one_sample, in_dims=(_sample_dims(x), 0, 0))(
                            x, factors[sl], eigvals[sl])
                        rows = torch.cat(parts, dim=1)
                        self._check_batching(rows, one_sample_autograd, x, factors[sl],
                                             eigvals[sl])
                        row_sum = rows.sum(dim=0)
                    except RuntimeError as err:
                        one_sample_at_a_time(err, "the exact diagonal")
                        self._per_sample_loop = True
                if self._per_sample_loop:
                    row_sum, alone = _looped(one_sample_autograd, x, factors[sl], eigvals[sl])
                self._check_samples_independent(alone, out, start)
                total += row_sum
        return total

    def _check_batching(self, rows: torch.Tensor, one_sample_autograd: Any, inputs: Any,
                        factors: torch.Tensor, eigvals: torch.Tensor) -> None:
        """Raise (RuntimeError) unless the vmapped ``rows`` have one entry per parameter and
        the rows of the chunk's first and last samples equal plain autograd's, once per
        chunk shape: nested ``vmap(vmap(vjp))`` can batch a kernel wrongly without an error
        (torch 2.13, ``nn.PReLU``: gradients broadcast over the samples when a chunk's
        number of samples equals its number of output directions, or is 1). Batching rules
        depend on shapes, not values, so one check per shape suffices."""
        n = self.objective.num_params
        if rows.dim() != 2 or rows.shape[1] != n:
            raise RuntimeError(f"vmap returned {tuple(rows.shape)} entries for {n} parameters")
        key = (tuple(factors.shape), tuple(eigvals.shape))
        if key in self._batching_checked:
            return
        for i in sorted({0, rows.shape[0] - 1}):
            ref = one_sample_autograd(sample_rows(inputs, i), factors[i],
                                      eigvals[i])[0]
            tol = math.sqrt(torch.finfo(ref.dtype).eps)
            if float((rows[i] - ref).norm()) > tol * float(ref.norm()):
                raise RuntimeError(f"vmap batched the model's backward pass wrongly (sample "
                                   f"{i} of the chunk differs from plain autograd)")
        self._batching_checked.add(key)


def _sample_dims(inputs: Any) -> Any:
    """``vmap``'s ``in_dims`` for ``inputs``: 0 for batched leaves, None for the others."""
    return tree_map(lambda t: 0 if is_batched(t) else None, inputs)


def _looped(one_sample: Any, inputs: Any, factors: torch.Tensor, eigvals: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i`` of the rows of ``one_sample(x_i, q_i, lam_i)`` over the chunk's samples,
    one at a time (what ``vmap`` of the functorch form batches), and the samples' outputs."""
    total, outputs = None, []
    for i in range(factors.shape[0]):
        row, alone = one_sample(sample_rows(inputs, i), factors[i], eigvals[i])
        total = row if total is None else total + row
        outputs.append(alone)
    return total, torch.stack(outputs)


def _check_separable(obj: Objective, weight: float, c: torch.Tensor, out: torch.Tensor,
                     targets: Any) -> None:
    """The exact GGN diagonal needs ``w * loss(batch) = sum_i c_i loss(sample i)``."""
    with torch.no_grad():
        whole = loss_on_outputs(obj, out, targets)
        per_sample = per_sample_losses(obj, out, targets)
    # compared in float64 to the precision of the coarser one: torch's BCE-with-logits of
    # float64 logits and float32 targets is float32 (its vmapped per-sample form float64)
    tol = max(torch.finfo(t.dtype).eps for t in (whole, per_sample, out)) ** 0.5
    whole = weight * whole.double()
    parts = (c.reshape(-1).double() * per_sample.double()).sum()
    if not torch.isclose(whole, parts, rtol=tol, atol=tol * float(parts.abs())):
        raise ValueError("the exact GGN diagonal needs loss_fn to be the mean or sum of "
                         "per-sample losses (e.g. no class weights); use "
                         "method='hutchinson' instead")
