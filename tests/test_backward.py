"""Backward-hook mode (``scale_encoder_grads``) gives the parameter gradients of PDMP's ``"grad"`` mode.

How results are compared, and why: the hook multiplies the *upstream* gradient by gamma before the chain rule,
``"grad"`` mode multiplies the finished parameter gradient after it. In real arithmetic both are
``gamma * dL/dtheta``; in floating point they round differently. Even a power-of-two gamma, whose scaling is
exact, does not make them bitwise equal in general: the hook hands backward a fresh contiguous tensor where it had
a strided view (the ``torch.cat`` backward's slice), and the matmul kernels may then sum in another order (a hook
multiplying by exactly 1.0 already changes the last bits; hypothesis found such a case). So results are compared to
rounding: ``rtol=1e-5`` plus an ``atol`` of ``1e-5`` times the largest gradient magnitude in the model, since the
error is a few ulps of the *summands*, not of the result, which can be tiny through cancellation (a conv bias
followed by batch norm has a gradient that is zero up to rounding noise; float32 epsilon is 1.2e-7).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim.backward import EncoderGradScaling, scale_encoder_grads


# ---------------------------------------------------------------------------------------------- fixtures
class Fusion(nn.Module):
    """Encoders -> concat -> linear head, the PDMP paper's fusion."""

    def __init__(self, encoders: dict[str, nn.Module], dims: list[int], n_classes: int = 5) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = nn.Linear(sum(dims), n_classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([enc(inputs[m]) for m, enc in self.encoders.items()], dim=1))


def conv_encoder(c_in: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def build(kind: str) -> tuple[Fusion, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    batch = 7
    if kind == "linear":
        model = Fusion({"audio": nn.Linear(5, 4), "visual": nn.Linear(3, 6)}, [4, 6])
        inputs = {"audio": torch.randn(batch, 5), "visual": torch.randn(batch, 3)}
    elif kind == "mlp":
        encoders = {
            "audio": nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8)),
            "visual": nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 4)),
            "text": nn.Sequential(nn.Linear(4, 10), nn.GELU(), nn.Linear(10, 6)),
        }
        model = Fusion(encoders, [8, 4, 6])
        inputs = {"audio": torch.randn(batch, 5), "visual": torch.randn(batch, 9), "text": torch.randn(batch, 4)}
    elif kind == "conv":
        model = Fusion({"audio": conv_encoder(1), "visual": conv_encoder(3)}, [8, 8])
        inputs = {"audio": torch.randn(batch, 1, 8, 8), "visual": torch.randn(batch, 3, 8, 8)}
    else:
        raise ValueError(kind)
    return model, inputs


def loss_of(model: Fusion, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    target = torch.arange(next(iter(inputs.values())).shape[0]) % 5
    return nn.functional.cross_entropy(model(inputs), target)


def encoders_of(model: Fusion) -> dict[str, nn.Module]:
    return dict(model.encoders.items())


def grad_mode_grads(model: Fusion, inputs: dict[str, torch.Tensor], gammas: dict[str, float]) -> list[torch.Tensor]:
    """Parameter gradients as PDMPOptimizer(mode="grad") hands them to its inner optimizer."""
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), gammas=gammas, mode="grad")
    loss_of(model, inputs).backward()
    opt.scale_grads_()
    return [p.grad.clone() for p in model.parameters()]


def hook_mode_grads(model: Fusion, inputs: dict[str, torch.Tensor], gammas: dict[str, float]) -> list[torch.Tensor]:
    with scale_encoder_grads(encoders_of(model), gammas):
        loss_of(model, inputs).backward()
    return [p.grad.clone() for p in model.parameters()]


