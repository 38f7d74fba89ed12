r"""``torch.compile`` for the pure-tensor part of an optimizer step (opt-in).

An optimizer step has two parts: the *Python side* (closure, gradient rule, learning-rate
checks, step counters, amortized refreshes with their failure policy, host reads that
decide whether to skip) and the *inner update* that runs after the gradients are gathered:
moments, statistics, directions, the parameter update. Only the inner update is compiled,
through :class:`StepCompiler`: each compiled function takes tensors (and hyperparameters
that stay constant for the run), never reads a tensor value on the host (no ``.item()``,
no branch on a tensor's value), and is compiled with ``fullgraph=True`` (a graph break is
an error, not a silent slowdown).

What changes every step (bias corrections ``1 - beta^t``, a scheduled learning rate)
enters a compiled function as a *0-d float64 tensor on the parameters' device*
(:meth:`StepCompiler.scalars`), never as a Python float: ``torch.compile`` specializes on
Python floats (one recompilation per new value); a tensor is a graph input. On an
accelerator the values travel in one non-blocking copy from pinned memory: the host
never waits for the device.
The integer step count is traced as a symbol from the first compilation; a branch on it
(before / after the start of preconditioning) is a guard: a bounded number of graphs per
run, not one per step.

Cost and benefit: each compiled function is compiled once per block shape (seconds each
on a CPU; the inductor cache on disk makes later runs cheaper). On a CPU at the
benchmarks' sizes the compiled step is measured 1.1-1.3x *slower* than the eager one
(each compiled call costs dispatch - guards, runtime wrappers - per block shape, and the
work is dominated by batched matmuls that compilation does not speed up); what fusion
saves is kernel launches on accelerators (not measured here: no GPU).

Eager and compiled steps share the state tensors, so a ``state_dict`` saved by one resumes
in the other. Numerics: inductor fuses the elementwise chain of the update and may
contract ``a * b + c`` or reassociate, so a compiled step agrees with the eager one to
float rounding (tests state the tolerance), not bitwise.

Usage: ``opt.compile_step()`` on a curvlab optimizer
(:meth:`curvlab.optim.base.CurvlabOptimizer.compile_step`).
"""

from __future__ import annotations

import logging
import shutil
import types
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["StepCompiler", "inductor_available"]


def inductor_available() -> str | None:
    """None if the inductor backend can run on the CPU here, else why not (it compiles C++
    with the compiler named by ``CXX`` or found on the ``PATH``)."""
    import os

    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return None
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return None
    return "no C++ compiler on the PATH (inductor's CPU backend needs g++ or clang++)"


#: integer arguments traced as symbols from the first compilation (see _first_call_dynamic)
DYNAMIC_INTS = "L['step']"


def _first_call_dynamic(compiled: Callable[..., Any], cache: dict, key: Any
                        ) -> Callable[..., Any]:
    """``compiled`` whose first call traces the ``step`` argument as a symbol
    (``torch.compiler.config.dynamic_sources``): otherwise the first graph specializes on
    the step count and the second step compiles again. The config patch costs ~0.2 ms, so
    it wraps the first call only; later calls go to ``compiled`` directly."""

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "dynamic_sources"):  # torch < 2.6
        return compiled

    def first(*args: Any, **kwargs: Any) -> Any:
        cache[key] = compiled
        with config.patch(dynamic_sources=DYNAMIC_INTS):
            return compiled(*args, **kwargs)

    return first


class StepCompiler:
    """Compiled versions of an optimizer's inner-update functions (one cache per optimizer).

    ``backend``: a ``torch.compile`` backend ("inductor", the default; "aot_eager" traces
    without generating code, useful where no C++ compiler exists); ``mode`` and
    ``options``: passed to ``torch.compile``. :meth:`__call__` returns the compiled version
    of a function (compiled once, on first use).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None,
                 options: dict[str, Any] | None = None, dynamic: bool | None = None) -> None:
        if not isinstance(backend, str) and not callable(backend):
            raise TypeError(f"compile_step: backend must be a backend name or callable, got "
                            f"{type(backend).__name__}")
        self.backend = backend
        self.mode = mode
        self.options = options
        self.dynamic = dynamic
        self._cache: dict[Any, Callable[..., Any]] = {}

    def __call__(self, fn: Callable[..., Any], key: Any = None) -> Callable[..., Any]:
        """The compiled ``fn``, one per ``(fn, key)``. Pass a plain function (not a bound
        method). Each distinct ``key`` (e.g. the shapes a call sees) compiles its own copy
        of ``fn``'s code: ``torch.compile`` keeps one cache of graphs per code object,
        bounded by ``torch._dynamo.config.recompile_limit`` (8), and a model with many
        block shapes would exhaust a shared one and fall back to eager silently."""
        key = (fn, key)
        compiled = self._cache.get(key)
        if compiled is None:
            if key[1] is not None and isinstance(fn, types.FunctionType):
                fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                        fn.__defaults__, fn.__closure__)
            kwargs: dict[str, Any] = {"fullgraph": True, "backend": self.backend,
                                      "dynamic": self.dynamic}
            if self.mode is not None:
                kwargs["mode"] = self.mode
            if self.options is not None:
                kwargs["options"] = self.options
            compiled = self._cache[key] = _first_call_dynamic(torch.compile(fn, **kwargs),
                                                              self._cache, key)
            logger.debug("compiling %s (backend %s)", getattr(fn, "__qualname__", fn),
                         self.backend)
        return compiled

    def __deepcopy__(self, memo: dict) -> StepCompiler:  # compiled code is not copied
        return StepCompiler(self.backend, self.mode, self.options, self.dynamic)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    @staticmethod
    def scalars(values: list[float], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per-step scalars as a compiled function's inputs: 0-d float64 tensors on
        ``device`` (see the module docstring), all from one host buffer. On an accelerator
        the buffer is pinned and copied without blocking (the caching host allocator keeps
        it until the copy is done), so the host never waits for the device."""
        host = torch.tensor([float(v) for v in values], dtype=torch.float64)
        device = torch.device(device)
        if device.type != "cpu":
            host = host.pin_memory().to(device, non_blocking=True)
        return list(host.unbind())
