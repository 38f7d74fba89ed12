"""Autodiff primitives on functions of a tensor or of a dict of tensors (a pytree).

Every function takes ``f`` and a point ``x``: a tensor or a dict ``name -> tensor``.
Directions (``v``, ``u``) have the same structure as ``x`` (or as ``f(x)`` for ``vjp``);
with ``batched=True`` every leaf of the direction carries one extra leading dimension
``k`` and ``k`` products are computed at once, sharing the forward pass.

Hessian-vector products ``H v = d/dt grad f(x + t v)`` can be formed three ways:

* ``"double_backward"``: reverse over reverse through torch.autograd (build the graph of
  ``g = grad f(x)``, then backpropagate ``<g, v>``). Fastest on the CPU models we measured
  (``benchmarks/bench_autodiff.py``); batched products share the forward pass and the
  first backward, then pay one backward through the gradient graph per vector.
* ``"rev_rev"``: the same product through torch.func (``vjp`` of ``grad``); composes with
  other torch.func transforms.
* ``"fwd_rev"``: forward over reverse (``jvp`` of ``grad``); needs forward-mode rules.

``mode="auto"`` uses double backward, switches to ``rev_rev`` inside torch.func
transforms (where double backward is unavailable) and falls back to ``fwd_rev`` when a
double-backward rule is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["grad", "jvp", "vjp", "hvp", "hvp_fn", "jacobian", "hessian", "gnvp", "HVP_MODES"]

HVP_MODES = ("auto", "double_backward", "rev_rev", "fwd_rev")

Tree = Any  # a tensor or a (nested) dict/tuple/list of tensors


def _scalar(y: Any, what: str = "f") -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(y).__name__}")
    if y.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar (one-element) tensor, got shape {tuple(y.shape)}; "
            "reduce it first, e.g. with .mean() or .sum()"
        )
    return y.reshape(())


def _check_like(x: Tree, v: Tree, name: str, batched: bool = False) -> None:
    """Clear errors for a direction whose structure, shape, dtype or device is wrong."""
    x_leaves, x_spec = tree_flatten(x)
    v_leaves, v_spec = tree_flatten(v)
    if x_spec != v_spec:
        raise ValueError(f"{name} must have the same structure as x ({x_spec}), got {v_spec}")
    k = None
    for i, (a, b) in enumerate(zip(x_leaves, v_leaves)):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} leaf {i} must be a tensor, got {type(b).__name__}")
        shape = tuple(b.shape[1:]) if batched else tuple(b.shape)
        if shape != tuple(a.shape):
            extra = " after the leading batch dimension" if batched else ""
            raise ValueError(
                f"{name} leaf {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}{extra}"
            )
        if batched:
            if k is None:
                k = b.shape[0]
            elif b.shape[0] != k:
                raise ValueError(
                    f"{name}: every leaf needs the same batch size, {b.shape[0]} != {k}"
                )
        if b.dtype != a.dtype:
            raise TypeError(f"{name} leaf {i} has dtype {b.dtype}, expected {a.dtype}")
        if b.device != a.device:
            raise ValueError(f"{name} leaf {i} is on {b.device}, expected {a.device}")


def _in_functorch_transform() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def grad(f: Callable[[Tree], torch.Tensor], x: Tree) -> Tree:
    """Gradient of the scalar function ``f`` at ``x`` (same structure as ``x``)."""
    return tf.grad(lambda z: _scalar(f(z)))(x)


def _double_vjp_jvp(f: Callable, x: Tree, v: Tree) -> tuple[Any, Any]:
    """Jv without forward mode: the VJP is linear in its cotangent u, so Jv is the
    VJP of ``u -> J^T u`` applied to v (two reverse passes)."""
    y, vjp_fn = tf.vjp(f, x)
    u0 = tree_map(torch.zeros_like, y)
    _, vjp_of_vjp = tf.vjp(lambda u: vjp_fn(u)[0], u0)
    return y, vjp_of_vjp(v)[0]


def jvp(f: Callable[[Tree], Any], x: Tree, v: Tree) -> tuple[Any, Any]:
    """Return ``(f(x), J v)`` by forward mode; falls back to two reverse passes when an
    operation has no forward-mode rule."""
    _check_like(x, v, "v")
    try:
        return tf.jvp(f, (x,), (v,))
    except (RuntimeError, NotImplementedError) as err:
        if "forward" not in str(err).lower():
            raise
        return _double_vjp_jvp(f, x, v)


def vjp(f: Callable[[Tree], Any], x: Tree, u: Any) -> tuple[Any, Tree]:
    """Return ``(f(x), J^T u)`` by reverse mode."""
    y, vjp_fn = tf.vjp(f, x)
    _check_like(y, u, "u")
    return y, vjp_fn(u)[0]


def _detached_leaves(x: Tree) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = tree_flatten(x)
    return [leaf.detach().requires_grad_(True) for leaf in leaves], spec


def hvp_fn(
    f: Callable[[Tree], torch.Tensor], x: Tree
) -> tuple[torch.Tensor, Tree, Callable[..., Tree]]:
    """Linearize the gradient of ``f`` at ``x`` once and return ``(f(x), grad, product)``.

    ``product(v, batched=False)`` returns ``H v``; it reuses the recorded graph of the
    gradient, so each call costs one backward pass through it (no new forward), which is
    what Krylov methods at a fixed point want. The graph is kept alive while ``product``
    is referenced.
    """
    leaves, spec = _detached_leaves(x)
    with torch.enable_grad():
        y = _scalar(f(tree_unflatten(leaves, spec)))
        g = torch.autograd.grad(y, leaves, create_graph=True, allow_unused=True)
    g = [torch.zeros_like(leaf) if gi is None else gi for gi, leaf in zip(g, leaves)]
    live = [i for i, gi in enumerate(g) if gi.requires_grad]

    def product(v: Tree, batched: bool = False) -> Tree:
        _check_like(tree_unflatten(leaves, spec), v, "v", batched)
        v_leaves = tree_flatten(v)[0]
        out = [torch.zeros_like(vl) for vl in v_leaves]
        if not live:
            return tree_unflatten(out, spec)
        outputs = [g[i] for i in live]
        if not batched:
            hv = torch.autograd.grad(outputs, leaves, [v_leaves[i] for i in live],
                                     retain_graph=True, allow_unused=True)
            return tree_unflatten([o if h is None else h for o, h in zip(out, hv)], spec)
        # One backward per vector through the retained graph. Measured faster than
        # autograd's vmapped backward (is_grads_batched) on MLPs and CNNs on CPU.
        for j in range(v_leaves[0].shape[0]):
            hv = torch.autograd.grad(outputs, leaves, [v_leaves[i][j] for i in live],
                                     retain_graph=True, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o[j] = h
        return tree_unflatten(out, spec)

    grad_tree = tree_unflatten([gi.detach() for gi in g], spec)
    return y.detach(), grad_tree, product


def hvp(
    f: Callable[[Tree], torch.Tensor],
    x: Tree,
    v: Tree,
    *,
    batched: bool = False,
    mode: str = "auto",
) -> Tree:
    """Hessian-vector product ``H v`` of the scalar function ``f`` at ``x``.

    With ``batched=True``, ``v`` carries a leading dimension ``k`` and the ``k`` products
    share one forward and one backward pass. ``mode`` is one of :data:`HVP_MODES`.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
    _check_like(x, v, "v", batched)
    if mode == "auto":
        if _in_functorch_transform():
            mode = "rev_rev"
        else:
            try:
                return hvp_fn(f, x)[2](v, batched)
            except (RuntimeError, NotImplementedError) as err:
                msg = str(err).lower()
                if "derivative" not in msg and "not implemented" not in msg:
                    raise
                mode = "fwd_rev"
    if mode == "double_backward":
        return hvp_fn(f, x)[2](v, batched)
    g = tf.grad(lambda z: _scalar(f(z)))
    if mode == "rev_rev":
        _, vjp_fn = tf.vjp(g, x)
        single = lambda w: vjp_fn(w)[0]  # noqa: E731
        return tf.vmap(single)(v) if batched else single(v)
    single = lambda w: tf.jvp(g, (x,), (w,))[1]  # noqa: E731
    return tf.vmap(single)(v) if batched else single(v)


