"""Distributed diagnostics scenario: loss, gradient and curvature products of a
data-parallel Objective (each rank holds a shard of the data)."""

import _problems as P
import torch
from torch import nn

from curvlab.diagnostics.sharpness import lambda_max
from curvlab.distributed import synced_generator
from curvlab.linalg import hutchinson
from curvlab.linops import DiagonalOperator, GGNOperator, HessianOperator, KFACOperator
from curvlab.objective import Objective


def quantities(obj: Objective) -> dict:
    """What is compared against the single-process run (also used by the test)."""
    V = torch.randn(obj.num_params, 3, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    loss, _ = obj.loss_and_grad()
    return {"num_samples": obj.num_samples, "loss": obj.loss(), "loss_and_grad": loss,
            "grad": obj.flat_grad(), "hvp": HessianOperator(obj) @ V,
            "hvp1": HessianOperator(obj) @ V[:, 0], "ggn": GGNOperator(obj).to_dense(),
            "diag": DiagonalOperator(obj).diagonal,
            "kfac": KFACOperator(obj, fisher_type="exact", damping=0.1) @ V,
            "kfac_inverse": KFACOperator(obj, fisher_type="exact", damping=0.1).inverse() @ V,
            "lambda_max": lambda_max(HessianOperator(obj), tol=1e-10,
                                     generator=synced_generator(7, obj.process_group)
                                     ).eigenvalues[0],
            "trace": hutchinson(GGNOperator(obj), 20,
                                generator=synced_generator(3, obj.process_group)).estimate}


def run(rank: int, world: int) -> dict:
    X, y = P.data()
    obj = Objective(P.model(), nn.CrossEntropyLoss(), P.shard(X, y, rank, world),
                    process_group="default")
    res = quantities(obj)
    res["diag_hutch"] = DiagonalOperator(obj, method="hutchinson", num_samples=4).diagonal
    # no seed: rank 0's fresh seed is broadcast, so the Lanczos runs stay in lockstep
    res["lambda_max_unseeded"] = lambda_max(HessianOperator(obj), tol=1e-10,
                                            generator=synced_generator(None, "default")
                                            ).eigenvalues[0]
    try:  # every rank must multiply the same vector: a rank-dependent one is refused
        HessianOperator(obj) @ (torch.zeros(obj.num_params, dtype=torch.float64) + rank)
    except ValueError as err:
        res["mismatch_error"] = str(err)
    return res
