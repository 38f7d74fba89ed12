"""Data-parallel training with curvlab's second-order optimizers on torch.distributed.

    torchrun --nproc_per_node=2 examples/ddp_train.py --optimizer soap      # CPU (gloo)
    torchrun --nproc_per_node=8 examples/ddp_train.py --optimizer shampoo   # GPUs (nccl)

Every rank trains the digits MLP on its shard of each global batch (DistributedSampler)
inside DistributedDataParallel; the optimizer gets ``process_group="default"``, so the
expensive per-block work (roots, eigenbases, Newton-Schulz, K-FAC inverses) is split over
the ranks (curvlab.optim.distributors). At the end, lambda_max of the full-data
training Hessian is computed with a data-parallel Objective (each rank holds its shard of the
data; products are all-reduced), and with ``--checkpoint DIR`` model and optimizer are
saved with curvlab.distributed.save_checkpoint (resume with ``--resume DIR``, on any number of
ranks).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from curvlab.bench.problems.digits import digits_mlp, load_digits_tensors
from curvlab.diagnostics.sharpness import lambda_max
from curvlab.distributed import load_checkpoint, save_checkpoint, synced_generator
from curvlab.linops import HessianOperator
from curvlab.objective import Objective
from curvlab.optim import KFAC, SOAP, Muon, Shampoo


def make_optimizer(name: str, model: nn.Module,
                   mode: str = "broadcast") -> torch.optim.Optimizer:
    if name == "shampoo":
        return Shampoo(model.parameters(), lr=3e-3, precondition_frequency=10,
                       process_group="default", distributed_mode=mode)
    if name == "soap":
        return SOAP(model.parameters(), lr=3e-3, precondition_frequency=10,
                    process_group="default", distributed_mode=mode)
    if name == "kfac":
        return KFAC(model, lr=0.1, damping=0.03, precondition_frequency=10, process_group="default")
    return Muon(model.parameters(), lr=0.02, process_group="default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=["shampoo", "soap", "kfac", "muon"], default="soap")
    ap.add_argument("--mode", choices=["broadcast", "allgather"], default="broadcast",
                    help="Shampoo/SOAP: share refresh results (full state on every rank) or "
                         "split all block work and state and all-gather directions every step")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--checkpoint", help="save model + optimizer here at the end")
    ap.add_argument("--resume", help="load model + optimizer from this checkpoint")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    device = device or torch.device("cpu")

    (X, y), _ = load_digits_tensors()
    data = TensorDataset(X.to(device), y.to(device))
    sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size // world, sampler=sampler)

    model = digits_mlp(hidden=(64, 64)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = make_optimizer(args.optimizer, model, args.mode)
    if args.resume:
        state = load_checkpoint(args.resume, "default", device=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(ddp(xb), yb)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(yb), torch.tensor(len(yb), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: train loss {float(total[0] / total[1]):.4f}")

    # full-data lambda_max: each rank holds a disjoint shard (DistributedSampler without
    # shuffling or padding would repeat samples, so shard by hand)
    shard = (X[rank::world].to(device), y[rank::world].to(device))
    obj = Objective(model, loss_fn, shard, process_group="default")
    top = lambda_max(HessianOperator(obj), tol=1e-3,
                     generator=synced_generator(0, "default", device))
    timings = {k: round(v, 4) for k, v in opt.timings.items()}
    print(f"rank {rank}: lambda_max of the full training Hessian = "
          f"{float(top.eigenvalues[0]):.4f}; optimizer time (s) {timings}", flush=True)
    if args.checkpoint:
        save_checkpoint({"model": model.state_dict(), "optim": opt.state_dict()},
                        args.checkpoint, "default")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