def _numel(tree: Tree) -> int:
    return sum(t.numel() for t in tree_flatten(tree)[0])


def jacobian(f: Callable[[Tree], Any], x: Tree, *, mode: str = "auto") -> Any:
    """Jacobian of ``f`` at ``x`` (torch.func layout: ``out.shape + in.shape`` per leaf pair).

    ``mode="auto"`` picks forward mode when the input is smaller than the output (one JVP
    per input coordinate) and reverse mode otherwise (one VJP per output coordinate).
    """
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if mode == "auto":
        with torch.no_grad():
            n_out = _numel(f(x))
        mode = "forward" if _numel(x) < n_out else "reverse"
    if mode == "forward":
        try:
            return tf.jacfwd(f)(x)
        except (RuntimeError, NotImplementedError) as err:
            if "forward" not in str(err).lower():
                raise
    return tf.jacrev(f)(x)


def hessian(f: Callable[[Tree], torch.Tensor], x: Tree) -> Any:
    """Dense Hessian of the scalar ``f`` at ``x`` (forward over reverse, reverse over
    reverse when an operation has no forward-mode rule). Shape ``x.shape + x.shape``."""
    fs = lambda z: _scalar(f(z))  # noqa: E731
    try:
        return tf.jacfwd(tf.jacrev(fs))(x)
    except (RuntimeError, NotImplementedError) as err:
        if "forward" not in str(err).lower():
            raise
        return tf.jacrev(tf.jacrev(fs))(x)


def gnvp(
    f: Callable[[Tree], Any],
    loss: Callable[[Any], torch.Tensor],
    x: Tree,
    v: Tree,
    *,
    batched: bool = False,
) -> Tree:
    """Generalized Gauss-Newton product ``J^T H_loss J v``.

    ``f`` maps ``x`` to outputs (e.g. network logits), ``loss`` maps outputs to a scalar;
    ``J`` is the Jacobian of ``f`` at ``x`` and ``H_loss`` the Hessian of ``loss`` at
    ``f(x)``. Costs one JVP, one loss-space HVP and one VJP (Schraudolph 2002).
    """
    _check_like(x, v, "v", batched)
    out, vjp_fn = tf.vjp(f, x)
    out = tree_map(torch.Tensor.detach, out)

    def single(w: Tree) -> Tree:
        jv = jvp(f, x, w)[1]
        hjv = hvp(loss, out, jv, mode="rev_rev")
        return vjp_fn(hjv)[0]

    return tf.vmap(single)(v) if batched else single(v)
