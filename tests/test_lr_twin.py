"""``"lr"`` mode as the hyperparameter twin of ``"grad"`` mode: SGD with ``lr * gamma``, ``weight_decay / gamma`` and
momentum in ``1/gamma`` units takes grad mode's steps (to rounding), its state dicts are in standard units, and
decoupled weight decay (AdamW) is applied as the user set it."""

from __future__ import annotations

import copy
import pickle
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step, reference_lr_step

GAMMAS = {"audio": 1 / 15, "visual": 15.0}


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio, self.visual, self.head = nn.Linear(5, 6), nn.Linear(7, 6), nn.Linear(12, 3)

    def loss(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        x_a, x_v, y = (
            torch.randn(8, 5, generator=g),
            torch.randn(8, 7, generator=g),
            torch.randint(3, (8,), generator=g),
        )
        h = torch.cat([torch.tanh(self.audio(x_a)), torch.tanh(self.visual(x_v))], dim=1)
        return nn.functional.cross_entropy(self.head(h), y)

    def groups(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}

    def by_modality(self) -> dict[str, list[nn.Parameter]]:
        return {m: list(module.parameters()) for m, module in self.groups().items()}


def close(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def twin_runs(steps: int, gammas=GAMMAS, scheduler: bool = False, **sgd):
    """The lr-mode wrapper and the grad-mode reference (gradients pre-multiplied), stepped side by side."""
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), **sgd), model.groups(), gammas=gammas, mode="lr")
    plain = torch.optim.SGD(ref.parameters(), **sgd)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7) for o in (opt, plain)] if scheduler else []
    for step in range(steps):
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()
        ref.loss(step).backward()
        reference_grad_step(plain, ref.by_modality(), gammas)
        plain.zero_grad()
        for s in schedulers:
            s.step()
    return model, opt, ref, plain


def test_sgd_lr_mode_follows_grad_mode_over_a_thousand_steps():
    model, _, ref, _ = twin_runs(1000, lr=0.02, momentum=0.9, weight_decay=1e-2, nesterov=True)
    close(model, ref, rtol=1e-3, atol=1e-4)  # rounding differences, amplified over 1,000 steps at gamma 15
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True)), (
        "bit-identical would mean lr mode silently ran grad mode"
    )


@settings(max_examples=40)
@given(
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    maximize=st.booleans(),
    foreach=st.sampled_from([None, True, False]),
    scheduler=st.booleans(),
    gamma=st.sampled_from([1 / 15, 0.5, 4.0, 15.0]),
)
def test_sgd_lr_mode_equals_grad_mode_for_any_sgd_settings(
    momentum, dampening, nesterov, weight_decay, maximize, foreach, scheduler, gamma
):
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        nesterov = False  # torch refuses these combinations
    sgd = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
               maximize=maximize, foreach=foreach)  # fmt: skip
    model, opt, ref, plain = twin_runs(12, gammas={"audio": 1 / gamma, "visual": gamma}, scheduler=scheduler, **sgd)
    close(model, ref)
    standard = opt.state_dict()["state"]
    for index, entry in plain.state_dict()["state"].items():
        if entry.get("momentum_buffer") is not None:
            torch.testing.assert_close(
                standard[index]["momentum_buffer"], entry["momentum_buffer"], rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("direction", ["lr->grad", "grad->lr", "lr->plain", "plain->lr", "lr->lr (inner)"])
def test_checkpoints_move_between_lr_mode_grad_mode_and_plain_sgd(direction):
    """Train 4 steps one way, save, load into the other, train 4 more: the run follows the reference throughout."""
    source, target = direction.split(" ")[0].split("->")
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref, plain = Pair(), None
    plain = torch.optim.SGD(ref.parameters(), **sgd)

    def build(kind: str, model: Pair):
        inner = torch.optim.SGD(model.parameters(), **sgd)
        if kind == "plain":
            return inner
        return PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode=kind)

    model = Pair()
    opt = build(source, model)
    for step in range(8):
        if step == 4:
            saved = copy.deepcopy(opt.state_dict())
            opt = build(target, model)
            if direction.endswith("(inner)"):
                opt.optimizer.load_state_dict(saved)
            elif target == "lr" and source == "plain":
                opt.load_state_dict(saved)  # a plain SGD run's checkpoint, split into lr mode's groups
            else:
                opt.load_state_dict(saved)
        model.loss(step).backward()
        if isinstance(opt, PDMPOptimizer):
            opt.step()
        else:  # plain SGD continues the reference: it is given gradients multiplied by hand
            reference_grad_step(opt, model.by_modality(), GAMMAS)
        opt.zero_grad()
        ref.loss(step).backward()
        reference_grad_step(plain, ref.by_modality(), GAMMAS)
        plain.zero_grad()
    close(model, ref)


