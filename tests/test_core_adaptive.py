"""Adaptive optimizers (Adam and kin) normalise a gradient scale away, so auto mode scales their update instead
(lr mode, or update mode where lr does not scale the update), forcing grad mode warns, and lr mode leaves every
lr exactly as the scheduler set it."""

from __future__ import annotations

import pytest
import torch
from _helpers import TwoModal, loss_of

from pdmp_optim import PDMPOptimizer
from pdmp_optim.modes import is_scale_invariant, resolve_mode

ADAPTIVE = ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "Adafactor"]


def first_updates(optimizer_cls, mode):
    """Per-modality size of the first update, with and without PDMP, from identical models and data."""
    sizes = {}
    for wrapped in (False, True):
        model = TwoModal()
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in model.named_children()}
        opt = optimizer_cls(model.parameters(), lr=1e-3)
        if wrapped:
            opt = PDMPOptimizer(opt, model.groups(), dominant="visual", optimization_dominant="audio", mode=mode)
        loss_of(model, 0).backward()
        opt.step()
        sizes[wrapped] = {
            name: sum((p - b).abs().sum() for p, b in zip(m.parameters(), before[name], strict=True)).item()
            for name, m in model.named_children()
        }
    return {name: sizes[True][name] / sizes[False][name] for name in sizes[True]}


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"])
def test_default_mode_scales_the_update_of_adaptive_optimizers(name):
    ratios = first_updates(getattr(torch.optim, name), "auto")
    assert ratios["visual"] == pytest.approx(15.0, rel=1e-3)
    assert ratios["audio"] == pytest.approx(1 / 15, rel=1e-3)
    assert ratios["head"] == pytest.approx(1.0, rel=1e-6)


def test_grad_mode_on_adam_is_the_trap_auto_mode_avoids_and_forcing_it_warns():
    with pytest.warns(UserWarning, match="mode='grad' with Adam: it normalises the gradient scale away"):
        ratios = first_updates(torch.optim.Adam, "grad")
    assert ratios["visual"] == pytest.approx(1.0, rel=1e-2)  # gradient scaling cancels in Adam's first step


@pytest.mark.parametrize("name", ADAPTIVE)
def test_auto_picks_lr_mode_for_every_adaptive_torch_optimizer(name):
    cls = getattr(torch.optim, name)
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = cls([param], lr=0.01) if name != "Adadelta" else cls([param])
    assert is_scale_invariant(opt)
    # Rprop reads lr only when its state is created and Adafactor caps it: scaling lr would not scale their update
    expected = "update" if name in ("Rprop", "Adafactor") else "lr"
    assert resolve_mode(opt, "auto")[0] == expected
    assert PDMPOptimizer(opt, {"m": [param]}, dominant="m").mode == expected


@pytest.mark.parametrize("name", ["SGD", "ASGD"])
def test_auto_keeps_grad_mode_for_optimizers_that_follow_the_gradient_scale(name):
    param = torch.nn.Parameter(torch.zeros(2))
    assert resolve_mode(getattr(torch.optim, name)([param], lr=0.1), "auto")[0] == "grad"


def test_auto_refuses_lbfgs_whose_update_no_mode_multiplies_and_an_explicit_mode_warns():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="no PDMP mode multiplies its update"):
        resolve_mode(torch.optim.LBFGS([param]), "auto")
    for mode in ("grad", "update"):
        with pytest.warns(UserWarning, match="no PDMP mode multiplies its update"):
            assert resolve_mode(torch.optim.LBFGS([param]), mode)[0] == mode


def test_unknown_classes_get_update_mode_whatever_their_name():
    class PolarSGD(torch.optim.SGD):  # contains "lars"; 0.1 picked lr mode from that substring
        pass

    class Lion(torch.optim.SGD):  # a third-party-looking name
        pass

    for cls in (PolarSGD, Lion):
        assert resolve_mode(cls([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "auto")[0] == "update"


def test_ten_thousand_scheduled_steps_leave_the_lrs_exactly_as_the_scheduler_set_them():
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    plain_params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]

    def adam(ps):
        return torch.optim.Adam([{"params": [p]} for p in ps], lr=3e-3)

    opt = PDMPOptimizer(adam(params), {"a": [params[0]], "v": [params[1]]}, dominant="v")
    plain = adam(plain_params)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10_000)
    plain_sched = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=1e-2, total_steps=10_000)
    for step in range(10_000):
        for p in (*params, *plain_params):
            p.grad = torch.full((2,), (-1.0) ** step)
        opt.step()
        plain.step()
        if step < 9_999:  # OneCycleLR refuses to step past total_steps
            sched.step()
            plain_sched.step()
        if step % 997 == 0:
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert sched.get_last_lr() == plain_sched.get_last_lr()


def test_tensor_learning_rates_are_restored_as_the_same_object():
    param = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.01)
    opt = PDMPOptimizer(torch.optim.Adam([param], lr=lr), {"m": [param]}, dominant="m")
    param.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)
    assert param.detach()[0].item() == pytest.approx(1 - 0.15, rel=1e-4)  # Adam's first step is lr * gamma
