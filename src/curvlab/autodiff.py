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

Fused attention kernels. ``F.scaled_dot_product_attention`` dispatches to fused kernels
(flash / memory-efficient / cuDNN) whose backward has no derivative and which have no
forward-mode rule, and ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take a
fused fast path without forward-mode rules. Every product that differentiates the model
twice (HVPs, the Hessian, ``J v`` of the Gauss-Newton and Fisher products) then fails.
The same attention computed by the math backend is a composition of differentiable ops.
:data:`attention_kernels` records which one curvature products use: the default kernels
until a product meets a missing derivative of a fused attention kernel; then the product
is recorded again under :func:`math_kernels`, this is logged once, and every later
second-order recording of the process uses the math kernels from the start (the missing
derivative is a property of the torch build, not of the model). Set
``attention_kernels.math = True`` to choose them up front (``benchmarks/bench_hf.py``
measures both).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.func as tf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["grad", "jvp", "vjp", "hvp", "hvp_fn", "jacobian", "hessian", "gnvp", "HVP_MODES",
           "math_kernels", "attention_kernels", "AttentionKernels", "fused_attention_node",
           "check_double_backward"]

logger = logging.getLogger(__name__)

#: How :func:`hvp` differentiates twice: ``"auto"`` (double backward, or
#: ``torch.func.vjp`` of the gradient inside torch.func transforms, forward-over-reverse
#: where a double-backward rule is missing), ``"double_backward"`` / ``"rev_rev"``
#: (reverse over reverse) or ``"fwd_rev"`` (forward over reverse, ``jvp(grad)``).
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
    if (type(x) is dict and type(v) is dict and list(x) == list(v)
            and all(isinstance(t, torch.Tensor) for t in (*x.values(), *v.values()))):
        # flat dicts of tensors with the same keys in the same order (parameter dicts): the
        # leaves tree_flatten gives, without its cost (~0.1 ms for a GPT-2's parameters)
        x_leaves, v_leaves = list(x.values()), list(v.values())
    else:
        x_leaves, x_spec = tree_flatten(x)
        v_leaves, v_spec = tree_flatten(v)
        if x_spec != v_spec:
            raise ValueError(f"{name} must have the same structure as x ({x_spec}), got "
                             f"{v_spec}")
    k = None
    for i, (a, b) in enumerate(zip(x_leaves, v_leaves)):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} leaf {i} must be a tensor, got {type(b).__name__}")
        if (b.shape[1:] if batched else b.shape) != a.shape:
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


_warned_interpreter_stack = False


def _in_functorch_transform() -> bool:
    """Whether we run inside a torch.func transform (``vmap``, ``grad``, ...), where
    double backward is unavailable. Read from torch's private functorch interpreter stack;
    if that entry point is missing or fails (another torch version), answer True: the
    torch.func products it then selects are correct inside and outside transforms, only
    slower (logged once at debug level)."""
    global _warned_interpreter_stack
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except Exception as err:  # noqa: BLE001 - a private torch API: any failure, same answer
        if not _warned_interpreter_stack:
            _warned_interpreter_stack = True
            logger.debug("torch._C._functorch.peek_interpreter_stack() is unavailable (%s: %s)"
                         "; curvature products use torch.func (rev_rev) as if inside a "
                         "torch.func transform", type(err).__name__, err)
        return True


# ---- attention kernels -------------------------------------------------------------------
_MISSING_DERIVATIVE = re.compile(
    r"derivative for (?:aten::)?'?([\w.:]+)'? is not implemented"
    r"|forward AD with (?:aten::)?([\w.:]+) that does not support it")
_FUSED_ATTENTION = re.compile(r"attention|attn|transformer_encoder", re.IGNORECASE)


def missing_derivative(err: BaseException) -> str | None:
    """The operator named by a "derivative ... not implemented" (double backward) or
    "forward AD with ... that does not support it" (forward mode) error, else None."""
    m = _MISSING_DERIVATIVE.search(str(err))
    return None if m is None else (m.group(1) or m.group(2))


def one_sample_at_a_time(err: RuntimeError, what: str) -> None:
    """Note that ``vmap`` could not batch ``what`` over the samples (``err``) and that it runs
    one sample at a time instead. Any ``RuntimeError`` under ``vmap`` qualifies: a ``.item()``
    or a branch on a value (Hugging Face models check their attention masks on the host),
    an op whose output shape depends on the values (``masked_select`` in torch's weighted,
    label-smoothed cross-entropy, packed sequences) or a kernel without a batching rule
    (multi-layer ``nn.GRU``, ``F.bilinear``'s backward, ``nn.Embedding(max_norm=...)``). The
    loop computes the same values; an error of the model itself is raised by the loop."""
    logger.info("%s: vmap cannot batch this model over its samples; one sample at a time (%s)",
                what, str(err).splitlines()[0][:120] if str(err) else type(err).__name__)


