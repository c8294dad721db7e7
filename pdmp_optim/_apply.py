"""The arithmetic of the three modes, apart from the class that owns state and groups (as torch's ``sgd.py`` does).

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.ones(2)
>>> multiply_grads_([(3.0, [w])])
>>> w.grad
tensor([3., 3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._groups import GAMMA, UNITS

Buckets = Sequence[tuple[float, Sequence[Tensor]]]  # (gamma, the parameters it multiplies)


def multiply_grads_(buckets: Buckets) -> None:
    """Multiply every ``p.grad`` by its bucket's gamma: one ``torch._foreach_mul_`` per (gamma, device, dtype).

    Grouping happens on the gradients as they are now, so a model moved to another dtype or device after wrapping
    is handled like any other. Sparse or expanded gradients (a zero stride) cannot be multiplied in place; they are
    replaced by ``grad * gamma``, as a plain optimizer would read them. One function for all buckets: under
    ``torch.compile`` it is one frame, so one graph.
    """
    with torch.no_grad():
        for gamma, params in buckets:
            dense = []
            for p in params:
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout is torch.strided and 0 not in grad.stride():  # not sparse, not expanded
                    dense.append(grad)
                else:
                    p.grad = grad * gamma
            if not dense:
                continue
            grouped: dict[Any, Any] = Optimizer._group_tensors_by_device_and_dtype([dense])  # type: ignore[list-item]
            for (grads,), _ in grouped.values():
                torch._foreach_mul_(grads, _multiplier(gamma, grads[0]))  # type: ignore[arg-type]


def snapshot(buckets: Buckets) -> list[list[Tensor]]:
    """Copies of the buckets' parameters, taken before the step (for :func:`multiply_updates_`)."""
    with torch.no_grad():
        return [list(torch._foreach_mul(list(params), 1.0)) for _, params in buckets]


def multiply_updates_(buckets: Buckets, before: list[list[Tensor]]) -> None:
    """Set ``p = p + (gamma - 1) * (p - p_before)``: the step ``p - p_before`` multiplied by ``gamma``."""
    with torch.no_grad():
        for (gamma, params), old in zip(buckets, before, strict=True):
            torch._foreach_sub_(old, list(params))  # old := -(step)
            torch._foreach_add_(list(params), old, alpha=1.0 - gamma)


def _multiplier(gamma: float, grad: Tensor) -> float | Tensor:
    """What to hand ``_foreach_mul_`` so that it rounds exactly like ``grad.mul_(gamma)``.

    On CPU, ``_foreach_mul_`` with a Python scalar first rounds the scalar to a float16/bfloat16 list's dtype
    (1/15 becomes 0.0669 in bfloat16), whereas ``grad.mul_(gamma)`` multiplies in float32; a 0-d float32 tensor
    gives the float32 multiply. DTensor gradients (FSDP2) take Python scalars only; elsewhere a Python scalar is
    exact and keeps the step free of host-device syncs.
    """
    distributed = hasattr(grad, "device_mesh")
    if grad.device.type == "cpu" and grad.dtype in (torch.float16, torch.bfloat16) and not distributed:
        return torch.tensor(gamma, dtype=torch.float32)
    return gamma


def momentum_to_standard(state_dict: dict[str, Any]) -> None:
    """SGD ``"lr"`` mode's momentum, kept in ``1/gamma`` units, in standard units in a state dict (in place; the live
    buffers are left alone). Held in float64, so that :func:`momentum_to_internal` gets the buffers back exactly."""
    for group in state_dict["param_groups"]:
        scale = group.get(UNITS, 1.0)
        for index in group["params"] if scale != 1.0 else ():
            entry = state_dict["state"].get(index)
            if entry and entry.get("momentum_buffer") is not None:
                state_dict["state"][index] = {**entry, "momentum_buffer": entry["momentum_buffer"].double() * scale}
        if UNITS in group:
            group[UNITS] = 1.0


def momentum_to_internal(state_dict: dict[str, Any], live: Sequence[dict[str, Any]]) -> None:
    """The inverse, on a state dict in the layout of the ``live`` groups, before torch's ``load_state_dict`` (new
    entries and groups: the caller's dict is left as it was)."""
    state_dict["state"] = dict(state_dict["state"])
    state_dict["param_groups"] = [dict(group) for group in state_dict["param_groups"]]
    for group, live_group in zip(state_dict["param_groups"], live, strict=False):  # (torch checks the sizes)
        scale, gamma = group.get(UNITS, 1.0), group.get(GAMMA, 1.0)
        for index, p in zip(group["params"] if scale != gamma else (), live_group["params"], strict=False):
            entry = state_dict["state"].get(index)
            if entry and entry.get("momentum_buffer") is not None:
                buffer = entry["momentum_buffer"].double() * scale / gamma
                state_dict["state"][index] = {**entry, "momentum_buffer": buffer.to(p.dtype)}
        group[UNITS] = gamma


def rescale_momentum(state: Any, params: Sequence[Tensor], factor: float) -> None:
    """Multiply the SGD momentum buffers of ``params`` by ``factor`` (new tensors: a saved state dict keeps its own)."""
    entries = [s for s in map(state.get, params) if s and s.get("momentum_buffer") is not None]
    buffers = torch._foreach_mul([s["momentum_buffer"] for s in entries], factor) if entries else []
    for entry, buffer in zip(entries, buffers, strict=True):
        entry["momentum_buffer"] = buffer
