"""DDP / FSDP2 optimizer scenario: 20 steps of Shampoo, SOAP, K-FAC and Muon on 2 ranks,
each rank holding half of every global batch (compared with one process on the whole
batch in the test)."""

import _problems as P
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlab.optim import KFAC, SOAP, Muon, Shampoo

STEPS, GLOBAL_BATCH = 20, 16
OPTIMIZERS = ("shampoo", "soap", "kfac", "muon", "normuon", "normuon_t")
# under DDP also the other sharing mode of Shampoo/SOAP (same math, other communication)
DDP_VARIANTS = (*OPTIMIZERS, "shampoo/allgather", "soap/allgather")
# under FSDP2 Shampoo/SOAP need the allgather flow (each block whole on its owner); with the
# default mode they refuse at construction, as K-FAC always does
FSDP_VARIANTS = (*OPTIMIZERS, "shampoo/allgather", "soap/allgather")


# P.mlp's factors (A/G) have dimensions 7/8, 9/7, 8/3: max_factor_dim=7 makes three diagonal
KFAC_DIAG = {"kfac_diag": dict(max_factor_dim=7),
             "kfac_diag_inverse": dict(max_factor_dim=7, inverse_method="inverse")}


def make(name: str, model: nn.Module, group=None):
    """The optimizer under test (``group``: its process group, None for one process);
    ``name`` may carry a distributed mode, ``"shampoo/allgather"``."""
    name, _, mode = name.partition("/")
    mode = {"distributed_mode": mode} if mode else {}
    if name == "shampoo":
        return Shampoo(model.parameters(), lr=0.05, precondition_frequency=3,
                       start_preconditioning_step=2, process_group=group, **mode)
    if name == "soap":
        # first eigenbasis after 4 steps: from a one-step (rank-deficient) factor the basis
        # of its null space is arbitrary, and a 1e-14 change of the data changes the run
        # by 3% even in one process (measured), so no comparison could be exact
        return SOAP(model.parameters(), lr=0.01, precondition_frequency=3,
                    start_preconditioning_step=4, process_group=group, **mode)
    if name == "kfac":
        return KFAC(model, lr=0.1, damping=0.1, precondition_frequency=3,
                    eigenvalue_correction=True,
                    process_group=group)
    if name == "normuon":  # NorMuon on Polar Express through Gram Newton-Schulz
        return Muon(model.parameters(), lr=0.02, process_group=group, normalize="neuron",
                    ns_coefficients="polar_express", gram=True)
    if name == "normuon_t":  # the weights as if stored (in, out): neurons are columns, which
        # run across FSDP2's row shards
        weights = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim != 2]
        return Muon([{"params": weights, "transposed": True}, {"params": others}], lr=0.02,
                    process_group=group, normalize="neuron")
    return Muon(model.parameters(), lr=0.02, process_group=group)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = P.data(GLOBAL_BATCH, seed=100 + step)
    return X, y


def train(name: str, model: nn.Module, opt, steps: range, rank: int = 0, world: int = 1,
          forward=None) -> None:
    """``steps`` steps; rank ``r`` of ``world`` uses its contiguous slice of each batch."""
    forward = forward or model
    per = GLOBAL_BATCH // world
    for step in steps:
        X, y = batch(step)
        X, y = X[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        nn.functional.cross_entropy(forward(X), y).backward()
        opt.step()


def neuron_moments(opt) -> list[torch.Tensor]:
    """NorMuon's ``neuron_second_moment`` of each matrix, in parameter order."""
    return [opt.state[p]["neuron_second_moment"].clone() for g in opt.param_groups
            for p in g["params"] if "neuron_second_moment" in opt.state[p]]


def params(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(p.detach().clone())
    return out


def run(rank: int, world: int) -> dict:
    res = {}
    for name in DDP_VARIANTS:
        inner = P.mlp()
        ddp = DDP(inner)
        opt = make(name, inner, "default")
        train(name, inner, opt, range(STEPS), rank, world, forward=ddp)
        res[f"ddp/{name}"] = params(inner)
        res[f"timings/{name}"] = dict(opt.timings)
        if name.startswith(("shampoo", "soap")):
            res[f"stats/{name}"] = opt.stats()
    # K-FAC handed the DDP-wrapped model itself, no process_group: it must use DDP's group
    inner = P.mlp()
    ddp = DDP(inner)
    opt = make("kfac", ddp)
    train("kfac", inner, opt, range(STEPS), rank, world, forward=ddp)
    res["ddp_given/kfac"] = params(inner)
    # K-FAC with diagonal factors (size rule), whose decompositions every rank does itself
    for variant, kw in KFAC_DIAG.items():
        inner = P.mlp()
        ddp = DDP(inner)
        opt = KFAC(inner, lr=0.1, damping=0.1, precondition_frequency=3, process_group="default",
                   **kw)
        train("kfac", inner, opt, range(STEPS), rank, world, forward=ddp)
        res[f"ddp/{variant}"] = params(inner)
    res.update(run_fsdp(rank, world))
    return res


def run_fsdp(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for name in FSDP_VARIANTS:
        model = P.mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            opt = make(name, model, dist.group.WORLD)
        except (TypeError, ValueError) as err:  # unsupported: refused at construction
            res[f"fsdp/{name}"] = str(err)
            continue
        train(name, model, opt, range(STEPS), rank, world)
        res[f"fsdp/{name}"] = params(model)
        res[f"fsdp_timings/{name}"] = dict(opt.timings)
        if name.startswith(("shampoo", "soap")):
            res[f"fsdp_state/{name}"] = opt._whole_state()
        if name.startswith("normuon"):
            res[f"fsdp_state/{name}"] = neuron_moments(opt)
    return res
