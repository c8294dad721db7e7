"""The seams of the Optimizer protocol: every way state enters or leaves the wrapper applies gamma exactly once,
or is refused loudly. One test (or a few) per defect that 0.1.0 had there; each failed on 0.1.0."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import reference_grad_step, reference_lr_step, reference_update_step

GAMMAS = {"audio": 1 / 15, "visual": 15.0}


class Pair(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Linear(5, 6)
        self.visual = nn.Linear(7, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        dtype = self.audio.weight.dtype
        x_a, x_v = torch.randn(8, 5, generator=g).to(dtype), torch.randn(8, 7, generator=g).to(dtype)
        y = torch.randint(3, (8,), generator=g)
        h = torch.cat([torch.relu(self.audio(x_a)), torch.relu(self.visual(x_v))], dim=1)
        return nn.functional.cross_entropy(self.head(h).float(), y)

    def groups(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}

    def by_modality(self) -> dict[str, list[nn.Parameter]]:
        return {m: list(mod.parameters()) for m, mod in self.groups().items()}


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max |diff| {(p - q).abs().max().item():.3g}"


def per_group(opt: torch.optim.Optimizer, model: Pair, gammas: dict[str, float]) -> list[float]:
    """The gamma of each (single-modality) param group, for reference_lr_step."""
    owner = {p: m for m, ps in model.by_modality().items() for p in ps}
    return [gammas.get(owner.get(g["params"][0]), 1.0) for g in opt.param_groups]


def adam_pair(**kwargs):
    """A PDMP Adam in lr mode and its reference twin (a plain Adam with the same split groups)."""
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2, **kwargs), model.groups(), gammas=GAMMAS)
    assert opt.mode == "lr"
    plain = torch.optim.Adam([{"params": [q for q in ref.parameters()][i : i + 2]} for i in (0, 2, 4)], lr=1e-2)
    return model, opt, ref, plain


def lr_steps(model, opt, ref, plain, steps):
    for step in steps:
        model(step).backward()
        opt.step()
        opt.zero_grad()
        ref(step).backward()
        reference_lr_step(plain, per_group(plain, ref, GAMMAS))
        plain.zero_grad()


# ----------------------------------------------------------------------- 1. lr mode after a reload
def test_lr_mode_keeps_scaling_after_the_inner_optimizer_loads_a_state_dict():
    model, opt, ref, plain = adam_pair()
    lr_steps(model, opt, ref, plain, range(3))
    opt.optimizer.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # new group dicts, same params
    plain.load_state_dict(copy.deepcopy(plain.state_dict()))
    lr_steps(model, opt, ref, plain, range(3, 6))
    assert_same(model, ref)


def test_lr_mode_keeps_scaling_after_param_groups_are_reassigned():
    model, opt, ref, plain = adam_pair()
    lr_steps(model, opt, ref, plain, range(2))
    opt.param_groups = [dict(g) for g in opt.param_groups]
    lr_steps(model, opt, ref, plain, range(2, 4))
    opt.optimizer.param_groups = [dict(g) for g in opt.param_groups]
    lr_steps(model, opt, ref, plain, range(4, 6))
    assert_same(model, ref)


def test_a_reassigned_group_that_mixes_modalities_is_refused_in_lr_mode():
    model, opt, *_ = adam_pair()
    opt.param_groups = [{**opt.param_groups[0], "params": list(model.parameters())}]
    model(0).backward()
    with pytest.raises(ValueError, match="mixes modalities"):
        opt.step()


def test_groups_added_on_the_inner_optimizer_follow_their_modality_tag():
    model, ref = Pair(), Pair()
    extra, extra_ref = nn.Linear(2, 2), nn.Linear(2, 2)
    extra_ref.load_state_dict(extra.state_dict())
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    opt.optimizer.add_param_group({"params": list(extra.parameters()), "modality": "visual"})
    plain = torch.optim.SGD([*ref.parameters(), *extra_ref.parameters()], lr=0.1)
    for m, e in ((model, extra), (ref, extra_ref)):
        (m(0) + e(torch.ones(1, 2)).sum()).backward()
    opt.step()
    reference_grad_step(plain, {**ref.by_modality(), "extra": list(extra_ref.parameters())}, {**GAMMAS, "extra": 15.0})
    assert_same(model, ref)
    assert_same(extra, extra_ref)


# ------------------------------------------------------------------ 2. global step hooks run once
@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_global_step_hooks_run_once_per_step_with_the_wrapper(mode):
    model = Pair()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3) if mode == "lr" else torch.optim.SGD(model.parameters(), 0.1)
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode=mode)
    seen = []
    pre = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", o, [g["lr"] for g in o.param_groups])))
    post = register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", o, None)))
    local = opt.register_step_pre_hook(lambda o, a, k: seen.append(("local", o, None)))
    inner_local = inner.register_step_post_hook(lambda o, a, k: seen.append(("inner-local", o, None)))
    try:
        model(0).backward()
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
    finally:
        pre.remove(), post.remove(), local.remove(), inner_local.remove()
    assert [(kind, o) for kind, o, _ in seen] == [("pre", opt), ("local", opt), ("inner-local", inner), ("post", opt)]
    assert seen[0][2] == lrs  # the hook sees the scheduled lrs, never gamma-multiplied ones


# --------------------------------------------------------------------------- 3. copies and pickles
def sgd_with_scheduler():
    model = Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(0).backward()
    opt.step()
    scheduler.step()
    opt.zero_grad()
    return model, opt


def test_deepcopy_after_a_scheduler_is_attached_steps_only_the_copy():
    model, opt = sgd_with_scheduler()
    before = copy.deepcopy(model.state_dict())
    clone = copy.deepcopy({"model": model, "opt": opt})
    clone["model"](1).backward()
    clone["opt"].step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(p, q) for p, q in zip(clone["model"].parameters(), model.parameters(), strict=True))


def test_pickle_and_torch_save_of_the_wrapper_work_after_a_scheduler_is_attached():
    model, opt = sgd_with_scheduler()
    loaded = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    buffer = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    ref = copy.deepcopy({"model": model, "opt": opt})
    for copy_ in (loaded, reloaded, ref):
        copy_["model"](1).backward()
        copy_["opt"].step()
        assert dict(copy_["opt"].gammas) == GAMMAS
    assert_same(loaded["model"], ref["model"])
    assert_same(reloaded["model"], ref["model"])


# --------------------------------------------------------------------- 4. scale_grads_ and skips
def grad_pair():
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    return model, opt, ref, plain


def test_after_a_skipped_step_and_zeroing_in_place_the_next_step_is_scaled():
    model, opt, ref, plain = grad_pair()
    model(0).backward()
    opt.scale_grads_()  # e.g. before clipping; then GradScaler found an inf and skipped the step
    model.zero_grad(set_to_none=False)  # older loops zero in place, on the model
    model(1).backward()
    opt.step()
    ref(1).backward()
    reference_grad_step(plain, ref.by_modality(), GAMMAS)
    assert_same(model, ref)


def test_after_a_skipped_step_scale_grads_scales_the_new_gradients():
    model, opt, ref, plain = grad_pair()
    model(0).backward()
    opt.scale_grads_()
    opt.optimizer.zero_grad(set_to_none=False)  # not the wrapper's zero_grad
    model(1).backward()
    opt.scale_grads_()
    opt.step()
    ref(1).backward()
    reference_grad_step(plain, ref.by_modality(), GAMMAS)
    assert_same(model, ref)


def test_backward_onto_gradients_scale_grads_already_scaled_raises():
    model, opt, *_ = grad_pair()
    model(0).backward()
    opt.scale_grads_()
    with pytest.raises(RuntimeError, match="half scaled"):
        model(1).backward()


def test_a_real_grad_scaler_skip_then_a_normal_step_is_scaled_once():
    model, opt, ref, plain = grad_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale(model(0)).backward()
    model.visual.bias.grad[0] = float("inf")
    scaler.unscale_(opt)  # finds the inf
    opt.scale_grads_()
    scaler.step(opt)  # skipped
    scaler.update()
    assert_same(model, Pair())  # nothing moved
    model.zero_grad(set_to_none=False)
    scaler.scale(model(1)).backward()
    scaler.step(opt)
    scaler.update()
    ref(1).backward()
    reference_grad_step(plain, ref.by_modality(), GAMMAS)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # unscaling by 1/8 is exact, the rest as SGD's


# ---------------------------------------------------------------- 5. auto mode does what it says
class Lookahead(torch.optim.Optimizer):
    """The structure of timm's Lookahead: the base optimizer in ``_base_optimizer``, its param_groups and state
    shared, the slow weights kept per parameter."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 3, alpha: float = 0.5) -> None:
        self._base_optimizer = base
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state
        self._k, self._alpha, self._count = k, alpha, 0
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        self._count += 1
        if self._count % self._k == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self.state[p].setdefault("slow", p.detach().clone())
                    slow.add_(p - slow, alpha=self._alpha)
                    p.copy_(slow)
        return loss


