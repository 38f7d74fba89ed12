"""Checkpoints of the layouts before the optimizer contract, converted on load (one place).

Before it, Shampoo and SOAP kept their whole state under ``state_dict()["preconditioner"]``
(stacked per block shape, ``state`` empty), K-FAC, NaturalGradient and HessianFree kept
optimizer-wide counters under a string key of ``state``, and some settings had other names
(``epsilon``, ``grafting_beta2`` / ``grafting_epsilon``, ``adamw_betas`` / ``adamw_eps``,
``inv_update_freq``). Muon's settings added later (``gram``, ``gram_restarts``,
``normalize``, ``beta2``) get the values that reproduce the step of a state dict that lacks
them. :func:`convert_state_dict` rewrites such a state dict into the current layout; a
current one passes through unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["convert_state_dict", "convert_blocked_state_dict"]

#: old group key -> new group key, per optimizer class name
_GROUP_KEYS = {
    "Shampoo": {"epsilon": "eps", "grafting_epsilon": "adam_eps"},
    "Muon": {"adamw_betas": "adam_betas", "adamw_eps": "adam_eps"},
}


#: Muon settings added after its first layout, with the value that reproduces that layout
_MUON_ADDED = {"gram": False, "gram_restarts": 2, "normalize": None, "beta2": 0.95}

_OLD_GLOBAL_KEYS = ("kfac", "natural_gradient", "hessian_free")


def _convert_groups(cls: str, groups: list[dict[str, Any]], current: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    renames = _GROUP_KEYS.get(cls, {})
    out = []
    for saved, live in zip(groups, current, strict=False):
        g = dict(saved)
        for old, new in renames.items():
            if old in g and new not in g:
                g[new] = g.pop(old)
        if cls == "Shampoo" and "grafting_beta2" in g:  # grafting uses only Adam's beta2
            b2 = g.pop("grafting_beta2")
            g.setdefault("adam_betas", (live.get("adam_betas", (0.9, 0.999))[0], b2))
        if cls == "Muon":  # settings added since, at the values that reproduce the old step
            for key, old_value in _MUON_ADDED.items():
                if key in live and key not in g:
                    g[key] = old_value
        if "max_state_ratio" in live and "max_state_ratio" not in g and \
                "max_preconditioner_dim" in g:  # added since: the old layout had no limit
            g["max_state_ratio"] = None
        out.append(g)
    return out


def convert_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
                       ) -> dict[str, Any]:
    """``state_dict`` in ``optimizer``'s current layout (see the module docstring)."""
    cls = type(optimizer).__name__
    sd = dict(state_dict)
    if "param_groups" in sd:
        sd["param_groups"] = _convert_groups(cls, sd["param_groups"], optimizer.param_groups)
    old = [k for k in sd.get("state", {}) if k in _OLD_GLOBAL_KEYS]
    if old and sd.get("param_groups"):  # optimizer-wide state under a string key of state
        state = dict(sd["state"])
        glob = dict(state.pop(old[0]))
        groups = [dict(g) for g in sd["param_groups"]]
        groups[0].setdefault("_curvlab", glob)
        sd["state"], sd["param_groups"] = state, groups
    return sd


def convert_blocked_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Shampoo / SOAP: the old ``"preconditioner"`` entry (stacked state of the block
    groups) becomes per-parameter state."""
    sd = convert_state_dict(optimizer, state_dict)
    pre = sd.pop("preconditioner", None)
    if pre is None:
        return sd
    for live, saved in zip(optimizer.param_groups, sd["param_groups"], strict=False):
        for key in optimizer._layout_keys:  # the layout the old state was stacked in
            live[key] = saved.get(key)
    optimizer._steps = list(pre["steps"])
    optimizer._groups = None
    groups = optimizer._build()
    if len(pre["groups"]) != len(groups):
        raise ValueError(f"{type(optimizer).__name__}.load_state_dict: the checkpoint has a "
                         "different blocking layout (different parameters or "
                         "max_preconditioner_dim?)")
    for g, saved in zip(groups, pre["groups"], strict=True):
        if saved.keys() != g.state.keys():
            raise ValueError(f"{type(optimizer).__name__}.load_state_dict: the checkpoint's "
                             "preconditioner state keys do not match")
        held = [i for i, r in enumerate(g.rows) if r >= 0]
        for k, v in g.state.items():
            rows = saved[k] if g.diagonal else saved[k][held]
            if tuple(rows.shape) != tuple(v.shape):
                raise ValueError(f"{type(optimizer).__name__}.load_state_dict: checkpoint "
                                 f"entry {k!r} has shape {tuple(rows.shape)}, expected "
                                 f"{tuple(v.shape)}")
            v.copy_(rows.to(device=v.device, dtype=v.dtype))
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups
                                            for p in g["params"])}
    sd["state"] = {index[id(p)]: st for p, st in optimizer._full_param_state().items()}
    counters = pre.get("counters", {})
    glob = {"counters": {"refreshes": counters.get("refreshes", 0),
                         "refresh_failures": counters.get("failures", 0),
                         "skipped_nonfinite": counters.get("skipped_steps", 0)},
            "nonfinite_blocks": int(pre.get("nonfinite_blocks", 0))}
    sd["param_groups"] = [dict(g) for g in sd["param_groups"]]
    sd["param_groups"][0]["_curvlab"] = glob
    return copy.copy(sd)
