"""ModalityRanking.check_premise: does the joint model end below its best unimodal model, and how surely?

Its decisions on known cases: the premise clearly holds, clearly fails, is too close to call; how the spread of
the runs enters (Welch standard error, a single run borrowing the other side's spread, no spread at all); losses;
the note when the rule has nothing to damp (m_p is also m_o); and bad input.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from pdmp_optim import ModalityRanking, rank_modalities
from pdmp_optim.ranking import PremiseCheck

# three seeds of full-budget unimodal validation accuracy per epoch: audio fast and capped, visual slow and best
UNIMODAL = {
    "audio": [[0.40, 0.60], [0.41, 0.61], [0.42, 0.60]],
    "visual": [[0.20, 0.80], [0.22, 0.82], [0.21, 0.81]],
}


@pytest.fixture
def ranking() -> ModalityRanking:
    return rank_modalities(UNIMODAL)


def test_clearly_holds(ranking: ModalityRanking) -> None:
    check = ranking.check_premise([0.74, 0.76, 0.75])
    assert isinstance(check, PremiseCheck)
    assert (check.verdict, check.holds) == ("holds", True)
    assert check.best_unimodal == "visual"
    assert check.shortfall == pytest.approx(0.81 - 0.75)
    assert (check.unimodal_runs, check.joint_runs) == (3, 3)
    assert check.notes == ()
    assert str(check).startswith("premise holds: the joint model (0.75, 3 runs) trails the best unimodal model")
    assert "PDMP is worth trying" in str(check)


def test_clearly_fails(ranking: ModalityRanking) -> None:
    check = ranking.check_premise([0.86, 0.85, 0.87])
    assert (check.verdict, check.holds) == ("fails", False)
    assert check.shortfall == pytest.approx(-0.05)
    assert "leads the best unimodal model 'visual'" in str(check) and "not expected to help" in str(check)


def test_too_close_to_call(ranking: ModalityRanking) -> None:
    check = ranking.check_premise([0.80, 0.82, 0.79])
    assert (check.verdict, check.holds) == ("too close to call", None)
    assert abs(check.shortfall) < 2 * check.std_error
    assert "tuned learning rate" in str(check)


def test_the_standard_error_is_welchs_and_z_sets_the_threshold(ranking: ModalityRanking) -> None:
    joint = [0.77, 0.79, 0.76, 0.78]
    check = ranking.check_premise(joint)
    s_u, s_j = statistics.stdev([0.80, 0.82, 0.81]), statistics.stdev(joint)
    assert check.std_error == pytest.approx(math.sqrt(s_u**2 / 3 + s_j**2 / 4))
    ratio = check.shortfall / check.std_error  # about 4.04 standard errors
    assert 4 < ratio < 4.1
    assert ranking.check_premise(joint, z=4).verdict == "holds"
    assert ranking.check_premise(joint, z=4.1).verdict == "too close to call"
    assert ranking.check_premise(joint, z=0).verdict == "holds"  # z=0: the sign alone decides
    assert ranking.check_premise(joint, z=0).z == 0.0


def test_a_single_run_borrows_the_other_sides_spread(ranking: ModalityRanking) -> None:
    s_u = ranking.final_std["visual"]
    one_joint = ranking.check_premise(0.75)
    assert one_joint.joint_runs == 1 and one_joint.std_error == pytest.approx(math.sqrt(s_u**2 / 3 + s_u**2))
    single = rank_modalities({"audio": [0.4, 0.6], "visual": [0.2, 0.8]})  # one unimodal run per modality
    joint = [0.70, 0.72, 0.71]
    s_j = statistics.stdev(joint)
    check = single.check_premise(joint)
    assert check.unimodal_runs == 1 and check.std_error == pytest.approx(math.sqrt(s_j**2 + s_j**2 / 3))
    assert check.verdict == "holds"


def test_one_run_on_each_side_is_never_called(ranking: ModalityRanking) -> None:
    single = rank_modalities({"audio": [0.4, 0.6], "visual": [0.2, 0.8]})
    for joint in (0.5, 0.95):  # even a gap of 30 points: one run each says nothing about the spread
        check = single.check_premise(joint)
        assert (check.verdict, check.holds, check.std_error) == ("too close to call", None, None)
        assert any("one run on each side" in n for n in check.notes)


def test_losses_flip_the_sign() -> None:
    losses = rank_modalities(
        {"audio": [[1.2, 0.9], [1.2, 0.92], [1.1, 0.91]], "visual": [[2.0, 0.50], [2.1, 0.52], [2.0, 0.51]]},
        higher_is_better=False,
    )
    assert losses.performance_dominant == "visual"
    worse = losses.check_premise([0.60, 0.62, 0.61])  # the joint model's loss is higher: it trails
    assert worse.verdict == "holds" and worse.shortfall == pytest.approx(0.10)
    better = losses.check_premise([0.40, 0.41, 0.42])
    assert better.verdict == "fails" and better.shortfall == pytest.approx(-0.10)


def test_a_note_when_the_rule_has_nothing_to_damp() -> None:
    # ave_like in the benchmark: the best modality is also the fastest, and the rule gives every encoder gamma_p
    same = rank_modalities({"audio": [[0.6, 0.85], [0.62, 0.84]], "visual": [[0.2, 0.5], [0.22, 0.52]]})
    assert same.performance_dominant == same.optimization_dominant == "audio"
    for joint in ([0.80, 0.81], [0.845, 0.846], [0.90, 0.91]):  # holds, too close to call, fails: always noted
        check = same.check_premise(joint)
        assert any("'audio' is also optimization-dominant" in n and "dominant='audio'" in n for n in check.notes)
    assert [same.check_premise(j).verdict for j in ([0.80, 0.81], [0.845, 0.846], [0.90, 0.91])] == [
        "holds",
        "too close to call",
        "fails",
    ]
    # a different m_o, or none known (final scores only: every other modality is damped): no such note
    assert rank_modalities(UNIMODAL).check_premise([0.7, 0.71]).notes == ()
    finals = rank_modalities({"audio": 0.85, "visual": 0.5})
    assert finals.optimization_dominant is None
    assert not any("optimization-dominant" in n for n in finals.check_premise([0.80, 0.79, 0.81]).notes)


def test_a_doubtful_ranking_is_noted() -> None:
    tied = rank_modalities({"a": [[0.5, 0.70], [0.5, 0.72]], "b": [[0.4, 0.72], [0.4, 0.70]]}, warn=False)
    assert not tied.confident
    check = tied.check_premise([0.60, 0.61])
    assert check.verdict == "holds"
    assert any(n.startswith("the ranking itself is not clear-cut") for n in check.notes)


def test_numbers_arrays_and_tensors(ranking: ModalityRanking) -> None:
    expected = ranking.check_premise([0.74, 0.76, 0.75])
    for joint in (
        np.array([0.74, 0.76, 0.75]),
        torch.tensor([0.74, 0.76, 0.75], dtype=torch.float64),
        (0.74, 0.76, 0.75),
    ):
        assert ranking.check_premise(joint) == expected
    assert ranking.check_premise(torch.tensor(0.75)).joint_runs == 1
    assert ranking.check_premise(np.float32(0.75)).joint_runs == 1


def test_survives_a_round_trip_through_to_dict(ranking: ModalityRanking) -> None:
    restored = ModalityRanking.from_dict(ranking.to_dict())
    assert restored.check_premise([0.74, 0.76, 0.75]) == ranking.check_premise([0.74, 0.76, 0.75])


@pytest.mark.parametrize(
    ("joint", "z", "error", "match"),
    [
        ([], 2.0, ValueError, "at least one score"),
        ([0.7, float("nan")], 2.0, ValueError, "joint score \\(run 1\\)"),
        ([0.7, float("inf")], 2.0, ValueError, "joint score"),
        (["0.7"], 2.0, TypeError, "must be a number"),
        ([0.7], -1.0, ValueError, "z must be >= 0"),
        ([0.7], float("nan"), ValueError, "z is nan"),
    ],
)
def test_bad_input_names_the_fix(ranking: ModalityRanking, joint, z: float, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ranking.check_premise(joint, z=z)
