"""How PDMP applies a modality's coefficient, and which way ``mode="auto"`` picks for an optimizer.

Each mode equals a reference you can build by hand (:mod:`pdmp_optim.reference` builds them):

* ``"grad"``: the bare optimizer on the modality's gradients multiplied by gamma (the paper's Eq. 10-11). Its
  update is multiplied by gamma when the update is linear in the gradient: torch's SGD and ASGD.
* ``"lr"``: the bare optimizer with the modality's ``lr`` multiplied by gamma for the step (its weight decay divided
  by gamma where the decay is SGD's or decoupled, see :func:`compensates_decay`). Its update is multiplied by
  gamma when the update is proportional to ``lr``: the Adam family, RMSprop, Adagrad, and most other optimizers.
* ``"update"``: the bare step, then ``p = p_old + gamma * (p - p_old)``. Exact for additive optimizers that keep no
  copy of the parameters in their state: torch's Rprop (``lr`` is only its initial step size) and Adafactor
  (``lr`` is only a cap). Not what it sounds like for optimizers that rebuild the parameters from their state
  (Lookahead, schedule-free, FTRL): the next step pulls the multiplied step back.

``mode="auto"`` picks ``"grad"`` for the SGD family, ``"update"`` for Rprop and Adafactor, and ``"lr"`` for every
other optimizer whose param groups have an ``lr``; it looks through a wrapper only where the wrapper is linear in
the step of the optimizer it drives (Lookahead, ``ZeroRedundancyOptimizer``), and refuses where no mode can be
shown to hold (LBFGS, no ``lr``). An explicit mode that is known not to move the modality warns.

>>> import torch
>>> w = [torch.nn.Parameter(torch.zeros(2))]
>>> resolve_mode(torch.optim.SGD(w, lr=0.1), "auto")[0], resolve_mode(torch.optim.AdamW(w), "auto")[0]
('grad', 'lr')
>>> resolve_mode(torch.optim.Rprop(w), "auto")[0]
'update'
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch.optim import Optimizer

__all__ = ["MODES", "Mode", "compensates_decay", "driven_optimizer", "resolve_mode"]

Mode = Literal["auto", "grad", "lr", "update"]
MODES: tuple[str, ...] = ("auto", "grad", "lr", "update")

# exact classes: a subclass may change step() arbitrarily
_GRADIENT_LINEAR = (torch.optim.SGD, torch.optim.ASGD)
# (package, class) of optimizers that add their step to the parameters and whose lr does not scale it: update mode
# measured to move each modality gamma times as far (tests/test_catalogue.py), lr mode next to nothing or every group
_ADDITIVE = {
    ("torch", "Rprop"): "reads lr only as its initial step size",
    ("torch", "Adafactor"): "uses lr only as a cap",
    ("pytorch_optimizer", "AdaFactor"): "ignores lr in its relative step (its default)",
    ("pytorch_optimizer", "AdamG"): "caps lr at its own step size",
    ("pytorch_optimizer", "ApolloDQN"): "reads the lr it was built with during its warm-up",
    **{("pytorch_optimizer", n): "multiplies lr by one step size d it estimates from all groups together"
       for n in ("DAdaptAdam", "DAdaptAdan", "DAdaptLion")},
}  # fmt: skip
# optimizers where neither lr nor update mode moves a modality gamma times as far (measured): auto refuses them
_NO_MODE_KNOWN = {
    ("pytorch_optimizer", n): "estimates one step size d from all groups together (lr x gamma moves every modality "
    "and d runs away) and rebuilds or rescales what a multiplied update adds"
    for n in ("Prodigy", "DAdaptSGD", "DAdaptAdaGrad")
}
# optimizers that rebuild the parameters from their own state: a multiplied step is pulled back (measured)
_REBUILDS = ("Lookahead", "Ranger", "ScheduleFree", "FTRL", "SRMM", "Nero", "DAdaptAdaGrad", "DAdaptSGD", "A2Grad",
             "MADGRAD")  # fmt: skip
_NO_MODE = (
    "LBFGS keeps a single param group and its quasi-Newton step undoes a constant gradient scale, so no PDMP mode "
    "multiplies its update by gamma; use another optimizer"
)


def driven_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose step a linear wrapper (Lookahead, ``ZeroRedundancyOptimizer``) drives, else ``optimizer``.

    >>> import torch
    >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> driven_optimizer(sgd) is sgd
    True
    """
    zero = getattr(getattr(torch.distributed, "optim", None), "ZeroRedundancyOptimizer", ())
    for _ in range(8):  # (a wrapper of a wrapper; never round in a cycle)
        found = (getattr(optimizer, a, None) for a in ("_base_optimizer", "optimizer", "optim"))
        inner = [v for v in found if isinstance(v, Optimizer)]
        if not inner or not (type(optimizer).__name__ == "Lookahead" or isinstance(optimizer, zero)):
            break
        optimizer = inner[0]
    return optimizer


