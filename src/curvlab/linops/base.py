"""The matrix-free linear-operator interface shared by every curvature matrix.

A curvature operator is a symmetric ``n x n`` matrix over the flat parameter vector of an
:class:`~curvlab.objective.Objective`, available only through products. Subclasses
implement ``_apply(V)`` for a block of row vectors ``V`` of shape ``(k, n)``; this base
class adds argument checking, matvec counting, ``@``, dense and scipy views.

Data parallel: when the objective has a ``process_group`` (each rank holds a data shard,
batch weights ``n_b / N_global``), ``_apply`` returns this rank's partial product and
``matvec``/``matmat`` sum it over the ranks (one all-reduce per call), so every rank gets
``A V`` of the full data. ``V`` must be identical on all ranks (checked with one small
all-reduce); seed random probes with :func:`curvlab.distributed.synced_generator`.
An operator built from already-reduced quantities (Kronecker factors summed over ranks,
an inverse) sets ``products_are_global = True`` and is applied without the all-reduce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from curvlab import distributed as _dist
from curvlab.objective import Objective

__all__ = ["CurvatureOperator"]


class CurvatureOperator(ABC):
    """Base class: shape, dtype, device, ``matvec``/``matmat``/``@``, ``to_dense``,
    ``to_scipy`` and a ``num_matvecs`` counter (``k`` columns count as ``k`` matvecs).

    The operator is evaluated at the parameter values it was built with (a snapshot);
    build a new one, or call :meth:`refresh`, after the parameters change.
    """

    objective: Objective
    #: ``_apply`` already gives the full-data product on every rank (no all-reduce)
    products_are_global: bool = False

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, train: bool = False) -> None:
        if isinstance(model, Objective):
            if loss_fn is not None or data is not None:
                raise TypeError("pass either an Objective or (model, loss_fn, data), not both")
            self.objective = model
        else:
            self.objective = Objective(model, loss_fn, data, params, train=train)
        self.num_matvecs = 0
        self.refresh()

    # ---- to be provided by subclasses ----------------------------------------------
    @abstractmethod
    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``V @ A`` (= ``(A @ V.T).T``, A symmetric) for rows ``V`` of shape (k, n)."""

    def refresh(self) -> None:
        """Re-read the parameter values (and drop anything cached for the old ones)."""
        # copies: param_tensors() shares storage with the parameters, so an in-place update
        # (optimizer.step) would otherwise change the snapshot and break recorded graphs
        self.point = {k: p.clone() for k, p in self.objective.param_tensors().items()}

    # ---- interface -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``, ``n`` the number of parameters."""
        n = self.objective.num_params
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors the operator acts on."""
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        """The device of the vectors the operator acts on."""
        return self.objective.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector ``v`` of shape ``(n,)``."""
        self.objective.check_vector(v, "v")
        self.num_matvecs += 1
        return self._reduced_apply(v.unsqueeze(0))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a block ``V`` of shape ``(n, k)`` (k products, batched)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2:
            raise ValueError(f"matmat expects a (n, k) tensor, got "
                             f"{tuple(V.shape) if isinstance(V, torch.Tensor) else type(V)}")
        self.objective.check_vector(V.T, "V", batched=True)
        self.num_matvecs += V.shape[1]
        return self._reduced_apply(V.T).T

    def _reduced_apply(self, V: torch.Tensor) -> torch.Tensor:
        """``_apply`` summed over the objective's process group (if it has one)."""
        group = self.objective.process_group
        if group is None or self.products_are_global:
            return self._apply(V)
        _dist.check_same_across_ranks(V, group, "the vector(s) multiplied")
        return _dist.all_reduce_sum(self._apply(V).contiguous(), group)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if isinstance(v, torch.Tensor) and v.dim() == 1 else self.matmat(v)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """Form the dense ``n x n`` matrix column block by column block (small n only)."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[:, i:i + chunk]) for i in range(0, n, chunk)], dim=1)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for
        ``eigsh``, ``cg`` and friends."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().cpu().double().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        n = self.shape[0]
        return (f"{type(self).__name__}(n={n}, dtype={self.dtype}, device={self.device}, "
                f"num_matvecs={self.num_matvecs})")
