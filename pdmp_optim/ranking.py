"""Stage 1 of PDMP: rank modalities by how their unimodal models score.

The *performance-dominant* modality ``m_p`` is the one whose unimodal model scores best at the end of
training; the *optimization-dominant* modality ``m_o`` is the one that scores best at the start. Train the
unimodal models however you like and hand the scores to :func:`rank_modalities`:

>>> ranking = rank_modalities({"audio": [0.55, 0.60, 0.62], "visual": [0.35, 0.58, 0.71]})
>>> ranking.performance_dominant, ranking.optimization_dominant
('visual', 'audio')
>>> ranking.gammas(gamma_p=15)
{'visual': 15.0, 'audio': 0.06666666666666667}
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .coefficients import pdmp_gammas

__all__ = ["ModalityRanking", "rank_modalities"]

Scores = Mapping[str, Any]


@dataclass(frozen=True)
class ModalityRanking:
    """The result of :func:`rank_modalities`: plain, comparable, serialisable data.

    Scores are means over runs (one run: the scores themselves); ``*_std`` are sample standard deviations
    over runs (0.0 for a single run).

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

    >>> r = rank_modalities({"a": 0.6, "v": 0.7}, early={"a": 0.5, "v": 0.3})
    >>> ModalityRanking.from_dict(r.to_dict()) == r
    True
    """

    order: tuple[str, ...]
    final_scores: dict[str, float]
    early_scores: dict[str, float] | None
    final_std: dict[str, float]
    early_std: dict[str, float] | None
    higher_is_better: bool = True
    run_winners: tuple[str, ...] = ()
    agreement: float = 1.0
    notes: tuple[str, ...] = field(default=())

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
        return max(len(self.run_winners), 1)

    @property
    def confident(self) -> bool:
        """``True`` when nothing in :attr:`notes` casts doubt on the ranking.

        >>> rank_modalities({"a": [0.6, 0.7], "v": [0.4, 0.8]}).confident
        True
        """
        return not self.notes

    def __hash__(self) -> int:
        def items(d: Mapping[str, float] | None) -> tuple[tuple[str, float], ...] | None:
            return None if d is None else tuple(sorted(d.items()))

        return hash(
            (
                self.order,
                items(self.final_scores),
                items(self.early_scores),
                items(self.final_std),
                items(self.early_std),
                self.higher_is_better,
                self.run_winners,
                self.agreement,
                self.notes,
            )
        )

    def gammas(self, gamma_p: float = 15.0) -> dict[str, float]:
        """Coefficient per modality by the paper's rule (see :func:`pdmp_optim.pdmp_gammas`).

        ``m_p`` gets ``gamma_p``; another modality gets ``1 / gamma_p`` if it is ``m_o`` or its early score
        beats ``m_p``'s, else ``gamma_p``. Without early scores, every other modality gets ``1 / gamma_p``.

        >>> rank_modalities({"a": [0.6, 0.7], "v": [0.4, 0.8]}).gammas(10)
        {'v': 10.0, 'a': 0.1}
        """
        return pdmp_gammas(
            self.order,
            self.performance_dominant,
            gamma_p=gamma_p,
            optimization_dominant=self.optimization_dominant,
            early_scores=self.early_scores,
            higher_is_better=self.higher_is_better,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reverses it."""
        return {
            "order": list(self.order),
            "final_scores": dict(self.final_scores),
            "early_scores": None if self.early_scores is None else dict(self.early_scores),
            "final_std": dict(self.final_std),
            "early_std": None if self.early_std is None else dict(self.early_std),
            "higher_is_better": self.higher_is_better,
            "run_winners": list(self.run_winners),
            "agreement": self.agreement,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModalityRanking:
        """Rebuild a ranking from :meth:`to_dict`'s output (e.g. after ``json.load``).

        Only ``order`` and ``final_scores`` are required; the other keys default as for one run.
        """
        missing = [key for key in ("order", "final_scores") if key not in data]
        if missing:
            raise ValueError(f"not a ModalityRanking dict: missing {missing}; pass the output of to_dict()")
        order = tuple(str(name) for name in data["order"])
        final = {str(k): float(v) for k, v in data["final_scores"].items()}
        if set(final) != set(order) or len(order) != len(final):
            raise ValueError(f"final_scores names {sorted(final)} but order names {list(order)}")
        early = data.get("early_scores")
        early_std = data.get("early_std")
        final_std = data.get("final_std")
        return cls(
            order=order,
            final_scores={n: final[n] for n in order},
            early_scores=None if early is None else {str(k): float(v) for k, v in early.items()},
            final_std={n: 0.0 for n in order}
            if final_std is None
            else {str(k): float(v) for k, v in final_std.items()},
            early_std=None if early_std is None else {str(k): float(v) for k, v in early_std.items()},
            higher_is_better=bool(data.get("higher_is_better", True)),
            run_winners=tuple(str(w) for w in data.get("run_winners", ())),
            agreement=float(data.get("agreement", 1.0)),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )

    def __repr__(self) -> str:
        def fmt(scores: Mapping[str, float] | None, std: Mapping[str, float] | None) -> str:
            if scores is None:
                return "None"
            parts = []
            for name in self.order:
                text = f"{scores[name]:.4g}"
                if self.num_runs > 1 and std is not None:
                    text += f"±{std[name]:.2g}"
                parts.append(f"{name!r}: {text}")
            return "{" + ", ".join(parts) + "}"

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
        return text + ")"


def rank_modalities(
    scores: Scores,
    *,
    early: Mapping[str, Any] | None = None,
    higher_is_better: bool = True,
    early_epoch: int = 0,
    warn: bool = True,
) -> ModalityRanking:
    """Rank modalities by their unimodal models' scores (PDMP's modality analysis).

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
        early_epoch: which epoch of a history counts as "early" (default: the first).
        warn: emit one ``UserWarning`` when :attr:`ModalityRanking.notes` is not empty.

    Ties are broken by the order of ``scores`` (the first listed wins) and reported in ``notes``. With
    several runs, ``notes`` also report runs whose own winners disagree (``agreement < 1``), the two best
    final means lying within one standard deviation of each other, and runs disagreeing on the
    optimization-dominant modality. Any note means one ``UserWarning`` naming the modalities.

    Raises:
        ValueError: fewer than two modalities, empty or ragged input, NaN/inf scores, or ``early`` given
            together with histories.
        TypeError: a score that is not a number.

    >>> r = rank_modalities({"audio": 0.62, "visual": 0.71}, early={"audio": 0.55, "visual": 0.35})
    >>> r.order
    ('visual', 'audio')
    >>> rank_modalities({"a": [1.2, 0.9], "v": [2.0, 0.7]}, higher_is_better=False).performance_dominant
    'v'
    >>> r = rank_modalities({"a": [[0.5, 0.6], [0.5, 0.61]], "v": [[0.3, 0.8], [0.2, 0.79]]})
    >>> r.agreement, r.run_winners, r.final_std["v"] < 0.01
    (1.0, ('v', 'v'), True)
    """
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping modality -> scores, got {type(scores).__name__}")
    if len(scores) < 2:
        raise ValueError(
            f"rank_modalities needs scores for at least two modalities, got {list(scores)}; "
            "with one modality there is nothing to prioritise"
        )
    if isinstance(early_epoch, bool) or not isinstance(early_epoch, int):
        raise TypeError(f"early_epoch must be an int (an epoch index), got {type(early_epoch).__name__}")
    runs = {str(name): _as_runs(str(name), value) for name, value in scores.items()}
    if len(runs) != len(scores):
        raise ValueError(f"modality names must be distinct as strings, got {list(scores)}")
    names = list(runs)
    counts = {name: len(r) for name, r in runs.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every modality needs the same number of runs, got {counts}; drop the extra runs")
    lengths = {name: sorted({len(history) for history in r}) for name, r in runs.items()}
    if len({n for ls in lengths.values() for n in ls}) != 1:
        raise ValueError(
            f"histories must all have the same number of epochs, got {lengths} per modality; trim them to a "
            "common length, or pass single final scores (with early=) instead"
        )
    n_epochs = lengths[names[0]][0]
    n_runs = counts[names[0]]

    early_runs: dict[str, list[float]] | None
    if early is not None:
        if n_epochs > 1:
            raise ValueError("pass early= only with single final scores; histories already hold early scores")
        if n_runs != 1:
            raise ValueError("early= takes one score per modality; give per-epoch histories for several runs")
        if not isinstance(early, Mapping) or set(map(str, early)) != set(names):
            shown = list(early) if isinstance(early, Mapping) else type(early).__name__
            raise ValueError(f"early= must map exactly the modalities {names} to a score, got {shown}")
        early_by_name = {str(k): v for k, v in early.items()}
        early_runs = {name: [_as_number(name, early_by_name[name], "early score")] for name in names}
    elif n_epochs > 1:
        if not -n_epochs <= early_epoch < n_epochs:
            raise ValueError(
                f"early_epoch={early_epoch} is outside the histories ({n_epochs} epochs); "
                f"pass 0 <= early_epoch < {n_epochs}"
            )
        early_runs = {name: [history[early_epoch] for history in r] for name, r in runs.items()}
    else:
        early_runs = None

    final_runs = {name: [history[-1] for history in r] for name, r in runs.items()}
    final = {name: statistics.fmean(v) for name, v in final_runs.items()}
    final_std = {name: _std(v) for name, v in final_runs.items()}
    early_mean = None if early_runs is None else {n: statistics.fmean(v) for n, v in early_runs.items()}
    early_std = None if early_runs is None else {n: _std(v) for n, v in early_runs.items()}

    sign = 1.0 if higher_is_better else -1.0
    order = tuple(sorted(names, key=lambda n: -sign * final[n]))  # stable: ties keep the input order
    run_winners = tuple(_best({n: final_runs[n][i] for n in names}, higher_is_better) for i in range(n_runs))
    agreement = sum(w == order[0] for w in run_winners) / n_runs

    notes: list[str] = []
    best, second = order[0], order[1]
    if final[best] == final[second]:
        tied = [n for n in order if final[n] == final[best]]
        notes.append(f"final scores tie between {tied}; {best!r} wins by input order")
    elif n_runs > 1 and abs(final[best] - final[second]) <= max(final_std[best], final_std[second]):
        notes.append(
            f"{best!r} and {second!r} are within one standard deviation at the end "
            f"({final[best]:.4g}±{final_std[best]:.2g} vs {final[second]:.4g}±{final_std[second]:.2g})"
        )
    if agreement < 1.0:
        notes.append(f"only {agreement:.0%} of runs rank {best!r} first (run winners: {list(run_winners)})")
    if early_mean is not None and early_runs is not None:
        m_o = _best(early_mean, higher_is_better)
        tied = [n for n in names if early_mean[n] == early_mean[m_o]]
        if len(tied) > 1:
            notes.append(f"early scores tie between {tied}; {m_o!r} is optimization-dominant by input order")
        early_winners = [_best({n: early_runs[n][i] for n in names}, higher_is_better) for i in range(n_runs)]
        if any(w != m_o for w in early_winners):
            notes.append(
                f"runs disagree on the optimization-dominant modality (early winners: {early_winners}; {m_o!r} by mean)"
            )
    if notes and warn:
        warnings.warn(_warning_message(notes), UserWarning, stacklevel=2)
    return ModalityRanking(
        order=order,
        final_scores={n: final[n] for n in order},
        early_scores=early_mean,  # input order: ties for m_o go to the first listed, like ties for m_p
        final_std={n: final_std[n] for n in order},
        early_std=early_std,
        higher_is_better=higher_is_better,
        run_winners=run_winners,
        agreement=agreement,
        notes=tuple(notes),
    )


def _warning_message(notes: Sequence[str]) -> str:
    """The one warning text for a ranking with ``notes`` (shared with :func:`analyze_modalities`)."""
    return (
        "modality ranking is not clear-cut: "
        + "; ".join(notes)
        + ". More epochs, data or seeds help; or pass explicit gammas={...} to PDMPOptimizer."
    )


def _best(scores: Mapping[str, float], higher_is_better: bool) -> str:
    """The best-scoring name; ties go to the first in mapping order."""
    sign = 1.0 if higher_is_better else -1.0
    return max(scores, key=lambda n: (sign * scores[n], -list(scores).index(n)))


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _as_number(name: str, value: Any, what: str) -> float:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # NumPy scalars/arrays, tensors
    while isinstance(value, list) and len(value) == 1:
        value = value[0]  # one-element tensors and arrays
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} of {name!r} must be a number, got {type(value).__name__}: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} of {name!r} is {number}; drop or repair that run before ranking")
    return number


def _as_runs(name: str, value: Any) -> list[list[float]]:
    """Normalise one modality's scores to a list of runs, each a list of per-epoch scores."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [[_as_number(name, value, "score")]]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(
            f"scores of {name!r} must be a number, a per-epoch list, or a list of such lists; "
            f"got {type(value).__name__}"
        )
    if len(value) == 0:
        raise ValueError(f"scores of {name!r} are empty; give at least one score")
    items = [v.tolist() if hasattr(v, "tolist") else v for v in value]
    if all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in items):
        runs = []
        for i, history in enumerate(items):
            if len(history) == 0:
                raise ValueError(f"run {i} of {name!r} is empty; give at least one score per run")
            runs.append([_as_number(name, s, f"score (run {i}, epoch {e})") for e, s in enumerate(history)])
        return runs
    return [[_as_number(name, s, f"score (epoch {e})") for e, s in enumerate(items)]]
