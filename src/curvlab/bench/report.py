"""Summaries of benchmark records, the terminal tables and the self-contained HTML report.

Every number shown (terminal or HTML) comes from :func:`summarize`, which derives it from
the run records alone: medians with [min, max] over seeds, for each method at its best
learning rate (chosen by median steps to target, then median final loss).
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from curvlab.bench.runner import write_atomic

__all__ = ["summarize", "write_report", "format_cell"]


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _span(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return (min(vals), max(vals)) if vals else (None, None)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def format_cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def _group(records: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def _nn_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (problem, method), runs in sorted(_group(records, "problem", "method").items()):
        for r in runs:
            r.setdefault("lr", r["config"].get("lr"))
        by_lr = _group(runs, "lr")

        def score(item: tuple[tuple, list[dict]]) -> tuple[float, float]:
            rs = item[1]
            steps = [r["metrics"].get("steps_to_target") for r in rs if r["status"] == "ok"]
            reached = [s for s in steps if s is not None]
            med_steps = statistics.median(reached) if len(reached) == len(rs) else math.inf
            final = _median(r["metrics"].get("final_loss") for r in rs if r["status"] == "ok")
            return (med_steps, final if final is not None else math.inf)

        (best_lr,), best = min(by_lr.items(), key=score)
        ok = [r for r in best if r["status"] == "ok"]
        m = [r["metrics"] for r in best]
        steps = [x.get("steps_to_target") for x in m]
        times = [x.get("time_to_target") for x in m]
        rows.append({
            "problem": problem, "method": method, "lr": best_lr,
            "seeds": len(best), "reached": sum(s is not None for s in steps),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "steps_to_target": _median(steps), "steps_range": _span(steps),
            "time_to_target": _median(times), "time_range": _span(times),
            "final_loss": _median(x.get("final_loss") for x in m),
            "final_range": _span(x.get("final_loss") for x in m),
            "step_time_ms": _scaled(_median(x.get("step_time") for x in m), 1e3),
            "ok_runs": len(ok),
        })
    for row in rows:  # ratios to AdamW on the same problem
        ref = next((r for r in rows if r["problem"] == row["problem"]
                    and r["method"] == "torch.AdamW"), None)
        for key in ("steps_to_target", "time_to_target", "step_time_ms"):
            base = ref and ref.get(key)
            row[f"{key}_vs_adamw"] = (row[key] / base) if (base and row[key] is not None) else None
    return rows


def _classical_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (method,), runs in sorted(_group(records, "method").items()):
        m = [r["metrics"] for r in runs if r["status"] == "ok"]
        solved = [x for x in m if x.get("solved")]
        evals = [x["evaluations"] for x in solved if x.get("evaluations")]
        geo = math.exp(statistics.fmean(math.log(e) for e in evals)) if evals else None
        rows.append({
            "method": method, "problems": len(runs), "solved": len(solved),
            "geomean_evaluations": geo,
            "total_time_ms": 1e3 * sum(x.get("time", 0.0) for x in m),
            "errors": sum(r["status"] != "ok" for r in runs),
        })
    return rows


def _curvature_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HVP-cost records hold every contender's median time (``metrics["times"]``, unit: one
    gradient = ``times["gradient"]``); eigensolver records hold time, HVPs and error."""
    flat = []
    for r in records:
        if r["status"] != "ok":
            continue
        times = r["metrics"].get("times")
        if times:
            unit = times["gradient"]
            flat += [{"problem": r["problem"], "method": name, "time": t, "x_gradient": t / unit}
                     for name, t in times.items() if not name.startswith("_")]
        else:
            flat.append({"problem": r["problem"], "method": r["method"], **r["metrics"]})
    rows = []
    for (problem, method), m in _group(flat, "problem", "method").items():
        rows.append({
            "problem": problem, "method": method,
            "time_ms": _scaled(_median(x.get("time") for x in m), 1e3),
            "x_gradient": _median(x.get("x_gradient") for x in m),
            "hvps": _median(x.get("hvps") for x in m),
            "rel_error": _median(x.get("rel_error") for x in m),
        })
    return rows


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-suite summary rows derived only from ``records``."""
    by_suite = _group(records, "suite")
    out: dict[str, list[dict[str, Any]]] = {}
    if ("nn",) in by_suite:
        out["nn"] = _nn_rows(by_suite[("nn",)])
    if ("classical",) in by_suite:
        out["classical"] = _classical_rows(by_suite[("classical",)])
    if ("curvature",) in by_suite:
        out["curvature"] = _curvature_rows(by_suite[("curvature",)])
    return out


TABLE_COLUMNS = {
    "nn": [("problem", "problem"), ("method", "method"), ("lr", "best lr"),
           ("reached", "seeds at target"), ("steps_to_target", "steps to target"),
           ("steps_to_target_vs_adamw", "steps / AdamW"), ("time_to_target", "time to target [s]"),
           ("time_to_target_vs_adamw", "time / AdamW"), ("final_loss", "final loss"),
           ("step_time_ms", "step [ms]"), ("step_time_ms_vs_adamw", "step / AdamW"),
           ("diverged", "diverged runs")],
    "classical": [("method", "method"), ("problems", "problems"), ("solved", "solved"),
                  ("geomean_evaluations", "geo-mean f+g evals"),
                  ("total_time_ms", "total time [ms]"), ("errors", "errors")],
    "curvature": [("problem", "problem"), ("method", "method"), ("time_ms", "time [ms]"),
                  ("x_gradient", "x gradient"), ("hvps", "HVPs"), ("rel_error", "rel. error")],
}

# The terminal shows fewer columns than the HTML report.
TERMINAL_COLUMNS = {
    "nn": [("problem", "problem"), ("method", "method"), ("lr", "lr"),
           ("steps_to_target", "steps"), ("steps_to_target_vs_adamw", "/AdamW"),
           ("time_to_target", "time [s]"), ("time_to_target_vs_adamw", "/AdamW"),
           ("final_loss", "final loss"), ("step_time_ms", "step ms"),
           ("diverged", "div.")],
    "classical": TABLE_COLUMNS["classical"],
    "curvature": TABLE_COLUMNS["curvature"],
}

SUITE_TITLES = {"nn": "Neural-network optimizers", "classical": "Classical solvers",
                "curvature": "Curvature primitives"}


# ---- plots ------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Centered moving average (no lag), shrinking the window at the ends."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - half):i + half + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _nn_plots(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = []
    for problem in sorted({r["problem"] for r in rows}):
        best = {r["method"]: r["lr"] for r in rows if r["problem"] == problem}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for i, (method, lr) in enumerate(sorted(best.items())):
            runs = [r for r in records if r["problem"] == problem and r["method"] == method
                    and r["config"].get("lr") == lr and r["series"].get("loss")]
            if not runs:
                continue
            color = f"C{i % 10}"
            for ax, xkey in zip(axes, ("step", "time")):
                n = min(len(r["series"]["loss"]) for r in runs)
                ys = np.array([r["series"]["loss"][:n] for r in runs], dtype=float)
                xs = np.array(runs[0]["series"][xkey][:n], dtype=float)
                if xkey == "time":
                    xs = np.median([r["series"]["time"][:n] for r in runs], axis=0)
                for y in ys:
                    ax.plot(xs, y, color=color, alpha=0.18, lw=0.8)
                med = np.median(ys, axis=0)
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.12)
                ax.plot(xs, med, color=color, lw=0.9, alpha=0.6)
                ax.plot(xs, _smooth(list(med)), color=color, lw=1.8,
                        label=f"{method} (lr={lr:g})")
        target = next((r["config"].get("target") for r in records if r["problem"] == problem),
                      None)
        for ax, xlabel in zip(axes, ("step", "training time [s]")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("evaluation loss")
            if target:
                ax.axhline(target, color="k", ls=":", lw=1)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{problem}: loss vs step\n(seeds thin, min-max shaded, "
                          "median raw and smoothed)")
        axes[1].set_title(f"{problem}: loss vs wall time")
        axes[1].legend(fontsize=7, loc="upper right")
        images.append((f"{problem}: training curves", _png(fig)))

        prow = [r for r in rows if r["problem"] == problem and r["time_to_target"] is not None]
        if prow:
            fig, ax = plt.subplots(figsize=(7, 0.4 * len(prow) + 1.2))
            prow.sort(key=lambda r: r["time_to_target"])
            ys = range(len(prow))
            meds = [r["time_to_target"] for r in prow]
            lo = [m - r["time_range"][0] for m, r in zip(meds, prow)]
            hi = [r["time_range"][1] - m for m, r in zip(meds, prow)]
            ax.barh(list(ys), meds, xerr=[lo, hi], color="C0", alpha=0.7)
            ax.set_yticks(list(ys), [r["method"] for r in prow])
            ax.set_xlabel("wall time to target [s] (median, min-max)")
            ax.set_title(f"{problem}: time to target loss {target}")
            images.append((f"{problem}: time to target", _png(fig)))
    return images


def _rosenbrock_plot(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    paths = [(r["method"], r["series"]["path"]) for r in records
             if r["problem"] == "Rosenbrock (n=2)" and len(r.get("series", {}).get("path", [])) > 1]
    if not paths:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs, ys = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
    zs = (1 - xs) ** 2 + 100 * (ys - xs**2) ** 2
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.contour(xs, ys, np.log10(zs + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for i, (method, path) in enumerate(sorted(paths)):
        p = np.asarray(path, dtype=float)
        ax.plot(p[:, 0], p[:, 1], "-o", ms=2, lw=1, color=f"C{i % 10}",
                label=f"{method} ({len(p) - 1} it)")
    ax.plot([1], [1], "r*", ms=12)
    ax.set_title("Rosenbrock (n=2): optimization paths")
    ax.legend(fontsize=7)
    return [("Rosenbrock paths", _png(fig))]


# ---- HTML ------------------------------------------------------------------------------
def _table_html(rows: list[dict[str, Any]], columns: list[tuple[str, str]], suite: str) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = "".join(
            f'<td data-col="{key}">{html.escape(format_cell(row.get(key)))}</td>'
            for key, _ in columns)
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="summary" data-suite="{suite}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.8rem 0}
td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f4f6f8}td:first-child,td:nth-child(2){text-align:left}
figure{margin:1rem 0}figure img{max-width:100%}figcaption{font-size:.85rem;color:#555}
.env td{text-align:left}.note{color:#555;font-size:.9rem}
"""


