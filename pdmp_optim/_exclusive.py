"""No gradient is scaled twice: ``PDMPOptimizer`` and ``scale_encoder_grads`` hooks never cover the same parameters.

Each registers itself (weakly) when built, and refuses at once if a live object of the other kind already scales
one of its parameters: whichever of the two comes second raises. Nothing here takes part in a step, a state dict or
a copy: the hooks work on their own with a plain optimizer, and the optimizer on its own.

>>> import torch
>>> class Hooks:  # anything with .active and .scaled_params()
...     active = True
...     def scaled_params(self): return {w}
>>> w = torch.nn.Parameter(torch.zeros(1))
>>> hooks = Hooks(); claim(hooks, "hooks")
>>> claim(Hooks(), "optimizer", {torch.nn.Parameter(torch.zeros(1))})  # other parameters: fine
>>> claim(Hooks(), "optimizer", {w})
Traceback (most recent call last):
ValueError: PDMPOptimizer and scale_encoder_grads hooks would both scale the gradients of 1 parameters (twice); ...
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Set
from typing import Any

from torch import Tensor

_LIVE: dict[str, weakref.WeakSet[Any]] = {"optimizer": weakref.WeakSet(), "hooks": weakref.WeakSet()}
_FIX = (
    "PDMPOptimizer and scale_encoder_grads hooks would both scale the gradients of {n} parameters (twice); use one of "
    "them: the hooks with a plain optimizer, or the PDMPOptimizer alone (remove() the hooks, or drop the optimizer)"
)


def claim(owner: Any, kind: str, params: Set[Tensor] | None = None) -> None:
    """Register ``owner`` (``kind`` ``"optimizer"`` or ``"hooks"``); raise if a live object of the other kind scales
    any of ``params`` (default: ``owner.scaled_params()``)."""
    mine = owner.scaled_params() if params is None else params
    other = "hooks" if kind == "optimizer" else "optimizer"

    def shared() -> int:
        return max((len(mine & o.scaled_params()) for o in list(_LIVE[other]) if getattr(o, "active", True)), default=0)

    if shared():
        gc.collect()  # one dropped but still in a reference cycle does not count
        if shared():
            raise ValueError(_FIX.format(n=shared()))
    _LIVE[kind].add(owner)
