"""Checkpoints and copies: ``state_dict()`` is the inner optimizer's own, its param groups mirror ``opt.param_groups``
(each with its ``"modality"`` and ``"pdmp_gamma"``), so ``torch.save``, torch's distributed checkpoint (DCP), copies and
plain optimizers carry PDMP's settings; a resumed run continues bit for bit. ``load_state_dict`` converts plain and
0.2.0 checkpoints and refuses anything else, naming the way out and changing nothing."""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of, reference_scale_grads, standard_state
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import PDMPReference


def sgd(params, **kw):
    return torch.optim.SGD(params, **{"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, **kw})


def adamw(params, **kw):
    return torch.optim.AdamW(params, **{"lr": 1e-2, **kw})


# name: (inner optimizer, mode); every mode, and auto's three picks
SETUPS = {
    "SGD-grad": (sgd, "auto"),
    "SGD-lr": (sgd, "lr"),
    "SGD-update": (sgd, "update"),
    "AdamW-lr": (adamw, "auto"),
    "Rprop-update": (lambda ps: torch.optim.Rprop(ps, lr=1e-2), "auto"),
}
OTHER = {"audio": 1.0, "visual": 2.0}  # gammas of an optimizer a checkpoint is loaded into


def interleaved(model: TwoModal) -> list[nn.Parameter]:
    """The model's parameters with audio, visual and head interleaved in one list (as a model whose encoders'
    layers alternate in ``model.parameters()`` gives them)."""
    a, v, h = list(model.audio.parameters()), list(model.visual.parameters()), list(model.head.parameters())
    return [a[0], v[0], a[1], h[0], a[2], v[1], a[3], h[1]]


def params_of(model: TwoModal, layout: str) -> list[nn.Parameter]:
    return interleaved(model) if layout == "interleaved" else model.trained()


def build(setup: str = "SGD-grad", gammas=GAMMAS, layout: str = "contiguous", seed: int = 0):
    factory, mode = SETUPS[setup]
    model = TwoModal(seed)
    return model, PDMPOptimizer(factory(params_of(model, layout)), model.groups(), gammas=gammas, mode=mode)


def train(model, opt, steps, scheduler=None) -> None:
    for step in steps:
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(got, want) -> None:
    """Two nested state dicts hold the same keys and values, tensors bit for bit."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_state(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same_state(a, b)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def snapshot(opt: PDMPOptimizer, model: TwoModal):
    """What a refused load must leave as it was: groups (params and settings), per-parameter state, gammas. (Take it
    after ``state_dict()``, which moves SGD lr mode's momentum to standard units.)"""
    groups = [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups]
    return groups, copy.deepcopy(standard_state(opt, model)), dict(opt.gammas)


def assert_unchanged(opt: PDMPOptimizer, model: TwoModal, before) -> None:
    groups, state, gammas = before
    assert len(opt.param_groups) == len(groups)
    for group, old in zip(opt.param_groups, groups, strict=True):
        assert group["params"] == old["params"]
        assert_same_state({**group, "params": None}, {**old, "params": None})
    assert_same_state(standard_state(opt, model), state)
    assert dict(opt.gammas) == gammas


# ------------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_state_dict_mirrors_the_param_groups_and_is_plain_data(setup, layout):
    model, opt = build(setup, layout=layout)
    train(model, opt, range(2))
    state = roundtrip(opt.state_dict())  # weights_only=True accepts it
    assert set(state) == {"state", "param_groups"}  # no "pdmp" entry: the configuration is in the groups
    assert len(state["param_groups"]) == len(opt.param_groups) == 3
    ids = iter(range(8))
    for saved, group in zip(state["param_groups"], opt.param_groups, strict=True):
        assert saved.keys() == group.keys()
        assert saved["params"] == [next(ids) for _ in group["params"]]
        assert saved.get("pdmp_momentum_scale", 1.0) == 1.0  # SGD lr mode saves its momentum in standard units
        skip = ("params", "pdmp_momentum_scale")
        assert {k: v for k, v in saved.items() if k not in skip} == {k: v for k, v in group.items() if k not in skip}
    assert [(g["modality"], g["pdmp_gamma"]) for g in state["param_groups"]] == [
        ("audio", GAMMAS["audio"]),
        ("visual", GAMMAS["visual"]),
        (None, 1.0),
    ]
    by_id = [(p, group.get("pdmp_momentum_scale", 1.0)) for group in opt.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        p, scale = by_id[index]
        live = dict(opt.state[p])
        if scale != 1.0:  # SGD lr mode: standard units, in float64 (the exact product, so a resume is exact)
            live["momentum_buffer"] = live["momentum_buffer"].double() * scale
        assert_same_state(entry, live)


def run(setup, steps, checkpoint=None, save_at=None):
    """A run with a scheduler, started afresh or from ``checkpoint`` (built with other gammas); returns the model and
    what it saved after ``save_at`` steps, through ``torch.save``."""
    model, opt = build(setup, gammas=GAMMAS if checkpoint is None else OTHER)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        scheduler.load_state_dict(checkpoint["sched"])
        assert dict(opt.gammas) == GAMMAS
    saved = None
    for step in steps:
        if step == save_at:
            saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()})
        train(model, opt, [step], scheduler)
    return model, opt, saved


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_resumed_run_continues_the_saving_run_bit_for_bit(setup):
    model, opt, saved = run(setup, range(8), save_at=4)
    model_b, opt_b, _ = run(setup, range(4, 8), saved)
    assert_same_params(model, model_b)
    assert_same_state(standard_state(opt_b, model_b), standard_state(opt, model))
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_saving_a_checkpoint_leaves_the_run_unchanged(setup):
    model, _, _ = run(setup, range(8))
    saving, _, _ = run(setup, range(8), save_at=4)
    assert_same_params(saving, model)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(setup):
    model, _, _ = run(setup, range(8))
    _, _, saved = run(setup, range(5), save_at=4)
    model_b, _, _ = run(setup, range(4, 8), saved)
    assert_same_params(model, model_b)


def test_loading_restores_the_gammas_the_checkpoint_was_saved_with():
    model, opt = build("SGD-grad")
    opt.gammas = {"audio": 1.0, "visual": 3.0}  # e.g. a modulation window changed them mid-training
    train(model, opt, range(2))
    _, target = build("SGD-grad", gammas=OTHER)
    target.load_state_dict(opt.state_dict())
    assert dict(target.gammas) == {"audio": 1.0, "visual": 3.0}
    assert [g["pdmp_gamma"] for g in target.param_groups] == [1.0, 3.0, 1.0]


def test_a_modulation_window_survives_a_checkpoint_and_follows_the_reference():
    """Modulate for 2 steps, pause for 2 (gammas 1), save mid-pause, resume in a new run built with the default
    coefficients, modulate again: the run equals the reference given each step's gammas."""
    pause = {"audio": 1.0, "visual": 1.0}
    window = [GAMMAS, GAMMAS, pause, pause, GAMMAS, GAMMAS]
    model, opt = build("SGD-grad")
    ref_model = TwoModal()
    ref = PDMPReference(sgd(ref_model.trained()), ref_model.groups(), gammas=GAMMAS)
    for step, gammas in enumerate(window):
        if step == 3:
            saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
            model, opt = build("SGD-grad", seed=1)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            assert dict(opt.gammas) == {"audio": 1.0, "visual": 1.0}
        opt.gammas = ref.gammas = gammas
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
    assert_same_params(model, ref_model)


# ---------------------------------------------------------------------------------- torch's own hooks
@pytest.mark.parametrize("setup", list(SETUPS))
def test_state_dict_keeps_every_state_entry_as_torch_does(setup):
    """torch's state-dict hook semantics (its ``test_state_dict_pre_hook``): an entry of ``state`` whose key is not a
    parameter is saved and loaded like the others (0.2 dropped them in lr mode)."""
    model, opt = build(setup)
    train(model, opt, range(1))
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    state = opt.state_dict()
    assert state["state"]["test"] == 1
    assert len(state["state"]) == 9
    _, target = build(setup)
    target.load_state_dict(state)
    assert target.state["test"] == 1


def test_state_dict_hooks_on_the_wrapper_fire_once_and_their_results_are_used():
    model, opt = build("SGD-lr")
    train(model, opt, range(1))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(("post", sorted(sd))) or {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load-pre", "extra" in sd)) or {
        k: v for k, v in sd.items() if k != "extra"})  # fmt: skip
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load-post", o)))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert seen == [("pre", opt), ("post", ["param_groups", "state"]), ("load-pre", True), ("load-post", opt)]


# ------------------------------------------------------------------------------------------------ DCP
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_distributed_checkpoint_resumes_bit_for_bit(setup, layout):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict on one process (no process group), into an
    optimizer built with other gammas: the gammas come back and the run continues bit for bit."""
    model, opt = build(setup, layout=layout)
    train(model, opt, range(3))
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    model_b, opt_b = build(setup, gammas=OTHER, layout=layout, seed=1)
    model_b.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model_b, opt_b, saved)
    assert dict(opt_b.gammas) == GAMMAS
    train(model, opt, range(3, 6))
    train(model_b, opt_b, range(3, 6))
    assert_same_params(model, model_b)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_distributed_checkpoint_of_adamw_over_one_group_resumes_and_names_each_moment_right(layout):
    """Issue 16, item 1: ``AdamW(model.parameters())`` in auto (lr) mode, its one group holding every parameter (and
    audio interleaved with visual in it): DCP saves each Adam moment under its own parameter's name, every group
    keeps its settings, and the run resumes bit for bit."""
    model = TwoModal()
    opt = PDMPOptimizer(torch.optim.AdamW(params_of(model, layout), lr=1e-2), model.groups(), dominant="visual")
    assert opt.mode == "lr"
    train(model, opt, range(3))
    saved = get_optimizer_state_dict(model, opt)
    named = dict(model.named_parameters())
    assert set(saved["state"]) == set(named)
    for name, entry in saved["state"].items():
        assert torch.equal(entry["exp_avg"], opt.state[named[name]]["exp_avg"]), name
        assert torch.equal(entry["exp_avg_sq"], opt.state[named[name]]["exp_avg_sq"]), name
    for saved_group, group in zip(saved["param_groups"], opt.param_groups, strict=True):
        assert [named[n] for n in saved_group["params"]] == group["params"]
        assert all(saved_group[k] == group[k] for k in ("lr", "betas", "eps", "weight_decay", "modality", "pdmp_gamma"))

    model_b = TwoModal(seed=1)
    model_b.load_state_dict(model.state_dict())
    opt_b = PDMPOptimizer(torch.optim.AdamW(params_of(model_b, layout), lr=1e-2), model_b.groups(), dominant="audio")
    set_optimizer_state_dict(model_b, opt_b, copy.deepcopy(saved))
    train(model, opt, range(3, 6))
    train(model_b, opt_b, range(3, 6))
    assert_same_params(model, model_b)


# --------------------------------------------------------------------------------- plain checkpoints
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("setup", ["SGD-grad", "AdamW-lr"])
def test_a_plain_checkpoint_loads_and_continues_like_the_reference(setup, layout):
    """A run without PDMP (one group: the layout the user built), resumed under PDMP, which split that group: the
    state lands on the right parameters, the current gammas stay, and the run continues like the reference (which
    does not split) resumed from the same checkpoint."""
    factory, mode = SETUPS[setup]
    model, ref_model = TwoModal(), TwoModal()
    plain = factory(params_of(model, layout))
    train(model, plain, range(2))
    ref_model.load_state_dict(model.state_dict())
    opt = PDMPOptimizer(factory(params_of(model, layout)), model.groups(), gammas=GAMMAS, mode=mode)
    ref = PDMPReference(factory(params_of(ref_model, layout)), ref_model.groups(), gammas=GAMMAS, mode=mode)
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    ref.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert dict(opt.gammas) == GAMMAS
    assert [g["modality"] for g in opt.param_groups] == ["audio", "visual", None]
    assert_same_state(standard_state(opt, model), standard_state(plain, model))
    for step in range(2, 5):
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
    assert_same_params(model, ref_model)
    assert_same_state(standard_state(opt, model), standard_state(ref, ref_model))


@settings(max_examples=25)
@given(order=st.permutations(range(20)), cuts=st.sets(st.integers(1, 19), max_size=3))
def test_any_interleaving_of_twenty_tensors_keeps_every_moment_on_its_parameter(order, cuts):
    """The 20 tensors of ``TwoModal(extras=6)`` (audio, visual and head) in any order, cut into up to 4 groups: PDMP
    splits each group per modality in order of first appearance, its own checkpoint, DCP's and a plain AdamW's of
    the user's layout keep every moment on its own parameter (AdamW's moments do not depend on lr or gamma)."""
    model = TwoModal(extras=6)
    modality = {p: m for m, ps in model.modality_params().items() for p in ps}
    params = [list(model.parameters())[i] for i in order]
    bounds = [0, *sorted(cuts), 20]
    chunks = [params[a:b] for a, b in itertools.pairwise(bounds)]

    def pdmp(gammas):
        return PDMPOptimizer(adamw([{"params": chunk} for chunk in chunks]), model.modality_params(), gammas=gammas)

    plain, opt = adamw([{"params": chunk} for chunk in chunks]), pdmp(GAMMAS)
    expected = [(m, [p for p in chunk if modality.get(p) == m]) for chunk in chunks
                for m in dict.fromkeys(modality.get(p) for p in chunk)]  # fmt: skip
    assert [(g["modality"], g["params"]) for g in opt.param_groups] == expected
    generator = torch.Generator().manual_seed(len(cuts))
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    plain.step()
    opt.step()

    def assert_moments(state) -> None:
        assert all(torch.equal(state[p]["exp_avg"], plain.state[p]["exp_avg"]) for p in params)

    assert_moments(opt.state)
    again = pdmp(OTHER)
    again.load_state_dict(opt.state_dict())
    assert_moments(again.state)
    named = dict(model.named_parameters())
    assert_moments({named[name]: entry for name, entry in get_optimizer_state_dict(model, opt)["state"].items()})
    from_plain = pdmp(OTHER)
    from_plain.load_state_dict(plain.state_dict())
    assert_moments(from_plain.state)


def test_a_plain_checkpoint_whose_first_group_holds_one_modality_loads():
    """The user's groups: the audio encoder's first layer (one modality, not split), then the rest (split)."""
    model = TwoModal()
    chunks = [model.trained()[:2], model.trained()[2:]]
    plain = adamw([{"params": chunk} for chunk in chunks])
    train(model, plain, range(1))
    opt = PDMPOptimizer(adamw([{"params": chunk} for chunk in chunks]), model.groups(), gammas=GAMMAS)
    opt.load_state_dict(plain.state_dict())
    assert all(torch.equal(opt.state[p]["exp_avg"], plain.state[p]["exp_avg"]) for p in model.trained())


def test_a_plain_checkpoint_in_the_split_layout_loads_too():
    model = TwoModal()
    plain = sgd([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)])
    train(model, plain, range(2))
    opt = PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS, mode="lr")
    opt.load_state_dict(plain.state_dict())
    assert [(g["modality"], g["pdmp_gamma"]) for g in opt.param_groups] == [
        ("audio", GAMMAS["audio"]),
        ("visual", GAMMAS["visual"]),
        (None, 1.0),
    ]
    for got, want in zip(standard_state(opt, model).values(), standard_state(plain, model).values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # (1/gamma units in lr mode: one rounding)


def test_a_plain_checkpoint_of_other_groups_is_refused_naming_the_way_out_and_changes_nothing():
    model, opt = build("AdamW-lr")
    train(model, opt, range(1))
    before = snapshot(opt, model)
    other = adamw([{"params": list(model.audio.parameters())}, {"params": [*model.visual.parameters(),
                  *model.head.parameters()]}])  # fmt: skip
    with pytest.raises(ValueError, match=r"2 param groups.*load it into the optimizer you wrapped \*before\*"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(opt, model, before)


def test_a_checkpoint_of_other_modalities_is_refused_and_changes_nothing():
    model, opt = build("SGD-grad")
    train(model, opt, range(1))
    swapped = TwoModal()
    target = PDMPOptimizer(sgd(swapped.trained()), {"visual": swapped.audio, "audio": swapped.visual}, gammas=OTHER)
    train(swapped, target, range(1))
    before = snapshot(target, swapped)
    with pytest.raises(ValueError, match="modality 'audio' where this optimizer has 'visual'; build PDMPOptimizer"):
        target.load_state_dict(opt.state_dict())
    assert_unchanged(target, swapped, before)


@pytest.mark.parametrize("entry", [{"format": 99, "gammas": {"audio": 1.0}}, {"gammas": {"audio": 1.0}}, "v2"])
def test_an_unknown_pdmp_entry_is_refused_naming_the_way_out_and_changes_nothing(entry):
    model, opt = build("SGD-lr")
    train(model, opt, range(2))
    checkpoint = {**opt.state_dict(), "pdmp": entry}
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match=r"not one pdmp-optim 0\.2\.0 wrote; .*opt\.optimizer\.load_state_dict"):
        opt.load_state_dict(checkpoint)
    assert_unchanged(opt, model, before)


@pytest.mark.parametrize("base", [sgd, adamw], ids=["SGD", "AdamW"])
def test_a_wrapped_lookahead_with_its_own_state_dict_layout_resumes_bit_for_bit(base):
    """pytorch_optimizer's Lookahead saves a layout of its own (no top-level param groups): it resumes as unwrapped."""
    po = pytest.importorskip("pytorch_optimizer")

    def build_lookahead(gammas):
        model = TwoModal()
        return model, PDMPOptimizer(po.Lookahead(base(model.trained()), k=3), model.groups(), gammas=gammas)

    model, opt = build_lookahead(GAMMAS)
    train(model, opt, range(4))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model_b, opt_b = build_lookahead(OTHER)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert dict(opt_b.gammas) == GAMMAS
    train(model, opt, range(4, 8))
    train(model_b, opt_b, range(4, 8))
    assert_same_params(model, model_b)


