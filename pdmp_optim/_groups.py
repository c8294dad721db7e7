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

from ._checks import check_gammas, check_modalities, check_name

GroupSpec = nn.Module | Iterable[Tensor]
GAMMA = "pdmp_gamma"  # (prefixed: AdaBound, MARS and others keep a "gamma" setting of their own)
SPLIT_KEY = "pdmp_split"  # [size of the group it was split from, positions of its parameters there]
UNITS = "pdmp_momentum_scale"  # SGD in "lr" mode: a group's standard momentum is its buffers times this
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
    check_modalities(groups, "groups", "an nn.Module or an iterable of parameters", at_least=1)
    owned = {p for group in optimizer.param_groups for p in group["params"]}
    flat = [p for p in owned if getattr(p, "_is_flat_param", False)]  # FSDP1 without use_orig_params
    membership: dict[Tensor, str] = {}
    for modality, spec in groups.items():
        if flat and isinstance(spec, nn.Module):
            _check_not_split(modality, spec, flat)
        for p in _params(modality, spec, owned, bool(flat)):
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


def adopt(
    optimizer: Optimizer, members: Callable[[], dict[Tensor, str]], gammas: dict[str, float], sgd_units: bool
) -> None:
    """Tag each group that arrived without PDMP's keys (added, reassigned, loaded from a plain checkpoint) by
    ``members``, split per modality; checked in full before anything changes. ``gammas`` takes the coefficients the
    groups hold (a loaded checkpoint's): they are those new groups of their modality get."""
    groups = optimizer.param_groups
    for group in groups:
        if group.get("modality") is not None and GAMMA in group:
            gammas[_known(group["modality"], gammas)] = group[GAMMA]
    pending = [(i, g) for i, g in enumerate(groups) if GAMMA not in g or "modality" not in g]
    found = members() if pending else {}
    parts_of = [(i, split_group(g, [_modality(g, p, found, gammas) for p in g["params"]])) for i, g in pending]
    for index, parts in parts_of:
        why = _why_not_split(optimizer) if len(parts) > 1 else ""
        if why:
            raise ValueError(f"a param group mixes modalities, so PDMP must split it (one per modality), but {why}")
        params = groups[index]["params"] if sgd_units and UNITS not in groups[index] else ()
        if any(optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params):
            raise ValueError(
                "in SGD 'lr' mode PDMP keeps the momentum in 1/gamma units, and a param group without PDMP's keys "
                "does not say in which units its momentum is; assign groups taken from opt.param_groups, load "
                "checkpoints with opt.load_state_dict(...), or use mode='grad'"
            )
    for index, parts in reversed(parts_of):
        for modality, part in parts:
            part.update({"modality": modality, GAMMA: gammas[modality] if modality is not None else 1.0})
        groups[index : index + 1] = [part for _, part in parts]


def _known(tag: Any, gammas: Mapping[str, float]) -> str:
    if check_name(tag) not in gammas:
        raise ValueError(
            f"param group modality {tag!r} is unknown; use one of {list(gammas)} or None (a checkpoint made for "
            "other groups=? load checkpoints with opt.load_state_dict(...), which checks them)"
        )
    return tag


def _modality(group: dict[str, Any], p: Tensor, found: Mapping[Tensor, str], gammas: Mapping[str, float]) -> Any:
    """The modality of ``p`` in ``group``: its tag (which must agree with ``groups=``), else ``groups=``'."""
    tag, modality = group.get("modality"), found.get(p)
    if tag is not None and modality not in (None, _known(tag, gammas)):
        raise ValueError(
            f"a param group is tagged modality={tag!r}, but groups= gives its parameter of shape {tuple(p.shape)} to "
            f"{modality!r}; drop the tag or fix it"
        )
    return modality if tag is None else tag


def _why_not_split(optimizer: Optimizer) -> str:
    """Why ``optimizer``'s param groups cannot be split, or ``""``."""
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        return "an LR scheduler is attached to it (it sized its lists for the groups it saw); create it after wrapping"
    count = len(optimizer.param_groups)  # AdaBound's base_lrs: a split would leave it out of step
    lists = [k for k, v in vars(optimizer).items() if isinstance(v, list) and len(v) == count and k != "param_groups"]
    if lists or type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        zero = type(optimizer).__name__ == "ZeroRedundancyOptimizer"
        what = "it partitions its groups when built" if zero else f"its {lists[0]} holds one entry per param group"
        return f"{type(optimizer).__name__}: {what}; build it with one param group per modality"
    return ""


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
    if isinstance(spec, nn.Module):
        params: list[Tensor] = list(spec.parameters())
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
