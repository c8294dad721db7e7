"""Promise 2 (checkpoints): state_dict round-trips as plain data and a resumed run continues bit-identically."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _core_models import TwoModal, loss_of, params_equal

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

    assert params_equal(model, model_b)
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
    assert [g["params"] for g in state["param_groups"]] == [[0, 1, 2, 3], [4, 5], [6, 7]]


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
    assert str(target.state_dict()) == str(before)


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


def test_a_plain_checkpoint_with_matching_groups_loads():
    model = TwoModal()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_of(model, 0).backward()
    plain.step()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), dominant="audio")
    opt.load_state_dict(plain.state_dict())
    assert all(torch.equal(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"]) for p in plain.state)
    split = PDMPOptimizer(torch.optim.Adam(model.parameters()), model.groups(), dominant="audio", mode="lr")
    with pytest.raises(ValueError, match="checkpoint has 1 param groups, this optimizer has 3"):
        split.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
