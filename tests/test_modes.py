"""Auto mode picks, by optimizer family, the mode whose reference holds; an explicit mode that is known not to move
a modality warns; what no mode fits is refused with the modes named; ``print(opt)`` says which mode and why."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import GAMMAS, TwoModal, free_port, loss_of
from torch.distributed.optim import ZeroRedundancyOptimizer

from pdmp_optim import PDMPOptimizer
from pdmp_optim.modes import driven_optimizer, resolve_mode

INSTALL = "pip install pytorch_optimizer schedulefree (or pip install -e '.[test]')"


# ------------------------------------------------------------------------- optimizers torch does not ship
class SignDescent(torch.optim.Optimizer):
    """A third-party optimizer in miniature: ``p -= lr * sign(grad)``, blind to the gradient's scale."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class Normalised(torch.optim.Optimizer):
    """No ``lr`` at all: each step has length ``radius``."""

    def __init__(self, params, radius=1e-2):
        super().__init__(params, {"radius": radius})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad / p.grad.norm().clamp_min(1e-12), alpha=group["radius"])


class Lookahead(torch.optim.Optimizer):
    """timm's Lookahead in miniature: drives ``_base_optimizer`` (sharing its groups and state), then every ``k``
    steps pulls the parameters halfway back to slow weights it keeps."""

    def __init__(self, base, k=5):
        self._base_optimizer, self._k, self._count = base, k, 0
        self.defaults, self.param_groups, self.state = base.defaults, base.param_groups, base.state
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        self._count += 1
        for group in self.param_groups:
            for p in group["params"]:
                slow = self.state[p].setdefault("slow", p.detach().clone())
                if self._count % self._k == 0:
                    slow.add_(p - slow, alpha=0.5)
                    p.copy_(slow)
        return loss


class Averaged(Lookahead):
    """A wrapper PDMP does not know (any name but Lookahead): it must be taken as the optimizer itself."""


def one_param():
    return [torch.nn.Parameter(torch.zeros(2, 2))]


def first_step_ratios(make, mode, gammas=GAMMAS):
    """How far the first step moves each part of TwoModal with PDMP, relative to the same step without it."""
    moved = []
    for wrap in (False, True):
        model = TwoModal()
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in model.named_children()}
        opt = make(model.trained())
        if wrap:
            opt = PDMPOptimizer(opt, model.groups(), gammas=gammas, mode=mode)
        loss_of(model, 0).backward()
        opt.step()
        moved.append({
            name: sum((p - b).norm() ** 2 for p, b in zip(m.parameters(), before[name], strict=True)).sqrt().item()
            for name, m in model.named_children()
            if name != "extras"
        })  # fmt: skip
    return {name: moved[1][name] / moved[0][name] for name in moved[0]}


# ---------------------------------------------------------------------------------------------- auto mode
@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
     lambda ps: torch.optim.ASGD(ps, lr=0.1), lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1))],
    ids=["SGD", "SGD(nesterov)", "ASGD", "Lookahead(SGD)"],
)  # fmt: skip
def test_auto_scales_the_gradients_of_the_sgd_family(make):
    mode, reason = resolve_mode(make(one_param()), "auto")
    assert mode == "grad"
    assert "update is linear in the gradient, so gradients are scaled" in reason


ADAM_FAMILY = ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam"]


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_auto_scales_the_learning_rate_of_the_adam_family(name):
    assert resolve_mode(getattr(torch.optim, name)(one_param()), "auto") == (
        "lr",
        f"auto: {name}'s update is proportional to lr (as for the Adam family), so lr is scaled",
    )


def test_auto_scales_the_learning_rate_of_muon():
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    assert resolve_mode(muon(one_param()), "auto")[0] == "lr"


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"])
def test_auto_multiplies_the_first_step_of_adaptive_optimizers_by_gamma(name):
    ratios = first_step_ratios(lambda ps: getattr(torch.optim, name)(ps, lr=1e-3), "auto")
    assert ratios == pytest.approx({"audio": 1 / 15, "visual": 15.0, "head": 1.0}, rel=1e-3)  # AdamW's decay: as set