def update_ratio(make, mode, steps=20):
    """|step of visual| / |the same step with gamma 1|, from the same state after ``steps`` steps of two identical
    runs (no deepcopy: wrappers such as Lookahead or ZeRO do not survive one)."""
    moved, modes = [], set()
    for last_gamma in (15.0, 1.0):
        model = Pair()
        opt = PDMPOptimizer(make(model.parameters()), model.groups(), gammas={"audio": 1.0, "visual": 15.0}, mode=mode)
        for step in range(steps):
            model(step).backward()
            opt.step()
            opt.zero_grad()
        opt.gammas = {"audio": 1.0, "visual": last_gamma}
        before = model.visual.weight.detach().clone()
        model(steps).backward()
        opt.step()
        moved.append((model.visual.weight - before).norm())
        modes.add(opt.mode)
    (mode,) = modes
    return float(moved[0] / moved[1]), mode


@pytest.mark.parametrize(
    ("make", "expected_mode"),
    [
        (lambda ps: torch.optim.Rprop(ps, lr=1e-3), "update"),
        (lambda ps: torch.optim.Adafactor(ps, lr=2e-3), "update"),
        (lambda ps: Lookahead(torch.optim.Adam(ps, lr=1e-3), k=50), "lr"),
        (lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1), k=50), "grad"),
        (lambda ps: torch.optim.Adam(ps, lr=1e-3), "lr"),
    ],
    ids=["Rprop", "Adafactor", "Lookahead(Adam)", "Lookahead(SGD)", "Adam"],
)
def test_auto_mode_multiplies_the_update_by_gamma_after_the_optimizer_has_state(make, expected_mode):
    ratio, mode = update_ratio(make, "auto", steps=60)
    assert mode == expected_mode
    assert ratio == pytest.approx(15.0, rel=0.02)


