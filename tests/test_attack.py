"""Adversarial review: paths where the coefficient could be applied zero or two times, state or checkpoints could
be corrupted, or the wrapper could fail where plain torch works.

Each test asserts the behaviour a user is promised (DESIGN.md, sections 2, 8 and 9): gamma exactly once per step or
a loud refusal, resumes bit-identical to an uninterrupted run, copies that leave the original alone, and wrapped
third-party optimizers that checkpoint as they do unwrapped. The last tests pin down combinations checked and found
right (GradScaler skips in every mode, schedulers in lr mode, sparse gradients)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from _helpers import TwoModal, assert_same_params, loss_of
from torch import nn

from pdmp_optim import PDMPOptimizer, scale_encoder_grads
from pdmp_optim.reference import reference_grad_step, reference_lr_step, reference_update_step

GAMMAS = {"audio": 1 / 15, "visual": 15.0}


def one_param_opt(gamma: float = 2.0, **sgd):
    w = nn.Parameter(torch.zeros(3))
    opt = PDMPOptimizer(torch.optim.SGD([w], lr=1.0, **sgd), {"a": [w]}, gammas={"a": gamma})
    return w, opt


# ------------------------------------------------- 1. changes between scale_grads_() and step() drop the mark
def _add_group(opt):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _add_group_on_inner(opt):
    opt.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _new_group_dicts(opt):
    opt.param_groups = [dict(g) for g in opt.param_groups]


def _unrelated_hook_set(opt):
    scale_encoder_grads({"x": nn.Linear(1, 1)}, {"x": 3.0}).remove()  # another model's hooks, come and gone


@pytest.mark.parametrize("change", [_add_group, _add_group_on_inner, _new_group_dicts, _unrelated_hook_set])
def test_a_change_between_scale_grads_and_step_does_not_scale_the_gradients_again(change):
    w, opt = one_param_opt(gamma=2.0)
    w.grad = torch.ones(3)
    opt.scale_grads_()
    try:
        change(opt)
        opt.step()
    except (RuntimeError, ValueError):
        return  # refusing loudly keeps the promise too
    assert torch.equal(w.detach(), torch.full((3,), -2.0)), f"gamma (2) applied {math.log2(-w[0].item()):g} times"


# ------------------------------------------- 2. hooks built from the optimizer: exactly once, whatever the timing
class Encoders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(3, 4)
        self.visual = nn.Linear(5, 4)
        self.head = nn.Linear(8, 2)

    def loss(self, audio=None, visual=None):
        g = torch.Generator().manual_seed(7)
        x_a, x_v = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g)
        a = self.audio(x_a) if audio is None else audio(x_a)
        v = self.visual(x_v) if visual is None else visual(x_v)
        return self.head(torch.cat([a, v], dim=1)).square().mean()

    def groups(self):
        return {"audio": self.audio, "visual": self.visual}


def grad_mode_twin():
    """One step of grad mode without hooks: what the hooks must reproduce (to rounding)."""
    model = Encoders()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    model.loss().backward()
    opt.step()
    return model


def assert_close_models(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_hooks_built_from_the_optimizer_scale_once_when_step_runs_after_the_with_block():
    """The with-block around backward, step after it: the pattern of backward.py's own docstring."""
    model = Encoders()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    with scale_encoder_grads(model.groups(), opt):
        model.loss().backward()
    opt.step()  # the hooks are gone, so the step scales the hooked gradients a second time
    assert_close_models(model, grad_mode_twin())


def test_hooks_that_never_fired_do_not_make_step_skip_their_modality():
    """timm-style ``encoder.forward_features(x)`` bypasses the module's forward hooks: nothing scales then."""

    class Encoder(nn.Linear):
        def forward_features(self, x):
            return super().forward(x)

    model = Encoders()
    model.audio, model.visual = Encoder(3, 4), Encoder(5, 4)
    torch.manual_seed(0)
    model.audio.load_state_dict(nn.Linear(3, 4).state_dict())
    model.visual.load_state_dict(nn.Linear(5, 4).state_dict())
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    hooks = scale_encoder_grads(model.groups(), opt)
    try:
        model.loss(audio=model.audio.forward_features, visual=model.visual.forward_features).backward()
        try:
            opt.step()
        except RuntimeError:
            return  # a loud refusal is fine
    finally:
        hooks.remove()
    assert_close_models(model, grad_mode_twin())


