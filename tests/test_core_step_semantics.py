"""Order with the rest of a training loop, and the cost of a step: scale_grads_() scales once per step (before
clipping, across accumulation, inside closures, LBFGS included), and step() does one foreach multiply per
(gamma, device, dtype) bucket with no host-device sync, or no tensor work at all in lr mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of, reference_scale_grads
from torch.utils._python_dispatch import TorchDispatchMode

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step, reference_lr_step

# these tests force mode="grad" on adaptive optimizers on purpose, to check the arithmetic
pytestmark = pytest.mark.filterwarnings("ignore:mode='grad' with:UserWarning")


def pair(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), mode="grad"):
    """A PDMP-wrapped model and an identical plain one with matching param groups."""
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(optimizer(model.parameters()), model.groups(), dominant="visual", mode=mode)
    plain = optimizer(
        [{"params": list(m.parameters())} for m in (plain_model.audio, plain_model.visual, plain_model.head)]
    )
    return model, opt, plain_model, plain, plain_model.modality_params()


def test_scale_grads_then_step_scales_once_and_twice_calling_is_harmless():
    model, opt, plain_model, plain, plain_groups = pair()
    for step in range(3):
        loss_of(model, step).backward()
        opt.scale_grads_()
        opt.scale_grads_()
        opt.step()
        opt.zero_grad()
        loss_of(plain_model, step).backward()
        reference_grad_step(plain, plain_groups, opt.gammas)
        plain.zero_grad()
    assert_same_params(model, plain_model)


def test_scale_grads_is_forgotten_when_the_gradients_are_replaced_behind_the_optimizers_back():
    # e.g. GradScaler skipped the step, and the loop zeroed grads with model.zero_grad() instead of opt.zero_grad()
    model, opt, plain_model, plain, plain_groups = pair()
    loss_of(model, 0).backward()
    opt.scale_grads_()
    model.zero_grad()
    loss_of(model, 1).backward()
    opt.step()
    loss_of(plain_model, 1).backward()
    reference_grad_step(plain, plain_groups, opt.gammas)
    assert_same_params(model, plain_model)


@pytest.mark.parametrize("mode", ["lr", "update"])
def test_scale_grads_refuses_where_the_coefficient_is_not_in_the_gradients(mode):
    model, opt, *_ = pair(lambda p: torch.optim.Adam(p, lr=1e-3), mode=mode)
    loss_of(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=rf"scale_grads_\(\) is for mode='grad'; in mode='{mode}'"):
        opt.scale_grads_()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_gradient_accumulation_is_scaled_once_per_step():
    model, opt, plain_model, plain, plain_groups = pair()
    for step in range(2):
        for micro in range(3):
            (loss_of(model, 10 * step + micro) / 3).backward()
            (loss_of(plain_model, 10 * step + micro) / 3).backward()
        opt.step()
        opt.zero_grad()
        reference_grad_step(plain, plain_groups, opt.gammas)
        plain.zero_grad()
    assert_same_params(model, plain_model)


@pytest.mark.parametrize(
    ("optimizer", "mode"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "grad"),
        (lambda p: torch.optim.Adam(p, lr=1e-2), "grad"),
        (lambda p: torch.optim.Adam(p, lr=1e-2), "lr"),
    ],
    ids=["sgd-grad", "adam-grad", "adam-lr"],
)
def test_closure_step_equals_the_reference_step(optimizer, mode):
    model, opt, plain_model, plain, plain_groups = pair(optimizer, mode)
    for step in range(3):

        def closure(step=step):
            opt.zero_grad()
            loss = loss_of(model, step)
            loss.backward()
            return loss

        returned = opt.step(closure)
        plain.zero_grad()
        loss = loss_of(plain_model, step)
        loss.backward()
        if mode == "grad":
            reference_grad_step(plain, plain_groups, GAMMAS)
        else:  # plain's groups are audio, visual, head: the split lr mode made of the single group
            reference_lr_step(plain, [GAMMAS["audio"], GAMMAS["visual"], 1.0])
        assert torch.equal(returned, loss)
    assert_same_params(model, plain_model)


def test_lbfgs_scales_the_gradient_of_every_closure_evaluation():
    model, reference_model = TwoModal(), TwoModal()
    with pytest.warns(UserWarning, match="no PDMP mode multiplies its update"):  # the arithmetic is still exact
        opt = PDMPOptimizer(
            torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model.groups(), dominant="visual", mode="grad"
        )
    reference = torch.optim.LBFGS(reference_model.parameters(), lr=0.5, max_iter=4)
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        evaluations.append(1)
        return loss

    def reference_closure():
        reference.zero_grad()
        loss = loss_of(reference_model, 0)
        loss.backward()
        reference_scale_grads(reference_model)
        return loss

    opt.step(closure)
    reference.step(reference_closure)
    assert len(evaluations) > 1  # LBFGS really re-evaluated
    assert_same_params(model, reference_model)


def test_lbfgs_line_search_is_refused_in_grad_mode():
    model = TwoModal()
    lbfgs = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    with pytest.raises(ValueError, match=r"use LBFGS\(line_search_fn=None\)"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        PDMPOptimizer(lbfgs, model.groups(), dominant="visual", mode="grad")


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_one_foreach_multiply_per_bucket_and_no_host_sync():
    model = TwoModal()
    model.head.double()
    # three modalities of mixed dtype: (gamma, dtype) buckets = audio/f32, visual/f32, visual-extra/f64
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = PDMPOptimizer(
        torch.optim.SGD([*model.parameters(), extra], lr=0.1),
        {"audio": model.audio, "visual": [*model.visual.parameters(), extra]},
        dominant="visual",
    )
    for p in (*model.parameters(), extra):
        p.grad = torch.ones_like(p)
    with CountOps() as ops:
        opt.scale_grads_()
    assert ops.calls.count("_foreach_mul_") == 3
    assert ops.calls == ["_foreach_mul_"] * 3  # nothing else: no .item(), no copies, no per-tensor ops
    with CountOps() as ops:
        opt.step()
    assert "_local_scalar_dense" not in ops.calls  # no host-device synchronisation in the whole step


def test_lr_mode_step_does_no_tensor_work_of_its_own():
    model = TwoModal()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.groups(), dominant="visual")
    plain_model = TwoModal()
    plain = torch.optim.Adam(
        [{"params": list(m.parameters())} for m in (plain_model.audio, plain_model.visual, plain_model.head)], lr=1e-3
    )
    for m in (model, plain_model):
        loss_of(m, 0).backward()
    with CountOps() as wrapped_ops:
        opt.step()
    with CountOps() as plain_ops:
        plain.step()

    def tensor_ops(calls):  # the wrapper's own step adds one profiler range, nothing else
        return [c for c in calls if not c.startswith("_record_function")]

    assert tensor_ops(wrapped_ops.calls) == tensor_ops(plain_ops.calls)


def test_a_closure_that_calls_scale_grads_itself_is_not_scaled_twice():
    # Lightning runs on_before_optimizer_step and gradient clipping inside the closure it passes to step()
    model, opt, plain_model, plain, _ = pair()

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        opt.scale_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        return loss

    opt.step(closure)
    loss_of(plain_model, 0).backward()
    reference_scale_grads(plain_model)
    torch.nn.utils.clip_grad_norm_(plain_model.parameters(), max_norm=0.5)
    plain.step()
    assert_same_params(model, plain_model)