@contextlib.contextmanager
def math_kernels() -> Iterator[None]:
    """Attention by differentiable compositions of ops: the math backend of
    ``F.scaled_dot_product_attention`` (``sdpa_kernel(SDPBackend.MATH)``) and
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` without their fused fast
    path (``torch.backends.mha.set_fastpath_enabled(False)``)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class AttentionKernels:
    """Which attention kernels second-order products record the model with.

    ``math`` is False (the default kernels) until a product fails for a missing derivative
    of a fused attention kernel (:meth:`retry`); from then on :meth:`context` is
    :func:`math_kernels`. One instance, :data:`attention_kernels`, serves the process.
    """

    def __init__(self, math: bool = False) -> None:
        self.math = math

    def context(self) -> contextlib.AbstractContextManager:
        """The kernels to record a second-order graph with."""
        return math_kernels() if self.math else contextlib.nullcontext()

    def retry(self, err: BaseException, recorded_math: bool) -> bool:
        """Whether a product that failed with ``err`` on a graph recorded with
        (``recorded_math``) or without the math kernels should be recorded again under
        them. Learns (and logs once) that the math kernels are needed; raises a clear error
        when a fused attention kernel lacks the derivative even under the math kernels."""
        kernel = missing_derivative(err)
        if kernel is None or not _FUSED_ATTENTION.search(kernel):
            return False
        if recorded_math:
            raise RuntimeError(
                f"{kernel} has no derivative for this curvature product even with "
                f"curvlab.autodiff.math_kernels() active (something selects the fused kernel "
                f"explicitly, e.g. an sdpa_kernel(...) context inside the model); build the "
                f"model with attn_implementation='eager' or remove that context") from err
        self.learn(kernel)
        return True

    def learn(self, kernel: str) -> None:
        """Switch to the math kernels because ``kernel`` lacks a derivative (logged once)."""
        if not self.math:
            self.math = True
            logger.info("%s lacks a derivative that curvature products need: from now on "
                        "they record attention with the math SDPA backend and without the "
                        "nn.MultiheadAttention fast path (curvlab.autodiff.attention_kernels)",
                        kernel)

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under :meth:`context`, once more under the math kernels if it fails for
        a missing derivative of a fused attention kernel. ``fn`` must record everything
        it differentiates itself (a torch.func computation)."""
        while True:  # at most twice: retry() raises once the math kernels failed too
            recorded_math = self.math
            try:
                with self.context():
                    return fn()
            except (RuntimeError, NotImplementedError) as err:
                if not self.retry(err, recorded_math):
                    raise


#: the process's choice of attention kernels for second-order products
attention_kernels = AttentionKernels()


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

    def compute() -> tuple[Any, Any]:
        try:
            return tf.jvp(f, (x,), (v,))
        except (RuntimeError, NotImplementedError) as err:
            if "forward" not in str(err).lower():
                raise
            return _double_vjp_jvp(f, x, v)

    return attention_kernels.run(compute)


def vjp(f: Callable[[Tree], Any], x: Tree, u: Any) -> tuple[Any, Tree]:
    """Return ``(f(x), J^T u)`` by reverse mode."""
    y, vjp_fn = tf.vjp(f, x)
    _check_like(y, u, "u")
    return y, vjp_fn(u)[0]


def _detached_leaves(x: Tree) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = tree_flatten(x)
    return [leaf.detach().requires_grad_(True) for leaf in leaves], spec


_NOT_IMPLEMENTED_NODE = "torch::autograd::NotImplemented"


def _find_node(roots: list[torch.Tensor], match: Callable[[str], bool]) -> str | None:
    """The name of a node of the autograd graph of ``roots`` that ``match``es, or None."""
    seen: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if match(node.name()):
            return node.name()
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return None


#: backward nodes whose own derivative PyTorch computes wrongly (-> what they come from)
WRONG_DOUBLE_BACKWARD = {
    "WeightNormInterfaceBackward0": (
        "PyTorch's fused weight norm (torch._weight_norm, behind "
        "nn.utils.parametrizations.weight_norm and nn.utils.weight_norm)"),
}