@pytest.mark.parametrize(("name", "reads"), [("Rprop", "initial step size"), ("Adafactor", "only as a cap")])
def test_auto_scales_the_update_of_rprop_and_adafactor_whose_lr_barely_moves_them(name, reads):
    mode, reason = resolve_mode(getattr(torch.optim, name)(one_param()), "auto")
    assert mode == "update"
    assert reads in reason and "keeps no copy of the parameters, so its update is scaled" in reason


def test_auto_goes_by_the_exact_class_not_the_name_nor_the_base_class():
    """A subclass may change ``step()`` arbitrarily and a third-party class may reuse a torch name: both are
    optimizers with an ``lr``, nothing more. (0.1 picked a mode from substrings such as "lars" in "PolarSGD".)"""

    class PolarSGD(torch.optim.SGD):
        pass

    class Rprop(SignDescent):
        pass

    class Adafactor(torch.optim.Adafactor):
        pass

    for cls in (PolarSGD, Rprop, Adafactor, SignDescent):
        assert resolve_mode(cls(one_param()), "auto")[0] == "lr", cls.__name__


@pytest.mark.parametrize(
    ("inner", "mode"),
    [(lambda ps: torch.optim.SGD(ps, lr=0.1), "grad"), (lambda ps: torch.optim.AdamW(ps), "lr"),
     (lambda ps: torch.optim.Rprop(ps), "update")],
    ids=["SGD", "AdamW", "Rprop"],
)  # fmt: skip
def test_auto_looks_through_lookahead_whose_step_is_linear_in_the_inner_step(inner, mode):
    base = inner(one_param())
    lookahead = Lookahead(base)
    assert driven_optimizer(lookahead) is base
    assert resolve_mode(lookahead, "auto")[0] == mode
    assert f"Lookahead({type(base).__name__})" in resolve_mode(lookahead, "auto")[1]


def test_auto_takes_a_wrapper_it_does_not_know_for_the_optimizer_itself():
    """0.2.0 looked through any ``optimizer`` attribute: TRAC(SGD) got grad mode and moved both modalities 2.2x."""
    wrapper = Averaged(torch.optim.SGD(one_param(), lr=0.1))
    assert driven_optimizer(wrapper) is wrapper
    assert resolve_mode(wrapper, "auto") == (
        "lr",
        "auto: Averaged's update is proportional to lr (as for the Adam family), so lr is scaled",
    )


def test_auto_takes_pytorch_optimizers_trac_and_looksam_for_the_optimizer_itself():
    po = pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    for opt in (po.TRAC(torch.optim.SGD(one_param(), lr=0.1)), po.LookSAM(one_param(), torch.optim.SGD, lr=0.1)):
        mode, reason = resolve_mode(opt, "auto")
        assert mode == "lr" and reason.startswith(f"auto: {type(opt).__name__}'s update"), reason
    assert resolve_mode(po.Lookahead(torch.optim.SGD(one_param(), lr=0.1)), "auto")[0] == "grad"


def test_auto_looks_through_zero_redundancy_optimizer():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for cls, mode in ((torch.optim.SGD, "grad"), (torch.optim.Adam, "lr")):
            zero = ZeroRedundancyOptimizer(one_param(), optimizer_class=cls, lr=0.1)
            assert resolve_mode(zero, "auto")[0] == mode
    finally:
        torch.distributed.destroy_process_group()


# -------------------------------------------------------------------------------------------- refusals
def test_auto_refuses_an_optimizer_without_lr_and_names_the_modes_that_remain():
    model = TwoModal()
    with pytest.raises(ValueError, match=r"Normalised.*param groups have no 'lr'; pass mode='grad' .* mode='update'"):
        PDMPOptimizer(Normalised(model.trained()), model.groups(), gammas=GAMMAS)
    with pytest.raises(ValueError, match="mode='lr' scales each group's 'lr', but Normalised has none"):
        PDMPOptimizer(Normalised(model.trained()), model.groups(), gammas=GAMMAS, mode="lr")
    assert PDMPOptimizer(Normalised(model.trained()), model.groups(), gammas=GAMMAS, mode="update").mode == "update"