def write_report(records: Sequence[dict[str, Any]], out_dir: str | Path,
                 environment: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` (images embedded as base64 PNG; through a temporary file
    renamed into place) and return its path."""
    records = list(records)
    summary = summarize(records)
    env = environment or (records[0].get("environment", {}) if records else {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>curvlab bench report</title><style>{CSS}</style></head><body>",
             "<h1>curvlab bench report</h1>",
             f"<p class='note'>{len(records)} runs. Tables: medians over seeds at each "
             "method's best learning rate from its declared grid, [min, max] in the plots. "
             "Every number is derived from <code>results.json</code>.</p>"]
    env_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in env.items())
    parts.append(f"<h2>Environment</h2><table class='env'>{env_rows}</table>")
    for suite, rows in summary.items():
        suite_records = [r for r in records if r["suite"] == suite]
        parts.append(f"<h2>{SUITE_TITLES[suite]}</h2>")
        parts.append(_table_html(rows, TABLE_COLUMNS[suite], suite))
        images = []
        if suite == "nn":
            images = _nn_plots(suite_records, rows)
        elif suite == "classical":
            images = _rosenbrock_plot(suite_records)
        for caption, data in images:
            parts.append(f"<figure><img alt='{html.escape(caption)}' "
                         f"src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        failed = [r for r in suite_records if r["status"] == "error"]
        if failed:
            items = "".join(f"<li><code>{html.escape(r['key'])}</code>: "
                            f"{html.escape(r.get('error', ''))}</li>" for r in failed)
            parts.append(f"<p>Runs that raised:</p><ul>{items}</ul>")
    parts.append("</body></html>")
    path = Path(out_dir) / "report.html"
    write_atomic(path, "\n".join(parts))
    return path