def check_double_backward(y: torch.Tensor) -> None:
    """ValueError if the graph of ``y`` holds a node of :data:`WRONG_DOUBLE_BACKWARD`:
    second derivatives through it would be silently wrong (torch 2.13: the fused weight
    norm's Hessian in ``v`` is off by ~30% and not symmetric, against finite differences)."""
    node = _find_node([y], lambda name: name in WRONG_DOUBLE_BACKWARD)
    if node is not None:
        raise ValueError(
            f"the autograd graph holds {WRONG_DOUBLE_BACKWARD[node]}, whose second "
            "derivative PyTorch computes wrongly: Hessian-vector products through it would be "
            "silently wrong. Write the weight out as g * v / v.norm(...), or give the model "
            "to curvlab's operators (HessianOperator(model, loss_fn, data), "
            "curvlab.Objective), which do")


def _has_underivable_node(roots: list[torch.Tensor]) -> bool:
    """Whether the autograd graph of ``roots`` holds a node whose own derivative is not
    implemented (backpropagating through it would raise)."""
    return _find_node(roots, lambda name: name == _NOT_IMPLEMENTED_NODE) is not None


def fused_attention_node(out: torch.Tensor) -> str | None:
    """The backward node of a fused attention kernel in the graph of ``out`` (e.g.
    ``ScaledDotProductFlashAttentionForCpuBackward0``; under :func:`math_kernels` attention
    is recorded as matmuls and a softmax instead), or None."""
    return _find_node([out], lambda name: _FUSED_ATTENTION.search(name) is not None)


def _gradient_graph(f: Callable, x: Tree) -> tuple[list, Any, torch.Tensor, list, list[int]]:
    """Record ``g = grad f(x)`` with its graph: (leaves, spec, f(x), g, indices of the
    entries of ``g`` that depend on ``x``)."""
    leaves, spec = _detached_leaves(x)
    with torch.enable_grad():
        y = _scalar(f(tree_unflatten(leaves, spec)))
        g = torch.autograd.grad(y, leaves, create_graph=True, allow_unused=True)
    g = [torch.zeros_like(leaf) if gi is None else gi for gi, leaf in zip(g, leaves)]
    return leaves, spec, y, g, [i for i, gi in enumerate(g) if gi.requires_grad]


def hvp_fn(
    f: Callable[[Tree], torch.Tensor], x: Tree
) -> tuple[torch.Tensor, Tree, Callable[..., Tree]]:
    """Linearize the gradient of ``f`` at ``x`` once and return ``(f(x), grad, product)``.

    ``product(v, batched=False)`` returns ``H v``; it reuses the recorded graph of the
    gradient, so each call costs one backward pass through it (no new forward), which is
    what Krylov methods at a fixed point want. The graph is kept alive while ``product``
    is referenced.

    The gradient graph is recorded with :data:`attention_kernels`; when it holds a node
    without a derivative (a fused attention kernel's backward), it is recorded again under
    :func:`math_kernels` right away, within the caller's context (module train/eval mode).
    """
    recorded_math = attention_kernels.math
    with attention_kernels.context():
        leaves, spec, y, g, live = _gradient_graph(f, x)
    check_double_backward(y)
    if not recorded_math and _has_underivable_node([g[i] for i in live]):
        with math_kernels():
            again = _gradient_graph(f, x)
        if not _has_underivable_node([again[3][i] for i in again[4]]):
            attention_kernels.learn("a fused attention kernel's backward")
            leaves, spec, y, g, live = again
            recorded_math = True

    def backward(v_leaves: list[torch.Tensor]) -> tuple:
        try:
            return torch.autograd.grad([g[i] for i in live], leaves,
                                       [v_leaves[i] for i in live], retain_graph=True,
                                       allow_unused=True)
        except (RuntimeError, NotImplementedError) as err:
            attention_kernels.retry(err, recorded_math=True)  # clear error for attention
            raise

    x_tree = tree_unflatten(leaves, spec)

    def product(v: Tree, batched: bool = False) -> Tree:
        _check_like(x_tree, v, "v", batched)
        v_leaves = tree_flatten(v)[0]
        if not live:
            return tree_unflatten([torch.zeros_like(vl) for vl in v_leaves], spec)
        if not batched or v_leaves[0].shape[0] == 1:
            hv = backward([vl[0] for vl in v_leaves] if batched else v_leaves)
            hv = [torch.zeros_like(vl) if h is None else (h.unsqueeze(0) if batched else h)
                  for vl, h in zip(v_leaves, hv)]
            return tree_unflatten(hv, spec)
        # One backward per vector through the retained graph. Measured faster than
        # autograd's vmapped backward (is_grads_batched) on MLPs and CNNs on CPU.
        out = [torch.zeros_like(vl) for vl in v_leaves]
        for j in range(v_leaves[0].shape[0]):
            hv = backward([vl[j] for vl in v_leaves])
            for o, h in zip(out, hv):
                if h is not None:
                    o[j] = h
        return tree_unflatten(out, spec)

    grad_tree = tree_unflatten([gi.detach() for gi in g], spec)
    return y.detach(), grad_tree, product