def test_hooks_from_a_mapping_removed_before_step_do_not_double_scale():
    """Inside the with-block step() refuses these hooks; after it, it silently scales a second time."""
    model = Encoders()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    try:
        with scale_encoder_grads(model.groups(), GAMMAS):  # refusing here, before any backward, is best
            model.loss().backward()
        opt.step()
    except RuntimeError:
        return
    assert_close_models(model, grad_mode_twin())


# ---------------------------------------------------------------------- 3. LBFGS in auto mode is not multiplied
def test_auto_mode_on_lbfgs_multiplies_the_update_or_says_it_cannot():
    """LBFGS is a quasi-Newton method: scaling every gradient by gamma scales its inverse-Hessian estimate by 1/gamma,
    so the step does not change. Auto picks grad mode for it all the same."""
    torch.manual_seed(0)
    a_ = torch.randn(6, 6)
    hessian, b = a_ @ a_.T + torch.eye(6), torch.randn(6)

    def run(gamma):
        a, v = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
        opt = torch.optim.LBFGS([a, v], lr=0.1, max_iter=1)
        if gamma is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    opt = PDMPOptimizer(opt, {"audio": [a], "visual": [v]}, gammas={"audio": gamma, "visual": gamma})
                except ValueError:
                    return None
            if caught:
                return None

        def closure():
            opt.zero_grad()
            x = torch.cat([a, v])
            loss = 0.5 * x @ hessian @ x - b @ x
            loss.backward()
            return loss

        moves = []
        for _ in range(5):
            before = torch.cat([a, v]).detach().clone()
            opt.step(closure)
            moves.append((torch.cat([a, v]).detach() - before).norm().item())
        return moves

    scaled = run(15.0)
    if scaled is None:
        return  # refused or warned: fine
    plain = run(None)
    ratios = [s / p for s, p in zip(scaled, plain, strict=True)]
    assert ratios[1:] == pytest.approx([15.0] * 4, rel=0.1), f"update ratios {ratios}, gamma 15"


# ------------------------------------------------------------------ 4. lr mode SGD resume is not bit-identical
def test_sgd_lr_mode_resumes_bit_identically():
    def build():
        model = TwoModal()
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, PDMPOptimizer(sgd, model.groups(), dominant="visual", mode="lr")

    def train(model, opt, steps):
        for step in steps:
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(10))
    model_a, opt_a = build()
    train(model_a, opt_a, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b, opt_b = build()
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):  # the state the run continues from
        assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
    train(model_b, opt_b, range(4, 10))
    assert_same_params(model, model_b)


# --------------------------------------------------------------- 5. a shallow copy corrupts the original's units
def test_a_shallow_copy_leaves_the_originals_checkpoints_alone():
    w = nn.Parameter(torch.ones(2))
    opt = PDMPOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9), {"a": [w]}, gammas={"a": 2.0}, mode="lr")
    w.grad = torch.ones(2)
    opt.step()
    before = opt.state_dict()["state"][0]["momentum_buffer"].clone()  # grad mode's buffer: 2 * grad
    copy.copy(opt)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], before)


# ------------------------------------------------ 6. third-party wrappers with their own state-dict layout
@pytest.mark.parametrize("kind", ["Lookahead(SGD)", "Lookahead(Adam)"])
def test_a_wrapped_pytorch_optimizer_lookahead_checkpoints_like_the_unwrapped_one(kind):
    po = pytest.importorskip("pytorch_optimizer")

    def build():
        model = TwoModal()
        base = (
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if kind == "Lookahead(SGD)"
            else torch.optim.Adam(model.parameters(), lr=1e-2)
        )
        return model, PDMPOptimizer(po.Lookahead(base, k=3), model.groups(), gammas=GAMMAS)

    def train(model, opt, steps):
        for step in steps:
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(8))
    model_a, opt_a = build()
    train(model_a, opt_a, range(4))
    saved = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b, opt_b = build()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    train(model_b, opt_b, range(4, 8))
    assert_same_params(model, model_b)


# ----------------------------------------------------------------- 7. grad mode after an exception in the step
def test_retrying_a_step_that_raised_scales_the_gradients_once():
    for wrapped in (False, True):
        w = nn.Parameter(torch.zeros(2))
        w.grad = torch.ones(2)
        inner = torch.optim.SGD([w], lr=1.0)
        fail = [True]

        def transient(optimizer, args, kwargs, fail=fail):
            if fail[0]:
                fail[0] = False
                raise RuntimeError("transient")

        inner.register_step_pre_hook(transient)
        opt = PDMPOptimizer(inner, {"a": [w]}, gammas={"a": 2.0}) if wrapped else inner
        with pytest.raises(RuntimeError, match="transient"):
            opt.step()
        opt.step()
        expected = -2.0 if wrapped else -1.0  # plain SGD: the retry takes the step the first try would have
        assert torch.equal(w.detach(), torch.full((2,), expected)), f"wrapped={wrapped}: {w.detach()}"


