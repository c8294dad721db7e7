"""Which parameter belongs to which modality, and param groups holding one modality each.

Every param group of a ``PDMPOptimizer`` holds a single modality and says so: ``"modality"`` (``None`` for the
parameters PDMP leaves alone) and ``"pdmp_gamma"``. A group that mixes modalities is split into one group per modality
with the same settings; each part records in ``"pdmp_split"`` the size of the group it came from and its positions
there, which is all a checkpoint of the unsplit optimizer needs to be loaded.

>>> import torch
>>> enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
>>> group = {"params": [*enc.parameters(), *head.parameters()], "lr": 0.1}
>>> [(modality, part["pdmp_split"]) for modality, part in split_group(group, ["a", "a", None, None])]
[('a', [4, [0, 1]]), (None, [4, [2, 3]])]
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_gammas, check_name

GroupSpec = nn.Module | Iterable[Tensor]
GAMMA = "pdmp_gamma"  # (prefixed: AdaBound, MARS and others keep a "gamma" setting of their own)
SPLIT_KEY = "pdmp_split"  # [size of the group it was split from, positions of its parameters there]
_TAGS = ("modality", GAMMA, SPLIT_KEY)


def modality_of(optimizer: Optimizer, groups: Mapping[str, GroupSpec] | None) -> dict[Tensor, str]:
    """``{parameter: modality}`` for every parameter named in ``groups`` (frozen ones too: they may be added later), or
    from the ``"modality"`` tags of the param groups when ``groups`` is ``None``."""
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
        for p in _params(check_name(modality), spec, owned, bool(flat)):
            other = membership.setdefault(p, modality)
            if other != modality:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in both groups[{other!r}] and groups[{modality!r}]; "
                    "give every parameter to at most one modality"
                )
    if not any(p in owned for p in membership):
        raise ValueError(
            "the optimizer trains none of the parameters in groups" + (_FSDP_WAY_OUT if flat else "; build it over "
            "all trainable parameters (model.parameters()), or unfreeze an encoder before wrapping")
        )  # fmt: skip
    return membership


def live_membership(groups: Mapping[str, Any] | None, known: Mapping[Tensor, str]) -> Callable[[], dict[Tensor, str]]:
    """A function giving ``{parameter: modality}``: ``known`` (from :func:`modality_of`) and the parameters the modules
    of ``groups`` hold when it is called (a module extended since counts). All held weakly: a pickled or copied
    optimizer does not carry the model."""
    fixed = [(weakref.ref(p), m) for p, m in known.items()]
    modules = [(weakref.ref(s), m) for m, s in (groups or {}).items() if isinstance(s, nn.Module)]

    def now() -> dict[Tensor, str]:
        out = {p: m for ref, m in fixed if (p := ref()) is not None}
        for ref, m in modules:
            out.update(dict.fromkeys(module.parameters() if (module := ref()) is not None else (), m))
        return out

    return now


def split_group(group: dict[str, Any], modalities: Sequence[str | None]) -> list[tuple[str | None, dict[str, Any]]]:
    """``group`` as one group per modality (``modalities[i]`` is that of ``group["params"][i]``), paired with it; the
    group itself when it holds a single modality. Nothing is changed in place."""
    positions: dict[str | None, list[int]] = {}
    for index, modality in enumerate(modalities):
        positions.setdefault(modality, []).append(index)
    if len(positions) <= 1:
        return [(next(iter(positions), None), group)]
    parts = []
    for modality, indices in positions.items():
        # tensor settings (a tensor lr) are cloned, so that changing one group's value in place changes only it
        part = {k: v.clone() if isinstance(v, Tensor) else v for k, v in group.items()}
        for key in ("params", "param_names"):
            if key in group:
                part[key] = [group[key][i] for i in indices]
        part[SPLIT_KEY] = [len(modalities), indices]
        parts.append((modality, part))
    return parts


def in_live_layout(
    loaded: dict[str, Any], live: list[dict[str, Any]], modalities: Mapping[str, float]
) -> dict[str, Any]:
    """A checkpoint in the layout of the ``live`` groups: this version's as it is (its modalities checked), a plain
    optimizer's (or 0.2.0's, whose ``"pdmp"`` entry holds the gammas) split like the groups were."""
    config, saved = loaded.pop("pdmp", None), loaded.get("param_groups")
    if not isinstance(saved, list):
        return loaded  # a layout of the inner optimizer's own (pytorch_optimizer's Lookahead): it checks it
    if config is None and all(GAMMA in g for g in saved) and len(saved) == len(live):
        for old, group in zip(saved, live, strict=True):
            if old.get("modality") != group["modality"]:
                raise ValueError(
                    f"the checkpoint has a param group of modality {old.get('modality')!r} where this optimizer "
                    f"has {group['modality']!r}; build PDMPOptimizer with the groups= it was saved with"
                )
        return loaded
    if any(not isinstance(g, Mapping) or "params" not in g for g in saved):
        raise ValueError("the checkpoint's param_groups are not an optimizer's (each needs a 'params' list)")
    if config is not None and (not isinstance(config, Mapping) or config.get("format") != 2):
        raise ValueError(
            "the checkpoint's 'pdmp' entry is not one pdmp-optim 0.2.0 wrote; load only the inner optimizer's "
            "state with opt.optimizer.load_state_dict(...)"
        )
    groups = _saved_in_live_layout(saved, live)
    if groups is None:
        raise ValueError(
            f"the checkpoint has {len(saved)} param groups, which are not the ones this optimizer's {len(live)} were "
            "split from; load it into the optimizer you wrapped *before* wrapping it, or build the optimizer with "
            "the same param groups"
        )
    gammas = check_gammas((config or {}).get("gammas", {}), modalities, what="the checkpoint's gammas")
    for group in groups:
        group[GAMMA] = gammas.get(group["modality"], group[GAMMA])
    state = {i: {k: v for k, v in s.items() if k != "pdmp_momentum_buffer"} for i, s in loaded["state"].items()}
    return {**loaded, "state": state, "param_groups": groups}


def _saved_in_live_layout(saved: list[dict[str, Any]], live: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The param groups of a checkpoint saved without PDMP in the layout of the ``live`` groups, with their PDMP keys:
    saved before the split (one group per group the live ones came from: each part takes its positions), or one
    per live group (nothing was split, 0.2.0 saved the parts, or DCP spread a plain group over them with its settings
    in one part only: each part takes what it lacks from its siblings); ``None`` for any other layout."""
    originals = _by_origin(live)
    whole = len(saved) == len(originals)
    if not whole and len(saved) != len(live):
        return None
    out, rest = [], iter(saved)
    for parts in originals:
        olds = [next(rest)] * len(parts) if whole else [next(rest) for _ in parts]
        settings = {k: v for old in olds for k, v in old.items() if k not in ("params", "param_names")}
        for part, old in zip(parts, olds, strict=True):
            new = {**settings, **old, **{k: part[k] for k in _TAGS if k in part}}
            if whole and len(parts) > 1:
                if part[SPLIT_KEY][0] != len(old["params"]):
                    return None
                new.update({k: [old[k][i] for i in part[SPLIT_KEY][1]] for k in ("params", "param_names") if k in old})
            out.append(new)
    return out


def _by_origin(live: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The live groups gathered by the group they were split from (the parts of a group are consecutive)."""
    originals: list[list[dict[str, Any]]] = []
    for group in live:
        run = originals[-1] if originals else []
        size = run[0][SPLIT_KEY][0] if run and SPLIT_KEY in run[0] else 0
        if size and SPLIT_KEY in group and sum(len(part[SPLIT_KEY][1]) for part in run) < size:
            run.append(group)
        else:
            originals.append([group])
    return originals


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


def _params(modality: str, spec: Any, owned: set[Tensor], flat: bool) -> list[Tensor]:
    """The parameters of ``groups[modality]``; a trainable one the optimizer does not own is refused."""
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
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"groups[{modality!r}] holds a {type(p).__name__}, not a parameter tensor")
        if p not in owned and p.requires_grad:
            raise ValueError(
                f"groups[{modality!r}] holds a trainable parameter of shape {tuple(p.shape)} that the optimizer does "
                "not own" + (_FSDP_WAY_OUT if flat else "; build the optimizer over all trainable parameters "
                "(model.parameters())")
            )  # fmt: skip
    if not params:
        raise ValueError(f"groups[{modality!r}] has no parameters; pass the modality's encoder or drop the entry")
    return params
