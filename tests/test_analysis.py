"""analyze_modalities (issue 7): the constructed roles come out, the user's encoders are untouched, bad input is
a ValueError naming the fix, runs are reproducible, and doubtful rankings warn once."""

from __future__ import annotations

import dataclasses
import inspect
import io
import itertools
import math
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pdmp_optim import PDMPOptimizer, rank_modalities
from pdmp_optim.analysis import analyze_modalities, probes, unimodal_histories
from pdmp_optim.ranking import ModalityRanking

C = 4
QUICK_DIM, SLOW_DIM = 8, 32


def make_split(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A two-modality task built so that "quick" is optimization-dominant and "slow" performance-dominant.

    quick: a strong one-hot cue that shows the true class for half the samples and a random class for the rest,
    so it is learned in an epoch and capped near 0.5 + 0.5 / C. slow: a weak class-mean cue over 32 noisy
    dimensions, everything scaled by 0.3 so that SGD needs several epochs; it ends near 0.9.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, SLOW_DIM, generator=torch.Generator().manual_seed(123))
    means = means / means.norm(dim=1, keepdim=True) * SLOW_DIM**0.5
    y = torch.randint(C, (n,), generator=g)
    shown = torch.where(torch.rand(n, generator=g) < 0.5, y, torch.randint(C, (n,), generator=g))
    quick = torch.randn(n, QUICK_DIM, generator=g)
    quick[:, :C] += 3.0 * F.one_hot(shown, C)
    slow = 0.3 * (0.5 * means[y] + torch.randn(n, SLOW_DIM, generator=g))
    return {"quick": quick, "slow": slow}, y


def as_batches(split: tuple[dict[str, torch.Tensor], torch.Tensor], size: int) -> list:
    x, y = split
    return [({m: v[i : i + size] for m, v in x.items()}, y[i : i + size]) for i in range(0, len(y), size)]


TRAIN = as_batches(make_split(512, 0), 32)  # 16 batches
VAL = as_batches(make_split(256, 1), 128)


def fast_sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.03, momentum=0.9)


