"""Stage 1 of PDMP: rank modalities by how their unimodal models score.

The *performance-dominant* modality ``m_p`` is the one whose unimodal model scores best at the end of
training; the *optimization-dominant* modality ``m_o`` is the one that scores best at the start. Train the
unimodal models however you like and hand the scores to :func:`rank_modalities`:

>>> ranking = rank_modalities({"audio": [0.55, 0.60, 0.62], "visual": [0.35, 0.58, 0.71]})
>>> ranking.performance_dominant, ranking.optimization_dominant
('visual', 'audio')
>>> ranking.gammas(gamma_p=15)
{'visual': 15.0, 'audio': 0.06666666666666667}

Before adopting PDMP, check the paper's premise on your task: does your jointly trained model end below its
best unimodal model? :meth:`ModalityRanking.check_premise` compares the two and says how sure that is:

>>> ranking.check_premise([0.58, 0.60]).verdict  # the joint model's validation scores, one per run
'holds'

Its answer is a :class:`PremiseCheck`.
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

from .._checks import as_finite, check_int, check_modalities
from ..coefficients import pdmp_gammas

__all__ = ["ModalityRanking", "PremiseCheck", "rank_modalities"]

REPAIR = "drop or repair that run before ranking"
_ADVICE = {True: "PDMP is worth trying", False: "PDMP is not expected to help",
           None: "try PDMP only against a tuned learning rate on a validation split"}  # fmt: skip


@dataclass(frozen=True)
class ModalityRanking:
    """The result of :func:`rank_modalities`: plain, comparable, serialisable data.

    >>> r = rank_modalities({"a": 0.6, "v": 0.7}, early={"a": 0.5, "v": 0.3})
    >>> ModalityRanking.from_dict(r.to_dict()) == r
    True

    Scores are means over runs (one run: the scores themselves); ``*_std`` are sample standard deviations
    over runs (0.0 for a single run).

    Construction checks every field (a ``ValueError`` or ``TypeError`` naming it: names that differ between
    fields, an ``order`` that is not best-first, an ``agreement`` that does not match ``run_winners``, NaN
    scores, ...) and stores clean values (tuples, ``float`` scores, ``final_*`` dicts in ``order``). Only
    ``order`` and ``final_scores`` are required; a field left out (or ``None``) takes the value it has for
    one run: spreads of 0.0, ``run_winners`` ``(order[0],)``, and the ``agreement`` that ``run_winners`` give.

    >>> ModalityRanking(("v", "a"), {"a": 0.6, "v": 0.7}) == rank_modalities({"v": 0.7, "a": 0.6})
    True

    Attributes:
        order: modalities from best to worst final score (ties keep the input order).
        final_scores: final score per modality.
        early_scores: early score per modality (in input order, which breaks ties for ``m_o``), or ``None``
            when only final scores were given.
        final_std: spread of the final scores over runs.
        early_std: spread of the early scores over runs (``None`` without early scores).
        higher_is_better: ``True`` for accuracies, ``False`` for losses.
        run_winners: each run's own best final modality, one per run.
        agreement: fraction of runs whose own winner is :attr:`performance_dominant` (1.0 for one run).
        notes: why the ranking may not be trustworthy (ties, near ties, disagreeing runs); empty when it is
            clear. When it is not empty, :func:`rank_modalities` warned once with the same text (unless
            called with ``warn=False``).
        num_samples: how many samples each modality's scores rest on, ``{modality: {"train": n, "eval": n}}``
            (training samples per epoch, the fewest over runs and epochs, and evaluation samples), as
            :func:`~pdmp_optim.analyze_modalities` counts them: fewer than the data holds when a modality is
            missing for some samples. ``None`` when unknown (:func:`rank_modalities` is given scores only).
    """

    order: tuple[str, ...]
    final_scores: dict[str, float]
    early_scores: dict[str, float] | None = None
    final_std: dict[str, float] = None  # type: ignore[assignment]  # None: 0.0 each (one run)
    early_std: dict[str, float] | None = None  # None: 0.0 each when there are early scores
    higher_is_better: bool = True
    run_winners: tuple[str, ...] = None  # type: ignore[assignment]  # None: one run, won by order[0]
    agreement: float = None  # type: ignore[assignment]  # None: as run_winners give it
    notes: tuple[str, ...] = ()
    num_samples: dict[str, dict[str, int]] | None = None

    def __post_init__(self) -> None:  # the one home of the checks: rank_modalities, from_dict, replace
        order = _strings(self.order, "order", names=True)
        if len(order) < 2 or len(set(order)) != len(order):
            raise ValueError(f"order must list at least two distinct modalities, got {list(order)}")
        higher = self.higher_is_better
        if not isinstance(higher, bool):
            raise TypeError(f"higher_is_better must be true or false, got {higher!r}")
        final = _per_modality(self.final_scores, "final_scores", order, as_finite)
        sign = 1.0 if higher else -1.0
        if any(sign * final[a] < sign * final[b] for a, b in itertools.pairwise(order)):
            raise ValueError(
                f"order {list(order)} is not best-first by final_scores {final} (higher_is_better={higher})"
            )
        zeros, early, early_std = dict.fromkeys(order, 0.0), None, None
        if self.early_scores is not None:  # early scores keep their own order: it breaks ties for m_o
            early = _per_modality(self.early_scores, "early_scores", order, as_finite, ordered=False)
            std = zeros if self.early_std is None else self.early_std
            early_std = _per_modality(std, "early_std", order, _spread, ordered=False)
        elif self.early_std is not None:
            raise ValueError("early_std is given but early_scores is not; pass both or neither")
        final_std = _per_modality(zeros if self.final_std is None else self.final_std, "final_std", order, _spread)
        winners = _strings(order[:1] if self.run_winners is None else self.run_winners, "run_winners", names=True)
        if not winners or any(w not in order for w in winners):
            raise ValueError(f"run_winners must name one modality of order {list(order)} per run, got {list(winners)}")
        agreement = winners.count(order[0]) / len(winners)
        given = agreement if self.agreement is None else as_finite(self.agreement, "agreement")
        if not math.isclose(given, agreement, rel_tol=1e-9):
            raise ValueError(
                f"agreement={given} does not match run_winners {list(winners)}: {agreement} of the runs rank "
                f"{order[0]!r} first; pass the output of to_dict()"
            )
        samples = None if self.num_samples is None else _per_modality(self.num_samples, "num_samples", order, _counts)
        clean = (order, final, early, final_std, early_std, higher, winners, agreement, _strings(self.notes, "notes"))
        for f, value in zip(fields(self), (*clean, samples), strict=True):
            object.__setattr__(self, f.name, value)

    @property
    def performance_dominant(self) -> str:
        """``m_p``: the modality whose unimodal model scores best at the end."""
        return self.order[0]

    @property
    def optimization_dominant(self) -> str | None:
        """``m_o``: the modality whose unimodal model scores best at the start (``None`` if unknown)."""
        if self.early_scores is None:
            return None
        return _best(self.early_scores, self.higher_is_better)

    @property
    def num_runs(self) -> int:
        """How many runs per modality the scores came from."""
        return len(self.run_winners)

    @property
    def confident(self) -> bool:
        """``True`` when nothing in :attr:`notes` casts doubt on the ranking.

        >>> rank_modalities({"a": [0.6, 0.7], "v": [0.4, 0.8]}).confident
        True
        """
        return not self.notes

    def __hash__(self) -> int:  # the tuple fields suffice: equal rankings have equal tuples
        return hash((self.order, self.higher_is_better, self.run_winners, self.agreement, self.notes))

    def gammas(self, gamma_p: float = 15.0) -> dict[str, float]:
        """Coefficient per modality by the paper's rule (see :func:`pdmp_optim.pdmp_gammas`).

        >>> rank_modalities({"a": [0.6, 0.7], "v": [0.4, 0.8]}).gammas(10)
        {'v': 10.0, 'a': 0.1}

        ``m_p`` gets ``gamma_p``; another modality gets ``1 / gamma_p`` if it is ``m_o`` or its early score
        beats ``m_p``'s, else ``gamma_p``. Without early scores, every other modality gets ``1 / gamma_p``.
        A method, not a property like ``PDMPOptimizer.gammas``: the coefficients depend on ``gamma_p``.
        """
        return pdmp_gammas(self.order, self.performance_dominant, gamma_p=gamma_p,
                           optimization_dominant=self.optimization_dominant, early_scores=self.early_scores,
                           higher_is_better=self.higher_is_better)  # fmt: skip

    def check_premise(self, joint: Any, *, z: float = 2.0) -> PremiseCheck:
        """Does the jointly trained model end below its best unimodal model (PDMP's premise), and how surely?

        >>> unimodal = rank_modalities({"audio": [[0.40, 0.60], [0.41, 0.61], [0.42, 0.60]],
        ...                             "visual": [[0.20, 0.80], [0.22, 0.82], [0.21, 0.81]]})
        >>> check = unimodal.check_premise([0.74, 0.76, 0.75])  # joint model, validation accuracy per seed
        >>> check.verdict, check.holds, round(check.shortfall, 3)
        ('holds', True, 0.06)
        >>> unimodal.check_premise([0.86, 0.85, 0.87]).verdict
        'fails'
        >>> unimodal.check_premise([0.80, 0.82, 0.79]).verdict
        'too close to call'

        The ranking must come from unimodal models trained with the joint model's budget (the same encoders,
        data, epochs and optimizer, each modality alone) and scored on the same validation split and metric as
        ``joint``; give both several seeds. ``shortfall`` is how far the joint model's mean trails the best
        unimodal mean (``> 0``: the premise holds; for losses, ``higher_is_better=False``, the signs follow).
        Its standard error treats the two sets of runs as independent (Welch): ``sqrt(s_j**2 / n_j + s_u**2 /
        n_u)``; a side with one run borrows the other side's spread. The premise ``"holds"`` when the shortfall
        exceeds ``z`` standard errors, ``"fails"`` when the joint model leads by more than that, and is ``"too
        close to call"`` otherwise, or when both sides have a single run (no spread to judge by).

        When the performance-dominant modality is also the optimization-dominant one, the paper's rule gives
        every encoder ``gamma_p`` (a larger learning rate, not a prioritisation); :attr:`PremiseCheck.notes` then
        names ``PDMPOptimizer(..., dominant=...)`` without the ranking, which damps every other modality. The
        optimization-dominant modality is read at ``early_epoch``: where every modality is still near chance
        there it is noise (the notes then usually report runs that disagree on it), so rank with a later
        ``early_epoch`` or name ``optimization_dominant=`` yourself.

        Args:
            joint: the jointly trained model's validation score, one number per run (a number, a list, a
                NumPy array or a tensor).
            z: how many standard errors the shortfall must exceed either way (default 2, about 95%).

        Raises:
            ValueError: no joint scores, a NaN or inf score, ``z`` not a finite number >= 0.
            TypeError: a score that is not a number.
        """
        z = as_finite(z, "z")
        if z < 0:
            raise ValueError(f"z must be >= 0 (a number of standard errors), got {z}")
        joint = joint.tolist() if hasattr(joint, "tolist") else joint
        values = joint if _is_list(joint) else [joint]
        if len(values) == 0:
            raise ValueError("joint needs at least one score of the jointly trained model (one per run)")
        scores = [as_finite(v, f"joint score (run {i})", REPAIR) for i, v in enumerate(values)]
        best, n_u, n_j = self.performance_dominant, self.num_runs, len(scores)
        unimodal, joint_mean = self.final_scores[best], statistics.fmean(scores)
        shortfall = (1.0 if self.higher_is_better else -1.0) * (unimodal - joint_mean)
        var_u = self.final_std[best] ** 2 if n_u > 1 else None
        var_j = statistics.variance(scores) if n_j > 1 else None
        notes, std_error, holds = [], None, None
        if var_u is None and var_j is None:
            notes.append(
                "one run on each side: nothing to judge the seed-to-seed spread by; "
                "train the joint and the unimodal models with 3 or more seeds"
            )
        else:  # a side with a single run borrows the other side's spread
            var_u, var_j = (var_j if var_u is None else var_u), (var_u if var_j is None else var_j)
            std_error = math.sqrt(var_u / n_u + var_j / n_j)  # type: ignore[operator]
            holds = shortfall > 0 if abs(shortfall) > z * std_error else None
        if self.optimization_dominant == best:
            notes.append(
                f"{best!r} is also optimization-dominant: with this ranking the paper's rule gives every encoder "
                f"gamma_p (a larger learning rate, not a prioritisation); to prioritise {best!r}, pass "
                f"dominant={best!r} to PDMPOptimizer without the ranking (every other modality gets 1/gamma_p)"
            )
        if not self.confident:
            notes.append("the ranking itself is not clear-cut: " + "; ".join(self.notes))
        verdict = {True: "holds", False: "fails", None: "too close to call"}[holds]
        return PremiseCheck(verdict, holds, shortfall, std_error, best, unimodal, joint_mean, n_u, n_j, z, tuple(notes))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reverses it.

        >>> rank_modalities({"a": 0.6, "v": 0.7}).to_dict()["order"]
        ['v', 'a']
        """
        return dict(asdict(self), order=list(self.order), run_winners=list(self.run_winners), notes=list(self.notes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModalityRanking:
        """Rebuild a ranking from :meth:`to_dict`'s output (e.g. after ``json.load``), checking every field.

        Only ``order`` and ``final_scores`` are required; the other keys default as for one run. Data that
        contradicts itself is a ``ValueError`` naming the field, as for the constructor.

        >>> ModalityRanking.from_dict({"order": ["v", "a"], "final_scores": {"a": 0.6, "v": 0.7}}).run_winners
        ('v',)
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict needs a dict (the output of to_dict()), got {type(data).__name__}")
        missing = [key for key in ("order", "final_scores") if key not in data]
        unknown = [key for key in data if key not in {f.name for f in fields(cls)}]
        if missing or unknown:
            raise ValueError(
                f"not a ModalityRanking dict: missing {missing}, unknown keys {unknown}; pass the output of to_dict()"
            )
        return cls(**data)

    def warning_text(self) -> str:
        """The text :func:`rank_modalities` warns with when :attr:`notes` is not empty (``""`` when confident).

        >>> rank_modalities({"a": 0.5, "b": 0.5}, warn=False).warning_text().startswith("modality ranking is not")
        True
        """
        if not self.notes:
            return ""
        return (
            f"modality ranking is not clear-cut: {'; '.join(self.notes)}. More epochs, data or seeds help; "
            "or pass explicit gammas={...} to PDMPOptimizer."
        )

    def __repr__(self) -> str:
        def fmt(scores: Mapping[str, float] | None, std: Mapping[str, float] | None) -> str:
            if scores is None or std is None:
                return "None"
            shown = [f"{n!r}: {scores[n]:.4g}" + (f"±{std[n]:.2g}" if self.num_runs > 1 else "") for n in self.order]
            return "{" + ", ".join(shown) + "}"

        text = (
            f"ModalityRanking(performance_dominant={self.performance_dominant!r}, "
            f"optimization_dominant={self.optimization_dominant!r}, "
            f"final={fmt(self.final_scores, self.final_std)}, early={fmt(self.early_scores, self.early_std)}"
        )
        if not self.higher_is_better:
            text += ", higher_is_better=False"
        if self.num_runs > 1:
            text += f", runs={self.num_runs}, agreement={self.agreement:.2f}"
        if self.notes:
            text += f", notes={list(self.notes)!r}"
        if self.num_samples is not None and len({tuple(c.items()) for c in self.num_samples.values()}) > 1:
            text += f", num_samples={self.num_samples!r}"  # shown where modalities rest on different samples
        return text + ")"


def rank_modalities(
    scores: Mapping[str, Any], *, early: Mapping[str, Any] | None = None, higher_is_better: bool = True,
    early_epoch: int = 0, warn: bool = True,
) -> ModalityRanking:  # fmt: skip
    """Rank modalities by their unimodal models' scores (PDMP's modality analysis).

    >>> r = rank_modalities({"audio": 0.62, "visual": 0.71}, early={"audio": 0.55, "visual": 0.35})
    >>> r.order, r.optimization_dominant
    (('visual', 'audio'), 'audio')
    >>> rank_modalities({"a": [1.2, 0.9], "v": [2.0, 0.7]}, higher_is_better=False).performance_dominant
    'v'
    >>> r = rank_modalities({"a": [[0.5, 0.6], [0.5, 0.61]], "v": [[0.3, 0.8], [0.2, 0.79]]})
    >>> r.agreement, r.run_winners, r.final_std["v"] < 0.01
    (1.0, ('v', 'v'), True)

    Args:
        scores: modality -> one of
            * a per-epoch history ``[s_0, ..., s_T]`` (early score ``s[early_epoch]``, final score ``s[-1]``),
            * several runs of that, ``[[run 1 history], [run 2 history], ...]`` (same number of runs per
              modality; run ``i`` of every modality is compared with run ``i`` of the others),
            * a single final score (then pass ``early`` for the early scores, or leave ``m_o`` unknown).
            All histories must have the same number of epochs. Numbers may be Python floats, NumPy values or
            one-element tensors.
        early: modality -> early score, only with single final scores.
        higher_is_better: ``True`` for accuracy/F1, ``False`` for losses.
        early_epoch: which epoch of a history counts as "early", ``0 <= early_epoch < epochs`` (default: the
            first).
        warn: emit one ``UserWarning`` when :attr:`ModalityRanking.notes` is not empty.

    Ties are broken by the order of ``scores`` (the first listed wins) and reported in ``notes``. With
    several runs, ``notes`` also report runs whose own winners disagree (``agreement < 1``), the two best
    final means lying within one standard deviation of each other, and runs disagreeing on the
    optimization-dominant modality. Any note means one ``UserWarning`` naming the modalities.

    Raises:
        ValueError: fewer than two modalities, empty or ragged input, NaN/inf scores, an ``early_epoch``
            outside the histories, or ``early`` given together with histories.
        TypeError: a score that is not a number, a modality name that is not a non-empty string.
    """
    runs = _histories(scores)
    ranking = _rank(runs, _early_runs(runs, early, early_epoch), bool(higher_is_better))
    if ranking.notes and warn:
        warnings.warn(ranking.warning_text(), UserWarning, stacklevel=2)
    return ranking


# ----------------------------------------------------------------------------- the premise check's answer
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
        unimodal_score: its mean final score.
        joint_score: the joint model's mean score.
        unimodal_runs: how many runs the unimodal mean is over.
        joint_runs: how many runs the joint mean is over.
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


# ------------------------------------------------------------------------------------- reading the scores
def _histories(scores: Any) -> dict[str, list[list[float]]]:
    """Each modality's runs, each run a list of per-epoch scores; the same number of runs and epochs for all."""
    names = check_modalities(scores, "scores", "a score, a per-epoch history or a list of histories (one per run)")
    runs = {name: _as_runs(name, scores[name]) for name in names}
    counts = {name: len(r) for name, r in runs.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every modality needs the same number of runs, got {counts}; drop the extra runs")
    lengths = {name: sorted({len(history) for history in r}) for name, r in runs.items()}
    if len({n for ls in lengths.values() for n in ls}) != 1:
        raise ValueError(
            f"histories must all have the same number of epochs, got {lengths} per modality; trim them to a "
            "common length, or pass single final scores (with early=) instead"
        )
    return runs


def _as_runs(name: str, value: Any) -> list[list[float]]:
    """One modality's scores as a list of runs, each a list of per-epoch scores."""
    value = value.tolist() if hasattr(value, "tolist") else value  # NumPy values and arrays, tensors
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [[as_finite(value, f"score of {name!r}", REPAIR)]]
    if not _is_list(value):
        raise TypeError(
            f"scores of {name!r} must be a number, a per-epoch list, or a list of such lists; "
            f"got {type(value).__name__}"
        )
    if len(value) == 0:
        raise ValueError(f"scores of {name!r} are empty; give at least one score")
    items = [v.tolist() if hasattr(v, "tolist") else v for v in value]
    if not all(_is_list(v) for v in items):
        return [[as_finite(s, f"score (epoch {e}) of {name!r}", REPAIR) for e, s in enumerate(items)]]
    for i, history in enumerate(items):
        if len(history) == 0:
            raise ValueError(f"run {i} of {name!r} is empty; give at least one score per run")
    return [
        [as_finite(s, f"score (run {i}, epoch {e}) of {name!r}", REPAIR) for e, s in enumerate(history)]
        for i, history in enumerate(items)
    ]


def check_early_epoch(early_epoch: Any, n_epochs: int) -> int:
    """``early_epoch`` as an int in ``[0, n_epochs)`` (any ``>= 0`` when there is a single epoch)."""
    early_epoch = check_int(early_epoch, "early_epoch")
    if early_epoch < 0 or (n_epochs > 1 and early_epoch >= n_epochs):
        raise ValueError(
            f"early_epoch={early_epoch} is outside the histories ({n_epochs} epochs); "
            f"pass 0 <= early_epoch < {n_epochs}"
        )
    return early_epoch


def _early_runs(runs: dict[str, list[list[float]]], early: Any, early_epoch: Any) -> dict[str, list[float]] | None:
    """Each modality's early score per run: from ``early=``, from the histories, or ``None`` (unknown)."""
    names = list(runs)
    n_runs, n_epochs = len(runs[names[0]]), len(runs[names[0]][0])
    early_epoch = check_early_epoch(early_epoch, n_epochs)
    if early is None:
        return None if n_epochs == 1 else {name: [h[early_epoch] for h in r] for name, r in runs.items()}
    if n_epochs > 1:
        raise ValueError("pass early= only with single final scores; histories already hold early scores")
    if n_runs != 1:
        raise ValueError("early= takes one score per modality; give per-epoch histories for several runs")
    scores = _per_modality(early, "early", names, partial(as_finite, fix=REPAIR))
    return {name: [score] for name, score in scores.items()}


# ------------------------------------------------------------------------------------------------ ranking
def _rank(runs: dict[str, list[list[float]]], early_runs: dict[str, list[float]] | None,
          higher_is_better: bool) -> ModalityRanking:  # fmt: skip
    """Means, spreads, order, run winners and notes of checked runs."""
    final_runs = {name: [history[-1] for history in r] for name, r in runs.items()}
    (final, final_std), run_winners = _stats(final_runs), _winners(final_runs, higher_is_better)
    order = tuple(sorted(final, key=lambda n: -final[n] if higher_is_better else final[n]))  # stable: ties keep order
    notes = _final_notes(order, final, final_std, run_winners)
    early = early_std = None
    if early_runs is not None:
        early, early_std = _stats(early_runs)  # in input order: ties for m_o go to the first
        notes += _early_notes(early_runs, early, higher_is_better)
    return ModalityRanking(order, final, early, final_std, early_std, higher_is_better, run_winners, notes=tuple(notes))


def _final_notes(order: tuple[str, ...], final: Mapping[str, float], std: Mapping[str, float],
                 run_winners: tuple[str, ...]) -> list[str]:  # fmt: skip
    """Why ``m_p`` may be doubtful: exact ties, a gap within one standard deviation, disagreeing runs."""
    notes: list[str] = []
    best, second = order[0], order[1]
    if final[best] == final[second]:
        tied = [n for n in order if final[n] == final[best]]
        notes.append(f"final scores tie between {tied}; {best!r} wins by input order")
    elif len(run_winners) > 1 and abs(final[best] - final[second]) <= max(std[best], std[second]):
        notes.append(
            f"{best!r} and {second!r} are within one standard deviation at the end "
            f"({final[best]:.4g}±{std[best]:.2g} vs {final[second]:.4g}±{std[second]:.2g})"
        )
    if run_winners.count(best) < len(run_winners):
        share = run_winners.count(best) / len(run_winners)
        notes.append(f"only {share:.0%} of runs rank {best!r} first (run winners: {list(run_winners)})")
    return notes


def _early_notes(early_runs: Mapping[str, list[float]], early: Mapping[str, float], higher: bool) -> list[str]:
    """Why ``m_o`` may be doubtful: exact ties of the early means, runs whose early winners differ."""
    notes: list[str] = []
    m_o = _best(early, higher)
    tied = [n for n in early if early[n] == early[m_o]]
    if len(tied) > 1:
        notes.append(f"early scores tie between {tied}; {m_o!r} is optimization-dominant by input order")
    winners = list(_winners(early_runs, higher))
    if any(w != m_o for w in winners):
        notes.append(f"runs disagree on the optimization-dominant modality (early winners: {winners}; {m_o!r} by mean)")
    return notes


def _winners(per_run: Mapping[str, Sequence[float]], higher_is_better: bool) -> tuple[str, ...]:
    """Each run's best modality (ties go to the first listed)."""
    n_runs = len(next(iter(per_run.values())))
    return tuple(_best({n: v[i] for n, v in per_run.items()}, higher_is_better) for i in range(n_runs))


def _best(scores: Mapping[str, float], higher_is_better: bool) -> str:
    """The best-scoring name; ties go to the first in mapping order (as ``max`` and ``min`` break them)."""
    return (max if higher_is_better else min)(scores, key=scores.__getitem__)


def _stats(per_run: Mapping[str, Sequence[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (0.0 for one run) over runs, per modality."""
    mean = {name: statistics.fmean(values) for name, values in per_run.items()}
    return mean, {name: statistics.stdev(v) if len(v) > 1 else 0.0 for name, v in per_run.items()}


# ------------------------------------------------------------------------------------ checking the fields
def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _strings(value: Any, key: str, *, names: bool = False) -> tuple[str, ...]:
    """A list field of strings; with ``names``, of non-empty modality names."""
    if not _is_list(value) or not all(isinstance(v, str) and (v or not names) for v in value):
        raise TypeError(f"{key} must be a list of {'modality names' if names else 'strings'}, got {value!r}")
    return tuple(value)


def _per_modality(value: Any, key: str, order: Sequence[str], convert: Callable[[Any, str], Any],
                  ordered: bool = True) -> dict[str, Any]:  # fmt: skip
    """A ``{modality: value}`` field naming exactly the modalities of ``order``, each value converted; in the order
    of ``order`` (or, not ``ordered``, in its own)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must map modality -> value, got {type(value).__name__}")
    if set(value) != set(order):
        raise ValueError(f"{key} names {list(value)}, but the modalities are {list(order)}; give one entry each")
    return {name: convert(value[name], f"{key}[{name!r}]") for name in (order if ordered else value)}


def _spread(value: Any, what: str) -> float:
    """A standard deviation: a finite number ``>= 0``."""
    spread = as_finite(value, what)
    if spread < 0:
        raise ValueError(f"{what} must be >= 0 (a standard deviation), got {spread}")
    return spread


def _counts(entry: Any, what: str) -> dict[str, int]:
    """One modality's ``{"train": n, "eval": n}`` with ints ``n >= 0``."""
    if not isinstance(entry, Mapping) or set(entry) != {"train", "eval"}:
        raise ValueError(f"{what} must be {{'train': n, 'eval': n}} with counts n >= 0, got {entry!r}")
    return {key: check_int(entry[key], f"{what}[{key!r}]", minimum=0) for key in ("train", "eval")}
