"""The curvature report behind ``curvlab diagnose``: every diagnostic of a model at its
current parameters, computed in stages on one Hessian operator, and written as a folder.

Stages (and their cost in Hessian-vector products, HVPs, on the full data):

* ``gradient`` -- loss and gradient (one forward + backward per batch).
* ``top eigenvalues`` -- the top ``k`` by Lanczos to relative residual ``tol``
  (:func:`~curvlab.diagnostics.top_eigenvalues`; typically ``2k``-``4k`` HVPs, then a
  deflated run that looks for missed copies of repeated eigenvalues).
* ``bottom eigenvalue`` -- the smallest, with the minimum / saddle / flat classification
  (:func:`~curvlab.diagnostics.bottom_eigenvalues`; at most ``bottom_max_iter`` HVPs).
* ``trace`` -- Hutch++ with ``trace_samples`` HVPs and its standard error (Meyer et al.,
  "Hutch++", SOSA 2021).
* ``layer sharpness`` -- lambda_max of each module's diagonal Hessian block (one Lanczos
  per module, at most ``layer_max_iter`` HVPs each).
* ``spectral density`` -- stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIMAX 2017)
  with the top ``deflate`` eigenvalues deflated (``density_probes * density_steps`` HVPs
  plus the deflation's Lanczos).
* ``quadratic fit`` -- rho and the Taylor errors along ``-grad`` at steps ``c /
  lambda_max`` (:func:`~curvlab.diagnostics.quadratic_model_fit`: one gradient, one HVP,
  one forward per step).
* ``precision`` (optional) -- :func:`~curvlab.diagnostics.precision_check` on the first
  batch (at most ``precision_samples`` samples): one forward + backward per dtype plus
  one in float64.

The stability table compares ``lr x lambda_max`` with the thresholds of
:func:`~curvlab.diagnostics.stability_threshold` (gradient descent 2; heavy ball
``2 (1 + mu)``; Nesterov ``2 (1 + mu) / (1 + 2 mu)``; Adam's ``2 (1 + b1) / (1 - b1)``,
which applies to the *preconditioned* sharpness and is listed for reference). For a loss
that sums over its samples (``reduction="sum"``) ``lambda_max`` is that of the full-data
sum, ~``N / B`` times a ``B``-sample batch's: the report says so.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlab.diagnostics.precision import precision_check
from curvlab.diagnostics.quadratic_fit import quadratic_model_fit
from curvlab.diagnostics.spectrum import (
    bottom_eigenvalues,
    layer_sharpness,
    spectral_density,
    top_eigenvalues,
    trace,
)
from curvlab.diagnostics.stability import stability_threshold
from curvlab.diagnostics.summary import CurvatureSummary
from curvlab.linops import HessianOperator

__all__ = ["ReportOptions", "CurvatureReport", "curvature_report", "write_report",
           "stability_table", "REPORT_STAGES"]

REPORT_STAGES = ("gradient", "top eigenvalues", "bottom eigenvalue", "trace",
                 "layer sharpness", "spectral density", "quadratic fit", "precision")

FIT_MULTIPLES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 2.0)


@dataclass
class ReportOptions:
    """Budgets of :func:`curvature_report` (defaults: about 250 HVPs on a 26k-parameter MLP)."""

    k: int = 5
    tol: float = 1e-3
    trace_samples: int = 30
    bottom_tol: float = 1e-3
    bottom_max_iter: int = 80
    layer_tol: float = 1e-2
    layer_max_iter: int = 40
    density_probes: int = 4
    density_steps: int = 30
    deflate: int | None = None  # default: k
    lr: float | None = None
    momentum: float = 0.9
    precision: bool = False
    precision_samples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "trace_samples", "bottom_max_iter", "layer_max_iter",
                     "density_probes", "density_steps", "precision_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.trace_samples < 6:
            raise ValueError(f"trace_samples must be >= 6 for Hutch++, got {self.trace_samples}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")


@dataclass
class CurvatureReport:
    """``numbers``: everything as plain JSON-ready values; ``results``: the result objects
    (for plots); ``summary``: the scalar :class:`CurvatureSummary`."""

    numbers: dict[str, Any]
    summary: CurvatureSummary
    results: dict[str, Any] = field(default_factory=dict, repr=False)


def stability_table(lambda_max: float, lr: float | None = None, momentum: float = 0.9
                    ) -> list[dict[str, Any]]:
    """Rows ``{optimizer, threshold, max_stable_lr, lr_sharpness, stable, note}``: the step
    is stable on the local quadratic model iff ``lr x lambda_max < threshold``."""
    rows = []
    for name, c, note in (
        ("gradient descent", stability_threshold(), ""),
        (f"SGD momentum={momentum:g}", stability_threshold(momentum=momentum), ""),
        (f"SGD Nesterov momentum={momentum:g}",
         stability_threshold(momentum=momentum, nesterov=True), ""),
        (f"Adam beta1={momentum:g}", stability_threshold(momentum=momentum, ema_momentum=True),
         "applies to lr x lambda_max(P^-1 H) (preconditioned sharpness, needs the "
         "optimizer's second moments), not to lr x lambda_max"),
    ):
        adam = name.startswith("Adam")
        row: dict[str, Any] = {"optimizer": name, "threshold": c, "note": note,
                               "max_stable_lr": None if adam or lambda_max <= 0
                               else c / lambda_max,
                               "lr_sharpness": None, "stable": None}
        if lr is not None and not adam:
            row["lr_sharpness"] = lr * lambda_max
            row["stable"] = bool(lr * lambda_max < c)
        rows.append(row)
    return rows


def _first_batch(obj: Any, limit: int) -> Any:
    """The data's first batch as given (a pair or a dict), cut to ``limit`` rows."""
    batch = next(iter(obj.data))

    def cut(t: Any) -> Any:
        return t[:limit] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return tuple(cut(t) for t in batch)


