"""pdmp_optim.diagnostics: the paper's logit ratio w and the per-modality gradient-norm readout."""

from __future__ import annotations

import pytest
import torch
from _helpers import GAMMAS, TwoModal, loss_fn, make_batches
from torch.overrides import TorchFunctionMode

from pdmp_optim import PDMPOptimizer
from pdmp_optim.diagnostics import logit_ratio, modality_grad_norms


class CallCounter(TorchFunctionMode):
    """Counts torch-function calls by name (real calls pass through unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def split_logits(model, batch):
    """Each modality's contribution to the fused logits (the head's columns reading that modality)."""
    x_a, x_v, _ = batch
    h_a, h_v = model.audio(x_a), model.visual(x_v)
    w = model.head.weight
    return {"audio": h_a @ w[:, :8].T, "visual": h_v @ w[:, 8:].T}


def test_two_modalities_give_the_papers_w():
    model, batch = TwoModal(), make_batches(1)[0]
    s = split_logits(model, batch)
    # the split is faithful: the parts add up to the fused logits minus the bias
    torch.testing.assert_close(s["audio"] + s["visual"] + model.head.bias, model(batch[0], batch[1]))
    w = s["audio"].abs().sum() / s["visual"].abs().sum()
    ratios = logit_ratio(s)
    assert set(ratios) == {"audio", "visual"}
    torch.testing.assert_close(ratios["audio"], w.detach())
    torch.testing.assert_close(ratios["visual"], 1 / w.detach())
    by_reference = logit_ratio(s, reference="visual")
    assert set(by_reference) == {"audio"}
    torch.testing.assert_close(by_reference["audio"], w.detach())


def test_many_modalities_against_the_rest_and_against_a_reference():
    g = torch.Generator().manual_seed(0)
    s = {m: torch.randn(5, 3, generator=g) * scale for m, scale in (("a", 1.0), ("v", 3.0), ("t", 0.5))}
    sums = {m: t.abs().sum() for m, t in s.items()}
    ratios = logit_ratio(s)
    for m in s:
        rest = sum(v for k, v in sums.items() if k != m)
        torch.testing.assert_close(ratios[m], sums[m] / rest)
    to_t = logit_ratio(s, reference="t")
    assert list(to_t) == ["a", "v"]
    for m in ("a", "v"):
        torch.testing.assert_close(to_t[m], sums[m] / sums["t"])


def test_logit_ratio_is_detached_float32_and_does_not_read_values():
    s = {"audio": torch.randn(4, 3, requires_grad=True), "visual": torch.randn(4, 3).half()}
    with CallCounter() as counter:
        ratios = logit_ratio(s)
    assert not any(name in counter.calls for name in ("item", "tolist", "__bool__", "__float__"))
    for value in ratios.values():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad
    expected = s["audio"].detach().abs().sum() / s["visual"].float().abs().sum()
    torch.testing.assert_close(ratios["audio"], expected)


@pytest.mark.parametrize(
    ("arg", "kwargs", "error", "match"),
    [
        ({"audio": torch.ones(2)}, {}, ValueError, "at least two modalities"),
        ({"audio": torch.ones(2), "visual": [1.0]}, {}, TypeError, r"logits_by_modality\['visual'\]"),
        ({"audio": torch.ones(2), "visual": torch.ones(2)}, {"reference": "text"}, ValueError, "reference='text'"),
        ([torch.ones(2), torch.ones(2)], {}, TypeError, r"logits_by_modality must map .*logits tensor"),
        ({0: torch.ones(2), 1: torch.ones(2)}, {}, TypeError, "modality names must be non-empty strings"),
    ],
)
def test_logit_ratio_rejects_bad_input(arg, kwargs, error, match):
    with pytest.raises(error, match=match):
        logit_ratio(arg, **kwargs)


def _opt_with_grads(inner_cls=torch.optim.SGD, **inner_kwargs):
    model = TwoModal()
    opt = PDMPOptimizer(inner_cls(model.parameters(), lr=0.1, **inner_kwargs), model.groups(), gammas=GAMMAS)
    loss_fn(model, make_batches(1)[0]).backward()
    return model, opt


def _by_hand(params):
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()


def test_grad_norms_before_and_after_scale_grads():
    model, opt = _opt_with_grads(momentum=0.9)
    before = modality_grad_norms(opt)
    assert set(before) == {"audio", "visual"}
    for m, params in model.modality_params().items():
        torch.testing.assert_close(before[m], _by_hand(params))
    opt.scale_grads_()
    after = modality_grad_norms(opt, include_shared=True)
    assert set(after) == {"audio", "visual", None}
    for m in ("audio", "visual"):
        torch.testing.assert_close(after[m], GAMMAS[m] * before[m])
    torch.testing.assert_close(after[None], _by_hand(model.head.parameters()))


def test_grad_norms_in_lr_mode_read_the_gradients_backward_left():
    model, opt = _opt_with_grads(torch.optim.Adam)
    assert opt.mode == "lr"  # the coefficient lives in the learning rate: the gradients are never scaled
    norms = modality_grad_norms(opt)
    for m, params in model.modality_params().items():
        torch.testing.assert_close(norms[m], _by_hand(params))


def test_grad_norms_skip_missing_grads_and_read_zero_for_a_modality_without_any():
    model, opt = _opt_with_grads()
    model.audio[0].bias.grad = None
    model.audio[2].weight.grad = None
    for p in model.visual.parameters():
        p.grad = None
    norms = modality_grad_norms(opt)
    torch.testing.assert_close(norms["audio"], _by_hand([model.audio[0].weight, model.audio[2].bias]))
    assert torch.equal(norms["visual"], torch.zeros(()))


def test_grad_norms_use_one_foreach_norm_per_modality_bucket_and_never_read_values():
    model = TwoModal()
    audio_bias = torch.nn.Parameter(model.audio[0].bias.detach().double())  # audio spans float32 and float64
    params = [model.audio[0].weight, audio_bias, *model.visual.parameters(), *model.head.parameters()]
    opt = PDMPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        {"audio": [model.audio[0].weight, audio_bias], "visual": model.visual},
        gammas=GAMMAS,
    )
    for p in opt.params_by_modality()["audio"] + list(model.visual.parameters()):
        p.grad = torch.ones_like(p)
    with CallCounter() as counter:
        norms = modality_grad_norms(opt)
    assert counter.calls.count("_foreach_norm") == 3  # audio: two (dtype) buckets, visual: one
    assert not any(name in counter.calls for name in ("item", "tolist", "__bool__", "__float__"))
    torch.testing.assert_close(norms["audio"], torch.tensor(float(8 * 6 + 8)).sqrt(), check_dtype=False)


def test_grad_norms_reject_a_plain_optimizer():
    model = TwoModal()
    with pytest.raises(TypeError, match="needs a PDMPOptimizer"):
        modality_grad_norms(torch.optim.SGD(model.parameters(), lr=0.1))


class SparseSeen(TorchFunctionMode):
    """Records the layouts of the tensors handed to each torch function."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.layout]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        self.calls.append(
            (getattr(func, "__name__", str(func)), [t.layout for t in flat if isinstance(t, torch.Tensor)])
        )
        return func(*args, **(kwargs or {}))


