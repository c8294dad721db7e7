"""``PDMPOptimizer``: wrap any ``torch.optim.Optimizer`` to prioritise the performance-dominant modality.

>>> import torch
>>> from torch import nn
>>> model = nn.ModuleDict({"audio": nn.Linear(4, 8), "visual": nn.Linear(6, 8), "head": nn.Linear(16, 3)})
>>> sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
>>> opt = PDMPOptimizer(sgd, {"audio": model["audio"], "visual": model["visual"]}, dominant="visual")
>>> opt.gammas
{'audio': 0.06666666666666667, 'visual': 15.0}
>>> x_a, x_v = torch.randn(2, 4), torch.randn(2, 6)
>>> logits = model["head"](torch.cat([model["audio"](x_a), model["visual"](x_v)], dim=1))
>>> logits.sum().backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .coefficients import check_gamma, pdmp_gammas
from .modes import Mode, is_scale_invariant, resolve_mode
from .ranking import ModalityRanking

__all__ = ["PDMPOptimizer"]

GroupSpec = nn.Module | Iterable[Tensor]
_STATE_KEY = "pdmp"
_FORMAT = 1


class PDMPOptimizer(Optimizer):
    """Wrap ``optimizer`` so that each modality's update is multiplied by its PDMP coefficient.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"audio": nn.Linear(4, 8), "visual": nn.Linear(6, 8), "head": nn.Linear(16, 3)})
    >>> sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    >>> opt = PDMPOptimizer(sgd, {"audio": model["audio"], "visual": model["visual"]},
    ...                     dominant="visual", optimization_dominant="audio")
    >>> opt.gammas, opt.mode
    ({'audio': 0.06666666666666667, 'visual': 15.0}, 'grad')
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # it is a torch.optim.Optimizer

    Before every ``step()`` the gradients of the parameters in ``groups[m]`` are multiplied by ``gamma[m]``
    (``mode="grad"``), or, for optimizers that ignore the gradient's scale such as Adam, the learning rate of
    those parameters is multiplied by ``gamma[m]`` for the duration of the step and restored exactly
    afterwards (``mode="lr"``). Parameters in no group (fusion, head) are never touched.

    The wrapper *is* a ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the inner optimizer's
    own objects, so LR schedulers, ``GradScaler``, checkpoints and frameworks work unchanged.

    Args:
        optimizer: the optimizer you built over all model parameters as usual.
        groups: modality name -> ``nn.Module`` or iterable of parameters. Frozen parameters
            (``requires_grad=False``) that the optimizer does not own are ignored. If ``None``, each of the
            optimizer's param groups may carry a ``"modality"`` key instead.
        dominant: the performance-dominant modality ``m_p`` (gets ``gamma_p``). May come from ``ranking``.
        gamma_p: prioritisation strength, ``>= 1``; the paper uses 15.
        optimization_dominant: the modality best early in training, ``m_o`` (gets ``1/gamma_p``); every
            other modality gets ``gamma_p``. If unknown, every modality but ``m_p`` gets ``1/gamma_p``.
        gammas: explicit ``{modality: coefficient}``; overrides the rule for the modalities it names.
        ranking: a :class:`~pdmp_optim.ModalityRanking` from :func:`~pdmp_optim.rank_modalities`; supplies
            ``dominant`` and the early scores.
        mode: ``"grad"``, ``"lr"`` or ``"auto"`` (``"lr"`` for adaptive/sign-based optimizers, see
            :func:`~pdmp_optim.resolve_mode`).

    In ``"lr"`` mode a param group holding parameters of several modalities (or modality and shared
    parameters) is split into one group per modality, in place, keeping its settings, so that each modality
    has learning rates of its own; create LR schedulers after wrapping. ``"grad"`` mode leaves the param
    groups as they are.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or a group is not a module/iterable.
        ValueError: unknown ``dominant``/``optimization_dominant``/``mode``, a parameter in two groups, a
            group parameter the optimizer does not own, an empty group, a gamma that is not a finite
            number > 0, ``gammas`` naming an unknown modality, or modalities left without a coefficient.
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
        # Optimizer.__init__ would rebuild param_groups, so create its hook registries here (timm's Lookahead
        # once skipped them, and later torch versions trip over their absence)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self._mode, self._mode_reason = resolve_mode(optimizer, mode)
        if self._mode == "grad" and is_scale_invariant(optimizer):
            warnings.warn(
                f"mode='grad' with {type(optimizer).__name__}: it normalises the gradient scale away, so multiplying "
                "gradients changes its updates very little; use mode='auto' (or 'lr') to scale the updates",
                UserWarning,
                stacklevel=2,
            )
        membership = _membership(optimizer, groups)
        modalities = list(dict.fromkeys(membership.values()))
        self._gammas = _resolve_gammas(modalities, dominant, gamma_p, optimization_dominant, gammas, ranking)
        _check_mode_fits(optimizer, self._mode)
        if self._mode == "lr":
            _split_param_groups(optimizer, membership)
        self._modality_of = membership
        self._buckets: list[tuple[float | Tensor, list[Tensor]]] = []
        self._lr_groups: list[tuple[dict[str, Any], float]] = []
        self._scaled_marker: tuple[Tensor, Tensor] | None = None
        self._build()

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
    def gammas(self) -> dict[str, float]:
        """The coefficient of each modality (a copy)."""
        return dict(self._gammas)

    @property
    def mode(self) -> str:
        """``"grad"`` or ``"lr"``: how the coefficients are applied."""
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
        out: dict[str | None, list[Tensor]] = {m: [] for m in self._gammas}
        for group in self.param_groups:
            for p in group["params"]:
                out.setdefault(self._modality_of.get(p), []).append(p)
        return out

    @torch.no_grad()
    def scale_grads_(self) -> None:
        """Multiply each modality's gradients by its gamma now, e.g. before gradient clipping.

        The next ``step()`` does not multiply them again. Calling it twice is harmless. In ``"lr"`` mode the
        coefficient lives in the learning rate, so this does nothing.
        """
        if self._mode == "grad" and not self._grads_already_scaled():
            self._scaled_marker = self._apply_grad_scaling()

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Scale (unless :meth:`scale_grads_` already did), then take the inner optimizer's step.

        With a ``closure``, the gradients it computes are scaled every time the inner optimizer evaluates
        it (once for SGD/Adam, repeatedly for LBFGS), unless the closure itself called :meth:`scale_grads_`
        (as a Lightning ``on_before_optimizer_step`` hook that scales before clipping does).
        """
        inner_closure = closure
        if self._mode == "grad":
            if closure is None:
                if not self._grads_already_scaled():
                    self._apply_grad_scaling()
            else:
                inner_closure = self._scaling_closure(closure)
        saved_lrs = self._multiply_lrs() if self._mode == "lr" else None
        try:
            if inner_closure is None:
                return self._optimizer.step()
            return self._optimizer.step(inner_closure)
        finally:
            if saved_lrs is not None:
                for (group, _), lr in zip(self._lr_groups, saved_lrs, strict=True):
                    group["lr"] = lr
            self._scaled_marker = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also forgets an earlier :meth:`scale_grads_`."""
        self._scaled_marker = None
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
        modality = param_group.get("modality")
        if modality is not None and modality not in self._gammas:
            raise ValueError(
                f"param group modality {modality!r} is unknown; use one of {list(self._gammas)} "
                "or None for parameters PDMP must leave untouched"
            )
        self._optimizer.add_param_group(param_group)
        if modality is not None:
            for p in self.param_groups[-1]["params"]:
                self._modality_of[p] = modality
        self._build()

    # --------------------------------------------------------------------------------------- checkpoints
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"pdmp"``: mode, gammas and each modality's parameter ids.

        The ids are the ones the inner state dict uses for its ``"params"``. All plain data, loadable with
        ``torch.load(..., weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._optimizer.state_dict()
        state_dict[_STATE_KEY] = self._config()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the PDMP configuration must match this optimizer's.

        A plain inner-optimizer state dict (from a run without PDMP) is accepted too when its param groups
        line up with this optimizer's.
        """
        loaded: dict[str, Any] = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, loaded)
            if result is not None:
                loaded = result
        config = loaded.pop(_STATE_KEY, None)
        if config is not None:
            mine, theirs = self._config(), {**config, "modalities": dict(config.get("modalities", {}))}
            for key, what in (("mode", "mode"), ("gammas", "gammas"), ("modalities", "parameters per modality")):
                if mine[key] != theirs.get(key):
                    raise ValueError(
                        f"checkpoint was saved with PDMP {what} {theirs.get(key)}, this optimizer has {mine[key]}; "
                        "build PDMPOptimizer with the checkpoint's groups, mode and gammas, or, to change them on "
                        "purpose, load only the inner state with opt.optimizer.load_state_dict(...)"
                    )
        saved_groups = loaded.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}; "
                "was it saved from an optimizer with the same param groups (and the same PDMP mode)?"
            )
        self._optimizer.load_state_dict(loaded)
        self._scaled_marker = None
        self._build()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def _config(self) -> dict[str, Any]:
        """The PDMP configuration as plain data, parameters named by their state-dict ids."""
        modalities: dict[str, list[int]] = {m: [] for m in self._gammas}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                modality = self._modality_of.get(p)
                if modality is not None:
                    modalities[modality].append(index)
                index += 1
        return {"format": _FORMAT, "mode": self._mode, "gammas": dict(self._gammas), "modalities": modalities}

    def __repr__(self) -> str:
        lines = [f"PDMPOptimizer(mode={self._mode!r} ({self._mode_reason})"]
        for modality, params in self.params_by_modality().items():
            label = "unscaled (shared)" if modality is None else f"{modality}: gamma={self._gammas[modality]:.6g}"
            numel = sum(p.numel() for p in params)
            lines.append(f"  {label}, {len(params)} tensors, {numel:,} parameters")
        inner = "\n".join("  " + line for line in repr(self._optimizer).splitlines())
        return "\n".join(lines) + "\n" + inner + "\n)"

    # ------------------------------------------------------------------------------------------ internals
    def _build(self) -> None:
        """Precompute the (gamma, device, dtype) buckets and the groups whose lr is scaled."""
        buckets: dict[tuple[float, torch.device, torch.dtype, bool], list[Tensor]] = {}
        self._lr_groups = []
        for group in self.param_groups:
            for p in group["params"]:
                modality = self._modality_of.get(p)
                if modality is not None and self._gammas[modality] != 1.0:
                    buckets.setdefault((self._gammas[modality], p.device, p.dtype, _is_distributed(p)), []).append(p)
            if self._mode == "lr" and group["params"]:
                # lr mode split every group to a single modality, so its first parameter speaks for it
                modality = self._modality_of.get(group["params"][0])
                if modality is not None and self._gammas[modality] != 1.0:
                    self._lr_groups.append((group, self._gammas[modality]))
        self._buckets = [
            (_foreach_scalar(gamma, device, dtype, distributed), params)
            for (gamma, device, dtype, distributed), params in buckets.items()
        ]

    def _apply_grad_scaling(self) -> tuple[Tensor, Tensor] | None:
        """One ``_foreach_mul_`` per bucket; returns (param, grad) of a scaled gradient as a marker.

        The only per-parameter Python work is collecting the current ``.grad`` references (backward may have
        replaced them since the last step), exactly what torch's own optimizers do in ``step()``.
        """
        marker = None
        with torch.no_grad():
            for gamma, params in self._buckets:
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, gamma)
                    if marker is None:
                        marker = next((p, p.grad) for p in params if p.grad is not None)
        return marker

    def _grads_already_scaled(self) -> bool:
        # scale_grads_ ran and the gradient it scaled is still there (not zeroed to None or replaced)
        marker = self._scaled_marker
        return marker is not None and marker[0].grad is marker[1]

    def _scaling_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def scaled_closure() -> Any:
            loss = closure()
            if not self._grads_already_scaled():  # the closure may call scale_grads_() itself (Lightning hooks)
                self._apply_grad_scaling()
            return loss

        return scaled_closure

    def _multiply_lrs(self) -> list[Any]:
        saved = []
        for group, gamma in self._lr_groups:
            lr = group["lr"]
            saved.append(lr)
            group["lr"] = lr * gamma
        return saved


# ---------------------------------------------------------------------------------------------- helpers
def _membership(optimizer: Optimizer, groups: Mapping[str, GroupSpec] | None) -> dict[Tensor, str]:
    """parameter -> modality, validated against what the optimizer owns."""
    owned = {p for group in optimizer.param_groups for p in group["params"]}
    membership: dict[Tensor, str] = {}
    if groups is None:
        for group in optimizer.param_groups:
            modality = group.get("modality")
            if modality is None:
                continue
            _check_name(modality)
            for p in group["params"]:
                membership[p] = modality
        if not membership:
            raise ValueError(
                "no modality groups: pass groups={'audio': model.audio_encoder, ...} or tag the optimizer's "
                "param groups with a 'modality' key"
            )
        return membership
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups must map a modality name to an nn.Module or an iterable of parameters, got {type(groups).__name__}"
        )
    if not groups:
        raise ValueError("groups is empty; name at least one modality, e.g. {'visual': model.visual_encoder}")
    for modality, spec in groups.items():
        _check_name(modality)
        params: list[Tensor]
        if isinstance(spec, nn.Module):
            params = list(spec.parameters())
        elif isinstance(spec, Tensor):
            params = [spec]
        elif isinstance(spec, Iterable) and not isinstance(spec, (str, bytes, Mapping)):
            params = list(spec)
        else:
            raise TypeError(
                f"groups[{modality!r}] must be an nn.Module or an iterable of parameters, got {type(spec).__name__}"
            )
        kept = 0
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"groups[{modality!r}] holds a {type(p).__name__}, not a parameter tensor")
            if p not in owned:
                if not p.requires_grad:
                    continue  # frozen and not optimized: nothing to scale
                raise ValueError(
                    f"groups[{modality!r}] holds a parameter of shape {tuple(p.shape)} that the optimizer "
                    "does not own; build the optimizer over all trainable parameters (model.parameters())"
                )
            other = membership.get(p)
            if other is not None and other != modality:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in both groups[{other!r}] and "
                    f"groups[{modality!r}]; give every parameter to at most one modality"
                )
            membership[p] = modality
            kept += 1
        if kept == 0:
            raise ValueError(
                f"groups[{modality!r}] has no parameter that the optimizer trains; "
                "pass the modality's encoder (its trainable parameters) or drop the entry"
            )
    for group in optimizer.param_groups:
        tag = group.get("modality")
        if tag is not None and any(membership.get(p) != tag for p in group["params"]):
            raise ValueError(
                f"a param group is tagged modality={tag!r} but groups= assigns its parameters differently; "
                "use either the tags or groups="
            )
    return membership


def _is_distributed(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (FSDP2 / tensor parallel), whose ops take Python scalars only."""
    return hasattr(p, "device_mesh") or hasattr(p.data, "device_mesh")


def _foreach_scalar(gamma: float, device: torch.device, dtype: torch.dtype, distributed: bool) -> float | Tensor:
    """The multiplier to hand ``torch._foreach_mul_`` so that it rounds exactly like ``grad.mul_(gamma)``.

    On CPU, ``_foreach_mul_`` with a Python scalar first rounds the scalar to a float16/bfloat16 list's dtype
    (1/15 becomes 0.0669 in bfloat16), whereas ``grad.mul_(gamma)`` multiplies in float32. A 0-d float32
    tensor gives the float32 multiply. Elsewhere a Python scalar is exact and keeps ``step()`` sync-free.
    """
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not distributed:
        return torch.tensor(gamma, dtype=torch.float32)
    return gamma


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"modality names must be non-empty strings, got {name!r}")


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
        if not isinstance(ranking, ModalityRanking):
            raise TypeError(f"ranking must be a ModalityRanking from rank_modalities, got {type(ranking).__name__}")
        if set(ranking.order) != set(modalities):
            raise ValueError(
                f"ranking covers modalities {sorted(ranking.order)} but groups has {sorted(modalities)}; "
                "rank exactly the modalities you pass in groups"
            )
        if dominant is not None and dominant != ranking.performance_dominant:
            raise ValueError(
                f"dominant={dominant!r} contradicts ranking.performance_dominant="
                f"{ranking.performance_dominant!r}; pass one of them, or explicit gammas"
            )
        if optimization_dominant is not None:
            raise ValueError("pass either ranking= or optimization_dominant=, not both")
        resolved = pdmp_gammas(
            modalities,
            ranking.performance_dominant,
            gamma_p=gamma_p,
            optimization_dominant=ranking.optimization_dominant,
            early_scores=ranking.early_scores,
            higher_is_better=ranking.higher_is_better,
        )
    elif dominant is not None:
        resolved = pdmp_gammas(modalities, dominant, gamma_p=gamma_p, optimization_dominant=optimization_dominant)
    elif optimization_dominant is not None:
        raise ValueError("optimization_dominant= needs dominant= (the performance-dominant modality) too")
    else:
        check_gamma(gamma_p, "gamma_p")
    if gammas is not None:
        if not isinstance(gammas, Mapping):
            raise TypeError(f"gammas must map modality -> coefficient, got {type(gammas).__name__}")
        unknown = [m for m in gammas if m not in modalities]
        if unknown:
            raise ValueError(f"gammas names {unknown}, which are not in groups {modalities}; fix the names")
        for modality, value in gammas.items():
            resolved[modality] = check_gamma(value, f"gammas[{modality!r}]")
    missing = [m for m in modalities if m not in resolved]
    if missing:
        raise ValueError(f"no coefficient for {missing}; pass dominant= (or ranking=), or gammas for every modality")
    return {m: resolved[m] for m in modalities}