# ---------------------------------------------------------------------- into and out of plain optimizers
@pytest.mark.parametrize("direction", ["lr->grad", "grad->lr", "lr->plain", "plain->lr", "lr->lr (inner load)"])
def test_checkpoints_move_between_lr_mode_grad_mode_and_plain_sgd(direction):
    """Train 3 steps one way, save, load into the other, train 3 more: the run follows the reference (plain SGD on
    gradients multiplied by hand) throughout. A plain SGD takes a PDMP checkpoint when built with the split groups."""
    source, target = direction.split(" ")[0].split("->")
    ref_model, model = TwoModal(), TwoModal()
    ref = sgd(ref_model.trained())

    def build_for(kind):
        if kind == "plain":
            return sgd([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)])
        return PDMPOptimizer(sgd(model.trained()), model.groups(), gammas=GAMMAS, mode=kind)

    opt = build_for(source)
    for step in range(6):
        if step == 3:
            saved = roundtrip(opt.state_dict())
            opt = build_for(target)
            (opt.optimizer if direction.endswith("(inner load)") else opt).load_state_dict(saved)
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, step).backward()
            if isinstance(o, PDMPOptimizer):
                o.step()
            else:
                reference_scale_grads(m)
                o.step()
            o.zero_grad()
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-7)


def test_a_pdmp_checkpoint_needs_the_split_groups_in_a_plain_optimizer():
    model, opt = build("SGD-grad")
    train(model, opt, range(1))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        sgd(model.trained()).load_state_dict(opt.state_dict())  # the user's unsplit optimizer: torch refuses


