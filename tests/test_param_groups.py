"""Param groups: every group holds one modality and says so (``"modality"``, ``"pdmp_gamma"``). A group that mixes
modalities is split in place, in order of first appearance, with the same settings; a parameter of a module named in
``groups=`` is that modality whenever it enters the optimizer (added, reassigned, loaded); a contradicting or unknown
tag is refused and changes nothing; LR schedulers created after wrapping reach every group, and one attached before
a split is refused with the fix named."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import PDMPReference


def sgd(params, **kw):
    return torch.optim.SGD(params, **{"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, **kw})


def adamw(params, **kw):
    return torch.optim.AdamW(params, **{"lr": 1e-2, "weight_decay": 0.1, **kw})


# name: (inner optimizer, mode, tolerance of the comparison with the reference)
MODES = {
    "SGD-grad": (sgd, "auto", {}),
    "SGD-lr": (sgd, "lr", {"rtol": 1e-5, "atol": 1e-7}),
    "AdamW-lr": (adamw, "auto", {}),
    "SGD-update": (sgd, "update", {"rtol": 1e-5, "atol": 1e-7}),
}


def interleaved(model: TwoModal) -> list[nn.Parameter]:
    """The model's parameters with audio, visual and head interleaved in one list."""
    a, v, h = list(model.audio.parameters()), list(model.visual.parameters()), list(model.head.parameters())
    return [a[0], v[0], a[1], h[0], a[2], v[1], a[3], h[1]]


def step_both(pairs, steps) -> None:
    """``(model, optimizer)`` pairs trained side by side on the same batches."""
    for step in steps:
        for model, opt in pairs:
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()


def modalities(opt) -> list:
    return [g["modality"] for g in opt.param_groups]


# ---------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_every_mode_splits_a_mixed_group_in_order_of_first_appearance_keeping_its_settings(mode):
    model = TwoModal()
    order = interleaved(model)
    by_name = {p: n for n, p in model.named_parameters()}
    inner = torch.optim.SGD([(by_name[p], p) for p in order], lr=0.1, momentum=0.8, weight_decay=1e-3)
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode=mode)
    assert opt.param_groups is inner.param_groups
    assert [(g["modality"], g["pdmp_gamma"]) for g in opt.param_groups] == [
        ("audio", 1 / 15),
        ("visual", 15.0),
        (None, 1.0),
    ]
    assert [g["params"] for g in opt.param_groups] == [
        list(model.audio.parameters()),
        list(model.visual.parameters()),
        list(model.head.parameters()),
    ]
    assert [g["pdmp_split"] for g in opt.param_groups] == [[8, [0, 2, 4, 6]], [8, [1, 5]], [8, [3, 7]]]
    for group in opt.param_groups:
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.8, 1e-3)
        assert [by_name[p] for p in group["params"]] == group["param_names"]


def test_groups_that_hold_one_modality_each_stay_the_same_objects():
    model = TwoModal()
    inner = sgd([{"params": list(m.parameters()), "lr": lr} for m, lr in ((model.audio, 0.1), (model.head, 0.2),
                 (model.visual, 0.3))])  # fmt: skip
    groups = list(inner.param_groups)
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    assert all(a is b for a, b in zip(opt.param_groups, groups, strict=True))
    assert [(g["modality"], g["lr"]) for g in opt.param_groups] == [("audio", 0.1), (None, 0.2), ("visual", 0.3)]
    assert not any("pdmp_split" in g for g in opt.param_groups)


def test_split_groups_do_not_share_a_tensor_lr():
    model = TwoModal()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01)), model.groups(), gammas=GAMMAS)
    lrs = [g["lr"] for g in opt.param_groups]
    lrs[0].mul_(0.5)
    assert [float(lr) for lr in lrs] == pytest.approx([0.005, 0.01, 0.01])
    step_both([(model, opt)], range(1))
    assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lrs, strict=True))  # restored, never multiplied
    assert [float(lr) for lr in lrs] == pytest.approx([0.005, 0.01, 0.01])


