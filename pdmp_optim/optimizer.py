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

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

from . import _hooked
from ._apply import multiply_grads_, multiply_updates_, snapshot
from ._checks import check_gamma, check_gammas
from ._groups import GroupSpec, merge_saved_groups, modality_of, split_param_groups, split_saved_groups
from ._lr import (
    compensates_decay,
    drop_exact_momentum,
    keeps_momentum_in_gamma_units,
    momentum_to_internal_,
    momentum_to_standard,
    rescale_momentum_,
)
from .coefficients import pdmp_gammas
from .modes import Mode, resolve_mode
from .ranking import ModalityRanking

__all__ = ["PDMPOptimizer"]

_STATE_KEY = "pdmp"
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FORMAT = 2
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class _Plan:
    """What one step scales, derived from the param groups; rebuilt whenever those are replaced or changed.

    A plain class: dynamo traces attribute reads of it like those of the optimizer (a NamedTuple here cost
    ``torch.compile`` an extra graph break in front of the inner step).
    """

    def __init__(
        self,
        source: tuple[tuple[dict[str, Any], list[Tensor], int], ...],
        by_gamma: list[tuple[float, list[Tensor]]],
        lr_groups: list[tuple[dict[str, Any], float, bool]],
    ) -> None:
        self.source = source  # the groups, their params lists and lengths it was built from
        self.by_gamma = by_gamma  # "grad" and "update": each parameter once
        self.lr_groups = lr_groups  # "lr": (group, gamma, whether its weight decay is divided by gamma)

    def fits(self, groups: list[dict[str, Any]]) -> bool:
        """Whether it was built from these very groups and params lists (plain loops: cheap to trace)."""
        if len(groups) != len(self.source):
            return False
        for group, (built_from, params, length) in zip(groups, self.source, strict=True):
            if group is not built_from or group["params"] is not params or len(params) != length:
                return False
        return True


