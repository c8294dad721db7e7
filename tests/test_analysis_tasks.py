"""analyze_modalities beyond single-label classification (issue 12): regression and multi-label probes rank generated
tasks whose roles are known, with the right loss, output size and metric direction; one's own loss; ``features=``
for encoders that return feature maps, tuples or frames folded into the batch, and the errors that show the fix."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim.analysis import (
    accuracy,
    analyze_modalities,
    mean_absolute_error,
    mean_average_precision,
    unimodal_histories,
)

QUICK_DIM, SLOW_DIM, LABELS = 8, 32, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def regression_split(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sentiment-like intensities in [-3, 3]. quick: a loud cue of the sign only, learned at once but capped (MAE
    about 0.8); slow: a faint, exact linear cue, slow to learn with SGD but ending far lower (about 0.15)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(SLOW_DIM, generator=torch.Generator().manual_seed(7))
    direction = direction / direction.norm()
    y = 6 * torch.rand(n, generator=g) - 3
    quick = torch.randn(n, QUICK_DIM, generator=g)
    quick[:, 0] += 3.0 * torch.sign(y)
    slow = 0.08 * (2 * y[:, None] * direction + 0.3 * torch.randn(n, SLOW_DIM, generator=g))
    return {"quick": quick, "slow": slow}, y


def multilabel_split(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Five tags, each present with probability 0.3. quick: loud tags, but those of a random sample half of the
    time; slow: a faint mix of every true tag."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(LABELS, SLOW_DIM, generator=torch.Generator().manual_seed(9))
    y = (torch.rand(n, LABELS, generator=g) < 0.3).float()
    shown = torch.where(torch.rand(n, 1, generator=g) < 0.5, y, (torch.rand(n, LABELS, generator=g) < 0.3).float())
    quick = torch.randn(n, QUICK_DIM, generator=g)
    quick[:, :LABELS] += 6.0 * shown
    slow = 0.15 * (y @ means + torch.randn(n, SLOW_DIM, generator=g))
    return {"quick": quick, "slow": slow}, y


def as_batches(split: tuple[dict[str, torch.Tensor], torch.Tensor], size: int) -> list:
    x, y = split
    return [({m: v[i : i + size] for m, v in x.items()}, y[i : i + size]) for i in range(0, len(y), size)]


def make_encoders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "quick": nn.Sequential(nn.Linear(QUICK_DIM, 16), nn.ReLU()),
        "slow": nn.Sequential(nn.Linear(SLOW_DIM, 16), nn.ReLU()),
    }


def fast_sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.03, momentum=0.9)


REGRESSION = as_batches(regression_split(512, 0), 32), as_batches(regression_split(256, 1), 128)
MULTILABEL = as_batches(multilabel_split(512, 0), 32), as_batches(multilabel_split(256, 1), 128)


# ------------------------------------------------------------------------------- known roles for each task type
@pytest.mark.parametrize(
    ("task", "data", "options", "higher"),
    [("regression", REGRESSION, {}, False), ("multilabel", MULTILABEL, {"num_classes": LABELS}, True)],
    ids=["regression", "multilabel"],
)
def test_known_roles_come_out_for_each_task(task: str, data: tuple, options: dict, higher: bool) -> None:
    train, val = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear ranking raises no warning
        ranking = analyze_modalities(
            make_encoders(), train, val, task=task, epochs=5, seeds=2, optimizer=fast_sgd, **options
        )
    assert ranking.higher_is_better is higher  # the default metric's direction: MAE lower, mAP higher
    assert ranking.performance_dominant == "slow"
    assert ranking.optimization_dominant == "quick"
    assert ranking.agreement == 1.0 and ranking.confident
    assert ranking.num_samples == {m: {"train": 512, "eval": 256} for m in ranking.order}
    assert ranking.gammas(15) == {"slow": 15.0, "quick": 1 / 15}
    encoders = make_encoders()
    opt = PDMPOptimizer(torch.optim.SGD([p for e in encoders.values() for p in e.parameters()], lr=0.1), encoders,
                        ranking=ranking)  # fmt: skip
    assert opt.gammas == {"quick": 1 / 15, "slow": 15.0}


def test_heads_losses_and_metrics_follow_the_task() -> None:
    """The probe head's output size and what reaches loss and metric, per task."""
    seen: dict[str, list] = {"head": [], "loss": [], "metric": []}

    def recording_sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        seen["head"].append(tuple(params[-2].shape))  # the head's weight comes last but one
        return fast_sgd(params)

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen["loss"].append((tuple(output.shape), target.dtype))
        return F.l1_loss(output, target)

    def metric(output: torch.Tensor, target: torch.Tensor) -> float:
        seen["metric"].append((tuple(output.shape), tuple(target.shape)))
        return -mean_absolute_error(output, target)

    train, val = REGRESSION
    two_d = [(x, torch.stack([y, -y], 1)) for x, y in train[:2]]
    two_d_val = [(x, torch.stack([y, -y], 1)) for x, y in val[:1]]
    kwargs = dict(task="regression", epochs=1, optimizer=recording_sgd, loss=loss, metric=metric)
    unimodal_histories(make_encoders(), train[:2], val[:1], **kwargs)
    unimodal_histories(make_encoders(), two_d, two_d_val, **kwargs)
    assert seen["head"] == [(1, 16), (1, 16), (2, 16), (2, 16)]  # one output for (N,), D for (N, D)
    assert seen["loss"][0] == ((32,), torch.float32) and seen["loss"][-1] == ((32, 2), torch.float32)
    assert seen["metric"][0] == ((128,), (128,)) and seen["metric"][-1] == ((128, 2), (128, 2))

    seen["head"].clear()
    unimodal_histories(make_encoders(), MULTILABEL[0][:1], MULTILABEL[1], task="multilabel", num_classes=LABELS,
                       epochs=1, optimizer=recording_sgd)  # fmt: skip
    assert seen["head"] == [(LABELS, 16), (LABELS, 16)]