def test_zero_redundancy_optimizer_is_refused_a_split_and_told_to_build_one_group_per_modality(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = TwoModal()
        zero = ZeroRedundancyOptimizer(model.trained(), optimizer_class=torch.optim.SGD, lr=0.1)
        with pytest.raises(
            ValueError, match=r"ZeroRedundancyOptimizer: it partitions .* build it with one param group per modality"
        ):
            PDMPOptimizer(zero, model.groups(), gammas=GAMMAS)
        per_modality = [list(m.parameters()) for m in (model.audio, model.visual, model.head)]
        zero = ZeroRedundancyOptimizer(per_modality[0], optimizer_class=torch.optim.SGD, lr=0.1)
        for params in per_modality[1:]:
            zero.add_param_group({"params": params})
        opt = PDMPOptimizer(zero, model.groups(), gammas=GAMMAS)
        assert modalities(opt) == ["audio", "visual", None]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- membership
def test_modality_tags_on_the_inner_param_groups_give_the_groups():
    model = TwoModal()
    inner = sgd([{"params": model.audio.parameters(), "modality": "audio"},
                 {"params": model.visual.parameters(), "modality": "visual"},
                 {"params": model.head.parameters()}])  # fmt: skip
    opt = PDMPOptimizer(inner, dominant="visual", optimization_dominant="audio")
    assert opt.gammas == {"audio": 1 / 15, "visual": 15.0}
    assert opt.params_by_modality() == {
        "audio": list(model.audio.parameters()),
        "visual": list(model.visual.parameters()),
        None: list(model.head.parameters()),
    }


def test_a_tag_on_parameters_outside_groups_makes_them_that_modality():
    model, ref_model = TwoModal(extras=1), TwoModal(extras=1)
    opts = []
    for m, cls in ((model, PDMPOptimizer), (ref_model, PDMPReference)):
        inner = sgd([{"params": m.trained()}, {"params": m.extras.parameters(), "modality": "audio"}])
        opts.append(cls(inner, m.groups(), gammas=GAMMAS))
    assert modalities(opts[0]) == ["audio", "visual", None, "audio"]
    assert opts[0].params_by_modality()["audio"] == model.modality_params()["audio"]
    step_both([(model, opts[0]), (ref_model, opts[1])], range(2))
    assert_same_params(model, ref_model)


def test_frozen_parameters_outside_the_optimizer_are_not_listed():
    model = TwoModal()
    model.audio[0].weight.requires_grad_(False)
    opt = PDMPOptimizer(sgd([p for p in model.parameters() if p.requires_grad]), model.groups(), gammas=GAMMAS)
    assert opt.params_by_modality()["audio"] == [model.audio[0].bias, *model.audio[2].parameters()]


def test_add_param_group_with_a_tag_is_scaled_without_one_on_shared_parameters_is_not():
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.trained(), momentum=0.0, weight_decay=0.0), model.groups(), gammas=GAMMAS)
    audio, shared = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [audio], "modality": "audio"})
    opt.add_param_group({"params": [shared]})
    assert [(g["modality"], g["pdmp_gamma"]) for g in opt.param_groups[3:]] == [("audio", 1 / 15), (None, 1.0)]
    audio.grad, shared.grad = torch.ones(3), torch.ones(3)
    opt.scale_grads_()
    assert torch.equal(audio.grad, torch.full((3,), 1 / 15))
    assert torch.equal(shared.grad, torch.ones(3))


@pytest.mark.parametrize("where", ["wrapper", "inner"])
def test_an_unknown_tag_is_refused_naming_the_modalities_and_changes_nothing(where):
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS)
    groups = list(opt.param_groups)
    stray = nn.Parameter(torch.ones(1))
    target = opt if where == "wrapper" else opt.optimizer
    with pytest.raises(ValueError, match=r"modality 'text' is unknown; use one of \['audio', 'visual'\] or None"):
        target.add_param_group({"params": [stray], "modality": "text"})
        opt.step()  # a group added on the inner optimizer is checked at the next entry point
    assert opt.param_groups[:3] == groups
    if where == "inner":  # torch added it; PDMP left it untagged
        assert len(opt.param_groups) == 4 and "pdmp_gamma" not in opt.param_groups[3]
    else:
        assert len(opt.param_groups) == 3