def resolve_mode(optimizer: Optimizer, mode: str) -> tuple[Literal["grad", "lr", "update"], str]:
    """Return the concrete mode for ``optimizer`` and a short reason (shown by ``repr``).

    >>> import torch
    >>> resolve_mode(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "auto")
    ('grad', "auto: SGD's update is linear in the gradient, so gradients are scaled")
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(getattr(optimizer, "param_groups", None), list):
        raise TypeError(
            f"{type(optimizer).__name__} has no param_groups of its own (it steps copies of the parameters, such as "
            "fp32 master weights), so no PDMP mode ('grad', 'lr' or 'update') reaches the model's parameters; wrap a "
            "plain optimizer (for mixed precision, torch.amp with a GradScaler: scaler.step(opt) works)"
        )
    base = driven_optimizer(optimizer)
    name = type(optimizer).__name__ if base is optimizer else f"{type(optimizer).__name__}({type(base).__name__})"
    has_lr = all("lr" in group for group in optimizer.param_groups)
    if type(base) is torch.optim.LBFGS:
        raise ValueError(_NO_MODE)
    if mode == "lr" and not has_lr:
        raise ValueError(f"mode='lr' scales each group's 'lr', but {name} has none; use mode='grad' or 'update'")
    gradient_linear = type(base) in _GRADIENT_LINEAR and not optimizer.defaults.get("differentiable")
    if mode == "grad" and optimizer.defaults.get("differentiable"):
        raise ValueError("mode='grad' multiplies gradients in place, out of autograd's sight, so with "
                         "differentiable=True the hypergradient misses gamma; use mode='lr' (or 'auto')")  # fmt: skip
    additive = _ADDITIVE.get(_qualified(type(base)))
    if mode == "auto":
        if _qualified(type(base)) in _NO_MODE_KNOWN:
            raise ValueError(
                f"mode='auto' knows no mode that multiplies {name}'s step by gamma: it "
                f"{_NO_MODE_KNOWN[_qualified(type(base))]}; pass mode='lr' or mode='update' knowingly, or use another "
                "optimizer"
            )
        if gradient_linear:
            return "grad", f"auto: {name}'s update is linear in the gradient, so gradients are scaled"
        if additive:
            return "update", f"auto: {name} {additive} and keeps no copy of the parameters, so its update is scaled"
        if has_lr:
            return "lr", f"auto: {name}'s update is proportional to lr (as for the Adam family), so lr is scaled"
        raise ValueError(
            f"mode='auto' knows no mode that multiplies {name}'s update: it is not SGD, Rprop or Adafactor and its "
            "param groups have no 'lr'; pass mode='grad' (gradients multiplied) or mode='update' (steps multiplied) "
            "if you know one holds for it"
        )
    if mode == "grad" and not gradient_linear:
        _warn(f"mode='grad' with {name}: its update is not known to be linear in the gradient (adaptive and "
              "sign-based optimizers normalise scale away), so gamma may have no effect; use mode='auto'")  # fmt: skip
    elif mode == "lr" and additive:
        _warn(f"mode='lr' with {name}: it {additive}, so lr x gamma barely moves the modality; use mode='auto'")
    elif mode == "update" and any(key.lower() in name.lower() for key in _REBUILDS):  # Lookahead(SGD) too
        _warn(f"mode='update' with {name}: it rebuilds the parameters from its own state, so its next steps pull a "
              "multiplied step back; use mode='auto' (lr)")  # fmt: skip
    return mode, "explicit"  # type: ignore[return-value]


def compensates_decay(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``"lr"`` mode divides ``group``'s weight decay by gamma while it multiplies its lr.

    For SGD, ``lr * gamma`` with ``weight_decay / gamma`` is grad mode's step in exact arithmetic; for a decoupled
    decay (AdamW, ``decoupled_weight_decay=True``, Muon) it keeps ``lr * weight_decay``, the decay, as set.

    >>> import torch
    >>> adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], weight_decay=0.01)
    >>> compensates_decay(adamw, adamw.param_groups[0])
    True
    """
    return "weight_decay" in group and (
        type(optimizer) is torch.optim.SGD
        or bool(group.get("decoupled_weight_decay"))  # torch >= 2.6 marks AdamW's groups so, too
        or type(driven_optimizer(optimizer)) in (torch.optim.AdamW, getattr(torch.optim, "Muon", None))
    )


def _qualified(cls: type) -> tuple[str, str]:
    """``("torch", name)`` for torch.optim's own classes (not subclasses), else (top-level package, name)."""
    package = "torch" if getattr(torch.optim, cls.__name__, None) is cls else cls.__module__.partition(".")[0]
    return package, cls.__name__


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)
