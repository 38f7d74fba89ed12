"""Bind a model, a loss function and data into a function of the parameters.

``Objective(model, loss_fn, data)`` is the object every curvature operator and diagnostic
works on. The empirical risk it represents is

    L(theta) = sum_b (n_b / N) * loss_fn(model(X_b; theta), y_b)

for a loss that averages over the batch (``reduction="mean"``, the torch default), and
``sum_b loss_fn(...)`` for a summing loss, so several batches give exactly the value of
one big batch. Work is done batch by batch (``for w, X, y in objective.batches()``), so a
DataLoader never has to fit in memory at once.

Data parallel: with ``process_group=`` (``"default"`` or a ``ProcessGroup``) every rank
holds its own shard of the data; ``N`` is the global sample count (all-reduced), so the
batch weights are ``n_b / N_global``, and losses, gradients (here) and curvature products
(:class:`~curvlab.linops.base.CurvatureOperator`) are summed over ranks: every rank gets
the full-data value. Shards must be disjoint (a ``DistributedSampler`` pads with repeated
samples unless the dataset size is a multiple of the world size). Distribution is
explicit: without ``process_group`` the objective is single-process even when
``torch.distributed`` is initialized. With a group, ``num_samples``, ``loss``,
``loss_and_grad`` and operator products are collectives: every rank calls them in the
same order.

Parameters are handled as a dict ``name -> tensor`` (``objective.params``) and, for linear
algebra, as one flat vector (``objective.flatten`` / ``objective.unflatten``), concatenated
in the dict's order with each tensor flattened row-major.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from curvlab import distributed as _dist

__all__ = ["Objective", "as_batches"]

Batch = tuple[Any, torch.Tensor]


def _batch_size(batch: Batch) -> int:
    inputs, targets = batch
    ref = targets if isinstance(targets, torch.Tensor) and targets.dim() > 0 else inputs
    if isinstance(ref, Mapping):
        ref = next(iter(ref.values()))
    elif isinstance(ref, (tuple, list)):
        ref = ref[0]
    if not isinstance(ref, torch.Tensor) or ref.dim() == 0:
        raise TypeError("cannot infer the batch size: inputs/targets must be batched tensors")
    return int(ref.shape[0])


def _is_batch(obj: Any) -> bool:
    """One ``(inputs, targets)`` pair (a list of batches has a pair, not a tensor, second)."""
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor)


def as_batches(data: Any) -> Iterable[Batch]:
    """Normalize ``data`` to a re-iterable of ``(inputs, targets)`` batches.

    Accepts one ``(inputs, targets)`` pair, a list of pairs, or any re-iterable of pairs
    such as a ``torch.utils.data.DataLoader``. Raises ValueError on empty data.
    """
    if data is None:
        raise ValueError("data is required: pass an (inputs, targets) batch, a list of them "
                         "or a DataLoader")
    if _is_batch(data):
        batches: Iterable[Batch] = [tuple(data)]  # type: ignore[list-item]
    elif isinstance(data, (tuple, list)):
        batches = list(data)
        if not batches:
            raise ValueError("data is empty: the list of batches has no elements")
    elif isinstance(data, Iterable):
        batches = data
        try:
            empty = len(data) == 0  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length (e.g. over an IterableDataset)
            empty = False
        if empty:
            raise ValueError("data is empty: the DataLoader/iterable yields no batches")
    else:
        raise TypeError(
            f"data must be an (inputs, targets) pair, a list of pairs or a DataLoader, "
            f"got {type(data).__name__}"
        )
    return batches


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _select_params(model: nn.Module, params: Any) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("the model has no parameters with requires_grad=True")
        return chosen
    if isinstance(params, (str, nn.Module, torch.Tensor)):
        params = [params]
    chosen = {}
    by_id = {id(p): k for k, p in named.items()}
    modules = dict(model.named_modules())
    for item in params:
        if isinstance(item, str):
            if item in named:
                chosen[item] = named[item]
            elif item in modules:
                prefix = f"{item}." if item else ""
                for k, p in modules[item].named_parameters():
                    chosen[prefix + k] = p
            else:
                raise ValueError(f"params: {item!r} is neither a parameter nor a module name "
                                 f"of the model")
        elif isinstance(item, nn.Module):
            found = [by_id.get(id(p)) for p in item.parameters()]
            if not found or None in found:
                raise ValueError("params: a module passed in params is not part of the model")
            for k in found:
                chosen[k] = named[k]
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError("params: a tensor passed in params is not a parameter of the "
                                 "model")
            chosen[by_id[id(item)]] = item
        else:
            raise TypeError(f"params entries must be names, modules or parameters, got "
                            f"{type(item).__name__}")
    frozen = [k for k, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"params {frozen} have requires_grad=False; unfreeze them or leave "
                         "them out of params")
    if not chosen:
        raise ValueError("params selects no parameters")
    return chosen


class Objective:
    """The empirical risk of ``model`` under ``loss_fn`` on ``data``, as a function of
    the selected parameters.

    Args:
        model: an ``nn.Module``, or a callable ``model(params, inputs) -> outputs`` (then
            ``params`` must be a dict of tensors).
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        data: an ``(inputs, targets)`` batch, a list of batches or a DataLoader.
        params: which parameters to differentiate: None (all trainable), or names,
            modules or parameter tensors of ``model``.
        train: evaluate the module in train mode (Dropout/BatchNorm active). Default
            eval mode, so every evaluation is deterministic.
        reduction: ``"mean"`` if ``loss_fn`` averages over the batch (the default, read
            from ``loss_fn.reduction`` when present) or ``"sum"``.
        process_group: ``None`` (single process, the default), ``"default"`` (the world
            group of an initialized ``torch.distributed``) or a ``ProcessGroup``: ``data``
            is this rank's shard and results are summed over the group's ranks.
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Any,
        params: Any = None,
        *,
        train: bool = False,
        reduction: str | None = None,
        process_group: Any = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.train = train
        if isinstance(model, nn.Module):
            self.params = _select_params(model, params)
            self._call = self._call_module
        elif callable(model):
            if not isinstance(params, Mapping) or not params:
                raise TypeError("a callable model needs params as a non-empty dict of tensors")
            self.params = dict(params)
            self._call = lambda p, x: model(p, x)
        else:
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        reduction = reduction or getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.data = as_batches(data)
        self._shapes = [(k, p.shape, p.numel()) for k, p in self.params.items()]
        self.num_params = sum(n for _, _, n in self._shapes)
        self._num_samples: int | None = None
        self.process_group = _dist.resolve_group(process_group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the objective's process group, in place (no-op without one)."""
        return _dist.all_reduce_sum(tensor, self.process_group)

    # ---- parameters ---------------------------------------------------------------
    def param_tensors(self) -> dict[str, torch.Tensor]:
        """The current parameter values, detached (a fresh dict of views that share
        storage with the parameters; clone them to keep a snapshot)."""
        return {k: p.detach() for k, p in self.params.items()}

    def flatten(self, tree: Mapping[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Concatenate a parameter-shaped dict into one vector (``(k, n)`` if batched)."""
        if batched:
            return torch.cat([tree[k].reshape(tree[k].shape[0], -1) for k, _, _ in self._shapes],
                             dim=1)
        return torch.cat([tree[k].reshape(-1) for k, _, _ in self._shapes])

    def unflatten(self, vec: torch.Tensor, batched: bool = False) -> dict[str, torch.Tensor]:
        """Split a flat vector (``(n,)``, or ``(k, n)`` if batched) into a parameter dict."""
        out, i = {}, 0
        for k, shape, n in self._shapes:
            piece = vec[..., i:i + n]
            out[k] = piece.reshape((vec.shape[0], *shape) if batched else shape)
            i += n
        return out

    def check_vector(self, v: Any, name: str = "v", batched: bool = False) -> torch.Tensor:
        """Validate a flat vector (or ``(k, n)`` block) against the parameters."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        want = f"(k, {self.num_params})" if batched else f"({self.num_params},)"
        ok = (v.dim() == 2 if batched else v.dim() == 1) and v.shape[-1] == self.num_params
        if not ok:
            raise ValueError(f"{name} has shape {tuple(v.shape)}, expected {want}")
        if v.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {v.dtype}, expected {self.dtype} (the parameters'"
                            f" dtype); convert with .to({self.dtype})")
        if v.device != self.device:
            raise ValueError(f"{name} is on {v.device}, expected {self.device}")
        return v

    # ---- evaluation ----------------------------------------------------------------
    def _call_module(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            return functional_call(self.model, dict(params), args=(), kwargs=dict(inputs),
                                   strict=False)
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return functional_call(self.model, dict(params), args)

    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        """Put the module in the objective's train/eval mode, restoring it afterwards."""
        if not isinstance(self.model, nn.Module):
            yield
            return
        saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train)
        try:
            yield
        finally:
            for m, was in saved:
                m.training = was

    def batches(self) -> Iterator[tuple[float, Any, torch.Tensor]]:
        """Yield ``(weight, inputs, targets)`` with weights that make the weighted sum of
        batch losses equal the full-data loss."""
        n_total = self.num_samples
        for batch in self.data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("every batch must be an (inputs, targets) pair")
            w = _batch_size(batch) / n_total if self.reduction == "mean" else 1.0
            yield w, _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    @property
    def num_samples(self) -> int:
        """Samples the loss averages over (summed over ranks with a process group)."""
        if self._num_samples is None:
            n = 0
            for batch in self.data:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError("every batch must be an (inputs, targets) pair")
                n += _batch_size(batch)
            if self.process_group is not None:
                n = int(self.all_reduce(torch.tensor([n], dtype=torch.int64,
                                                     device=_dist.comm_device(self.process_group))))
            if n == 0:
                raise ValueError("data is empty: it holds no samples")
            self._num_samples = n
        return self._num_samples

    def outputs(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        """Model outputs on ``inputs`` at ``params`` (a pure function of ``params``)."""
        return self._call(params, inputs)

    def batch_loss(self, params: Mapping[str, torch.Tensor], inputs: Any,
                   targets: torch.Tensor) -> torch.Tensor:
        """Loss on one batch as a pure function of ``params`` (for torch.func)."""
        loss = self.loss_fn(self._call(params, inputs), targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; use a loss "
                             "with reduction='mean' or 'sum'")
        return loss.reshape(())

    def loss(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Full-data loss at ``params`` (default: the current parameters), no graph."""
        params = self.param_tensors() if params is None else params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self.mode():
            for w, x, y in self.batches():
                total = total + w * self.batch_loss(params, x, y)
        return self.all_reduce(total)

    def loss_and_grad(
        self, params: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full-data loss and its gradient, accumulated batch by batch."""
        params = self.param_tensors() if params is None else params
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grads = {k: torch.zeros_like(v) for k, v in leaves.items()}
        with torch.enable_grad(), self.mode():
            for w, x, y in self.batches():
                loss = w * self.batch_loss(leaves, x, y)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for k, g in zip(leaves, gs):
                    if g is not None:
                        grads[k] += g
                total = total + loss.detach()
        if self.process_group is not None:
            _dist.all_reduce_coalesced([total, *grads.values()], self.process_group)
        return total, grads

    def flat_grad(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Full-data gradient as a flat vector."""
        return self.flatten(self.loss_and_grad(params)[1])