def test_plain_sgd_loading_an_lr_mode_checkpoint_gets_standard_momentum_and_nothing_else():
    """Issue 16, item 5: the momentum a plain SGD loads from an lr-mode checkpoint is grad mode's (standard units),
    with no entries of PDMP's beside it, and it saves no more than it loaded."""
    model, opt = build("SGD-lr")
    grad_model, grad_opt = build("SGD-grad")
    train(model, opt, range(3))
    train(grad_model, grad_opt, range(3))
    plain = sgd([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)])
    plain.load_state_dict(opt.state_dict())
    assert all(set(entry) == {"momentum_buffer"} for entry in plain.state.values())
    want = standard_state(grad_opt, grad_model)
    for name, entry in standard_state(plain, model).items():
        torch.testing.assert_close(entry["momentum_buffer"], want[name]["momentum_buffer"], rtol=1e-5, atol=1e-7)
    assert all(set(entry) == {"momentum_buffer"} for entry in plain.state_dict()["state"].values())


# ------------------------------------------------------------------------------------ 0.2.0 checkpoints
V020 = torch.load(Path(__file__).parent / "data" / "v020_checkpoints.pt", weights_only=True)  # data/make_v020.py


@pytest.mark.parametrize("case", ["sgd-grad", "sgd-lr", "adamw-grad", "adamw-lr"])
def test_a_0_2_0_checkpoint_loads_with_its_gammas_and_continues_like_0_2_0(case):
    """Saved by pdmp-optim 0.2.0 after 2 steps with gammas audio 0.5, visual 3 (the unsplit layout, a ``"pdmp"``
    entry, SGD lr mode's ``"pdmp_momentum_buffer"`` entries): it loads into an optimizer built with other gammas,
    and 2 more steps give 0.2.0's parameters (to rounding in SGD lr mode, whose exact buffers 0.3 drops)."""
    saved = copy.deepcopy(V020[case])
    name, mode = case.split("-")
    factory = {"sgd": lambda ps: sgd(ps, lr=0.1, weight_decay=1e-2), "adamw": adamw}[name]
    model = TwoModal()
    model.load_state_dict(saved["model"])
    with pytest.warns(UserWarning, match="mode='grad' with AdamW") if case == "adamw-grad" else nullcontext():
        opt = PDMPOptimizer(factory(model.trained()), model.groups(), dominant="visual", mode=mode)
    opt.load_state_dict(saved["opt"])
    assert dict(opt.gammas) == {"audio": 0.5, "visual": 3.0}
    assert all("pdmp_momentum_buffer" not in entry for entry in opt.state.values())
    standard, names = standard_state(opt, model), {p: n for n, p in model.named_parameters()}
    for index, p in enumerate(model.trained()):  # 0.2.0 numbered them in the unsplit layout
        want = {k: v for k, v in saved["opt"]["state"][index].items() if k != "pdmp_momentum_buffer"}
        assert_same_state(standard[names[p]], want)
    train(model, opt, range(2, 4))
    after = TwoModal()
    after.load_state_dict(saved["after"])
    assert_same_params(model, after, **({"rtol": 1e-6, "atol": 1e-7} if case == "sgd-lr" else {}))


