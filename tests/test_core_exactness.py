"""Promise 1: one PDMP step equals the inner optimizer's step on gamma-multiplied gradients, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step, reference_lr_step

# these tests force mode="grad" on adaptive optimizers on purpose, to check the arithmetic
pytestmark = pytest.mark.filterwarnings("ignore:mode='grad' with:UserWarning")

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
gammas = st.floats(min_value=0.0, max_value=1e3, exclude_min=True, allow_subnormal=False)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd-momentum-loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1, foreach=False),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


@st.composite
def problems(draw):
    """Modalities with random parameter shapes, shared parameters, gammas and a param-group layout."""
    n_modalities = draw(st.integers(1, 3))
    modalities = {f"m{i}": [torch.nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(1, 3)))]
                  for i in range(n_modalities)}  # fmt: skip
    shared = [torch.nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(0, 2)))]
    coefficients = {name: draw(gammas) for name in modalities}
    everything = [p for ps in modalities.values() for p in ps] + shared
    layout = draw(st.sampled_from(["one-group", "group-per-param", "per-modality"]))
    seed = draw(st.integers(0, 2**31 - 1))
    none_mask = draw(st.lists(st.booleans(), min_size=len(everything), max_size=len(everything)))
    return modalities, shared, coefficients, everything, layout, seed, none_mask


def param_groups(layout, modalities, shared, everything, lr_of=None):
    if layout == "one-group":
        return [{"params": everything}]
    if layout == "group-per-param":
        return [{"params": [p], "lr": 0.01 * (1 + i % 3)} for i, p in enumerate(everything)]
    groups = [{"params": ps} for ps in modalities.values()]
    return groups + ([{"params": shared}] if shared else [])


def clone_problem(modalities, shared):
    memo: dict = {}
    return copy.deepcopy(modalities, memo), copy.deepcopy(shared, memo), memo


def set_grads(params, seed, none_mask, step):
    generator = torch.Generator().manual_seed(seed + step)
    for p, is_none in zip(params, none_mask, strict=True):
        p.grad = None if (is_none and step == 0) else torch.randn(p.shape, generator=generator)


@given(problem=problems(), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_grad_mode_step_equals_reference_bit_for_bit(problem, name):
    modalities, shared, coefficients, everything, layout, seed, none_mask = problem
    ref_modalities, ref_shared, memo = clone_problem(modalities, shared)
    ref_everything = [memo[id(p)] for p in everything]

    fast = PDMPOptimizer(
        OPTIMIZERS[name](param_groups(layout, modalities, shared, everything)),
        modalities,
        gammas=coefficients,
        mode="grad",
    )
    slow = OPTIMIZERS[name](param_groups(layout, ref_modalities, ref_shared, ref_everything))
    for step in range(3):  # several steps so momentum / second-moment state matters
        set_grads(everything, seed, none_mask, step)
        set_grads(ref_everything, seed, none_mask, step)
        fast.step()
        reference_grad_step(slow, ref_modalities, coefficients)
        for p, q in zip(everything, ref_everything, strict=True):
            assert torch.equal(p, q)
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad)  # the gradients themselves were scaled exactly once


@given(problem=problems(), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_lr_mode_step_equals_reference_with_scaled_lr(problem, name):
    modalities, shared, coefficients, everything, _, seed, none_mask = problem
    ref_modalities, ref_shared, memo = clone_problem(modalities, shared)
    ref_everything = [memo[id(p)] for p in everything]
    # per-modality groups, so the reference can scale one lr per group
    fast = PDMPOptimizer(
        OPTIMIZERS[name](param_groups("per-modality", modalities, shared, everything)),
        modalities,
        gammas=coefficients,
        mode="lr",
    )
    slow = OPTIMIZERS[name](param_groups("per-modality", ref_modalities, ref_shared, ref_everything))
    group_gammas = [coefficients[m] for m in modalities] + ([1.0] if shared else [])
    lrs_before = [g["lr"] for g in fast.param_groups]
    for step in range(3):
        set_grads(everything, seed, none_mask, step)
        set_grads(ref_everything, seed, none_mask, step)
        fast.step()
        reference_lr_step(slow, group_gammas)
        for p, q in zip(everything, ref_everything, strict=True):
            assert torch.equal(p, q)
        assert [g["lr"] for g in fast.param_groups] == lrs_before  # restored exactly
        for p, q in zip(everything, ref_everything, strict=True):  # gradients are left alone in lr mode
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    gamma=gammas,
    shape=shapes,
)
def test_any_dtype_is_scaled_like_a_plain_multiply(dtype, gamma, shape):
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    grad = torch.randn(shape).to(dtype)
    p.grad = grad.clone()
    opt = PDMPOptimizer(torch.optim.SGD([p], lr=0.0), {"m": [p]}, gammas={"m": gamma})
    opt.scale_grads_()
    assert torch.equal(p.grad, grad * gamma)