@pytest.mark.parametrize("where", ["wrapper", "inner"])
@pytest.mark.parametrize("setup", list(MODES))
def test_a_layer_frozen_at_wrap_time_and_added_later_without_a_tag_is_scaled_as_its_modality(setup, where):
    """Issue 16, item 4 (progressive unfreezing): the visual layer's weight is frozen when the optimizer is built,
    unfrozen after two steps and added with ``add_param_group`` (no tag); from then on it is scaled as visual, as
    the reference scales it."""
    factory, mode, tolerance = MODES[setup]
    model, ref_model = TwoModal(), TwoModal()
    opts = []
    for m, cls in ((model, PDMPOptimizer), (ref_model, PDMPReference)):
        m.visual[0].weight.requires_grad_(False)
        opts.append(cls(factory([p for p in m.trained() if p.requires_grad]), m.groups(), gammas=GAMMAS, mode=mode))
    opt, ref = opts
    step_both([(model, opt), (ref_model, ref)], range(2))
    for m in (model, ref_model):
        m.visual[0].weight.requires_grad_(True)
    (opt if where == "wrapper" else opt.optimizer).add_param_group({"params": [model.visual[0].weight]})
    ref.add_param_group({"params": [ref_model.visual[0].weight]})
    step_both([(model, opt), (ref_model, ref)], range(2, 5))
    assert_same_params(model, ref_model, **tolerance)
    assert not torch.equal(model.visual[0].weight, TwoModal().visual[0].weight)
    assert (opt.param_groups[-1]["modality"], opt.param_groups[-1]["pdmp_gamma"]) == ("visual", 15.0)


def test_a_tag_that_contradicts_groups_is_refused_and_changes_nothing():
    """Issue 16, item 4: a ``"modality"`` tag that contradicts ``groups=`` does not silently win."""
    model = TwoModal()
    weight = model.visual[0].weight
    weight.requires_grad_(False)
    opt = PDMPOptimizer(sgd([p for p in model.trained() if p.requires_grad]), model.groups(), gammas=GAMMAS)
    weight.requires_grad_(True)
    groups = [dict(g) for g in opt.param_groups]
    message = r"tagged modality='audio', but groups= gives its parameter of shape \(8, 10\) to 'visual'; drop the tag"
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [weight], "modality": "audio"})
    assert opt.param_groups == groups
    # on the inner optimizer torch adds it; PDMP refuses at the next step, before anything moves
    opt.optimizer.add_param_group({"params": [weight], "modality": "audio"})
    loss_of(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.param_groups[:-1] == groups and "pdmp_gamma" not in opt.param_groups[-1]


ENTRY_POINTS = {
    "step": lambda opt: opt.step(),
    "state_dict": lambda opt: opt.state_dict(),
    "gammas": lambda opt: setattr(opt, "gammas", GAMMAS),
    "load_state_dict": lambda opt: opt.load_state_dict(_unsplit(opt)),
    "params_by_modality": lambda opt: opt.params_by_modality(),
    "repr": repr,
}


def _unsplit(opt):
    """The state dict of a plain SGD with the groups of ``opt`` as the user built them (before any split)."""
    audio_and_head, last = opt.param_groups[0]["params"] + opt.param_groups[1]["params"], opt.param_groups[2]
    plain = sgd(audio_and_head)
    plain.add_param_group({k: v for k, v in last.items() if k != "modality"})
    return plain.state_dict()


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_mixed_group_added_on_the_inner_optimizer_is_split_at_the_next_entry_point(entry_point):
    model = TwoModal()
    model.visual.requires_grad_(False)
    opt = PDMPOptimizer(sgd([p for p in model.trained() if p.requires_grad]), model.groups(), gammas=GAMMAS)
    model.visual.requires_grad_(True)
    shared = nn.Parameter(torch.zeros(2))
    opt.optimizer.add_param_group({"params": [model.visual[0].weight, shared, model.visual[0].bias], "lr": 0.3})
    ENTRY_POINTS[entry_point](opt)
    assert [(g["modality"], g["pdmp_gamma"], g["lr"], g.get("pdmp_split")) for g in opt.param_groups] == [
        ("audio", 1 / 15, 0.05, [6, [0, 1, 2, 3]]),
        (None, 1.0, 0.05, [6, [4, 5]]),
        ("visual", 15.0, 0.3, [3, [0, 2]]),
        (None, 1.0, 0.3, [3, [1]]),
    ]


# --------------------------------------------------------------------- groups replaced or reloaded
def adamw_pair():
    model, ref_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(adamw(model.trained()), model.groups(), gammas=GAMMAS)
    ref = PDMPReference(adamw(ref_model.trained()), ref_model.groups(), gammas=GAMMAS)
    assert opt.mode == "lr"
    return model, opt, ref_model, ref


def test_lr_mode_keeps_scaling_after_the_inner_optimizer_loads_a_state_dict():
    model, opt, ref_model, ref = adamw_pair()
    step_both([(model, opt), (ref_model, ref)], range(2))
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())  # new group dicts, the tags among their keys
    step_both([(model, opt), (ref_model, ref)], range(2, 4))
    assert_same_params(model, ref_model)


