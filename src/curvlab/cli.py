"""The ``curvlab`` command line.

    curvlab bench --quick                 # side-by-side optimizer comparison, HTML report
    curvlab bench --compare old/results.json new/results.json
    curvlab diagnose                      # the built-in digits MLP, trained briefly
    curvlab diagnose my_model.py:make     # any model: make() -> (model, loss_fn, data)
    curvlab diagnose --lr 0.1 --precision --out my-report

Progress and tables use ``rich`` when it is installed (``pip install curvlab[cli]``) and
fall back to plain text otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "load_factory"]


class CLIError(Exception):
    """A user-facing error: printed as one line without a traceback, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (a :class:`CLIError`) instead of the usage
    text plus a line."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


def _number(kind: type, low: float, *, inclusive: bool = True) -> Callable:
    """An argparse ``type``: a finite ``kind`` >= ``low`` (> ``low`` if not inclusive)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (
                not inclusive and value == low):
            bound = f"{'>=' if inclusive else '>'} {low:g}"
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a finite number'} {bound}, got "
                f"{text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _brief(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _where(err: BaseException, path: Path) -> str:
    """`` at FILE:LINE``, the innermost frame of ``err`` in the user's file ``path``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if Path(f.filename).resolve() == path.resolve()]
    return f" at {path}:{frames[-1].lineno}" if frames else ""


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
    except SyntaxError as err:
        raise CLIError(f"{path}:{err.lineno}: syntax error ({err.msg}); fix the file") from err
    except SystemExit as err:
        raise CLIError(f"importing {path} called sys.exit({err.code!r}); put script code under "
                       "if __name__ == '__main__':") from err
    except Exception as err:
        raise CLIError(f"importing {path} raised {_brief(err)}{_where(err, path)}; fix the "
                       "file (pass -v for the traceback)") from err
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

            console = Console()
            if not console.is_terminal:  # files and pipes: wide enough for the tables
                console = Console(width=140)
            self.rich: Any = console
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

    def table(self, title: str, rows: list[tuple[str, ...]],
              headers: tuple[str, ...] = ("metric", "value", "meaning")) -> None:
        if self.rich is not None:
            from rich.table import Table

            table = Table(title=title)
            for i, h in enumerate(headers):
                table.add_column(h, style="bold" if i == 0 else None,
                                 justify="left" if i == 0 or h == "meaning" else "right")
            for row in rows:
                table.add_row(*row)
            self.rich.print(table)
            return
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _diagnose(args: argparse.Namespace, console: _Console) -> int:
    from curvlab.diagnostics.report import ReportOptions, curvature_report, write_report

    try:
        quick = dict(trace_samples=12, bottom_max_iter=20, layer_max_iter=10,
                     density_probes=2, density_steps=15) if args.quick else {}
        options = ReportOptions(**{"k": 2 if args.quick else 5, "trace_samples": 30, **quick,
                                   **{k: v for k, v in (("k", args.k),
                                                        ("trace_samples", args.trace_samples))
                                      if v is not None}},
                                lr=args.lr, momentum=args.momentum, precision=args.precision,
                                seed=args.seed)
    except ValueError as err:
        raise CLIError(f"invalid option: {err} (see curvlab diagnose --help)") from err
    out = Path(args.out)
    _check_out(out)
    source = args.target or "built-in digits MLP (64-128-128-10, 50 SGD steps)"
    start = time.perf_counter()
    with console.status(f"building {source}"):
        factory = load_factory(args.target) if args.target else _built_in
        model, loss_fn, data = _call_factory(factory, args.target)
        _check_inputs(model, loss_fn, data)
    _make_out(out)
    with _stage_progress(console) as on_stage:
        report = curvature_report(model, loss_fn, data, options=options, on_stage=on_stage)
    try:
        path = write_report(report, out, title=f"curvlab diagnose: {source}")
    except OSError as err:
        raise CLIError(f"cannot write the report to --out {out} ({err.strerror or err}); "
                       "pass a folder you can write to") from err
    elapsed = time.perf_counter() - start
    _print_report(console, report.numbers, source, elapsed)
    console.print(f"report: {path}   numbers: {out / 'report.json'}")
    return 0


