"""Bind a model, a loss function and data into a function of the parameters.

``Objective(model, loss_fn, data)`` is the object every curvature operator and diagnostic
works on. The empirical risk it represents is

    L(theta) = sum_b (n_b / N) * loss_fn(model(X_b; theta), y_b)

for a loss that averages (``reduction="mean"``, the torch default), with ``n_b`` what the
loss divides batch ``b`` by (its number of loss terms: valid targets under
``ignore_index``, the sum of their class weights, elements, or samples; see
:mod:`curvlab.losses`) and ``N = sum_b n_b``; ``sum_b loss_fn(...)`` for a summing loss. So
several batches give exactly the value of one big batch, padded sequences included. Work
is done batch by batch (``for w, X, y in objective.batches()``), so a DataLoader never has
to fit in memory at once; a batch with ``n_b = 0`` (every target ignored) is skipped.

Data: an ``(inputs, targets)`` pair, a dict batch (a Hugging Face collator's output: the
model's keyword arguments, the targets under ``"labels"``), a list of either, or a
DataLoader of either. A one-shot iterator (a generator) is read once into a list, since
every product passes over the data again. ``loss_fn=None`` means the model computes its
own loss (``output.loss``, given the labels): the objective then finds the standard loss
that reproduces it (:func:`curvlab.losses.match_convention`, checked on the first batch)
and uses it on the logits, so output-space curvature (GGN, Fisher, K-FAC) has a loss to
work with. With a model returning a ``ModelOutput`` (or a dict with ``"logits"``), the loss
and every output-space operator receive the logits.

Modes: ``train=False`` (default) evaluates in eval mode. ``train=True`` evaluates in train
mode but leaves the module unchanged: buffers (BatchNorm running statistics) are restored
after every evaluation, and random layers (Dropout) draw one fixed mask per batch (the
objective seeds the RNG per batch), so ``L`` is one deterministic function and its
curvature products are consistent.

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
import copy
import functools
import logging
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from curvlab import distributed as _dist
from curvlab.losses import is_known_mean_loss, loss_normalizer, match_convention

__all__ = ["Objective", "as_batches", "split_batch", "call_model", "logits_or_output",
           "unwrap_model", "is_batched", "sample_rows"]

logger = logging.getLogger(__name__)

#: models already warned about active Dropout in train mode
_WARNED_DROPOUT: weakref.WeakSet[nn.Module] = weakref.WeakSet()

Batch = tuple[Any, torch.Tensor]
#: the key of the targets in a dict batch (Hugging Face's convention)
LABELS = "labels"


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(
        obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def input_samples(inputs: Any) -> int | None:
    """The samples of a model input: the first dimension of its first tensor (in a tuple,
    list or dict: the first that has one); None if there is none."""
    t = _first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.dim() else None


def _batch_size(batch: Batch) -> int:
    inputs, targets = batch
    ref = targets if isinstance(targets, torch.Tensor) and targets.dim() > 0 else inputs
    ref = _first_tensor(ref)
    if ref is None or ref.dim() == 0:
        raise TypeError("cannot infer the batch size: inputs/targets must be batched tensors")
    return int(ref.shape[0])


def _is_batch(obj: Any) -> bool:
    """One batch: an ``(inputs, targets)`` pair (a list of batches has a pair, not a tensor,
    second) or a dict batch."""
    if isinstance(obj, Mapping):
        return True
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor)


def as_batches(data: Any) -> Iterable[Any]:
    """Normalize ``data`` to a re-iterable of batches (``(inputs, targets)`` pairs or dicts).

    Accepts one batch, a list of batches, or any re-iterable of batches such as a
    ``torch.utils.data.DataLoader``. A one-shot iterator (``iter(data) is data``, e.g. a
    generator) is read once into a list: every evaluation passes over the data again, and
    a used-up iterator would silently give an empty sum. Raises ValueError on empty data.
    """
    if data is None:
        raise ValueError("data is required: pass an (inputs, targets) batch, a dict batch, a "
                         "list of them or a DataLoader")
    if isinstance(data, Iterator) and not isinstance(data, (tuple, list, Mapping)):
        logger.info("data is a one-shot iterator; reading it once into a list of batches")
        data = list(data)
        if not data:
            raise ValueError("data is empty: the iterator yields no batches (was it already "
                             "used up?)")
    if _is_batch(data):
        batches: Iterable[Any] = [data if isinstance(data, Mapping) else tuple(data)]
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
            f"data must be an (inputs, targets) pair, a dict batch, a list of them or a "
            f"DataLoader, got {type(data).__name__}"
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


def split_batch(batch: Any, *, model_loss: bool = False) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch. A dict batch gives the model its keyword
    arguments and the targets ``batch["labels"]``; the labels stay among the keyword
    arguments only when the model computes its own loss (``model_loss``)."""
    if isinstance(batch, Mapping):
        if model_loss:
            return batch, batch.get(LABELS)
        if LABELS not in batch:
            raise ValueError(f"a dict batch needs its targets under {LABELS!r} (keys: "
                             f"{sorted(batch)}); or pass (inputs, targets) pairs, or "
                             "loss_fn=None if the model computes its own loss")
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"every batch must be an (inputs, targets) pair or a dict, got "
                        f"{type(batch).__name__}")
    return batch[0], batch[1]