def test_forced_lr_mode_on_rprop_and_adafactor_warns_and_names_update_mode():
    for make in (torch.optim.Rprop, torch.optim.Adafactor):
        model = Pair()
        with pytest.warns(UserWarning, match="use mode='update'"):
            PDMPOptimizer(make(model.parameters()), model.groups(), gammas=GAMMAS, mode="lr")


def test_zero_redundancy_adam_gets_update_mode_and_refuses_lr_mode(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = Pair()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)
        with pytest.raises(ValueError, match="use mode='update'"):
            PDMPOptimizer(zero, model.groups(), gammas=GAMMAS, mode="lr")
        ratio, mode = update_ratio(
            lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=torch.optim.Adam, lr=1e-3), "auto"
        )
        assert mode == "update"
        assert ratio == pytest.approx(15.0, rel=1e-3)
    finally:
        dist.destroy_process_group()


def test_update_mode_equals_its_reference_for_any_optimizer():
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.Rprop(model.parameters()), model.groups(), gammas=GAMMAS)
    plain = torch.optim.Rprop(ref.parameters())
    for step in range(5):
        model(step).backward()
        opt.step()
        opt.zero_grad()
        ref(step).backward()
        reference_update_step(plain, ref.by_modality(), GAMMAS)
        plain.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------- 6. a parameter twice in one group