def curvature_report(model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                     options: ReportOptions | None = None,
                     on_stage: Callable[[str, int, int], None] | None = None
                     ) -> CurvatureReport:
    """Run every stage of the report (module docstring) on one Hessian operator.

    ``on_stage(name, index, total)`` is called before each stage and once more with
    ``("done", total, total)``, for progress bars. Per-stage HVP counts and seconds are in
    ``numbers["cost"]``.
    """
    opts = options or ReportOptions()
    stages = [s for s in REPORT_STAGES if s != "precision" or opts.precision]
    op = HessianOperator(model, loss_fn, data, params)
    obj = op.objective
    gen = torch.Generator().manual_seed(opts.seed)
    numbers: dict[str, Any] = {"cost": {}}
    results: dict[str, Any] = {}
    state: dict[str, Any] = {}

    def run(stage: str) -> None:
        if stage == "gradient":
            loss, grads = obj.loss_and_grad()
            g = obj.flatten(grads).detach()
            state["grad"] = g
            numbers.update(num_params=obj.num_params, num_samples=obj.num_samples,
                           num_loss_terms=obj.num_loss_terms if obj.reduction == "mean" else None,
                           reduction=obj.reduction,
                           loss=float(loss), grad_norm=float(g.norm()),
                           mode="train" if obj.train else "eval",
                           model_in_train_mode=bool(getattr(model, "training", False)),
                           mode_dependent_layers=_mode_dependent_layers(model))
        elif stage == "top eigenvalues":
            k = min(opts.k, obj.num_params)  # a tiny model has fewer eigenvalues than k
            top = top_eigenvalues(op, k, tol=opts.tol, generator=gen)
            results["top"] = top
            numbers["top_eigenvalues"] = {
                "values": top.eigenvalues.tolist(), "residuals": top.residuals.tolist(),
                "converged": top.converged, "tol": opts.tol}
            lam = float(top.eigenvalues[0])
            numbers["lambda_max"] = lam
            numbers["stability"] = stability_table(lam, opts.lr, opts.momentum)
            numbers["lr"] = opts.lr
        elif stage == "bottom eigenvalue":
            bot = bottom_eigenvalues(op, 1, tol=opts.bottom_tol, max_iter=opts.bottom_max_iter,
                                     generator=gen)
            results["bottom"] = bot
            numbers["bottom_eigenvalue"] = {
                "value": float(bot.eigenvalues[0]), "residual": float(bot.residuals[0]),
                "converged": bot.converged, "classification": bot.classification}
        elif stage == "trace":
            est = trace(op, opts.trace_samples, method="hutch++", generator=gen)
            results["trace"] = est
            lo, hi = est.confidence_interval(0.95)
            numbers["trace"] = {"estimate": est.estimate, "stderr": est.stderr,
                                "ci95": [lo, hi], "num_hvps": est.num_matvecs,
                                "method": est.method}
        elif stage == "layer sharpness":
            layers = layer_sharpness(op, tol=opts.layer_tol, max_iter=opts.layer_max_iter,
                                     generator=gen)
            results["layers"] = layers
            numbers["layer_sharpness"] = {
                name: {"lambda_max": v, "size": layers.sizes[name],
                       "converged": layers.converged.get(name)}
                for name, v in layers.lambda_max.items()}
        elif stage == "spectral density":
            deflate = min(opts.k if opts.deflate is None else opts.deflate, obj.num_params - 1)
            dens = spectral_density(op, num_probes=opts.density_probes,
                                    num_steps=opts.density_steps, deflate=deflate,
                                    num_points=400, generator=gen)
            results["density"] = dens
            numbers["spectral_density"] = {
                "num_probes": dens.num_probes, "num_steps": opts.density_steps,
                "deflated": dens.deflated.tolist(), "sigma": dens.sigma,
                "moment1": dens.moment(1), "moment2": dens.moment(2),
                "grid": dens.grid[::4].tolist(), "density": dens.density[::4].tolist()}
        elif stage == "quadratic fit":
            lam = numbers["lambda_max"]
            scale = 1.0 / lam if lam > 0 else 1.0 / max(numbers["grad_norm"], 1e-12)
            fit = quadratic_model_fit(model, loss_fn, data, direction=-state["grad"],
                                      step_sizes=[c * scale for c in FIT_MULTIPLES],
                                      params=params)
            results["quadratic_fit"] = fit
            numbers["quadratic_fit"] = {"direction": "-grad", "step_multiples": list(
                FIT_MULTIPLES), "step_unit": "1 / lambda_max", "dtype": str(obj.dtype).replace(
                "torch.", ""), **fit.as_dict()}
        elif stage == "precision":
            rep = precision_check(model, loss_fn, _first_batch(obj, opts.precision_samples))
            results["precision"] = rep
            numbers["precision"] = rep.as_dict()

    for i, stage in enumerate(stages):
        if on_stage is not None:
            on_stage(stage, i, len(stages))
        hvps, start = op.num_matvecs, time.perf_counter()
        run(stage)
        numbers["cost"][stage] = {"hvps": op.num_matvecs - hvps + (stage == "quadratic fit"),
                                  "seconds": time.perf_counter() - start}
    if on_stage is not None:
        on_stage("done", len(stages), len(stages))
    numbers["num_hvps"] = sum(c["hvps"] for c in numbers["cost"].values())
    lam, tr = numbers["lambda_max"], numbers["trace"]
    summary = CurvatureSummary(
        num_params=numbers["num_params"], num_samples=numbers["num_samples"],
        loss=numbers["loss"], grad_norm=numbers["grad_norm"], lambda_max=lam,
        trace=tr["estimate"], trace_stderr=tr["stderr"], trace_samples=tr["num_hvps"],
        max_stable_lr=2.0 / lam if lam > 0 else math.inf, num_hvps=numbers["num_hvps"])
    numbers["summary"] = asdict(summary)
    return CurvatureReport(numbers=numbers, summary=summary, results=results)


