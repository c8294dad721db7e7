"""How PDMP applies a modality's coefficient: to its gradients, or to its learning rate.

Multiplying gradients by a constant (``mode="grad"``, the paper's Eq. 10-11) changes SGD's update, but
adaptive and sign-based optimizers (Adam and kin, RMSprop, Adagrad, Rprop, Lion, Adafactor, Muon, ...)
normalise the gradient's scale away, so the same multiplication would silently do almost nothing. For those,
``mode="lr"`` multiplies each modality's learning rate for the duration of ``step()`` instead, which scales
its effective update by the same factor. ``mode="auto"`` picks between the two:

>>> import torch
>>> w = [torch.nn.Parameter(torch.zeros(2))]
>>> resolve_mode(torch.optim.SGD(w, lr=0.1), "auto")[0]
'grad'
>>> resolve_mode(torch.optim.AdamW(w), "auto")
('lr', 'auto: AdamW normalises the gradient scale away, so the learning rate is scaled')
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["MODES", "Mode", "is_scale_invariant", "resolve_mode"]

Mode = Literal["auto", "grad", "lr"]
MODES: tuple[str, ...] = ("auto", "grad", "lr")

# torch.optim classes whose update does not change (or barely changes) when every gradient is multiplied
# by the same constant.
_SCALE_INVARIANT: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta",
        "SparseAdam", "Rprop", "Adafactor", "Muon",
    )
    if hasattr(torch.optim, name)
)  # fmt: skip

# Lower-case fragments of third-party optimizer class names with the same property (Lion is sign-based;
# LAMB/LARS normalise per layer; Sophia, Shampoo, Prodigy, Adan are adaptive).
_SCALE_INVARIANT_NAME_HINTS: tuple[str, ...] = (
    "adam", "adagrad", "adadelta", "adafactor", "adan", "rmsprop", "rprop", "lion", "lamb", "lars",
    "muon", "sophia", "shampoo", "prodigy", "soap", "came",
)  # fmt: skip


def is_scale_invariant(optimizer: torch.optim.Optimizer) -> bool:
    """Whether multiplying every gradient by a constant leaves ``optimizer``'s update (almost) unchanged.

    True for torch's adaptive and sign-based optimizers and for third-party classes whose name marks them as
    one of those (``"adam"``, ``"lion"``, ``"lamb"``, ...). Pass ``mode=`` explicitly when this guess is wrong.

    >>> import torch
    >>> is_scale_invariant(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]))
    True
    """
    if isinstance(optimizer, _SCALE_INVARIANT):
        return True
    name = type(optimizer).__name__.lower()
    return any(hint in name for hint in _SCALE_INVARIANT_NAME_HINTS)


def resolve_mode(optimizer: torch.optim.Optimizer, mode: str) -> tuple[Literal["grad", "lr"], str]:
    """Return the concrete mode (``"grad"`` or ``"lr"``) for ``optimizer`` and a short reason for ``repr``.

    >>> import torch
    >>> resolve_mode(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "auto")
    ('grad', "auto: SGD follows the gradient's scale, so gradients are scaled")
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    name = type(optimizer).__name__
    if mode == "grad":
        return "grad", "explicit"
    if mode == "lr":
        return "lr", "explicit"
    if is_scale_invariant(optimizer):
        return "lr", f"auto: {name} normalises the gradient scale away, so the learning rate is scaled"
    return "grad", f"auto: {name} follows the gradient's scale, so gradients are scaled"
