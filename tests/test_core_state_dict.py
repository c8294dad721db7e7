"""Checkpoints: state_dict() holds the inner state plus the PDMP configuration as plain data, load_state_dict()
restores both (or refuses and changes nothing), and a resumed run continues bit-identically."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import TwoModal, assert_same_params, loss_of

from pdmp_optim import PDMPOptimizer

# these tests force mode="grad" on adaptive optimizers on purpose, to check the arithmetic
pytestmark = pytest.mark.filterwarnings("ignore:mode='grad' with:UserWarning")

SETUPS = {
    "sgd-grad": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4), "auto"),
    "adamw-lr": (lambda p: torch.optim.AdamW(p, lr=1e-2), "auto"),
    "adam-grad": (lambda p: torch.optim.Adam(p, lr=1e-2), "grad"),
}


def build(name: str, gamma_p: float = 15.0):
    factory, mode = SETUPS[name]
    model = TwoModal()
    opt = PDMPOptimizer(factory(model.parameters()), model.groups(), dominant="visual", gamma_p=gamma_p, mode=mode)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


def train(model, opt, sched, steps):
    for step in steps:
        loss_of(model, step).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def assert_same_state(got, want):
    """Two state dicts hold the same keys and values, tensors bit for bit (``str`` would round them)."""
    assert type(got) is type(want)
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


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(name):
    model, opt, sched = build(name)
    train(model, opt, sched, range(12))

    model_a, opt_a, sched_a = build(name)
    train(model_a, opt_a, sched_a, range(5))
    checkpoint = roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
    model_b, opt_b, sched_b = build(name)
    model_b.load_state_dict(checkpoint["model"])
    sched_b.load_state_dict(checkpoint["sched"])
    opt_b.load_state_dict(checkpoint["opt"])
    train(model_b, opt_b, sched_b, range(5, 12))

    assert_same_params(model, model_b)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_b.param_groups]


def test_state_dict_holds_the_pdmp_configuration_as_plain_data():
    _, opt, _ = build("adamw-lr")
    state = roundtrip(opt.state_dict())  # weights_only=True accepts it
    assert state["pdmp"] == {
        "format": 2,
        "mode": "lr",
        "gammas": {"audio": 1 / 15, "visual": 15.0},
        "modalities": {"audio": [0, 1, 2, 3], "visual": [4, 5]},
    }
    # in the layout of the optimizer the user built: lr mode's audio, visual and head groups merged back into one
    assert [g["params"] for g in state["param_groups"]] == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_loading_restores_the_gammas_the_checkpoint_was_saved_with():
    model, opt, sched = build("sgd-grad")
    opt.gammas = {"audio": 1.0, "visual": 3.0}  # e.g. a modulation window changed them mid-training
    train(model, opt, sched, range(2))
    _, target, _ = build("sgd-grad", gamma_p=10.0)
    target.load_state_dict(opt.state_dict())
    assert dict(target.gammas) == {"audio": 1.0, "visual": 3.0}


def test_a_checkpoint_in_an_unknown_format_fails_clearly_and_changes_nothing():
    model, opt, sched = build("sgd-grad")
    train(model, opt, sched, range(2))
    target_model, target, target_sched = build("sgd-grad", gamma_p=10.0)
    train(target_model, target, target_sched, range(1))
    before = copy.deepcopy(target.state_dict())
    state = opt.state_dict()
    state["pdmp"] = {**state["pdmp"], "format": 99}
    with pytest.raises(ValueError, match=r"'pdmp' entry has format 99; this pdmp-optim reads formats 1 and 2"):
        target.load_state_dict(state)
    assert_same_state(target.state_dict(), before)
    assert dict(target.gammas) == {"audio": 1 / 10, "visual": 10.0}


def test_checkpoint_with_other_modality_membership_fails():
    model = TwoModal()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), dominant="visual")
    swapped = TwoModal()
    target = PDMPOptimizer(
        torch.optim.SGD(swapped.parameters(), lr=0.1),
        {"visual": swapped.audio, "audio": swapped.visual},
        gammas={"audio": 1 / 15, "visual": 15.0},
    )
    with pytest.raises(ValueError, match=r"saved with parameters per modality \{'audio': \[0, 1, 2, 3\]"):
        target.load_state_dict(opt.state_dict())


def test_a_plain_checkpoint_with_the_same_params_loads_and_other_groups_are_refused():
    model = TwoModal()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_adam = torch.optim.Adam(model.parameters())
    loss_of(model, 0).backward()
    plain.step()
    plain_adam.step()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), dominant="audio")
    opt.load_state_dict(plain.state_dict())
    assert len(opt.state) == len(plain.state) == len(list(model.parameters()))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"]) for p in plain.state)
    assert dict(opt.gammas) == {"audio": 15.0, "visual": 1 / 15}  # a plain checkpoint keeps the current gammas
    # lr mode split the single group into audio, visual, head: the plain run's one-group checkpoint is split alike
    split = PDMPOptimizer(torch.optim.Adam(model.parameters()), model.groups(), dominant="audio", mode="lr")
    split.load_state_dict(plain_adam.state_dict())
    assert [g["params"] for g in split.param_groups] == [
        list(m.parameters()) for m in (model.audio, model.visual, model.head)
    ]
    assert all(torch.equal(split.state[p]["exp_avg"], plain_adam.state[p]["exp_avg"]) for p in plain_adam.state)
    other = torch.optim.Adam(
        [{"params": model.audio.parameters()}, {"params": [*model.visual.parameters(), *model.head.parameters()]}]
    )
    with pytest.raises(ValueError, match="checkpoint has 2 param groups, this optimizer has 3"):
        split.load_state_dict(other.state_dict())
