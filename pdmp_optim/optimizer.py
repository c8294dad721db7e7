"""``PDMPOptimizer``: wrap any ``torch.optim.Optimizer`` to prioritise the performance-dominant modality.

>>> import torch
>>> from torch import nn
>>> model = nn.ModuleDict({"audio": nn.Linear(4, 8), "visual": nn.Linear(6, 8), "head": nn.Linear(16, 3)})
>>> sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
>>> opt = PDMPOptimizer(sgd, {"audio": model["audio"], "visual": model["visual"]}, dominant="visual")
>>> dict(opt.gammas)
{'audio': 0.06666666666666667, 'visual': 15.0}
>>> x_a, x_v = torch.randn(2, 4), torch.randn(2, 6)
>>> logits = model["head"](torch.cat([model["audio"](x_a), model["visual"](x_v)], dim=1))
>>> logits.sum().backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

from ._apply import (
    momentum_to_internal,
    momentum_to_standard,
    multiply_grads_,
    multiply_updates_,
    rescale_momentum,
    snapshot,
)
from ._checks import check_gammas
from ._exclusive import claim
from ._groups import GAMMA, UNITS, GroupSpec, adopt, in_live_layout, live_membership, modality_of
from ._mark import ScaleMark
from .coefficients import resolve_gammas
from .modes import Mode, compensates_decay, resolve_mode

__all__ = ["PDMPOptimizer"]


class _Inner:
    """An attribute of the wrapped optimizer, read and written through the wrapper: the very same object."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj._optimizer, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        old = getattr(obj._optimizer, self.name)
        setattr(obj._optimizer, self.name, value)
        try:
            obj._adopt()  # param groups assigned through the wrapper are checked at once
        except (TypeError, ValueError):
            setattr(obj._optimizer, self.name, old)
            raise