def test_grad_norms_of_sparse_embedding_gradients():
    """0.1 crashed here (linalg_vector_norm has no sparse kernel); repeated indices must be summed first."""
    torch.manual_seed(0)
    text, audio, head = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(3, 4), torch.nn.Linear(8, 2)
    params = [*text.parameters(), *audio.parameters(), *head.parameters()]
    mixed = [text.weight, audio.weight]  # one modality with a sparse and a dense gradient
    opt = PDMPOptimizer(
        torch.optim.SGD(params, lr=0.1), {"text": mixed, "audio": [audio.bias]}, gammas={"text": 2.0, "audio": 0.5}
    )
    tokens = torch.tensor([[1, 1, 2], [1, 5, 5]])  # repeated indices: the sparse gradient is uncoalesced
    features = torch.cat([text(tokens).mean(1), audio(torch.randn(2, 3))], dim=1)
    head(features).pow(2).sum().backward()
    assert text.weight.grad.is_sparse and not text.weight.grad.is_coalesced()
    with SparseSeen() as seen:
        norms = modality_grad_norms(opt, include_shared=True)
    dense_text = text.weight.grad.to_dense()
    expected = torch.cat([dense_text.flatten(), audio.weight.grad.flatten()]).norm()
    torch.testing.assert_close(norms["text"], expected)
    torch.testing.assert_close(norms["audio"], audio.bias.grad.norm())
    torch.testing.assert_close(norms[None], _by_hand(head.parameters()))
    assert not any(name in ("item", "tolist", "__bool__", "__float__") for name, _ in seen.calls)
    foreach = [layouts for name, layouts in seen.calls if name == "_foreach_norm"]
    assert foreach and all(layout == torch.strided for layouts in foreach for layout in layouts)


def test_grad_norms_need_nothing_newer_than_the_declared_torch(monkeypatch):
    """torch.nn.utils.get_total_norm appeared in torch 2.6; the package declares an older floor."""
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    model, opt = _opt_with_grads()
    norms = modality_grad_norms(opt)
    for m, params in model.modality_params().items():
        torch.testing.assert_close(norms[m], _by_hand(params))