def _check_out(out: Path, flag: str = "--out") -> None:
    """Fail early (before any work, creating nothing) on an output folder that is a file or
    cannot be created: a probe file in the nearest existing ancestor must be writable
    (root passes every permission check, but not a read-only file system)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out} is a file; pass a folder (created if missing)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {out} cannot be created: {parent} is a file; pass a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {out} is not writable ({parent}: {err.strerror or err}); pass "
                       "a folder you can write to") from err


def _make_out(out: Path, flag: str = "--out") -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"{flag} {out} is not writable ({err.strerror or err}); pass a folder "
                       "you can write to") from err


def _call_factory(factory: Callable[[], Any], spec: str | None) -> tuple[Any, Any, Any]:
    """``factory()`` checked to be ``(model, loss_fn, data)``; any failure is a CLIError."""
    name = spec or "the built-in problem"
    try:
        made = factory()
    except SystemExit as err:
        raise CLIError(f"{name} called sys.exit({err.code!r}) instead of returning (model, "
                       "loss_fn, data)") from err
    except Exception as err:
        where = _where(err, Path(spec.rsplit(":", 1)[0])) if spec else ""
        raise CLIError(f"{name} raised {_brief(err)}{where}; fix the factory (pass -v for "
                       "the traceback)") from err
    if not (isinstance(made, (tuple, list)) and len(made) == 3):
        raise CLIError("the factory must return (model, loss_fn, data); got "
                       f"{type(made).__name__}")
    model, loss_fn, data = made
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"the factory's model must be an nn.Module, got {type(model).__name__}")
    return model, loss_fn, data


def _non_finite(data: Any, path: str = "data") -> tuple[str, int] | None:
    """The first tensor in ``data`` (tuples, lists, dicts) with NaN/inf, and how many."""
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex():
            bad = int((~torch.isfinite(data)).sum())
            return (path, bad) if bad else None
        return None
    items = (data.items() if isinstance(data, Mapping) else
             enumerate(data) if isinstance(data, (tuple, list)) else ())
    for k, v in items:
        found = _non_finite(v, f"{path}[{k!r}]")
        if found:
            return found
    return None


def _check_inputs(model: torch.nn.Module, loss_fn: Any, data: Any) -> None:
    """The user's model, loss and data, checked before any curvature work: trainable
    parameters, a callable loss, finite data, and one full-data loss + gradient that
    runs and is finite (shape mismatches surface here)."""
    from curvlab.objective import Objective

    if not any(p.requires_grad for p in model.parameters()):
        raise CLIError("the model has no trainable parameters (none with requires_grad=True);"
                       " return a model with parameters to diagnose")
    if loss_fn is not None and not callable(loss_fn):
        raise CLIError(f"the factory's loss_fn must be callable, e.g. nn.CrossEntropyLoss(), "
                       f"got {type(loss_fn).__name__} {loss_fn!r:.40}")
    bad = _non_finite(data)
    if bad:
        raise CLIError(f"the data contain {bad[1]} NaN/inf value(s) in {bad[0]}; clean them "
                       "(e.g. torch.nan_to_num) or drop those samples")
    try:
        obj = Objective(model, loss_fn, data)
    except (TypeError, ValueError) as err:
        raise CLIError(f"the factory's (model, loss_fn, data) are not usable: {err}") from err
    try:
        loss, grads = obj.loss_and_grad()
    except Exception as err:
        raise CLIError(f"evaluating loss_fn(model(inputs), targets) on the data raised "
                       f"{_brief(err)}; make the data match the model's input and the loss's "
                       "target (pass -v for the traceback)") from err
    if not math.isfinite(float(loss)):
        raise CLIError(f"the loss at the model's parameters is {float(loss)}; diagnose needs "
                       "a finite loss (check the model's initialization and the data)")
    if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
        raise CLIError("the gradient at the model's parameters is not finite; diagnose needs "
                       "finite gradients (check the model's initialization and the data)")


@contextlib.contextmanager
def _stage_progress(console: _Console) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar over the report's stages (plain lines without rich)."""
    if console.rich is None:
        def plain(name: str, i: int, n: int) -> None:
            if name != "done":
                print(f"[{i + 1}/{n}] {name}", flush=True)
        yield plain
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console.rich, transient=False) as progress:
        task = progress.add_task("diagnose", total=None)

        def update(name: str, i: int, n: int) -> None:
            progress.update(task, description=name, completed=i, total=n)
        yield update


