"""Backward-hook mode (``scale_encoder_grads``) gives, with a plain optimizer, the parameter gradients of PDMP's
``"grad"`` mode; it and a ``PDMPOptimizer`` never both scale a gradient (an optimizer is refused as the hooks'
coefficients, and a ``PDMPOptimizer`` over an encoder that carries hooks is refused).

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

from pdmp_optim import PDMPOptimizer, rank_modalities
from pdmp_optim.backward import EncoderGradScaling, scale_encoder_grads


# ---------------------------------------------------------------------------------------------- fixtures
class Fusion(nn.Module):
    """Encoders -> concat -> linear head, the PDMP paper's fusion, over any encoders: these tests need linear, MLP
    and conv (batch-norm) encoders and three modalities, which the shared ``TwoModal`` does not have."""

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


@settings(max_examples=25, deadline=None)
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


# ------------------------------------------------------------------------------------------------ the hooks
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
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(a, u) for a, u in zip(unscaled_grads(model, inputs), unscaled, strict=True))


def test_modalities_with_gamma_one_keep_their_gradients_bit_for_bit() -> None:
    model, inputs = build("mlp")
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    with scale_encoder_grads(encoders_of(model), {"audio": 1.0, "visual": 4.0, "text": 1.0}) as hooks:
        assert hooks.active  # every encoder is hooked: its gamma may change later
        hooked = unscaled_grads(model, inputs)
    for (name, _), a, u in zip(model.named_parameters(), hooked, unscaled, strict=True):
        if name.startswith("encoders.visual."):
            assert_close_to_rounding([a], [4.0 * u])
        else:  # audio, text and the head: untouched, to the last bit
            assert torch.equal(a, u), name


def test_no_grad_forward_registers_nothing_and_changes_no_output() -> None:
    enc = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = enc(x)
    with scale_encoder_grads({"audio": enc}, {"audio": 3.0}), torch.no_grad():
        out = enc(x)
    assert not out.requires_grad and out.grad_fn is None  # no tensor to hang a gradient hook on, and none hung
    assert torch.equal(out, expected)


def test_a_ranking_supplies_the_gammas() -> None:
    ranking = rank_modalities({"audio": [0.6, 0.62], "visual": [0.3, 0.7]})
    encoders = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
    with scale_encoder_grads(encoders, ranking) as hooks:
        assert hooks.gammas == ranking.gammas() == {"visual": 15.0, "audio": 1 / 15}


def test_assigning_gammas_changes_the_later_backwards() -> None:
    """``hooks.gammas = {...}`` is read at each forward (issue 16, "what fails" 2: there was no way to change them)."""
    model, inputs = build("mlp")
    unscaled = unscaled_grads(copy.deepcopy(model), inputs)
    hooks = scale_encoder_grads(encoders_of(model), {"audio": 1.0, "visual": 1.0, "text": 1.0})
    for gammas in ({"audio": 0.25, "visual": 4.0, "text": 1.0}, {"audio": 1.0, "visual": 1.0, "text": 2.0}):
        hooks.gammas = gammas
        assert hooks.gammas == gammas
        model.zero_grad()
        for (name, _), a, u in zip(model.named_parameters(), unscaled_grads(model, inputs), unscaled, strict=True):
            modality = name.split(".")[1] if name.startswith("encoders.") else None
            assert_close_to_rounding([a], [gammas.get(modality, 1.0) * u])
    for bad, match in (
        ({"audio": 0.0, "visual": 1.0, "text": 1.0}, "finite number > 0"),
        ({"audio": 1.0}, r"no coefficient for \['visual', 'text'\]"),
        ({"audio": 1.0, "visual": 1.0, "text": 1.0, "depth": 2.0}, r"names \['depth'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            hooks.gammas = bad
    assert hooks.gammas == {"audio": 1.0, "visual": 1.0, "text": 2.0}  # a refused mapping changed nothing
    hooks.remove()


# ------------------------------------------------------------------------- hooks and PDMPOptimizer: never both
def test_an_optimizer_is_refused_as_the_coefficients() -> None:
    """Issue 16, "what fails" 2: hooks built from a PDMPOptimizer scaled the layers upstream of the hooks twice."""
    model, _ = build("mlp")
    optimizers = [
        PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual"),
        PDMPOptimizer(torch.optim.AdamW(model.parameters()), encoders_of(model), dominant="visual"),
        torch.optim.SGD(model.parameters(), lr=0.1),
    ]
    last_layers = {m: last_layer(enc) for m, enc in encoders_of(model).items()}
    for opt in optimizers:
        for encoders in (encoders_of(model), last_layers):
            with pytest.raises(TypeError, match=r"takes the coefficients, not an optimizer: .* dict\(opt.gammas\)"):
                scale_encoder_grads(encoders, opt)
    assert all(not m._forward_hooks for m in model.modules())  # nothing was installed


@pytest.mark.parametrize("hooked", ["encoder", "last layer"])
def test_a_pdmp_optimizer_over_an_encoder_that_carries_hooks_is_refused(hooked: str) -> None:
    model, inputs = build("mlp")
    encoders = encoders_of(model)
    targets = encoders if hooked == "encoder" else {m: last_layer(enc) for m, enc in encoders.items()}
    hooks = scale_encoder_grads(targets, {"audio": 0.25, "visual": 4.0, "text": 0.25})
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"would both scale the gradients .*remove\(\) the hooks"):
        PDMPOptimizer(inner, encoders, dominant="visual")
    hooks.remove()
    opt = PDMPOptimizer(inner, encoders, dominant="visual")  # once removed, fine
    loss_of(model, inputs).backward()
    opt.step()


def test_hooks_under_swapped_modality_names_cannot_reach_a_pdmp_optimizer() -> None:
    """Issue 16, "what fails" 2: such hooks were accepted and gave 1/225 of the intended gradient."""
    model, _ = build("linear")
    encoders = encoders_of(model)
    swapped = {"audio": encoders["visual"], "visual": encoders["audio"]}
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders, dominant="visual")
    with pytest.raises(TypeError, match="takes the coefficients, not an optimizer"):
        scale_encoder_grads(swapped, opt)
    other, _ = build("linear")
    other_encoders = encoders_of(other)
    hooks = scale_encoder_grads(
        {"audio": other_encoders["visual"], "visual": other_encoders["audio"]}, dict(opt.gammas)
    )
    with pytest.raises(ValueError, match="would both scale the gradients"):
        PDMPOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other_encoders, dominant="visual")
    hooks.remove()


@pytest.mark.parametrize("kind", ["linear", "mlp", "conv"])
def test_hooks_on_the_last_layer_with_a_plain_optimizer_equal_grad_mode_on_the_whole_encoder(kind: str) -> None:
    """Every layer upstream of the hooked output, inside the encoder, gets gamma once (issue 16, "what fails" 2: with
    a PDMPOptimizer it got gamma twice)."""
    model, inputs = build(kind)
    gammas = {m: 15.0 if i == 0 else 1 / 15 for i, m in enumerate(model.encoders)}
    grad_mode, hooked = copy.deepcopy(model), copy.deepcopy(model)
    opt = PDMPOptimizer(
        torch.optim.SGD(grad_mode.parameters(), lr=0.1, momentum=0.9), encoders_of(grad_mode), gammas=gammas
    )
    plain = torch.optim.SGD(hooked.parameters(), lr=0.1, momentum=0.9)
    last = {m: last_layer(enc) for m, enc in encoders_of(hooked).items()}
    upstream = [
        p
        for m, enc in encoders_of(hooked).items()
        for p in enc.parameters()
        if all(p is not q for q in last[m].parameters())
    ]
    assert (kind == "linear") == (not upstream)  # the MLP and conv encoders have layers before the hooked one
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "an input of encoder .* requires grad", UserWarning)  # the upstream layers
        with scale_encoder_grads(last, gammas):
            for _ in range(3):
                loss_of(grad_mode, inputs).backward()
                opt.scale_grads_()
                loss_of(hooked, inputs).backward()
                assert_close_to_rounding(
                    [p.grad for p in hooked.parameters()], [p.grad for p in grad_mode.parameters()]
                )
                opt.step()
                plain.step()
                opt.zero_grad()
                plain.zero_grad()
    assert_close_to_rounding(list(hooked.parameters()), list(grad_mode.parameters()))


def last_layer(encoder: nn.Module) -> nn.Module:
    """The last submodule with parameters of its own (the encoder itself if it has no submodules)."""
    return [m for m in encoder.modules() if any(True for _ in m.parameters(recurse=False))][-1]


def test_a_step_grad_scaler_skipped_with_hooks_leaves_nothing_behind() -> None:
    """Issue 16, "what fails" 2: a step GradScaler skipped left a record of hooked gradients that made the next step
    unscaled. Hooks keep no record now: every step equals grad mode's, and once removed, the encoders are free."""
    model, inputs = build("mlp")
    gammas = powers_of_two(list(model.encoders))
    grad_mode, hooked = copy.deepcopy(model), copy.deepcopy(model)
    opt = PDMPOptimizer(torch.optim.SGD(grad_mode.parameters(), lr=0.1), encoders_of(grad_mode), gammas=gammas)
    plain = torch.optim.SGD(hooked.parameters(), lr=0.1)
    scalers = [torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1) for _ in range(2)]
    hooks = scale_encoder_grads(encoders_of(hooked), gammas)
    for step in range(4):
        for m, o, scaler in ((grad_mode, opt, scalers[0]), (hooked, plain, scalers[1])):
            scaler.scale(loss_of(m, inputs)).backward()
            if step == 1:
                m.head.weight.grad[0, 0] = float("inf")
            scaler.step(o)
            scaler.update()
            m.zero_grad()
        assert_close_to_rounding(list(hooked.parameters()), list(grad_mode.parameters()))
    hooks.remove()
    handover = PDMPOptimizer(plain, encoders_of(hooked), gammas=gammas)  # refused if anything were still installed
    for m, o in ((grad_mode, opt), (hooked, handover)):
        loss_of(m, inputs).backward()
        o.step()
    assert_close_to_rounding(list(hooked.parameters()), list(grad_mode.parameters()))


