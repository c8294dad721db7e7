"""Hugging Face Accelerate: ``accelerator.prepare(model, opt)`` wraps the PDMPOptimizer in an
``AcceleratedOptimizer`` that still applies PDMP, with ``accelerator.clip_grad_norm_`` and
``accelerator.accumulate``, compared with plain-torch reference loops.
"""

from __future__ import annotations

import pytest

accelerate = pytest.importorskip(
    "accelerate", reason="needs the [accelerate] extra: pip install 'pdmp-optim[accelerate]'"
)

import torch  # noqa: E402
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_fn, make_batches, reference_scale_grads  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from pdmp_optim import PDMPOptimizer  # noqa: E402

STEPS, MAX_NORM = 4, 0.05


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; every test builds its own Accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def prepared(mode: str = "auto", **accelerator_kwargs):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_kwargs)
    model = TwoModal()
    pdmp = PDMPOptimizer(sgd(model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
    model, opt = accelerator.prepare(model, pdmp)
    return accelerator, model, opt, pdmp


def reference(order: str = "scale", micro: int = 1, steps: int = STEPS):
    model = TwoModal()
    opt = sgd(model.parameters())
    batches = make_batches(steps * micro, n=8 // micro)
    for step in range(steps):
        opt.zero_grad()
        for batch in batches[step * micro : (step + 1) * micro]:
            (loss_fn(model, batch) / micro).backward()
        if order == "clip-scale":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        reference_scale_grads(model)
        if order == "scale-clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
    return model


def test_prepare_wraps_pdmp_and_the_scaling_is_applied():
    accelerator, model, opt, pdmp = prepared()
    assert isinstance(opt, AcceleratedOptimizer)
    assert opt.optimizer is pdmp
    assert opt.param_groups is pdmp.param_groups
    for batch in make_batches(STEPS):
        opt.zero_grad()
        accelerator.backward(loss_fn(model, batch))
        opt.step()
    assert_same_params(accelerator.unwrap_model(model), reference())


@pytest.mark.parametrize("order", ["scale-clip", "clip-scale"])
def test_accelerator_clip_grad_norm(order):
    accelerator, model, opt, pdmp = prepared()
    for batch in make_batches(STEPS):
        opt.zero_grad()
        accelerator.backward(loss_fn(model, batch))
        if order == "scale-clip":
            pdmp.scale_grads_()  # call it on the PDMPOptimizer you built (AcceleratedOptimizer does not forward it)
        norm = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert norm > MAX_NORM  # clipping really happened
        opt.step()
    assert_same_params(accelerator.unwrap_model(model), reference(order))


def test_accumulate_scales_once_per_step():
    micro = 2
    accelerator, model, opt, _ = prepared(gradient_accumulation_steps=micro)
    for batch in make_batches(STEPS * micro, n=8 // micro):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            opt.step()
            opt.zero_grad()
    assert_same_params(accelerator.unwrap_model(model), reference(micro=micro))


def test_accumulate_in_sgd_lr_mode_the_zero_cost_twin_follows_grad_mode():
    micro = 2
    accelerator, model, opt, _ = prepared(mode="lr", gradient_accumulation_steps=micro)
    for batch in make_batches(STEPS * micro, n=8 // micro):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            opt.step()
            opt.zero_grad()
    want = reference(micro=micro)
    for p, q in zip(accelerator.unwrap_model(model).parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision():
    # on CPU Accelerate autocasts to bfloat16 (no GradScaler); the reference autocasts the same way
    accelerator, model, opt, _ = prepared(mixed_precision="bf16")
    assert accelerator.scaler is None
    for batch in make_batches(STEPS):
        opt.zero_grad()
        accelerator.backward(loss_fn(model, batch))
        opt.step()
    ref = TwoModal()
    ref_opt = sgd(ref.parameters())
    for batch in make_batches(STEPS):
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = ref(batch[0], batch[1])
        torch.nn.functional.cross_entropy(logits.float(), batch[2]).backward()
        reference_scale_grads(ref)
        ref_opt.step()
    assert_same_params(accelerator.unwrap_model(model), ref)
