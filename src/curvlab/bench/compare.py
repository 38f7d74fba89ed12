"""``curvlab bench --compare OLD NEW``: what got faster or slower between two runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curvlab.bench.report import summarize
from curvlab.bench.runner import load_results

__all__ = ["compare_results"]

# (suite, row key) -> metrics where smaller is better
METRICS = {
    "nn": ("steps_to_target", "time_to_target", "step_time_ms", "final_loss"),
    "classical": ("geomean_evaluations", "total_time_ms"),
    "curvature": ("time_ms", "x_gradient", "hvps"),
}
ROW_KEY = {"nn": ("problem", "method"), "classical": ("method",),
           "curvature": ("problem", "method")}


def compare_results(old: str | Path, new: str | Path, threshold: float = 0.05
                    ) -> list[dict[str, Any]]:
    """One entry per (row, metric) present in both runs: old, new, ratio new/old and a
    verdict ("faster"/"slower"/"same" with ``threshold`` relative tolerance; for losses
    and step counts "better"/"worse")."""
    a, b = summarize(load_results(old)), summarize(load_results(new))
    out = []
    for suite, metrics in METRICS.items():
        old_rows = {tuple(r[k] for k in ROW_KEY[suite]): r for r in a.get(suite, [])}
        for row in b.get(suite, []):
            key = tuple(row[k] for k in ROW_KEY[suite])
            prev = old_rows.get(key)
            if prev is None:
                continue
            for metric in metrics:
                x, y = prev.get(metric), row.get(metric)
                if x is None or y is None or x == 0:
                    continue
                ratio = y / x
                timed = "time" in metric
                if abs(ratio - 1) <= threshold:
                    verdict = "same"
                elif ratio < 1:
                    verdict = "faster" if timed else "better"
                else:
                    verdict = "slower" if timed else "worse"
                out.append({"suite": suite, "row": " / ".join(map(str, key)), "metric": metric,
                            "old": x, "new": y, "ratio": ratio, "verdict": verdict})
    return out
