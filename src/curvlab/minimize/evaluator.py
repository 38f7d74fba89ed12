"""Counted evaluations of the objective and the bookkeeping every solver shares.

:class:`Evaluator` turns the user's ``fun`` (plus optional ``jac`` / ``hessp`` / ``hess``)
into counted primitives on a flat vector ``x``: ``f`` (value only), ``fg`` (value and
gradient in one autograd pass), ``fgh`` (value, gradient and an HVP closure that reuses the
recorded graph, :func:`curvlab.autodiff.hvp_fn`) and ``hess`` (dense Hessian, one batched
backward). :class:`Monitor` holds the iteration count, the history, the callback and builds
the :class:`~curvlab.minimize.result.OptimizeResult`, re-checking ``||g||_inf <= gtol`` at
the returned point before it ever sets ``success``.

**Autograd fast path.** Gradients and Hessian-vector products of plain CPU tensors call
the autograd engine's private entry point directly (``Variable._execution_engine.
run_backward``, and the vmap primitives behind ``is_grads_batched``), skipping
``torch.autograd.grad``'s argument handling, which costs as much as the backward pass of a
small objective. Private entry points can change between torch releases, so each kind
(single and batched) checks itself once per process: its first use computes the result
both ways and compares them (equal to ``1e-12`` relative); on a mismatch or an exception
the public ``torch.autograd.grad`` is used from then on, with one warning logged. Turn the
fast path off with the environment variable ``CURVLAB_FAST_AUTOGRAD=0`` (read at import)
or :func:`set_fast_autograd` ``(False)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from curvlab.minimize.result import STATUS_MESSAGES, SUCCESS_TESTS, OptimizeResult

__all__ = ["Evaluator", "Monitor", "clip_direction", "host", "NonFiniteError", "dense",
           "set_fast_autograd", "fast_autograd_enabled"]

logger = logging.getLogger(__name__)

HVP = Callable[[torch.Tensor], torch.Tensor]

#: The C++ autograd engine's entry point, which ``torch.autograd.grad`` calls once it has
#: normalized and validated its arguments (``None`` if this torch does not expose it).
_RUN_BACKWARD = getattr(getattr(torch.autograd.Variable, "_execution_engine", None),
                        "run_backward", None)


#: Whether the engine fast path may be used (``CURVLAB_FAST_AUTOGRAD=0`` turns it off), and
#: the result of each kind's self-check: None (not yet checked), True (agrees with
#: ``torch.autograd.grad``), False (disagreed or raised: the public API is used).
_FAST_ENABLED = os.environ.get("CURVLAB_FAST_AUTOGRAD", "1").strip() != "0"
_FAST_CHECKED: dict[str, bool | None] = {"grad": None, "batched": None}


def set_fast_autograd(enabled: bool | None = None) -> None:
    """Use the private autograd-engine fast path (``True``), the public
    ``torch.autograd.grad`` only (``False``), or what ``CURVLAB_FAST_AUTOGRAD`` says
    (``None``; on unless it is ``0``). Re-arms the once-per-process self-checks."""
    global _FAST_ENABLED
    if enabled is None:
        enabled = os.environ.get("CURVLAB_FAST_AUTOGRAD", "1").strip() != "0"
    _FAST_ENABLED = bool(enabled)
    _FAST_CHECKED.update(grad=None, batched=None)


def fast_autograd_enabled(kind: str = "grad") -> bool:
    """Whether the fast path of ``kind`` (``"grad"`` or ``"batched"``) is in use: switched
    on and not failed its self-check."""
    return _FAST_ENABLED and _FAST_CHECKED[kind] is not False


def _agree(fast: torch.Tensor | None, ref: torch.Tensor | None) -> bool:
    if fast is None or ref is None:
        return fast is None and ref is None
    return (fast.shape == ref.shape and fast.dtype == ref.dtype and bool(
        torch.allclose(fast.detach(), ref.detach(), rtol=1e-12, atol=0.0, equal_nan=True)))


def _checked(kind: str, fast: Callable[[], torch.Tensor | None],
             public: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """``fast()`` once it has agreed with ``public()``; the first call computes both
    (``fast`` must keep the graph) and returns the public result."""
    state = _FAST_CHECKED[kind]
    if state:
        return fast()
    try:
        got, why = fast(), None
    except Exception as err:  # noqa: BLE001 - any failure of a private API: fall back
        got, why = None, f"raised {type(err).__name__}: {err}"
    ref = public()
    if why is None and not _agree(got, ref):
        why = "disagreed with torch.autograd.grad"
    _FAST_CHECKED[kind] = why is None
    if why is not None:
        logger.warning("curvlab.minimize: the autograd-engine fast path (%s) %s on its "
                       "self-check; using torch.autograd.grad from now on", kind, why)
    return ref


class NonFiniteError(ArithmeticError):
    """A non-finite Hessian (or model) inside a solver; the solver loops turn it into status 4."""


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as an ordinary tensor: autograd returns an efficient ``ZeroTensor`` for
    derivatives that are identically zero (e.g. ``|x|`` at 0), which NumPy and in-place
    operations reject."""
    if t is not None and t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t


