"""Distributed optimizers on CPU (gloo): per-rank preconditioner and communication time
against one process.

Shampoo, SOAP, K-FAC and Muon train an MLP of square 256-wide layers (Shampoo/SOAP
blocks of 128, so every weight is 4 Kronecker blocks) for a few steps with a refresh at
every step, on 1, 2 and (unless --quick) 4 processes, each with OMP_NUM_THREADS=1 and
its slice of the same global batch. Each rank reports (from ``optimizer.timings``)

* ``precondition``: seconds in the sharded per-block work (roots, eigenbases,
  Newton-Schulz, K-FAC decompositions), wall clock, and ``pre_cpu``: the CPU seconds of
  the rank's thread in it. The target (<= 0.6x of one process at 2 ranks) is checked on
  the CPU time: on a shared machine a rank's wall time depends on how much of a core the
  scheduler gives it, the work it does does not;
* ``communication``: seconds in the collectives the optimizer adds (sharing results,
  all-reducing K-FAC factors; DDP's own gradient all-reduce is not counted);
  ``/allgather``: Shampoo/SOAP splitting all block work and all-gathering directions
  every step instead of sharing refresh results;
* ``step``: median wall time of ``optimizer.step()``;
* ``state MB``: the rank's preconditioner state (``stats()``; "allgather" holds only the
  blocks the rank owns).

It also measures the inputs of a scaling estimate (eigh time per block size, all-reduce
bandwidth) and prints a paper estimate of Shampoo's step-time overhead over AdamW for a
1.2B-parameter transformer on 1, 8 and 64 GPUs in both modes (:func:`scaling_estimate`;
the GPU numbers are stated assumptions).

On a 2-core machine 4 processes share 2 cores, so their times are an upper bound.

Run: python benchmarks/bench_distributed.py [--quick] [--steps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

WIDTH, DEPTH, BLOCK, BATCH = 256, 4, 128, 256
OPTIMIZERS = ("shampoo", "shampoo/allgather", "soap", "soap/allgather", "kfac", "muon")


def make(name: str, model: nn.Module, group):
    from curvlab.optim import KFAC, SOAP, Muon, Shampoo

    name, _, mode = name.partition("/")
    mode = {"distributed_mode": mode} if mode else {}
    if name == "shampoo":
        return Shampoo(model.parameters(), lr=1e-3, precondition_frequency=1,
                       start_preconditioning_step=1, max_preconditioner_dim=BLOCK,
                       process_group=group, **mode)
    if name == "soap":
        return SOAP(model.parameters(), lr=1e-3, precondition_frequency=1,
                    max_preconditioner_dim=BLOCK, eigenbasis_method="eigh",
                    process_group=group, **mode)
    if name == "kfac":
        return KFAC(model, lr=0.01, precondition_frequency=1, process_group=group)
    return Muon(model.parameters(), lr=0.01, process_group=group)


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.Tanh()]
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def worker(rank: int, world: int, init: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    # one process too runs in a (1-rank) group: the same code path, timings enabled
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = "default"
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    per = BATCH // world
    X, y = X[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    res = {}
    for name in OPTIMIZERS:
        net = model()
        fwd = DDP(net) if world > 1 else net
        opt = make(name, net, group)
        keys = ("precondition", "communication", "precondition_cpu")
        per_step: dict[str, list[float]] = {k: [] for k in (*keys, "step")}
        for step in range(steps + 1):  # the first step builds state; not timed
            opt.zero_grad()
            nn.functional.cross_entropy(fwd(X), y).backward()
            opt.timings.clear()
            t = time.perf_counter()
            opt.step()
            if step:
                per_step["step"].append(time.perf_counter() - t)
                for k in keys:
                    per_step[k].append(opt.timings.get(k, 0.0))
        res[name] = {k: statistics.median(v) for k, v in per_step.items()}
        stats = getattr(opt, "stats", None)
        res[name]["memory_MB"] = (stats()["state_bytes"] / 2 ** 20
                                  if callable(stats) else float("nan"))
    if world == 2:
        res["bandwidth_GBps"] = _bandwidth()
    if world == 1:
        res["eigh_ms"] = _eigh_costs()
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _bandwidth(numel: int = 2 ** 22, repeats: int = 5) -> float:
    """All-reduce bus bandwidth (GB/s): 2 (w - 1) / w * bytes / time (ring algorithm)."""
    t = torch.ones(numel)
    dist.all_reduce(t)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(t)
    sec = (time.perf_counter() - start) / repeats
    w = dist.get_world_size()
    return 2 * (w - 1) / w * numel * 4 / sec / 1e9


def _eigh_costs() -> dict[int, float]:
    out = {}
    for d in (128, 256, 512):
        A = torch.randn(d, d, dtype=torch.float64)
        A = A @ A.T
        torch.linalg.eigh(A)
        start = time.perf_counter()
        for _ in range(3):
            torch.linalg.eigh(A)
        out[d] = (time.perf_counter() - start) / 3 * 1e3
    return out


# ---------------------------------------------------------------------------- paper estimate
# A 1.2B-parameter decoder (d_model 2048, 24 layers, MLP 4x, sequence 2048) trained with
# Shampoo in data parallel on A100-class GPUs. Hardware numbers are ASSUMPTIONS (no GPU
# here), stated once: effective matmul rate, eigh time of a 1024 x 1024 float32 factor,
# per-GPU bus bandwidth across nodes, and the AdamW step (6 N tokens / rate).
D_MODEL, LAYERS, SEQ, TOKENS_PER_STEP = 2048, 24, 2048, 2 ** 20
GPU_TFLOPS = 125.0  # effective (40% of A100 bf16 peak) for the model; fp32 factors: half
GPU_EIGH_1024_MS = 30.0
GPU_BUS_GBPS = 25.0  # per GPU, inter-node (8 x 200 Gb/s InfiniBand per 8-GPU node)
SHAMPOO_BLOCK, REFRESH_EVERY = 1024, 100


def scaling_estimate(eigh_ms: dict[int, float], gloo_gbps: float) -> None:
    """Step-time overhead of Shampoo over AdamW at 1, 8 and 64 GPUs in both distributed
    modes, from a flop/byte count of the model's blocks and the constants above; the
    measured CPU eigh times check the d^3 law used to cost the blocks."""
    import math

    dims = sorted(eigh_ms)
    slope = math.log(eigh_ms[dims[-1]] / eigh_ms[dims[0]]) / math.log(dims[-1] / dims[0])
    d, b = D_MODEL, SHAMPOO_BLOCK
    mats = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # qkv, out, MLP up, MLP down
    blocks = LAYERS * sum((m // b) * (n // b) for m, n in mats)
    params = blocks * b * b
    step_s = 6 * params * TOKENS_PER_STEP / (GPU_TFLOPS * 1e12)  # AdamW step, 1 GPU
    per_block_flop = 4 * 2 * b ** 3  # L, R statistics + the two root products
    fp32 = GPU_TFLOPS / 2 * 1e12
    print(f"paper estimate: {params / 1e9:.2f}B block parameters in {blocks} blocks of "
          f"{b}x{b}, refresh every {REFRESH_EVERY} steps; measured eigh exponent "
          f"{slope:.2f} (d^3 assumed), gloo bus bandwidth here {gloo_gbps:.2f} GB/s")
    print(f"assumed GPU: {GPU_TFLOPS:.0f} TFLOP/s, eigh(1024) {GPU_EIGH_1024_MS:.0f} ms, "
          f"{GPU_BUS_GBPS:.0f} GB/s per GPU; AdamW step at w GPUs = {step_s:.1f} s / w "
          f"(global batch {TOKENS_PER_STEP} tokens)")
    print(f"{'GPUs':>5} {'mode':<10} {'AdamW step':>10} {'stats+apply':>12} {'refresh':>9} "
          f"{'comm':>8} {'state GB':>9} {'overhead':>9}")
    state_bytes = blocks * 4 * b * b * 4  # L, R and their two roots, float32
    result_bytes = blocks * 2 * b * b * 4  # the two roots of every block
    for w in (1, 8, 64):
        adamw = step_s / w  # the global batch is fixed: its work is split over w GPUs
        refresh = math.ceil(blocks / w) * 2 * GPU_EIGH_1024_MS / 1e3 / REFRESH_EVERY
        for mode in ("broadcast", "allgather"):
            if mode == "broadcast":
                work = blocks * per_block_flop / fp32
                comm = (w - 1) / w * result_bytes / (GPU_BUS_GBPS * 1e9) / REFRESH_EVERY
                state = state_bytes
            else:
                work = math.ceil(blocks / w) * per_block_flop / fp32
                comm = (w - 1) / w * params * 4 / (GPU_BUS_GBPS * 1e9)  # directions
                state = state_bytes / w
            extra = work + refresh + comm
            print(f"{w:>5} {mode:<10} {adamw * 1e3:>8.0f}ms {work * 1e3:>10.0f}ms "
                  f"{refresh * 1e3:>7.0f}ms "
                  f"{comm * 1e3:>6.0f}ms {state / 1e9:>9.2f} {extra / adamw:>8.1%}")


def launch(world: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world),
                                   f"file://{tmp}/rdv", tmp, str(steps)], env=env)
                 for r in range(world)]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"a worker of the {world}-process run failed")
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, init, out, steps = sys.argv[2:7]
        worker(int(rank), int(world), init, out, int(steps))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 processes, 3 steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    ap.add_argument("--out", default=None, help="write the raw results as JSON")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 8)
    worlds = (1, 2) if args.quick else (1, 2, 4)
    runs = {w: launch(w, steps) for w in worlds}
    base = runs[1][0]
    print(f"MLP {DEPTH + 2} layers, width {WIDTH}, global batch {BATCH}, blocks {BLOCK}; "
          f"median over {steps} steps, refresh every step; seconds per step (max over ranks)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'optimizer':<17} {'procs':>5} {'precond':>8} {'pre_cpu':>8} {'comm':>7} "
          f"{'step':>7} {'pre/1p':>7} {'cpu/1p':>7} {'step/1p':>8} {'state MB':>9}")
    ok = True
    for name in OPTIMIZERS:
        for w in worlds:
            pre, cpu, com, stp = (max(r[name][k] for r in runs[w]) for k in
                                  ("precondition", "precondition_cpu", "communication", "step"))
            b = base[name]
            if w == 2:
                ok &= cpu / b["precondition_cpu"] <= 0.6
            print(f"{name:<17} {w:>5} {pre:>8.4f} {cpu:>8.4f} {com:>7.4f} {stp:>7.4f} "
                  f"{pre / b['precondition']:>7.2f} {cpu / b['precondition_cpu']:>7.2f} "
                  f"{stp / b['step']:>8.2f} {max(r[name]['memory_MB'] for r in runs[w]):>9.2f}")
    print(f"target (per-rank preconditioner CPU time at 2 processes <= 0.6x one process): "
          f"{'MET' if ok else 'NOT MET'}")
    print("eigh (float64, 1 thread) ms by block size:",
          {d: round(v, 2) for d, v in base["eigh_ms"].items()})
    print(f"gloo all-reduce bus bandwidth at 2 processes: "
          f"{runs[2][0]['bandwidth_GBps']:.2f} GB/s")
    print()
    scaling_estimate(base["eigh_ms"], runs[2][0]["bandwidth_GBps"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({str(w): r for w, r in runs.items()}, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