class PDMPOptimizer(Optimizer):
    """Wrap ``optimizer`` so that each modality's update is multiplied by its PDMP coefficient.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"audio": nn.Linear(4, 8), "visual": nn.Linear(6, 8), "head": nn.Linear(16, 3)})
    >>> sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    >>> opt = PDMPOptimizer(sgd, {"audio": model["audio"], "visual": model["visual"]},
    ...                     dominant="visual", optimization_dominant="audio")
    >>> opt.mode
    'grad'
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # it is a torch.optim.Optimizer
    >>> opt.gammas = {"audio": 1.0, "visual": 1.0}  # e.g. pause the modulation for a few epochs

    How the coefficient is applied (``mode``, see :mod:`pdmp_optim.modes`): ``"grad"`` multiplies the modality's
    gradients before the step (SGD and kin), ``"lr"`` its learning rate for the duration of the step (Adam and
    kin; restored exactly, so schedulers see their own values), ``"update"`` the step itself (any optimizer, at
    the cost of a copy). ``"auto"`` picks the exact one; ``print(opt)`` says which and why. Parameters in no
    group (fusion, head) are never touched.

    The wrapper *is* a ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the inner optimizer's own
    objects, so LR schedulers, ``GradScaler``, checkpoints, copies and frameworks work unchanged, and step hooks
    (local and global) run once per step, with the wrapper.

    Args:
        optimizer: the optimizer you built over all model parameters as usual.
        groups: modality name -> ``nn.Module`` or iterable of parameters. Frozen parameters the optimizer does not
            own are ignored. If ``None``, the optimizer's param groups may carry a ``"modality"`` key instead.
        dominant: the performance-dominant modality ``m_p`` (gets ``gamma_p``). May come from ``ranking``.
        gamma_p: prioritisation strength, ``>= 1``; the paper uses 15.
        optimization_dominant: the modality best early in training, ``m_o`` (gets ``1/gamma_p``); every other
            modality gets ``gamma_p``. If unknown, every modality but ``m_p`` gets ``1/gamma_p``.
        gammas: explicit ``{modality: coefficient}``; overrides the rule for the modalities it names.
        ranking: a :class:`~pdmp_optim.ModalityRanking`; supplies ``dominant`` and the early scores.
        mode: ``"auto"``, ``"grad"``, ``"lr"`` or ``"update"``.

    In ``"lr"`` mode a param group holding parameters of several modalities is split into one group per modality
    (same settings), so create LR schedulers after wrapping.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or a group is not a module/iterable.
        ValueError: unknown ``dominant``/``optimization_dominant``/``mode``, a parameter in two groups, a group
            parameter the optimizer does not own, an empty group, a gamma that is not a finite number > 0,
            ``gammas`` naming an unknown modality, modalities left without a coefficient, or a mode that cannot
            scale this optimizer's update.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        groups: Mapping[str, GroupSpec] | None = None,
        dominant: str | None = None,
        *,
        gamma_p: float = 15.0,
        optimization_dominant: str | None = None,
        gammas: Mapping[str, float] | None = None,
        ranking: ModalityRanking | None = None,
        mode: Mode = "auto",
    ) -> None:
        if isinstance(optimizer, PDMPOptimizer):
            raise TypeError("optimizer is already a PDMPOptimizer; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                "build it first, e.g. PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), groups, ...)"
            )
        self._optimizer = optimizer
        # Optimizer.__init__ would rebuild param_groups, so create its hook registries here (timm's Lookahead once
        # skipped them, and later torch versions trip over their absence)
        self._init_hook_dicts()
        self._patch_step_function()
        self._mode, self._mode_reason = resolve_mode(optimizer, mode)
        membership = modality_of(optimizer, groups)
        self._gammas = _resolve_gammas(
            list(dict.fromkeys(membership.values())), dominant, gamma_p, optimization_dominant, gammas, ranking
        )
        _check_mode_fits(optimizer, self._mode)
        self._layout = split_param_groups(optimizer, membership) if self._mode == "lr" else None
        self._modality_of = membership
        self._plan: _Plan | None = None
        self._mark: _ScaleMark | None = None
        self._current_plan()
        overlapping = _hooked.installed_conflict(self, membership)
        if overlapping:
            raise RuntimeError(_hooked.conflict_message(overlapping))
        _hooked.optimizers.add(self)
        # SGD in "lr" mode keeps momentum in 1/gamma units; hooks on the inner optimizer convert its state dicts
        self._gamma_units = self._mode == "lr" and keeps_momentum_in_gamma_units(optimizer)
        self._register_inner_hooks()

    # ----------------------------------------------------------------------------------------- the protocol
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's own param groups."""
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's own per-parameter state."""
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's defaults."""
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    @property
    def gammas(self) -> Mapping[str, float]:
        """The coefficient of each modality (read-only); assign a new mapping to change them during training.

        >>> import torch
        >>> enc = torch.nn.Linear(2, 2)
        >>> opt = PDMPOptimizer(torch.optim.SGD(enc.parameters(), lr=0.1), {"audio": enc}, gammas={"audio": 2.0})
        >>> opt.gammas = {"audio": 1.0}  # saved in state_dict(), restored by load_state_dict()
        >>> opt.gammas["audio"]
        1.0
        """
        return MappingProxyType(self._gammas)

    @gammas.setter
    def gammas(self, value: Mapping[str, float]) -> None:
        new = check_gammas(value, self._gammas)
        missing = [m for m in self._gammas if m not in new]
        if missing:
            raise ValueError(
                f"gammas has no coefficient for {missing}; give one for every modality {list(self._gammas)}"
            )
        self._refuse_while_marked("change gammas")
        self._current_plan()
        old = {id(g): self._group_gamma(g) for g in self.param_groups}
        self._gammas = new
        self._plan = None
        if self._gamma_units:  # keep the momentum the same in standard units
            rescale_momentum_(self._optimizer, lambda g: old[id(g)] / self._group_gamma(g))

    @property
    def mode(self) -> str:
        """``"grad"``, ``"lr"`` or ``"update"``: how the coefficients are applied."""
        return self._mode

    def params_by_modality(self) -> dict[str | None, list[Tensor]]:
        """The parameters each modality scales, and under ``None`` those left untouched.

        >>> import torch
        >>> enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> opt = PDMPOptimizer(torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1),
        ...                     {"audio": enc}, dominant="audio")
        >>> {m: len(ps) for m, ps in opt.params_by_modality().items()}
        {'audio': 2, None: 2}
        """
        self._current_plan()  # adopts the "modality" tags of groups added since
        out: dict[str | None, list[Tensor]] = {m: [] for m in self._gammas}
        for p in dict.fromkeys(p for group in self.param_groups for p in group["params"]):
            out.setdefault(self._modality_of.get(p), []).append(p)
        return out

    @torch.no_grad()
    def scale_grads_(self) -> None:
        """Multiply each modality's gradients by its gamma now, e.g. before gradient clipping (``mode="grad"``).

        The next ``step()`` does not multiply them again, and calling it twice is harmless. The mark is forgotten at
        ``step()``, at ``zero_grad()``, and when a backward reaches gradients zeroed since (as after a step that
        ``GradScaler`` skipped); a backward that *adds* to the scaled gradients raises, since it would leave them
        half scaled. In the other modes the coefficient is not in the gradients, so this raises.
        """
        if self._mode != "grad":
            raise RuntimeError(
                f"scale_grads_() is for mode='grad'; in mode={self._mode!r} the coefficient is applied to the "
                f"{'learning rate' if self._mode == 'lr' else 'update'}, so the gradients stay as backward left them "
                "(clip them as usual), or build PDMPOptimizer with mode='grad'"
            )
        self._remember_scaled(self._scale_what_is_left(self._current_plan()))

    def _scale_what_is_left(self, plan: _Plan) -> list[Tensor]:
        """Multiply the gradients not scaled yet (per parameter: a gradient assigned since is new); returns them."""
        buckets = self._buckets_for_step(plan)
        multiply_grads_(buckets)
        return [p for _, params in buckets for p in params if p.grad is not None]

    def _remember_scaled(self, params: list[Tensor]) -> None:
        if not params:
            return  # nothing was scaled: no mark (an empty one would never be cleared by a backward)
        if self._marked():
            self._mark.add(params)  # type: ignore[union-attr]
        else:
            self._forget_mark()
            self._mark = _ScaleMark(self, params)

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the coefficients (unless :meth:`scale_grads_` already did), then take the inner optimizer's step.

        With a ``closure``, in ``"grad"`` mode the gradients it computes are scaled every time the inner optimizer
        evaluates it (once for SGD, repeatedly for LBFGS), unless the closure itself called :meth:`scale_grads_`.
        """
        plan = self._current_plan()
        if self._mode != "grad":
            if _hooked.any_pending():
                _hooked.leave_to_hooks(None, self._modality_of)  # hooks scaled some gradients: this would be twice
            if self._mode == "lr":
                return self._lr_step(plan, closure)
            before = snapshot(plan.by_gamma)
            loss = self._inner_step(closure)
            multiply_updates_(plan.by_gamma, before)
            return loss
        if closure is not None:
            return self._closure_step(plan, closure)
        scaled = self._scale_what_is_left(plan)
        try:
            loss = self._inner_step(None)
        except BaseException:
            self._remember_scaled(scaled)  # the gradients stay scaled: a retried step must not scale them again
            raise
        self._forget_mark()
        _hooked.settle(self._modality_of)
        return loss

    def _closure_step(self, plan: _Plan, closure: Callable[[], Any]) -> Any:
        try:
            return self._inner_step(self._scaling_closure(closure, plan))
        finally:
            self._forget_mark()
            _hooked.settle(self._modality_of)

    def _lr_step(self, plan: _Plan, closure: Callable[[], Any] | None) -> Any:
        """lr x gamma (and weight decay / gamma where it is compensated) for the step; the originals put back."""
        saved = []
        for group, gamma, decay in plan.lr_groups:  # loops, not comprehensions: those cost torch.compile a graph
            saved.append((group["lr"], group.get("weight_decay")))  # the objects themselves; a tensor is never mutated
            group["lr"] = group["lr"] * gamma
            if decay:
                group["weight_decay"] = group["weight_decay"] / gamma
        try:
            return self._inner_step(closure)
        finally:
            for (group, _, decay), (lr, weight_decay) in zip(plan.lr_groups, saved, strict=True):
                group["lr"] = lr
                if decay:
                    group["weight_decay"] = weight_decay

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also forgets an earlier :meth:`scale_grads_`."""
        self._forget_mark()
        _hooked.settle(self._modality_of)
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; give it ``"modality": name`` to scale it like that modality.

        >>> import torch
        >>> enc, extra = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> opt = PDMPOptimizer(torch.optim.SGD(enc.parameters(), lr=0.1), {"audio": enc}, dominant="audio")
        >>> opt.add_param_group({"params": extra.parameters(), "modality": "audio"})
        >>> len(opt.params_by_modality()["audio"])
        4
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        self._check_tag(param_group.get("modality"))
        self._optimizer.add_param_group(param_group)
        self._plan = None
        self._current_plan()  # adopt the group's modality tag now: state dicts and unit hooks read it

    # --------------------------------------------------------------------------------------- checkpoints
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"pdmp"``: mode, gammas and each modality's parameter ids.

        It has the layout and units of the optimizer you built: param groups that ``"lr"`` mode split are merged
        back (while their parts share their settings) and SGD's momentum is in standard units, so a plain optimizer
        or another mode loads it. The ids are the ones its ``"params"`` use. All plain data, loadable with
        ``torch.load(..., weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._optimizer.state_dict()
        config = self._config()
        merged = None if self._layout is None else merge_saved_groups(state_dict, self._layout)
        if merged is not None:
            state_dict, renumber = merged
            config["modalities"] = {m: [renumber[i] for i in ids] for m, ids in config["modalities"].items()}
        state_dict[_STATE_KEY] = config
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, including the gammas it was saved with.

        The modality of every parameter must match this optimizer's; a plain inner-optimizer state dict (from a
        run without PDMP, even with the param groups ``"lr"`` mode split) is accepted too and keeps the current
        gammas. On a mismatch nothing changes.
        """
        loaded: dict[str, Any] = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, loaded)
            if result is not None:
                loaded = result
        config = loaded.pop(_STATE_KEY, None)
        loaded = self._split_saved_groups(self._optimizer, loaded) or loaded  # the layout of the optimizer you built
        if not self._gamma_units:
            loaded = drop_exact_momentum(loaded)  # SGD lr mode's exact buffers; this mode keeps standard units
        saved_groups = loaded.get("param_groups", [])
        if "param_groups" in loaded and len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}; "
                "was it saved from an optimizer built over the same param groups?"
            )
        gammas = self._gammas if config is None else self._check_config(config, loaded)
        # (an inner optimizer with a state-dict layout of its own, such as pytorch_optimizer's Lookahead, has no
        # top-level "param_groups": its own load_state_dict checks what it loads)
        self._refuse_while_marked("load a state dict")
        current, self._gammas, self._plan = self._gammas, gammas, None  # the units hook converts with these gammas
        try:
            self._optimizer.load_state_dict(loaded)
        except BaseException:
            self._gammas, self._plan = current, None
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # like torch's Optimizer: no hooks, and not the per-instance step wrapper an LR scheduler installs (it holds a
        # weak reference to *this* object, so a copy would step the original)
        self._refuse_while_marked("copy or pickle the optimizer")
        drop = {"step", "_plan", "_mark", *_HOOK_DICTS}
        return {key: value for key, value in self.__dict__.items() if key not in drop}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plan = None
        self._mark = None
        self._init_hook_dicts()
        self._patch_step_function()
        self._register_inner_hooks()
        _hooked.optimizers.add(self)  # the inner optimizer's copy dropped them, as torch drops all optimizer hooks

    def __repr__(self) -> str:
        lines = [f"PDMPOptimizer(mode={self._mode!r} ({self._mode_reason})"]
        for modality, params in self.params_by_modality().items():
            label = "unscaled (shared)" if modality is None else f"{modality}: gamma={self._gammas[modality]:.6g}"
            lines.append(f"  {label}, {len(params)} tensors, {sum(p.numel() for p in params):,} parameters")
        inner = "\n".join("  " + line for line in repr(self._optimizer).splitlines())
        return "\n".join(lines) + "\n" + inner + "\n)"

    # ------------------------------------------------------------------------------------------ internals
    def _init_hook_dicts(self) -> None:
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())

    def _register_inner_hooks(self) -> None:
        """Hooks on the inner optimizer, so that its own ``load_state_dict`` takes the wrapper's state dicts (the
        layout you built) and SGD's state dicts show momentum in standard units, whichever path loads or saves."""
        inner = self._optimizer
        mine = [
            getattr(h, "__func__", None) for h in getattr(inner, "_optimizer_load_state_dict_pre_hooks", {}).values()
        ]
        if PDMPOptimizer._split_saved_groups in mine:
            return  # already there: a shallow copy shares the inner optimizer (and the hooks read the same gammas)
        if self._layout is not None and hasattr(inner, "_optimizer_load_state_dict_pre_hooks"):
            inner.register_load_state_dict_pre_hook(self._split_saved_groups)
        if self._gamma_units:
            inner.register_state_dict_post_hook(self._momentum_to_standard)
            inner.register_load_state_dict_post_hook(self._momentum_to_internal)

    def _split_saved_groups(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        if self._layout is None or len(state_dict.get("param_groups", self.param_groups)) == len(self.param_groups):
            return None
        return split_saved_groups(state_dict, self._layout)

    def _momentum_to_standard(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        self._current_plan()  # adopts the modality tags of groups added on the inner optimizer since
        return momentum_to_standard(state_dict, self.param_groups, self._group_gamma)

    def _momentum_to_internal(self, optimizer: Optimizer) -> None:
        self._current_plan()
        momentum_to_internal_(optimizer, self._group_gamma)

    def _group_gamma(self, group: dict[str, Any]) -> float:
        """The gamma of a group that holds a single modality (as every group does in "lr" mode)."""
        return self._gamma_of(group["params"][0]) if group["params"] else 1.0

    def _config(self) -> dict[str, Any]:
        """The PDMP configuration as plain data, parameters named by their state-dict ids."""
        self._current_plan()  # adopts the modality tags of groups added on the inner optimizer since
        modalities: dict[str, list[int]] = {m: [] for m in self._gammas}
        ids: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index = ids.setdefault(id(p), len(ids))  # as Optimizer.state_dict numbers them
                modality = self._modality_of.get(p)
                if modality is not None and index not in modalities[modality]:
                    modalities[modality].append(index)
        return {"format": _FORMAT, "mode": self._mode, "gammas": dict(self._gammas), "modalities": modalities}

    def _check_config(self, config: Any, loaded: Mapping[str, Any]) -> dict[str, float]:
        """The gammas of a saved ``"pdmp"`` entry, after checking that it describes this optimizer's modalities."""
        self._current_plan()  # adopts the modality tags of groups added on the inner optimizer since
        if not isinstance(config, Mapping) or config.get("format") not in (1, _FORMAT):
            found = config.get("format") if isinstance(config, Mapping) else type(config).__name__
            raise ValueError(
                f"the checkpoint's 'pdmp' entry has format {found!r}; this pdmp-optim reads formats 1 and {_FORMAT}. "
                "Save it again with this version, or load only the inner state with opt.optimizer.load_state_dict()"
            )
        if "param_groups" not in loaded:  # a layout of the inner optimizer's own: nothing to map ids against
            return self._adopted_gammas(config)
        saved_params = [g.get("params", []) for g in loaded.get("param_groups", [])]
        param_of = {
            i: p
            for ids, g in zip(saved_params, self.param_groups, strict=True)
            for i, p in zip(ids, g["params"], strict=False)
        }  # sizes are torch's to check
        mine = {m: sorted(i for i, p in param_of.items() if self._modality_of.get(p) == m) for m in self._gammas}
        theirs = {m: sorted(ids) for m, ids in dict(config.get("modalities", {})).items()}
        if mine != theirs:
            raise ValueError(
                f"checkpoint was saved with parameters per modality {theirs}, this optimizer has {mine}; build "
                "PDMPOptimizer with the checkpoint's groups, or load only the inner state with "
                "opt.optimizer.load_state_dict(...)"
            )
        return self._adopted_gammas(config)

    def _adopted_gammas(self, config: Mapping[str, Any]) -> dict[str, float]:
        gammas = check_gammas(config.get("gammas", {}), self._gammas, what="the checkpoint's gammas")
        return {m: gammas.get(m, gamma) for m, gamma in self._gammas.items()}

    def _check_tag(self, modality: Any) -> None:
        if modality is not None and modality not in self._gammas:
            raise ValueError(
                f"param group modality {modality!r} is unknown; use one of {list(self._gammas)} "
                "or None for parameters PDMP must leave untouched"
            )

    def _current_plan(self) -> _Plan:
        """The plan for the param groups as they are now (``load_state_dict``, ``param_groups = ...`` and
        ``add_param_group`` on the inner optimizer all replace or change them)."""
        plan = self._plan
        if plan is None or not plan.fits(self.param_groups):
            plan = self._plan = self._build_plan()
        return plan

    def _buckets_for_step(self, plan: _Plan) -> list[tuple[float, list[Tensor]]]:
        """The plan's buckets less the gradients already scaled: by :meth:`scale_grads_`, or by backward hooks built
        from this optimizer (hooks built otherwise that scaled some of them raise)."""
        buckets = plan.by_gamma
        if _hooked.any_pending():
            left = _hooked.leave_to_hooks(self, self._modality_of)
            buckets = [(gamma, [p for p in params if p not in left]) for gamma, params in buckets]
        if self._marked():
            buckets = self._mark.unscaled(buckets)  # type: ignore[union-attr]
        return buckets

    def _build_plan(self) -> _Plan:
        for group in self.param_groups:  # groups added on the inner optimizer may carry a modality tag
            self._check_tag(group.get("modality"))
            if group.get("modality") is not None:
                self._modality_of.update(dict.fromkeys(group["params"], group["modality"]))
        by_gamma: dict[float, list[Tensor]] = {}
        lr_groups: list[tuple[dict[str, Any], float, bool]] = []
        seen: set[Tensor] = set()
        for index, group in enumerate(self.param_groups):
            modalities = {self._modality_of.get(p) for p in group["params"]}
            for p in group["params"]:
                gamma = self._gamma_of(p)
                if p not in seen and gamma != 1.0:
                    by_gamma.setdefault(gamma, []).append(p)
                seen.add(p)
            if self._mode == "lr":
                lr_groups.extend(self._lr_group(index, group, modalities))
        if not any(p in seen for p in self._modality_of):
            raise ValueError(
                "none of the modalities' parameters is in the optimizer's param groups any more (an engine such as "
                "DeepSpeed ZeRO replaces them with flat partitions), so PDMP would scale nothing; scale the encoders' "
                "output gradients with scale_encoder_grads instead (see the engines how-to)"
            )
        return _Plan(
            source=tuple((g, g["params"], len(g["params"])) for g in self.param_groups),
            by_gamma=list(by_gamma.items()),
            lr_groups=lr_groups,
        )

    def _lr_group(
        self, index: int, group: dict[str, Any], modalities: set[str | None]
    ) -> list[tuple[dict[str, Any], float, bool]]:
        if len(modalities) > 1:
            raise ValueError(
                f"param group {index} mixes modalities {sorted(map(str, modalities))}, but mode='lr' needs one "
                "learning rate per modality (were param_groups reassigned, or a group added, after wrapping?); give "
                "every param group a single modality, e.g. add_param_group({'params': ..., 'modality': 'audio'})"
            )
        modality = next(iter(modalities), None)
        gamma = 1.0 if modality is None else self._gammas[modality]
        if gamma == 1.0:
            return []
        decay = compensates_decay(self._optimizer, group)
        for name, value in (("lr", group["lr"] * gamma), ("weight_decay", group.get("weight_decay", 0) / gamma)):
            if (name == "lr" or decay) and not abs(float(value)) <= _FLOAT32_MAX:
                raise ValueError(
                    f"gamma {gamma:g} of {modality!r} makes param group {index}'s {name} {float(value):g} in 'lr' "
                    "mode, beyond what the optimizer can represent; use mode='grad' (or 'update') for such gammas"
                )
        return [(group, gamma, decay)]

    def _gamma_of(self, p: Tensor) -> float:
        modality = self._modality_of.get(p)
        return 1.0 if modality is None else self._gammas[modality]

    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        """The inner optimizer's step; global step hooks, which already ran with the wrapper, do not run again."""
        inner = self._optimizer
        hooked_step = type(inner).step
        patched = vars(inner).get("step")
        if (
            not (_global_pre_hooks or _global_post_hooks)
            or not getattr(hooked_step, "hooked", False)
            or (patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False))
        ):
            return inner.step() if closure is None else inner.step(closure)
        # torch's hook wrapper around the inner step, minus the global hooks (only taken while some are registered)
        inner._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler attached to it checks
        args: tuple[Any, ...] = (inner,) if closure is None else (inner, closure)
        kwargs: dict[str, Any] = {}
        for pre_hook in inner._optimizer_step_pre_hooks.values():
            result = pre_hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = hooked_step.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]
        inner._optimizer_step_code()
        for post_hook in inner._optimizer_step_post_hooks.values():
            post_hook(inner, args, kwargs)
        return out

    def _scaling_closure(self, closure: Callable[[], Any], plan: _Plan) -> Callable[[], Any]:
        def scaled_closure() -> Any:
            with torch.enable_grad():
                loss = closure()
            self._scale_what_is_left(plan)  # the closure may call scale_grads_() itself (Lightning hooks)
            return loss

        return scaled_closure

    def _marked(self) -> bool:
        return self._mark is not None and self._mark.alive

    def _forget_mark(self) -> None:
        if self._mark is not None:
            self._mark.remove()
            self._mark = None

    def _refuse_while_marked(self, action: str) -> None:
        if self._marked():
            raise RuntimeError(
                f"cannot {action} between scale_grads_() and step(): the gradients are already scaled; do it before "
                "scale_grads_() or after step()"
            )


