"""A slow, obviously-right twin of :class:`~pdmp_optim.PDMPOptimizer`, for tests and for reading.

It does exactly what the paper says, one tensor at a time: multiply every gradient of modality ``m`` by
``gamma[m]`` (``"grad"`` mode), or every learning rate of a group holding only modality ``m`` (``"lr"`` mode, with
SGD's and decoupled weight decay divided by it), or the step itself (``"update"`` mode), around the plain
optimizer's ``step()``. The tests check the fast wrapper
against it.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> reference_grad_step(opt, {"audio": [w]}, {"audio": 2.0})
>>> w.detach()
tensor([0.8000, 0.8000, 0.8000])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["reference_grad_step", "reference_lr_step", "reference_update_step"]


def reference_grad_step(
    optimizer: Optimizer, params: Mapping[str, Sequence[Tensor]], gammas: Mapping[str, float]
) -> None:
    """Multiply each modality's gradients by its gamma, one tensor at a time, then ``optimizer.step()``."""
    with torch.no_grad():
        for modality, tensors in params.items():
            for p in tensors:
                if p.grad is not None:
                    p.grad.mul_(gammas[modality])
    optimizer.step()


def reference_lr_step(optimizer: Optimizer, group_gammas: Sequence[float]) -> None:
    """Multiply group ``i``'s learning rate by ``group_gammas[i]``, step, and put the old value back.

    Where the weight decay is SGD's or decoupled (AdamW, ``decoupled_weight_decay=True``, Muon) it is divided by the
    same gamma for the step, so that SGD takes grad mode's step and a decoupled decay stays as set.
    """
    saved = [(group["lr"], group.get("weight_decay")) for group in optimizer.param_groups]
    for group, gamma in zip(optimizer.param_groups, group_gammas, strict=True):
        group["lr"] = group["lr"] * gamma
        if _decay_follows_lr(optimizer, group):
            group["weight_decay"] = group["weight_decay"] / gamma
    optimizer.step()
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved, strict=True):
        group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay


def _decay_follows_lr(optimizer: Optimizer, group: dict) -> bool:
    if "weight_decay" not in group:
        return False
    decoupled = group.get("decoupled_weight_decay") or type(optimizer).__name__ in ("AdamW", "Muon")
    return type(optimizer) is torch.optim.SGD or bool(decoupled)


def reference_update_step(
    optimizer: Optimizer, params: Mapping[str, Sequence[Tensor]], gammas: Mapping[str, float]
) -> None:
    """``optimizer.step()``, then ``p = p_old + gamma * (p - p_old)`` for each modality's parameters.

    >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.ones(2)
    >>> reference_update_step(torch.optim.SGD([w], lr=0.1), {"audio": [w]}, {"audio": 3.0})
    >>> w.detach()
    tensor([0.7000, 0.7000])
    """
    before = {m: [p.detach().clone() for p in tensors] for m, tensors in params.items()}
    optimizer.step()
    with torch.no_grad():
        for modality, tensors in params.items():
            for p, old in zip(tensors, before[modality], strict=True):
                p.copy_(old + gammas[modality] * (p - old))