def make_encoders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "quick": nn.Sequential(nn.Linear(QUICK_DIM, 16), nn.BatchNorm1d(16), nn.ReLU()),
        "slow": nn.Sequential(nn.Linear(SLOW_DIM, 16), nn.ReLU()),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread on a shared machine; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(module: nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in module.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()},
        "training": {k: m.training for k, m in module.named_modules()},
        "ids": {k: id(p) for k, p in module.named_parameters()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["dtypes"] == after["dtypes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["ids"] == after["ids"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for k, g in before["grads"].items():
        if g is None:
            assert after["grads"][k] is None, k
        else:
            assert torch.equal(g, after["grads"][k]), k


@pytest.fixture(scope="module")
def analysed() -> dict:
    """One 3-seed analysis on the generated task, with the user's encoders in unusual states."""
    encoders = make_encoders()
    quick, slow = encoders["quick"], encoders["slow"]
    quick.eval()  # the user left it in eval mode
    slow[0].bias.requires_grad_(False)  # and froze one parameter
    quick[0].weight.grad = torch.full_like(quick[0].weight, 0.25)  # and left a gradient behind
    before = {m: snapshot(e) for m, e in encoders.items()}
    rng_before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear ranking raises no warning at all
        ranking = analyze_modalities(encoders, TRAIN, VAL, num_classes=C, epochs=5, seeds=3, optimizer=fast_sgd)
    return {
        "ranking": ranking,
        "encoders": encoders,
        "before": before,
        "rng_same": torch.equal(rng_before, torch.get_rng_state()),
    }


# --------------------------- the constructed roles come out, with full agreement, and plug into PDMPOptimizer
def test_constructed_roles_with_full_agreement(analysed: dict) -> None:
    ranking = analysed["ranking"]
    assert isinstance(ranking, ModalityRanking)
    assert ranking.performance_dominant == "slow"
    assert ranking.optimization_dominant == "quick"
    assert ranking.num_runs == 3
    assert ranking.run_winners == ("slow", "slow", "slow")
    assert ranking.agreement == 1.0
    assert ranking.notes == ()
    assert ranking.confident
    assert ranking.final_scores["slow"] > ranking.final_scores["quick"] + 0.1
    assert ranking.early_scores is not None
    assert ranking.early_scores["quick"] > ranking.early_scores["slow"]
    assert ranking.gammas(15) == {"slow": 15.0, "quick": 1 / 15}


def test_result_plugs_into_pdmp_optimizer(analysed: dict) -> None:
    torch.manual_seed(1)
    encoders = make_encoders()
    head = nn.Linear(32, C)
    params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
    lr = 0.1
    opt = PDMPOptimizer(torch.optim.SGD(params, lr=lr), encoders, ranking=analysed["ranking"])
    assert opt.gammas == {"quick": 1 / 15, "slow": 15.0}
    (x, y) = TRAIN[0]
    features = torch.cat([encoders["quick"](x["quick"]), encoders["slow"](x["slow"])], dim=1)
    F.cross_entropy(head(features), y).backward()
    before = {id(p): (p.detach().clone(), p.grad.clone()) for p in params}
    opt.step()
    for modality, gamma in (("quick", 1 / 15), ("slow", 15.0)):
        for p in encoders[modality].parameters():
            value, grad = before[id(p)]
            torch.testing.assert_close(p.detach(), value - lr * gamma * grad)
    for p in head.parameters():
        value, grad = before[id(p)]
        torch.testing.assert_close(p.detach(), value - lr * grad)


# ------------------------------------------------------ the user's encoders and the global RNG are left alone
def test_user_encoders_unchanged_bit_for_bit(analysed: dict) -> None:
    for modality, encoder in analysed["encoders"].items():
        assert_same(analysed["before"][modality], snapshot(encoder))
    assert analysed["encoders"]["quick"].training is False


def test_global_rng_left_alone(analysed: dict) -> None:
    assert analysed["rng_same"]


# ------------------------------------------------------------------- bad input is an error that names the fix
def _drop(batches: list, index: int, modality: str) -> list:
    out = list(batches)
    x, y = out[index]
    out[index] = ({m: v for m, v in x.items() if m != modality}, y)
    return out


def _drop_all(batches: list, modality: str) -> list:
    out = batches
    for index in range(len(batches)):
        out = _drop(out, index, modality)
    return out


def _add(batches: list, index: int, modality: str) -> list:
    out = list(batches)
    x, y = out[index]
    out[index] = ({**x, modality: torch.zeros(len(y), 3)}, y)
    return out


def _relabel(batches: list, index: int, value: int) -> list:
    out = list(batches)
    x, y = out[index]
    y = y.clone()
    y[0] = value
    out[index] = (x, y)
    return out


BAD_INPUT = [
    ("modality in no train batch", dict(train=_drop_all(TRAIN, "slow")), r"\['slow'\] is missing from every batch"),
    (
        "modality in no eval batch",
        dict(val=_drop_all(VAL, "quick")),
        r"\['quick'\] is missing from every batch of eval",
    ),
    ("modality without encoder", dict(train=_add(TRAIN, 0, "depth")), r"names \['depth'\], which have no encoder; add"),
    ("encoder without modality", dict(extra_encoder=True), r"\['depth'\] is missing from every batch of train"),
    ("target too large", dict(train=_relabel(TRAIN, 2, C)), r"outside \[0, 4\); pass the right num_classes"),
    ("negative target", dict(val=_relabel(VAL, 0, -1)), r"outside \[0, 4\)"),
    ("float targets", dict(val=[(x, y.float()) for x, y in VAL]), r"class indices"),
    ("one-shot train", dict(train=(b for b in TRAIN)), r"train_batches is a one-shot iterator.*list\(train_batches\)"),
    ("one-shot eval", dict(val=iter(VAL)), r"eval_batches is a one-shot iterator"),
    ("subset zero", dict(subset=0.0), r"subset must be a fraction in \(0, 1\]"),
    ("subset above one", dict(subset=1.5), r"subset must be a fraction in \(0, 1\]"),
    ("subset nan", dict(subset=math.nan), r"subset must be a fraction"),
    ("no seeds", dict(seeds=0), r"seeds must be >= 1"),
    ("no epochs", dict(epochs=0), r"epochs must be >= 1"),
    ("empty train", dict(train=[]), r"train_batches is empty"),
    ("empty eval", dict(val=[]), r"eval_batches is empty"),
    ("one encoder", dict(only_one=True), r"groups must hold at least two modalities"),
    ("one class", dict(num_classes=1), r"num_classes must be >= 2"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_value_error_naming_the_fix(case: str, change: dict, message: str) -> None:
    encoders = make_encoders()
    if change.get("extra_encoder"):
        encoders["depth"] = nn.Linear(3, 4)
    if change.get("only_one"):
        del encoders["slow"]
    before = {m: snapshot(e) for m, e in encoders.items()}
    with pytest.raises(ValueError, match=message):
        analyze_modalities(
            encoders,
            change.get("train", TRAIN),
            change.get("val", VAL),
            num_classes=change.get("num_classes", C),
            epochs=change.get("epochs", 1),
            seeds=change.get("seeds", 1),
            subset=change.get("subset", 1.0),
            optimizer=fast_sgd,
        )
    for modality, encoder in encoders.items():  # failing half way leaves the user's modules alone too
        assert_same(before[modality], snapshot(encoder))


def test_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"groups\['slow'\] must be an nn\.Module \(its encoder\), got str"):
        analyze_modalities({"quick": nn.Linear(8, 4), "slow": "encoder"}, TRAIN, VAL, num_classes=C)
    with pytest.raises(TypeError, match="batch_fn="):
        analyze_modalities(make_encoders(), [(1, 2, 3)], VAL, num_classes=C)
    with pytest.raises(TypeError, match=r"returned a tuple; the probe reads one tensor .*lambda out: out\[0\]"):
        enc = make_encoders()
        enc["slow"] = nn.LSTM(SLOW_DIM, 4, batch_first=True)
        analyze_modalities(enc, TRAIN, VAL, num_classes=C, epochs=1)
    with pytest.raises(TypeError, match=r"not a torch\.optim\.Optimizer"):
        analyze_modalities(make_encoders(), TRAIN, VAL, num_classes=C, epochs=1, optimizer=lambda p: p)


def test_the_signature_is_explicit_checked_and_documented() -> None:
    """Issue 18: analyze_modalities spells out unimodal_histories' keywords (same names, same defaults) and
    documents each, with what it trains and the paper's optimizer; bad keywords fail before any training."""
    kwargs = dict(num_classes=C, epochs=2, subset=0.25, optimizer=fast_sgd)
    with pytest.raises(TypeError, match="'epoch'"):
        analyze_modalities(make_encoders(), TRAIN, VAL, **{**kwargs, "epoch": 2})
    with pytest.raises(TypeError, match="num_classes"):
        analyze_modalities(make_encoders(), TRAIN, VAL)
    with pytest.raises(TypeError, match=r"^epochs must be an int"):
        analyze_modalities(make_encoders(), TRAIN, VAL, **{**kwargs, "epochs": "2"})
    with pytest.raises(TypeError, match="modality names must be non-empty strings"):
        analyze_modalities({"": nn.Linear(QUICK_DIM, 4), "slow": nn.Linear(SLOW_DIM, 4)}, TRAIN, VAL, **kwargs)
    never = RecordingList(TRAIN)
    with pytest.raises(ValueError, match=r"early_epoch=-1 .*pass 0 <= early_epoch < 2"):
        analyze_modalities(make_encoders(), never, VAL, early_epoch=-1, **kwargs)
    assert never.read == []  # refused before any batch was read
    own = inspect.signature(analyze_modalities).parameters
    probe = inspect.signature(unimodal_histories).parameters
    assert list(own)[:3] == list(probe)[:3] == ["groups", "train_batches", "eval_batches"]
    keywords = [n for n, p in own.items() if p.kind is p.KEYWORD_ONLY]
    assert keywords == [*list(probe)[3:], "higher_is_better", "early_epoch", "warn"] and len(keywords) == 16
    assert all(own[n].default == p.default for n, p in probe.items())
    doc = analyze_modalities.__doc__ or ""
    for name in own:
        assert f"\n        {name}: " in doc, name  # an entry under Args
    flat = " ".join(doc.split())
    assert "a deep copy of your encoder" in flat and "linear probes" not in flat
    assert "SGD with lr 1e-3, momentum 0.9 and weight decay 1e-4" in flat and "optimizer=lambda params:" in flat


def test_encoders_keyword_still_works_for_a_release_with_a_deprecation_warning() -> None:
    """0.2 named the mapping encoders=; 0.3 calls it groups, as PDMPOptimizer does."""
    kwargs = dict(num_classes=C, epochs=1, subset=0.25, optimizer=fast_sgd, warn=False)
    expected = analyze_modalities(make_encoders(), TRAIN, VAL, **kwargs)
    assert analyze_modalities(groups=make_encoders(), train_batches=TRAIN, eval_batches=VAL, **kwargs) == expected
    with pytest.warns(DeprecationWarning, match=r"analyze_modalities\(encoders=\.\.\.\) is deprecated.*groups=") as rec:
        assert analyze_modalities(encoders=make_encoders(), train_batches=TRAIN, eval_batches=VAL, **kwargs) == expected
    assert len(rec) == 1 and rec[0].filename == __file__
    del kwargs["warn"]
    with pytest.warns(DeprecationWarning, match=r"unimodal_histories\(encoders="):
        old = unimodal_histories(encoders=make_encoders(), train_batches=TRAIN, eval_batches=VAL, **kwargs)
    assert old == unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)
    with pytest.raises(TypeError, match=r"got both groups and encoders=; pass groups only"):
        unimodal_histories(make_encoders(), TRAIN, VAL, encoders=make_encoders(), **kwargs)


def test_runs_the_same_under_no_grad() -> None:
    """The probes train with gradients enabled even when the caller disabled them."""
    kwargs = dict(num_classes=C, epochs=1, subset=0.25, optimizer=fast_sgd)
    with torch.no_grad():
        quiet = unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)
    assert quiet == unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)


