"""PNG plots of diagnostic results (matplotlib, imported lazily; no pyplot global state).

Each function takes a result object and a path, writes the figure and returns the path:

* :func:`plot_spectral_density` -- SLQ density (log scale), with exact eigenvalues marked.
* :func:`plot_eigenvalues` -- the top (or bottom) eigenvalues with their residual bars.
* :func:`plot_layer_sharpness` -- per-layer lambda_max as a bar chart.
* :func:`plot_monitor` -- training loss next to ``lr x sharpness`` with the stability
  threshold, the forecast and the monitor's warnings marked.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["plot_spectral_density", "plot_eigenvalues", "plot_layer_sharpness", "plot_monitor"]


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.0),
            sharex: bool = False):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plots need matplotlib: pip install 'curvlab[plot]'") from err
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex)
    return fig, axes


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_spectral_density(density: Any, path: str | os.PathLike, *, log_scale: bool = True,
                          eigenvalues: Any = None, title: str = "Hessian spectral density"
                          ) -> str:
    """Plot a :class:`~curvlab.linalg.SpectralDensity` (``grid``, ``density``); deflated
    or given exact ``eigenvalues`` are marked as ticks on the axis."""
    fig, ax = _figure()
    ax = ax[0, 0]
    grid = density.grid.detach().cpu().numpy()
    dens = density.density.detach().cpu().numpy()
    floor = max(float(dens.max()) * 1e-8, 1e-300)
    ax.plot(grid, dens.clip(min=floor) if log_scale else dens, lw=1.2)
    if log_scale:
        ax.set_yscale("log")
    marks = eigenvalues if eigenvalues is not None else getattr(density, "deflated", None)
    if marks is not None and len(marks):
        ax.plot([float(m) for m in marks], [floor if log_scale else 0.0] * len(marks), "|",
                color="C3", ms=12, label="exact eigenvalues")
        ax.legend()
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"{title} ({density.num_probes} probes, sigma={density.sigma:.2g})")
    return _save(fig, path)


def plot_eigenvalues(result: Any, path: str | os.PathLike, *,
                     title: str = "Top Hessian eigenvalues") -> str:
    """Plot the eigenvalues of an :class:`~curvlab.linalg.EigenResult` with +-residual
    bars (each eigenvalue is certified within its residual)."""
    fig, ax = _figure()
    ax = ax[0, 0]
    ev = result.eigenvalues.cpu().numpy()
    res = result.residuals.cpu().numpy()
    ax.errorbar(range(1, len(ev) + 1), ev, yerr=res, fmt="o", capsize=4)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"{title} ({result.num_matvecs} HVPs, converged={result.converged})")
    return _save(fig, path)


def plot_layer_sharpness(result: Any, path: str | os.PathLike, *,
                         title: str = "Per-layer sharpness") -> str:
    """Bar chart of per-layer lambda_max (a
    :class:`~curvlab.diagnostics.spectrum.LayerSharpness` or a dict name -> value)."""
    values = result.lambda_max if hasattr(result, "lambda_max") else dict(result)
    fig, ax = _figure(size=(max(6.4, 0.6 * len(values)), 4.0))
    ax = ax[0, 0]
    names = list(values)
    ax.bar(range(len(names)), [values[k] for k in names], color="C0")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right"
                  if len(names) > 6 else "center")
    ax.set_ylabel("lambda_max of the diagonal block")
    ax.set_title(title)
    return _save(fig, path)


def plot_monitor(monitor: Any, path: str | os.PathLike, *,
                 title: str = "Training loss and stability") -> str:
    """Two panels sharing the step axis: the training loss (log scale) and the stability
    ratio (``lr x sharpness``, or ``lr x`` the preconditioned sharpness) with its
    threshold. Checks in the runaway regime are shaded red, with the progress lost purple,
    at the edge of stability yellow, with the preconditioner not settled yet grey; warnings
    (``diverging``, ``progress_lost``, ``nonfinite``, ``check_failed``) are red lines with
    their forecast step (a dashed red line), information events grey (triangles for
    ``approaching``, crosses for ``crossed``, dotted lines for jumps)."""
    fig, axes = _figure(2, 1, size=(7.5, 6.0), sharex=True)
    ax_loss, ax_ratio = axes[0, 0], axes[1, 0]
    hist = monitor.history
    if "loss" in hist:
        ax_loss.plot([s for s, _ in hist["loss"]], [v for _, v in hist["loss"]], lw=1.0,
                     color="C0")
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(title)
    colors = {}
    for i, name in enumerate(("lr_sharpness", "lr_preconditioned_sharpness")):
        if name not in hist or name not in monitor.thresholds:
            continue
        colors[name] = f"C{i + 1}"
        ax_ratio.plot([s for s, _ in hist[name]], [v for _, v in hist[name]], "-", lw=1.2,
                      color=colors[name], label=name.replace("_", " "))
        if math.isfinite(monitor.thresholds[name]):
            ax_ratio.axhline(monitor.thresholds[name], ls="--", color=colors[name], lw=0.8)
    shade = {"runaway": "red", "progress_lost": "purple", "edge_of_stability": "gold",
             "unsettled": "0.6"}
    checks = [c for c in getattr(monitor, "checks", []) if "regime" in c]
    for prev, c in zip([None, *checks[:-1]], checks):
        if c["regime"] in shade:
            start = prev["step"] if prev is not None else c["step"] - 1
            ax_ratio.axvspan(start, c["step"], color=shade[c["regime"]], alpha=0.15, lw=0)
    for e in monitor.events:
        warning = getattr(e, "severity", "warning") != "info"
        if e.kind in ("approaching", "crossed") and math.isfinite(e.value):
            ax_ratio.plot([e.step], [e.value], "^" if e.kind == "approaching" else "x", ms=8,
                          color="0.4")
        for ax in (ax_loss, ax_ratio):
            ax.axvline(e.step, color="C3" if warning else "0.5", lw=1.0 if warning else 0.6,
                       ls="-" if warning else ":")
        if warning:
            ax_loss.annotate(e.kind, (e.step, 1.0), xycoords=("data", "axes fraction"),
                             fontsize=7, color="C3", rotation=90, va="top", ha="right")
            if e.predicted_step is not None and e.predicted_step > e.step:
                ax_loss.axvline(e.predicted_step, color="C3", lw=0.8, ls="--")
    ax_ratio.set_xlabel("step")
    ax_ratio.set_ylabel("lr x sharpness")
    if any(v > 0 for name in colors for _, v in hist[name]):
        ax_ratio.set_yscale("log")
    if colors:
        ax_ratio.legend(loc="lower right")
    return _save(fig, path)