def test_changing_gammas_mid_training_keeps_lr_mode_on_grad_mode():
    model, ref = Pair(), Pair()
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), **sgd), model.groups(), gammas=GAMMAS, mode="lr")
    plain = torch.optim.SGD(ref.parameters(), **sgd)
    for step, gammas in enumerate(
        [GAMMAS] * 3 + [{"audio": 1.0, "visual": 1.0}] * 3 + [{"audio": 0.5, "visual": 4.0}] * 3
    ):
        opt.gammas = gammas
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()
        ref.loss(step).backward()
        reference_grad_step(plain, ref.by_modality(), gammas)
        plain.zero_grad()
    close(model, ref)


def test_copies_of_an_sgd_lr_mode_optimizer_keep_the_momentum_units():
    model, opt, ref, plain = twin_runs(3, lr=0.05, momentum=0.9, weight_decay=1e-2)
    for clone in (copy.deepcopy({"m": model, "o": opt}), pickle.loads(pickle.dumps({"m": model, "o": opt}))):
        twin_model = copy.deepcopy(ref)
        twin_plain = torch.optim.SGD(twin_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        twin_plain.load_state_dict(copy.deepcopy(plain.state_dict()))  # loading shares the tensors: copy them
        for step in range(3, 6):
            clone["m"].loss(step).backward()
            clone["o"].step()
            clone["o"].zero_grad()
            twin_model.loss(step).backward()
            reference_grad_step(twin_plain, twin_model.by_modality(), GAMMAS)
            twin_plain.zero_grad()
        close(clone["m"], twin_model)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
], ids=["AdamW", "Adam(decoupled_weight_decay)"])  # fmt: skip
def test_decoupled_weight_decay_is_applied_as_set_and_the_update_is_multiplied(make):
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(make(model.parameters()), model.groups(), gammas=GAMMAS)
    assert opt.mode == "lr"
    twin = make([{"params": list(m.parameters())} for m in (ref.audio, ref.visual, ref.head)])
    for step in range(5):
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()
        ref.loss(step).backward()
        reference_lr_step(twin, [1 / 15, 15.0, 1.0])
        twin.zero_grad()
    close(model, ref, rtol=0, atol=0)
    # a parameter without gradient is only decayed: exactly as the plain optimizer decays it, not 15 times more
    frozen = nn.Parameter(torch.ones(3))
    plain_frozen = nn.Parameter(torch.ones(3))
    wrapped = PDMPOptimizer(make([frozen, *Pair().visual.parameters()]), {"visual": [frozen]}, gammas={"visual": 15.0})
    plain_opt = make([plain_frozen])
    frozen.grad, plain_frozen.grad = torch.zeros(3), torch.zeros(3)
    wrapped.step()
    plain_opt.step()
    assert torch.equal(frozen, plain_frozen) and not torch.equal(frozen, torch.ones(3))


# ------------------------------------------------------------------------------------------ torch.compile
FAMILIES = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "SGD(momentum)": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("mode", ["lr", "grad"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_compiled_step_matches_eager_from_the_first_step(family, mode):
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = Pair()
        with pytest.warns(UserWarning) if mode == "grad" and family not in ("SGD", "SGD(momentum)") else _nothing():
            opt = PDMPOptimizer(FAMILIES[family](model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
        step = torch.compile(opt.step) if compiled else opt.step
        for t in range(3):
            model.loss(t).backward()
            step()
            opt.zero_grad()
        runs.append(model)
    close(runs[1], runs[0], rtol=1e-5, atol=2e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_grad_scaler_with_a_skipped_step_and_accumulation_in_sgd_lr_mode_follows_grad_mode():
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    runs = {}
    for mode in ("lr", "grad"):
        model = Pair()
        opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), **sgd), model.groups(), gammas=GAMMAS, mode=mode)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(5):
            for micro in range(2):  # gradient accumulation: scaled once per step, whatever the mode
                scaler.scale(model.loss(10 * step + micro) / 2).backward()
            if step == 2:
                model.visual.bias.grad[0] = float("inf")  # this step is skipped
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs[mode] = model
    close(runs["lr"], runs["grad"])
    assert any(not torch.equal(p, q) for p, q in zip(runs["lr"].parameters(), runs["grad"].parameters(), strict=True))