def test_inputs_that_are_not_callables_tensors_or_iterables_name_the_argument() -> None:
    kwargs = dict(num_classes=C, epochs=1, subset=0.25, optimizer=fast_sgd)
    for name in ("optimizer", "loss", "metric", "batch_fn"):
        with pytest.raises(TypeError, match=rf"^{name} must be callable or None, got int"):
            unimodal_histories(make_encoders(), TRAIN, VAL, **{**kwargs, name: 1})
    with pytest.raises(TypeError, match=r"^groups must map each modality to an nn.Module"):
        unimodal_histories([nn.Linear(8, 4), nn.Linear(32, 4)], TRAIN, VAL, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"train_batches must be an iterable of \(inputs, target\) batches"):
        unimodal_histories(make_encoders(), 3, VAL, **kwargs)  # type: ignore[arg-type]
    x, y = TRAIN[0]
    with pytest.raises(TypeError, match=r"input 'slow' of batch 0 of train_batches is list, not a tensor"):
        unimodal_histories(make_encoders(), [({**x, "slow": [1.0]}, y)], VAL, **kwargs)
    with pytest.raises(TypeError, match=r"third element of batch 0 of eval_batches must map modality"):
        unimodal_histories(make_encoders(), TRAIN, [(x, y, [True] * len(y))], **kwargs)
    with pytest.raises(TypeError, match=r"metric must return a number, got str for 'quick'"):
        unimodal_histories(make_encoders(), TRAIN, VAL, metric=lambda out, t: "high", **kwargs)
    with pytest.raises(TypeError, match=r"features\['slow'\] must be callable"):
        unimodal_histories(make_encoders(), TRAIN, VAL, features={"slow": 1}, **kwargs)


