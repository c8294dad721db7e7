"""The premise check: does the jointly trained model end below its best unimodal model, and how surely?

:meth:`ModalityRanking.check_premise <pdmp_optim.ModalityRanking.check_premise>` runs it and documents the rule;
this module holds its answer, :class:`PremiseCheck`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._checks import as_finite

if TYPE_CHECKING:
    from .ranking import ModalityRanking

__all__ = ["PremiseCheck"]

REPAIR = "drop or repair that run before ranking"
_ADVICE = {
    True: "PDMP is worth trying",
    False: "PDMP is not expected to help",
    None: "try PDMP only against a tuned learning rate on a validation split",
}


@dataclass(frozen=True)
class PremiseCheck:
    """The answer of :meth:`ModalityRanking.check_premise`: does the joint model trail its best unimodal model?

    >>> from pdmp_optim import rank_modalities
    >>> r = rank_modalities({"a": [[0.5, 0.6], [0.5, 0.62]], "v": [[0.3, 0.80], [0.3, 0.78]]})
    >>> print(r.check_premise([0.70, 0.72]))  # doctest: +NORMALIZE_WHITESPACE
    premise holds: the joint model (0.71, 2 runs) trails the best unimodal model 'v' (0.79, 2 runs)
    by 0.08 ± 0.014 (5.7 standard errors); PDMP is worth trying

    Attributes:
        verdict: ``"holds"``, ``"fails"`` or ``"too close to call"``.
        holds: ``True``, ``False``, or ``None`` when too close to call.
        shortfall: best unimodal mean minus joint mean, in the metric's units (the other way round for
            losses): positive when the joint model is worse.
        std_error: the shortfall's standard error, ``None`` when both sides have a single run.
        best_unimodal: the performance-dominant modality, whose unimodal model is compared.
        unimodal_score: its mean final score; ``joint_score``: the joint model's mean score.
        unimodal_runs, joint_runs: how many runs each mean is over.
        z: the threshold used, in standard errors.
        notes: what else to know (a single run, nothing for the rule to damp, a doubtful ranking).
    """

    verdict: str
    holds: bool | None
    shortfall: float
    std_error: float | None
    best_unimodal: str
    unimodal_score: float
    joint_score: float
    unimodal_runs: int
    joint_runs: int
    z: float
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        se = "" if self.std_error is None else f" ± {self.std_error:.2g}"
        sigmas = f" ({abs(self.shortfall) / self.std_error:.1f} standard errors)" if self.std_error else ""
        relation = "trails" if self.shortfall >= 0 else "leads"
        text = (
            f"premise {self.verdict}: the joint model ({self.joint_score:.4g}, {_runs(self.joint_runs)}) {relation} "
            f"the best unimodal model {self.best_unimodal!r} ({self.unimodal_score:.4g}, {_runs(self.unimodal_runs)}) "
            f"by {abs(self.shortfall):.2g}{se}{sigmas}; {_ADVICE[self.holds]}"
        )
        return text + "".join(f"\n  note: {n}" for n in self.notes)


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def check_premise(ranking: ModalityRanking, joint: Any, z: Any) -> PremiseCheck:
    """The work of :meth:`ModalityRanking.check_premise`, which documents it."""
    z = as_finite(z, "z")
    if z < 0:
        raise ValueError(f"z must be >= 0 (a number of standard errors), got {z}")
    joint = joint.tolist() if hasattr(joint, "tolist") else joint
    values = joint if isinstance(joint, Sequence) and not isinstance(joint, (str, bytes)) else [joint]
    if len(values) == 0:
        raise ValueError("joint needs at least one score of the jointly trained model (one per run)")
    scores = [as_finite(v, f"joint score (run {i})", REPAIR) for i, v in enumerate(values)]
    best_unimodal, unimodal_runs, joint_runs = ranking.performance_dominant, ranking.num_runs, len(scores)
    unimodal_score, joint_score = ranking.final_scores[best_unimodal], statistics.fmean(scores)
    shortfall = (1.0 if ranking.higher_is_better else -1.0) * (unimodal_score - joint_score)
    var_u = ranking.final_std[best_unimodal] ** 2 if unimodal_runs > 1 else None
    var_j = statistics.variance(scores) if joint_runs > 1 else None
    notes, std_error, holds = [], None, None
    if var_u is None and var_j is None:
        notes.append(
            "one run on each side: nothing to judge the seed-to-seed spread by; "
            "train the joint and the unimodal models with 3 or more seeds"
        )
    else:  # a side with a single run borrows the other side's spread
        var_u, var_j = (var_j if var_u is None else var_u), (var_u if var_j is None else var_j)
        std_error = math.sqrt(var_u / unimodal_runs + var_j / joint_runs)  # type: ignore[operator]
        holds = shortfall > 0 if abs(shortfall) > z * std_error else None
    if ranking.optimization_dominant == best_unimodal:
        notes.append(
            f"{best_unimodal!r} is also optimization-dominant: with this ranking the paper's rule gives every "
            f"encoder gamma_p (a larger learning rate, not a prioritisation); to prioritise {best_unimodal!r}, pass "
            f"dominant={best_unimodal!r} to PDMPOptimizer without the ranking (every other modality gets 1/gamma_p)"
        )
    if not ranking.confident:
        notes.append("the ranking itself is not clear-cut: " + "; ".join(ranking.notes))
    verdict = {True: "holds", False: "fails", None: "too close to call"}[holds]
    return PremiseCheck(verdict, holds, shortfall, std_error, best_unimodal, unimodal_score, joint_score,
                        unimodal_runs, joint_runs, z, tuple(notes))  # fmt: skip