def _hooks_after_the_optimizer(model: Fusion) -> tuple[PDMPOptimizer, EncoderGradScaling]:
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), encoders_of(model), dominant="visual")
    return opt, scale_encoder_grads(encoders_of(model), dict(opt.gammas))


def _optimizer_over_the_parameters(model: Fusion) -> tuple[PDMPOptimizer, EncoderGradScaling]:
    hooks = scale_encoder_grads(encoders_of(model), {"audio": 1 / 15, "visual": 15.0, "text": 1 / 15})
    params = {m: list(enc.parameters()) for m, enc in encoders_of(model).items()}
    return PDMPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), params, dominant="visual"), hooks


@pytest.mark.parametrize(
    "setup",
    [_hooks_after_the_optimizer, _optimizer_over_the_parameters],
    ids=["hooks built after the optimizer", "groups given as parameters"],
)
def test_hooks_and_a_pdmp_optimizer_never_both_scale_a_gradient(setup) -> None:
    model, inputs = build("mlp")
    expected = grad_mode_grads(copy.deepcopy(model), inputs, {"audio": 1 / 15, "visual": 15.0, "text": 1 / 15})
    try:
        opt, hooks = setup(model)
        with hooks:
            loss_of(model, inputs).backward()
        opt.scale_grads_()
    except (TypeError, ValueError, RuntimeError):
        return  # refused loudly: the promise holds
    assert_close_to_rounding([p.grad for p in model.parameters()], expected)