class _ScaleMark:
    """Remembers which gradients :meth:`PDMPOptimizer.scale_grads_` scaled, until a backward reaches them.

    Per parameter, the gradient tensor it scaled: one assigned since (or of a parameter added since) is not scaled
    yet. A hook on each scaled parameter runs before backward adds to its gradient: if the scaled gradients were
    zeroed since (or set to None), a new step has begun and the mark is forgotten; if not, the backward would mix
    scaled and unscaled gradient, and it raises.
    """

    def __init__(self, opt: PDMPOptimizer, params: list[Tensor]) -> None:
        self.alive = True
        self._scaled: dict[Tensor, Tensor] = {}
        self._handles: list[Any] = []
        opt_ref = weakref.ref(opt)

        def before_accumulation(grad: Tensor) -> None:
            if not self.alive or opt_ref() is None:
                return
            self.alive = False
            if self._still_scaled():
                raise RuntimeError(
                    "backward is adding to gradients that scale_grads_() already scaled, which would leave them half "
                    "scaled; call scale_grads_() once per step, after the last backward (after gradient "
                    "accumulation), or zero the gradients first"
                )

        before_accumulation.__torch_unserializable__ = True  # type: ignore[attr-defined]
        self._hook = before_accumulation
        self.add(params)

    def add(self, params: list[Tensor]) -> None:
        for p in params:
            if p.grad is None:
                continue
            if p not in self._scaled and p.requires_grad:
                self._handles.append(p.register_hook(self._hook))
            self._scaled[p] = p.grad  # (a gradient assigned since the first record replaces it)

    def unscaled(self, buckets: list[tuple[float, list[Tensor]]]) -> list[tuple[float, list[Tensor]]]:
        return [(gamma, [p for p in params if self._scaled.get(p) is not p.grad]) for gamma, params in buckets]

    def _still_scaled(self) -> bool:
        """Whether some scaled gradient is still in place and not zeroed (read once, only on this rare path)."""
        return any(p.grad is grad and bool(grad.any()) for p, grad in self._scaled.items())

    def remove(self) -> None:
        self.alive = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _resolve_gammas(
    modalities: list[str],
    dominant: str | None,
    gamma_p: float,
    optimization_dominant: str | None,
    gammas: Mapping[str, float] | None,
    ranking: ModalityRanking | None,
) -> dict[str, float]:
    resolved: dict[str, float] = {}
    if ranking is not None:
        resolved = _gammas_from_ranking(ranking, modalities, dominant, optimization_dominant, gamma_p)
    elif dominant is not None:
        resolved = pdmp_gammas(modalities, dominant, gamma_p=gamma_p, optimization_dominant=optimization_dominant)
    elif optimization_dominant is not None:
        raise ValueError("optimization_dominant= needs dominant= (the performance-dominant modality) too")
    else:
        check_gamma(gamma_p, "gamma_p")
    if gammas is not None:
        resolved.update(check_gammas(gammas, modalities))
    missing = [m for m in modalities if m not in resolved]
    if missing:
        raise ValueError(f"no coefficient for {missing}; pass dominant= (or ranking=), or gammas for every modality")
    return {m: resolved[m] for m in modalities}


