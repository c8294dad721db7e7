"""Which parameter belongs to which modality, checked against what the optimizer owns.

>>> import torch
>>> enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
>>> sgd = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
>>> len(modality_of(sgd, {"audio": enc}))
2
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_name

__all__ = ["GroupSpec", "Layout", "merge_saved_groups", "modality_of", "split_param_groups", "split_saved_groups"]

Layout = list[list[list[int]]]  # per original group, the positions (in it) of the parameters of each part

GroupSpec = nn.Module | Iterable[Tensor]


def modality_of(optimizer: Optimizer, groups: Mapping[str, GroupSpec] | None) -> dict[Tensor, str]:
    """``{parameter: modality}`` from ``groups``, or from the ``"modality"`` tags of the param groups."""
    if groups is None:
        tagged = [g for g in optimizer.param_groups if g.get("modality") is not None]
        if not tagged:
            raise ValueError(
                "no modality groups: pass groups={'audio': model.audio_encoder, ...} or tag the optimizer's "
                "param groups with a 'modality' key"
            )
        return {p: check_name(g["modality"]) for g in tagged for p in g["params"]}
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups must map a modality name to an nn.Module or an iterable of parameters, got {type(groups).__name__}"
        )
    if not groups:
        raise ValueError("groups is empty; name at least one modality, e.g. {'visual': model.visual_encoder}")
    owned = {p for group in optimizer.param_groups for p in group["params"]}
    flat = [p for p in owned if getattr(p, "_is_flat_param", False)]  # FSDP1 without use_orig_params
    membership: dict[Tensor, str] = {}
    for modality, spec in groups.items():
        if flat and isinstance(spec, nn.Module):
            _check_not_split(check_name(modality), spec, flat)
        for p in _owned_params(check_name(modality), spec, owned, bool(flat)):
            other = membership.setdefault(p, modality)
            if other != modality:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in both groups[{other!r}] and groups[{modality!r}]; "
                    "give every parameter to at most one modality"
                )
    _check_tags_agree(optimizer, membership)
    return membership


def split_param_groups(optimizer: Optimizer, membership: Mapping[Tensor, str]) -> Layout:
    """Split, in place, every param group that mixes modalities into one group per modality (same settings).

    Returns the layout of the split, which :func:`split_saved_groups` applies to a checkpoint of the unsplit optimizer.
    """
    new_groups: list[dict[str, Any]] = []
    layout: Layout = []
    for group in optimizer.param_groups:
        by_modality: dict[str | None, list[int]] = {}
        for index, p in enumerate(group["params"]):
            by_modality.setdefault(membership.get(p), []).append(index)
        layout.append(list(by_modality.values()))
        if len(by_modality) <= 1:
            new_groups.append(group)
            continue
        if "initial_lr" in group:
            raise ValueError(
                "this mode must split a param group that mixes modalities, but an LR scheduler is already attached "
                "to the optimizer; create the scheduler after PDMPOptimizer, on the PDMPOptimizer"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LBFGS supports a single param group, so mode='lr' cannot split it; use mode='grad'")
        for indices in by_modality.values():
            # tensor settings (a tensor lr) are cloned, so that changing one group's value in place changes only it
            part = {k: v.clone() if isinstance(v, Tensor) else v for k, v in group.items()}
            part["params"] = [group["params"][i] for i in indices]
            if "param_names" in group:
                part["param_names"] = [group["param_names"][i] for i in indices]
            new_groups.append(part)
    optimizer.param_groups[:] = new_groups
    return layout


def split_saved_groups(state_dict: Mapping[str, Any], layout: Layout) -> dict[str, Any] | None:
    """A state dict of the unsplit optimizer with its param groups split like :func:`split_param_groups` did, or
    ``None`` if it does not have the unsplit optimizer's groups. Per-parameter state is keyed by position: unchanged.
    """
    saved = state_dict.get("param_groups", [])
    if len(saved) != len(layout) or any(
        len(g["params"]) != sum(map(len, parts)) for g, parts in zip(saved, layout, strict=True)
    ):
        return None
    groups = []
    for group, parts in zip(saved, layout, strict=True):
        for indices in parts:
            part = {**group, "params": [group["params"][i] for i in indices]}
            if "param_names" in group:
                part["param_names"] = [group["param_names"][i] for i in indices]
            groups.append(part)
    return {**state_dict, "param_groups": groups}


def merge_saved_groups(state_dict: dict[str, Any], layout: Layout) -> tuple[dict[str, Any], dict[int, int]] | None:
    """The inverse of :func:`split_saved_groups`: the state dict the unsplit optimizer would have saved, and how the
    parameter ids were renumbered; ``None`` if the parts of a group no longer share their settings."""
    saved, groups, start = state_dict.get("param_groups"), [], 0
    if saved is None or sum(map(len, layout)) != len(saved):
        return None
    for parts in layout:
        chunk, start = saved[start : start + len(parts)], start + len(parts)
        if any(not _same_settings(chunk[0], other) for other in chunk[1:]):
            return None
        merged = {**chunk[0]}
        for key in ("params", "param_names"):
            if key in chunk[0]:
                merged[key] = [None] * sum(map(len, parts))
                for group, indices in zip(chunk, parts, strict=True):
                    for index, value in zip(indices, group[key], strict=True):
                        merged[key][index] = value
        groups.append(merged)
    renumber: dict[int, int] = {}  # as Optimizer.state_dict numbers them: by first appearance
    for group in groups:
        for index in group["params"]:
            renumber.setdefault(index, len(renumber))
    groups = [{**group, "params": [renumber[i] for i in group["params"]]} for group in groups]
    state = {renumber[i]: entry for i, entry in state_dict["state"].items() if i in renumber}
    return {**state_dict, "state": state, "param_groups": groups}, renumber


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = (set(a) | set(b)) - {"params", "param_names"}
    return all(
        torch.equal(a[k], b[k])
        if isinstance(a.get(k), Tensor) and isinstance(b.get(k), Tensor)
        else a.get(k) == b.get(k)
        for k in keys
    )


_FSDP_WAY_OUT = (
    "; the optimizer holds FSDP flat parameters (FSDP1 with use_orig_params=False), which mix the parameters of "
    "several modules: wrap each encoder in its own FSDP unit, pass use_orig_params=True, or scale the encoders' "
    "output gradients with scale_encoder_grads and a plain optimizer"
)


def _check_not_split(modality: str, encoder: nn.Module, flat: list[Tensor]) -> None:
    """Refuse an encoder whose parameters FSDP1 flattened together with parameters of other modules."""
    inside = set(encoder.modules())
    for p in flat:
        modules: set[nn.Module] = getattr(p, "_modules", set())
        shared = [m for m in modules if m in inside]
        if shared and len(shared) != len(modules):
            raise ValueError(
                f"groups[{modality!r}]: some of its parameters are flattened into an FSDP flat parameter together with "
                f"parameters of other modules, so PDMP could scale the encoder only in part{_FSDP_WAY_OUT}"
            )


def _owned_params(modality: str, spec: Any, owned: set[Tensor], flat: bool = False) -> list[Tensor]:
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
    kept = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"groups[{modality!r}] holds a {type(p).__name__}, not a parameter tensor")
        if p in owned:
            kept.append(p)
        elif p.requires_grad:
            raise ValueError(
                f"groups[{modality!r}] holds a parameter of shape {tuple(p.shape)} that the optimizer does not own"
                + (
                    _FSDP_WAY_OUT
                    if flat
                    else "; build the optimizer over all trainable parameters (model.parameters())"
                )
            )
    if not kept:
        raise ValueError(
            f"groups[{modality!r}] has no parameter that the optimizer trains"
            + (_FSDP_WAY_OUT if flat else "; pass the modality's encoder (its trainable parameters) or drop the entry")
        )
    return kept


def _check_tags_agree(optimizer: Optimizer, membership: Mapping[Tensor, str]) -> None:
    for group in optimizer.param_groups:
        tag = group.get("modality")
        if tag is not None and any(membership.get(p) != tag for p in group["params"]):
            raise ValueError(
                f"a param group is tagged modality={tag!r} but groups= assigns its parameters differently; "
                "use either the tags or groups="
            )