def _mode_meaning(n: dict[str, Any]) -> str:
    """What the report's mode means for the model's train/eval-dependent layers."""
    kinds = ", ".join(n["mode_dependent_layers"])
    if n["mode"] == "train":
        return f"{kinds}: batch statistics, Dropout on"
    note = " (the model came in train mode; curvlab evaluates in eval mode)" if n.get(
        "model_in_train_mode") else ""
    return f"{kinds}: running statistics, Dropout off{note}"


def _print_report(console: _Console, n: dict[str, Any], source: str, elapsed: float) -> None:
    def g(x: Any, spec: str = ".4g") -> str:
        return "-" if x is None else (format(x, spec) if isinstance(x, float) else str(x))

    tr, bot = n["trace"], n["bottom_eigenvalue"]
    top = n["top_eigenvalues"]
    rows = [
        ("parameters", f"{n['num_params']:,}", "number of trainable parameters"),
        ("samples", f"{n['num_samples']:,}", "inputs in the data (sequences, images, ...)"),
        ("loss terms", g(n.get("num_loss_terms"), ",.0f"),
         "what the mean loss averages over (valid targets / tokens)"
         if n.get("reduction") != "sum" else
         "none: the loss sums over the samples, so lambda_max is the full-data sum's (a "
         "batch of B samples has ~B / N of it)"),
        *([("mode", n["mode"], _mode_meaning(n))] if n.get("mode_dependent_layers") else []),
        ("loss", f"{n['loss']:.6g}", "full-data loss"),
        ("gradient norm", f"{n['grad_norm']:.4g}", "||grad L||_2 on the full data"),
        ("lambda_max", f"{n['lambda_max']:.6g}", "largest Hessian eigenvalue (sharpness)"),
        (f"top {len(top['values'])} eigenvalues", ", ".join(f"{v:.4g}" for v in top["values"]),
         f"Lanczos, relative residual <= {top['tol']:g}"),
        ("bottom eigenvalue", f"{bot['value']:.4g}",
         f"smallest Hessian eigenvalue: {bot['classification']}"),
        ("trace estimate", f"{tr['estimate']:.6g} ± {tr['stderr']:.3g}",
         f"Hutch++, {tr['num_hvps']} HVPs (± one standard error)"),
        ("max stable SGD lr", f"{2 / n['lambda_max']:.4g}" if n["lambda_max"] > 0 else "inf",
         "2 / lambda_max (gradient descent)"),
    ]
    q = n.get("quadratic_fit")
    if q:
        i = q["step_multiples"].index(1.0)
        rows.append(("rho at lr = 1/lambda_max", g(q["rho"][i]),
                     "actual / quadratic-model loss change along -grad"))
        coarse = q.get("dtype") in ("bfloat16", "float16")
        rows.append(("Taylor error slopes", f"{g(q['slope_first'], '.2f')} / "
                     f"{g(q['slope_second'], '.2f')}",
                     "log-log slopes of 1st / 2nd-order errors (smooth: 2 / 3"
                     + (f"; {q['dtype']} roundoff flattens them)" if coarse else ")")))
    rows += [
        ("Hessian-vector products", f"{n['num_hvps']}", "work spent on curvature"),
        ("time", f"{elapsed:.1f} s", "wall clock, including building the model"),
    ]
    console.table(f"curvlab diagnose: {source}", rows)
    console.table(f"stability (lr = {g(n['lr'])})", [
        (r["optimizer"], g(r["threshold"]), g(r["max_stable_lr"]), g(r["lr_sharpness"]),
         "-" if r["stable"] is None else ("yes" if r["stable"] else "NO"))
        for r in n["stability"]],
        headers=("optimizer", "threshold", "max stable lr", "lr x lambda_max", "stable"))
    p = n.get("precision")
    if p:
        console.table("precision vs float64 (" + ", ".join(
            f"{k}={v}" for k, v in p["matmul_precision"].items()) + ")", [
            (d, g(v["loss_error"], ".2e"), g(v["grad_error"], ".2e"), g(v["worst_layer"]),
             ", ".join(v["flagged"]) or "none") for d, v in p["dtypes"].items()],
            headers=("dtype", "loss error", "grad error", "worst layer", "flagged layers"))


