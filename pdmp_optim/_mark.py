"""Which gradients :meth:`PDMPOptimizer.scale_grads_` scaled already, and until when.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> mark = ScaleMark()
>>> mark.add([w])
>>> (w * 2).sum().backward()  # no scaled gradient was there: a new step began, nothing raises
>>> mark.params
set()
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any

from torch import Tensor


class ScaleMark:
    """The parameters whose gradients are scaled already; ``clear()`` at ``step()`` and ``zero_grad()``.

    A hook on each runs before backward adds to its gradient: if every scaled gradient was zeroed (or set to
    ``None``) since, a new step has begun and the mark empties; if not, the backward would mix scaled and unscaled
    gradient, and it raises. The hooks hold no gradient, and go when the mark is cleared or collected.
    """

    def __init__(self) -> None:
        self.params: set[Tensor] = set()
        self._handles: list[Any] = []
        weakref.finalize(self, _remove_all, self._handles)

    def add(self, params: Iterable[Tensor]) -> None:
        if not self.params:
            self.clear()  # hooks of a mark a backward ended
        new = set(params) - self.params
        hook = functools.partial(_before_accumulation, weakref.ref(self))
        self._handles += [p.register_hook(hook) for p in new if p.requires_grad]
        self.params |= new

    def clear(self) -> None:
        self.params = set()
        _remove_all(self._handles)


def _before_accumulation(ref: weakref.ref[ScaleMark], grad: Tensor) -> None:
    mark = ref()
    if mark is None or not mark.params:
        return
    if any(p.grad is not None and bool(p.grad.any()) for p in mark.params):
        raise RuntimeError(
            "backward is adding to gradients that scale_grads_() already scaled, which would leave them half scaled; "
            "call scale_grads_() once per step, after the last backward (after gradient accumulation), or zero the "
            "gradients first (torch.autograd.grad on the parameters, too, belongs before scale_grads_())"
        )
    mark.params = set()  # (its hooks go at the next add or clear, not while backward runs them)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
