"""The ``curvlab`` command line.

    curvlab diagnose                      # the built-in digits MLP, trained briefly
    curvlab diagnose my_model.py:make     # any model: make() -> (model, loss_fn, data)

Progress and tables use ``rich`` when it is installed (``pip install curvlab[cli]``) and
fall back to plain text otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "load_factory"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``FILE.py:FACTORY`` to the factory callable, with clear errors."""
    if ":" not in spec:
        raise CLIError(f"expected FILE.py:FACTORY, got {spec!r} (e.g. examples/mlp.py:make)")
    file_part, name = spec.rsplit(":", 1)
    path = Path(file_part)
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    module_name = f"_curvlab_user_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise CLIError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CLIError(f"{path} has no callable {name!r}")
    return factory


def _built_in() -> tuple[Any, Any, Any]:
    from curvlab.bench.problems.digits import digits_problem

    return digits_problem()


class _Console:
    """rich when available, plain print otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            self.rich: Any = Console()
        except ImportError:
            self.rich = None

    def print(self, text: str) -> None:
        if self.rich is not None:
            self.rich.print(text)
        else:
            print(text)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        if self.rich is not None:
            with self.rich.status(text):
                yield
        else:
            print(f"... {text}", flush=True)
            yield

    def table(self, title: str, rows: list[tuple[str, str, str]]) -> None:
        if self.rich is not None:
            from rich.table import Table

            table = Table(title=title)
            table.add_column("metric", style="bold")
            table.add_column("value", justify="right")
            table.add_column("meaning")
            for row in rows:
                table.add_row(*row)
            self.rich.print(table)
            return
        width = max(len(r[0]) for r in rows)
        print(title)
        for metric, value, meaning in rows:
            print(f"  {metric:<{width}}  {value:>14}  {meaning}")


def _diagnose(args: argparse.Namespace, console: _Console) -> int:
    from curvlab.diagnostics.summary import curvature_summary

    source = args.target or "built-in digits MLP (64-128-128-10, 50 SGD steps)"
    start = time.perf_counter()
    with console.status(f"building {source}"):
        factory = load_factory(args.target) if args.target else _built_in
        made = factory()
        if not (isinstance(made, (tuple, list)) and len(made) == 3):
            raise CLIError("the factory must return (model, loss_fn, data); got "
                           f"{type(made).__name__}")
        model, loss_fn, data = made
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"the factory's model must be an nn.Module, got {type(model).__name__}")
    with console.status("computing gradient, lambda_max and trace"):
        summary = curvature_summary(model, loss_fn, data, seed=args.seed,
                                    trace_samples=args.trace_samples)
    elapsed = time.perf_counter() - start
    s = summary
    rows = [
        ("parameters", f"{s.num_params:,}", "number of trainable parameters"),
        ("samples", f"{s.num_samples:,}", "data points the loss averages over"),
        ("loss", f"{s.loss:.6g}", "full-data loss"),
        ("gradient norm", f"{s.grad_norm:.4g}", "||grad L||_2 on the full data"),
        ("lambda_max", f"{s.lambda_max:.6g}", "largest Hessian eigenvalue (sharpness)"),
        ("trace estimate", f"{s.trace:.6g} ± {s.trace_stderr:.2g}",
         f"Hutchinson, {s.trace_samples} probes (± one standard error)"),
        ("max stable SGD lr", f"{s.max_stable_lr:.4g}", "2 / lambda_max (gradient descent)"),
        ("Hessian-vector products", f"{s.num_hvps}", "work spent on curvature"),
        ("time", f"{elapsed:.1f} s", "wall clock, including building the model"),
    ]
    console.table(f"curvlab diagnose: {source}", rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser("diagnose", help="curvature diagnostics of a model at its "
                          "current parameters")
    diag.add_argument("target", nargs="?", help="FILE.py:FACTORY returning (model, loss_fn, "
                      "data); default: the built-in digits MLP")
    diag.add_argument("--seed", type=int, default=0, help="seed of the random probe vectors")
    diag.add_argument("--trace-samples", type=int, default=20,
                      help="Hutchinson probe vectors for the trace estimate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    console = _Console()
    try:
        if args.command == "diagnose":
            return _diagnose(args, console)
    except CLIError as err:
        console.print(f"[bold red]error:[/bold red] {err}" if console.rich else f"error: {err}")
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
