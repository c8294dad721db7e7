"""The mark that :meth:`PDMPOptimizer.scale_grads_` leaves: which gradients are scaled already, until when.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> mark = ScaleMark({w})
>>> (w * 2).sum().backward()  # no scaled gradient was there: the mark ends, nothing raises
>>> mark.active
False
>>> mark.remove()
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

__all__ = ["ScaleMark"]


class ScaleMark:
    """The parameters whose gradients :meth:`PDMPOptimizer.scale_grads_` scaled, until a backward reaches them.

    A hook on each runs before backward adds to its gradient: if every scaled gradient was zeroed (or set to
    ``None``) since, a new step has begun and the mark ends; if not, the backward would mix scaled and unscaled
    gradient, and it raises. The hooks hold no gradient, and go with the mark (``weakref.finalize``).
    """

    def __init__(self, params: set[Tensor]) -> None:
        self.params, self.active = params, True
        ref = weakref.ref(self)

        def before_accumulation(grad: Tensor) -> None:
            mark = ref()
            if mark is not None and mark.active:
                if any(p.grad is not None and bool(p.grad.any()) for p in mark.params):
                    raise RuntimeError(
                        "backward is adding to gradients that scale_grads_() already scaled, which would leave them "
                        "half scaled; call scale_grads_() once per step, after the last backward (after gradient "
                        "accumulation), or zero the gradients first"
                    )
                mark.active = False

        handles = [p.register_hook(before_accumulation) for p in params if p.requires_grad]
        self.remove = weakref.finalize(self, _remove_all, handles)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
