"""Gradient clipping and gradient accumulation around a PDMPOptimizer, against plain-torch reference loops and the
reference twin (``pdmp_optim.reference.PDMPReference``)."""

from __future__ import annotations

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_fn, make_batches, pair, reference_scale_grads

from pdmp_optim import PDMPOptimizer

STEPS, MAX_NORM = 4, 0.05
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, **SGD)


def record_step_grad_norms(inner: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Record the total gradient norm the inner optimizer actually steps with."""
    seen: list[torch.Tensor] = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads))

    inner.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("order", ["scale-clip-step", "clip-step"])
def test_clipping_equals_the_reference_bit_for_bit(order):
    batches = make_batches(STEPS)
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS)
    seen = record_step_grad_norms(opt.optimizer)
    ref = TwoModal()
    ref_opt = sgd(ref.parameters())
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        if order == "scale-clip-step":
            opt.scale_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()

        ref_opt.zero_grad()
        loss_fn(ref, batch).backward()
        if order == "scale-clip-step":
            reference_scale_grads(ref)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
            reference_scale_grads(ref)
        ref_opt.step()
    assert_same_params(model, ref)
    assert len(seen) == STEPS
    if order == "scale-clip-step":
        # clipping after PDMP bounds the update the optimizer takes
        assert all(n <= MAX_NORM * (1 + 1e-5) for n in seen)
    else:
        # clipping first lets gamma_p (15) re-inflate the clipped gradient
        assert all(n > MAX_NORM for n in seen)


def test_scale_grads_is_not_repeated_by_step_and_is_forgotten_by_zero_grad():
    batches = make_batches(2)
    model, opt, ref, ref_opt = pair(torch.optim.SGD, SGD)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.scale_grads_()
        opt.scale_grads_()  # harmless
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref, batch).backward()
        ref_opt.step()
    assert_same_params(model, ref)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the gradients left behind were multiplied exactly once


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_accumulation_scales_once_per_step(k, set_to_none):
    micro = make_batches(STEPS * k, n=4)
    model, opt, ref, ref_opt = pair(torch.optim.SGD, SGD)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=set_to_none)
        ref_opt.zero_grad(set_to_none=set_to_none)
        for batch in micro[step * k : (step + 1) * k]:
            (loss_fn(model, batch) / k).backward()
            (loss_fn(ref, batch) / k).backward()
        opt.step()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
    assert_same_params(model, ref)


def test_accumulation_with_scale_clip_step():
    k = 2
    micro = make_batches(STEPS * k, n=4)
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS)
    ref = TwoModal()
    ref_opt = sgd(ref.parameters())
    for step in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        for batch in micro[step * k : (step + 1) * k]:
            (loss_fn(model, batch) / k).backward()
            (loss_fn(ref, batch) / k).backward()
        opt.scale_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        reference_scale_grads(ref)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
    assert_same_params(model, ref)


def test_scale_grads_before_the_last_micro_batch_is_refused_at_its_backward():
    """Accumulating onto gradients ``scale_grads_()`` scaled would leave them half scaled: the backward raises."""
    micro = make_batches(2, n=4)
    model = TwoModal()
    opt = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS)
    loss_fn(model, micro[0]).backward()
    opt.scale_grads_()
    with pytest.raises(RuntimeError, match=r"half scaled.*after the last backward"):
        loss_fn(model, micro[1]).backward()


def test_accumulation_in_lr_mode():
    k = 3
    micro = make_batches(STEPS * k, n=4)
    model, opt, ref, ref_opt = pair(torch.optim.AdamW, {"lr": 1e-2})
    assert opt.mode == "lr"
    for step in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        for batch in micro[step * k : (step + 1) * k]:
            (loss_fn(model, batch) / k).backward()
            (loss_fn(ref, batch) / k).backward()
        opt.step()
        ref_opt.step()
    assert_same_params(model, ref)