# -------------------------------------------------------------------------------------------- copies
def with_scheduler(setup):
    model, opt = build(setup)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, range(2), scheduler)
    return model, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("setup", ["SGD-grad", "SGD-lr", "AdamW-lr"])
def test_a_copy_of_the_wrapper_steps_only_itself_and_continues_the_run(setup, how):
    model, opt = with_scheduler(setup)
    both = {"model": model, "opt": opt}
    if how == "deepcopy":
        clone = copy.deepcopy(both)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(both))
    else:
        buffer = io.BytesIO()
        torch.save(both, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    before = copy.deepcopy(model.state_dict())
    train(clone["model"], clone["opt"], range(2, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original did not move
    assert dict(clone["opt"].gammas) == GAMMAS
    assert clone["opt"].param_groups[0]["params"][0] is next(clone["model"].audio.parameters())
    train(model, opt, range(2, 4))
    assert_same_params(model, clone["model"])


def test_copying_between_scale_grads_and_step_is_refused():
    model, opt = build("SGD-grad")
    loss_of(model, 0).backward()
    opt.scale_grads_()
    for clone in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        with pytest.raises(RuntimeError, match="between scale_grads_\\(\\) and step\\(\\); copy after step"):
            clone(opt)
    opt.step()
    copy.deepcopy(opt)


def test_a_shallow_copy_shares_the_inner_optimizer_and_leaves_the_originals_checkpoint_alone():
    model, opt = build("SGD-lr")
    train(model, opt, range(2))
    before = copy.deepcopy(opt.state_dict())
    shallow = copy.copy(opt)
    assert shallow.optimizer is opt.optimizer and shallow.param_groups is opt.param_groups
    assert_same_state(opt.state_dict(), before)


def test_a_shallow_copy_whose_gammas_change_keeps_the_momentum_consistent():
    """Issue 16, item 5: in SGD lr mode ``copy.copy(opt).gammas = ...`` changes the shared groups; each group's
    ``pdmp_momentum_scale`` follows the units its buffers are in, and the run goes on equal to grad mode's to
    rounding."""
    model, opt = build("SGD-lr")
    grad_model, grad_opt = build("SGD-grad")
    train(model, opt, range(3))
    train(grad_model, grad_opt, range(3))
    shallow = copy.copy(opt)
    shallow.gammas = grad_opt.gammas = {"audio": 2.0, "visual": 0.5}
    assert dict(opt.gammas) == {"audio": 2.0, "visual": 0.5}  # the same groups
    train(model, shallow, range(3, 5))
    train(model, opt, range(5, 7))
    train(grad_model, grad_opt, range(3, 7))
    assert_same_params(model, grad_model, rtol=1e-5, atol=1e-7)
    want = standard_state(grad_opt, grad_model)
    for name, entry in standard_state(opt, model).items():
        torch.testing.assert_close(entry["momentum_buffer"], want[name]["momentum_buffer"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- cost
def _interleaved_tensors(per_modality: int):
    """``per_modality`` one-element tensors per modality, audio and visual alternating in one group, stepped once."""
    audio = [nn.Parameter(torch.zeros(1)) for _ in range(per_modality)]
    visual = [nn.Parameter(torch.zeros(1)) for _ in range(per_modality)]
    params = [p for pair in zip(audio, visual, strict=True) for p in pair]
    opt = PDMPOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), {"audio": audio, "visual": visual},
                        gammas=GAMMAS)  # fmt: skip
    for p in params:
        p.grad = torch.ones(1)
    opt.step()  # the momentum buffers exist from here on
    return opt


def _cpu_seconds(call) -> float:
    """The CPU time of this thread for one call: other processes on the machine do not count."""
    start = time.thread_time()
    call()
    return time.thread_time() - start


def test_state_dict_and_step_cost_grows_linearly_with_the_tensors():
    """Issue 16, item 6 (0.2.0's state_dict() was quadratic in tensors per modality). A complexity check, not a speed
    one: four times the tensors may cost about four times as much, never sixteen (0.2.0: 14 to 17)."""
    small, large = _interleaved_tensors(5_000), _interleaved_tensors(20_000)
    for what in ("step", "state_dict"):
        least = [float("inf"), float("inf")]
        for _ in range(3):  # the least of three, measured alternately so that both see the same load
            least = [min(t, _cpu_seconds(getattr(opt, what))) for t, opt in zip(least, (small, large), strict=True)]
        ratio = least[1] / least[0]
        assert ratio < 8, f"{what}(): 4x the tensors cost {ratio:.1f}x the time"


def test_loading_leaves_the_callers_state_dict_as_it_was():
    """Attack finding: in SGD lr mode, load_state_dict converted the caller's momentum buffers in place."""
    model, opt = build("SGD-lr")
    train(model, opt, range(2))
    saved = roundtrip(opt.state_dict())
    before = copy.deepcopy(saved)
    build("SGD-lr")[1].load_state_dict(saved)
    assert_same_state(saved, before)


def test_a_malformed_checkpoint_is_refused_naming_the_problem():
    _, opt = build("AdamW-lr")
    with pytest.raises(ValueError, match="param_groups are not an optimizer's"):
        opt.load_state_dict({"state": {}, "param_groups": [{"lr": 0.1}]})
