"""PDMPOptimizer is a torch.optim.Optimizer whose param_groups and state are the inner optimizer's own objects:
LR schedulers (without warnings), zero_grad, add_param_group, step and state-dict hooks, repr and copies behave."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from _helpers import TwoModal, assert_same_params, loss_of

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step


def make(mode="grad", optimizer=None, **kwargs):
    model = TwoModal()
    inner = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, PDMPOptimizer(inner, model.groups(), dominant="visual", mode=mode, **kwargs)


def test_is_an_optimizer_sharing_the_inner_objects():
    model, opt = make()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    loss_of(model, 0).backward()
    opt.step()
    assert opt.state is opt.optimizer.state and len(opt.state) == len(list(model.parameters()))


def test_lr_mode_splits_a_mixed_group_per_modality_keeping_settings_and_names():
    model = TwoModal()
    inner = torch.optim.Adam(model.named_parameters(), lr=0.1, betas=(0.8, 0.9))
    opt = PDMPOptimizer(inner, model.groups(), dominant="visual", mode="lr")
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2, 2]
    assert all(g["lr"] == 0.1 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    by_name = dict(model.named_parameters())
    for group, module in zip(opt.param_groups, (model.audio, model.visual, model.head), strict=True):
        assert [by_name[n] for n in group["param_names"]] == group["params"] == list(module.parameters())


def test_grad_mode_leaves_the_param_groups_alone():
    model = TwoModal()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [dict(g) for g in inner.param_groups]
    opt = PDMPOptimizer(inner, model.groups(), dominant="visual")
    assert opt.param_groups == before


def test_groups_from_modality_tags_on_the_inner_param_groups():
    model = TwoModal()
    inner = torch.optim.SGD(
        [
            {"params": model.audio.parameters(), "modality": "audio"},
            {"params": model.visual.parameters(), "modality": "visual"},
            {"params": model.head.parameters()},
        ],
        lr=0.1,
    )
    opt = PDMPOptimizer(inner, dominant="visual", optimization_dominant="audio")
    assert opt.gammas == {"audio": 1 / 15, "visual": 15.0}
    assert opt.params_by_modality() == {
        "audio": list(model.audio.parameters()),
        "visual": list(model.visual.parameters()),
        None: list(model.head.parameters()),
    }


@pytest.mark.parametrize("mode", ["grad", "lr"])
@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=12),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1 / (1 + epoch)),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    ],
    ids=["StepLR", "OneCycleLR", "LambdaLR", "ReduceLROnPlateau"],
)
def test_lr_schedulers_work_without_warnings_and_match_the_plain_optimizer(make_scheduler, mode):
    model, opt = make(mode)
    plain_model = TwoModal()
    modules = (plain_model.audio, plain_model.visual, plain_model.head) if mode == "lr" else (plain_model,)
    plain = torch.optim.SGD([{"params": list(m.parameters())} for m in modules], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched, plain_sched = make_scheduler(opt), make_scheduler(plain)
        for step in range(10):
            loss = loss_of(model, step)
            loss.backward()
            opt.step()
            opt.zero_grad()
            plain_loss = loss_of(plain_model, step)
            plain_loss.backward()
            plain.step()
            plain.zero_grad()
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(1.0)  # a flat metric: the plateau scheduler keeps cutting the lr
                plain_sched.step(1.0)
            else:
                sched.step()
                plain_sched.step()
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert opt.param_groups[0]["lr"] != 0.1  # the schedule really moved


def test_zero_grad_both_ways():
    model, opt = make()
    loss_of(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_with_a_modality_is_scaled_and_without_is_not():
    _, opt = make()
    extra_audio, extra_shared = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra_audio], "modality": "audio"})
    opt.add_param_group({"params": [extra_shared]})
    extra_audio.grad, extra_shared.grad = torch.ones(3), torch.ones(3)
    opt.scale_grads_()
    assert torch.equal(extra_audio.grad, torch.full((3,), 1 / 15))
    assert torch.equal(extra_shared.grad, torch.ones(3))
    with pytest.raises(ValueError, match="modality 'text' is unknown"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "modality": "text"})


@pytest.mark.parametrize("mode", ["grad", "lr"])
def test_step_hooks_run_once_per_step_and_see_the_wrapper(mode):
    model, opt = make(mode)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    loss_of(model, 0).backward()
    opt.step()
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove()
    post.remove()
    opt.step()
    assert len(calls) == 2


def test_state_dict_hooks_run():
    _, opt = make()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", ["param_groups", "pdmp", "state"], "load-pre", "load-post"]


def test_repr_names_mode_reason_gammas_and_counts():
    _, opt = make(mode="auto", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    text = repr(opt)
    assert "mode='lr'" in text and "Adam normalises the gradient scale away" in text
    assert "visual: gamma=15, 2 tensors, 88 parameters" in text
    assert "audio: gamma=0.0666667, 4 tensors, 128 parameters" in text
    assert "unscaled (shared), 2 tensors, 51 parameters" in text
    assert "Adam (" in text


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copies_keep_working(clone):
    model, opt = make()
    both = clone({"model": model, "opt": opt})
    model2, opt2 = both["model"], both["opt"]
    for step in range(3):
        for m, o in ((model, opt), (model2, opt2)):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
    assert_same_params(model, model2)
    assert opt2.param_groups[0]["params"][0] is next(model2.audio.parameters())


def test_frozen_parameters_outside_the_optimizer_are_ignored():
    model = TwoModal()
    model.audio[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = PDMPOptimizer(torch.optim.SGD(trainable, lr=0.1), model.groups(), dominant="visual")
    assert all(p.requires_grad for p in opt.params_by_modality()["audio"])
    assert len(opt.params_by_modality()["audio"]) == 3


def test_parameters_without_grad_are_skipped():
    model, opt = make()
    reference_model = TwoModal()
    reference = torch.optim.SGD(
        [
            {"params": list(m.parameters())}
            for m in (reference_model.audio, reference_model.visual, reference_model.head)
        ],
        lr=0.1,
        momentum=0.9,
    )
    audio, visual = torch.randn(4, 6), torch.randn(4, 10)
    for m in (model, reference_model):
        m.head(torch.cat([m.audio(audio).detach(), m.visual(visual)], 1)).sum().backward()  # audio gets no grad
    assert all(p.grad is None for p in model.audio.parameters())
    opt.step()
    reference_grad_step(reference, reference_model.modality_params(), opt.gammas)
    assert_same_params(model, reference_model)