def test_groups_reassigned_without_tags_are_tagged_and_split_at_the_next_step():
    """``opt.param_groups = [...]`` with plain groups (one of them mixing modalities): the next step tags and splits
    them, and the run goes on like the reference."""
    model, opt, ref_model, ref = adamw_pair()
    step_both([(model, opt), (ref_model, ref)], range(2))
    keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
            "fused", "decoupled_weight_decay")  # fmt: skip
    settings = {k: opt.param_groups[0][k] for k in keep}
    opt.param_groups = [{**settings, "params": model.trained()}]
    step_both([(model, opt), (ref_model, ref)], range(2, 3))
    assert modalities(opt) == ["audio", "visual", None]
    opt.optimizer.param_groups = [dict(g) for g in opt.param_groups]  # tagged copies: kept as they are
    step_both([(model, opt), (ref_model, ref)], range(3, 5))
    assert_same_params(model, ref_model)


def test_groups_added_on_the_inner_optimizer_follow_their_tag():
    model, ref_model = TwoModal(extras=1), TwoModal(extras=1)
    opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS)
    ref = PDMPReference(sgd(ref_model.trained()), ref_model.groups(), gammas=GAMMAS)
    opt.optimizer.add_param_group({"params": list(model.extras.parameters()), "modality": "visual"})
    ref.add_param_group({"params": list(ref_model.extras.parameters()), "modality": "visual"})
    step_both([(model, opt), (ref_model, ref)], range(2))
    assert_same_params(model, ref_model)
    assert opt.params_by_modality()["visual"] == [*model.visual.parameters(), *model.extras.parameters()]


# ------------------------------------------------------------------------------------------ schedulers
SCHEDULERS = {  # per-group lists, sized for the groups after the split (audio, visual, head)
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, [lambda e: 0.9**e, lambda e: 1.0, lambda e: 1 / (1 + e)]),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=[0.5, 0.2, 0.1], total_steps=12),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, min_lr=[0.02, 0.01, 0.0]),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=[0.01, 0.02, 0.03], max_lr=[0.1, 0.2, 0.3], step_size_up=3),
}


def split_plain(model: TwoModal, **kw):
    """A plain SGD built with the groups PDMP splits ``model.parameters()`` into."""
    return sgd([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)], **kw)