# ---------------------------------------------------------------------------------------- validation
def test_invalid_input_fails_with_a_message_naming_the_fix() -> None:
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    g = {"audio": 2.0, "visual": 0.5}
    with pytest.raises(TypeError, match="groups must map"):
        scale_encoder_grads([a, v], g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups is empty"):
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
    with pytest.raises(TypeError, match="gammas must map modality -> coefficient, or be a ModalityRanking"):
        scale_encoder_grads({"audio": a}, [2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"groups\['audio'\] and groups\['visual'\] share a Linear"):
        scale_encoder_grads({"audio": a, "visual": a}, g)
    with pytest.raises(ValueError, match="share a Linear; each modality needs its own encoder"):
        scale_encoder_grads({"audio": nn.Sequential(a, nn.ReLU()), "visual": a}, g)
    tied = nn.Linear(2, 2)
    tied.weight = a.weight
    with pytest.raises(ValueError, match=r"share a parameter of shape \(2, 2\)"):
        scale_encoder_grads({"audio": a, "visual": tied}, g)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        scale_encoder_grads({"audio": frozen}, {"audio": 2.0})
    assert not a._forward_hooks and not v._forward_hooks  # nothing refused was installed


class Weird(nn.Module):
    """An encoder returning a set, which the hooks cannot walk."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> object:
        return {self.lin(x)}


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


class Derived(nn.Module):
    """An encoder returning its features and a projection of them (as Hugging Face returns ``last_hidden_state``
    and ``pooler_output``), or the same tensor twice."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.body, self.proj, self.twice = nn.Linear(3, 4), nn.Linear(4, 4), twice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return (h, h) if self.twice else (h, self.proj(h))


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("use", ["first", "second", "both"])
def test_outputs_computed_from_each_other_are_scaled_once_per_path(twice: bool, use: str) -> None:
    """Attack finding: hooks on every returned tensor scaled a path through two of them gamma**2 times."""
    torch.manual_seed(0)
    enc, x = Derived(twice), torch.randn(5, 3)
    ref = copy.deepcopy(enc)

    def loss(e: nn.Module) -> torch.Tensor:
        first, second = e(x)
        return {"first": first.sum(), "second": (second**2).sum(), "both": first.sum() + (second**2).sum()}[use]

    loss(ref).backward()
    with scale_encoder_grads({"audio": enc}, {"audio": 4.0}):
        loss(enc).backward()
    for p, q in zip(enc.parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, 4.0 * q.grad)


def test_a_hugging_face_encoder_with_pooler_and_hidden_states_gets_gamma_once() -> None:
    """BertModel's pooler_output and hidden_states are computed from each other: every parameter gets gamma once."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()  # (eval: no dropout, so both runs see the same network)
    ref, ids = copy.deepcopy(bert), torch.randint(50, (2, 5))

    def loss(model: nn.Module) -> torch.Tensor:
        out = model(ids, output_hidden_states=True)
        return out.pooler_output.sum() + sum(h.sum() for h in out.hidden_states)

    loss(ref).backward()
    with scale_encoder_grads({"text": bert}, {"text": 2.0}):
        loss(bert).backward()
    for p, q in zip(bert.parameters(), ref.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, 2.0 * q.grad, rtol=1e-4, atol=1e-6)


def test_hooks_and_an_optimizer_over_parameters_frozen_when_the_hooks_were_built_refuse_each_other():
    """Attack finding: frozen parameters (which may thaw) were left out of the hooks' claim."""
    enc, visual, head = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 3), nn.Linear(3, 1)
    enc[0].requires_grad_(False)  # unfrozen later, say
    hooks = scale_encoder_grads({"audio": enc}, {"audio": 4.0})
    inner = torch.optim.SGD([*visual.parameters(), *head.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="would both scale the gradients"):
        PDMPOptimizer(inner, {"audio": enc[0], "visual": visual}, gammas={"audio": 4.0, "visual": 0.25})
    hooks.remove()