class PDMPOptimizer(Optimizer):
    """Wrap ``optimizer`` so that each modality's update is multiplied by its PDMP coefficient.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"audio": nn.Linear(4, 8), "visual": nn.Linear(6, 8), "head": nn.Linear(16, 3)})
    >>> sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    >>> opt = PDMPOptimizer(sgd, {"audio": model["audio"], "visual": model["visual"]},
    ...                     dominant="visual", optimization_dominant="audio")
    >>> opt.mode, [(g["modality"], g["pdmp_gamma"]) for g in opt.param_groups]
    ('grad', [('audio', 0.06666666666666667), ('visual', 15.0), (None, 1.0)])
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # it is a torch.optim.Optimizer
    >>> opt.gammas = {"audio": 1.0, "visual": 1.0}  # e.g. pause the modulation for a few epochs

    Every param group holds one modality and carries its ``"modality"`` and ``"pdmp_gamma"``: a group that mixes
    modalities is split into one per modality (same settings), so create LR schedulers after wrapping. The groups
    and ``state`` are the inner optimizer's own objects, so ``state_dict()`` is the inner optimizer's, and
    schedulers, ``GradScaler``, checkpoints (``torch.save``, DCP), copies and frameworks carry PDMP's settings.
    A parameter of a module named in ``groups`` belongs to that modality whenever it enters the optimizer.

    How the coefficient is applied (``mode``, see :mod:`pdmp_optim.modes`): ``"grad"`` multiplies the gradients
    before the step (SGD), ``"lr"`` each group's learning rate for the duration of the step (Adam and kin),
    ``"update"`` the step itself. ``"auto"`` picks one; ``print(opt)`` says which and why.

    Args:
        optimizer: the optimizer you built over all model parameters as usual.
        groups: modality name -> ``nn.Module`` or iterable of parameters; parameters in none (fusion, head) are left
            alone. If ``None``, the optimizer's param groups carry a ``"modality"`` key instead.
        dominant: the performance-dominant modality ``m_p`` (gets ``gamma_p``). May come from ``ranking``.
        gamma_p: prioritisation strength, ``>= 1``; the paper uses 15.
        optimization_dominant: the modality best early in training, ``m_o`` (gets ``1/gamma_p``); every other
            modality gets ``gamma_p``. If unknown, every modality but ``m_p`` gets ``1/gamma_p``.
        gammas: explicit ``{modality: coefficient}``; overrides the rule for the modalities it names.
        ranking: a :class:`~pdmp_optim.ModalityRanking`; supplies ``dominant`` and the early scores.
        mode: ``"auto"``, ``"grad"``, ``"lr"`` or ``"update"``.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or a group is not a module/iterable.
        ValueError: unknown ``dominant``/``optimization_dominant``/``mode``, a parameter in two groups, a trainable
            group parameter the optimizer does not own, an empty group, a gamma that is not a finite number > 0,
            modalities left without a coefficient, a tag that contradicts ``groups``, a group to split while an LR
            scheduler is attached, or a mode that cannot scale this optimizer's update.
    """

    def __init__(self, optimizer: Optimizer, groups: Mapping[str, GroupSpec] | None = None,
                 dominant: str | None = None, *, gamma_p: float = 15.0, optimization_dominant: str | None = None,
                 gammas: Mapping[str, float] | None = None, ranking: Any = None, mode: Mode = "auto",
                 ) -> None:  # fmt: skip
        if isinstance(optimizer, PDMPOptimizer):
            raise TypeError("optimizer is already a PDMPOptimizer; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                "build it first, e.g. PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), groups, ...)"
            )
        self._optimizer = optimizer
        self._mode, self._mode_reason = resolve_mode(optimizer, mode)
        known = modality_of(optimizer, groups)  # (checks groups)
        self._members = live_membership(groups, known)  # where a parameter goes whenever it enters
        modalities = list(dict.fromkeys(known.values()))
        self._gammas = resolve_gammas(modalities, dominant, gamma_p, optimization_dominant, gammas, ranking)
        self._sgd_units = self._mode == "lr" and type(optimizer) is torch.optim.SGD
        self._mark = ScaleMark()
        # torch's hook registries and hooked step (Optimizer.__init__ would rebuild the param groups)
        super().__setstate__({})
        for group in optimizer.param_groups:  # groups an earlier wrapper tagged: this one's arguments decide
            group.pop(GAMMA, None)
            if not self._sgd_units and group.get(UNITS, 1.0) != 1.0:
                rescale_momentum(self.state, group["params"], group.pop(UNITS))  # to standard units
        self._adopt()
        claim(self, "optimizer")

    # ----------------------------------------------------------------------------------------- the protocol
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    param_groups = _Inner()  # type: ignore[assignment]  # the inner optimizer's own list, one modality per group
    state = _Inner()  # type: ignore[assignment]  # the inner optimizer's own per-parameter state
    defaults = _Inner()  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        """Public attributes of the inner optimizer that the wrapper lacks (``train()``/``eval()`` of schedule-free)."""
        inner = self.__dict__.get("_optimizer")
        if inner is not None and not name.startswith("_") and hasattr(inner, name):
            return getattr(inner, name)
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r} (nor has the optimizer it wraps)"
        )

    @property
    def mode(self) -> str:
        """``"grad"``, ``"lr"`` or ``"update"``: how the coefficients are applied."""
        return self._mode

    @property
    def gammas(self) -> Mapping[str, float]:
        """Each modality's coefficient, as its param groups hold it; assign a whole mapping to change them.

        >>> import torch
        >>> enc = torch.nn.Linear(2, 2)
        >>> opt = PDMPOptimizer(torch.optim.SGD(enc.parameters(), lr=0.1), {"audio": enc}, gammas={"audio": 2.0})
        >>> opt.gammas = {"audio": 1.0}  # written into the param groups: saved and restored with them
        >>> opt.gammas["audio"]
        1.0
        """
        self._adopt()
        return _Gammas(self._gammas)

    @gammas.setter
    def gammas(self, value: Mapping[str, float]) -> None:
        new = check_gammas(value, self._gammas, every=True)
        self._adopt()
        self._gammas = new
        for group in self.param_groups:
            if group["modality"] is not None:
                group[GAMMA] = new[group["modality"]]

    def params_by_modality(self) -> dict[str | None, list[Tensor]]:
        """The parameters each modality scales, and under ``None`` those left untouched.

        >>> import torch
        >>> enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> opt = PDMPOptimizer(torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1),
        ...                     {"audio": enc}, dominant="audio")
        >>> {m: len(ps) for m, ps in opt.params_by_modality().items()}
        {'audio': 2, None: 2}
        """
        self._adopt()
        out: dict[str | None, list[Tensor]] = {m: [] for m in self._gammas}
        for group in self.param_groups:
            out.setdefault(group["modality"], []).extend(group["params"])
        return out

    @torch.no_grad()
    def scale_grads_(self) -> None:
        """Multiply each modality's gradients by its gamma now, e.g. before gradient clipping (``mode="grad"``).

        The gradients count as scaled until ``step()``, ``zero_grad()`` or the next backward that reaches them:
        ``step()`` does not scale them again, a second call does nothing, a backward onto gradients zeroed since
        starts afresh, and one that would add to the scaled gradients raises.
        """
        if self._mode != "grad":
            raise RuntimeError(
                f"scale_grads_() is for mode='grad'; in mode={self._mode!r} the coefficient is applied to the "
                f"{'learning rate' if self._mode == 'lr' else 'update'}, so the gradients stay as backward left them "
                "(clip them as usual), or build PDMPOptimizer with mode='grad'"
            )
        self._adopt()
        self._mark.add(self._scale_grads())

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply each group's gamma (unless :meth:`scale_grads_` already did), then the inner optimizer's step.

        With a ``closure`` in ``"grad"`` mode, the gradients it computes are scaled every time the inner optimizer
        evaluates it, unless the closure itself called :meth:`scale_grads_`.
        """
        self._adopt()
        if self._mode == "lr":
            return self._lr_step(closure)
        if self._mode == "update":
            buckets = self._buckets(with_grad=False)
            before = snapshot(buckets)
            loss = self._inner_step(closure)
            multiply_updates_(buckets, before)
            return loss
        scaled: list[Tensor] = []
        if closure is None:
            scaled = self._scale_grads()
        else:
            closure = self._scaling(closure, scaled)
        try:
            loss = self._inner_step(closure)
        except BaseException:
            self._mark.add(scaled)  # the gradients stay scaled: a retried step must not scale them again
            raise
        self._mark.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also forgets an earlier :meth:`scale_grads_`."""
        self._mark.clear()
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group: its parameters take the modality ``groups`` gave them, or its ``"modality"`` tag.

        >>> import torch
        >>> enc, extra = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> opt = PDMPOptimizer(torch.optim.SGD(enc.parameters(), lr=0.1), {"audio": enc}, dominant="audio")
        >>> opt.add_param_group({"params": extra.parameters(), "modality": "audio"})
        >>> len(opt.params_by_modality()["audio"])
        4
        """
        self._optimizer.add_param_group(param_group)  # (torch checks that it is a dict)
        try:
            self._adopt()
        except (TypeError, ValueError):
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise

    # --------------------------------------------------------------------------------------- checkpoints
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict: its param groups mirror ``opt.param_groups`` and carry each group's
        ``"modality"`` and ``"pdmp_gamma"``; SGD's momentum is in standard units (float64 in ``"lr"`` mode, so that a
        resume is exact), so the plain optimizer loads it too."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._adopt()
        state_dict = self._optimizer.state_dict()
        if self._sgd_units:
            momentum_to_standard(state_dict)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, gammas included; a plain optimizer's (before the split, or 0.2.0's) loads too.

        The modality of every group must match this optimizer's; on a mismatch nothing changes.
        """
        loaded = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            loaded = pre_hook(self, loaded) or loaded
        self._adopt()
        loaded = in_live_layout(loaded, self.param_groups, self._gammas)
        if self._sgd_units and isinstance(loaded.get("param_groups"), list):
            momentum_to_internal(loaded, self.param_groups)
        self._optimizer.load_state_dict(loaded)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # like torch's Optimizer: no hooks, and not the step wrapper an LR scheduler installs (it steps the original)
        if self._mark.params:
            raise RuntimeError(
                "cannot copy or pickle the optimizer between scale_grads_() and step(); copy after step()"
            )
        return {k: v for k, v in self.__dict__.items() if k not in ("step", "_mark", "_members") and k[-6:] != "_hooks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _mark=ScaleMark())
        tagged = {p: g["modality"] for g in self.param_groups if g.get("modality") for p in g["params"]}
        self._members = live_membership(None, tagged)  # a copy knows its modalities from its groups
        super().__setstate__({})
        claim(self, "optimizer")

    def __repr__(self) -> str:
        lines = [f"PDMPOptimizer(mode={self._mode!r} ({self._mode_reason})"]
        for modality, params in self.params_by_modality().items():
            label = "unscaled (shared)" if modality is None else f"{modality}: gamma={self._gammas[modality]:.6g}"
            lines.append(f"  {label}, {len(params)} tensors, {sum(p.numel() for p in params):,} parameters")
        inner = "\n".join("  " + line for line in repr(self._optimizer).splitlines())
        return "\n".join(lines) + "\n" + inner + "\n)"

    # ------------------------------------------------------------------------------------------ internals
    def _adopt(self) -> None:
        """Tag and split the groups that arrived without PDMP's keys (see :func:`~pdmp_optim._groups.adopt`)."""
        adopt(self._optimizer, self._members, self._gammas, self._sgd_units)

    def _buckets(self, with_grad: bool = True) -> list[tuple[float, list[Tensor]]]:
        """``(gamma, parameters)`` of the scaled groups, each parameter once, less those :meth:`scale_grads_` did."""
        by_gamma: dict[float, dict[Tensor, None]] = {}
        done = self._mark.params
        for group in self.param_groups:  # loops, not comprehensions: those cost torch.compile a graph
            if group[GAMMA] != 1.0:
                bucket = by_gamma.setdefault(group[GAMMA], {})
                for p in group["params"]:
                    if not (with_grad and p.grad is None) and p not in done:
                        bucket[p] = None
        return [(gamma, list(params)) for gamma, params in by_gamma.items()]

    def _scale_grads(self) -> list[Tensor]:
        buckets = self._buckets()
        multiply_grads_(buckets)
        return [p for _, params in buckets for p in params]

    def _scaling(self, closure: Callable[[], Any], scaled: list[Tensor]) -> Callable[[], Any]:
        def scaled_closure() -> Any:
            with torch.enable_grad():
                loss = closure()
            scaled[:] = self._scale_grads()  # what the closure left unscaled (it may call scale_grads_() itself)
            return loss

        return scaled_closure

    def scaled_params(self) -> set[Tensor]:
        """The parameters whose gradients this optimizer may scale (those of its modalities)."""
        return {p for g in self.param_groups if g.get("modality") for p in g["params"]} | set(self._members())

    def _lr_step(self, closure: Callable[[], Any] | None) -> Any:
        """lr x gamma, and weight decay / gamma where that keeps the promise, for the step; the originals put back."""
        self._momentum_units()
        saved = []
        for group in self.param_groups:
            gamma = group[GAMMA]
            if gamma != 1.0:
                decay, lr = compensates_decay(self._optimizer, group), group["lr"]
                group["lr"] = lr * gamma
                saved.append((group, lr, group["lr"], group.get("weight_decay"), decay))
                if decay:
                    group["weight_decay"] = group["weight_decay"] / gamma
        try:
            return self._inner_step(closure)
        finally:
            for group, lr, scaled, weight_decay, decay in saved:  # an optimizer that set its own lr keeps it, per gamma
                group["lr"] = lr if group["lr"] is scaled else group["lr"] / group[GAMMA]
                if decay:
                    group["weight_decay"] = weight_decay

    def _momentum_units(self) -> None:
        """SGD in "lr" mode keeps each group's momentum in ``1/gamma`` units (``lr * gamma`` is then grad mode's step);
        ``UNITS`` says which, and a gamma changed since moves the buffers before the step."""
        for group in self.param_groups if self._sgd_units else ():
            now, wanted = group.get(UNITS, 1.0), group[GAMMA]
            if now != wanted:
                rescale_momentum(self.state, group["params"], now / wanted)
                group[UNITS] = wanted

    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        """The inner step; the global step hooks, which already ran with the wrapper, are left out of it."""
        if not (_global_pre_hooks or _global_post_hooks):
            return self._optimizer.step() if closure is None else self._optimizer.step(closure)
        hooks = dict(_global_pre_hooks), dict(_global_post_hooks)
        _global_pre_hooks.clear()
        _global_post_hooks.clear()
        try:
            return self._optimizer.step() if closure is None else self._optimizer.step(closure)
        finally:
            _global_pre_hooks.update(hooks[0])
            _global_post_hooks.update(hooks[1])


class _Gammas(dict):  # type: ignore[type-arg]
    """A copy of the coefficients that refuses item assignment (it would change nothing)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("opt.gammas is read-only; assign a whole mapping: opt.gammas = {**opt.gammas, key: value}")

    __delitem__ = update = setdefault = pop = popitem = clear = __setitem__  # type: ignore[assignment]