def is_batched(t: Any) -> bool:
    """A leaf of a batch with a sample dimension: a tensor of dim >= 1 (flags, None and 0-d
    tensors in a dict batch, e.g. ``use_cache=False``, are no samples)."""
    return isinstance(t, torch.Tensor) and t.dim() > 0


def sample_rows(batch: Any, index: Any) -> Any:
    """Samples ``index`` (an int, a slice or an index tensor) of every batched leaf of
    ``batch`` (:func:`is_batched`); the other leaves pass as they are."""
    def take(t: Any) -> Any:
        if not is_batched(t):
            return t
        return t[index.to(t.device) if isinstance(index, torch.Tensor) else index]

    return tree_map(take, batch)


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def logits_or_output(out: Any) -> Any:
    """The logits of a ``ModelOutput`` / a dict output with ``"logits"``, else ``out``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out["logits"] if "logits" in out else out
    logits = getattr(out, "logits", None)
    return out if logits is None else logits


def unwrap_model(model: Any, *, distributed: bool = True) -> Any:
    """The user's module inside ``torch.compile`` (its ``_orig_mod``: the same function,
    which curvature products differentiate twice in eager mode; the compiled graph
    refuses double backward) and ``nn.DataParallel``; with ``distributed`` also inside
    ``DistributedDataParallel`` (whose gradient all-reduce the caller then replaces)."""
    wrappers: tuple[type, ...] = (nn.DataParallel,)
    if distributed:
        wrappers += (nn.parallel.DistributedDataParallel,)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None),
                                                          nn.Module):
            model = model._orig_mod
        else:
            return model


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _unprefixed(name: str, named: Mapping[str, Any], modules: Mapping[str, Any]) -> str:
    """A parameter or module name of a wrapped model (``_orig_mod.`` of ``torch.compile``,
    ``module.`` of DataParallel) as the unwrapped model names it."""
    while name not in named and name not in modules and name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


class _SameDataCheck:
    """That every pass over a re-iterable data source (a ``DataLoader``) sees the same data:
    every evaluation of an objective (loss, gradient, each curvature product) passes over
    its data again, and products of different functions make an inconsistent operator
    (a shuffled ``DataLoader`` with ``drop_last=True``, random augmentation: Hessian products
    of a digits-like MLP differed 60% / 27% between two calls, and Lanczos reported a
    "converged" top eigenvalue). Per batch, the float64 sum and sum of squares of each
    tensor (inputs and targets); compared over the whole pass, order-insensitively in eval
    mode (a plain shuffle changes nothing there) and batch by batch in train mode (batch
    statistics and the per-batch Dropout streams depend on which samples share a batch).
    One host read per pass. Lists of batches are not checked (they cannot change)."""

    RTOL = 1e-9  # float64 sums of the same numbers in another order

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.reference: torch.Tensor | None = None
        self._pass: list[torch.Tensor] = []

    def start(self) -> None:
        """A new pass (one a consumer left early is forgotten)."""
        self._pass = []

    def add(self, batch: Any) -> None:
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
        self._pass.append(torch.cat(
            [torch.stack([t.double().sum(), t.double().square().sum()]).to(device)
             for t in leaves]) if leaves else torch.zeros(0, dtype=torch.float64))

    def finish(self) -> None:
        """Compare the pass just completed with the first one; ValueError if it differs."""
        sizes = {t.shape for t in self._pass}
        parts, self._pass = self._pass, []
        if len(sizes) > 1:  # batches of other structures: compare them in order
            seen = torch.cat([t.cpu().reshape(-1) for t in parts])
        else:
            stacked = torch.stack(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)
            seen = stacked.reshape(-1) if self.ordered else stacked.sum(dim=0)
        if self.reference is None:
            self.reference = seen
            return
        ref = self.reference
        if seen.shape == ref.shape and bool(torch.isclose(seen, ref, rtol=self.RTOL,
                                                          atol=0.0, equal_nan=True).all()):
            return
        raise ValueError(
            "the data changed between two passes over it: every evaluation of the objective "
            "(loss, gradient, each curvature product) reads all of its data again, and "
            "products of different data make an inconsistent operator. Random augmentation, "
            "a shuffled DataLoader with drop_last=True" + (
                " or, in train mode, any shuffling (batch statistics and Dropout depend on "
                "which samples share a batch)" if self.ordered else "") +
            " cause this: pass a DataLoader with shuffle=False and deterministic transforms, "
            "or a list of batches")


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
    aliases = {k: by_id[id(p)] for k, p in model.named_parameters(remove_duplicate=False)
               if id(p) in by_id}  # a tied parameter's other names -> the one kept
    for item in params:
        if isinstance(item, str):
            item = _unprefixed(item, aliases, modules)
            item = aliases.get(item, item)
            if item in named:
                chosen[item] = named[item]
            elif item in modules:
                prefix = f"{item}." if item else ""
                for k, p in modules[item].named_parameters():
                    chosen[aliases.get(prefix + k, prefix + k)] = p
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


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``name -> the other names of the same tensor`` for the module's tied parameters
    and buffers (e.g. a language model's input embedding and output layer)."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {name: tuple(n for n in group if n != name)
            for group in names.values() if len(group) > 1 for name in group}


def _weight_norm(weight_v: torch.Tensor, weight_g: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch._weight_norm`` as its composite ``v g / ||v||`` (norms over every dimension
    but ``dim``), which PyTorch itself uses in some cases: the fused kernel's double
    backward is wrong (measured with torch 2.13 against finite differences and this
    formula: its Hessian in ``v`` is off by ~30% and not even symmetric)."""
    return weight_v * (weight_g / torch.norm_except_dim(weight_v, 2, dim))