@pytest.mark.parametrize("mode", ["auto", "grad", "lr", "update"])
def test_lbfgs_is_refused_in_every_mode(mode):
    with pytest.raises(ValueError, match=r"LBFGS .* no PDMP mode multiplies its update by gamma; use another"):
        resolve_mode(torch.optim.LBFGS(one_param()), mode)


def test_an_unknown_mode_is_refused_with_the_modes_named():
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'grad', 'lr', 'update'\), got 'lrs'"):
        resolve_mode(torch.optim.SGD(one_param()), "lrs")


def test_an_optimizer_without_param_groups_is_refused():
    """pytorch_optimizer's SafeFP16Optimizer steps fp32 copies of the parameters through the optimizer it holds."""
    po = pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    model = TwoModal()
    with pytest.raises(TypeError, match=r"SafeFP16Optimizer.*mode"):
        PDMPOptimizer(po.SafeFP16Optimizer(torch.optim.SGD(model.trained())), model.groups(), gammas=GAMMAS)


# -------------------------------------------------------------------------------------- explicit modes
def assert_warns_here(match, build):
    """``build()`` warns once with ``match``, at the line of this file that called PDMPOptimizer."""
    with pytest.warns(UserWarning, match=match) as record:
        opt = build()
    assert len(record) == 1 and record[0].filename == __file__
    return opt


def assert_silent(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build()


NOT_GRADIENT_LINEAR = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "Rprop": lambda ps: torch.optim.Rprop(ps),
    "SignDescent": SignDescent,
    "SGD subclass": type("MySGD", (torch.optim.SGD,), {}),
    "Averaged(SGD)": lambda ps: Averaged(torch.optim.SGD(ps, lr=0.1)),
}


@pytest.mark.parametrize("name", sorted(NOT_GRADIENT_LINEAR))
def test_explicit_grad_on_an_optimizer_not_known_to_be_gradient_linear_warns(name):
    model = TwoModal()
    opt = NOT_GRADIENT_LINEAR[name](model.trained())
    assert_warns_here(
        r"mode='grad' with .*: its update is not known to be linear in the gradient .* gamma may have no effect",
        lambda: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="grad"),
    )


def test_the_warning_is_true_grad_mode_leaves_adam_and_sign_descent_as_they_were():
    for make in (lambda ps: torch.optim.Adam(ps, lr=1e-3), SignDescent):
        with pytest.warns(UserWarning, match="mode='grad'"):
            ratios = first_step_ratios(make, "grad")
        assert ratios == pytest.approx({"audio": 1.0, "visual": 1.0, "head": 1.0}, rel=2e-3)


def test_explicit_grad_on_pytorch_optimizers_lion_warns():
    po = pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    model = TwoModal()
    lion = po.Lion(model.trained())
    assert_warns_here("mode='grad' with Lion", lambda: PDMPOptimizer(lion, model.groups(), gammas=GAMMAS, mode="grad"))


@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.ASGD(ps)],
    ids=["SGD", "ASGD"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_explicit_modes_on_the_sgd_family_are_silent(make, mode):
    model = TwoModal()
    assert_silent(lambda: PDMPOptimizer(make(model.trained()), model.groups(), gammas=GAMMAS, mode=mode))


@pytest.mark.parametrize("mode", ["grad", "lr"])
def test_explicit_grad_and_lr_on_lookahead_sgd_are_silent(mode):
    model = TwoModal()
    opt = Lookahead(torch.optim.SGD(model.trained(), lr=0.1))
    assert_silent(lambda: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode=mode))


@pytest.mark.parametrize("name", ["Rprop", "Adafactor"])
def test_explicit_lr_on_rprop_and_adafactor_warns(name):
    model = TwoModal()
    opt = getattr(torch.optim, name)(model.trained())
    assert_warns_here(
        f"mode='lr' with {name}: it .*, so lr x gamma barely moves the modality; use mode='auto'",
        lambda: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="lr"),
    )


def test_explicit_update_on_optimizers_that_keep_no_copy_of_the_parameters_is_silent():
    for make in (lambda ps: torch.optim.Adam(ps, lr=1e-3), torch.optim.Rprop, torch.optim.Adafactor, SignDescent):
        model = TwoModal()
        opt = make(model.trained())
        assert_silent(lambda opt=opt, model=model: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="update"))


