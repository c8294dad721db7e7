"""One step equals the inner optimizer's step on gamma-multiplied gradients, bit for bit on CPU, for any shapes,
any gamma > 0, any param-group layout, parameters with ``grad is None`` skipped; in lr mode it equals
``reference_lr_step`` (each modality's lr multiplied) on param groups split into one group per modality."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of
from hypothesis import given
from hypothesis import strategies as st

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step, reference_lr_step

# these tests force mode="grad" on adaptive optimizers on purpose, to check the arithmetic
pytestmark = pytest.mark.filterwarnings("ignore:mode='grad' with:UserWarning")

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
gammas = st.floats(min_value=0.0, max_value=1e3, exclude_min=True, allow_subnormal=False)
# lr mode divides SGD's weight decay by gamma, and SGD hands weight_decay / gamma to a float32 multiply: a gamma
# below ~1e-36 overflows it (grad mode has no such limit)
lr_gammas = st.floats(min_value=1e-20, max_value=1e3, allow_subnormal=False)

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


LAYOUTS = ["one-group", "two-mixed-groups", "group-per-param", "per-modality"]


@st.composite
def problems(draw, gammas=gammas):
    """Modalities with random parameter shapes, shared parameters, gammas and a param-group layout.

    ``order`` shuffles the parameters within the mixed layouts, so modalities interleave in a group.
    """
    n_modalities = draw(st.integers(1, 3))
    modalities = {f"m{i}": [torch.nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(1, 3)))]
                  for i in range(n_modalities)}  # fmt: skip
    shared = [torch.nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(0, 2)))]
    coefficients = {name: draw(gammas) for name in modalities}
    everything = [p for ps in modalities.values() for p in ps] + shared
    layout = draw(st.sampled_from(LAYOUTS))
    order = draw(st.permutations(range(len(everything))))
    cut = draw(st.integers(1, max(1, len(everything) - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    none_mask = draw(st.lists(st.booleans(), min_size=len(everything), max_size=len(everything)))
    return modalities, shared, coefficients, everything, (layout, order, cut), seed, none_mask


def param_groups(layout, modalities, shared, everything):
    layout, order, cut = layout
    shuffled = [everything[i] for i in order]
    if layout == "one-group":
        return [{"params": shuffled}]
    if layout == "two-mixed-groups":
        groups = [{"params": shuffled[:cut], "lr": 0.02}, {"params": shuffled[cut:], "lr": 0.03}]
        return [g for g in groups if g["params"]]
    if layout == "group-per-param":
        return [{"params": [p], "lr": 0.01 * (1 + i % 3)} for i, p in enumerate(everything)]
    groups = [{"params": ps} for ps in modalities.values()]
    return groups + ([{"params": shared}] if shared else [])


def split_per_modality(groups, modality_of):
    """What lr mode does to the param groups, written out: each group cut into one group per modality (in order of
    first appearance, the group's own settings kept), and the modality of each resulting group (None: shared)."""
    split, group_modalities = [], []
    for group in groups:
        parts: dict = {}
        for p in group["params"]:
            parts.setdefault(modality_of.get(p), []).append(p)
        for modality, params in parts.items():
            split.append({**group, "params": params})
            group_modalities.append(modality)
    return split, group_modalities


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


@given(problem=problems(gammas=lr_gammas), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_lr_mode_step_equals_reference_with_scaled_lr_on_split_groups(problem, name):
    modalities, shared, coefficients, everything, layout, seed, none_mask = problem
    ref_modalities, ref_shared, memo = clone_problem(modalities, shared)
    ref_everything = [memo[id(p)] for p in everything]
    fast = PDMPOptimizer(
        OPTIMIZERS[name](param_groups(layout, modalities, shared, everything)),
        modalities,
        gammas=coefficients,
        mode="lr",
    )
    # the reference: a plain optimizer over the same layout, split per modality by hand
    ref_modality_of = {p: m for m, ps in ref_modalities.items() for p in ps}
    ref_groups, group_modalities = split_per_modality(
        param_groups(layout, ref_modalities, ref_shared, ref_everything), ref_modality_of
    )
    slow = OPTIMIZERS[name](ref_groups)
    group_gammas = [1.0 if m is None else coefficients[m] for m in group_modalities]
    # the wrapper split the groups exactly so (ids: the reference's clones stand for the wrapper's parameters)
    assert [[id(memo[id(p)]) for p in g["params"]] for g in fast.param_groups] == [
        [id(q) for q in g["params"]] for g in slow.param_groups
    ]
    assert [g["lr"] for g in fast.param_groups] == [g["lr"] for g in slow.param_groups]
    lrs_before = [g["lr"] for g in fast.param_groups]
    for step in range(4):  # several steps, so momentum buffers and Adam moments carry the scaled updates
        set_grads(everything, seed, none_mask, step)
        set_grads(ref_everything, seed, none_mask, step)
        fast.step()
        reference_lr_step(slow, group_gammas)
        for p, q in zip(everything, ref_everything, strict=True):
            assert torch.equal(p, q)
            assert fast.state[p].keys() == slow.state[q].keys()
            for key, value in fast.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(slow.state[q][key])), key
        assert [g["lr"] for g in fast.param_groups] == lrs_before  # restored exactly
        for p, q in zip(everything, ref_everything, strict=True):  # gradients are left alone in lr mode
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


STATEFUL = {  # momentum buffers, Adam moments, running averages; no weight decay
    "sgd-nesterov-foreach": OPTIMIZERS["sgd-nesterov-foreach"],
    "sgd-momentum-loop": OPTIMIZERS["sgd-momentum-loop"],
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "rmsprop": OPTIMIZERS["rmsprop"],
    "adagrad": OPTIMIZERS["adagrad"],
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_lr_mode_on_one_group_of_audio_visual_and_head_equals_the_reference_on_the_same_split(name):
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(STATEFUL[name](model.parameters()), model.groups(), gammas=GAMMAS, mode="lr")
    assert [g["params"] for g in opt.param_groups] == [
        list(m.parameters()) for m in (model.audio, model.visual, model.head)
    ]
    plain = STATEFUL[name](
        [{"params": list(m.parameters())} for m in (plain_model.audio, plain_model.visual, plain_model.head)]
    )
    for step in range(5):
        loss_of(model, step).backward()
        loss_of(plain_model, step).backward()
        opt.step()
        reference_lr_step(plain, [GAMMAS["audio"], GAMMAS["visual"], 1.0])
        opt.zero_grad()
        plain.zero_grad()
        assert_same_params(model, plain_model)
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert opt.state[p].keys() == plain.state[q].keys() != set()
        assert all(torch.equal(opt.state[p][key], plain.state[q][key]) for key in plain.state[q])


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