def _bench(args: argparse.Namespace, console: _Console) -> int:
    from curvlab.bench.compare import compare_results
    from curvlab.bench.report import (
        SUITE_TITLES,
        TERMINAL_COLUMNS,
        format_cell,
        summarize,
        write_report,
    )
    from curvlab.bench.runner import OutDirBusy, lock_out_dir
    from curvlab.bench.suites import SuiteOptions, build_tasks

    if args.compare:
        old, new = args.compare
        try:
            rows = compare_results(old, new)
        except (OSError, ValueError) as err:  # missing / unreadable / not results
            raise CLIError(f"--compare: {err}") from err
        if not rows:
            console.print("nothing in common to compare")
            return 0
        console.table(f"{new} vs {old}", [
            (r["suite"], r["row"], r["metric"], format_cell(r["old"]), format_cell(r["new"]),
             f"{r['ratio']:.2f}x", r["verdict"]) for r in rows],
            headers=("suite", "run", "metric", "old", "new", "new/old", "verdict"))
        return 0
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {args.device!r} is not a torch device; use cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but torch.cuda.is_available() is False")
    out = Path(args.out)
    _check_out(out)
    with contextlib.ExitStack() as held:  # the lock is held until the report is written
        try:
            held.enter_context(lock_out_dir(out))
        except OutDirBusy as err:
            raise CLIError(str(err)) from err
        except OSError as err:
            raise CLIError(f"--out {out} is not writable ({err.strerror or err}); pass a "
                           "folder you can write to") from err
        opts = SuiteOptions(quick=args.quick, seeds=args.seeds or (2 if args.quick else 3),
                            device=args.device,
                            time_budget=args.time_budget or (20.0 if args.quick else 60.0))
        tasks, notices = build_tasks(args.suite, opts)
        for note in notices:
            console.print(f"[yellow]skipped:[/yellow] {note}" if console.rich
                          else f"skipped: {note}")
        try:
            records = _run_with_progress(tasks, out, args.resume, args.overwrite, args.device,
                                         console)
        except KeyboardInterrupt:
            console.print(f"interrupted: the finished runs are in {out / 'results.jsonl'}; "
                          "continue them with --resume")
            return 130
        summary = summarize(records)
        for suite, rows in summary.items():
            cols = TERMINAL_COLUMNS[suite]
            console.table(SUITE_TITLES[suite], [tuple(format_cell(r.get(k)) for k, _ in cols)
                                                for r in rows],
                          headers=tuple(t for _, t in cols))
        try:
            path = write_report(records, out)
            console.print(f"report: {path}   results: {out / 'results.json'}")
        except ImportError:
            console.print(f"results: {out / 'results.json'} (install matplotlib for "
                          "report.html)")
    return 0