def _check_mode_fits(optimizer: Optimizer, mode: str) -> None:
    if mode == "lr":
        if any("lr" not in group for group in optimizer.param_groups):
            raise ValueError(
                f"mode='lr' scales each group's 'lr', but {type(optimizer).__name__} has none; use mode='grad'"
            )
    elif isinstance(optimizer, torch.optim.LBFGS) and optimizer.defaults.get("line_search_fn"):
        raise ValueError(
            "LBFGS's line search checks the loss against the gradient, and PDMP's scaled gradient is not the "
            "gradient of that loss; use LBFGS(line_search_fn=None)"
        )


def _split_param_groups(optimizer: Optimizer, membership: Mapping[Tensor, str]) -> None:
    """Split param groups that mix modalities into one group per modality (in place), for ``"lr"`` mode."""
    new_groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        by_modality: dict[str | None, list[int]] = {}
        for index, p in enumerate(group["params"]):
            by_modality.setdefault(membership.get(p), []).append(index)
        if len(by_modality) <= 1:
            new_groups.append(group)
            continue
        if "initial_lr" in group:
            raise ValueError(
                "mode='lr' must split a param group that mixes modalities, but an LR scheduler is already "
                "attached to the optimizer; create the scheduler after PDMPOptimizer, on the PDMPOptimizer"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LBFGS supports a single param group, so mode='lr' cannot split it; use mode='grad'")
        for indices in by_modality.values():
            part = {**group, "params": [group["params"][i] for i in indices]}
            if "param_names" in group:
                part["param_names"] = [group["param_names"][i] for i in indices]
            new_groups.append(part)
    optimizer.param_groups[:] = new_groups