def _gammas_from_ranking(
    ranking: ModalityRanking, modalities: list[str], dominant: str | None, optimization_dominant: str | None,
    gamma_p: float,
) -> dict[str, float]:  # fmt: skip
    if not isinstance(ranking, ModalityRanking):
        raise TypeError(f"ranking must be a ModalityRanking from rank_modalities, got {type(ranking).__name__}")
    if set(ranking.order) != set(modalities):
        raise ValueError(
            f"ranking covers modalities {sorted(ranking.order)} but groups has {sorted(modalities)}; "
            "rank exactly the modalities you pass in groups"
        )
    if dominant is not None and dominant != ranking.performance_dominant:
        raise ValueError(
            f"dominant={dominant!r} contradicts ranking.performance_dominant={ranking.performance_dominant!r}; "
            "pass one of them, or explicit gammas"
        )
    if optimization_dominant is not None:
        raise ValueError("pass either ranking= or optimization_dominant=, not both")
    gammas = ranking.gammas(gamma_p=gamma_p)
    return {m: gammas[m] for m in modalities}


def _check_mode_fits(optimizer: Optimizer, mode: str) -> None:
    if mode == "lr":
        if any("lr" not in group for group in optimizer.param_groups):
            raise ValueError(
                f"mode='lr' scales each group's 'lr', but {type(optimizer).__name__} has none; use mode='update'"
            )
    elif mode == "grad" and isinstance(optimizer, torch.optim.LBFGS) and optimizer.defaults.get("line_search_fn"):
        raise ValueError(
            "LBFGS's line search checks the loss against the gradient, and PDMP's scaled gradient is not the "
            "gradient of that loss; use LBFGS(line_search_fn=None), or mode='update'"
        )
