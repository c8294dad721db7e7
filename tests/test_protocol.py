"""``PDMPOptimizer`` is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the inner optimizer's own
objects: ``zero_grad``, step hooks (each fires once), closures, ``GradScaler``, LR schedulers (no warnings) and
``repr`` behave, and the inner optimizer's public attributes are reached through it (not its private ones)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of, pair
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pdmp_optim import PDMPOptimizer

MODES = ["grad", "lr", "update"]


def make(mode="auto", optimizer=None):
    model = TwoModal()
    inner = optimizer(model.trained()) if optimizer else torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9)
    return model, PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode=mode)


def plain_split(model, optimizer=torch.optim.SGD, **settings):
    """The plain optimizer over the layout PDMP gives ``model.trained()``: audio, visual, head."""
    return optimizer([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)], **settings)


# ------------------------------------------------------------------------------------------- the objects
def test_is_an_optimizer_sharing_the_inner_objects():
    model, opt = make()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    loss_of(model, 0).backward()
    opt.step()
    assert opt.state is opt.optimizer.state and set(opt.state) == set(model.trained())
    groups = [dict(g) for g in opt.param_groups]
    opt.param_groups = groups
    assert opt.optimizer.param_groups is groups


def test_zero_grad_both_ways():
    model, opt = make()
    loss_of(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.trained())
    opt.zero_grad()
    assert all(p.grad is None for p in model.trained())


@pytest.mark.parametrize(
    ("optimizer", "mode", "says"),
    [
        (None, "auto", "mode='grad' (auto: SGD's update is linear in the gradient, so gradients are scaled)"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), "auto", "mode='lr' (auto: Adam's update is proportional to lr"),
        (lambda p: torch.optim.Rprop(p, lr=1e-3), "auto", "mode='update' (auto: Rprop reads lr only as its initial"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), "update", "mode='update' (explicit)"),
    ],
    ids=["sgd", "adam", "rprop", "explicit"],
)
def test_repr_says_mode_reason_gammas_and_counts(optimizer, mode, says):
    _, opt = make(mode, optimizer)
    text = repr(opt)
    assert text.startswith("PDMPOptimizer(" + says)
    assert "audio: gamma=0.0666667, 4 tensors, 128 parameters" in text
    assert "visual: gamma=15, 2 tensors, 88 parameters" in text
    assert "unscaled (shared), 2 tensors, 51 parameters" in text
    assert f"  {type(opt.optimizer).__name__} (" in text  # the inner optimizer's own repr, indented


# --------------------------------------------------------------------------------------------- step hooks
@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_every_step_hook_fires_once_per_step(mode, closure):
    model, opt = make(mode)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("wrapper-pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("wrapper-post", o))),
        opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: calls.append(("inner-pre", o))),
        opt.optimizer.register_step_post_hook(lambda o, args, kwargs: calls.append(("inner-post", o))),
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global-pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global-post", o))),
    ]

    def loss():
        opt.zero_grad()
        value = loss_of(model, 0)
        value.backward()
        return value

    try:
        if closure:
            opt.step(loss)
        else:
            loss()
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    inner = opt.optimizer
    assert calls == [
        ("global-pre", opt),
        ("wrapper-pre", opt),
        ("inner-pre", inner),
        ("inner-post", inner),
        ("wrapper-post", opt),
        ("global-post", opt),
    ]
    opt.step()
    assert len(calls) == 6  # removed hooks stay removed


# ----------------------------------------------------------------------------------------------- closures
@pytest.mark.parametrize(
    ("optimizer", "settings", "mode"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "grad"), (torch.optim.Adam, {"lr": 1e-2}, "lr")],
    ids=["sgd-grad", "adam-lr"],
)
def test_a_closure_step_equals_the_reference_and_returns_its_loss(optimizer, settings, mode):
    model, opt, ref_model, ref = pair(optimizer, settings, gammas=GAMMAS, mode=mode)
    for step in range(3):

        def closure_of(m, o, step=step):
            def closure():
                o.zero_grad()
                loss = loss_of(m, step)
                loss.backward()
                return loss

            return closure

        returned = opt.step(closure_of(model, opt))
        expected = ref.step(closure_of(ref_model, ref))
        assert torch.equal(returned, expected)
    assert_same_params(model, ref_model)


class ExtraGradient(torch.optim.Optimizer):
    """The extragradient method: a look-ahead step, the gradient there, then the step from the start with it.

    A second optimizer architecture because torch has none that evaluates the closure more than once but LBFGS,
    which PDMP refuses.
    """

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        start = [p.clone() for p in params]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad)
        with torch.enable_grad():
            closure()
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0 - self.param_groups[0]["lr"] * p.grad)
        return loss


def test_grad_mode_scales_the_gradients_of_every_closure_evaluation():
    model, plain_model = TwoModal(), TwoModal()
    with pytest.warns(UserWarning, match="mode='grad' with ExtraGradient"):
        opt = PDMPOptimizer(ExtraGradient(model.trained(), lr=0.1), model.groups(), gammas=GAMMAS, mode="grad")
    plain = ExtraGradient(plain_model.trained(), lr=0.1)
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        evaluations.append(1)
        return loss

    def plain_closure():  # scaled by hand
        plain.zero_grad()
        loss = loss_of(plain_model, 0)
        loss.backward()
        with torch.no_grad():
            for modality, params in plain_model.modality_params().items():
                for p in params:
                    p.grad.mul_(GAMMAS[modality])
        return loss

    for _ in range(2):
        opt.step(closure)
        plain.step(plain_closure)
    assert len(evaluations) == 4
    assert_same_params(model, plain_model)


# --------------------------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_steps_the_wrapper_and_skips_on_inf(mode):
    model, opt, ref_model, ref = pair(
        torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}, mode=mode, gammas=GAMMAS
    )
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1) for _ in range(2)]
    for step in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        for m, o, scaler in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            scaler.scale(loss_of(m, step)).backward()
            if step in (0, 3):
                m.visual[0].weight.grad[0, 0] = float("inf")
            scaler.step(o)
            scaler.update()
            o.zero_grad(set_to_none=step % 2 == 0)
        moved = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert moved == (step not in (0, 3))
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-7)


def test_grad_scaler_does_not_see_the_fused_inner_optimizers_own_amp_support():
    """A fused inner optimizer unscales inside its kernel when ``GradScaler`` hands it the scale; PDMP must see
    unscaled gradients, so the wrapper does not forward ``_step_supports_amp_scaling``: the scaler unscales first."""
    model, opt, ref_model, ref = pair(torch.optim.Adam, {"lr": 1e-2, "fused": True}, gammas=GAMMAS)
    assert opt.optimizer._step_supports_amp_scaling and not hasattr(opt, "_step_supports_amp_scaling")
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0) for _ in range(2)]
    for step in range(3):
        for m, o, scaler in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            scaler.scale(loss_of(m, step)).backward()
            if step == 1:
                m.audio[0].weight.grad[0, 0] = float("nan")
            scaler.step(o)
            scaler.update()
            o.zero_grad()
    assert_same_params(model, ref_model)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 4.0  # one skip


# -------------------------------------------------------------------------- attributes of the inner optimizer
def test_public_attributes_of_the_inner_optimizer_are_reached_and_private_ones_are_not():
    schedulefree = pytest.importorskip("schedulefree")
    model = TwoModal()
    inner = schedulefree.SGDScheduleFree(model.trained(), lr=0.1)
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    opt.train()  # schedule-free's own method, reached through the wrapper
    assert all(g["train_mode"] for g in inner.param_groups)
    opt.eval()
    assert not any(g["train_mode"] for g in inner.param_groups)
    inner.custom_setting = 3
    assert opt.custom_setting == 3
    inner._private = 4
    for name in ("_private", "missing_attribute"):
        with pytest.raises(AttributeError, match=f"object has no attribute '{name}'"):
            getattr(opt, name)


# ------------------------------------------------------------------------------------------- LR schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=12),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda e: 1 / (1 + e)] * 3),  # one per group
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("mode", ["grad", "lr"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_attach_to_the_wrapper_without_warnings(name, mode):
    model, opt = make(mode)
    plain_model = TwoModal()
    plain = plain_split(plain_model, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        scheduler, plain_scheduler = SCHEDULERS[name](opt), SCHEDULERS[name](plain)
        for step in range(10):
            for m, o, s in ((model, opt, scheduler), (plain_model, plain, plain_scheduler)):
                loss_of(m, step).backward()
                o.step()
                o.zero_grad()
                s.step(1.0) if name == "ReduceLROnPlateau" else s.step()  # a flat metric: the lr keeps falling
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert opt.param_groups[0]["lr"] != 0.1  # the schedule really moved


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedulers_keep_sgd_lr_mode_on_grad_mode(tensor_lr):
    """OneCycleLR also cycles SGD's momentum, which lr mode keeps in its own units."""
    lr_scheduler = torch.optim.lr_scheduler
    schedulers = [
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=30),
        lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.ExponentialLR(o, 0.9)], [3]
        ),
    ]
    for make_scheduler in schedulers:
        models = {}
        for mode in ("grad", "lr"):
            model = TwoModal()
            lr = torch.tensor(0.05) if tensor_lr else 0.05
            sgd = torch.optim.SGD(model.trained(), lr=lr, momentum=0.9, weight_decay=1e-2)
            opt = PDMPOptimizer(sgd, model.groups(), gammas=GAMMAS, mode=mode)
            scheduler = make_scheduler(opt)
            for step in range(12):
                loss_of(model, step).backward()
                opt.step()
                opt.zero_grad()
                scheduler.step()
            models[mode] = model
        assert_same_params(models["grad"], models["lr"], rtol=1e-5, atol=1e-6)