def unscaled_grads(model: Fusion, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    loss_of(model, inputs).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_close_to_rounding(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    scale = max(float(e.detach().abs().max()) for e in expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * scale)


def powers_of_two(modalities: list[str]) -> dict[str, float]:
    return {m: 2.0 ** (3 - 2 * i) for i, m in enumerate(modalities)}  # 8, 1/2, 1/8


# ---------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("kind", ["linear", "mlp", "conv"])
def test_power_of_two_gammas_give_the_grad_mode_gradients(kind: str) -> None:
    model, inputs = build(kind)
    gammas = powers_of_two(list(model.encoders))
    expected = grad_mode_grads(copy.deepcopy(model), inputs, gammas)
    actual = hook_mode_grads(copy.deepcopy(model), inputs, gammas)
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    assert_close_to_rounding(actual, expected)
    # and the scaling really happened: encoder gradients differ from the unscaled ones, the head's do not
    n_head = len(list(model.head.parameters()))
    assert all(not torch.equal(a, u) for a, u in zip(actual[:-n_head], unscaled[:-n_head], strict=True))
    assert all(torch.equal(a, u) for a, u in zip(actual[-n_head:], unscaled[-n_head:], strict=True))


@pytest.mark.parametrize("kind", ["linear", "mlp", "conv"])
def test_paper_gammas_match_grad_mode_to_rounding(kind: str) -> None:
    model, inputs = build(kind)
    modalities = list(model.encoders)
    gammas = {m: 15.0 if i == 0 else 1 / 15 for i, m in enumerate(modalities)}
    expected = grad_mode_grads(copy.deepcopy(model), inputs, gammas)
    actual = hook_mode_grads(copy.deepcopy(model), inputs, gammas)
    assert_close_to_rounding(actual, expected)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 6),
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    hidden=st.integers(1, 12),
    exponents=st.lists(st.integers(-6, 6), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_equal_to_rounding_for_any_mlp_shapes_and_power_of_two_gammas(
    batch: int, widths: list[int], hidden: int, exponents: list[int], seed: int
) -> None:
    torch.manual_seed(seed)
    encoders = {
        f"m{i}": nn.Sequential(nn.Linear(w, hidden), nn.ReLU(), nn.Linear(hidden, w + 1)) for i, w in enumerate(widths)
    }
    model = Fusion(encoders, [w + 1 for w in widths])
    inputs = {f"m{i}": torch.randn(batch, w) for i, w in enumerate(widths)}
    gammas = {m: 2.0 ** exponents[i] for i, m in enumerate(encoders)}
    expected = grad_mode_grads(copy.deepcopy(model), inputs, gammas)
    actual = hook_mode_grads(copy.deepcopy(model), inputs, gammas)
    assert_close_to_rounding(actual, expected)


def test_sgd_step_with_weight_decay_and_momentum_matches_pdmp_grad_mode() -> None:
    # weight decay is added inside SGD.step after the gradient is final: unscaled in both modes
    model, inputs = build("mlp")
    gammas = powers_of_two(list(model.encoders))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = PDMPOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05), encoders_of(a), gammas=gammas
    )
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    hooks = scale_encoder_grads(encoders_of(b), gammas)
    for _ in range(3):
        loss_of(a, inputs).backward()
        opt_a.step()
        opt_a.zero_grad()
        loss_of(b, inputs).backward()
        opt_b.step()
        opt_b.zero_grad()
    hooks.remove()
    assert_close_to_rounding(list(a.parameters()), list(b.parameters()))