@pytest.mark.parametrize("mode", ["grad", "lr"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_with_per_group_lists_for_the_split_groups_work_and_resume(name, mode):
    """Issue 16, item 5: schedulers created after wrapping, with per-group lists sized for ``opt.param_groups``, drive
    the wrapper as they drive a plain SGD built with the same groups, and resume from their state dicts."""
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(sgd(model.trained(), lr=0.1), model.groups(), gammas=GAMMAS, mode=mode)
    plain = split_plain(plain_model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched, plain_sched = SCHEDULERS[name](opt), SCHEDULERS[name](plain)
        for step in range(8):
            if step == 4:  # resume the schedule from its state dict, as a checkpoint would
                saved = {"opt": opt.state_dict(), "sched": sched.state_dict()}
                opt = PDMPOptimizer(sgd(model.trained(), lr=0.1), model.groups(), gammas=GAMMAS, mode=mode)
                sched = SCHEDULERS[name](opt)
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
            step_both([(model, opt), (plain_model, plain)], [step])
            for s in (sched, plain_sched):
                s.step(1.0) if isinstance(s, lr_scheduler.ReduceLROnPlateau) else s.step()  # a flat metric
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
            assert [g["momentum"] for g in opt.param_groups] == [g["momentum"] for g in plain.param_groups]
    assert len({g["lr"] for g in opt.param_groups} | {0.1}) > 1  # the schedule moved


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda o: lr_scheduler.LambdaLR(o, [lambda e: 0.9**e]), "Expected 3 lr_lambdas, but got 1"),
        (lambda o: lr_scheduler.OneCycleLR(o, max_lr=[0.5], total_steps=12), "max_lr has 1 values, param_groups has 3"),
        (lambda o: lr_scheduler.ReduceLROnPlateau(o, min_lr=[0.01]), "expected 3 min_lrs, got 1"),
    ],
    ids=["LambdaLR", "OneCycleLR", "ReduceLROnPlateau"],
)
def test_scheduler_lists_sized_for_the_users_groups_fail_loudly_in_every_mode(make, message):
    """Sized for the one group the user built, not the three after the split: torch's own error (the docs name the
    fix, create the lists for ``opt.param_groups``), never a schedule that silently misses groups."""
    for mode in ("grad", "lr"):
        model = TwoModal()
        opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS, mode=mode)
        with pytest.raises(ValueError, match=message):
            make(opt)


@pytest.mark.parametrize("make", [sgd, adamw], ids=["SGD", "AdamW"])
def test_a_scheduler_attached_before_wrapping_is_refused_when_a_group_must_be_split(make):
    """Issue 16, item 5: it sized its lists for the one group it saw and would no longer reach every group."""
    model = TwoModal()
    inner = make(model.trained())
    lr_scheduler.StepLR(inner, step_size=1)
    before = [dict(g) for g in inner.param_groups]
    with pytest.raises(ValueError, match=r"mixes modalities.*an LR scheduler is attached.*create it after wrapping"):
        PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    assert inner.param_groups == before


def test_a_scheduler_attached_before_wrapping_groups_of_one_modality_each_keeps_working():
    model, plain_model = TwoModal(), TwoModal()
    inner, plain = split_plain(model, lr=0.1), split_plain(plain_model, lr=0.1)
    sched, plain_sched = (lr_scheduler.LambdaLR(o, [lambda e: 0.5**e, lambda e: 1.0, lambda e: 0.9**e])
                          for o in (inner, plain))  # fmt: skip
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    for step in range(3):
        step_both([(model, opt), (plain_model, plain)], [step])
        sched.step()
        plain_sched.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups] == [0.0125, 0.1, 0.1 * 0.9**3]


def test_the_groups_show_the_users_lr_outside_the_step():
    """Issue 16, item 5: code that reads ``opt.param_groups[0]["lr"]`` (loggers, schedulers, step hooks on the
    wrapper and global ones) sees the lr the user set and the scheduler moved, never one multiplied by gamma."""
    model = TwoModal()
    opt = PDMPOptimizer(adamw(model.trained(), lr=0.02), model.groups(), dominant="visual")
    assert opt.mode == "lr"
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    hooks = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups])),
        opt.register_step_post_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups])),
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups])),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups])),
    ]
    try:
        assert opt.param_groups[0]["lr"] == 0.02
        for step in range(3):
            step_both([(model, opt)], [step])
            sched.step()
            assert [g["lr"] for g in opt.param_groups] == [0.02 * 0.5 ** (step + 1)] * 3
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [[0.02 * 0.5**step] * 3 for step in range(3) for _ in range(4)]


