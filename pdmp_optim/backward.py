"""Backward-hook mode: scale the gradient that flows *out of* each encoder instead of every parameter gradient.

``PDMPOptimizer`` in ``"grad"`` mode multiplies every parameter gradient of a modality by its gamma just before
``step()``: one pass over all of the encoder's gradients. :func:`scale_encoder_grads` gets the same parameter
gradients by multiplying only the gradient of each encoder's *output* (a batch x features tensor) during
backward; the chain rule, which is linear in that upstream gradient, carries the factor to every parameter
behind it.

>>> import torch
>>> from torch import nn
>>> audio, visual, head = nn.Linear(4, 8), nn.Linear(6, 8), nn.Linear(16, 3)
>>> opt = torch.optim.SGD([*audio.parameters(), *visual.parameters(), *head.parameters()], lr=0.1)
>>> with scale_encoder_grads({"audio": audio, "visual": visual}, {"audio": 0.25, "visual": 4.0}):
...     loss = head(torch.cat([audio(torch.randn(2, 4)), visual(torch.randn(2, 6))], dim=1)).sum()
...     loss.backward()
>>> opt.step(); opt.zero_grad()

When it equals ``"grad"`` mode: a parameter's gradient is exactly ``gamma`` times its unscaled gradient when
*every* path from the loss to that parameter passes through a hooked output of its encoder (true for any
encoder architecture: linear, MLP, conv, attention, batch norm). In floating point the two modes multiply at
different points of the computation, and the hooked gradient reaches backward as a fresh contiguous tensor (which
can change the order in which kernels sum), so results agree to rounding (a few ulps), not bit for bit. They
differ, by design of the math, when:

- the encoder's parameters also get gradient another way: weights shared with the head or another encoder,
  an auxiliary loss or regulariser computed on intermediate activations or on the parameters themselves
  (an L2 penalty added to the loss is scaled in ``"grad"`` mode, not here);
- something *upstream* of the encoder is trained (a shared stem, an embedding that feeds the encoder, an input
  that requires grad): it receives the scaled gradient here but not in ``"grad"`` mode (a warning says so
  once);
- the optimizer normalises the gradient scale away (Adam, AdamW, RMSprop, ...): like ``"grad"`` mode, this
  mode then changes almost nothing; ``PDMPOptimizer``'s ``"lr"`` mode is the right tool there.

Weight decay done inside the optimizer (``SGD(weight_decay=...)``, ``AdamW``) is added after the gradient is
final, so it is *not* scaled, in this mode and in ``"grad"`` mode alike.

It replaces ``PDMPOptimizer``'s gradient scaling, with a plain optimizer; the two together would scale each
gradient twice, so whichever of a ``PDMPOptimizer`` and hooks over the same parameters is built second raises, and
the hooks refuse an optimizer as their coefficients. With SGD, ``PDMPOptimizer(mode="lr")`` costs no pass at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.hooks import RemovableHandle

from ._checks import check_gammas, check_modalities, takes_encoders
from ._exclusive import claim
from .ranking import ModalityRanking

__all__ = ["EncoderGradScaling", "scale_encoder_grads"]

Gammas = Mapping[str, float] | ModalityRanking


class EncoderGradScaling:
    """Hooks that multiply the gradient flowing out of each encoder by its gamma; :meth:`remove` them to undo.

    Build it with :func:`scale_encoder_grads` (same arguments), or directly.

    >>> import torch
    >>> enc = torch.nn.Linear(3, 2)
    >>> hooks = EncoderGradScaling({"audio": enc}, {"audio": 2.0})
    >>> enc(torch.ones(1, 3)).sum().backward()
    >>> enc.bias.grad
    tensor([2., 2.])
    >>> hooks.remove()

    Raises:
        TypeError: ``groups`` is not a mapping of ``nn.Module``, or ``gammas`` is neither a mapping nor a
            ``ModalityRanking`` (an optimizer, a ``PDMPOptimizer`` included, is refused).
        ValueError: empty ``groups``; modality names that differ between ``groups`` and ``gammas``; a gamma
            that is not a finite number > 0; the same module (or one inside another) given twice; an encoder
            without trainable parameters.
    """

    @takes_encoders
    def __init__(self, groups: Mapping[str, nn.Module], gammas: Gammas) -> None:
        fixed = _gammas_of(gammas)
        _check_groups(groups, fixed)
        self._gammas = fixed
        self._warned_upstream = False
        self._params = {p for encoder in groups.values() for p in encoder.parameters()}  # (frozen ones may thaw)
        self._handles: list[RemovableHandle] = []
        claim(self, "hooks")
        self._handles = [encoder.register_forward_hook(self._forward_hook(m)) for m, encoder in groups.items()]

    def scaled_params(self) -> set[Tensor]:
        """The trainable parameters of the hooked encoders (their gradients are scaled)."""
        return set(self._params)

    @property
    def gammas(self) -> dict[str, float]:
        """Each modality's coefficient (a copy); assign a whole mapping to change them from the next forward pass on."""
        return dict(self._gammas)

    @gammas.setter
    def gammas(self, value: Mapping[str, float]) -> None:
        self._gammas = check_gammas(value, self._gammas, every=True)

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; later backward passes are unscaled. Calling it twice is harmless."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> EncoderGradScaling:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"EncoderGradScaling({'active' if self.active else 'removed'}, gammas={self.gammas})"

    def _forward_hook(self, modality: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            gamma = self._gammas[modality]
            if not self._warned_upstream and any(
                t.requires_grad for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)
            ):
                self._warned_upstream = True
                warnings.warn(
                    f"an input of encoder {modality!r} requires grad, so whatever produced it (a shared stem, a "
                    f"trained embedding) also receives gradients scaled by {gamma:g}; hook a module that starts "
                    "at the raw input, or use PDMPOptimizer's 'grad' mode if that stem must stay unscaled",
                    UserWarning,
                    stacklevel=1,
                )
            # each returned tensor becomes a node of its own that scales its gradient, so that a path through two of
            # them (an output computed from another, such as Hugging Face's pooler_output) is scaled once
            return tree_map(lambda leaf: _scaled(leaf, gamma, modality), output)

        return hook