def _plain_cpu(*tensors: torch.Tensor) -> bool:
    """Whether all are plain ``torch.Tensor`` (no subclass) on the CPU: the engine fast path."""
    return all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)


def _grad(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, *, retain_graph: bool = False,
          create_graph: bool = False) -> torch.Tensor | None:
    """``torch.autograd.grad(y, x, v, allow_unused=True)[0]`` for one output ``y`` and one
    leaf ``x``. For plain CPU tensors with ``v`` shaped like ``y`` it calls the engine
    directly: ``autograd.grad``'s argument handling (tuple normalization,
    ``__torch_function__`` dispatch, grad-output validation, the context stash for device
    threads) costs 20-60 us per call, as much as the whole backward pass of a small
    objective, and these calls are the inner loop of every solver here. Anything else
    (tensor subclasses, accelerators, other shapes) goes through ``autograd.grad``."""
    state = _FAST_CHECKED["grad"]
    if (_RUN_BACKWARD is not None and _FAST_ENABLED and state is not False
            and _plain_cpu(y, x, v) and v.shape == y.shape):
        if state:  # verified: the inner loop of every solver, kept lean
            return dense(_RUN_BACKWARD((y,), (v,), retain_graph, create_graph, (x,), True)[0])
        return _checked(  # the first use: both ways (the fast one keeps the graph)
            "grad", lambda: dense(_RUN_BACKWARD((y,), (v,), True, create_graph, (x,), True)[0]),
            lambda: dense(torch.autograd.grad(y, x, v, retain_graph=retain_graph,
                                              create_graph=create_graph, allow_unused=True)[0]))
    return dense(torch.autograd.grad(y, x, v, retain_graph=retain_graph,
                                     create_graph=create_graph, allow_unused=True)[0])


#: The batching primitives behind ``autograd.grad(..., is_grads_batched=True)``.
_VMAP = (getattr(torch._C, "_vmapmode_increment_nesting", None),
         getattr(torch._C, "_vmapmode_decrement_nesting", None),
         getattr(torch, "_add_batch_dim", None), getattr(torch, "_remove_batch_dim", None))


def _batched_grad(y: torch.Tensor, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor | None:
    """``autograd.grad(y, x, V, retain_graph=True, is_grads_batched=True)[0]``: the rows of
    ``V`` as a batch of grad-outputs in one backward pass (``(V J)`` row by row). For plain
    CPU tensors it enters the same batching mode directly and calls the engine once, which
    skips ``is_grads_batched``'s generic pytree wrapping and per-call checks (100-350 us,
    up to a third of a small dense Hessian); otherwise it calls ``autograd.grad``."""
    enter, leave, add_dim, remove_dim = _VMAP

    def public() -> torch.Tensor | None:
        return dense(torch.autograd.grad(y, x, V, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)[0])

    if (_RUN_BACKWARD is not None and None not in _VMAP and fast_autograd_enabled("batched")
            and _plain_cpu(y, x, V) and V.shape[1:] == y.shape):
        def fast() -> torch.Tensor | None:
            level = enter()
            try:
                out = _RUN_BACKWARD((y,), (add_dim(V, 0, level),), True, False, (x,), True)[0]
                return None if out is None else dense(remove_dim(out, level, V.shape[0], 0))
            finally:
                leave()

        return _checked("batched", fast, public)
    return public()


def host(*values: torch.Tensor) -> list[float]:
    """Scalar tensors as Python floats: one host sync (a ``stack``) on an accelerator,
    plain ``item()`` calls on the CPU, where a ``stack`` costs more than it saves."""
    if values[0].device.type == "cpu":
        return [v.item() for v in values]
    dtype = values[0].dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return torch.stack([v.to(dtype) for v in values]).tolist()


def _as_scalar(y: Any, what: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(y).__name__}")
    if y.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor, got shape {tuple(y.shape)}; "
                         "reduce it first, e.g. with .sum()")
    return y if y.dim() == 0 else y.reshape(())  # no extra view node in the common case