def _mode_dependent_layers(model: Any) -> list[str]:
    """The kinds of layers that compute differently in train and eval mode (BatchNorm and
    the like, Dropout with p > 0), sorted; the report states the mode it used for them."""
    if not isinstance(model, torch.nn.Module):
        return []
    kinds = {type(m).__name__ for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase)
             or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)}
    return sorted(kinds)


# ---- writing --------------------------------------------------------------------------

def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path | None) -> str:
    if path is None:
        return "<p><em>(plot not available: matplotlib is not installed)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _plots(report: CurvatureReport, out: Path) -> dict[str, Path | None]:
    try:
        from curvlab.diagnostics.plots import (
            plot_eigenvalues,
            plot_layer_sharpness,
            plot_spectral_density,
        )
    except ImportError:  # pragma: no cover - plots.py imports matplotlib lazily
        return {}
    r = report.results
    paths: dict[str, Path | None] = {}
    try:
        if "top" in r:
            paths["top"] = Path(plot_eigenvalues(r["top"], out / "top_eigenvalues.png"))
        if "density" in r:
            paths["density"] = Path(plot_spectral_density(r["density"],
                                                          out / "spectral_density.png"))
        if "layers" in r:
            paths["layers"] = Path(plot_layer_sharpness(r["layers"],
                                                        out / "layer_sharpness.png"))
    except ImportError:
        return {}
    return paths