@takes_encoders
def scale_encoder_grads(groups: Mapping[str, nn.Module], gammas: Gammas) -> EncoderGradScaling:
    """Multiply the gradient flowing out of each modality's encoder by its gamma, during backward.

    A forward hook on ``groups[m]`` registers, on every tensor the encoder returns (a tensor, or a
    tuple/list/dict of them, nested), a gradient hook that multiplies it by ``gammas[m]``. The parameter
    gradients that reach the optimizer are then the ones ``PDMPOptimizer(mode="grad")`` would produce (see the
    module docstring for exactly when), at the cost of one multiply of a batch x features tensor per encoder
    instead of one pass over all its parameters.

    Args:
        groups: modality name -> the module whose output is that modality's representation (the last module
            before fusion), as ``groups=`` of ``PDMPOptimizer`` (``encoders=``, 0.2's name, works until 0.4).
        gammas: modality -> coefficient (finite, > 0), e.g. ``ranking.gammas(gamma_p=15)``; a
            :class:`~pdmp_optim.ModalityRanking` (its ``gammas()``). Every encoder needs a coefficient and every
            coefficient an encoder.

    Returns:
        An :class:`EncoderGradScaling`; ``remove()`` it, or use it as a context manager.

    >>> import torch
    >>> enc = {"audio": torch.nn.Linear(3, 2), "visual": torch.nn.Linear(3, 2)}
    >>> with scale_encoder_grads(enc, {"audio": 0.5, "visual": 4.0}) as hooks:
    ...     (enc["audio"](torch.ones(1, 3)) + enc["visual"](torch.ones(1, 3))).sum().backward()
    >>> enc["audio"].bias.grad, enc["visual"].bias.grad, hooks.active
    (tensor([0.5000, 0.5000]), tensor([4., 4.]), False)
    """
    return EncoderGradScaling(groups, gammas)


# ---------------------------------------------------------------------------------------------- helpers
def _gammas_of(gammas: Any) -> dict[str, float]:
    if isinstance(gammas, ModalityRanking):
        return gammas.gammas()
    if isinstance(gammas, torch.optim.Optimizer):
        raise TypeError(
            "scale_encoder_grads takes the coefficients, not an optimizer: a PDMPOptimizer scales these gradients "
            "itself, so the two together would scale them twice. Use the hooks with a plain optimizer and "
            "dict(opt.gammas), or the PDMPOptimizer alone (mode='lr' costs SGD no pass over the gradients)"
        )
    if not isinstance(gammas, Mapping):
        raise TypeError(
            f"gammas must map modality -> coefficient, or be a ModalityRanking, got {type(gammas).__name__}; "
            "e.g. ranking.gammas(gamma_p=15)"
        )
    return check_gammas(gammas)


def _check_groups(encoders: Any, gammas: Mapping[str, float]) -> None:
    check_modalities(encoders, "groups", "an nn.Module (hooks attach to modules)", nn.Module, at_least=1)
    for modality, encoder in encoders.items():
        if not _trains_something(encoder):
            raise ValueError(
                f"groups[{modality!r}] has no trainable parameter, so there is nothing to scale; pass the "
                "module that holds the modality's trainable encoder"
            )
    missing, extra = [m for m in encoders if m not in gammas], [m for m in gammas if m not in encoders]
    if missing or extra:
        raise ValueError(
            f"groups and gammas must name the same modalities: no gamma for {missing}, no encoder for {extra}; "
            "give every encoder a coefficient and every coefficient an encoder"
        )
    _check_disjoint(encoders)


def _trains_something(encoder: nn.Module) -> bool:
    """A trainable parameter, or a tensor attribute that requires grad (FSDP1 with flat parameters leaves views of
    the flat parameter on the modules in place of their parameters)."""
    if any(p.requires_grad for p in encoder.parameters()):
        return True
    return any(isinstance(v, Tensor) and v.requires_grad for m in encoder.modules() for v in vars(m).values())


def _check_disjoint(encoders: Mapping[str, nn.Module]) -> None:
    """Reject a module or parameter in two encoders (one inside another, tied weights): scaled twice."""
    owner: dict[Any, str] = {}
    for modality, encoder in encoders.items():
        for item in [*encoder.modules(), *encoder.parameters()]:
            other = owner.setdefault(item, modality)
            if other != modality:
                what = f"parameter of shape {tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
                raise ValueError(
                    f"groups[{other!r}] and groups[{modality!r}] share a {what}; each modality needs its own "
                    "encoder, else its gradients are scaled twice"
                )


class _ScaleGrad(torch.autograd.Function):
    """The identity (a copy, so that in-place ops on it downstream are safe) whose gradient is multiplied by gamma."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: float) -> Tensor:
        ctx.gamma = gamma
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.gamma, None


def _scaled(leaf: Any, gamma: float, modality: str) -> Any:
    """A leaf of an encoder's output, its gradient multiplied by ``gamma`` if it is a tensor that requires grad."""
    if isinstance(leaf, Tensor):
        return _ScaleGrad.apply(leaf, gamma) if leaf.requires_grad and gamma != 1.0 else leaf
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return leaf
    raise TypeError(
        f"encoder {modality!r} returned a {type(leaf).__name__}; scale_encoder_grads handles tensors and "
        "tuples/lists/dicts of tensors; hook the submodule that returns the representation tensor instead"
    )