def test_own_loss_is_the_one_trained_with() -> None:
    """A loss that gives no gradient leaves the probes where they started: every epoch scores the same."""
    train, val = REGRESSION

    def no_signal(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output * 0.0).sum()

    h = unimodal_histories(make_encoders(), train, val, task="regression", epochs=3, loss=no_signal, optimizer=fast_sgd)
    assert all(len(set(run)) == 1 for runs in h.values() for run in runs)
    l1 = unimodal_histories(
        make_encoders(), train, val, task="regression", epochs=3, loss=F.l1_loss, optimizer=fast_sgd
    )
    assert l1["slow"][0][-1] < l1["slow"][0][0]  # an ordinary loss trains

    with pytest.raises(TypeError, match=r"loss must return a scalar tensor \(reduce it"):
        unimodal_histories(make_encoders(), train, val, task="regression", epochs=1,
                           loss=lambda out, t: F.mse_loss(out, t, reduction="none"))  # fmt: skip


def test_default_metrics_and_their_direction() -> None:
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    scores, target = torch.randn(64, 4, generator=g), (torch.rand(64, 4, generator=g) < 0.4).long()
    want = sum(sklearn.average_precision_score(target[:, j], scores[:, j]) for j in range(4)) / 4
    assert mean_average_precision(scores, target) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="no label has a positive sample"):
        mean_average_precision(scores, torch.zeros(64, 4))
    assert [f.higher_is_better for f in (accuracy, mean_absolute_error, mean_average_precision)] == [True, False, True]


def test_direction_of_ones_own_metric() -> None:
    train, val = REGRESSION
    kwargs = dict(task="regression", epochs=2, optimizer=fast_sgd, subset=0.25)

    def mse(output: torch.Tensor, target: torch.Tensor) -> float:
        return F.mse_loss(output, target).item()

    with pytest.raises(ValueError, match=r"say which way your metric 'mse' points: pass higher_is_better=False"):
        analyze_modalities(make_encoders(), train, val, metric=mse, **kwargs)
    lower = analyze_modalities(make_encoders(), train, val, metric=mse, higher_is_better=False, warn=False, **kwargs)
    mse.higher_is_better = False  # type: ignore[attr-defined]
    assert analyze_modalities(make_encoders(), train, val, metric=mse, warn=False, **kwargs) == lower
    assert not lower.higher_is_better
    # classification keeps 0.2's default: an unmarked metric is a score, higher is better
    x, y = regression_split(64, 0)
    cls = [(x, (y > 0).long())]
    ranking = analyze_modalities(make_encoders(), cls, cls, num_classes=2, epochs=1, metric=lambda o, t: 0.5,
                                 warn=False)  # fmt: skip
    assert ranking.higher_is_better


BAD_TASKS = [
    ("unknown task", dict(task="ranking"), ValueError, r"task must be one of \['classification', 'regression'"),
    ("regression num_classes", dict(task="regression", num_classes=1), ValueError, r"drop num_classes"),
    ("no num_classes", dict(task="classification"), TypeError, r"needs num_classes= \(the number of classes\)"),
    ("no labels", dict(task="multilabel"), TypeError, r"the number of labels"),
    ("labels as indices", dict(task="multilabel", num_classes=3, target="index"), ValueError, r"task='classification'"),
    ("labels above one", dict(task="multilabel", num_classes=3, target="two"), ValueError, r"values in \[0, 1\]"),
    ("floats as classes", dict(num_classes=3, target="float"), ValueError, r"pass task='multilabel'.*'regression'"),
    ("regression shape", dict(task="regression", target="ragged"), ValueError, r"same number of outputs"),
    ("regression nan", dict(task="regression", target="nan"), ValueError, r"NaN or inf"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), BAD_TASKS, ids=[c[0] for c in BAD_TASKS])