def test_diverging_run_names_the_learning_rate() -> None:
    with pytest.raises(ValueError, match=r"diverged.*lower the learning rate"):
        analyze_modalities(
            make_encoders(), TRAIN, VAL, num_classes=C, epochs=2, optimizer=lambda p: torch.optim.SGD(p, lr=1e12)
        )


# ------------------------------------- same arguments and seeds, same histories; subsets, loaders and metrics
def test_same_arguments_and_seeds_give_the_same_histories() -> None:
    kwargs = dict(num_classes=C, epochs=2, seeds=2, subset=0.5, optimizer=fast_sgd, seed=7)
    first = unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)
    again = unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)
    assert first == again
    assert {m: len(runs) for m, runs in first.items()} == {"quick": 2, "slow": 2}
    assert all(len(h) == 2 for runs in first.values() for h in runs)
    # run r depends only on seed + r: the second run of seed 7 is the first run of seed 8
    shifted = unimodal_histories(make_encoders(), TRAIN, VAL, **{**kwargs, "seeds": 1, "seed": 8})
    assert shifted == {m: runs[1:] for m, runs in first.items()}
    other = unimodal_histories(make_encoders(), TRAIN, VAL, **{**kwargs, "seed": 100})
    assert other != first


class RecordingList(list):
    """A real list that records which batches are read by index."""

    def __init__(self, items: list) -> None:
        super().__init__(items)
        self.read: list[int] = []

    def __getitem__(self, index):  # type: ignore[override]
        self.read.append(index)
        return super().__getitem__(index)