def _run_with_progress(tasks: list, out: Path, resume: bool, overwrite: bool, device: str,
                       console: _Console) -> list[dict]:
    from curvlab.bench.runner import run_tasks

    kw = dict(resume=resume, overwrite=overwrite, device=device)
    if console.rich is None:
        def start(task, i, n):
            print(f"[{i + 1}/{n}] {task.key}", flush=True)
        return run_tasks(tasks, out, on_start=start, **kw)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console.rich, transient=False) as progress:
        overall = progress.add_task("all runs", total=len(tasks))
        current = progress.add_task("", total=1.0)

        def start(task, i, n):
            progress.update(overall, total=n)
            progress.update(current, description=f"{task.problem} {task.method} "
                            f"seed={task.seed} {task.config.get('lr', '')}", completed=0)

        def step(task, frac):
            progress.update(current, completed=frac)

        def done(task, record):
            progress.advance(overall)
            progress.update(current, completed=1.0)

        return run_tasks(tasks, out, on_start=start, on_progress=step, on_done=done, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="curvlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="side-by-side optimizer comparisons with a report")
    bench.add_argument("--suite", default="all", choices=("classical", "nn", "curvature", "all"))
    bench.add_argument("--quick", action="store_true", help="small grids and budgets")
    bench.add_argument("--seeds", type=_number(int, 1), default=None,
                       help="seeds per configuration (>= 1)")
    bench.add_argument("--device", default="cpu",
                       help="cpu or cuda: where the nn suite trains (the classical suite runs "
                            "float64 on the CPU, like its scipy peers)")
    bench.add_argument("--out", default="curvlab-bench", help="output folder")
    bench.add_argument("--time-budget", type=_number(float, 0, inclusive=False), default=None,
                       help="seconds of training per NN run (> 0)")
    again = bench.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="skip runs already recorded in OUT/results.jsonl (invalid lines "
                       "are moved to OUT/results.jsonl.invalid-*)")
    again.add_argument("--overwrite", action="store_true",
                       help="discard earlier results in OUT (by default they are moved to "
                       "OUT/earlier-<time>/)")
    bench.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                       help="compare two results.json files instead of running")
    diag = sub.add_parser("diagnose", help="curvature diagnostics of a model at its "
                          "current parameters")
    diag.add_argument("target", nargs="?", help="FILE.py:FACTORY returning (model, loss_fn, "
                      "data); default: the built-in digits MLP")
    diag.add_argument("--out", default="curvlab-report", help="report folder "
                      "(report.json, index.html, plots)")
    diag.add_argument("--seed", type=_number(int, 0), default=0,
                      help="seed of the random probe vectors (>= 0)")
    diag.add_argument("--trace-samples", type=int, default=None,
                      help="Hessian-vector products for the Hutch++ trace estimate (>= 6; "
                      "default 30)")
    diag.add_argument("--k", type=int, default=None, help="number of top eigenvalues "
                      "(default 5)")
    diag.add_argument("--quick", action="store_true", help="small budgets (k=2, 12 trace "
                      "HVPs, 2 density probes of 15 steps): a rough report in a few seconds")
    diag.add_argument("--lr", type=float, default=None,
                      help="learning rate to check against the stability thresholds")
    diag.add_argument("--momentum", type=float, default=0.9,
                      help="momentum / beta1 for the stability thresholds")
    diag.add_argument("--precision", action="store_true",
                      help="add a bfloat16/float32 vs float64 precision section")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for every error the user can fix,
    printed as one line: the problem and the fix)."""
    console = _Console()
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s")
        if args.command == "diagnose":
            return _diagnose(args, console)
        if args.command == "bench":
            return _bench(args, console)
    except CLIError as err:
        if verbose and err.__cause__ is not None:
            traceback.print_exception(err.__cause__)
        _error(console, str(err))
        return 2
    except OSError as err:  # the file system refused (disk full, permissions, ...)
        if verbose:
            traceback.print_exception(err)
        _error(console, f"{err}; check the path and free space, then run again")
        return 2
    return 1


def _error(console: _Console, message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the message held
    if console.rich is not None:
        from rich.markup import escape

        console.rich.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    else:
        print(f"error: {message}")


if __name__ == "__main__":
    sys.exit(main())
