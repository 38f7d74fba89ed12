"""The one distributed worker: runs every scenario module on this rank and saves the
results (one launch for the whole distributed suite, since starting a process that
imports torch costs seconds)."""

import sys

import scen_checkpoint
import scen_collectives
import scen_diagnostics
import scen_optim
from _launch import init, save

SCENARIOS = {"diagnostics": scen_diagnostics, "optim": scen_optim,
             "checkpoint": scen_checkpoint, "collectives": scen_collectives}


def main() -> None:
    rank, world, out_dir, names = init(sys.argv)
    results = {}
    for name in names or SCENARIOS:
        results[name] = SCENARIOS[name].run(rank, world)
    save(out_dir, rank, results)


if __name__ == "__main__":
    main()
