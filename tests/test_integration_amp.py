"""AMP: ``torch.amp.GradScaler`` with a PDMPOptimizer equals a loop that unscales, multiplies and steps.

The scaler unscales through ``param_groups`` (the wrapper does not claim ``_step_supports_amp_scaling``), so
PDMP multiplies *unscaled* gradients. Loss scales are powers of two, so every run here is bit-exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_fn, make_batches, pair, reference_scale_grads

from pdmp_optim import PDMPOptimizer

STEPS = 4


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def scaler() -> torch.amp.GradScaler:
    # a small growth interval so that the scale also grows during the run
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def pdmp_amp_run(batches, clip: float | None = None, scale_before_clip: bool = True):
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS)
    amp = scaler()
    for batch in batches:
        opt.zero_grad()
        with autocast():
            loss = loss_fn(model, batch)
        amp.scale(loss).backward()
        if clip is not None:
            amp.unscale_(opt)
            if scale_before_clip:
                opt.scale_grads_()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        amp.step(opt)
        amp.update()
    return model, opt, amp


def reference_amp_run(batches, clip: float | None = None, scale_before_clip: bool = True):
    model = TwoModal()
    opt = sgd(model.parameters())
    amp = scaler()
    for batch in batches:
        opt.zero_grad()
        with autocast():
            loss = loss_fn(model, batch)
        amp.scale(loss).backward()
        amp.unscale_(opt)
        if clip is not None and not scale_before_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        if grads_finite:
            reference_scale_grads(model)
        if clip is not None and scale_before_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        amp.step(opt)
        amp.update()
    return model, opt, amp


def test_grad_scaler_step_scales_unscaled_gradients():
    batches = make_batches(STEPS)
    model, _, amp = pdmp_amp_run(batches)
    ref, _, ref_amp = reference_amp_run(batches)
    assert_same_params(model, ref)
    assert amp.get_scale() == ref_amp.get_scale() > 2.0**10  # the scale grew: no step was skipped


def test_grad_scaler_equals_plain_fp32_pdmp_without_a_scaler():
    # power-of-two loss scales commute exactly with every float op, so AMP's unscaled gradients are the
    # plain ones: PDMP must see exactly what it would see without a scaler
    batches = make_batches(STEPS)
    model, _, _ = pdmp_amp_run(batches)
    plain = TwoModal()
    opt = PDMPOptimizer(sgd(plain.parameters()), plain.groups(), gammas=GAMMAS)
    for batch in batches:
        opt.zero_grad()
        with autocast():
            loss = loss_fn(plain, batch)
        loss.backward()
        opt.step()
    assert_same_params(model, plain)


@pytest.mark.parametrize(
    ("clip", "zero"), [(None, "opt"), (0.05, "opt"), (0.05, "model")], ids=["step", "scale-clip-step", "model-zero"]
)
def test_step_with_inf_gradients_is_skipped_and_training_continues(clip, zero):
    """A skipped step changes no parameter, state or gamma; with ``scale_grads_()`` before it, the next step still
    scales its new gradients once, whether the loop zeroes through the optimizer or the model."""
    batches = make_batches(STEPS)
    bad = (batches[1][0].clone(), batches[1][1], batches[1][2])
    bad[0][0, 0] = float("inf")
    with_bad = [batches[0], bad, *batches[2:]]

    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS)
    amp = scaler()
    for i, batch in enumerate(with_bad):
        (opt if zero == "opt" else model).zero_grad()
        with autocast():
            loss = loss_fn(model, batch)
        amp.scale(loss).backward()
        if i == 1:
            params_before = copy.deepcopy(model.state_dict())
            state_before = copy.deepcopy(opt.state_dict())
            scale_before = amp.get_scale()
            assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
        if clip is not None:
            amp.unscale_(opt)
            opt.scale_grads_()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        amp.step(opt)
        amp.update()
        if i == 1:
            for name, value in model.state_dict().items():
                assert torch.equal(value, params_before[name]), f"{name} changed on a skipped step"
            state_after = opt.state_dict()
            assert state_after["param_groups"] == state_before["param_groups"]  # gammas and lrs included
            assert [g["pdmp_gamma"] for g in state_after["param_groups"]] == [GAMMAS["audio"], GAMMAS["visual"], 1.0]
            for key, entry in state_before["state"].items():
                assert torch.equal(entry["momentum_buffer"], state_after["state"][key]["momentum_buffer"])
            assert amp.get_scale() == scale_before / 2  # the scaler backed off
    assert all(torch.isfinite(p).all() for p in model.parameters())

    ref, _, ref_amp = reference_amp_run(with_bad, clip=clip)
    assert_same_params(model, ref)
    assert amp.get_scale() == ref_amp.get_scale()


@pytest.mark.parametrize("scale_before_clip", [True, False], ids=["scale-clip-step", "clip-then-pdmp-in-step"])
def test_unscale_then_clip_then_step(scale_before_clip):
    batches = make_batches(STEPS)
    model, _, _ = pdmp_amp_run(batches, clip=0.05, scale_before_clip=scale_before_clip)
    ref, _, _ = reference_amp_run(batches, clip=0.05, scale_before_clip=scale_before_clip)
    assert_same_params(model, ref)


def test_grad_scaler_with_adam_in_lr_mode():
    """lr mode under a GradScaler equals the reference twin under its own GradScaler, bit for bit."""
    batches = make_batches(STEPS)
    model, opt, ref, ref_opt = pair(torch.optim.Adam, {"lr": 1e-2})
    assert opt.mode == "lr"
    # the single param group is split into audio, visual and shared (head) groups, in that order
    assert [(g["modality"], g["params"]) for g in opt.param_groups] == [
        ("audio", list(model.audio.parameters())),
        ("visual", list(model.visual.parameters())),
        (None, list(model.head.parameters())),
    ]
    amp, ref_amp = scaler(), scaler()
    for batch in batches:
        for m, o, a in ((model, opt, amp), (ref, ref_opt, ref_amp)):
            o.zero_grad()
            with autocast():
                loss = loss_fn(m, batch)
            a.scale(loss).backward()
            a.step(o)
            a.update()
    assert_same_params(model, ref)
    assert amp.get_scale() == ref_amp.get_scale() > 2.0**10  # no step was skipped
    assert [g["lr"] for g in opt.param_groups] == [1e-2] * 3  # restored after every step