def test_gradient_accumulation_over_micro_batches_is_scaled_once_overall() -> None:
    model, inputs = build("linear")
    gammas = powers_of_two(list(model.encoders))
    halves = [{m: x[:3] for m, x in inputs.items()}, {m: x[3:] for m, x in inputs.items()}]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = PDMPOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), encoders_of(a), gammas=gammas)
    for half in halves:
        loss_of(a, half).backward()
    opt_a.scale_grads_()
    with scale_encoder_grads(encoders_of(b), gammas):
        for half in halves:
            loss_of(b, half).backward()
    assert all(torch.equal(pa.grad, pb.grad) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


class TwoHeads(nn.Module):
    """An encoder with a tuple/dict output; every returned tensor feeds the loss."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.left, self.right = nn.Linear(6, 3), nn.Linear(6, 2)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> object:
        h = torch.relu(self.trunk(x))
        if self.as_dict:
            return {"left": self.left(h), "extra": [self.right(h), None], "n": 2}
        return self.left(h), self.right(h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_scale_every_tensor(as_dict: bool) -> None:
    torch.manual_seed(1)
    enc = TwoHeads(as_dict)
    x = torch.randn(5, 4)

    def loss(e: TwoHeads) -> torch.Tensor:
        out = e(x)
        parts = [out["left"], out["extra"][0]] if as_dict else list(out)
        return sum((p**2).sum() for p in parts)

    ref = copy.deepcopy(enc)
    loss(ref).backward()
    with scale_encoder_grads({"audio": enc}, {"audio": 4.0}):
        loss(enc).backward()
    assert all(torch.equal(p.grad, 4.0 * q.grad) for p, q in zip(enc.parameters(), ref.parameters(), strict=True))


def test_an_encoder_called_twice_is_scaled_on_both_paths() -> None:
    torch.manual_seed(2)
    enc, head = nn.Linear(3, 4), nn.Linear(8, 1)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    head(torch.cat([enc(x1), enc(x2)], 1)).sum().backward()
    expected = [0.25 * p.grad for p in enc.parameters()]
    enc.zero_grad()
    with scale_encoder_grads({"visual": enc}, {"visual": 0.25}):
        head(torch.cat([enc(x1), enc(x2)], 1)).sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(enc.parameters(), expected, strict=True))


# ------------------------------------------------------------------------------- where the modes differ
def test_loss_level_l2_penalty_is_not_scaled_unlike_grad_mode() -> None:
    # documented difference: a term that reaches the parameters without passing through the output
    enc = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref = copy.deepcopy(enc)
    (ref(x).sum() + (ref.weight**2).sum()).backward()
    with scale_encoder_grads({"audio": enc}, {"audio": 2.0}):
        (enc(x).sum() + (enc.weight**2).sum()).backward()
    penalty = 2 * ref.weight.detach()
    assert torch.allclose(enc.weight.grad, 2.0 * (ref.weight.grad - penalty) + penalty)
    assert not torch.allclose(enc.weight.grad, 2.0 * ref.weight.grad)


def test_trained_stem_upstream_of_the_encoder_gets_scaled_and_a_warning_says_so() -> None:
    stem, enc = nn.Linear(3, 3), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref_stem = copy.deepcopy(stem)
    copy.deepcopy(enc)(ref_stem(x)).sum().backward()
    hooks = scale_encoder_grads({"audio": enc}, {"audio": 2.0})
    with pytest.warns(UserWarning, match="requires grad"):
        enc(stem(x)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(stem(x)).sum()  # warned once per handle, not on every step
    hooks.remove()
    assert torch.equal(stem.weight.grad, 2.0 * ref_stem.weight.grad)


# ------------------------------------------------------------------------------------ handle behaviour
def test_remove_and_context_exit_restore_unscaled_gradients() -> None:
    model, inputs = build("conv")
    gammas = powers_of_two(list(model.encoders))
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    hooks = scale_encoder_grads(encoders_of(model), gammas)
    assert isinstance(hooks, EncoderGradScaling) and hooks.active and hooks.gammas == gammas
    hooks.remove()
    hooks.remove()  # harmless
    assert not hooks.active and "removed" in repr(hooks)
    assert all(torch.equal(a, u) for a, u in zip(unscaled_grads(model, inputs), unscaled, strict=True))
    model.zero_grad()
    with scale_encoder_grads(encoders_of(model), gammas):
        pass
    assert all(torch.equal(a, u) for a, u in zip(unscaled_grads(model, inputs), unscaled, strict=True))


def test_unit_gamma_installs_no_hook_and_leaves_the_gradients_bit_for_bit() -> None:
    model, inputs = build("mlp")
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    with scale_encoder_grads(encoders_of(model), {"audio": 1.0, "visual": 1.0, "text": 1.0}) as hooks:
        assert hooks.gammas == {"audio": 1.0, "visual": 1.0, "text": 1.0}
        assert not hooks.active and "removed" in repr(hooks)  # nothing to scale: no hook at all
        assert all(not m._forward_hooks for enc in model.encoders.values() for m in enc.modules())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hooked = unscaled_grads(model, inputs)
    assert all(torch.equal(a, u) for a, u in zip(hooked, unscaled, strict=True))
    # with PDMPOptimizer scaling the same modalities, unit-gamma hooks are no double scaling: its step works
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    with scale_encoder_grads(encoders_of(model), {"audio": 1.0, "visual": 1.0, "text": 1.0}):
        opt.step()


def test_only_the_modalities_with_a_gamma_other_than_one_are_hooked() -> None:
    model, inputs = build("mlp")
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    with scale_encoder_grads(encoders_of(model), {"audio": 1.0, "visual": 4.0, "text": 1.0}) as hooks:
        assert hooks.active
        assert [name for name, enc in model.encoders.items() if enc._forward_hooks] == ["visual"]
        hooked = unscaled_grads(model, inputs)
    for (name, _), a, u in zip(model.named_parameters(), hooked, unscaled, strict=True):
        if name.startswith("encoders.visual."):
            assert_close_to_rounding([a], [4.0 * u])
        else:  # audio, text and the head: untouched, to the last bit
            assert torch.equal(a, u), name
    assert not model.encoders["visual"]._forward_hooks  # and leaving the context removed the hook


def test_no_grad_forward_registers_nothing_and_changes_no_output() -> None:
    enc = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = enc(x)
    with scale_encoder_grads({"audio": enc}, {"audio": 3.0}), torch.no_grad():
        out = enc(x)
    assert not out.requires_grad and out.grad_fn is None  # no tensor to hang a gradient hook on, and none hung
    assert torch.equal(out, expected)


def test_pdmp_optimizer_supplies_gammas_and_refuses_to_scale_twice() -> None:
    model, inputs = build("mlp")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = PDMPOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), encoders_of(a), dominant="visual", gamma_p=4.0)
    opt_b = PDMPOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), encoders_of(b), dominant="visual", gamma_p=4.0)
    loss_of(a, inputs).backward()
    opt_a.step()
    hooks = scale_encoder_grads(encoders_of(b), opt_b)
    assert hooks.gammas == opt_b.gammas == {"audio": 0.25, "visual": 4.0, "text": 0.25}
    loss_of(b, inputs).backward()
    opt_b.step()  # leaves the hooked modalities to the hooks: each gradient scaled once
    assert_close_to_rounding(list(b.parameters()), list(a.parameters()))
    hooks.remove()
    opt_a.zero_grad()
    opt_b.zero_grad()
    for opt, model in ((opt_a, a), (opt_b, b)):
        loss_of(model, inputs).backward()
        opt.step()  # without hooks the optimizer scales again
    assert_close_to_rounding(list(b.parameters()), list(a.parameters()))


def test_hooks_from_a_mapping_and_a_pdmp_optimizer_over_the_same_parameters_refuse_whichever_comes_second() -> None:
    model, inputs = build("mlp")
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    with pytest.raises(RuntimeError, match="would be scaled twice"):
        scale_encoder_grads(encoders_of(model), dict(opt.gammas))  # a plain dict: 0.1 noticed nothing
    del opt
    hooks = scale_encoder_grads(encoders_of(model), {"audio": 0.25, "visual": 4.0, "text": 0.25})  # no optimizer now
    with pytest.raises(RuntimeError, match="would be scaled twice"):
        PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    hooks.remove()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    loss_of(model, inputs).backward()
    opt.step()


def test_hooks_built_from_an_optimizer_follow_its_gammas_and_its_scheduler_does_not_warn() -> None:
    model, inputs = build("mlp")
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    with scale_encoder_grads(encoders_of(model), opt) as hooks, warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.gammas = {"audio": 1.0, "visual": 2.0, "text": 1.0}
        assert hooks.gammas == {"audio": 1.0, "visual": 2.0, "text": 1.0}
        loss_of(model, inputs).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        scheduler.step()
    # the hooks used the new gammas (visual x2, the rest x1), and opt.step() did not scale them again
    for (name, _), g, u in zip(model.named_parameters(), grads, unscaled, strict=True):
        assert_close_to_rounding([g], [2.0 * u if name.startswith("encoders.visual.") else u])
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b.add(g, alpha=-0.1))  # a plain SGD step on those gradients


# ---------------------------------------------------------------------------------------- validation
def test_invalid_input_fails_with_a_message_naming_the_fix() -> None:
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    g = {"audio": 2.0, "visual": 0.5}
    with pytest.raises(TypeError, match="encoders must map"):
        scale_encoder_grads([a, v], g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="encoders is empty"):
        scale_encoder_grads({}, g)
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        scale_encoder_grads({"audio": list(a.parameters())}, {"audio": 2.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="non-empty strings"):
        scale_encoder_grads({"": a}, {"": 2.0})
    with pytest.raises(ValueError, match=r"no gamma for \['visual'\]"):
        scale_encoder_grads({"audio": a, "visual": v}, {"audio": 2.0})
    with pytest.raises(ValueError, match=r"no encoder for \['visual'\]"):
        scale_encoder_grads({"audio": a}, g)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number > 0"):
            scale_encoder_grads({"audio": a}, {"audio": bad})
    with pytest.raises(TypeError, match="must be a number"):
        scale_encoder_grads({"audio": a}, {"audio": True})
    with pytest.raises(TypeError, match="gammas must map"):
        scale_encoder_grads({"audio": a}, [2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="or a PDMPOptimizer"):
        scale_encoder_grads({"audio": a}, torch.optim.SGD(a.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share a module"):
        scale_encoder_grads({"audio": a, "visual": a}, g)
    with pytest.raises(ValueError, match="share a module"):
        scale_encoder_grads({"audio": nn.Sequential(a, nn.ReLU()), "visual": a}, g)
    tied = nn.Linear(2, 2)
    tied.weight = a.weight
    with pytest.raises(ValueError, match="in both encoders"):
        scale_encoder_grads({"audio": a, "visual": tied}, g)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        scale_encoder_grads({"audio": frozen}, {"audio": 2.0})
    adam = PDMPOptimizer(torch.optim.AdamW([*a.parameters(), *v.parameters()]), {"audio": a, "visual": v}, gammas=g)
    with pytest.raises(ValueError, match="'lr' mode"):
        scale_encoder_grads({"audio": a, "visual": v}, adam)


class Weird(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> object:
        return {self.lin(x)}  # a set: not a supported container


def test_unsupported_output_type_is_rejected_at_forward() -> None:
    enc = Weird()
    with scale_encoder_grads({"audio": enc}, {"audio": 2.0}), pytest.raises(TypeError, match="returned a set"):
        enc(torch.randn(1, 2))


def test_output_modified_in_place_downstream_is_still_scaled() -> None:
    # the tensor hook is registered before fusion's in-place op; autograd fires it on the pre-op gradient
    torch.manual_seed(3)
    enc, x = nn.Linear(3, 4), torch.randn(5, 3)
    ref = copy.deepcopy(enc)

    def loss(e: nn.Module) -> torch.Tensor:
        out = e(x)
        out.relu_()
        return (out**2).sum()

    loss(ref).backward()
    with scale_encoder_grads({"audio": enc}, {"audio": 4.0}):
        loss(enc).backward()
    assert all(torch.equal(p.grad, 4.0 * q.grad) for p, q in zip(enc.parameters(), ref.parameters(), strict=True))
