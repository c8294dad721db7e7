"""Bad input fails at construction, before anything changes, with a message that names the problem and the fix:
unknown ``dominant``, a parameter in two groups, a trainable group parameter the optimizer does not own, empty
groups, a gamma <= 0, NaN or inf, a non-optimizer, wrapping twice, unknown or contradicting tags, a ranking that
does not fit, a group to split under an attached scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import GAMMAS, TwoModal

from pdmp_optim import PDMPOptimizer, pdmp_gammas, rank_modalities


def sgd(model):
    return torch.optim.SGD(model.trained(), lr=0.1)


RANKING = {"audio": [0.5, 0.6], "visual": [0.4, 0.7]}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dominant": "text"}, ValueError, r"dominant='text' is not one of the modalities \['audio', 'visual'\]; pass"),
        ({"dominant": "audio", "optimization_dominant": "txt"}, ValueError, "optimization_dominant='txt' is not one"),
        ({"optimization_dominant": "audio"}, ValueError, "optimization_dominant= needs dominant="),
        ({}, ValueError, r"no coefficient for \['audio', 'visual'\]; pass dominant= \(or ranking=\), or gammas"),
        ({"dominant": "audio", "gamma_p": 0.0}, ValueError, "gamma_p must be a finite number > 0, got 0.0"),
        ({"dominant": "audio", "gamma_p": -3}, ValueError, "gamma_p must be a finite number > 0"),
        ({"dominant": "audio", "gamma_p": math.nan}, ValueError, "gamma_p must be a finite number > 0, got nan"),
        ({"dominant": "audio", "gamma_p": math.inf}, ValueError, "gamma_p must be a finite number > 0, got inf"),
        ({"dominant": "audio", "gamma_p": 0.5}, ValueError, r"gamma_p must be >= 1 .* pass explicit gammas"),
        ({"dominant": "audio", "gamma_p": "15"}, TypeError, "gamma_p must be a number, got str"),
        ({"gammas": {"audio": 2.0, "visual": 0.0}}, ValueError, r"gammas\['visual'\] must be a finite number > 0"),
        ({"gammas": {"audio": 2.0, "visual": -1.0}}, ValueError, r"gammas\['visual'\] must be a finite number > 0"),
        ({"gammas": {"audio": 2.0, "visual": math.nan}}, ValueError, r"gammas\['visual'\] must be a finite"),
        ({"gammas": {"audio": 2.0, "visual": math.inf}}, ValueError, r"gammas\['visual'\] must be a finite"),
        ({"gammas": {"audio": 2.0, "visual": True}}, TypeError, r"gammas\['visual'\] must be a number, got bool"),
        ({"gammas": {"audio": 2.0, "video": 1.0}}, ValueError, r"gammas names \['video'\], .* fix the names"),
        ({"gammas": {"audio": 2.0}}, ValueError, r"no coefficient for \['visual'\]"),
        ({"gammas": [2.0, 0.5]}, TypeError, "gammas must map modality -> coefficient, got list"),
        ({"dominant": "audio", "mode": "adam"}, ValueError, r"mode must be one of \('auto', 'grad', 'lr', 'update'\)"),
        (
            {"ranking": rank_modalities({**RANKING, "text": [0.3, 0.5]})},
            ValueError,
            r"ranking covers modalities \['audio', 'text', 'visual'\] but groups has .*; rank exactly the modalities",
        ),
        (
            {"dominant": "audio", "ranking": rank_modalities(RANKING)},
            ValueError,
            r"dominant='audio' contradicts ranking.performance_dominant='visual'; pass one of them",
        ),
        (
            {"ranking": rank_modalities(RANKING), "optimization_dominant": "audio"},
            ValueError,
            "pass either ranking= or optimization_dominant=, not both",
        ),
        ({"ranking": {"visual": 1.0}}, TypeError, "ranking must be a ModalityRanking from rank_modalities, got dict"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    model = TwoModal()
    inner = sgd(model)
    groups = [dict(g) for g in inner.param_groups]
    with pytest.raises(error, match=match):
        PDMPOptimizer(inner, model.groups(), **kwargs)
    assert inner.param_groups == groups  # nothing was changed


def test_not_an_optimizer_or_one_already_wrapped():
    model = TwoModal()
    for bad, name in ((list(model.parameters()), "list"), (torch.optim.SGD, "type"), ({"lr": 0.1}, "dict")):
        with pytest.raises(TypeError, match=rf"must be a torch.optim.Optimizer instance, got {name}; build it first"):
            PDMPOptimizer(bad, model.groups(), dominant="audio")
    opt = PDMPOptimizer(sgd(model), model.groups(), dominant="audio")
    with pytest.raises(TypeError, match="already a PDMPOptimizer; wrap the inner optimizer only once"):
        PDMPOptimizer(opt, model.groups(), dominant="audio")


def test_a_parameter_in_two_groups():
    model = TwoModal()
    with pytest.raises(ValueError, match=r"in both groups\['audio'\] and groups\['all'\]; give every parameter"):
        PDMPOptimizer(sgd(model), {"audio": model.audio, "all": model}, dominant="audio")
    shared = model.head.weight
    with pytest.raises(ValueError, match=r"shape \(3, 16\) is in both groups\['audio'\] and groups\['visual'\]"):
        PDMPOptimizer(sgd(model), {"audio": [shared], "visual": [shared]}, dominant="audio")


def test_a_trainable_group_parameter_the_optimizer_does_not_own():
    model = TwoModal()
    with pytest.raises(
        ValueError,
        match=r"groups\['audio'\] holds a trainable parameter of shape \(8, 6\) that the "
        r"optimizer does not own; build the optimizer over all trainable parameters",
    ):
        PDMPOptimizer(torch.optim.SGD(model.visual.parameters(), lr=0.1), model.groups(), dominant="audio")
    model.audio.requires_grad_(False)  # frozen and not owned: fine, it may be unfrozen and added later
    opt = PDMPOptimizer(torch.optim.SGD(model.visual.parameters(), lr=0.1), model.groups(), dominant="visual")
    assert opt.params_by_modality()["audio"] == []


def test_an_optimizer_that_trains_none_of_the_group_parameters():
    model = TwoModal()
    model.audio.requires_grad_(False)
    model.visual.requires_grad_(False)
    with pytest.raises(ValueError, match="the optimizer trains none of the parameters in groups; build it over all"):
        PDMPOptimizer(torch.optim.SGD(model.head.parameters(), lr=0.1), model.groups(), dominant="audio")


def test_empty_groups():
    model = TwoModal()
    with pytest.raises(ValueError, match=r"groups is empty; name at least one modality"):
        PDMPOptimizer(sgd(model), {}, dominant="audio")
    with pytest.raises(ValueError, match=r"groups\['audio'\] has no parameters; pass the modality's encoder or drop"):
        PDMPOptimizer(sgd(model), {"audio": [], "visual": model.visual}, dominant="visual")
    with pytest.raises(ValueError, match=r"groups\['audio'\] has no parameters"):
        PDMPOptimizer(sgd(model), {"audio": torch.nn.ReLU(), "visual": model.visual}, dominant="visual")
    with pytest.raises(ValueError, match=r"no modality groups: pass groups=.* or tag the optimizer's param groups"):
        PDMPOptimizer(sgd(model), None, dominant="visual")


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ({"audio": 3}, TypeError, r"groups\['audio'\] must be an nn.Module or an iterable of parameters, got int"),
        ({"audio": "encoder"}, TypeError, r"groups\['audio'\] must be an nn.Module or an iterable of parameters"),
        ({"audio": ["w"]}, TypeError, r"groups\['audio'\] holds a str, not a parameter tensor"),
        ({"": []}, TypeError, "modality names must be non-empty strings, got ''"),
        ({1: []}, TypeError, "modality names must be non-empty strings, got 1"),
        ([("audio", [])], TypeError, "groups must map each modality to an nn.Module or an iterable"),
    ],
)
def test_malformed_groups(groups, error, match):
    model = TwoModal()
    with pytest.raises(error, match=match):
        PDMPOptimizer(sgd(model), groups, dominant="audio")


def tagged(model, audio_tag, **settings):
    return torch.optim.SGD(
        [
            {"params": model.audio.parameters(), "modality": audio_tag},
            {"params": model.visual.parameters()},
            {"params": model.head.parameters()},
        ],
        lr=0.1,
        **settings,
    )


def test_unknown_and_contradicting_tags_change_nothing():
    model = TwoModal()
    for tag, match in (
        ("text", r"param group modality 'text' is unknown; use one of \['audio', 'visual'\] or None"),
        ("visual", r"tagged modality='visual', but groups= gives its parameter of shape \(8, 6\) to 'audio'; drop"),
    ):
        inner = tagged(model, tag)
        groups = [dict(g) for g in inner.param_groups]
        with pytest.raises(ValueError, match=match):
            PDMPOptimizer(inner, model.groups(), dominant="audio")
        assert inner.param_groups == groups


def test_a_group_to_split_while_a_scheduler_is_attached():
    model = TwoModal()
    inner = torch.optim.Adam(model.trained())
    torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    with pytest.raises(ValueError, match=r"mixes modalities, so PDMP must split it .* scheduler is attached .* after"):
        PDMPOptimizer(inner, model.groups(), dominant="audio")
    assert len(inner.param_groups) == 1 and "pdmp_gamma" not in inner.param_groups[0]  # nothing was changed
    one_per_modality = tagged(TwoModal(), "audio")  # nothing to split: a scheduler attached before is fine
    torch.optim.lr_scheduler.StepLR(one_per_modality, step_size=1)
    PDMPOptimizer(one_per_modality, dominant="audio")


def test_reassigned_gammas_are_checked_and_a_bad_mapping_changes_nothing():
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model), model.groups(), gammas=GAMMAS)
    for bad, error, match in (
        ({"audio": 1.0, "visual": 0.0}, ValueError, r"gammas\['visual'\] must be a finite number > 0"),
        ({"audio": 1.0, "visual": math.nan}, ValueError, r"gammas\['visual'\] must be a finite number > 0"),
        ({"audio": 1.0}, ValueError, r"gammas has no coefficient for \['visual'\]; give one for every modality"),
        ({"audio": 1.0, "visual": 1.0, "text": 1.0}, ValueError, r"gammas names \['text'\], which are not among"),
        (2.0, TypeError, "gammas must map modality -> coefficient, got float"),
    ):
        with pytest.raises(error, match=match):
            opt.gammas = bad
        assert opt.gammas == GAMMAS and [g["pdmp_gamma"] for g in opt.param_groups] == [1 / 15, 15.0, 1.0]


def test_pdmp_gammas_checks_its_arguments():
    with pytest.raises(ValueError, match=r"early_scores has no entry for \['b'\]; give one score per modality"):
        pdmp_gammas(["a", "b"], "a", early_scores={"a": 1.0})
    with pytest.raises(ValueError, match=r"early_scores\['b'\] is nan"):
        pdmp_gammas(["a", "b"], "a", early_scores={"a": 1.0, "b": math.nan})
    with pytest.raises(ValueError, match=r"modalities \['a', 'a'\] name one modality twice; list each once"):
        pdmp_gammas(["a", "a"], "a")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dominant": "visual", "optimization_dominant": "visual"},  # Eq. 12 with m_p = m_o: gamma_p for every modality
        {"gammas": {"audio": 4.0, "visual": 4.0}},
        {"ranking": rank_modalities({"audio": [0.3, 0.5], "visual": [0.4, 0.7]})},  # visual best early and late
    ],
)
def test_the_same_coefficient_for_every_modality_warns_once_at_construction(kwargs):
    """Issue 18: nothing is prioritised then; the warning says what it amounts to and what to compare against."""
    model = TwoModal()
    message = r"every modality gets gamma=(15|4) .* a common learning-rate multiplier for the encoders; compare against"
    with pytest.warns(UserWarning, match=message + " vanilla training with a tuned learning rate") as record:
        opt = PDMPOptimizer(sgd(model), model.groups(), **kwargs)
    assert len(record) == 1 and record[0].filename == __file__  # points at the user's line
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 6), torch.randn(4, 10)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()  # no warning afterwards (the suite turns pdmp_optim's warnings into errors)


def test_different_or_pass_through_coefficients_do_not_warn(recwarn):
    for gammas in (GAMMAS, {"audio": 1.0, "visual": 1.0}):
        model = TwoModal()
        PDMPOptimizer(sgd(model), model.groups(), gammas=gammas)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_item_assignment_into_gammas_names_the_fix():
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model), model.groups(), gammas=GAMMAS)
    with pytest.raises(TypeError, match=r"opt.gammas is read-only; assign a whole mapping: opt.gammas = \{\*\*opt"):
        opt.gammas["visual"] = 1.0
    assert opt.gammas == GAMMAS