def test_a_parameter_listed_twice_in_a_group_is_scaled_once():
    model, ref = Pair(), Pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate, and allows it
        inner = torch.optim.SGD([*model.parameters(), model.visual.weight], lr=0.1)
        plain = torch.optim.SGD([*ref.parameters(), ref.visual.weight], lr=0.1)
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    model(0).backward()
    opt.step()
    ref(0).backward()
    reference_grad_step(plain, ref.by_modality(), GAMMAS)
    assert_same(model, ref)


# -------------------------------------------------------------------- 7. dtype changes after wrapping
def test_model_to_bfloat16_after_wrapping_stays_bit_exact():
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    model(0).backward()
    opt.step()
    opt.zero_grad()
    ref(0).backward()
    reference_grad_step(plain, ref.by_modality(), GAMMAS)
    plain.zero_grad()
    model.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    for optimizer in (opt, plain):  # the momentum buffers follow the parameters, as a user would convert them
        for state in optimizer.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(torch.bfloat16)
    for step in range(1, 4):
        model(step).backward()
        opt.step()
        opt.zero_grad()
        ref(step).backward()
        reference_grad_step(plain, ref.by_modality(), GAMMAS)
        plain.zero_grad()
    assert model.visual.weight.dtype == torch.bfloat16
    assert_same(model, ref)


# ----------------------------------------------------------------------------------- 8. smaller ones
def test_split_groups_do_not_share_a_tensor_lr():
    model = Pair()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01)), model.groups(), gammas=GAMMAS)
    lrs = [g["lr"] for g in opt.param_groups]
    lrs[0].mul_(0.5)
    assert [float(lr) for lr in lrs] == pytest.approx([0.005, 0.01, 0.01])
    model(0).backward()
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same objects, restored, never multiplied in place
    assert [float(lr) for lr in lrs] == pytest.approx([0.005, 0.01, 0.01])


def test_an_expanded_gradient_assigned_by_the_user_is_scaled_like_plain_sgd_reads_it():
    model, ref = Pair(), Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m in (model, ref):
        m(0).backward()
        m.visual.bias.grad = torch.ones(1).expand(6)  # several elements share one memory location
    opt.step()
    ref.visual.bias.grad = ref.visual.bias.grad * 15.0
    ref.audio.weight.grad.mul_(1 / 15)
    ref.audio.bias.grad.mul_(1 / 15)
    ref.visual.weight.grad.mul_(15.0)
    plain.step()
    assert_same(model, ref)


def test_gamma_p_as_a_one_element_tensor_works_and_a_bad_one_names_gamma_p():
    model = Pair()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = PDMPOptimizer(sgd, model.groups(), dominant="visual", gamma_p=torch.tensor([15.0]))
    assert opt.gammas["visual"] == 15.0
    with pytest.raises(TypeError, match="gamma_p"):
        PDMPOptimizer(sgd, model.groups(), dominant="visual", gamma_p=torch.ones(2))


# --------------------------------------------------------------- 9. changing gammas mid-training
def test_the_returned_gammas_cannot_be_mutated():
    model = Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    with pytest.raises(TypeError):
        opt.gammas["visual"] = 1.0  # type: ignore[index]
    assert dict(opt.gammas) == GAMMAS


def test_a_modulation_window_survives_a_checkpoint_and_equals_the_reference():
    """Modulate for 2 steps, pause for 2 (gammas 1), save, resume in a fresh run, modulate again."""
    model, opt, ref, plain = grad_pair()
    window = [GAMMAS, GAMMAS, {"audio": 1.0, "visual": 1.0}, {"audio": 1.0, "visual": 1.0}, GAMMAS, GAMMAS]
    for step, gammas in enumerate(window):
        if step == 3:  # checkpoint mid-pause, resume into new objects built with the default coefficients
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
            model = Pair(seed=1)
            model.load_state_dict(saved["model"])
            opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.groups(), "visual")
            opt.load_state_dict(saved["opt"])
            assert dict(opt.gammas) == {"audio": 1.0, "visual": 1.0}
        if dict(opt.gammas) != gammas:
            opt.gammas = gammas
        model(step).backward()
        opt.step()
        opt.zero_grad()
        ref(step).backward()
        reference_grad_step(plain, ref.by_modality(), gammas)
        plain.zero_grad()
    assert_same(model, ref)


