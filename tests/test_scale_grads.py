"""``scale_grads_()`` multiplies the modality gradients now (before clipping, say) and ``step()`` does not repeat it,
whatever tensor holds the gradient by then. The mark ends at ``step()``, ``zero_grad()`` or the next backward that
reaches a marked parameter: zeroed gradients start afresh, scaled ones refuse to be added to. It holds no gradient
and leaves no hook behind, and a step whose inner step raises keeps it."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of, pair
from torch import nn

from pdmp_optim import PDMPOptimizer, scale_encoder_grads

SGD = {"lr": 0.1, "momentum": 0.9}


def sgd_pair():
    return pair(torch.optim.SGD, SGD)


def one_param_opt(gamma=2.0):
    w = nn.Parameter(torch.zeros(3))
    return w, PDMPOptimizer(torch.optim.SGD([w], lr=1.0), {"a": [w]}, gammas={"a": gamma})


def model_opt_and_plain():
    """A model, its PDMPOptimizer, and a plain copy taken before anything happened."""
    model = TwoModal()
    plain_model = copy.deepcopy(model)
    opt = PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    return model, opt, plain_model


def scaled_by_hand(model: TwoModal) -> None:
    with torch.no_grad():
        for modality, params in model.modality_params().items():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(GAMMAS[modality])


def hooks_on(params) -> int:
    return sum(len(p._backward_hooks or {}) for p in params)


# --------------------------------------------------------------------------------------------- once per step
def test_scale_grads_then_step_scales_once_and_a_second_call_changes_nothing():
    model, opt, ref_model, ref = sgd_pair()
    for step in range(3):
        loss_of(model, step).backward()
        loss_of(ref_model, step).backward()
        opt.scale_grads_()
        once = [p.grad.clone() for p in model.parameters()]
        opt.scale_grads_()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), once, strict=True))
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        assert_same_params(model, ref_model)


def test_a_second_scale_grads_scales_only_the_gradients_not_scaled_yet():
    model, opt, raw_model = model_opt_and_plain()
    x_audio, x_visual = torch.randn(4, 6), torch.randn(4, 10)

    def audio_then_visual(m, between):
        m.head(torch.cat([m.audio(x_audio), m.visual(x_visual).detach()], 1)).sum().backward()  # audio only
        between()
        m.head(torch.cat([m.audio(x_audio).detach(), m.visual(x_visual)], 1)).sum().backward()  # visual only
        between()

    audio_then_visual(model, opt.scale_grads_)
    audio_then_visual(raw_model, lambda: None)
    for modality, params in raw_model.modality_params().items():
        for p, q in zip(params, model.modality_params()[modality], strict=True):
            if q.grad is not None:
                assert torch.equal(q.grad, p.grad * GAMMAS[modality])
    for p, q in zip(raw_model.head.parameters(), model.head.parameters(), strict=True):
        assert torch.equal(q.grad, p.grad)
    grads = [p.grad.clone() for p in model.trained()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.trained(), grads, strict=True))  # step added nothing


@pytest.mark.parametrize("mode", ["lr", "update"])
def test_scale_grads_refuses_where_the_coefficient_is_not_in_the_gradients(mode):
    model, opt, *_ = pair(torch.optim.Adam, {"lr": 1e-3}, gammas=GAMMAS, mode=mode)
    loss_of(model, 0).backward()
    grads = [p.grad.clone() for p in model.trained()]
    with pytest.raises(RuntimeError, match=rf"scale_grads_\(\) is for mode='grad'; in mode='{mode}'"):
        opt.scale_grads_()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.trained(), grads, strict=True))


def test_gradient_accumulation_is_scaled_once_per_step():
    model, opt, ref_model, ref = sgd_pair()
    for step in range(2):
        for micro in range(3):
            (loss_of(model, 10 * step + micro) / 3).backward()
            (loss_of(ref_model, 10 * step + micro) / 3).backward()
        opt.scale_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        ref.scale_grads_()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=0.5)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    assert_same_params(model, ref_model)


def test_a_closure_that_calls_scale_grads_itself_is_not_scaled_twice():
    """Lightning runs gradient clipping inside the closure it passes to ``step()``."""
    model, opt, ref_model, ref = sgd_pair()

    def closure_of(m, o):
        def closure():
            o.zero_grad()
            loss = loss_of(m, 0)
            loss.backward()
            o.scale_grads_()
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
            return loss

        return closure

    opt.step(closure_of(model, opt))
    ref.step(closure_of(ref_model, ref))
    assert_same_params(model, ref_model)
    plain_model = TwoModal()  # and by hand: scaled once, then clipped, then the plain step
    loss_of(plain_model, 0).backward()
    scaled_by_hand(plain_model)
    torch.nn.utils.clip_grad_norm_(plain_model.parameters(), max_norm=0.5)
    torch.optim.SGD(plain_model.trained(), **SGD).step()
    assert_same_params(model, plain_model)


def _add_group(opt):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _add_group_on_inner(opt):
    opt.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _new_group_dicts(opt):
    opt.param_groups = [dict(g) for g in opt.param_groups]


def _unrelated_hooks(opt):
    scale_encoder_grads({"x": nn.Linear(1, 1)}, {"x": 3.0}).remove()  # another model's hooks, come and gone


@pytest.mark.parametrize("change", [_add_group, _add_group_on_inner, _new_group_dicts, _unrelated_hooks])
def test_a_change_to_the_optimizer_between_scale_grads_and_step_does_not_scale_again(change):
    w, opt = one_param_opt(gamma=2.0)
    w.grad = torch.ones(3)
    opt.scale_grads_()
    change(opt)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), -2.0))


def test_a_step_grad_scaler_skipped_after_scale_grads_is_forgotten_by_model_zero_grad():
    model, opt, ref_model, ref = sgd_pair()
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1) for _ in range(2)]
    for step in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        for m, o, scaler in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            scaler.scale(loss_of(m, step)).backward()
            if step in (1, 2):
                m.visual[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(o)
            o.scale_grads_()
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1.0)
            scaler.step(o)  # skipped at steps 1 and 2: the marked gradients are left behind
            scaler.update()
            m.zero_grad()  # the model's, not the optimizer's: the next backward ends the mark
        assert_same_params(model, ref_model)
        moved = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert moved == (step not in (1, 2))


# ------------------------------------------------------------ issue 16 "what fails" 3: the scale_grads_() mark
@pytest.mark.parametrize(
    "edit",
    [lambda g: g / 2, lambda g: g.double().float(), lambda g: torch.stack([g, 3 * g]).mean(0)],
    ids=["halved", "cast", "averaged"],
)
def test_an_out_of_place_edit_between_scale_grads_and_step_is_not_scaled_again(edit):
    model, opt, plain_model = model_opt_and_plain()
    loss_of(model, 0).backward()
    loss_of(plain_model, 0).backward()
    opt.scale_grads_()
    scaled_by_hand(plain_model)
    for m in (model, plain_model):
        for p in m.trained():
            p.grad = edit(p.grad)  # a new tensor object
    edited = [p.grad.clone() for p in model.trained()]
    opt.step()
    torch.optim.SGD(plain_model.trained(), lr=0.1, momentum=0.9).step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.trained(), edited, strict=True))
    assert_same_params(model, plain_model)


def test_the_mark_keeps_no_scaled_gradient_alive():
    model, opt, _ = model_opt_and_plain()
    loss_of(model, 0).backward()
    opt.scale_grads_()
    scaled = [weakref.ref(p.grad) for p in model.trained()]
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert [ref() for ref in scaled] == [None] * len(scaled)  # freed before the next backward allocates anew
    loss_of(model, 1).backward()  # zeroed: a new step begins
    opt.step()


def test_an_optimizer_dropped_while_marked_leaves_no_hooks_on_the_parameters():
    model = TwoModal()
    for step in range(5):  # e.g. an optimizer rebuilt every epoch, the last step of each skipped
        opt = PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1), model.groups(), gammas=GAMMAS)
        loss_of(model, step).backward()
        opt.scale_grads_()
        assert hooks_on(model.parameters()) > 0
        model.zero_grad()
    del opt
    gc.collect()
    assert hooks_on(model.parameters()) == 0


def test_a_dropped_marked_optimizer_does_not_affect_a_new_one_over_the_same_parameters():
    model, old, plain_model = model_opt_and_plain()
    loss_of(model, 0).backward()
    old.scale_grads_()
    del old
    gc.collect()
    opt = PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.scale_grads_()
    model.zero_grad(set_to_none=False)  # zeroed in place: the next backward starts afresh
    loss_of(model, 2).backward()
    opt.step()
    loss_of(plain_model, 2).backward()
    scaled_by_hand(plain_model)
    torch.optim.SGD(plain_model.trained(), lr=0.1, momentum=0.9).step()
    assert_same_params(model, plain_model)
    assert hooks_on(model.parameters()) == 0  # only the new optimizer's mark was there, and its step ended it


@pytest.mark.parametrize(
    ("between", "raises"),
    [
        (lambda m: None, True),
        (lambda m: [setattr(p, "grad", p.grad.clamp(-0.01, 0.01)) for p in m.parameters()], True),  # clipped anew
        (lambda m: m.zero_grad(set_to_none=False), False),
        (lambda m: m.zero_grad(set_to_none=True), False),
    ],
    ids=["scaled", "scaled-then-edited", "zeroed", "set-to-none"],
)
def test_a_backward_onto_scaled_gradients_raises_and_onto_zeroed_ones_starts_afresh(between, raises):
    model, opt, plain_model = model_opt_and_plain()
    loss_of(model, 0).backward()
    opt.scale_grads_()
    between(model)
    if raises:
        with pytest.raises(RuntimeError, match="adding to gradients that scale_grads_\\(\\) already scaled"):
            loss_of(model, 1).backward()
        opt.zero_grad()  # the way out the message names
        loss_of(model, 1).backward()
    else:
        loss_of(model, 1).backward()
    opt.step()
    loss_of(plain_model, 1).backward()
    scaled_by_hand(plain_model)
    torch.optim.SGD(plain_model.trained(), lr=0.1, momentum=0.9).step()
    assert_same_params(model, plain_model)


def test_a_step_whose_inner_step_raises_keeps_its_gradients_marked():
    w = nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([w], lr=1.0)
    failures = [RuntimeError("transient")]

    def fail_once(optimizer, args, kwargs):
        if failures:
            raise failures.pop()

    inner.register_step_pre_hook(fail_once)
    opt = PDMPOptimizer(inner, {"a": [w]}, gammas={"a": 2.0})
    (w * torch.ones(2)).sum().backward()
    with pytest.raises(RuntimeError, match="transient"):
        opt.step()
    assert torch.equal(w.grad, torch.full((2,), 2.0))  # scaled once, and still marked:
    opt.scale_grads_()
    assert torch.equal(w.grad, torch.full((2,), 2.0))
    w.grad = w.grad.clamp(max=1.5)  # an out-of-place edit before the retry
    opt.step()
    assert torch.equal(w.detach(), torch.full((2,), -1.5))


def test_a_gradient_assigned_by_hand_after_scale_grads_counts_as_scaled_until_zero_grad():
    """The mark is per parameter, not per tensor (that is what makes out-of-place edits safe): a gradient put in
    place by hand between ``scale_grads_()`` and ``step()`` is taken for an edit of the scaled one."""
    w, opt = one_param_opt(gamma=2.0)
    w.grad = torch.ones(3)
    opt.scale_grads_()
    w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), -1.0))
    opt.zero_grad()  # or step(): either ends the mark
    w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), -3.0))
