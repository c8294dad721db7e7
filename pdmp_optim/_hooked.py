"""Which gradients the backward-hook mode has scaled, so that no gradient is scaled twice, or not at all.

A hook set built from a ``PDMPOptimizer`` (``scale_encoder_grads(encoders, opt)``) records, when its hooks fire in a
backward pass, the parameters whose gradients it scaled: they stay *pending* until that optimizer steps or zeroes its
gradients, also after the hooks are removed, and the optimizer's step leaves exactly those to the hooks. Hooks that
never fired (a forward that bypassed them) leave nothing pending, so the optimizer scales as usual.

A hook set built from a mapping or a ranking knows no optimizer: it must not hook parameters that a
``PDMPOptimizer`` scales. Whichever of the two is built second refuses, naming the fix.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Container, Iterable
from typing import Any, Protocol

from torch import Tensor

__all__ = [
    "HookSet",
    "any_pending",
    "conflict_message",
    "installed_conflict",
    "leave_to_hooks",
    "optimizers",
    "scaled_by_an_optimizer",
    "settle",
    "track",
]


class HookSet(Protocol):
    owner: Any  # the PDMPOptimizer the hooks took their gammas from, or None
    scaled_params: set[Tensor]  # the parameters behind the hooked encoders
    pending: set[Tensor]  # the parameters whose gradients the hooks scaled since their optimizer last stepped

    @property
    def active(self) -> bool: ...


_sets: set[Any] = set()  # hook sets installed, or with pending gradients (held until their optimizer settles them)
optimizers: weakref.WeakSet[Any] = weakref.WeakSet()  # the PDMPOptimizers alive


def track(hooks: HookSet) -> None:
    _sets.add(hooks)


def scaled_by_an_optimizer(params: Iterable[Tensor]) -> int:
    """How many of ``params`` a live ``PDMPOptimizer`` scales (gamma other than 1)."""
    params = list(params)

    def count() -> int:
        return max((sum(opt._gamma_of(p) != 1.0 for p in params) for opt in list(optimizers)), default=0)

    if count():
        gc.collect()  # an optimizer the caller dropped may linger in a reference cycle: count the live ones only
    return count()


def conflict_message(count: int) -> str:
    return (
        f"{count} parameters of this PDMPOptimizer's modalities are also scaled by scale_encoder_grads hooks that "
        "were not built from it, so their gradients would be scaled twice; build the hooks from this optimizer "
        "(scale_encoder_grads(encoders, opt)) to scale each modality once, step a plain optimizer, or remove() the "
        "hooks before the backward pass"
    )


def installed_conflict(owner: Any, params: Container[Tensor]) -> int:
    """How many of ``params`` are behind installed hooks built otherwise than from ``owner``."""
    return sum(sum(p in params for p in h.scaled_params) for h in list(_sets) if h.active and h.owner is not owner)


def leave_to_hooks(owner: Any, params: Container[Tensor]) -> set[Tensor]:
    """The ``params`` whose gradients hooks built from ``owner`` already scaled; raises if other hooks scaled some."""
    mine: set[Tensor] = set()
    for hooks in list(_sets):
        shared = {p for p in hooks.pending if p in params}
        if shared and hooks.owner is not owner:
            raise RuntimeError(conflict_message(len(shared)))
        mine |= shared
    return mine


def settle(params: Iterable[Tensor] | Container[Tensor]) -> None:
    """The gradients of ``params`` were stepped or zeroed: nothing of them is pending any more."""
    for hooks in list(_sets):
        if hooks.pending:
            hooks.pending = {p for p in hooks.pending if p not in params}  # type: ignore[operator]
        if not hooks.active and not hooks.pending:
            _sets.discard(hooks)


def any_pending() -> bool:
    return any(h.pending for h in _sets) if _sets else False