def _fwd_rev(g: Callable, x: Tree, v: Tree, batched: bool) -> Tree:
    single = lambda w: tf.jvp(g, (x,), (w,))[1]  # noqa: E731
    try:
        return tf.vmap(single)(v) if batched else single(v)
    except RuntimeError as err:
        if "ZeroTensors are immutable" not in str(err):
            raise
        raise RuntimeError("hvp(mode='fwd_rev') failed inside torch's forward-mode rules "
                           f"({err}); use mode='double_backward' (or 'auto')") from err


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
        def rev_rev() -> Tree:
            _, vjp_fn = tf.vjp(g, x)
            single = lambda w: vjp_fn(w)[0]  # noqa: E731
            return tf.vmap(single)(v) if batched else single(v)
        return attention_kernels.run(rev_rev)
    return attention_kernels.run(lambda: _fwd_rev(g, x, v, batched))


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


def hessian(f: Callable[[Tree], torch.Tensor], x: Tree, *, chunk: int = 64) -> Any:
    """Dense Hessian of the scalar ``f`` at ``x`` (torch.func layout: ``H[a][b]`` of shape
    ``a.shape + b.shape`` for leaves ``a``, ``b`` of ``x``; ``x.shape + x.shape`` for a
    tensor).

    Computed column by column by double-backward HVPs (:func:`hvp_fn`: the gradient graph
    recorded once, one backward per column, ``chunk`` columns at a time), i.e. exactly the
    products of :class:`~curvlab.linops.HessianOperator`. Inside torch.func transforms
    (no double backward there) it is ``jacrev(grad(f))``. Not ``jacfwd(jacrev(f))``:
    in torch 2.13 the forward-mode derivative of a vmapped layer_norm backward is wrong for
    the weight (``jvp`` of ``vmap(vjp)`` through ``F.layer_norm``; reproduced in
    ``tests/test_autodiff.py``), which made that Hessian wrong and asymmetric on any model
    with a LayerNorm after a trainable layer.
    """
    if _in_functorch_transform():
        return attention_kernels.run(lambda: tf.jacrev(tf.grad(lambda z: _scalar(f(z))))(x))
    _, grad_tree, product = hvp_fn(f, x)
    leaves, spec = tree_flatten(grad_tree)
    sizes = [leaf.numel() for leaf in leaves]
    n = sum(sizes)
    rows = torch.empty((n, n), dtype=leaves[0].dtype, device=leaves[0].device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        eye = torch.zeros((stop - start, n), dtype=rows.dtype, device=rows.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=rows.dtype, device=rows.device)
        cols, offset = [], 0
        for leaf, size in zip(leaves, sizes):
            cols.append(eye[:, offset:offset + size].reshape(stop - start, *leaf.shape))
            offset += size
        hv = tree_flatten(product(tree_unflatten(cols, spec), batched=True))[0]
        rows[start:stop] = torch.cat([h.reshape(stop - start, -1) for h in hv], dim=1)
    # rows[c] = H e_c = column c of H: block (a, b) of H is rows[b-range, a-range]^T
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = [[rows[ob:ob + nb, oa:oa + na].T.reshape(*la.shape, *lb.shape)
               for lb, ob, nb in zip(leaves, offsets, sizes)]
              for la, oa, na in zip(leaves, offsets, sizes)]
    return tree_unflatten([tree_unflatten(row, spec) for row in blocks], spec)


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

    def compute() -> Tree:
        out, vjp_fn = tf.vjp(f, x)
        out = tree_map(torch.Tensor.detach, out)

        def single(w: Tree) -> Tree:
            jv = jvp(f, x, w)[1]
            hjv = hvp(loss, out, jv, mode="rev_rev")
            return vjp_fn(hjv)[0]

        return tf.vmap(single)(v) if batched else single(v)

    return attention_kernels.run(compute)