def _weight_norm_parametrization(weight_g: torch.Tensor, weight_v: torch.Tensor, *,
                                 dim: int) -> torch.Tensor:
    """The ``forward`` of ``nn.utils.parametrizations.weight_norm``, composite."""
    return _weight_norm(weight_v, weight_g, dim)


def _weight_norm_hook(module: nn.Module, *, hook: Any) -> torch.Tensor:
    """``compute_weight`` of the older ``nn.utils.weight_norm`` hook, composite."""
    return _weight_norm(getattr(module, hook.name + "_v"), getattr(module, hook.name + "_g"),
                        hook.dim)


def _embedding_bag(module: nn.EmbeddingBag, input: torch.Tensor,
                   offsets: torch.Tensor | None = None,
                   per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.EmbeddingBag.forward`` as an embedding lookup, a scatter into a ``(bags,
    longest bag, dim)`` block and a sum / mean / max over it: the same values (padding
    entries skipped, an empty bag 0), but differentiable twice (torch's
    ``_embedding_bag_backward`` has no derivative: no Hessian-vector product through it)."""
    import torch.nn.functional as F

    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("nn.EmbeddingBag: offsets must be None for 2-D input")
        bags, length = input.shape
        flat = input.reshape(-1)
        bag = torch.arange(bags, device=input.device).repeat_interleave(length)
        pos = torch.arange(length, device=input.device).repeat(bags)
    else:
        if offsets is None:
            raise ValueError("nn.EmbeddingBag: 1-D input needs offsets")
        starts = offsets[:-1] if module.include_last_offset else offsets
        end = int(offsets[-1]) if module.include_last_offset else input.numel()
        flat, bags = input[:end], starts.numel()
        idx = torch.arange(end, device=input.device)
        bag = torch.bucketize(idx, starts, right=True) - 1
        pos = idx - starts[bag]
        length = int(pos.max()) + 1 if end else 1
    vecs = F.embedding(flat, module.weight, module.padding_idx, module.max_norm,
                       module.norm_type, module.scale_grad_by_freq)
    if per_sample_weights is not None:
        vecs = vecs * per_sample_weights.reshape(-1)[:flat.numel(), None].to(vecs.dtype)
    keep = (torch.ones_like(flat, dtype=torch.bool) if module.padding_idx is None
            else flat != module.padding_idx)
    fill = float("-inf") if module.mode == "max" else 0.0
    block = vecs.new_full((bags, length, vecs.shape[1]), fill)
    block = block.index_put((bag, pos), torch.where(keep[:, None], vecs, fill))
    count = torch.zeros(bags, dtype=vecs.dtype, device=vecs.device).index_add(
        0, bag, keep.to(vecs.dtype))[:, None]
    if module.mode == "sum":
        return block.sum(1)
    if module.mode == "mean":
        return block.sum(1) / count.clamp_min(1)
    return torch.where(count > 0, block.amax(1), 0.0)


class _PlainCall:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` (what
    ``checkpoint(function, *args, use_reentrant=True)`` applies) during the objective's
    evaluations: ``function(*args)`` recorded by autograd as it is, without checkpointing."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


_CHECKPOINT_SWITCH = [(torch.utils.checkpoint, "CheckpointFunction", _PlainCall)]


def plain_checkpoints() -> contextlib.AbstractContextManager[None]:
    """``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` as a plain call for
    the duration (:class:`_PlainCall`), for a forward pass run outside an objective whose
    backward uses ``autograd.grad`` (which the reentrant kind refuses)."""
    return _plain_autograd(_CHECKPOINT_SWITCH)


def _autograd_switches(model: nn.Module) -> list[tuple[Any, str, Any]]:
    """``(object, attribute, value)``: what to set during the objective's evaluations so
    that autograd records the same function in a form curvature products can
    differentiate twice:

    - ``sparse = False`` on ``nn.Embedding`` (a sparse gradient has no double backward and
      no place in a flat vector);
    - ``scale_grad_by_freq = False`` on ``nn.Embedding`` / ``nn.EmbeddingBag``: that
      backward divides each row's gradient by its token's count in the batch, which is not
      the derivative of the forward (a training heuristic), so products mixing it with
      forward-mode ones were not symmetric (GGN 11%, Hessian 25% asymmetric) and not the
      loss's curvature;
    - ``nn.EmbeddingBag`` through :func:`_embedding_bag` (its kernel's backward has no
      derivative, and a sparse gradient no place in a flat vector);
    - ``gradient_checkpointing = False`` on Hugging Face layers and models (activation
      checkpointing: the reentrant kind refuses ``autograd.grad``, the other one double
      backward);
    - ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` in a model's own
      forward as a plain call (:class:`_PlainCall`): the reentrant kind recomputes its
      block in the backward pass with the module's own parameters, not the values an
      evaluation passes in, so their curvature was missing with no error (a checkpointed
      MLP block: Hessian 97%, GGN 75%, K-FAC 46% off);
    - weight normalization (``nn.utils.parametrizations.weight_norm`` and the older
      ``nn.utils.weight_norm``) through :func:`_weight_norm` (the fused kernel's double
      backward is wrong: a silently wrong Hessian);
    - ``torch.backends.cudnn.enabled = False`` for a model with RNN layers (cuDNN's RNN
      backward has no derivative; PyTorch's own kernels do, on the GPU too; a no-op on
      the CPU);
    - ``Module.to`` that returns the module when it would change nothing and refuses a
      real conversion (:func:`_unchanged_to`): some Hugging Face MoE routers call
      ``self.classifier = self.classifier.to(dtype)`` in every forward, and under
      ``vmap(vjp(...))`` that no-op conversion crashes the process (torch 2.13: a
      segmentation fault when the converted module's weights are not differentiated).
    """
    from torch.nn.utils.parametrizations import _WeightNorm

    legacy = getattr(sys.modules.get("torch.nn.utils.weight_norm"), "WeightNorm", None)
    out: list[tuple[Any, str, Any]] = [*_CHECKPOINT_SWITCH]
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        out.append((torch.backends.cudnn, "enabled", False))
    for m in model.modules():
        out.append((m, "to", _unchanged_to(m)))
        if isinstance(m, nn.Embedding):
            out.append((m, "sparse", False))
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            out.append((m, "scale_grad_by_freq", False))
        if isinstance(m, nn.EmbeddingBag):
            out.append((m, "forward", functools.partial(_embedding_bag, m)))
        if isinstance(getattr(m, "gradient_checkpointing", None), bool):
            out.append((m, "gradient_checkpointing", False))
        if isinstance(m, _WeightNorm):
            out.append((m, "forward", functools.partial(_weight_norm_parametrization,
                                                        dim=m.dim)))
        for hook in m._forward_pre_hooks.values():
            if legacy is not None and isinstance(hook, legacy):
                out.append((hook, "compute_weight", functools.partial(_weight_norm_hook,
                                                                      hook=hook)))
    return out


def _unchanged_to(module: nn.Module) -> Callable[..., nn.Module]:
    """``module.to`` during the objective's evaluations: ``module`` itself, its tensors
    untouched, when every parameter and buffer already has the requested device and
    (floating-point) dtype; a TypeError otherwise. The evaluations call the model on
    the parameter values they are given: a conversion inside the forward would change
    those values (and the function) as a side effect."""
    def to(*args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if memory_format is None and all(
                (device is None or t.device == device)
                and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
                for t in tensors):
            return module
        have = sorted({f"{t.dtype} on {t.device}" for t in tensors})
        raise TypeError(
            f"a {type(module).__name__} converts itself with .to({', '.join(map(repr, args))}) "
            f"in its forward, but its tensors are {', '.join(have)}: curvlab evaluates the "
            "model on given parameter values and cannot follow the conversion. Convert that "
            "module beforehand (as its forward would, e.g. one plain forward pass), then "
            "select parameters of one dtype with params=")
    return to


_UNSET = object()


@contextlib.contextmanager
def _plain_autograd(switches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """The attributes of ``switches`` (:func:`_autograd_switches`) set for the duration,
    then restored: the same forward, in a form curvature products can differentiate
    twice. The cost: a checkpointed model keeps all its activations during curvlab's
    evaluations."""
    saved = [(obj, attr, getattr(obj, attr) if isinstance(obj, types.ModuleType)
              else obj.__dict__.get(attr, _UNSET)) for obj, attr, _ in switches]
    for obj, attr, value in switches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, old in saved:
            if old is _UNSET:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


class Objective:
    """The empirical risk of ``model`` under ``loss_fn`` on ``data``, as a function of
    the selected parameters.

    Args:
        model: an ``nn.Module`` (a ``torch.compile``-d or ``nn.DataParallel`` one is
            unwrapped: :func:`unwrap_model`), or a callable ``model(params, inputs) ->
            outputs`` (then ``params`` must be a dict of tensors). The objective's
            evaluations run its ``nn.Embedding(sparse=True)`` layers with dense gradients,
            its Hugging Face layers without activation checkpointing, its weight norms
            as ``g v / ||v||``, its ``nn.EmbeddingBag`` layers as lookups and reductions
            and its RNNs without cuDNN (the same function, which curvature products can
            differentiate twice; see ``_autograd_switches``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``, or None: the model computes
            its own loss from the batch's ``"labels"`` (Hugging Face models); see the module
            docstring.
        data: an ``(inputs, targets)`` batch, a dict batch (model keyword arguments with the
            targets under ``"labels"``), a list of batches or a DataLoader.
        params: which parameters to differentiate: None (all trainable), or names,
            modules or parameter tensors of ``model``.
        train: evaluate the module in train mode (Dropout/BatchNorm active, buffers
            restored, one fixed Dropout mask per batch). Default eval mode.
        reduction: ``"mean"`` if ``loss_fn`` averages (the default, read from
            ``loss_fn.reduction`` when present; ``nn.KLDivLoss``'s ``"batchmean"`` is a mean
            over samples) or ``"sum"``.
        process_group: ``None`` (single process, the default), ``"default"`` (the world
            group of an initialized ``torch.distributed``) or a ``ProcessGroup``: ``data``
            is this rank's shard and results are summed over the group's ranks.
        normalizer: ``normalizer(targets) -> n_b``, what a custom mean ``loss_fn`` divides
            a batch by (e.g. its number of non-padding tokens). Needed only for a loss that
            is not a torch loss module: those are taken to average over samples, and with
            several batches that weighting is logged once.
        seed: in train mode, the seed of the Dropout masks (one RNG stream per batch, the
            same in every evaluation of this objective); None: derived from the process's
            seed (``torch.initial_seed()``). An optimizer that builds an objective per step
            passes a new seed each step, as a training loop draws new masks.
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        data: Any = None,
        params: Any = None,
        *,
        train: bool = False,
        reduction: str | None = None,
        process_group: Any = None,
        normalizer: Callable[[Any], float] | None = None,
        seed: int | None = None,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None (the model computes its own "
                            f"loss), got {type(loss_fn).__name__}")
        model = unwrap_model(model, distributed=False)
        self.model = model
        self.train = train
        if isinstance(model, nn.Module):
            self.params = _select_params(model, params)
            self._ties = _tied_names(model)
            self._switches = _autograd_switches(model)
            self._call = self._call_module
        elif callable(model):
            if loss_fn is None:
                raise TypeError("loss_fn=None needs an nn.Module that computes its own loss")
            if not isinstance(params, Mapping) or not params:
                raise TypeError("a callable model needs params as a non-empty dict of tensors")
            self.params = dict(params)
            self._call = lambda p, x: model(p, x)
        else:
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        self._check_one_dtype()
        self.data = as_batches(data)
        # a DataLoader (or other re-iterable) is read again at every evaluation: check it
        self._same_data = None if isinstance(self.data, list) else _SameDataCheck(train)
        self._shapes = [(k, p.shape, p.numel()) for k, p in self.params.items()]
        self._sizes = [n for _, _, n in self._shapes]
        self.num_params = sum(self._sizes)
        self._num_samples: int | None = None
        self._num_loss_terms: float | None = None
        self.process_group = _dist.resolve_group(process_group)
        # one fixed RNG stream per batch in train mode (Dropout masks); derived from the
        # process's seed without drawing from (and so shifting) the caller's RNG stream
        self._seed = (torch.initial_seed() if seed is None else int(seed)) % 2**62
        self._batch_index = 0
        self._private_buffers = train
        if normalizer is not None and not callable(normalizer):
            raise TypeError(f"normalizer must be callable(targets) -> float, got "
                            f"{type(normalizer).__name__}")
        self._user_normalizer = normalizer
        self._warned_weighting = False
        self.model_loss = loss_fn is None
        self._labels_to_model = True  # until the model is seen to ignore them
        self.convention = None
        self._prediction: Callable[[Any], Any] = logits_or_output
        self._target: Callable[[Any], Any] = lambda y: y
        if loss_fn is None:
            self.convention = self._resolve_model_loss()
            loss_fn = self.convention.loss_fn
            self._prediction = lambda out, c=self.convention: c.prediction(logits_or_output(out))
            self._target = self.convention.target
        self.loss_fn = loss_fn
        reduction = reduction or getattr(loss_fn, "reduction", "mean")
        if reduction == "batchmean" and isinstance(loss_fn, nn.KLDivLoss):
            reduction = "mean"  # a mean over samples: one loss term per sample (curvlab.losses)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' (or KLDivLoss's "
                             f"'batchmean'), got {reduction!r}")
        self.reduction = reduction
        if train and isinstance(model, nn.Module) and model not in _WARNED_DROPOUT and any(
                isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                for m in model.modules()):
            _WARNED_DROPOUT.add(model)  # once per model: optimizers build objectives per step
            logger.warning("train=True with active Dropout: the objective is a random function "
                           "of the data; curvlab fixes one Dropout mask per batch (seeded), so "
                           "all products of this objective see the same function (optimizers: "
                           "new masks every step)")

    def on(self, data: Any) -> Objective:
        """This objective on other ``data``: the same model, parameters, mode, reduction,
        process group and loss, with the model's own loss convention as resolved here
        (resolving it again costs one or two forward passes: an optimizer that builds
        operators on subsets of its batch passes them ``objective.on(subset)``)."""
        other = copy.copy(self)
        other.data = as_batches(data)
        other._num_samples = other._num_loss_terms = None
        other._batch_index, other._private_buffers = 0, self.train
        other._warned_weighting = False
        other._same_data = None if isinstance(other.data, list) else _SameDataCheck(self.train)
        return other

    def _resolve_model_loss(self) -> Any:
        """Find the standard loss that reproduces the model's own loss on the first batch
        with a finite loss (see :func:`curvlab.losses.match_convention`)."""
        error: Exception | None = None
        with torch.no_grad(), self.mode():
            for index, batch in enumerate(self.data):
                inputs, labels = self._split(batch)
                self._batch_index = index
                inputs = _to_device(inputs, self.device)
                out = self.raw_outputs(self.param_tensors(), inputs)
                try:
                    convention = match_convention(out, labels)
                except ValueError as err:
                    error = err
                    loss = getattr(out, "loss", None) if not isinstance(out, Mapping) else \
                        out.get("loss")
                    if loss is None or bool(torch.isfinite(loss).all()):
                        raise
                else:
                    self._labels_to_model = not self._same_logits_without_labels(inputs, out)
                    return convention
                if index >= 8:
                    break
        raise error if error is not None else ValueError("data is empty")

    def _same_logits_without_labels(self, inputs: Any, out: Any) -> bool:
        """Whether the model gives the same logits without ``"labels"`` (then it is not
        given them: it would only compute its own loss beside curvlab's, ~0.1-0.3 of a
        gradient on a small language model). Models that read the labels (encoder-decoders
        build their decoder inputs from them) keep them."""
        if not (isinstance(inputs, Mapping) and LABELS in inputs):
            return False
        try:
            without = self.raw_outputs(self.param_tensors(),
                                       {k: v for k, v in inputs.items() if k != LABELS})
        except Exception:  # noqa: BLE001 - a model that fails without labels needs them
            return False
        a, b = logits_or_output(out), logits_or_output(without)
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a, b)))

    def _split(self, batch: Any) -> tuple[Any, Any]:
        inputs, targets = split_batch(batch, model_loss=self.model_loss)
        if not self._labels_to_model and isinstance(inputs, Mapping) and LABELS in inputs:
            inputs = {k: v for k, v in inputs.items() if k != LABELS}
        return inputs, targets

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the objective's process group, in place (no-op without one)."""
        return _dist.all_reduce_sum(tensor, self.process_group)

    # ---- parameters ---------------------------------------------------------------
    def param_tensors(self) -> dict[str, torch.Tensor]:
        """The current parameter values, detached (a fresh dict of views that share
        storage with the parameters; clone them to keep a snapshot)."""
        self._check_one_dtype()
        return {k: p.detach() for k, p in self.params.items()}

    def _check_one_dtype(self) -> None:
        """Raise (TypeError) unless every selected parameter has the objective's dtype:
        flat vectors have one dtype. Checked again on every read of the parameters: a
        model can convert its own weights in forward (Switch Transformers' router casts
        its classifier to float32)."""
        other = [k for k, p in self.params.items() if p.dtype != self.dtype]
        if not other:
            return
        dtypes = sorted({str(self.params[k].dtype) for k in other})
        raise TypeError(
            f"the selected parameters must share one dtype (curvlab's flat vectors have one): "
            f"{len(other)} of {len(self.params)} are {', '.join(dtypes)} (e.g. {other[0]!r}), "
            f"the others {self.dtype} (a model may also convert its own weights in forward, "
            f"as Switch Transformers' router does); cast the model to one dtype or select "
            f"the parameters of one dtype with params=")

    def flatten(self, tree: Mapping[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Concatenate a parameter-shaped dict into one vector (``(k, n)`` if batched)."""
        if batched:
            return torch.cat([tree[k].reshape(tree[k].shape[0], -1) for k, _, _ in self._shapes],
                             dim=1)
        return torch.cat([tree[k].reshape(-1) for k, _, _ in self._shapes])

    def unflatten(self, vec: torch.Tensor, batched: bool = False) -> dict[str, torch.Tensor]:
        """Split a flat vector (``(n,)``, or ``(k, n)`` if batched) into a parameter dict."""
        pieces = vec.split(self._sizes, dim=-1)
        if not batched:
            return {k: piece.view(shape) for (k, shape, _), piece in zip(self._shapes, pieces)}
        lead = vec.shape[0]
        return {k: piece.reshape(lead, *shape)
                for (k, shape, _), piece in zip(self._shapes, pieces)}

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
        tensors = dict(params)
        if self._private_buffers:  # train mode: updates land on copies, never on the module
            tensors = {**{k: b.clone() for k, b in self.model.named_buffers()}, **tensors}
        for name in [k for k in tensors if k in self._ties]:  # tied weights stay tied
            for alias in self._ties[name]:
                tensors.setdefault(alias, tensors[name])
        # tie_weights=False: the ties were resolved above, once per model (functional_call
        # would walk every module on every call to find them: ~0.2 ms on a tiny GPT-2)
        with _plain_autograd(self._switches):
            return call_model(lambda *a, **k: functional_call(self.model, tensors, a, k,
                                                              strict=False, tie_weights=False),
                              inputs)

    @contextlib.contextmanager
    def mode(self, *, keep_buffers: bool = False) -> Iterator[None]:
        """Put the module in the objective's train/eval mode, restoring it afterwards. In
        train mode evaluations run on copies of the module's buffers, so BatchNorm running
        statistics are left unchanged, unless ``keep_buffers`` (an optimizer's training
        step updates them once, as a plain forward pass would)."""
        if not isinstance(self.model, nn.Module):
            yield
            return
        modules, stack, seen = [], [self.model], set()
        while stack:  # every submodule once (Module.modules() costs ~3x more: names)
            m = stack.pop()
            if id(m) not in seen:
                seen.add(id(m))
                modules.append(m)
                stack.extend(m.children())
        saved = [m.training for m in modules]
        changed = any(was != self.train for was in saved)
        private = self._private_buffers
        self._private_buffers = self.train and not keep_buffers
        if changed:  # set the flags directly: model.train() recursion costs ~0.3 ms
            for m in modules:
                m.training = self.train
        try:
            yield
        finally:
            self._private_buffers = private
            if changed:
                for m, was in zip(modules, saved):
                    m.training = was

    @contextlib.contextmanager
    def _rng(self, index: int) -> Iterator[None]:
        """In train mode: the RNG stream of batch ``index`` (one fixed Dropout mask per batch,
        the same in every evaluation). Nothing in eval mode.

        On CPU and CUDA only the generators the model draws from are seeded (and restored):
        ``torch.manual_seed`` also queues a lazy seed for every accelerator backend, each
        recording a stack trace, ~0.2-1 ms per model call (measured: 7% of a Hessian-free
        step on a deep autoencoder, which calls the model ~5 times per step)."""
        if not self.train:
            yield
            return
        kind = self.device.type
        devices = [self.device] if kind == "cuda" else []
        seed = (self._seed + 7919 * index) % 2**63
        with torch.random.fork_rng(devices=devices):
            if kind not in ("cpu", "cuda"):
                torch.manual_seed(seed)
            else:
                torch.default_generator.manual_seed(seed)
                if kind == "cuda":
                    with torch.cuda.device(self.device):
                        torch.cuda.manual_seed(seed)
            yield

    def batches(self) -> Iterator[tuple[float, Any, Any]]:
        """Yield ``(weight, inputs, targets)`` with weights ``n_b / N`` (mean) or 1 (sum)
        that make the weighted sum of batch losses equal the full-data loss. Targets are in
        the loss's layout (e.g. shifted for a causal LM); batches with ``n_b = 0`` are
        skipped. In train mode, model calls on a batch use that batch's fixed RNG stream."""
        total = self.num_loss_terms if self.reduction == "mean" else None
        check = self._same_data
        if check is not None:
            check.start()
        for index, batch in enumerate(self.data):
            if check is not None:
                check.add(batch)
            inputs, targets = self._split(batch)
            targets = self._target(_to_device(targets, self.device))
            if total is not None:
                n_b = self._normalizer(batch, targets)
                if n_b == 0:
                    continue
                w = n_b / total
            else:
                w = 1.0
            self._batch_index = index
            yield w, _to_device(inputs, self.device), targets
        if check is not None:
            check.finish()

    def _normalizer(self, batch: Any, targets: Any) -> float:
        """``n_b``: what the mean loss divides batch ``b`` by (:mod:`curvlab.losses`)."""
        if self._user_normalizer is not None:
            return float(self._user_normalizer(targets))
        if is_known_mean_loss(self.loss_fn) and isinstance(targets, torch.Tensor):
            return loss_normalizer(self.loss_fn, targets)
        if not self._warned_weighting and not (isinstance(self.data, list)
                                               and len(self.data) == 1):
            self._warned_weighting = True
            logger.warning(
                "loss_fn %s is not a torch loss module, so curvlab cannot tell what it averages "
                "over: batches are weighted by their number of samples. If it averages over "
                "tokens or valid targets, pass normalizer=, a torch loss (e.g. "
                "nn.CrossEntropyLoss) or loss_fn=None for a model that computes its own loss",
                getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__))
        return float(_batch_size(self._split(batch)))

    def _count(self, per_batch: Callable[[Any], float]) -> float:
        n = 0.0
        for batch in self.data:
            n += per_batch(batch)
        if self.process_group is not None:
            n = float(self.all_reduce(torch.tensor([n], dtype=torch.float64,
                                                   device=_dist.comm_device(self.process_group))))
        return n

    @property
    def num_samples(self) -> int:
        """Samples (sequences, images, ...) in the data (summed over ranks with a process
        group)."""
        if self._num_samples is None:
            n = int(self._count(lambda b: _batch_size(self._split(b))))
            if n == 0:
                raise ValueError("data is empty: it holds no samples")
            self._num_samples = n
        return self._num_samples

    @property
    def num_loss_terms(self) -> float:
        """``N = sum_b n_b``, what the full-data mean loss divides by: the number of loss
        terms (valid targets, elements, or samples; class weights summed), over all ranks."""
        if self._num_loss_terms is None:
            def terms(batch: Any) -> float:
                targets = self._target(_to_device(self._split(batch)[1], self.device))
                return self._normalizer(batch, targets)
            n = self._count(terms)
            if n == 0:
                raise ValueError("data holds no loss terms: every target is ignored "
                                 "(ignore_index) or has zero class weight")
            self._num_loss_terms = n
        return self._num_loss_terms

    def raw_outputs(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        """What the model returns on ``inputs`` at ``params`` (e.g. a ``ModelOutput``); in
        train mode on the RNG stream of the batch last yielded by :meth:`batches`."""
        with self._rng(self._batch_index):
            return self._call(params, inputs)

    def outputs(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        """The model's prediction as the loss consumes it (a pure function of ``params``):
        the logits of a ``ModelOutput`` / dict output, rearranged by the model's loss
        convention when ``loss_fn=None``; otherwise the model's output itself."""
        return self._prediction(self.raw_outputs(params, inputs))

    def batch_loss(self, params: Mapping[str, torch.Tensor], inputs: Any,
                   targets: torch.Tensor) -> torch.Tensor:
        """Loss on one batch as a pure function of ``params`` (for torch.func)."""
        loss = self.loss_fn(self.outputs(params, inputs), targets)
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
        self, params: Mapping[str, torch.Tensor] | None = None, *, keep_buffers: bool = False,
        reached: set[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full-data loss and its gradient, accumulated batch by batch (``keep_buffers``:
        let a train-mode pass update BatchNorm statistics, as a training step does). The
        gradient of a parameter the loss never reaches is zero; ``reached`` (a set), if
        given, receives the names of the others (what ``.grad is None`` tells after a
        backward pass)."""
        params = self.param_tensors() if params is None else params
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grads = {k: torch.zeros_like(v) for k, v in leaves.items()}
        with torch.enable_grad(), self.mode(keep_buffers=keep_buffers):
            for w, x, y in self.batches():
                loss = w * self.batch_loss(leaves, x, y)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for k, g in zip(leaves, gs):
                    if g is not None:
                        grads[k] += g
                        if reached is not None:
                            reached.add(k)
                total = total + loss.detach()
        if self.process_group is not None:
            _dist.all_reduce_coalesced([total, *grads.values()], self.process_group)
        return total, grads

    def flat_grad(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Full-data gradient as a flat vector."""
        return self.flatten(self.loss_and_grad(params)[1])