def test_subset_draws_a_seeded_fraction_of_the_batches_per_run() -> None:
    train = RecordingList(TRAIN)
    unimodal_histories(make_encoders(), train, VAL, num_classes=C, epochs=2, seeds=2, subset=0.25, optimizer=fast_sgd)
    read = train.read
    assert len(read) == 2 * 2 * 4  # seeds x epochs x round(0.25 * 16)
    run0, run1 = read[:8], read[8:]
    assert run0[:4] == run0[4:] and run1[:4] == run1[4:]  # the same subset every epoch of a run
    assert sorted(run0[:4]) == run0[:4] and len(set(run0[:4])) == 4
    assert run0[:4] != run1[:4]  # each run draws its own subset


def test_dataloader_with_shuffle_and_batch_fn() -> None:
    x, y = make_split(512, 0)
    data = TensorDataset(x["quick"], x["slow"], y)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*make_split(256, 1)[0].values(), make_split(256, 1)[1]), batch_size=128)

    def batch_fn(batch):
        quick, slow, target = batch
        return {"quick": quick, "slow": slow}, target

    rng = torch.get_rng_state()
    kwargs = dict(num_classes=C, epochs=2, seeds=1, subset=0.5, optimizer=fast_sgd, batch_fn=batch_fn)
    first = unimodal_histories(make_encoders(), loader, val, **kwargs)
    assert torch.equal(rng, torch.get_rng_state())
    assert first == unimodal_histories(make_encoders(), loader, val, **kwargs)


def test_custom_metric_and_loss_direction() -> None:
    def loss(logits: torch.Tensor, target: torch.Tensor) -> float:
        return F.cross_entropy(logits, target).item()

    ranking = analyze_modalities(
        make_encoders(), TRAIN, VAL, num_classes=C, epochs=5, optimizer=fast_sgd, metric=loss, higher_is_better=False
    )
    assert ranking.performance_dominant == "slow"
    assert ranking.optimization_dominant == "quick"
    assert ranking.final_scores["slow"] < ranking.final_scores["quick"]


def test_histories_match_rank_modalities() -> None:
    kwargs = dict(num_classes=C, epochs=2, seeds=2, optimizer=fast_sgd, subset=0.25)
    histories = unimodal_histories(make_encoders(), TRAIN, VAL, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranking = analyze_modalities(make_encoders(), TRAIN, VAL, **kwargs)
    # the same ranking, plus the samples it rests on: 4 of the 16 training batches of 32, all 256 eval samples
    assert ranking.num_samples == {m: {"train": 128, "eval": 256} for m in ranking.order}
    assert dataclasses.replace(ranking, num_samples=None) == rank_modalities(histories, warn=False)


# ------------------------------------------------------- doubtful rankings (disagreeing runs, ties) warn once
def test_indistinguishable_modalities_warn_once_at_the_call_site() -> None:
    """Two copies of the same modality: the runs cannot agree on a clear winner."""
    x, y = make_split(256, 0)
    twins = as_batches(({"left": x["slow"], "right": x["slow"].clone()}, y), 32)
    val_x, val_y = make_split(128, 1)
    val = as_batches(({"left": val_x["slow"], "right": val_x["slow"]}, val_y), 128)
    encoder = nn.Sequential(nn.Linear(SLOW_DIM, 16), nn.ReLU())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranking = analyze_modalities(
            {"left": encoder, "right": encoder}, twins, val, num_classes=C, epochs=3, seeds=5, optimizer=fast_sgd
        )
    assert ranking.notes
    assert ranking.agreement < 1.0 or any("within one standard deviation" in n for n in ranking.notes)
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user) == 1
    assert user[0].filename == __file__  # points at the caller, not at pdmp_optim
    assert "'left'" in str(user[0].message) and "'right'" in str(user[0].message)
    assert "agreement=" in repr(ranking) and "notes=" in repr(ranking)


