"""``"lr"`` mode: the coefficient applied through a modality group's hyperparameters, for the duration of the step.

The step uses ``lr * gamma``. Weight decay is divided by gamma where that keeps the promise exactly:

* for SGD, ``lr * gamma`` and ``weight_decay / gamma`` are, in exact arithmetic, grad mode's step (momentum,
  dampening, nesterov and maximize are linear), with the momentum buffer held in units of ``1/gamma``; state
  dicts show it in standard units (grad mode's), so checkpoints move freely between modes and plain SGD;
* for decoupled weight decay (AdamW, ``decoupled_weight_decay=True``, Muon) the update is multiplied and the decay
  stays as the user set it, since ``lr * weight_decay`` is unchanged.

>>> import torch
>>> adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], weight_decay=0.01)
>>> compensates_decay(adamw, adamw.param_groups[0])
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .modes import base_optimizer

__all__ = [
    "EXACT_KEY",
    "compensates_decay",
    "drop_exact_momentum",
    "keeps_momentum_in_gamma_units",
    "momentum_to_internal_",
    "momentum_to_standard",
    "rescale_momentum_",
]

Groups = Iterable[dict[str, Any]]


def compensates_decay(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay is divided by gamma while its lr is multiplied (whatever its value now: a
    schedule may change it)."""
    if "weight_decay" not in group:
        return False
    base = base_optimizer(optimizer)
    return (
        type(optimizer) is torch.optim.SGD
        or bool(group.get("decoupled_weight_decay"))  # torch >= 2.6 marks AdamW's groups so, too
        or type(base) in (torch.optim.AdamW, getattr(torch.optim, "Muon", None))
    )


def keeps_momentum_in_gamma_units(optimizer: Optimizer) -> bool:
    """SGD with momentum: in ``"lr"`` mode its buffers are in ``1/gamma`` units."""
    return type(optimizer) is torch.optim.SGD


def rescale_momentum_(optimizer: Optimizer, factor_of: Callable[[dict[str, Any]], float]) -> None:
    """Multiply the momentum buffers of each group by ``factor_of(group)`` (out of place: loaded tensors may be the
    caller's own)."""
    for group in optimizer.param_groups:
        factor = factor_of(group)
        if factor == 1.0:
            continue
        for p in dict.fromkeys(group["params"]):
            state = optimizer.state.get(p)
            if state and state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = state["momentum_buffer"] * factor


EXACT_KEY = "pdmp_momentum_buffer"  # the 1/gamma-units buffer itself, so that a resume is bit-identical


def momentum_to_standard(
    state_dict: dict[str, Any], groups: list[dict[str, Any]], gamma_of: Callable[[dict[str, Any]], float]
) -> dict[str, Any]:
    """``state_dict`` (of the optimizer whose param groups are ``groups``) with momentum in standard units.

    Beside it, under :data:`EXACT_KEY`, the buffer as kept: ``buffer * gamma / gamma`` is not always ``buffer`` in
    floating point. Plain SGD ignores the extra key; a load prefers it while the standard buffer is unchanged.
    """
    state = dict(state_dict["state"])
    seen: set[int] = set()
    for group, saved in zip(groups, state_dict["param_groups"], strict=True):
        gamma = gamma_of(group)
        for index in saved["params"]:
            entry = state.get(index)
            if gamma == 1.0 or index in seen or not entry or entry.get("momentum_buffer") is None:
                continue
            seen.add(index)
            kept = entry["momentum_buffer"]
            state[index] = {**entry, "momentum_buffer": kept * gamma, EXACT_KEY: kept}
    return {**state_dict, "state": state}


def momentum_to_internal_(optimizer: Optimizer, gamma_of: Callable[[dict[str, Any]], float]) -> None:
    """After a load: standard units to ``1/gamma`` units (the exact buffer where the checkpoint kept it)."""
    for group in optimizer.param_groups:
        gamma = gamma_of(group)
        for p in dict.fromkeys(group["params"]):
            state = optimizer.state.get(p)
            if not state:
                continue
            exact, standard = state.pop(EXACT_KEY, None), state.get("momentum_buffer")
            if standard is None or gamma == 1.0:
                continue
            same = exact is not None and exact.shape == standard.shape and torch.equal(exact * gamma, standard)
            state["momentum_buffer"] = exact if same else standard / gamma


def drop_exact_momentum(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without :data:`EXACT_KEY` entries (for a mode that keeps momentum in standard units)."""
    state = state_dict.get("state")
    if not isinstance(state, dict) or not any(isinstance(e, dict) and EXACT_KEY in e for e in state.values()):
        return state_dict
    cleaned = {
        i: {k: v for k, v in e.items() if k != EXACT_KEY} if isinstance(e, dict) else e for i, e in state.items()
    }
    return {**state_dict, "state": cleaned}