def write_report(report: CurvatureReport, out: str | os.PathLike, *, title: str = "curvlab "
                 "diagnose") -> Path:
    """Write ``report.json`` (all numbers), the PNG plots and a self-contained
    ``index.html`` (plots embedded) into the folder ``out``; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = report.numbers
    (out / "report.json").write_text(json.dumps(_clean(n), indent=1))
    plots = _plots(report, out)
    s = report.summary
    parts = [f"<h1>{html.escape(title)}</h1>",
             _table(["metric", "value"], [
                 ["parameters", f"{s.num_params:,}"], ["samples", f"{s.num_samples:,}"],
                 *([["mode", f"{n['mode']} ({', '.join(n['mode_dependent_layers'])})"]]
                   if n.get("mode_dependent_layers") else []),
                 ["loss", s.loss], ["gradient norm", s.grad_norm],
                 ["lambda_max", s.lambda_max],
                 ["trace (Hutch++)", f"{s.trace:.6g} ± {s.trace_stderr:.3g}"],
                 ["2 / lambda_max", s.max_stable_lr],
                 ["Hessian-vector products", s.num_hvps]])]
    top = n.get("top_eigenvalues")
    if top:
        parts += ["<h2>Top eigenvalues</h2>",
                  _table(["#", "eigenvalue", "residual"],
                         [[i + 1, v, r] for i, (v, r) in enumerate(zip(top["values"],
                                                                      top["residuals"]))]),
                  _img(plots.get("top"))]
    bot = n.get("bottom_eigenvalue")
    if bot:
        parts += ["<h2>Bottom eigenvalue</h2>",
                  _table(["eigenvalue", "residual", "converged", "point"],
                         [[bot["value"], bot["residual"], bot["converged"],
                           bot["classification"]]])]
    if "trace" in n:
        t = n["trace"]
        parts += ["<h2>Trace</h2>", _table(["estimate", "std. error", "95% interval", "HVPs"],
                                           [[t["estimate"], t["stderr"],
                                             f"[{t['ci95'][0]:.4g}, {t['ci95'][1]:.4g}]",
                                             t["num_hvps"]]])]
    if "stability" in n:
        parts += ["<h2>Stability</h2>",
                  f"<p>lr = {_fmt(n.get('lr'))}; stable on the quadratic model iff "
                  "lr x lambda_max &lt; threshold.</p>",
                  *([f"<p>The loss sums over its {n.get('num_samples')} samples: lambda_max "
                     "is that of a full-batch step on this sum; a training batch of B samples "
                     "sums about B / N of this curvature (scale lambda_max and the max "
                     "stable lr accordingly).</p>"] if n.get("reduction") == "sum" else []),
                  _table(["optimizer", "threshold", "max stable lr", "lr x lambda_max",
                          "stable", "note"],
                         [[r["optimizer"], r["threshold"], r["max_stable_lr"],
                           r["lr_sharpness"], r["stable"], r["note"]]
                          for r in n["stability"]])]
    if "layer_sharpness" in n:
        parts += ["<h2>Per-layer sharpness</h2>",
                  _table(["module", "lambda_max of its block", "parameters", "converged"],
                         [[k, v["lambda_max"], v["size"], v["converged"]]
                          for k, v in n["layer_sharpness"].items()]),
                  _img(plots.get("layers"))]
    if "spectral_density" in n:
        parts += ["<h2>Spectral density</h2>", _img(plots.get("density"))]
    if "quadratic_fit" in n:
        q = n["quadratic_fit"]
        parts += ["<h2>Quadratic model fit along -grad</h2>",
                  f"<p>log-log slopes of the Taylor errors: first order "
                  f"{_fmt(q['slope_first'], '.2f')} (expect 2), second order "
                  f"{_fmt(q['slope_second'], '.2f')} (expect 3 where the loss is smooth; "
                  f"in {q['dtype']} the loss changes of the smallest steps approach its "
                  "roundoff, which flattens the slopes there, and at the largest steps "
                  "higher-order terms take over).</p>",
                  _table(["step x lambda_max", "actual change", "2nd-order model", "rho",
                          "|error| 1st", "|error| 2nd"],
                         [[c, a, p, r, e1, e2] for c, a, p, r, e1, e2 in zip(
                             q["step_multiples"], q["actual"], q["predicted_second"], q["rho"],
                             q["error_first"], q["error_second"])])]
    if "precision" in n:
        p = n["precision"]
        parts += ["<h2>Numerical precision (vs float64)</h2>",
                  _table(["dtype", "loss error", "gradient error", "worst layer", "flagged"],
                         [[d, v["loss_error"], v["grad_error"], v["worst_layer"],
                           ", ".join(v["flagged"]) or "none"]
                          for d, v in p["dtypes"].items()]),
                  _table(["setting", "value"], [[k, v] for k, v in
                                                p["matmul_precision"].items()])]
    parts += ["<h2>Cost</h2>", _table(["stage", "HVPs", "seconds"],
                                      [[k, v["hvps"], v["seconds"]]
                                       for k, v in n["cost"].items()])]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:.2em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