def test_exact_tie_warns_and_warn_false_is_quiet() -> None:
    def constant(logits: torch.Tensor, target: torch.Tensor) -> float:
        return 0.5

    kwargs = dict(num_classes=C, epochs=2, seeds=2, optimizer=fast_sgd, metric=constant, subset=0.25)
    with pytest.warns(UserWarning, match=r"final scores tie between \['quick', 'slow'\]"):
        ranking = analyze_modalities(make_encoders(), TRAIN, VAL, **kwargs)
    assert ranking.performance_dominant == "quick"  # the deterministic rule: input order
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert analyze_modalities(make_encoders(), TRAIN, VAL, warn=False, **kwargs) == ranking


# ------------------------------------------------------------------------------------------------- progress
class Terminal(io.StringIO):
    """An in-memory stderr that says it is a terminal (or not)."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("progress", "tty", "shown"), [(True, False, True), (None, False, False), (None, True, True), (False, True, False)]
)
def test_progress_line_on_stderr_when_asked_or_on_a_terminal_after_a_second(
    progress: bool | None, tty: bool, shown: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count(0.0, 0.6)  # every reading 0.6 s later: the first epoch ends within the first second
    monkeypatch.setattr(probes, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", Terminal(tty))
    unimodal_histories(make_encoders(), TRAIN, VAL, num_classes=C, epochs=2, optimizer=fast_sgd, progress=progress)
    assert sys.stderr.getvalue() == ("\ranalyze_modalities: run 1/1, epoch 2/2\n" if shown else "")


# -------------------------------------------------------------------------------------- data sources, devices
class Reiterable:
    """A re-iterable source with no len() and no indexing, like a streaming dataset."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.loaded = 0

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            self.loaded += 1
            yield batch


def test_sources_without_len_give_the_same_histories_as_lists() -> None:
    kwargs = dict(num_classes=C, epochs=2, seeds=2, subset=0.25, optimizer=fast_sgd)
    stream = Reiterable(TRAIN)
    assert unimodal_histories(make_encoders(), stream, Reiterable(VAL), **kwargs) == unimodal_histories(
        make_encoders(), TRAIN, VAL, **kwargs
    )
    # counting (16) + the first batch (1) + per run and epoch, loading stops after the last chosen batch
    assert stream.loaded < 16 + 1 + 2 * 2 * 16


def test_device_argument_and_frozen_parameters() -> None:
    encoders = make_encoders()
    encoders["quick"][0].weight.requires_grad_(False)
    seen: list[list[tuple[tuple[int, ...], bool]]] = []

    def recording_sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        seen.append([(tuple(p.shape), p.requires_grad) for p in params])
        return fast_sgd(params)

    kwargs = dict(num_classes=C, epochs=1, subset=0.25, optimizer=recording_sgd)
    on_cpu = unimodal_histories(encoders, TRAIN, VAL, device="cpu", **kwargs)
    assert on_cpu == unimodal_histories(encoders, TRAIN, VAL, **kwargs)
    quick_params = seen[0]
    assert (16, QUICK_DIM) not in [shape for shape, _ in quick_params]  # the frozen weight is not trained
    assert quick_params == [((16,), True), ((16,), True), ((16,), True), ((C, 16), True), ((C,), True)]
    assert encoders["quick"][0].weight.requires_grad is False
