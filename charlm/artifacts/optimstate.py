"""A checkpoint's optimizer state, checked against the optimizer it is loaded into before torch
sees it (torch checks none of it: a state of the wrong shape fails mid-step, or trains on
garbage). Part of the checkpoint's validation (`charlm.artifacts.fields`), kept apart because it
needs the live optimizer's parameters."""

from __future__ import annotations

import torch

from charlm.errors import CharlmError


# What an optimizer keeps per parameter: (every key it may hold, the keys it must hold).
OPTIMIZER_STATE = {
    "SGD": ({"momentum_buffer"}, set()),
    "Adam": ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step", "exp_avg", "exp_avg_sq"}),
}
OPTIMIZER_STATE["AdamW"] = OPTIMIZER_STATE["Adam"]


def check_optimizer_state(saved: dict, ours: list, kind: str, where: str) -> None:
    """A checkpoint's optimizer state against the optimizer it is loaded into: `ours` holds the
    parameters of each of its groups, `kind` its class name (SGD, Adam, AdamW). Each state
    tensor must be a float of its parameter's shape, with values an optimizer makes. Raises a
    one-line CharlmError naming `where` (the checkpoint)."""
    def damaged(problem: str) -> CharlmError:
        return CharlmError(f"{where}: its 'optimizer' entry {problem}; the file is damaged or "
                           "was edited")

    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and isinstance(state, dict) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise damaged("lacks its 'state' and 'param_groups'")
    if [len(g["params"]) for g in groups] != [len(g) for g in ours]:
        raise damaged(f"has groups of {[len(g['params']) for g in groups]} parameters, but the "
                      f"model's optimizer has {[len(g) for g in ours]}")
    ids = [i for g in groups for i in g["params"]]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) < len(ids):
        raise damaged("names its parameters other than by distinct numbers")
    params = dict(zip(ids, (p for g in ours for p in g)))
    allowed, required = OPTIMIZER_STATE.get(kind, (set(), set()))
    for key, entry in state.items():
        if key not in params or not isinstance(entry, dict):
            raise damaged(f"holds state for an unknown parameter {key!r}")
        if not set(entry) <= allowed or not required <= set(entry):
            raise damaged(f"holds {sorted(map(str, entry))} for parameter {key}, not a "
                          f"{kind} state ({', '.join(sorted(allowed))})")
        param = params[key]
        for name, value in entry.items():
            want = () if name == "step" else tuple(param.shape)
            if value is None and name == "momentum_buffer":
                continue
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and tuple(value.shape) == want):
                shown = (f"a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                         f"{tuple(value.shape)}" if isinstance(value, torch.Tensor)
                         else type(value).__name__)
                raise damaged(f"holds {name} of parameter {key} as {shown}; it must be a float "
                              f"tensor of shape {want}")
            if not bool(torch.isfinite(value).all()) or (
                    name in ("step", "exp_avg_sq", "max_exp_avg_sq") and bool((value < 0).any())):
                raise damaged(f"holds {name} of parameter {key} with values no optimizer makes")