def test_targets_that_do_not_fit_the_task(case: str, change: dict, error: type, message: str) -> None:
    x, y = multilabel_split(64, 0)
    targets = {
        "index": [y.argmax(1), y.argmax(1)],
        "two": [2 * y[:, :3], y[:, :3]],
        "float": [y[:, 0], y[:, 0]],
        "ragged": [y[:, 0], y[:, :2]],
        "nan": [y[:, 0], y[:, 0].clone().fill_(float("nan"))],
    }
    default = [y[:, :3], y[:, :3]] if change.get("task") == "multilabel" else [y.argmax(1) % 3, y.argmax(1) % 3]
    first, second = targets.get(change.pop("target", ""), default)
    with pytest.raises(error, match=message):
        unimodal_histories(make_encoders(), [(x, first), (x, second)], [(x, first)], epochs=1, **change)


# ----------------------------------------------------------- what the probe reads: feature maps, tuples, frames
class ConvEncoder(nn.Module):
    """Returns a (batch, 4, 4, 4) feature map, which the model's forward would pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class FramesEncoder(nn.Module):
    """A video encoder that folds the frames of a (batch, frames, dim) input into the batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.frame = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frame(x.flatten(0, 1))  # (batch * frames, 16)


def image_data(n: int = 64, frames: int = 3) -> list:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (n,), generator=g)
    image = torch.randn(n, 1, 6, 6, generator=g) + y[:, None, None, None]
    video = torch.randn(n, frames, 5, generator=g) + y[:, None, None]
    return [({"image": image[i : i + 32], "video": video[i : i + 32]}, y[i : i + 32]) for i in range(0, n, 32)]


def recording(shapes: list) -> object:
    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        shapes.append(tuple(params[-2].shape))
        return fast_sgd(params)

    return factory


def test_a_flattened_feature_map_warns_and_features_pools_it() -> None:
    data = image_data()
    encoders = {"image": ConvEncoder(), "video": nn.Sequential(nn.Flatten(), nn.Linear(15, 16))}
    heads: list = []
    message = r"'image' probe reads the encoder's output of shape \(batch, 4, 4, 4\) flattened into 64 features"
    fix = r"features=\{'image': lambda out: out.mean\(dim=\(2, 3\)\)"
    with pytest.warns(UserWarning, match=message + ".*" + fix) as record:
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, seeds=2, optimizer=recording(heads))
    assert len(record) == 1 and record[0].filename == __file__  # once per call, at the caller
    assert heads[0] == (3, 64)
    heads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled = {"image": lambda out: out.mean(dim=(2, 3))}  # the other encoder reads its output as it is
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features=pooled, optimizer=recording(heads))
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features=lambda out: out.flatten(1))
    assert heads == [(3, 4), (3, 16)]


def test_frames_folded_into_the_batch_name_the_fix_and_the_fix_works() -> None:
    data = image_data(frames=3)
    encoders = {"image": nn.Sequential(nn.Flatten(), nn.Linear(36, 8)), "video": FramesEncoder(5)}
    with pytest.raises(TypeError, match=r"returned shape \(96, 16\) for a batch of 32: 3 rows per sample") as info:
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1)
    suggested = re.search(r"features=(\{'video': lambda out: .*?\)\}) ", str(info.value))
    assert suggested is not None, str(info.value)
    assert suggested.group(1) == "{'video': lambda out: out.unflatten(0, (-1, 3)).mean(dim=1)}"
    heads: list = []
    features = eval(suggested.group(1))  # the message's own fix, as a user would paste it
    unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features=features, optimizer=recording(heads))
    assert heads[1] == (3, 16)  # the frame encoder's 16 features, pooled over the 3 frames


def test_outputs_that_are_not_one_tensor_name_the_features_that_pick_one() -> None:
    class HFLike(nn.Module):  # returns a model output object, as transformers models do
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 8)

        def forward(self, x: torch.Tensor) -> object:
            hidden = self.proj(x)
            return type("BaseModelOutput", (), {"last_hidden_state": hidden, "pooler_output": hidden[:, 0]})()

    data = image_data()
    encoders = {"image": nn.Flatten(), "video": HFLike()}
    with pytest.raises(TypeError, match=r"returned a BaseModelOutput.*features=\{'video': lambda out: "
                       r"out.last_hidden_state\[:, 0\]"):  # fmt: skip
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1)
    features = {"video": lambda out: out.last_hidden_state[:, 0]}
    unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features=features)
    with pytest.raises(TypeError, match=r"features\['video'\] returned a tuple"):
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features={"video": lambda out: (out,)})
    with pytest.raises(TypeError, match=r"time first.*lambda out: out.mean\(dim=0\)"):
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1,
                           features={"video": lambda out: out.last_hidden_state.transpose(0, 1)})  # fmt: skip
    with pytest.raises(ValueError, match=r"features names \['audio'\], which have no encoder"):
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features={"audio": torch.flatten})
    with pytest.raises(TypeError, match=r"features must be a callable"):
        unimodal_histories(encoders, data, data, num_classes=3, epochs=1, features="mean")  # type: ignore[arg-type]
