"""rank_modalities / ModalityRanking, and the coefficient rule (pdmp_gammas, ModalityRanking.gammas)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import statistics
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pdmp_optim import ModalityRanking, PDMPOptimizer, rank_modalities
from pdmp_optim.coefficients import pdmp_gammas


def user_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------------------------ the inputs
def test_single_final_scores_with_early() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = rank_modalities(
            {"audio": 0.62, "visual": 0.71, "text": 0.5}, early={"audio": 0.55, "visual": 0.35, "text": 0.4}
        )
    assert r.order == ("visual", "audio", "text")
    assert r.performance_dominant == "visual"
    assert r.optimization_dominant == "audio"
    assert r.final_scores == {"visual": 0.71, "audio": 0.62, "text": 0.5}
    assert r.early_scores == {"visual": 0.35, "audio": 0.55, "text": 0.4}
    assert r.final_std == {"visual": 0.0, "audio": 0.0, "text": 0.0}
    assert r.num_runs == 1 and r.agreement == 1.0 and r.run_winners == ("visual",)
    assert r.notes == () and r.confident


def test_single_final_scores_without_early_leave_m_o_unknown() -> None:
    r = rank_modalities({"a": 0.6, "v": 0.7})
    assert r.optimization_dominant is None and r.early_scores is None and r.early_std is None
    assert r.gammas(10) == {"v": 10.0, "a": 0.1}  # unknown m_o: every other modality is damped


def test_histories_use_first_and_last_epoch() -> None:
    r = rank_modalities({"audio": [0.55, 0.60, 0.62], "visual": [0.35, 0.58, 0.71]})
    assert r.final_scores == {"visual": 0.71, "audio": 0.62}
    assert r.early_scores == {"visual": 0.35, "audio": 0.55}
    assert (r.performance_dominant, r.optimization_dominant) == ("visual", "audio")


def test_early_epoch_picks_the_early_score() -> None:
    scores = {"a": [0.1, 0.6, 0.7], "v": [0.2, 0.5, 0.8]}
    assert rank_modalities(scores).optimization_dominant == "v"
    r = rank_modalities(scores, early_epoch=1)
    assert r.optimization_dominant == "a" and r.early_scores == {"v": 0.5, "a": 0.6}
    with pytest.raises(ValueError, match=r"early_epoch=3 is outside the histories \(3 epochs\)"):
        rank_modalities(scores, early_epoch=3)
    with pytest.raises(TypeError, match="early_epoch must be an int"):
        rank_modalities(scores, early_epoch=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("early_epoch", [-1, -2, -3, -4])
def test_negative_early_epoch_is_refused_as_the_message_says(early_epoch: int) -> None:
    """0.1 took -1 as the last epoch although its own message asked for 0 <= early_epoch."""
    with pytest.raises(ValueError, match=rf"early_epoch={early_epoch} .*pass 0 <= early_epoch < 3"):
        rank_modalities({"a": [0.1, 0.6, 0.7], "v": [0.2, 0.5, 0.8]}, early_epoch=early_epoch)
    with pytest.raises(ValueError, match=rf"early_epoch={early_epoch} "):  # single scores: still not an index
        rank_modalities({"a": 0.6, "v": 0.7}, early_epoch=early_epoch)


def test_several_runs_mean_std_and_winners() -> None:
    runs = {
        "a": [[0.50, 0.60], [0.52, 0.64], [0.49, 0.62]],
        "v": [[0.30, 0.80], [0.35, 0.78], [0.32, 0.82]],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = rank_modalities(runs)
    assert r.num_runs == 3 and r.run_winners == ("v", "v", "v") and r.agreement == 1.0
    for name, rs in runs.items():
        assert r.final_scores[name] == pytest.approx(statistics.fmean(h[-1] for h in rs))
        assert r.early_scores is not None and r.early_std is not None
        assert r.early_scores[name] == pytest.approx(statistics.fmean(h[0] for h in rs))
        assert r.final_std[name] == pytest.approx(statistics.stdev(h[-1] for h in rs))
        assert r.early_std[name] == pytest.approx(statistics.stdev(h[0] for h in rs))
    assert "runs=3" in repr(r) and "agreement=1.00" in repr(r) and "±" in repr(r)


def test_several_runs_of_final_scores_only() -> None:
    r = rank_modalities({"a": [[0.6], [0.62]], "v": [[0.7], [0.71]]})
    assert r.num_runs == 2 and r.early_scores is None and r.performance_dominant == "v"


def test_lower_is_better_for_losses() -> None:
    r = rank_modalities({"a": [1.2, 0.9], "v": [2.0, 0.7]}, higher_is_better=False)
    assert r.order == ("v", "a")
    assert r.optimization_dominant == "a"
    assert r.gammas(4) == {"v": 4.0, "a": 0.25}
    assert "higher_is_better=False" in repr(r)
    runs = rank_modalities({"a": [[1.0, 0.5], [1.0, 0.6]], "v": [[2.0, 0.9], [2.0, 0.8]]}, higher_is_better=False)
    assert runs.run_winners == ("a", "a") and runs.performance_dominant == "a"


def test_numbers_from_numpy_and_torch() -> None:
    r = rank_modalities({"a": torch.tensor([0.5, 0.6]), "v": np.array([0.3, 0.9])}, early_epoch=np.int64(0).item())
    assert r.final_scores == pytest.approx({"v": 0.9, "a": 0.6})
    r = rank_modalities({"a": torch.tensor(0.6), "v": np.float32(0.7)}, early={"a": torch.tensor([0.5]), "v": 0.2})
    assert r.optimization_dominant == "a" and isinstance(r.final_scores["a"], float)
    r = rank_modalities({"a": torch.tensor([[0.5, 0.6], [0.5, 0.7]]), "v": [[0.3, 0.9], [0.2, 0.8]]})
    assert r.num_runs == 2


# ------------------------------------------------------------------------------------ ties and confidence
def test_exact_final_tie_first_listed_wins_with_one_warning() -> None:
    with pytest.warns(UserWarning, match=r"final scores tie between \['b', 'a'\]; 'b' wins by input order") as rec:
        r = rank_modalities({"b": 0.7, "a": 0.7, "c": 0.1})
    assert len(user_warnings(rec)) == 1
    assert rec[0].filename == __file__
    assert r.order == ("b", "a", "c") and r.performance_dominant == "b"
    assert not r.confident and "notes=" in repr(r)
    with pytest.warns(UserWarning):
        assert rank_modalities({"a": 0.7, "b": 0.7, "c": 0.1}).performance_dominant == "a"


def test_exact_early_tie_is_reported() -> None:
    with pytest.warns(UserWarning, match=r"early scores tie between \['a', 'v'\]; 'a' is optimization-dominant"):
        r = rank_modalities({"a": [0.5, 0.6], "v": [0.5, 0.8]})
    assert r.optimization_dominant == "a" and r.performance_dominant == "v"


def test_near_tie_within_one_std_warns_once() -> None:
    # every run agrees that "v" wins, but by less than the spread over runs
    runs = {"a": [[0.1, 0.70], [0.1, 0.60], [0.1, 0.80]], "v": [[0.3, 0.71], [0.3, 0.61], [0.3, 0.81]]}
    with pytest.warns(UserWarning, match=r"'v' and 'a' are within one standard deviation") as rec:
        r = rank_modalities(runs)
    assert len(user_warnings(rec)) == 1
    assert r.agreement == 1.0 and r.performance_dominant == "v"
    assert len(r.notes) == 1


def test_disagreeing_runs_lower_agreement_and_warn_once() -> None:
    runs = {
        "audio": [[0.5, 0.70], [0.5, 0.90], [0.5, 0.91], [0.5, 0.60]],
        "visual": [[0.3, 0.80], [0.3, 0.85], [0.3, 0.86], [0.3, 0.82]],
    }
    with pytest.warns(UserWarning) as rec:
        r = rank_modalities(runs)
    assert r.run_winners == ("visual", "audio", "audio", "visual")
    assert r.final_scores["visual"] == pytest.approx(0.8325) and r.final_scores["audio"] == pytest.approx(0.7775)
    assert r.performance_dominant == "visual"
    assert r.agreement == 0.5
    warned = user_warnings(rec)
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "'visual'" in text and "'audio'" in text and "only 50% of runs" in text and "gammas=" in text
    assert "agreement=0.50" in repr(r)
    assert any("only 50% of runs rank 'visual' first" in n for n in r.notes)


def test_runs_disagreeing_on_the_optimization_dominant_modality_are_reported() -> None:
    runs = {"a": [[0.6, 0.7], [0.4, 0.7], [0.6, 0.71]], "v": [[0.5, 0.9], [0.5, 0.9], [0.5, 0.91]]}
    with pytest.warns(UserWarning, match=r"runs disagree on the optimization-dominant modality") as rec:
        r = rank_modalities(runs)
    assert len(user_warnings(rec)) == 1
    assert r.optimization_dominant == "a" and r.agreement == 1.0


def test_clear_ranking_raises_no_warning() -> None:
    runs = {"a": [[0.6, 0.7], [0.61, 0.71], [0.62, 0.69]], "v": [[0.3, 0.9], [0.31, 0.91], [0.29, 0.89]]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = rank_modalities(runs)
        rank_modalities({"a": 0.6, "v": 0.7}, early={"a": 0.5, "v": 0.4})
        rank_modalities({"a": [0.5, 0.6], "v": [0.4, 0.7]})
    assert r.notes == () and r.agreement == 1.0


def test_warn_false_is_silent_but_keeps_notes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = rank_modalities({"a": 0.5, "b": 0.5}, warn=False)
    assert r.notes and not r.confident


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        ({"a": [0.5, math.nan], "v": [0.4, 0.7]}, {}, r"score \(epoch 1\) of 'a' is nan; drop or repair"),
        ({"a": math.inf, "v": 0.7}, {}, r"score of 'a' is inf"),
        ({"a": [[0.5, 0.6], [0.5, -math.inf]], "v": [[0.1, 0.2], [0.1, 0.2]]}, {}, r"run 1, epoch 1\) of 'a' is -inf"),
        ({"a": 0.6, "v": 0.7}, {"early": {"a": math.nan, "v": 0.1}}, r"early\['a'\] is nan; drop or repair"),
        ({"a": [], "v": [0.1]}, {}, r"scores of 'a' are empty"),
        ({"a": [[0.1], []], "v": [[0.1], [0.2]]}, {}, r"run 1 of 'a' is empty"),
        ({"a": [[0.1, 0.2]], "v": [[0.1, 0.2], [0.2, 0.3]]}, {}, r"same number of runs"),
        ({"a": [0.1, 0.2, 0.3], "v": [0.1, 0.2]}, {}, r"same number of epochs.*trim them"),
        ({"a": [[0.1, 0.2], [0.1, 0.2, 0.3]], "v": [[0.1, 0.2], [0.1, 0.2]]}, {}, r"same number of epochs"),
        ({"a": 0.6, "v": [0.4, 0.8]}, {}, r"same number of epochs"),
        ({"a": 0.6}, {}, r"at least two modalities"),
        ({}, {}, r"at least two modalities"),
        ({"a": [0.5, 0.6], "v": [0.4, 0.7]}, {"early": {"a": 0.1, "v": 0.2}}, r"early= only with single final"),
        ({"a": 0.6, "v": 0.7}, {"early": {"a": 0.1}}, r"early names \['a'\], but the modalities are \['a', 'v'\]"),
        ({"a": [[0.6], [0.7]], "v": [[0.6], [0.8]]}, {"early": {"a": 0.1, "v": 0.2}}, r"early= takes one score"),
    ],
)
def test_bad_input_is_a_value_error(scores: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rank_modalities(scores, **kwargs)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.1, 0.2], r"scores must map each modality to a score"),
        ({"a": "0.6", "v": 0.7}, r"scores of 'a' must be a number"),
        ({"a": [0.5, "x"], "v": [0.4, 0.7]}, r"must be a number"),
        ({"a": True, "v": 0.7}, r"must be a number"),
        ({"a": None, "v": 0.7}, r"scores of 'a' must be a number"),
    ],
)
def test_wrong_types_are_type_errors(scores: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        rank_modalities(scores)  # type: ignore[arg-type]


def test_modality_names_must_be_strings() -> None:
    """One rule for names everywhere: 0.1 turned 0 into "0", which then matched no encoder group."""
    for scores in ({0: 0.6, 1: 0.7}, {"a": 0.6, "": 0.7}):
        with pytest.raises(TypeError, match="modality names must be non-empty strings"):
            rank_modalities(scores)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- plain data
def _examples() -> list[ModalityRanking]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            rank_modalities({"a": 0.6, "v": 0.7}, early={"a": 0.5, "v": 0.3}),
            rank_modalities({"a": 0.6, "v": 0.7}),
            rank_modalities({"a": [1.2, 0.9], "v": [2.0, 0.7]}, higher_is_better=False),
            rank_modalities({"a": [[0.5, 0.7], [0.5, 0.9]], "v": [[0.3, 0.8], [0.3, 0.85]], "t": [[0.1, 0.2]] * 2}),
            rank_modalities({"b": 0.7, "a": 0.7}),
            dataclasses.replace(
                rank_modalities({"a": [0.5, 0.6], "v": [0.3, 0.8]}),
                num_samples={"v": {"train": 900, "eval": 210}, "a": {"train": 1000, "eval": 250}},
            ),
        ]


@pytest.mark.parametrize(
    "ranking", _examples(), ids=["early", "final-only", "loss", "runs-disagree", "tie", "missing-samples"]
)
def test_round_trips(ranking: ModalityRanking) -> None:
    assert ModalityRanking.from_dict(ranking.to_dict()) == ranking
    assert ModalityRanking.from_dict(json.loads(json.dumps(ranking.to_dict()))) == ranking
    restored = pickle.loads(pickle.dumps(ranking))
    assert restored == ranking and repr(restored) == repr(ranking)
    assert hash(restored) == hash(ranking)
    assert list(ranking.to_dict()["final_scores"]) == list(ranking.order)  # JSON keeps the ranking order


def test_num_samples_shown_where_modalities_rest_on_different_samples() -> None:
    plain = rank_modalities({"a": [0.5, 0.6], "v": [0.3, 0.8]})
    assert plain.num_samples is None and plain.to_dict()["num_samples"] is None
    same = dataclasses.replace(plain, num_samples={m: {"train": 8, "eval": 4} for m in ("v", "a")})
    assert "num_samples" not in repr(same) and same != plain and hash(same) == hash(plain)
    fewer = dataclasses.replace(same, num_samples={"v": {"train": 8, "eval": 3}, "a": {"train": 8, "eval": 4}})
    assert "num_samples={'v': {'train': 8, 'eval': 3}, 'a': {'train': 8, 'eval': 4}}" in repr(fewer)
    old = {k: v for k, v in fewer.to_dict().items() if k != "num_samples"}  # a dict written by 0.2
    assert ModalityRanking.from_dict(old) == plain


def test_the_import_paths_of_0_2_keep_working() -> None:
    """Stage 1 moved into pdmp_optim.analysis; 0.2's import paths, and so 0.2's pickles of a ranking, still resolve."""
    import pdmp_optim
    import pdmp_optim.analysis as analysis
    import pdmp_optim.ranking as old

    assert old.ModalityRanking is analysis.ModalityRanking is pdmp_optim.ModalityRanking is ModalityRanking
    assert (
        old.rank_modalities is analysis.rank_modalities is rank_modalities and old.PremiseCheck is analysis.PremiseCheck
    )
    assert pdmp_optim.analyze_modalities is analysis.analyze_modalities
    assert all(callable(getattr(analysis, n)) for n in ("accuracy", "mean_absolute_error", "unimodal_histories"))
    r = rank_modalities({"a": [[0.5, 0.6], [0.5, 0.62]], "v": [[0.3, 0.8], [0.3, 0.78]]})
    written_by_0_2 = pickle.dumps(r, protocol=0).replace(b"pdmp_optim.analysis.ranking", b"pdmp_optim.ranking")
    assert b"pdmp_optim.ranking\nModalityRanking" in written_by_0_2 and pickle.loads(written_by_0_2) == r


def test_equality_and_hash() -> None:
    a = rank_modalities({"a": [0.5, 0.6], "v": [0.4, 0.7]})
    b = rank_modalities({"a": [0.5, 0.6], "v": [0.4, 0.7]})
    c = rank_modalities({"a": [0.5, 0.6], "v": [0.4, 0.71]})
    assert a == b and hash(a) == hash(b) and len({a, b, c}) == 2
    assert a != c
    with pytest.raises(AttributeError):
        a.order = ("v",)  # type: ignore[misc]


def test_from_dict_accepts_a_minimal_dict_and_rejects_garbage() -> None:
    r = ModalityRanking.from_dict({"order": ["v", "a"], "final_scores": {"a": 0.6, "v": 0.7}})
    assert r.performance_dominant == "v" and r.num_runs == 1 and r.agreement == 1.0 and r.final_std["a"] == 0.0
    assert r.run_winners == ("v",)  # the defaults are those of one run, as rank_modalities gives them
    assert r == rank_modalities({"v": 0.7, "a": 0.6}) and ModalityRanking.from_dict(r.to_dict()) == r
    assert r.gammas(15) == {"v": 15.0, "a": 1 / 15}
    with pytest.raises(ValueError, match="missing"):
        ModalityRanking.from_dict({"order": ["v", "a"]})
    with pytest.raises(ValueError, match=r"final_scores names \['a', 'v'\], but the modalities are \['v', 'x'\]"):
        ModalityRanking.from_dict({"order": ["v", "x"], "final_scores": {"a": 0.6, "v": 0.7}})


def _valid() -> dict:
    """A three-run ranking with early scores, as to_dict() writes it after a JSON round trip."""
    runs = {"a": [[0.5, 0.7], [0.5, 0.9], [0.5, 0.6]], "v": [[0.3, 0.8], [0.3, 0.85], [0.3, 0.82]]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(json.dumps(rank_modalities(runs).to_dict()))


_COUNTS = {"v": {"train": 10, "eval": 5}, "a": {"train": 10, "eval": 5}}
INCONSISTENT = [
    ("early names", {"early_scores": {"a": 0.5, "x": 0.3}}, ValueError, r"early_scores names \['a', 'x'\]"),
    ("early too few", {"early_scores": {"a": 0.5}}, ValueError, r"early_scores names \['a'\], but the modalities"),
    ("final_std names", {"final_std": {"v": 0.1, "t": 0.1}}, ValueError, r"final_std names"),
    ("early_std names", {"early_std": {"v": 0.0}}, ValueError, r"early_std names"),
    ("early_std alone", {"early_scores": None}, ValueError, r"early_std is given but early_scores is not"),
    ("negative std", {"final_std": {"v": -0.1, "a": 0.1}}, ValueError, r"final_std\['v'\] must be >= 0"),
    ("nan score", {"final_scores": {"v": math.nan, "a": 0.7}}, ValueError, r"final_scores\['v'\] is nan"),
    ("text score", {"final_scores": {"v": "0.8", "a": 0.7}}, TypeError, r"final_scores\['v'\] must be a number"),
    ("scores not a dict", {"early_scores": [0.5, 0.3]}, TypeError, r"early_scores must map modality"),
    ("agreement > 1", {"agreement": 1.5}, ValueError, r"agreement=1.5 does not match run_winners"),
    ("agreement < 0", {"agreement": -0.1}, ValueError, r"agreement=-0.1"),
    ("agreement off", {"agreement": 1.0}, ValueError, r"agreement=1.0 does not match run_winners"),
    ("agreement nan", {"agreement": math.nan}, ValueError, r"agreement is nan"),
    ("unknown winner", {"run_winners": ["v", "x", "a"]}, ValueError, r"run_winners must name one modality of"),
    ("no winners", {"run_winners": []}, ValueError, r"run_winners must name one modality"),
    ("winner not a name", {"run_winners": ["v", 1, "a"]}, TypeError, r"run_winners must be a list of modality"),
    ("order not best-first", {"order": ["a", "v"]}, ValueError, r"order \['a', 'v'\] is not best-first"),
    ("order repeats", {"order": ["v", "v"]}, ValueError, r"at least two distinct modalities"),
    ("order a string", {"order": "va"}, TypeError, r"order must be a list of modality names"),
    ("one modality", {"order": ["v"], "final_scores": {"v": 0.8}}, ValueError, r"at least two distinct"),
    ("direction a string", {"higher_is_better": "false"}, TypeError, r"higher_is_better must be true or false"),
    ("notes a string", {"notes": "unclear"}, TypeError, r"notes must be a list of strings"),
    ("notes not text", {"notes": [1]}, TypeError, r"notes must be a list of strings"),
    ("misspelt key", {"early_score": {"v": 0.3, "a": 0.5}}, ValueError, r"unknown keys \['early_score'\]"),
    ("samples names", {"num_samples": {"v": {"train": 1, "eval": 1}}}, ValueError, r"num_samples names \['v'\]"),
    ("samples not a dict", {"num_samples": [1, 2]}, TypeError, r"num_samples must map modality"),
    (
        "samples negative",
        {"num_samples": _COUNTS | {"a": {"train": -1, "eval": 1}}},
        ValueError,
        r"num_samples\['a'\]\['train'\] must be >= 0, got -1",
    ),
    ("samples keys", {"num_samples": _COUNTS | {"a": {"eval": 1}}}, ValueError, r"num_samples\['a'\] must be"),
    ("samples float", {"num_samples": _COUNTS | {"a": {"train": 1.5, "eval": 1}}}, TypeError, r"num_samples\['a'\]"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), INCONSISTENT, ids=[c[0] for c in INCONSISTENT])
def test_from_dict_refuses_inconsistent_data_naming_the_field(case: str, change: dict, error: type, message: str):
    """0.1 accepted all of these, and several then failed in repr() or gave a wrong performance_dominant. The
    constructor and dataclasses.replace check the same way: the checks live in one place."""
    data = {**_valid(), **change}
    with pytest.raises(error, match=message):
        ModalityRanking.from_dict(data)
    if case != "misspelt key":  # the constructor's own TypeError names an unexpected keyword
        with pytest.raises(error, match=message):
            ModalityRanking(**data)
        with pytest.raises(error, match=message):
            dataclasses.replace(ModalityRanking.from_dict(_valid()), **change)


def test_the_constructor_fills_the_defaults_of_one_run_and_stores_clean_values() -> None:
    r = ModalityRanking(
        ["v", "a"], {"a": np.float32(0.5), "v": torch.tensor([0.75])}, early_scores={"a": 0.5, "v": 0.1}
    )
    assert r == ModalityRanking.from_dict({"order": ["v", "a"], "final_scores": {"a": 0.5, "v": 0.75},
                                           "early_scores": {"a": 0.5, "v": 0.1}})  # fmt: skip
    assert r.order == ("v", "a") and list(r.final_scores) == ["v", "a"] and type(r.final_scores["v"]) is float
    assert r.final_std == {"v": 0.0, "a": 0.0} and r.early_std == {"a": 0.0, "v": 0.0}
    assert r.run_winners == ("v",) and r.agreement == 1.0 and r.num_runs == 1 and r.optimization_dominant == "a"
    with pytest.raises(TypeError, match="order must be a list of modality names"):
        ModalityRanking(("v", None), {"v": 0.7, None: 0.6})  # type: ignore[arg-type]


def test_from_dict_round_trips_through_json_and_keeps_the_early_order() -> None:
    data = _valid()
    r = ModalityRanking.from_dict(data)
    assert r.run_winners == ("v", "a", "v") and r.agreement == pytest.approx(2 / 3) and r.notes
    assert ModalityRanking.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert repr(ModalityRanking.from_dict(r.to_dict())) == repr(r)
    # early scores keep their own order: it is the input order that breaks ties for m_o
    tied = {**data, "early_scores": {"v": 0.5, "a": 0.5}, "early_std": {"v": 0.0, "a": 0.0}}
    assert ModalityRanking.from_dict(tied).optimization_dominant == "v"
    tied["early_scores"] = {"a": 0.5, "v": 0.5}
    assert ModalityRanking.from_dict(tied).optimization_dominant == "a"
    # final_std may be null (0.1 wrote no spread for one run), early_std defaults to zeros
    r = ModalityRanking.from_dict({**data, "final_std": None, "early_std": None})
    assert r.final_std == {"v": 0.0, "a": 0.0} and r.early_std == {"a": 0.0, "v": 0.0}
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        ModalityRanking.from_dict([("order", ["v", "a"])])  # type: ignore[arg-type]


def test_warning_text_is_the_text_rank_modalities_warns_with() -> None:
    with pytest.warns(UserWarning) as record:
        r = rank_modalities({"a": 0.5, "b": 0.5})
    assert str(user_warnings(record)[0].message) == r.warning_text()
    assert r.warning_text().startswith("modality ranking is not clear-cut: final scores tie")
    assert rank_modalities({"a": 0.5, "b": 0.6}).warning_text() == ""


def test_ranking_plugs_into_the_optimizer() -> None:
    audio, visual = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ranking = rank_modalities({"audio": [0.55, 0.62], "visual": [0.35, 0.71]})
    restored = ModalityRanking.from_dict(json.loads(json.dumps(ranking.to_dict())))
    params = [*audio.parameters(), *visual.parameters()]
    opt = PDMPOptimizer(torch.optim.SGD(params, lr=0.1), {"audio": audio, "visual": visual}, ranking=restored)
    assert opt.gammas == {"audio": 1 / 15, "visual": 15.0}


# ------------------------------------------------------------------------------------ the coefficient rule
@pytest.mark.parametrize(
    "gamma_p",
    [torch.tensor([4.0]), torch.tensor(4.0), np.array([4.0]), np.array(4.0), np.float32(4.0), np.int64(4)],
    ids=["tensor1", "tensor0d", "array1", "array0d", "np-float", "np-int"],
)
def test_gamma_p_may_be_a_one_element_tensor_or_array(gamma_p: object) -> None:
    """0.1 failed on a one-element array with NumPy's own message, which did not name gamma_p."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = pdmp_gammas(["a", "v"], "v", gamma_p=gamma_p, optimization_dominant="a")  # type: ignore[arg-type]
        assert g == {"a": 0.25, "v": 4.0} and all(type(v) is float for v in g.values())
        assert rank_modalities({"a": [0.6, 0.7], "v": [0.4, 0.8]}).gammas(gamma_p) == {"v": 4.0, "a": 0.25}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gamma_p", "error", "message"),
    [
        (torch.tensor([2.0, 3.0]), TypeError, r"gamma_p must be a number, got list"),
        (np.array([2.0, 3.0]), TypeError, r"gamma_p must be a number, got list"),
        (np.array([]), TypeError, r"gamma_p must be a number"),
        ("15", TypeError, r"gamma_p must be a number"),
        (torch.tensor([math.nan]), ValueError, r"gamma_p must be a finite number > 0"),
        (np.array([0.5]), ValueError, r"gamma_p must be >= 1"),
    ],
    ids=["tensor2", "array2", "array0", "str", "nan", "below-one"],
)
def test_a_bad_gamma_p_is_named_in_the_message(gamma_p: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        pdmp_gammas(["a", "v"], "v", gamma_p=gamma_p)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        rank_modalities({"a": 0.6, "v": 0.7}).gammas(gamma_p)  # type: ignore[arg-type]


def test_pdmp_gammas_checks_names_and_early_scores() -> None:
    early = {"a": torch.tensor([0.6]), "v": np.float32(0.5)}
    assert pdmp_gammas(["a", "v"], "v", early_scores=early, gamma_p=2) == {"a": 0.5, "v": 2.0}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"early_scores\['a'\] is nan"):
        pdmp_gammas(["a", "v"], "v", early_scores={"a": math.nan, "v": 0.5})
    with pytest.raises(ValueError, match=r"early_scores has no entry for \['a'\]"):
        pdmp_gammas(["a", "v"], "v", early_scores={"v": 0.5})
    with pytest.raises(ValueError, match="name one modality twice"):
        pdmp_gammas(["a", "v", "a"], "v")
    with pytest.raises(TypeError, match="modality names must be non-empty strings"):
        pdmp_gammas(["a", 2], "a")  # type: ignore[list-item]


