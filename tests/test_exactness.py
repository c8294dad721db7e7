"""Each mode equals its definition: in ``"grad"`` mode one ``step()`` is the bare optimizer's step on gradients
multiplied by the modality's gamma, bit for bit on CPU, for any shapes, any gamma > 0, any param-group layout,
gradients that are ``None``, duplicated, of another dtype after wrapping, sparse or expanded; ``"lr"`` mode is the
bare optimizer with each modality's ``lr`` multiplied (its groups split by hand), and ``"update"`` mode the bare step
multiplied. The step does nothing else: one foreach multiply per bucket in grad mode, no tensor work in lr mode."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, batch, loss_of
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pdmp_optim import PDMPOptimizer
from pdmp_optim.modes import compensates_decay
from pdmp_optim.reference import PDMPReference

# these tests force mode="grad" (or "lr") on optimizers auto would not pick, on purpose, to check the arithmetic
pytestmark = pytest.mark.filterwarnings("ignore:mode='(grad|lr)' with:UserWarning")

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
gammas = st.floats(min_value=0.0, max_value=1e3, exclude_min=True, allow_subnormal=False)
# lr mode divides SGD's weight decay by gamma, which overflows float32 for a gamma below ~1e-36 (grad mode: no limit)
lr_gammas = st.floats(min_value=1e-20, max_value=1e3, allow_subnormal=False)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd-momentum-loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1, foreach=False),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.05, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}
LAYOUTS = ["one-group", "two-mixed-groups", "group-per-param", "per-modality"]


# ------------------------------------------------------------------------------------------------ problems
@st.composite
def problems(draw, gammas=gammas):
    """Modalities with random parameter shapes (a parameter maybe named twice in its modality), shared parameters,
    gammas, a param-group layout in which modalities may interleave, and which gradients are ``None``."""
    modalities = {
        f"m{i}": [nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(1, 3)))]
        for i in range(draw(st.integers(1, 3)))
    }
    shared = [nn.Parameter(torch.randn(draw(shapes))) for _ in range(draw(st.integers(0, 2)))]
    everything = [p for ps in modalities.values() for p in ps] + shared
    spec = {m: ps + ps[:1] if draw(st.booleans()) else ps for m, ps in modalities.items()}  # duplicates in groups=
    return {
        "modalities": modalities,
        "shared": shared,
        "spec": spec,
        "gammas": {name: draw(gammas) for name in modalities},
        "everything": everything,
        "layout": (
            draw(st.sampled_from(LAYOUTS)),
            draw(st.permutations(range(len(everything)))),
            draw(st.integers(1, max(1, len(everything) - 1))),
        ),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "none": draw(st.lists(st.booleans(), min_size=len(everything), max_size=len(everything))),
    }


def param_groups(problem):
    layout, order, cut = problem["layout"]
    everything = problem["everything"]
    shuffled = [everything[i] for i in order]
    if layout == "one-group":
        return [{"params": shuffled}]
    if layout == "two-mixed-groups":
        return [
            g for g in ({"params": shuffled[:cut], "lr": 0.02}, {"params": shuffled[cut:], "lr": 0.03}) if g["params"]
        ]
    if layout == "group-per-param":
        return [{"params": [p], "lr": 0.01 * (1 + i % 3)} for i, p in enumerate(everything)]
    shared = problem["shared"]
    return [{"params": ps} for ps in problem["modalities"].values()] + ([{"params": shared}] if shared else [])


def twin(problem):
    """The same problem over fresh copies of the parameters."""
    return copy.deepcopy(problem)


def set_grads(problem, step):
    generator = torch.Generator().manual_seed(problem["seed"] + step)
    for p, none in zip(problem["everything"], problem["none"], strict=True):
        p.grad = None if (none and step == 0) else torch.randn(p.shape, generator=generator)


def multiply_by_hand(problem):
    """The definition: each modality gradient times its gamma, one tensor at a time, each parameter once."""
    with torch.no_grad():
        for modality, params in problem["modalities"].items():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(problem["gammas"][modality])


def assert_same_state(opt, plain, params, plain_params):
    for p, q in zip(params, plain_params, strict=True):
        assert opt.state[p].keys() == plain.state[q].keys()
        for key, value in plain.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(value)), key


# --------------------------------------------------------------------------------------------- grad mode
@settings(max_examples=60)
@given(problem=problems(), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_grad_mode_equals_the_bare_optimizer_on_multiplied_gradients(problem, name):
    ref = twin(problem)
    opt = PDMPOptimizer(OPTIMIZERS[name](param_groups(problem)), problem["spec"], gammas=problem["gammas"], mode="grad")
    plain = OPTIMIZERS[name](param_groups(ref))
    for step in range(3):  # momentum and second moments carry the scaled gradients
        set_grads(problem, step)
        set_grads(ref, step)
        opt.step()
        multiply_by_hand(ref)
        plain.step()
        for p, q in zip(problem["everything"], ref["everything"], strict=True):
            assert torch.equal(p, q)
            assert (p.grad is None) == (q.grad is None)
            assert p.grad is None or torch.equal(p.grad, q.grad)  # the gradients were scaled exactly once
    assert_same_state(opt, plain, problem["everything"], ref["everything"])


def test_a_parameter_listed_twice_in_a_param_group_is_scaled_once():
    w, plain_w = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's own warning; it steps w twice
        opt = PDMPOptimizer(torch.optim.SGD([w, w], lr=0.5), {"a": [w, w]}, gammas={"a": 3.0})
        plain = torch.optim.SGD([plain_w, plain_w], lr=0.5)
    w.grad, plain_w.grad = torch.ones(3), torch.full((3,), 3.0)
    opt.step()
    plain.step()
    assert torch.equal(w.grad, plain_w.grad) and torch.equal(w, plain_w)


def test_a_modality_without_gradients_is_skipped():
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9), model.groups(), gammas=GAMMAS)
    plain = torch.optim.SGD(plain_model.trained(), lr=0.1, momentum=0.9)
    x_audio, x_visual = torch.randn(4, 6), torch.randn(4, 10)
    for m in (model, plain_model):  # the audio encoder gets no gradient
        m.head(torch.cat([m.audio(x_audio).detach(), m.visual(x_visual)], 1)).sum().backward()
    assert all(p.grad is None for p in model.audio.parameters())
    opt.step()
    for p in plain_model.visual.parameters():
        p.grad.mul_(GAMMAS["visual"])
    plain.step()
    assert_same_params(model, plain_model)
    assert all(p.grad is None and p not in opt.state for p in model.audio.parameters())


@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), gamma=gammas, shape=shapes)
def test_any_dtype_is_scaled_like_a_plain_multiply(dtype, gamma, shape):
    p = nn.Parameter(torch.randn(shape).to(dtype))
    grad = torch.randn(shape).to(dtype)
    p.grad = grad.clone()
    opt = PDMPOptimizer(torch.optim.SGD([p], lr=0.0), {"m": [p]}, gammas={"m": gamma})
    opt.scale_grads_()
    assert torch.equal(p.grad, grad * gamma)


@settings(max_examples=12)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64]), audio=gammas, visual=gammas)
def test_a_model_cast_after_wrapping_is_scaled_in_its_new_dtype(dtype, audio, visual):
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(
        torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9),
        model.groups(),
        gammas={"audio": audio, "visual": visual},
    )
    plain = torch.optim.SGD(plain_model.trained(), lr=0.1, momentum=0.9)
    model.to(dtype)  # after wrapping: the same Parameter objects, new data
    plain_model.to(dtype)
    for step in range(2):
        for m in (model, plain_model):
            x_audio, x_visual, y = (t.to(dtype) if t.is_floating_point() else t for t in batch(step))
            nn.functional.cross_entropy(m(x_audio, x_visual).float(), y).backward()
        opt.step()
        with torch.no_grad():
            for modality, params in plain_model.modality_params().items():
                for p in params:
                    p.grad.mul_({"audio": audio, "visual": visual}[modality])
        plain.step()
        opt.zero_grad()
        plain.zero_grad()
    assert next(model.parameters()).dtype == dtype
    assert_same_params(model, plain_model)


@settings(max_examples=30)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), gamma=gammas, momentum=st.booleans())
def test_expanded_gradients_are_multiplied_like_dense_ones(shape, gamma, momentum):
    """An expanded gradient (stride 0, as a hand-written or framework-assigned gradient may be) cannot be multiplied
    in place; it is replaced by the product, as the bare optimizer would read it."""
    w = nn.Parameter(torch.randn(shape))
    plain_w = nn.Parameter(w.detach().clone())
    settings_ = {"lr": 0.1, "momentum": 0.9 if momentum else 0.0}
    opt = PDMPOptimizer(torch.optim.SGD([w], **settings_), {"a": [w]}, gammas={"a": gamma})
    plain = torch.optim.SGD([plain_w], **settings_)
    for _ in range(2):
        w.grad = torch.full((), 0.5).expand(shape)
        opt.step()
        plain_w.grad = torch.full(shape, 0.5) * gamma
        plain.step()
        opt.zero_grad()
        assert torch.equal(w, plain_w)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradients_equal_the_bare_optimizer_on_multiplied_gradients(momentum):
    torch.manual_seed(0)
    emb, plain_emb = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
    plain_emb.load_state_dict(emb.state_dict())
    opt = PDMPOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1, momentum=momentum), {"e": emb}, gammas={"e": 3.0})
    plain = torch.optim.SGD(plain_emb.parameters(), lr=0.1, momentum=momentum)
    idx = torch.tensor([1, 2, 2, 5])
    for _ in range(3):
        emb(idx).square().sum().backward()
        plain_emb(idx).square().sum().backward()
        assert emb.weight.grad.is_sparse
        opt.step()
        plain_emb.weight.grad = plain_emb.weight.grad * 3.0
        plain.step()
        opt.zero_grad()
        plain.zero_grad()
        assert torch.equal(emb.weight, plain_emb.weight)


@pytest.mark.parametrize("mode", ["grad", "lr", "update"])
def test_sparse_gradients_follow_the_reference_in_every_mode(mode):
    torch.manual_seed(0)
    emb, ref_emb = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
    ref_emb.load_state_dict(emb.state_dict())
    opt, ref = (
        cls(torch.optim.SGD(e.parameters(), lr=0.1, momentum=0.9), {"e": e}, gammas={"e": 3.0}, mode=mode)
        for cls, e in ((PDMPOptimizer, emb), (PDMPReference, ref_emb))
    )
    idx, start = torch.tensor([1, 2, 2, 5]), emb.weight.detach().clone()
    for _ in range(3):
        for e, o in ((emb, opt), (ref_emb, ref)):
            e(idx).square().sum().backward()
            o.step()
            o.zero_grad()
    assert not torch.equal(emb.weight, start)
    if mode == "grad":
        assert torch.equal(emb.weight, ref_emb.weight)
    else:
        torch.testing.assert_close(emb.weight, ref_emb.weight, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- lr mode
def split_by_hand(groups, modality_of):
    """Each group cut into one group per modality, in order of first appearance, settings kept; and each part's
    modality (None: shared)."""
    split, modalities = [], []
    for group in groups:
        parts: dict = {}
        for p in group["params"]:
            parts.setdefault(modality_of.get(p), []).append(p)
        for modality, params in parts.items():
            split.append({**group, "params": params})
            modalities.append(modality)
    return split, modalities


def lr_step_by_hand(plain, group_gammas):
    """The bare step with each group's lr multiplied by its gamma (and its weight decay divided, where lr mode does
    that), then the settings put back."""
    saved = [(g["lr"], g.get("weight_decay")) for g in plain.param_groups]
    for group, gamma in zip(plain.param_groups, group_gammas, strict=True):
        if gamma != 1.0:
            if compensates_decay(plain, group):
                group["weight_decay"] = group["weight_decay"] / gamma
            group["lr"] = group["lr"] * gamma
    plain.step()
    for group, (lr, weight_decay) in zip(plain.param_groups, saved, strict=True):
        group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay


@settings(max_examples=60)
@given(problem=problems(gammas=lr_gammas), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_lr_mode_equals_the_bare_optimizer_with_each_modality_lr_multiplied(problem, name):
    ref = twin(problem)
    opt = PDMPOptimizer(OPTIMIZERS[name](param_groups(problem)), problem["spec"], gammas=problem["gammas"], mode="lr")
    modality_of = {p: m for m, ps in ref["modalities"].items() for p in ps}
    groups, modalities = split_by_hand(param_groups(ref), modality_of)
    plain = OPTIMIZERS[name](groups)
    group_gammas = [1.0 if m is None else ref["gammas"][m] for m in modalities]
    lrs = [g["lr"] for g in opt.param_groups]
    for step in range(4):
        set_grads(problem, step)
        set_grads(ref, step)
        opt.step()
        lr_step_by_hand(plain, group_gammas)
        for p, q in zip(problem["everything"], ref["everything"], strict=True):
            assert torch.equal(p, q)
            assert p.grad is None or torch.equal(p.grad, q.grad)  # gradients are left alone
        assert [g["lr"] for g in opt.param_groups] == lrs  # restored exactly
    # SGD keeps its momentum in 1/gamma units during lr mode (as the reference does); the others in their own
    assert_same_state(opt, plain, problem["everything"], ref["everything"])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"])
def test_lr_mode_multiplies_the_first_update_of_adaptive_optimizers(name):
    sizes = {}
    for wrapped in (False, True):
        model = TwoModal()
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in model.named_children()}
        opt = getattr(torch.optim, name)(model.trained(), lr=1e-3)
        if wrapped:
            opt = PDMPOptimizer(opt, model.groups(), gammas=GAMMAS, mode="lr")
        loss_of(model, 0).backward()
        opt.step()
        sizes[wrapped] = {
            n: sum((p - b).abs().sum() for p, b in zip(m.parameters(), before[n], strict=True)).item()
            for n, m in model.named_children()
            if n != "extras"
        }
    ratios = {n: sizes[True][n] / sizes[False][n] for n in sizes[True]}
    assert ratios == pytest.approx({"audio": 1 / 15, "visual": 15.0, "head": 1.0}, rel=1e-3)


def test_lr_mode_leaves_every_lr_as_the_scheduler_set_it():
    params, plain_params = (
        [nn.Parameter(torch.ones(2)) for _ in range(3)],
        [nn.Parameter(torch.ones(2)) for _ in range(3)],
    )

    def adam(ps):
        return torch.optim.Adam([{"params": [p]} for p in ps], lr=3e-3)

    opt = PDMPOptimizer(adam(params), {"a": [params[0]], "v": [params[1]]}, gammas={"a": 1 / 15, "v": 15.0})
    plain = adam(plain_params)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1_000)
    plain_scheduler = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=1e-2, total_steps=1_000)
    for step in range(999):
        for p in (*params, *plain_params):
            p.grad = torch.full((2,), (-1.0) ** step)
        opt.step()
        plain.step()
        scheduler.step()
        plain_scheduler.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert scheduler.get_last_lr() == plain_scheduler.get_last_lr()


def test_lr_mode_puts_back_the_same_tensor_lr_object():
    param = nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.01)
    opt = PDMPOptimizer(torch.optim.Adam([param], lr=lr), {"m": [param]}, gammas={"m": 15.0}, mode="lr")
    param.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)
    assert param.detach()[0].item() == pytest.approx(1 - 0.15, rel=1e-4)  # Adam's first step is lr * gamma


# ------------------------------------------------------------------------------------------- update mode
@pytest.mark.parametrize(
    "make", [lambda p: torch.optim.Rprop(p, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["Rprop", "Adam"]
)
def test_update_mode_multiplies_the_bare_step(make):
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(make(model.trained()), model.groups(), gammas=GAMMAS, mode="update")
    plain = make(plain_model.trained())
    for step in range(4):
        loss_of(model, step).backward()
        loss_of(plain_model, step).backward()
        before = {p: p.detach().clone() for p in plain_model.parameters()}
        opt.step()
        plain.step()
        with torch.no_grad():
            for modality, params in plain_model.modality_params().items():
                for p in params:
                    old = before[p]
                    p.copy_(old + GAMMAS[modality] * (p - old))
        opt.zero_grad()
        plain.zero_grad()
    assert_same_params(model, plain_model, rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), TwoModal().parameters(), strict=True))


# ---------------------------------------------------------------------------------------- what a step costs
class CountOps(TorchDispatchMode):
    """Records every tensor operation run inside the block (real dispatch, nothing replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_grad_mode_is_one_foreach_multiply_per_bucket_and_no_host_sync():
    model = TwoModal()
    model.head.double()
    # (gamma, dtype) buckets: audio/f32, visual/f32, visual/f64 (the extra); the head has gamma 1: none
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    groups = {"audio": model.audio, "visual": [*model.visual.parameters(), extra]}
    opt = PDMPOptimizer(torch.optim.SGD([*model.trained(), extra], lr=0.1), groups, gammas=GAMMAS)
    for p in (*model.trained(), extra):
        p.grad = torch.ones_like(p)
    with CountOps() as ops:
        opt.scale_grads_()
    assert ops.calls == ["_foreach_mul_"] * 3  # nothing else: no .item(), no copies, no per-tensor ops
    with CountOps() as ops:
        opt.step()
    assert "_local_scalar_dense" not in ops.calls  # no host-device synchronisation in the whole step


def test_lr_mode_step_does_no_tensor_work_of_its_own():
    model, plain_model = TwoModal(), TwoModal()
    opt = PDMPOptimizer(torch.optim.Adam(model.trained(), lr=1e-3), model.groups(), gammas=GAMMAS, mode="lr")
    plain = torch.optim.Adam(
        [{"params": list(m.parameters())} for m in (plain_model.audio, plain_model.visual, plain_model.head)], lr=1e-3
    )
    for m in (model, plain_model):
        loss_of(m, 0).backward()
    with CountOps() as wrapped_ops:
        opt.step()
    with CountOps() as plain_ops:
        plain.step()

    def tensor_ops(calls):  # the wrapper's own step adds at most a profiler range
        return [c for c in calls if not c.startswith("_record_function")]

    assert tensor_ops(wrapped_ops.calls) == tensor_ops(plain_ops.calls)
