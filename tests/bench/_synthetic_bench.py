"""``curvlab bench`` on a synthetic task list: the CLI's own code path, with runs that take
``SYNTH_DELAY`` seconds each and return metrics that depend only on the task (so a report
is reproducible). ``python _synthetic_bench.py ARGS`` runs ``curvlab ARGS``."""

import os
import sys
import time

from curvlab.bench.runner import Task

PROBLEMS, METHODS = 15, ("a", "b", "c")


def synthetic_tasks(suite=None, opts=None):
    delay = float(os.environ.get("SYNTH_DELAY", "0.02"))
    tasks = []
    for p in range(PROBLEMS):
        for m in METHODS:
            def fn(progress, p=p, m=m):
                time.sleep(delay)
                return {"metrics": {"solved": p % 4 != 0, "evaluations": 10 + p * (ord(m) - 96),
                                    "time": 1e-3 * p}}
            tasks.append(Task("classical", f"p{p}", m, {"n": p}, fn))
    return tasks, []


if __name__ == "__main__":
    from curvlab import cli
    from curvlab.bench import suites

    suites.build_tasks = synthetic_tasks
    sys.exit(cli.main(sys.argv[1:]))
