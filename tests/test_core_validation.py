"""Bad input (unknown dominant, a parameter in two groups or not owned by the optimizer, empty groups, a gamma
<= 0, NaN or inf, a non-optimizer) fails at construction with a message that names the fix."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import TwoModal

from pdmp_optim import PDMPOptimizer, pdmp_gammas, rank_modalities


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dominant": "text"}, ValueError, r"dominant='text' is not one of the modalities \['audio', 'visual'\]"),
        ({"dominant": "audio", "optimization_dominant": "txt"}, ValueError, "optimization_dominant='txt' is not one"),
        ({"optimization_dominant": "audio"}, ValueError, "optimization_dominant= needs dominant="),
        ({}, ValueError, r"no coefficient for \['audio', 'visual'\]; pass dominant="),
        ({"dominant": "audio", "gamma_p": 0.0}, ValueError, "gamma_p must be a finite number > 0"),
        ({"dominant": "audio", "gamma_p": -3}, ValueError, "gamma_p must be a finite number > 0"),
        ({"dominant": "audio", "gamma_p": math.nan}, ValueError, "gamma_p must be a finite number > 0"),
        ({"dominant": "audio", "gamma_p": math.inf}, ValueError, "gamma_p must be a finite number > 0"),
        ({"dominant": "audio", "gamma_p": 0.5}, ValueError, "gamma_p must be >= 1 .* pass explicit gammas"),
        ({"dominant": "audio", "gamma_p": "15"}, TypeError, "gamma_p must be a number"),
        ({"gammas": {"audio": 2.0, "visual": 0.0}}, ValueError, r"gammas\['visual'\] must be a finite number > 0"),
        ({"gammas": {"audio": 2.0, "visual": math.nan}}, ValueError, r"gammas\['visual'\] must be a finite"),
        ({"gammas": {"audio": 2.0, "visual": True}}, TypeError, r"gammas\['visual'\] must be a number"),
        (
            {"gammas": {"audio": 2.0, "video": 1.0}},
            ValueError,
            r"gammas names \['video'\], which are not among the modalities",
        ),
        ({"gammas": {"audio": 2.0}}, ValueError, r"no coefficient for \['visual'\]"),
        ({"dominant": "audio", "mode": "adam"}, ValueError, r"mode must be one of \('auto', 'grad', 'lr', 'update'\)"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    model = TwoModal()
    with pytest.raises(error, match=match):
        PDMPOptimizer(sgd(model), model.groups(), **kwargs)


def test_not_an_optimizer():
    model = TwoModal()
    with pytest.raises(TypeError, match=r"must be a torch.optim.Optimizer instance, got list; build it first"):
        PDMPOptimizer(list(model.parameters()), model.groups(), dominant="audio")
    with pytest.raises(TypeError, match=r"must be a torch.optim.Optimizer instance, got type"):
        PDMPOptimizer(torch.optim.SGD, model.groups(), dominant="audio")
    opt = PDMPOptimizer(sgd(model), model.groups(), dominant="audio")
    with pytest.raises(TypeError, match="already a PDMPOptimizer"):
        PDMPOptimizer(opt, model.groups(), dominant="audio")


def test_parameter_in_two_groups():
    model = TwoModal()
    with pytest.raises(ValueError, match=r"in both groups\['audio'\] and groups\['all'\]; give every parameter"):
        PDMPOptimizer(sgd(model), {"audio": model.audio, "all": model}, dominant="audio")


def test_parameter_the_optimizer_does_not_own():
    model = TwoModal()
    opt = torch.optim.SGD(model.visual.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"groups\['audio'\] holds a parameter of shape \(8, 6\) that the optimizer"):
        PDMPOptimizer(opt, model.groups(), dominant="audio")


def test_empty_groups():
    model = TwoModal()
    with pytest.raises(ValueError, match="groups is empty"):
        PDMPOptimizer(sgd(model), {}, dominant="audio")
    with pytest.raises(ValueError, match=r"groups\['audio'\] has no parameter that the optimizer trains"):
        PDMPOptimizer(sgd(model), {"audio": [], "visual": model.visual}, dominant="visual")
    with pytest.raises(ValueError, match="no modality groups"):
        PDMPOptimizer(sgd(model), None, dominant="visual")


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ({"audio": 3}, TypeError, r"groups\['audio'\] must be an nn.Module or an iterable of parameters, got int"),
        ({"audio": ["w"]}, TypeError, r"groups\['audio'\] holds a str, not a parameter tensor"),
        ({"": []}, TypeError, "modality names must be non-empty strings"),
        ([("audio", [])], TypeError, "groups must map a modality name"),
    ],
)
def test_malformed_groups(groups, error, match):
    model = TwoModal()
    with pytest.raises(error, match=match):
        PDMPOptimizer(sgd(model), groups, dominant="audio")


def test_ranking_must_fit_the_groups():
    model = TwoModal()
    three = rank_modalities({"audio": [0.5, 0.6], "visual": [0.4, 0.7], "text": [0.3, 0.5]})
    with pytest.raises(ValueError, match=r"ranking covers modalities .* but groups has"):
        PDMPOptimizer(sgd(model), model.groups(), ranking=three)
    two = rank_modalities({"audio": [0.5, 0.6], "visual": [0.4, 0.7]})
    with pytest.raises(ValueError, match=r"dominant='audio' contradicts ranking.performance_dominant='visual'"):
        PDMPOptimizer(sgd(model), model.groups(), dominant="audio", ranking=two)
    with pytest.raises(TypeError, match="ranking must be a ModalityRanking"):
        PDMPOptimizer(sgd(model), model.groups(), ranking={"visual": 1.0})


def test_lr_mode_needs_learning_rates():
    class NoLR(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"momentum": 0.0})

        def step(self, closure=None):
            return None

    model = TwoModal()
    with pytest.raises(ValueError, match="mode='lr' scales each group's 'lr', but NoLR has none; use mode='update'"):
        PDMPOptimizer(NoLR(model.parameters()), model.groups(), dominant="audio", mode="lr")


def test_split_after_a_scheduler_is_attached_is_refused():
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters())
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(ValueError, match="create the scheduler after PDMPOptimizer"):
        PDMPOptimizer(opt, model.groups(), dominant="audio")
    assert len(opt.param_groups) == 1  # nothing was changed


def test_lbfgs_cannot_be_split_for_lr_mode():
    model = TwoModal()
    with pytest.raises(ValueError, match="LBFGS supports a single param group"), pytest.warns(UserWarning):
        PDMPOptimizer(torch.optim.LBFGS(model.parameters()), model.groups(), dominant="audio", mode="lr")


def test_conflicting_tags_and_groups():
    model = TwoModal()
    opt = torch.optim.SGD(
        [
            {"params": model.audio.parameters(), "modality": "visual"},
            {"params": [*model.visual.parameters(), *model.head.parameters()]},
        ],
        lr=0.1,
    )
    with pytest.raises(ValueError, match="tagged modality='visual' but groups= assigns its parameters differently"):
        PDMPOptimizer(opt, model.groups(), dominant="audio")


def test_pdmp_gammas_checks_early_scores():
    with pytest.raises(ValueError, match=r"early_scores has no entry for \['b'\]"):
        pdmp_gammas(["a", "b"], "a", early_scores={"a": 1.0})
