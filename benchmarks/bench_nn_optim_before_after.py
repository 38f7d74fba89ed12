"""bench_nn_optim at an earlier revision and at this checkout, back to back, side by side.

For a change to the optimizers: steps to target and step time against the fastest peer of
the same algorithm, before and after, from one invocation on the same machine (so its
noise hits both). The earlier revision is checked out with ``git worktree`` into a
temporary folder and run with its own ``src`` on this interpreter.

Run: python benchmarks/bench_nn_optim_before_after.py --before REV [--tasks digits]
Full outputs go to OUT/{before,after}.txt (default benchmarks/results/before_after/).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(\w+)\s+(\S+)\s+[\d.e+-]+\s+(\d+|-)\s")
PEER = re.compile(r"^\s+(\w+)\s+(curvlab\.\w+)\s+([\d.]+)x?\s+\(vs (\S+)\)")


def run(tree: Path, tasks: str, out: Path) -> str:
    """bench_nn_optim.py of ``tree`` on its own ``src``; its printed output."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    result = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_nn_optim.py"),
                             "--tasks", tasks, "--out", str(out)],
                            env=env, capture_output=True, text=True, check=True)
    return result.stdout


def parse(text: str) -> tuple[dict, dict]:
    """(task, optimizer) -> steps to target; and -> (step time / fastest peer, peer)."""
    steps, peer = {}, {}
    for line in text.splitlines():
        if m := ROW.match(line):
            steps[(m.group(1), m.group(2))] = m.group(3)
        if m := PEER.match(line):
            peer[(m.group(1), m.group(2))] = (float(m.group(3)), m.group(4))
    return steps, peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--tasks", default="digits")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "before_after"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.before], check=True, capture_output=True)
        try:
            before = run(old, args.tasks, Path(tmp) / "before-results.json")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False, capture_output=True)
    after = run(ROOT, args.tasks, out / "after-records")
    (out / "before.txt").write_text(before)
    (out / "after.txt").write_text(after)
    sb, pb = parse(before)
    sa, pa = parse(after)
    print(f"{'task':10s} {'optimizer':34s} {'steps before':>12s} {'after':>6s} "
          f"{'step/peer before':>17s} {'after':>6s}  peer")
    for key in sa:
        b, a = pb.get(key), pa.get(key)
        print(f"{key[0]:10s} {key[1]:34s} {sb.get(key, '?'):>12s} {sa[key]:>6s} "
              f"{(f'{b[0]:.2f}x' if b else '-'):>17s} {(f'{a[0]:.2f}x' if a else '-'):>6s}"
              f"  {a[1] if a else ''}")


if __name__ == "__main__":
    main()