# ------------------------------------------------------------------------------------- wrapping again, membership
def test_wrapping_the_same_optimizer_again_takes_the_new_arguments():
    """The arguments of the wrapper built last decide, not the keys an earlier one left in the groups."""
    model = TwoModal()
    inner = sgd(model.trained())
    PDMPOptimizer(inner, model.groups(), dominant="visual")
    again = PDMPOptimizer(inner, model.groups(), dominant="audio")
    assert dict(again.gammas) == {"audio": 15.0, "visual": 1 / 15}
    assert [(g["modality"], g["pdmp_gamma"]) for g in again.param_groups] == [
        ("audio", 15.0),
        ("visual", 1 / 15),
        (None, 1.0),
    ]


def test_an_inner_optimizer_loaded_with_a_checkpoint_before_wrapping_takes_the_constructor_gammas():
    first = TwoModal()
    saved = PDMPOptimizer(sgd(first.trained()), first.groups(), gammas={"audio": 2.0, "visual": 0.5})
    model = TwoModal()
    inner = sgd(model.trained())
    PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS)  # (split like the checkpoint's groups)
    inner.param_groups = [dict(g) for g in saved.param_groups]
    for group, params in zip(inner.param_groups, (model.audio, model.visual, model.head), strict=True):
        group["params"] = list(params.parameters())
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    assert dict(opt.gammas) == GAMMAS  # (opt.load_state_dict(...) after construction restores a checkpoint's)


def test_a_tag_an_earlier_wrapper_left_that_contradicts_groups_is_refused():
    model = TwoModal()
    inner = sgd(model.trained())
    PDMPOptimizer(inner, {"audio": model.audio, "visual": model.visual}, gammas=GAMMAS)
    with pytest.raises(ValueError, match="tagged modality='audio', but groups= gives its parameter"):
        PDMPOptimizer(inner, {"audio": model.visual, "visual": model.audio}, gammas=GAMMAS)  # swapped


def test_sgd_lr_mode_momentum_goes_back_to_standard_units_when_wrapped_again_in_another_mode():
    """Attack finding: re-wrapping the inner optimizer of an SGD lr-mode run in grad mode kept 1/gamma units."""
    runs = []
    for switch in ("state_dict", "rewrap"):
        model = TwoModal()
        inner = sgd(model.trained())
        opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode="lr")
        step_both([(model, opt)], range(3))
        if switch == "state_dict":
            saved = opt.state_dict()
            opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS, mode="grad")
            opt.load_state_dict(saved)
        else:
            opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode="grad")
            assert all("pdmp_momentum_scale" not in g for g in opt.param_groups)
        step_both([(model, opt)], range(3, 6))
        runs.append(model)
    assert_same_params(*runs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("via", ["wrapper", "inner"])
def test_a_module_added_to_an_encoder_after_wrapping_belongs_to_its_modality(via):
    """Attack finding: membership was a snapshot of the modules at wrap time."""
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS)
    model.audio.append(nn.Linear(8, 8))
    (opt if via == "wrapper" else opt.optimizer).add_param_group({"params": list(model.audio[-1].parameters())})
    opt.params_by_modality()
    assert (opt.param_groups[-1]["modality"], opt.param_groups[-1]["pdmp_gamma"]) == ("audio", 1 / 15)


def test_a_pickled_optimizer_does_not_carry_the_frozen_encoder_weights():
    """Membership is held weakly: only the optimizer's own parameters and state travel."""
    import pickle

    big = nn.Linear(500, 500).requires_grad_(False)  # a frozen encoder, added later
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.trained()), {**model.groups(), "text": big}, gammas={**GAMMAS, "text": 2.0})
    assert len(pickle.dumps(opt)) < 100_000  # (the frozen weights alone are 1 MB)


def test_a_group_tagged_with_a_modality_the_optimizer_does_not_know_is_refused_at_the_next_entry_point():
    """A checkpoint of other groups= loaded into the inner optimizer (a renamed modality): refused, not applied."""
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["modality"] = {"audio": "speech"}.get(group["modality"], group["modality"])
    opt.optimizer.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"modality 'speech' is unknown; use one of \['audio', 'visual'\] or None"):
        opt.step()
