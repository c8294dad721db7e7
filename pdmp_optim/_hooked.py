"""Which parameters the backward-hook mode scales right now, so that no gradient is scaled twice.

:func:`~pdmp_optim.scale_encoder_grads` registers its hook sets here; :class:`~pdmp_optim.PDMPOptimizer` asks before
each step which of its parameters they already scale. ``generation`` changes whenever a hook set is added or
removed, so the optimizer rebuilds its plan only then.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from torch import Tensor

__all__ = ["HookSet", "add", "discard", "generation", "overlap"]


class HookSet(Protocol):
    owner: Any  # the PDMPOptimizer the hooks took their gammas from, or None
    scaled_params: set[Tensor]


_active: weakref.WeakSet[Any] = weakref.WeakSet()
_generation = [0]


def generation() -> int:
    """A counter that changes whenever a hook set is added or removed."""
    return _generation[0]


def add(hooks: HookSet) -> None:
    _active.add(hooks)
    _generation[0] += 1


def discard(hooks: HookSet) -> None:
    _active.discard(hooks)
    _generation[0] += 1


def overlap(owner: Any, params: Iterable[Tensor]) -> tuple[set[Tensor], str | None]:
    """The ``params`` that hooks built from ``owner`` scale, and a message if hooks built otherwise scale some."""
    if not _active:
        return set(), None
    params = list(params)
    mine: set[Tensor] = set()
    for hooks in list(_active):
        shared = {p for p in params if p in hooks.scaled_params}
        if shared and hooks.owner is not owner:
            return mine, (
                f"{len(shared)} parameters of this PDMPOptimizer's modalities are also scaled by scale_encoder_grads "
                "hooks that were not built from it, so their gradients would be scaled twice; build the hooks from "
                "this optimizer (scale_encoder_grads(encoders, opt)) to scale each modality once, step a plain "
                "optimizer, or remove() the hooks"
            )
        mine |= shared
    return mine, None
