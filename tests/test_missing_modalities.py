"""Missing modalities (issue 12).

In training, a modality absent from a batch has no gradient (its encoder did not run): every PDMPOptimizer mode
skips it that step, keeps its optimizer state and its schedule, and raises nothing, as the reference twin
(``PDMPReference``) does. In the analysis, each probe trains and is scored on the samples that have its
modality (absent inputs, ``None`` entries, per-sample masks), and the ranking says how many samples that was.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from _helpers import GAMMAS, TwoModal, batch, standard_state
from torch import Tensor, nn

from pdmp_optim import PDMPOptimizer, scale_encoder_grads
from pdmp_optim.analysis import analyze_modalities, unimodal_histories
from pdmp_optim.reference import PDMPReference


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ============================================================================================== training
class MaybeVisual(TwoModal):
    """TwoModal whose forward accepts ``visual=None``: the visual encoder does not run and zeros take its place,
    as a model does for a sample set without video. Its parameters then get no gradient at all."""

    def forward(self, audio: Tensor, visual: Tensor | None) -> Tensor:
        a = self.audio(audio)
        v = self.visual(visual) if visual is not None else a.new_zeros(a.shape[0], 8)
        return self.head(torch.cat([a, v], dim=1))


PRESENT = [True, True, False, False, True, False]  # whether batch i has the visual modality


def loss_at(model: nn.Module, step: int) -> Tensor:
    x_audio, x_visual, y = batch(step)
    return F.cross_entropy(model(x_audio, x_visual if PRESENT[step] else None), y)


SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
CASES = {  # name: (inner optimizer, mode asked for, mode it runs in)
    "grad-sgd": (lambda ps: torch.optim.SGD(ps, **SGD), "grad", "grad"),
    "lr-sgd": (lambda ps: torch.optim.SGD(ps, **SGD), "lr", "lr"),
    "lr-adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3), "auto", "lr"),
    "lr-adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "auto", "lr"),
    "update-adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), "update", "update"),
    "update-rprop": (lambda ps: torch.optim.Rprop(ps, lr=1e-2), "auto", "update"),
}
ROUNDING = ("lr-sgd", "update-adam", "update-rprop")  # where the twin rounds differently (tests/_helpers.py)


def lrs_by_parameter(opt: torch.optim.Optimizer, model: nn.Module) -> list[float]:
    """Each parameter's learning rate, in the model's order (the fast optimizer splits its groups, the twin not)."""
    lr = {p: g["lr"] for g in opt.param_groups for p in g["params"]}
    return [lr[p] for p in model.parameters()]


def reference_run(case: str, steps: int, set_to_none: bool = True) -> tuple[TwoModal, PDMPReference, list[list[float]]]:
    """The reference twin with a StepLR; each parameter's lr after every step."""
    make, mode, _ = CASES[case]
    model = MaybeVisual()
    opt = PDMPReference(make(model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss_at(model, step).backward()
        opt.step()
        scheduler.step()
        lrs.append(lrs_by_parameter(opt, model))
    return model, opt, lrs


def assert_like_the_twin(
    model: nn.Module, opt: torch.optim.Optimizer, ref: nn.Module, ref_opt: torch.optim.Optimizer, case: str
) -> None:
    """Parameters and each parameter's optimizer state (step counts, momenta, moments) equal the twin's: bit for bit
    in "grad" mode and non-SGD "lr" mode; to rounding where the twin rounds otherwise (SGD's lr mode keeps its
    momentum in other units, update mode multiplies the step in another order)."""
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if case in ROUNDING else {"rtol": 0.0, "atol": 0.0}
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance, msg=lambda m, n=name: f"{case}, {n}: {m}")
    torch.testing.assert_close(standard_state(opt, model), standard_state(ref_opt, ref), **tolerance)


def state_of(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[dict]:
    return [copy.deepcopy(opt.state[p]) if p in opt.state else {} for p in params]


def same_state(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return False
        for key in x:
            if isinstance(x[key], Tensor) and not torch.equal(x[key], y[key]):
                return False
            if not isinstance(x[key], Tensor) and x[key] != y[key]:
                return False
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_skips_an_absent_modality_and_keeps_its_state_and_schedule(case: str) -> None:
    make, mode, kind = CASES[case]
    model = MaybeVisual()
    opt = PDMPOptimizer(make(model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
    assert opt.mode == kind
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    visual = list(model.visual.parameters())
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no error and no warning, from PDMP or the scheduler
        for step, present in enumerate(PRESENT):
            opt.zero_grad()
            loss_at(model, step).backward()
            assert all((p.grad is None) != present for p in visual)
            before = ([p.detach().clone() for p in visual], state_of(opt, visual))
            head_before = model.head.weight.detach().clone()
            opt.step()
            scheduler.step()
            lrs.append(lrs_by_parameter(opt, model))
            assert not torch.equal(model.head.weight, head_before)  # the step happened for the others
            if not present:  # visual: not moved, its optimizer state (momentum, moments, step count) as it was
                assert all(torch.equal(p, old) for p, old in zip(visual, before[0], strict=True))
                assert same_state(before[1], state_of(opt, visual))
    ref, ref_opt, ref_lrs = reference_run(case, len(PRESENT))
    assert_like_the_twin(model, opt, ref, ref_opt, case)
    assert lrs == ref_lrs  # the schedule went on as for the plain optimizer, lr restored after every step


@pytest.mark.parametrize("case", ["grad-sgd", "lr-adam", "update-adam"])
def test_zeroed_instead_of_absent_gradients_step_like_the_plain_optimizer(case: str) -> None:
    """``zero_grad(set_to_none=False)`` leaves zeros, not ``None``: the optimizer then steps the modality (momentum
    carries on), PDMP or not; PDMP scales that step as the twin does. Absent means ``grad is None``."""
    make, mode, _ = CASES[case]
    model = MaybeVisual()
    opt = PDMPOptimizer(make(model.parameters()), model.groups(), gammas=GAMMAS, mode=mode)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(4):
        opt.zero_grad(set_to_none=False)
        loss_at(model, step).backward()
        opt.step()
        scheduler.step()
    ref, ref_opt, _ = reference_run(case, 4, set_to_none=False)
    assert_like_the_twin(model, opt, ref, ref_opt, case)


def test_scale_grads_clipping_and_backward_hooks_with_an_absent_modality() -> None:
    model = MaybeVisual()
    opt = PDMPOptimizer(torch.optim.SGD(model.parameters(), **SGD), model.groups(), gammas=GAMMAS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            opt.zero_grad()
            loss_at(model, step).backward()
            opt.scale_grads_()  # None gradients are left alone
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    # the hook helper replaces PDMPOptimizer's scaling, with a plain optimizer
    hooked = MaybeVisual()
    plain = torch.optim.SGD(hooked.parameters(), **SGD)
    scheduler = torch.optim.lr_scheduler.StepLR(plain, step_size=2, gamma=0.5)
    with scale_encoder_grads(hooked.groups(), GAMMAS):  # the visual encoder's hook simply does not fire
        for step in range(len(PRESENT)):
            plain.zero_grad()
            loss_at(hooked, step).backward()
            plain.step()
            scheduler.step()
    ref, _, _ = reference_run("grad-sgd", len(PRESENT))
    for p, q in zip(hooked.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # hooks agree with grad mode to rounding


# ============================================================================================== analysis
C, QUICK_DIM, SLOW_DIM = 4, 8, 32


def make_split(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """quick: optimization-dominant (a loud cue, right for half the samples); slow: performance-dominant."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, SLOW_DIM, generator=torch.Generator().manual_seed(123))
    means = means / means.norm(dim=1, keepdim=True) * SLOW_DIM**0.5
    y = torch.randint(C, (n,), generator=g)
    shown = torch.where(torch.rand(n, generator=g) < 0.5, y, torch.randint(C, (n,), generator=g))
    quick = torch.randn(n, QUICK_DIM, generator=g)
    quick[:, :C] += 3.0 * F.one_hot(shown, C)
    slow = 0.3 * (0.5 * means[y] + torch.randn(n, SLOW_DIM, generator=g))
    return {"quick": quick, "slow": slow}, y


def masked_batches(n: int, seed: int, size: int, rates: dict[str, float]) -> list:
    """Batches ``(inputs, target, present)``; the rows of absent samples hold NaN, so reading one would diverge."""
    x, y = make_split(n, seed)
    g = torch.Generator().manual_seed(seed + 50)
    present = {m: torch.rand(n, generator=g) < rate for m, rate in rates.items()}
    for m, mask in present.items():
        x[m] = x[m].masked_fill(~mask[:, None], float("nan"))
    return [
        ({m: v[i : i + size] for m, v in x.items()}, y[i : i + size], {m: k[i : i + size] for m, k in present.items()})
        for i in range(0, n, size)
    ]


def make_encoders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "quick": nn.Sequential(nn.Linear(QUICK_DIM, 16), nn.ReLU()),
        "slow": nn.Sequential(nn.Linear(SLOW_DIM, 16), nn.ReLU()),
    }


def fast_sgd(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.03, momentum=0.9)


RATES = {"quick": 0.6, "slow": 0.75}
TRAIN = masked_batches(512, 0, 32, RATES)
VAL = masked_batches(256, 1, 128, RATES)


def present_count(batches: list, modality: str) -> int:
    return sum(int(b[2][modality].sum()) for b in batches)


def test_probes_train_and_score_on_the_samples_that_have_their_modality() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # absent rows (NaN) are never read; the ranking is clear
        ranking = analyze_modalities(make_encoders(), TRAIN, VAL, num_classes=C, epochs=5, seeds=2, optimizer=fast_sgd)
    assert (ranking.performance_dominant, ranking.optimization_dominant) == ("slow", "quick")
    assert ranking.num_samples == {
        m: {"train": present_count(TRAIN, m), "eval": present_count(VAL, m)} for m in ("slow", "quick")
    }
    assert ranking.num_samples["quick"]["eval"] < ranking.num_samples["slow"]["eval"] < 256
    assert "num_samples=" in repr(ranking)


def test_a_masked_probe_is_the_probe_trained_on_its_samples_alone() -> None:
    """slow's history with masks equals its history on batches that keep only the samples with slow."""
    kwargs = dict(num_classes=C, epochs=2, seeds=1, optimizer=fast_sgd)
    masked = unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)

    def only_slow(batches: list) -> list:
        kept = []
        for x, y, present in batches:
            keep = present["slow"]
            if keep.any():
                kept.append(({"quick": x["quick"][keep].nan_to_num(), "slow": x["slow"][keep]}, y[keep]))
        return kept

    filtered = unimodal_histories(make_encoders(), only_slow(TRAIN), only_slow(VAL), **kwargs)
    assert masked["slow"] == filtered["slow"]


def test_absent_and_none_inputs_mean_the_whole_batch_lacks_the_modality() -> None:
    x, y = make_split(256, 0)
    batches = [({m: v[i : i + 32] for m, v in x.items()}, y[i : i + 32]) for i in range(0, 256, 32)]
    batches[1] = ({"quick": batches[1][0]["quick"]}, batches[1][1])  # no "slow" key
    batches[2] = ({"quick": None, "slow": batches[2][0]["slow"]}, batches[2][1])  # quick: None
    all_false = {"slow": torch.zeros(32, dtype=torch.bool)}
    batches[3] = (batches[3][0], batches[3][1], all_false)  # a mask that marks no sample
    ranking = analyze_modalities(make_encoders(), batches, batches[:1], num_classes=C, epochs=1, warn=False)
    assert ranking.num_samples == {m: {"train": 224 if m == "quick" else 192, "eval": 32} for m in ranking.order}


BAD_MASKS = [
    ("mask of floats", {"slow": torch.ones(32)}, r"present\['slow'\] .* must be a boolean tensor of shape \(32,\)"),
    ("mask too short", {"slow": torch.ones(8, dtype=torch.bool)}, r"one entry per sample"),
    ("unknown modality", {"depth": torch.ones(32, dtype=torch.bool)}, r"present of batch 0 .* names \['depth'\]"),
]


@pytest.mark.parametrize(("case", "present", "message"), BAD_MASKS, ids=[c[0] for c in BAD_MASKS])
def test_bad_masks_name_the_fix(case: str, present: dict, message: str) -> None:
    x, y = make_split(32, 0)
    with pytest.raises(ValueError, match=message):
        unimodal_histories(make_encoders(), [(x, y, present)], [(x, y)], num_classes=C, epochs=1)


def test_inputs_must_keep_a_row_per_sample_and_a_subset_must_reach_every_modality() -> None:
    x, y = make_split(32, 0)
    short = {"quick": x["quick"], "slow": x["slow"][:20]}
    with pytest.raises(ValueError, match=r"keep a row for every sample"):
        unimodal_histories(make_encoders(), [(short, y, {"slow": torch.ones(32, dtype=torch.bool)})], [(x, y)],
                           num_classes=C, epochs=1)  # fmt: skip
    batches = [(x, y)] + [({"quick": x["quick"]}, y)] * 7  # slow is in the first of eight batches only
    with pytest.raises(ValueError, match=r"\['slow'\] has no sample in the training batches of run 1/1.*subset="):
        unimodal_histories(make_encoders(), batches, [(x, y)], num_classes=C, epochs=1, subset=0.25, seed=1)