class Evaluator:
    """Counted objective primitives on the flat vector ``x`` (the solver's working view).

    ``fun(x.view(shape), *args)`` is called with ``x`` reshaped to ``x0``'s shape.
    ``jac``: ``None`` (autodiff), ``True`` (``fun`` returns ``(f, g)``) or a callable
    ``jac(x, *args)``. ``hessp(x, p, *args)`` and ``hess(x, *args)``: optional user
    Hessian-vector product / dense Hessian; without them HVPs come from autodiff of
    ``fun`` (double backward through the graph recorded at ``x``).
    """

    def __init__(self, fun: Callable, shape: torch.Size, args: tuple = (),
                 jac: Any = None, hessp: Callable | None = None,
                 hess: Callable | None = None) -> None:
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        if not (jac is None or jac is True or callable(jac)):
            raise TypeError("jac must be None (autodiff), True (fun returns (f, grad)) or a "
                            f"callable jac(x), got {jac!r}")
        for name, h in (("hessp", hessp), ("hess", hess)):
            if h is not None and not callable(h):
                raise TypeError(f"{name} must be a callable or None, got {type(h).__name__}")
        self.fun, self.shape, self.args = fun, shape, tuple(args)
        self.jac, self.hessp, self.hess_fn = jac, hessp, hess
        self.nfev = self.ngev = self.nhvp = self.nhess = 0
        #: ``(x, f, g)`` of the first value-and-gradient evaluation (the starting point)
        self.first: tuple | None = None
        self._one: torch.Tensor | None = None
        self._eye: torch.Tensor | None = None

    def _ones(self, y: torch.Tensor) -> torch.Tensor:
        """``grad_outputs`` for the scalar ``y``, allocated once (``autograd.grad`` would
        build it on every call)."""
        one = self._one
        if one is None or one.dtype != y.dtype or one.device != y.device:
            one = self._one = torch.ones((), dtype=y.dtype, device=y.device)
        return one

    def _call(self, x: torch.Tensor) -> Any:
        if x.shape != self.shape:  # a view adds an autograd node: only when needed
            x = x.view(self.shape)
        return self.fun(x, *self.args)

    def _flat_grad(self, g: Any, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(g, torch.Tensor) or g.numel() != x.numel():
            raise ValueError(f"the gradient must be a tensor with {x.numel()} elements, got "
                             f"{getattr(g, 'shape', type(g).__name__)}")
        return g.detach().reshape(-1).to(x.dtype)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        """Objective value only (one forward pass, counted in ``nfev``)."""
        self.nfev += 1
        with torch.no_grad():
            y = self._call(x)
        if self.jac is True:
            y = y[0]
        return _as_scalar(y, "fun").detach()

    def f_lazy(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """``(f, grad)`` with ``grad() -> g``: the value by one forward pass (``nfev``) whose
        graph is kept, the gradient by one backward pass only if asked (``ngev``), so a
        point evaluated for its value never needs a second forward pass for its gradient."""
        if self.jac is not None:
            f, g = self.fg(x)
            self.ngev -= 1

            def given() -> torch.Tensor:
                self.ngev += 1
                return g

            return f, given
        self.nfev += 1
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = _as_scalar(self._call(xr), "fun")

        def grad() -> torch.Tensor:
            self.ngev += 1
            if not y.requires_grad:
                return torch.zeros_like(x)
            g = _grad(y, xr, self._ones(y))
            return torch.zeros_like(x) if g is None else g

        return y.detach(), grad

    def fg(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value and gradient (one forward + one backward; counts one ``nfev``, one ``ngev``)."""
        f, g = self._fg(x)
        if self.first is None:
            self.first = (x, f, g)
        return f, g

    def _fg(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.nfev += 1
        self.ngev += 1
        if self.jac is True:
            with torch.no_grad():
                y, g = self._call(x)
            return _as_scalar(y, "fun").detach(), self._flat_grad(g, x)
        if callable(self.jac):
            with torch.no_grad():
                y = _as_scalar(self._call(x), "fun")
                g = self.jac(x.view(self.shape), *self.args)
            return y.detach(), self._flat_grad(g, x)
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = _as_scalar(self._call(xr), "fun")
            g = _grad(y, xr, self._ones(y))
        return y.detach(), torch.zeros_like(x) if g is None else g

    def fgh(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, HVP]:
        """Value, gradient and ``v -> H v`` at ``x``. Without a user ``hessp`` (or ``hess``,
        whose matrix is then formed at the first product) the gradient's
        graph is recorded once (the double-backward form of :func:`curvlab.autodiff.hvp_fn`,
        inlined to keep per-product overhead low at small ``n``), so every product is one
        backward pass (``nhvp``); ``product(V, True)`` does a batch of rows ``V`` at once."""
        if self.hessp is not None:
            f, g = self.fg(x)
            xs = x.view(self.shape)

            def user_product(v: torch.Tensor) -> torch.Tensor:
                self.nhvp += 1
                with torch.no_grad():
                    hv = self.hessp(xs, v.view(self.shape), *self.args)
                return hv.detach().reshape(-1).to(x.dtype)

            return f, g, user_product
        if self.hess_fn is not None:  # user dense Hessian: products with it, formed once
            f, g = self.fg(x)
            dense: list[torch.Tensor] = []

            def dense_product(v: torch.Tensor) -> torch.Tensor:
                if not dense:
                    dense.append(self.hess(x))
                self.nhvp += 1
                return dense[0] @ v

            return f, g, dense_product
        self.nfev += 1
        self.ngev += 1
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self._call(xr)
            if self.jac is not None:  # value (and gradient) from the user; HVPs by autodiff
                y = y[0] if self.jac is True else y
            y = _as_scalar(y, "fun")
        out = self._graph(x, xr, y)
        if self.first is None:
            self.first = (x, out[0], out[1])
        return out

    def fgh_lazy(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], tuple]]:
        """``(f, finish)`` with ``finish() -> fgh(x)``: the gradient (and the graph for the
        products) is computed only when ``finish`` is called, so a trial point that is
        rejected on its value costs one forward pass (``nfev`` without ``ngev``). With user
        derivatives everything is computed at once."""
        if self.jac is not None or self.hessp is not None or self.hess_fn is not None:
            out = self.fgh(x)
            return out[0], lambda: out
        self.nfev += 1
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = _as_scalar(self._call(xr), "fun")

        def finish() -> tuple[torch.Tensor, torch.Tensor, HVP]:
            self.ngev += 1
            return self._graph(x, xr, y)

        return y.detach(), finish

    def _graph(self, x: torch.Tensor, xr: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, HVP]:
        """Gradient of ``y`` at the leaf ``xr`` with its graph recorded, and the product."""
        with torch.enable_grad():
            gr = _grad(y, xr, self._ones(y), retain_graph=True, create_graph=True)
        if gr is None:
            gr = torch.zeros_like(x)
        g = gr.detach()
        if self.jac is not None and self.jac is not True:
            with torch.no_grad():
                g = self._flat_grad(self.jac(x.view(self.shape), *self.args), x)
        live = gr.requires_grad

        def product(v: torch.Tensor, batched: bool = False) -> torch.Tensor:
            self.nhvp += 1
            if not live:
                return torch.zeros_like(v)
            if batched:
                hv = _batched_grad(gr, xr, v)
            else:
                hv = _grad(gr, xr, v, retain_graph=True)
            return torch.zeros_like(v) if hv is None else hv

        product.batched = product  # type: ignore[attr-defined]
        return y.detach(), g, product

    def hess(self, x: torch.Tensor, product: HVP | None = None) -> torch.Tensor:
        """Dense Hessian: user ``hess`` or ``H I`` as one batched backward through the
        recorded gradient graph (both count one ``nhess``); with a user ``hessp`` only,
        ``n`` products (counted in ``nhvp``)."""
        n = x.numel()
        if self.hess_fn is not None:
            self.nhess += 1
            with torch.no_grad():
                H = self.hess_fn(x.view(self.shape), *self.args)
            H = H.detach().reshape(n, n).to(x.dtype)
            if not bool(torch.isfinite(H).all()):
                raise NonFiniteError("the Hessian has non-finite entries")
            return H
        if product is None:
            product = self.fgh(x)[2]
        eye = self._eye
        if eye is None or eye.shape[0] != n or eye.dtype != x.dtype or eye.device != x.device:
            eye = self._eye = torch.eye(n, dtype=x.dtype, device=x.device)
        batched = getattr(product, "batched", None)
        if batched is not None:
            self.nhess += 1
            nhvp = self.nhvp
            try:
                H = batched(eye, True)
            except RuntimeError:
                H = torch.stack([batched(e) for e in eye])
            self.nhvp = nhvp
        else:
            H = torch.stack([product(e) for e in eye])
        H = 0.5 * (H + H.T)
        if not bool(torch.isfinite(H).all()):
            raise NonFiniteError("the Hessian has non-finite entries")
        return H


def clip_direction(g: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Gradient clipping: rescale ``g`` to 2-norm ``max_norm`` when it is longer."""
    if max_norm is None:
        return g
    scale = torch.clamp(max_norm / (torch.linalg.vector_norm(g) + 1e-300), max=1.0)
    return g * scale


class Monitor:
    """Iteration count, history, callback and result construction for one run."""

    def __init__(self, method: str, ev: Evaluator, gtol: float, max_iter: int,
                 callback: Callable | None = None, history: bool = False) -> None:
        self.method, self.ev, self.gtol, self.max_iter = method, ev, gtol, max_iter
        self.callback = callback
        self.nit = 0
        self.last: tuple | None = None  # (x, f, g) after the latest iteration
        self.allvecs: list[torch.Tensor] | None = None  # scipy's return_all: the iterates
        self.history: dict[str, list[float]] | None = (
            {"f": [], "grad_norm": [], "step": [], "radius": [], "decrement": []}
            if history else None)

    @staticmethod
    def gnorm(g: torch.Tensor) -> float:
        """``||g||_inf`` as a Python float (the one host sync per iterate)."""
        return torch.linalg.vector_norm(g, math.inf).item() if g.numel() else 0.0

    def record(self, f: torch.Tensor | float, gnorm: float, step: float | None = None,
               radius: float | None = None, decrement: float | None = None) -> None:
        if self.history is None:
            return
        h = self.history
        h["f"].append(float(f))
        h["grad_norm"].append(gnorm)
        nan = math.nan
        h["step"].append(nan if step is None else float(step))
        h["radius"].append(nan if radius is None else float(radius))
        h["decrement"].append(nan if decrement is None else float(decrement))

    def stop_requested(self, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> bool:
        """Call ``callback(intermediate_result)``; True (or StopIteration) stops the run."""
        self.last = (x, f, g)
        if self.allvecs is not None:
            self.allvecs.append(x.view(self.ev.shape).clone())
        if self.callback is None:
            return False
        shape = self.ev.shape
        inter = OptimizeResult(x=x.view(shape).clone(), fun=f, grad=g.view(shape).clone(),
                               nit=self.nit, nfev=self.ev.nfev)
        try:
            return bool(self.callback(inter))
        except StopIteration:
            return True

    def finish(self, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, status: int,
               extra: str = "", test: str = "gtol", **fields: Any) -> OptimizeResult:
        """Build the result; ``success`` iff the solver converged by ``test`` and, for the
        gradient test, ``||g||_inf <= gtol`` holds at ``x`` (re-checked here)."""
        gn = self.gnorm(g)
        finite = math.isfinite(f.item()) and math.isfinite(gn)
        if status == 0 and not finite:
            status = 4
        if status == 0 and test == "gtol" and not gn <= self.gtol:
            status = 6
        success = status == 0
        if success:
            message = "Optimization terminated successfully: " + SUCCESS_TESTS[test]
        else:
            message = STATUS_MESSAGES[status]
        message += f" {extra}" if extra else ""
        ev = self.ev
        res = OptimizeResult(
            x=x.view(ev.shape), fun=f, grad=g.view(ev.shape), nit=self.nit, nfev=ev.nfev,
            ngev=ev.ngev, nhvp=ev.nhvp, nhess=ev.nhess, success=success, status=status,
            message=message, method=self.method, grad_norm=gn, **fields)
        if self.history is not None:
            res["history"] = self.history
        logger.debug("%s: %s (nit=%d, nfev=%d, |g|=%.3g)", self.method, message, self.nit,
                     ev.nfev, gn)
        return res
