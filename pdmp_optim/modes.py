"""How PDMP applies a modality's coefficient: to its gradients, its learning rate, or its update.

PDMP multiplies each modality's *update* by its coefficient. Three mechanisms do that, each exact only for some
optimizers:

* ``"grad"`` multiplies the gradients before the step (the paper's Eq. 10-11). Right for optimizers whose
  update follows the gradient's scale: SGD, ASGD. Adaptive and sign-based optimizers normalise that scale away,
  so there it would silently change almost nothing.
* ``"lr"`` multiplies each modality's learning rate for the duration of the step and restores it exactly.
  Right for optimizers whose update is proportional to ``lr`` at every step: Adam and kin, RMSprop, Adagrad,
  Adadelta, Muon. Not for Rprop (it reads ``lr`` only when its state is created) or Adafactor (its relative step
  caps ``lr``).
* ``"update"`` takes the step, then sets ``p = p_old + gamma * (p - p_old)`` for the modality's parameters.
  Right for any optimizer, at the cost of one copy of those parameters per step.

``mode="auto"`` picks ``"grad"`` or ``"lr"`` only for the torch classes listed above (looking through wrappers
such as Lookahead to the optimizer they drive) and ``"update"`` for everything else, except LBFGS, which no mode
fits (its quasi-Newton step undoes a constant gradient scale, and its curvature pairs absorb a scaled step): auto
refuses it, and an explicit mode warns.

>>> import torch
>>> w = [torch.nn.Parameter(torch.zeros(2))]
>>> resolve_mode(torch.optim.SGD(w, lr=0.1), "auto")[0]
'grad'
>>> resolve_mode(torch.optim.AdamW(w), "auto")[0]
'lr'
>>> resolve_mode(torch.optim.Rprop(w), "auto")[0]
'update'
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch.optim import Optimizer

__all__ = ["MODES", "Mode", "base_optimizer", "is_scale_invariant", "resolve_mode"]

Mode = Literal["auto", "grad", "lr", "update"]
MODES: tuple[str, ...] = ("auto", "grad", "lr", "update")


def _classes(*names: str) -> tuple[type[Optimizer], ...]:
    return tuple(getattr(torch.optim, name) for name in names if hasattr(torch.optim, name))


# exact classes only: a subclass may change step() arbitrarily, so it gets the mechanism that is right for any
GRAD_EXACT = _classes("SGD", "ASGD")
LR_EXACT = _classes("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam", "Muon")
_LR_WRONG = {"Rprop": "reads lr only when its state is created", "Adafactor": "caps lr with its relative step"}
_NO_MODE = (
    "LBFGS's quasi-Newton step undoes a constant gradient scale and its curvature pairs absorb a scaled step, so "
    "no PDMP mode multiplies its update by gamma (measured: grad mode leaves it unchanged)"
)
# where optimizer wrappers keep the optimizer they drive: timm's Lookahead, pytorch_optimizer, ZeroRedundancyOptimizer
_WRAPPED_ATTRS = ("_base_optimizer", "base_optimizer", "optimizer", "optim")


def base_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that really computes the update, looking through wrappers such as Lookahead or ZeRO.

    >>> import torch
    >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> base_optimizer(sgd) is sgd
    True
    """
    seen = {id(optimizer)}
    while True:
        inner = next(
            (getattr(optimizer, a) for a in _WRAPPED_ATTRS if isinstance(getattr(optimizer, a, None), Optimizer)), None
        )
        if inner is None or id(inner) in seen:
            return optimizer
        seen.add(id(inner))
        optimizer = inner


def is_scale_invariant(optimizer: Optimizer) -> bool:
    """Whether multiplying every gradient by a constant leaves ``optimizer``'s update (almost) unchanged.

    True for torch's adaptive and sign-based optimizers (also inside a wrapper); unknown classes give ``False``.

    >>> import torch
    >>> is_scale_invariant(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]))
    True
    """
    base = type(base_optimizer(optimizer))
    if base is torch.optim.LBFGS:
        return True
    return base in LR_EXACT or (base.__name__ in _LR_WRONG and base is getattr(torch.optim, base.__name__, None))


def resolve_mode(optimizer: Optimizer, mode: str) -> tuple[Literal["grad", "lr", "update"], str]:
    """Return the concrete mode for ``optimizer`` and a short reason (shown by ``repr``).

    An explicit mode that cannot multiply this optimizer's update by gamma warns (``"grad"`` on an adaptive
    optimizer, ``"lr"`` on Rprop/Adafactor) or raises (``"lr"`` on a wrapper that keeps param groups of its own).

    >>> import torch
    >>> resolve_mode(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "auto")
    ('grad', "auto: SGD follows the gradient's scale, so gradients are scaled")
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base = base_optimizer(optimizer)
    name = type(optimizer).__name__ if base is optimizer else f"{type(optimizer).__name__}({type(base).__name__})"
    shares_groups = base is optimizer or base.param_groups is optimizer.param_groups
    if type(base) is torch.optim.LBFGS:
        if mode == "auto":
            raise ValueError(f"{_NO_MODE}; use another optimizer, or pass mode='grad' or 'update' knowingly")
        _warn(f"mode={mode!r} with {name}: {_NO_MODE}")
        return mode, "explicit"  # type: ignore[return-value]
    if mode == "auto":
        if type(base) in GRAD_EXACT:
            return "grad", f"auto: {name} follows the gradient's scale, so gradients are scaled"
        if type(base) in LR_EXACT and shares_groups:
            return "lr", f"auto: {name} normalises the gradient scale away and its update is proportional to lr"
        return "update", f"auto: PDMP knows no exact lr or gradient rule for {name}, so its update is scaled"
    if mode == "grad" and is_scale_invariant(optimizer):
        _warn(f"mode='grad' with {name}: it normalises the gradient scale away, so multiplying gradients changes its "
              "updates very little; use mode='auto' (or 'lr'/'update') to scale the updates")  # fmt: skip
    if mode == "lr":
        if not shares_groups:
            raise ValueError(
                f"mode='lr' with {name}: the wrapper keeps param groups of its own, so the learning rates PDMP would "
                "scale are not the ones its inner optimizer reads; use mode='update' (or 'auto')"
            )
        reason = _LR_WRONG.get(type(base).__name__)
        if reason is not None and type(base) is getattr(torch.optim, type(base).__name__, None):
            _warn(f"mode='lr' with {name}: it {reason}, so its update is not multiplied by gamma; use mode='update'")
    return mode, "explicit"  # type: ignore[return-value]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)