def test_scale_grads_scales_gradients_assigned_after_an_earlier_unstepped_scale_grads():
    """scale_grads_(), the step skipped by the user (e.g. a NaN check), the next gradient assigned (autograd.grad,
    a manual all-reduce): the old mark makes scale_grads_() and step() both skip the new gradient."""
    w, opt = one_param_opt(gamma=2.0)
    w.grad = torch.ones(3)
    opt.scale_grads_()
    w.grad = torch.ones(3)  # a fresh gradient, not via backward
    try:
        opt.scale_grads_()
        opt.step()
    except RuntimeError:
        return
    assert torch.equal(w.detach(), torch.full((3,), -2.0)), f"gamma (2) applied {math.log2(-w[0].item()):g} times"


# --------------------------------------------------------------------------- combinations checked and right
class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio, self.visual, self.head = nn.Linear(5, 6), nn.Linear(7, 6), nn.Linear(12, 3)

    def forward(self, step):
        g = torch.Generator().manual_seed(100 + step)
        x_a, x_v = torch.randn(8, 5, generator=g), torch.randn(8, 7, generator=g)
        y = torch.randint(3, (8,), generator=g)
        h = torch.cat([torch.relu(self.audio(x_a)), torch.relu(self.visual(x_v))], dim=1)
        return nn.functional.cross_entropy(self.head(h), y)

    def groups(self):
        return {"audio": self.audio, "visual": self.visual}

    def by_modality(self):
        return {m: list(mod.parameters()) for m, mod in self.groups().items()}


@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_grad_scaler_skips_in_every_mode_follow_the_reference(mode):
    model, ref = Pair(), Pair()
    make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2)  # noqa: E731
    opt = PDMPOptimizer(make(model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
    plain = make([{"params": list(m.parameters())} for m in (ref.audio, ref.visual, ref.head)])
    gammas_per_group = [GAMMAS["audio"], GAMMAS["visual"], 1.0]
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    for step in range(6):
        skip = step in (0, 3)
        scaler.scale(model(step)).backward()
        if skip:
            model.visual.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=step % 2 == 0)
        if not skip:
            ref(step).backward()
            if mode == "grad":
                reference_grad_step(plain, ref.by_modality(), GAMMAS)
            elif mode == "lr":
                reference_lr_step(plain, gammas_per_group)
            else:
                reference_update_step(plain, ref.by_modality(), GAMMAS)
            plain.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedulers_in_lr_mode_keep_sgd_on_grad_mode(tensor_lr):
    sched = torch.optim.lr_scheduler
    makers = [
        lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=30),  # also cycles SGD's momentum
        lambda o: sched.SequentialLR(o, [sched.LinearLR(o, 0.1, total_iters=3), sched.ExponentialLR(o, 0.9)], [3]),
    ]
    for make_sched in makers:
        models = {}
        for mode in ("grad", "lr"):
            model = Pair()
            lr = torch.tensor(0.05) if tensor_lr else 0.05
            sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-2)
            opt = PDMPOptimizer(sgd, model.groups(), gammas=GAMMAS, mode=mode)
            scheduler = make_sched(opt)
            for step in range(12):
                model(step).backward()
                opt.step()
                opt.zero_grad()
                scheduler.step()
            models[mode] = model
        for p, q in zip(models["grad"].parameters(), models["lr"].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_sparse_embedding_gradients_follow_the_reference(mode):
    torch.manual_seed(0)
    emb, ref_emb = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
    ref_emb.load_state_dict(emb.state_dict())
    opt = PDMPOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9), {"e": emb}, gammas={"e": 3.0},
                        mode=mode)  # fmt: skip
    plain = torch.optim.SGD(ref_emb.parameters(), lr=0.1, momentum=0.9)
    idx = torch.tensor([1, 2, 2, 5])
    for _ in range(3):
        emb(idx).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ref_emb(idx).square().sum().backward()
        if mode == "update":
            reference_update_step(plain, {"e": [ref_emb.weight]}, {"e": 3.0})
        else:  # lr mode is grad mode's twin for SGD
            reference_grad_step(plain, {"e": [ref_emb.weight]}, {"e": 3.0})
        plain.zero_grad()
    torch.testing.assert_close(emb.weight, ref_emb.weight, rtol=1e-5, atol=1e-6)