REBUILDERS = {  # pytorch_optimizer's registry names; each measured to pull a multiplied step back
    "ranger": {},
    "ranger21": {"num_iterations": 100},
    "schedulefreeadamw": {},
    "ftrl": {},
    "srmm": {},
    "nero": {},
    "dadaptadagrad": {},
    "a2grad": {},
    "madgrad": {},
}


@pytest.mark.parametrize("name", sorted(REBUILDERS))
def test_explicit_update_on_an_optimizer_that_rebuilds_its_parameters_warns(name):
    po = pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    model = TwoModal()
    per_modality = [{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)]
    opt = po.load_optimizer(name)(per_modality, **REBUILDERS[name])  # (SRMM keeps a list per group: no split)
    assert_warns_here(
        r"mode='update' with .*: it rebuilds the parameters from its own state, so its next steps pull a "
        r"multiplied step back; use mode='auto' \(lr\)",
        lambda: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="update"),
    )


def test_explicit_update_on_schedule_free_warns():
    sf = pytest.importorskip("schedulefree", reason=INSTALL)
    model = TwoModal()
    opt = sf.AdamWScheduleFree(model.trained())
    assert_warns_here("mode='update' with AdamWScheduleFree: it rebuilds the parameters",
                      lambda: PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="update"))  # fmt: skip


def test_explicit_update_on_lookahead_warns():
    """Lookahead's pull-back toward its slow weights undoes a multiplied step: measured 7.6x instead of 4x over
    five steps of pytorch_optimizer's Lookahead(SGD) with gamma 4."""
    model = TwoModal()
    opt = Lookahead(torch.optim.SGD(model.trained(), lr=0.1))
    assert_warns_here("mode='update' with Lookahead", lambda: PDMPOptimizer(opt, model.groups(), mode="update",
                                                                           gammas=GAMMAS))  # fmt: skip


# ------------------------------------------------------------------------------------------- print(opt)
@pytest.mark.parametrize(
    ("make", "mode", "says"),
    [(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1)), "auto",
      "mode='grad' (auto: Lookahead(SGD)'s update is linear in the gradient, so gradients are scaled)"),
     (lambda ps: Lookahead(torch.optim.Adam(ps)), "auto",
      "mode='lr' (auto: Lookahead(Adam)'s update is proportional to lr (as for the Adam family), so lr is scaled)"),
     (lambda ps: Averaged(torch.optim.SGD(ps, lr=0.1)), "auto", "mode='lr' (auto: Averaged's update is proportional"),
     (torch.optim.Adafactor, "auto", "mode='update' (auto: Adafactor uses lr only as a cap and keeps no copy of the "
      "parameters, so its update is scaled)"),
     (SignDescent, "update", "mode='update' (explicit)")],
    ids=["Lookahead(SGD)", "Lookahead(Adam)", "unknown wrapper", "Adafactor", "explicit"],
)  # fmt: skip
def test_print_says_the_mode_and_why(make, mode, says):
    model = TwoModal()
    text = str(PDMPOptimizer(make(model.trained()), model.groups(), gammas=GAMMAS, mode=mode))
    assert text.startswith(f"PDMPOptimizer({says}")


# ------------------------------------------------------------------------------- lr mode's learning rates
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


def test_a_tensor_learning_rate_is_restored_as_the_same_object():
    param = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.01)
    opt = PDMPOptimizer(torch.optim.Adam([param], lr=lr), {"m": [param]}, dominant="m")
    param.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)
    assert param.detach()[0].item() == pytest.approx(1 - 0.15, rel=1e-4)  # Adam's first step is lr * gamma


def test_differentiable_sgd_gets_lr_mode_and_grad_mode_is_refused():
    """Attack finding: grad mode multiplies gradients in place, where a hypergradient cannot see gamma."""
    model = TwoModal()
    opt = PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1, differentiable=True), model.groups(), gammas=GAMMAS)
    assert opt.mode == "lr"
    with pytest.raises(ValueError, match="differentiable=True the hypergradient misses gamma; use mode='lr'"):
        PDMPOptimizer(torch.optim.SGD(TwoModal().trained(), lr=0.1, differentiable=True), TwoModal().groups(),
                      gammas=GAMMAS, mode="grad")  # fmt: skip
