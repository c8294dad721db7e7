"""The paper's modulation coefficients (Eq. 10-12), in one place.

PDMP multiplies the update of the performance-dominant modality ``m_p`` by ``gamma_p > 1`` and the update
of every other modality ``m_r`` by ``gamma_r``:

* ``gamma_r = 1 / gamma_p`` when ``m_r`` would out-pace ``m_p`` early in training (it is the
  optimization-dominant modality ``m_o``, or its early score beats ``m_p``'s),
* ``gamma_r = gamma_p`` otherwise.

When nothing is known about early training, every other modality gets ``1 / gamma_p``: that choice always
lets ``m_p`` dominate.

>>> pdmp_gammas(["audio", "visual"], dominant="visual", optimization_dominant="audio")
{'audio': 0.06666666666666667, 'visual': 15.0}
>>> pdmp_gammas(["audio", "visual"], dominant="visual", optimization_dominant="visual", gamma_p=4)
{'audio': 4.0, 'visual': 4.0}
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ._checks import as_finite, check_gamma, check_gammas, check_name

__all__ = ["pdmp_gammas"]


def pdmp_gammas(
    modalities: Iterable[str],
    dominant: str,
    *,
    gamma_p: float = 15.0,
    optimization_dominant: str | None = None,
    early_scores: Mapping[str, float] | None = None,
    higher_is_better: bool = True,
) -> dict[str, float]:
    """Coefficient per modality by the paper's rule (Eq. 10-12), generalised to any number of modalities.

    >>> pdmp_gammas(["a", "v", "t"], "v", early_scores={"a": 0.6, "v": 0.5, "t": 0.4}, gamma_p=10)
    {'a': 0.1, 'v': 10.0, 't': 10.0}

    Args:
        modalities: every modality name, the dominant one included.
        dominant: the performance-dominant modality ``m_p``; it gets ``gamma_p``.
        gamma_p: the prioritisation strength, ``>= 1`` (the paper uses 15; 1 is plain training).
        optimization_dominant: the modality best early in training, ``m_o``; it gets ``1 / gamma_p``
            unless it is ``dominant``.
        early_scores: early-training score per modality; a modality whose early score is strictly better
            than ``dominant``'s gets ``1 / gamma_p`` (the paper's multi-modality case).
        higher_is_better: how to compare ``early_scores`` (``False`` for losses).

    Returns:
        ``{modality: gamma}`` in the order of ``modalities``.
    """
    names = [check_name(m) for m in modalities]
    if len(set(names)) != len(names):
        raise ValueError(f"modalities {names} name one modality twice; list each once")
    if dominant not in names:
        raise ValueError(f"dominant={dominant!r} is not one of the modalities {names}; pass one of them")
    if optimization_dominant is not None and optimization_dominant not in names:
        raise ValueError(
            f"optimization_dominant={optimization_dominant!r} is not one of the modalities {names}; "
            "pass one of them or None"
        )
    gamma_p = check_gamma(gamma_p, "gamma_p")
    if gamma_p < 1.0:
        raise ValueError(
            f"gamma_p must be >= 1 (it amplifies the dominant modality), got {gamma_p}; "
            "to damp a modality, pass explicit gammas={...}"
        )
    early = None if early_scores is None else _early_scores(early_scores, names)
    sign = 1.0 if higher_is_better else -1.0
    gammas: dict[str, float] = {}
    know_early = optimization_dominant is not None or early is not None
    for name in names:
        if name == dominant:
            gammas[name] = gamma_p
            continue
        outpaces = not know_early or name == optimization_dominant  # unknown: damp, so m_p always dominates
        if early is not None and sign * early[name] > sign * early[dominant]:
            outpaces = True
        gammas[name] = 1.0 / gamma_p if outpaces else gamma_p
    return gammas


def _early_scores(early_scores: Mapping[str, float], names: list[str]) -> dict[str, float]:
    """One finite early score per modality, as floats."""
    if not isinstance(early_scores, Mapping):
        raise TypeError(f"early_scores must map modality -> score, got {type(early_scores).__name__}")
    missing = [m for m in names if m not in early_scores]
    if missing:
        raise ValueError(f"early_scores has no entry for {missing}; give one score per modality")
    return {m: as_finite(early_scores[m], f"early_scores[{m!r}]") for m in names}


def resolve_gammas(
    modalities: list[str],
    dominant: str | None,
    gamma_p: float,
    optimization_dominant: str | None,
    gammas: Mapping[str, float] | None,
    ranking: Any,
) -> dict[str, float]:
    """The coefficient of every modality from ``PDMPOptimizer``'s arguments: the rule, then explicit ``gammas``.

    >>> resolve_gammas(["audio", "visual"], "visual", 15, None, {"audio": 0.5}, None)
    {'audio': 0.5, 'visual': 15.0}
    """
    resolved: dict[str, float] = {}
    if ranking is not None:
        resolved = _from_ranking(ranking, modalities, dominant, optimization_dominant, gamma_p)
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
    same = set(resolved.values())
    if len(modalities) > 1 and len(same) == 1 and same != {1.0}:
        warnings.warn(f"every modality gets gamma={same.pop():g} (Eq. 12 when the performance-dominant modality "
                      "is also the optimization-dominant one), so no modality is prioritised: a common learning-rate "
                      "multiplier for the encoders; compare against vanilla training with a tuned learning rate",
                      UserWarning, stacklevel=3)  # fmt: skip
    return {m: resolved[m] for m in modalities}


def _from_ranking(
    ranking: Any, modalities: list[str], dominant: str | None, optimization_dominant: str | None, gamma_p: float
) -> dict[str, float]:
    from .ranking import ModalityRanking  # (the ranking module uses this one)

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