# ------------------------------------------------------------------------- properties of the coefficient rule
names_st = st.lists(st.sampled_from(list("abcdefgh")), min_size=2, max_size=6, unique=True)
score_st = st.integers(min_value=0, max_value=50).map(lambda i: i / 50)  # coarse: ties happen often
gamma_st = st.floats(min_value=1.0, max_value=100.0, allow_nan=False, allow_infinity=False)


@st.composite
def rule_inputs(draw: st.DrawFn) -> dict:
    names = draw(names_st)
    dominant = draw(st.sampled_from(names))
    m_o = draw(st.one_of(st.none(), st.sampled_from(names)))
    early = draw(st.one_of(st.none(), st.fixed_dictionaries({n: score_st for n in names})))
    return dict(
        names=names,
        dominant=dominant,
        m_o=m_o,
        early=early,
        gamma_p=draw(gamma_st),
        higher=draw(st.booleans()),
    )


def _beats(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


@settings(max_examples=200)
@given(rule_inputs())
def test_pdmp_gammas_rule(case: dict) -> None:
    g = pdmp_gammas(
        case["names"],
        case["dominant"],
        gamma_p=case["gamma_p"],
        optimization_dominant=case["m_o"],
        early_scores=case["early"],
        higher_is_better=case["higher"],
    )
    gp, dominant, early = case["gamma_p"], case["dominant"], case["early"]
    assert list(g) == case["names"]
    assert g[dominant] == gp
    know_early = case["m_o"] is not None or early is not None
    for name in case["names"]:
        if name == dominant:
            continue
        damped = (
            not know_early
            or name == case["m_o"]
            or (early is not None and _beats(early[name], early[dominant], case["higher"]))
        )
        assert g[name] == (1.0 / gp if damped else gp)


@settings(max_examples=200)
@given(rule_inputs(), st.randoms(use_true_random=False))
def test_pdmp_gammas_is_permutation_invariant(case: dict, rnd) -> None:
    shuffled = list(case["names"])
    rnd.shuffle(shuffled)
    kwargs = dict(
        gamma_p=case["gamma_p"],
        optimization_dominant=case["m_o"],
        early_scores=None if case["early"] is None else {n: case["early"][n] for n in reversed(case["names"])},
        higher_is_better=case["higher"],
    )
    assert pdmp_gammas(case["names"], case["dominant"], **kwargs) == pdmp_gammas(shuffled, case["dominant"], **kwargs)


@settings(max_examples=200)
@given(st.sampled_from(["audio", "visual"]), st.sampled_from(["audio", "visual"]), gamma_st)
def test_two_modalities_reproduce_eq_10_to_12(m_p: str, m_o: str, gamma_p: float) -> None:
    """Eq. 10-12: gamma_{m_p} = gamma_p; the other gets 1/gamma_p if it is m_o, else gamma_p (m_o == m_p)."""
    other = "visual" if m_p == "audio" else "audio"
    g = pdmp_gammas(["audio", "visual"], m_p, gamma_p=gamma_p, optimization_dominant=m_o)
    assert g[m_p] == gamma_p
    assert g[other] == (1.0 / gamma_p if m_o == other else gamma_p)
    if m_o != m_p:
        assert g[m_p] * g[other] == pytest.approx(1.0)


fine_score_st = st.integers(min_value=0, max_value=10**6).map(lambda i: i / 10**6)


@st.composite
def histories(draw: st.DrawFn, scores: st.SearchStrategy[float] = score_st) -> dict:
    names = draw(names_st)
    runs = draw(st.integers(1, 4))
    epochs = draw(st.integers(2, 4))
    return {n: [[draw(scores) for _ in range(epochs)] for _ in range(runs)] for n in names}


@settings(max_examples=200)
@given(histories(), gamma_st, st.booleans())
def test_ranking_gammas_follow_the_rule(scores: dict, gamma_p: float, higher: bool) -> None:
    r = rank_modalities(scores, higher_is_better=higher, warn=False)
    sign = 1.0 if higher else -1.0
    finals = {n: statistics.fmean(h[-1] for h in runs) for n, runs in scores.items()}
    earlies = {n: statistics.fmean(h[0] for h in runs) for n, runs in scores.items()}
    # m_p has the best mean final score (first listed on ties); m_o the best mean early score
    assert sign * finals[r.performance_dominant] == pytest.approx(max(sign * v for v in finals.values()))
    assert sign * earlies[r.optimization_dominant] == pytest.approx(max(sign * v for v in earlies.values()))
    assert list(r.order) == sorted(scores, key=lambda n: (-sign * r.final_scores[n], list(scores).index(n)))
    n_runs = len(next(iter(scores.values())))
    assert r.num_runs == n_runs and len(r.run_winners) == n_runs
    assert r.agreement == sum(w == r.performance_dominant for w in r.run_winners) / n_runs
    g = r.gammas(gamma_p)
    assert g[r.performance_dominant] == gamma_p
    assert r.early_scores is not None
    m_p = r.performance_dominant
    for name in scores:
        if name == m_p:
            continue
        damped = name == r.optimization_dominant or _beats(r.early_scores[name], r.early_scores[m_p], higher)
        assert g[name] == (1.0 / gamma_p if damped else gamma_p)


@settings(max_examples=200)
@given(histories(fine_score_st), gamma_st, st.booleans(), st.randoms(use_true_random=False))
def test_ranking_is_permutation_invariant_without_ties(scores: dict, gamma_p: float, higher: bool, rnd) -> None:
    r = rank_modalities(scores, higher_is_better=higher, warn=False)
    assume(len(set(r.final_scores.values())) == len(scores))
    assert r.early_scores is not None
    assume(len(set(r.early_scores.values())) == len(scores))
    for i in range(r.num_runs):  # and no ties within a run either (those go to the first listed)
        assume(len({runs[i][-1] for runs in scores.values()}) == len(scores))
        assume(len({runs[i][0] for runs in scores.values()}) == len(scores))
    names = list(scores)
    rnd.shuffle(names)
    s = rank_modalities({n: scores[n] for n in names}, higher_is_better=higher, warn=False)
    assert s.order == r.order
    assert s.gammas(gamma_p) == r.gammas(gamma_p)
    assert (s.performance_dominant, s.optimization_dominant) == (r.performance_dominant, r.optimization_dominant)
    assert s.agreement == r.agreement and s.run_winners == r.run_winners