def test_setting_gammas_checks_them():
    model = Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    with pytest.raises(ValueError, match=r"no coefficient for \['audio'\]"):
        opt.gammas = {"visual": 1.0}
    with pytest.raises(ValueError, match=r"finite number > 0"):
        opt.gammas = {"visual": 1.0, "audio": float("nan")}
    with pytest.raises(ValueError, match="not among the modalities"):
        opt.gammas = {"visual": 1.0, "audio": 1.0, "text": 2.0}
    assert dict(opt.gammas) == GAMMAS


# ------------------------------------------------------------- plain checkpoints into split groups
def test_a_plain_adam_run_resumes_under_lr_mode_that_split_its_group():
    """Pretrain with plain Adam (one group), resume with PDMP "lr" mode (three groups): the state lands per parameter,
    and the run continues like the reference twin loaded the same way."""
    model, ref = Pair(), Pair()
    plain, plain_ref = torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(ref.parameters(), lr=1e-3)
    for step in range(2):
        for m, o in ((model, plain), (ref, plain_ref)):
            m(step).backward()
            o.step()
            o.zero_grad()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.groups(), gammas=GAMMAS)
    assert opt.mode == "lr" and len(opt.param_groups) == 3
    opt.load_state_dict(plain.state_dict())
    assert all(torch.equal(opt.state[p]["exp_avg"], plain.state[p]["exp_avg"]) for p in model.parameters())
    twin = torch.optim.Adam([{"params": list(m.parameters())} for m in (ref.audio, ref.visual, ref.head)], lr=1e-3)
    saved = plain_ref.state_dict()
    split = [{**saved["param_groups"][0], "params": ids} for ids in ([0, 1], [2, 3], [4, 5])]
    twin.load_state_dict({"state": saved["state"], "param_groups": split})
    for step in range(2, 4):
        model(step).backward()
        opt.step()
        opt.zero_grad()
        ref(step).backward()
        reference_lr_step(twin, [1 / 15, 15.0, 1.0])
        twin.zero_grad()
    assert_same(model, ref)


def test_a_plain_checkpoint_with_other_groups_is_refused_and_names_the_cause():
    model = Pair()
    opt = PDMPOptimizer(torch.optim.Adam(model.parameters()), model.groups(), gammas=GAMMAS)
    other = torch.optim.Adam([{"params": [p]} for p in list(model.parameters())[:2]]).state_dict()
    with pytest.raises(ValueError, match="checkpoint has 2 param groups, this optimizer has 3"):
        opt.load_state_dict(other)


def test_lr_mode_refuses_a_gamma_that_overflows_its_hyperparameters():
    model = Pair()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2)
    with pytest.raises(ValueError, match=r"weight_decay .* use mode='grad'"):
        PDMPOptimizer(sgd, model.groups(), gammas={"audio": 1e-300, "visual": 1.0}, mode="lr")
    other = Pair()  # grad mode takes any gamma > 0
    opt = PDMPOptimizer(torch.optim.SGD(other.parameters(), lr=0.1, weight_decay=1e-2), other.groups(),
                        gammas={"audio": 1e-300, "visual": 1.0})  # fmt: skip
    other(0).backward()
    opt.step()


def test_param_groups_replaced_by_tensors_of_no_modality_are_refused_not_left_unscaled():
    """What DeepSpeed ZeRO does to a client optimizer: its param groups end up holding flat partitions."""
    model = Pair()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.groups(), gammas=GAMMAS)
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    with pytest.raises(ValueError, match="scale_encoder_grads instead"):
        opt.step()
