"""Stage 1 of PDMP in one call: train a linear probe on each modality's encoder and rank the modalities.

Hand :func:`analyze_modalities` your encoders and your data; it trains a deep copy of every encoder with a
fresh linear head, evaluates after every epoch, and ranks the modalities with
:func:`~pdmp_optim.rank_modalities`. Its result plugs straight into ``PDMPOptimizer(..., ranking=...)``.
Classification, regression and multi-label tasks are built in (``task=``); samples that lack a modality are left
out of that modality's probe (see :func:`unimodal_histories`).

>>> import torch
>>> from torch import nn
>>> from torch.nn.functional import one_hot
>>> g = torch.Generator().manual_seed(0)
>>> def batch(n=32):  # audio: loud but right only 70% of the time; visual: always right but faint (slow)
...     y = torch.randint(0, 4, (n,), generator=g)
...     shown = torch.where(torch.rand(n, generator=g) < 0.7, y, torch.randint(0, 4, (n,), generator=g))
...     audio = 4.0 * one_hot(shown, 4) + torch.randn(n, 4, generator=g)
...     visual = 0.2 * (2.0 * one_hot(y, 4) + 0.5 * torch.randn(n, 4, generator=g))
...     return {"audio": audio, "visual": visual}, y
>>> train, val = [batch() for _ in range(8)], [batch() for _ in range(4)]
>>> _ = torch.manual_seed(0)
>>> encoders = {"audio": nn.Linear(4, 8), "visual": nn.Linear(4, 8)}
>>> sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
>>> ranking = analyze_modalities(encoders, train, val, num_classes=4, epochs=6, seeds=3, optimizer=sgd)
>>> ranking.performance_dominant, ranking.optimization_dominant, ranking.agreement
('visual', 'audio', 1.0)
>>> ranking.gammas(gamma_p=15)  # what PDMPOptimizer(..., ranking=ranking) applies
{'visual': 15.0, 'audio': 0.06666666666666667}
>>> ranking.num_samples["visual"]  # what the scores rest on: training samples per epoch, evaluation samples
{'train': 256, 'eval': 128}
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, Optimizer

from ._checks import check_int, check_name
from .ranking import ModalityRanking, rank_modalities

__all__ = [
    "accuracy",
    "analyze_modalities",
    "mean_absolute_error",
    "mean_average_precision",
    "unimodal_histories",
]

Task = Literal["classification", "regression", "multilabel"]
OptimizerFactory = Callable[[list[Tensor]], Optimizer]
Metric = Callable[[Tensor, Tensor], Any]
Loss = Callable[[Tensor, Tensor], Tensor]
Features = Callable[[Any], Tensor]
BatchFn = Callable[[Any], Any]
TASKS = ("classification", "regression", "multilabel")


def accuracy(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against class indices ``target`` (N,): the classification default.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5

    Higher is better (its ``higher_is_better`` attribute says so to :func:`analyze_modalities`).
    """
    return (logits.argmax(dim=1) == target).float().mean().item()


def mean_absolute_error(output: Tensor, target: Tensor) -> float:
    """Mean absolute error of ``output`` against ``target`` (same shape): the regression default.

    >>> mean_absolute_error(torch.tensor([0.5, -1.0]), torch.tensor([1.0, -1.0]))
    0.25

    Lower is better (its ``higher_is_better`` attribute is ``False``), as for the MAE that multimodal sentiment
    papers report on intensities in [-3, 3].
    """
    return (output - target).abs().mean().item()


def mean_average_precision(logits: Tensor, target: Tensor) -> float:
    """Mean over labels of the average precision of ``logits`` (N, L) against 0/1 ``target`` (N, L).

    >>> scores = torch.tensor([[2.0, 0.1], [1.0, 0.9], [0.0, 0.5]])
    >>> round(mean_average_precision(scores, torch.tensor([[1, 0], [0, 1], [1, 1]])), 4)  # (5/6 + 1) / 2
    0.9167

    The multi-label default: it ranks the samples by each label's score, so it needs no threshold and
    separates probes early in training, when every score is still below 0.5. Average precision is the mean of
    the precision at the rank of every positive sample (no interpolation, as scikit-learn's
    ``average_precision_score`` for untied scores); labels without a positive sample are left out. Higher is
    better.

    Raises:
        ValueError: no label has a positive sample.
    """
    positive = (target > 0.5).to(logits.dtype)
    order = logits.argsort(dim=0, descending=True, stable=True)
    hits = positive.gather(0, order)
    ranks = torch.arange(1, hits.shape[0] + 1, dtype=hits.dtype, device=hits.device).unsqueeze(1)
    counts = hits.sum(dim=0)
    kept = counts > 0
    if not bool(kept.any()):
        raise ValueError("mean_average_precision: no label has a positive sample in the evaluation data")
    precision_at_hits = (hits.cumsum(dim=0) / ranks * hits).sum(dim=0)
    return (precision_at_hits[kept] / counts[kept]).mean().item()


accuracy.higher_is_better = True  # type: ignore[attr-defined]
mean_absolute_error.higher_is_better = False  # type: ignore[attr-defined]
mean_average_precision.higher_is_better = True  # type: ignore[attr-defined]
_DEFAULT_METRIC: dict[str, Metric] = {
    "classification": accuracy,
    "regression": mean_absolute_error,
    "multilabel": mean_average_precision,
}


def analyze_modalities(
    encoders: Mapping[str, nn.Module],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    *,
    higher_is_better: bool | None = None,
    early_epoch: int = 0,
    warn: bool = True,
    **probe_options: Any,
) -> ModalityRanking:
    """Rank modalities by unimodal linear probes (the paper's Algorithm 1), ready for ``PDMPOptimizer(ranking=)``.

    >>> import torch
    >>> data = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> encoders = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Flatten()}
    >>> ranking = analyze_modalities(encoders, data[:3], data[3:], num_classes=3, epochs=2, warn=False)
    >>> sorted(ranking.order), ranking.num_runs, ranking.num_samples["b"]
    (['a', 'b'], 1, {'train': 24, 'eval': 8})

    A regression task (e.g. sentiment intensity) ranks by mean absolute error, lower being better:

    >>> reg = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randn(8)) for _ in range(4)]
    >>> analyze_modalities(encoders, reg[:3], reg[3:], task="regression", epochs=2, warn=False).higher_is_better
    False

    The probes train as :func:`unimodal_histories` says (your encoders are never modified), and their
    histories go to :func:`~pdmp_optim.rank_modalities`, so the result says how sure it is: ``agreement`` is
    the fraction of runs that pick the same ``performance_dominant`` modality, and ``notes`` (with one
    ``UserWarning``) flag near ties and disagreeing runs. Use ``seeds >= 3`` to get that readout.
    ``num_samples`` says how many samples each modality's scores rest on (fewer than the data holds when a
    modality is missing for some samples).

    Args:
        encoders: as for :func:`unimodal_histories`.
        train_batches: as for :func:`unimodal_histories`.
        eval_batches: as for :func:`unimodal_histories`.
        higher_is_better: whether a higher ``metric`` is better (passed to :func:`~pdmp_optim.rank_modalities`).
            ``None`` (the default) takes it from the metric's ``higher_is_better`` attribute, which the
            built-in metrics carry (accuracy and mean average precision: higher; mean absolute error: lower). For
            your own metric without that attribute, ``None`` means higher for ``task="classification"`` and
            is an error for the other tasks: pass ``False`` for an error or a loss, ``True`` for a score.
        early_epoch: which epoch's score counts as early (passed to :func:`~pdmp_optim.rank_modalities`).
        warn: emit one ``UserWarning`` when the ranking has notes (ties, near ties, disagreeing runs).
        **probe_options: how the probes train, the keywords of :func:`unimodal_histories`: ``task``
            (``"classification"``, ``"regression"`` or ``"multilabel"``), ``num_classes`` (classes or labels;
            not for regression), ``epochs=10``, ``seeds=1``, ``subset=1.0``, ``optimizer`` (default: the
            paper's SGD), ``loss`` and ``metric`` (defaults follow ``task``), ``features`` (what the probe
            reads of an encoder's output), ``batch_fn``, ``progress``, ``device`` and ``seed=0``.

    Raises:
        ValueError, TypeError: as :func:`unimodal_histories` and :func:`~pdmp_optim.rank_modalities` do;
            an unknown keyword is a ``TypeError``; your own metric without a direction, outside
            classification, is a ``ValueError`` asking for ``higher_is_better``.
    """
    bound = inspect.signature(unimodal_histories).bind(encoders, train_batches, eval_batches, **probe_options)
    bound.apply_defaults()
    options = dict(bound.arguments)
    higher = _direction(higher_is_better, options["task"], options["metric"])
    result = _probe_runs(options)
    ranking = rank_modalities(result.histories, higher_is_better=higher, early_epoch=early_epoch, warn=False)
    ranking = dataclasses.replace(ranking, num_samples={name: result.counts[name] for name in ranking.order})
    if ranking.notes and warn:
        warnings.warn(ranking.warning_text(), UserWarning, stacklevel=2)
    return ranking


def unimodal_histories(
    encoders: Mapping[str, nn.Module],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    *,
    task: Task = "classification",
    num_classes: int | None = None,
    epochs: int = 10,
    seeds: int = 1,
    subset: float = 1.0,
    optimizer: OptimizerFactory | None = None,
    loss: Loss | None = None,
    metric: Metric | None = None,
    features: Features | Mapping[str, Features] | None = None,
    batch_fn: BatchFn | None = None,
    progress: bool | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, list[list[float]]]:
    """Train a linear probe on each encoder and return ``{modality: [run 0 history, run 1 history, ...]}``.

    >>> import torch
    >>> data = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> encoders = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Flatten()}
    >>> h = unimodal_histories(encoders, data[:3], data[3:], num_classes=3, epochs=2, seeds=2)
    >>> {m: (len(runs), len(runs[0])) for m, runs in h.items()}
    {'a': (2, 2), 'b': (2, 2)}

    Each history holds ``epochs`` scores and :func:`~pdmp_optim.rank_modalities` takes the result as is; plot
    the curves or rank single runs yourself. For each of ``seeds`` runs, every encoder is deep-copied, topped
    with a fresh ``nn.Linear`` head on what ``features`` reads of its output and trained with ``loss``; all
    modalities train in one pass over the data (a batch is loaded once per epoch) and are scored with
    ``metric`` after every epoch. Your encoders are never modified; parameters you froze
    (``requires_grad=False``) stay frozen in the copies, so a frozen backbone gives a linear probe. Copies
    train in ``train()`` mode and are evaluated in ``eval()`` mode.

    The task decides the head's output size, the default loss and the default metric:

    | ``task`` | target of a batch | head outputs, default loss (BCE: binary cross-entropy) | default metric |
    | --- | --- | --- | --- |
    | ``"classification"`` | class indices (N,) | ``num_classes``, cross-entropy | :func:`accuracy` |
    | ``"regression"`` | numbers, (N,) or (N, D) | 1 or D, mean squared error | :func:`mean_absolute_error` |
    | ``"multilabel"`` | 0/1 labels (N, L) | L = ``num_classes``, BCE | :func:`mean_average_precision` |

    Missing modalities: an input that is absent from a batch or ``None`` means the whole batch lacks that
    modality; a batch ``(inputs, target, present)`` whose ``present`` maps a modality to a boolean tensor (N,)
    marks, per sample, who has it (the input keeps all N rows; the rows of absent samples are never read). Each
    probe trains and is scored on the samples that have its modality only.

    Args:
        encoders: modality -> your ``nn.Module`` encoder (at least two modalities). What it returns, after
            ``features``, must be one tensor with a row per sample: its first dimension is the target's.
        train_batches: re-iterable data (a ``DataLoader``, a list) of ``(inputs, target)`` or
            ``(inputs, target, present)`` batches where ``inputs`` maps each modality to a tensor (or ``None``).
        eval_batches: the same, for the validation data the probes are scored on after every epoch.
        task: ``"classification"`` (the default), ``"regression"`` or ``"multilabel"``, as in the table.
        num_classes: number of classes (classification, >= 2) or labels (multilabel, >= 1); not used for
            regression, whose output size follows the target.
        epochs: training epochs per run. With ``epochs=1`` there is no early score.
        seeds: number of independent runs (head init, data order and the subset drawn differ).
        subset: fraction in (0, 1] of the training batches each run trains on, drawn per run.
        optimizer: factory ``params -> Optimizer``; default: the paper's SGD (lr 1e-3, momentum 0.9,
            weight decay 1e-4). Called once per modality and run.
        loss: ``loss(output, target) -> scalar tensor`` to train the probes with, instead of the task's. The
            ``output`` is the head's: logits (N, C) for classification, (N, L) for multilabel, shaped like the
            target for regression; the target is the batch's (a float tensor for regression and multilabel).
        metric: ``metric(output, target) -> float`` over the whole eval set (default: the task's). Give it a
            ``higher_is_better`` attribute, or pass ``higher_is_better=`` to :func:`analyze_modalities`.
        features: what the probe reads of the encoder's output: a callable ``output -> (batch, features)``
            for every encoder, or a mapping modality -> callable (the others read their output as it is). Use it
            to pool feature maps as your model's forward does (``lambda out: out.mean(dim=(2, 3))``), to pick a
            tensor from a tuple or a model output (``lambda out: out.last_hidden_state[:, 0]``), or to unfold
            frames folded into the batch (``lambda out: out.unflatten(0, (-1, frames)).mean(dim=1)``). An output
            with more than two dimensions is flattened, with a ``UserWarning``.
        batch_fn: turns one of your batches into ``(inputs, target)`` or ``(inputs, target, present)``.
        progress: a one-line progress display on stderr for runs longer than a second; ``None`` shows it
            only when stderr is a terminal, ``False`` never, ``True`` always.
        device: where to train the copies (default: where each encoder's parameters are).
        seed: base seed; run ``r`` uses ``seed + r``. Your global RNG state is left as it was.

    Raises:
        ValueError: a modality missing from every training or every evaluation batch, a batch carrying a
            modality with no encoder, targets that do not fit ``task`` (classes outside ``num_classes``, labels
            other than 0/1, regression targets whose shape changes), one-shot iterators, ``subset`` outside
            (0, 1], ``seeds`` or ``epochs`` < 1, an unknown ``task``, empty data, or a diverging run.
        TypeError: a non-module encoder, a batch that is not ``(inputs, target)``, an encoder output that is not
            one (batch, ...) tensor after ``features`` (the message shows the ``features=`` that fixes it), a
            missing ``num_classes``, a ``loss`` that does not return a scalar tensor.
    """
    options = {key: value for key, value in locals().items() if key in _OPTION_NAMES}
    return _probe_runs(options).histories


_OPTION_NAMES = tuple(inspect.signature(unimodal_histories).parameters)


# ------------------------------------------------------------------------------------------------ internals
@dataclasses.dataclass
class _Result:
    histories: dict[str, list[list[float]]]
    counts: dict[str, dict[str, int]]  # modality -> {"train": per epoch (fewest over runs), "eval": ...}


def _probe_runs(options: Mapping[str, Any]) -> _Result:
    """The work of :func:`unimodal_histories` (its arguments by name): histories and the samples they rest on."""
    o = options
    names = _check_encoders(o["encoders"])
    spec = _TaskSpec(o["task"], o["num_classes"], o["loss"], o["metric"])
    epochs, seeds = check_int(o["epochs"], "epochs", minimum=1), check_int(o["seeds"], "seeds", minimum=1)
    seed, subset = check_int(o["seed"], "seed"), o["subset"]
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or not 0.0 < float(subset) <= 1.0:
        raise ValueError(f"subset must be a fraction in (0, 1] of the training batches, got {subset!r}")
    for what in ("optimizer", "loss", "metric", "batch_fn"):
        if o[what] is not None and not callable(o[what]):
            raise TypeError(f"{what} must be callable or None, got {type(o[what]).__name__}")
    feature_fns = _feature_functions(o["features"], names)
    target_device = None if o["device"] is None else torch.device(o["device"])
    make_optimizer = o["optimizer"] if o["optimizer"] is not None else _paper_sgd
    split = _Splitter(names, spec, o["batch_fn"])
    train_batches, eval_batches = o["train_batches"], o["eval_batches"]
    cuda_devices = _cuda_devices(o["encoders"], target_device)
    runs: list[dict[str, list[float]]] = []
    train_counts: dict[str, list[int]] = {name: [] for name in names}
    eval_counts: dict[str, int] = {}
    # Everything that may draw random numbers (even iter() on a DataLoader does) runs on a forked, seeded RNG:
    # the CPU generator and those of the CUDA devices the probes use, and no other device's.
    with torch.random.fork_rng(devices=cuda_devices):
        _seed(seed, cuda_devices)
        n_train, n_used, examples = _first_look(train_batches, eval_batches, float(subset), split)
        bar = _Progress(o["progress"], total=seeds * epochs * n_used)
        try:
            for run in range(seeds):
                _seed(seed + run, cuda_devices)
                chosen = _choose(n_train, n_used, seed + run)
                probes = {
                    n: _Probe(n, o["encoders"][n], examples[n], spec, feature_fns.get(n), target_device, make_optimizer)
                    for n in names
                }
                if run == 0:
                    _warn_flattened(probes)
                label = f"run {run + 1}/{seeds}"
                history, trained, eval_counts = _train_run(
                    probes, train_batches, eval_batches, chosen, split, epochs, bar, label
                )
                runs.append(history)
                for name in names:
                    train_counts[name].append(trained[name])
        finally:
            bar.close()
    return _Result(
        histories={name: [run[name] for run in runs] for name in names},
        counts={name: {"train": min(train_counts[name]), "eval": eval_counts[name]} for name in names},
    )


def _direction(higher_is_better: Any, task: Any, metric: Any) -> bool:
    """Whether a higher metric is better: as given, else the metric's own attribute, else by task."""
    if higher_is_better is not None:
        return bool(higher_is_better)
    chosen = metric if metric is not None else _DEFAULT_METRIC.get(task)
    found = getattr(chosen, "higher_is_better", None)
    if isinstance(found, bool):
        return found
    if task != "regression" and task != "multilabel":  # classification, or a bad task that _TaskSpec reports
        return True
    raise ValueError(
        f"say which way your metric {getattr(metric, '__name__', type(metric).__name__)!r} points: pass "
        "higher_is_better=False for an error or a loss (MAE, MSE), higher_is_better=True for a score (F1, R2), "
        "or give the metric a higher_is_better attribute"
    )


class _TaskSpec:
    """What a task decides: the head's output size, how targets are checked and shaped, the loss and the metric."""

    def __init__(self, task: Any, num_classes: Any, loss: Loss | None, metric: Metric | None) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        self.task: str = task
        self.num_classes: int | None = None
        if task == "regression":
            if num_classes is not None:
                raise ValueError(
                    "task='regression' takes the probe's output size from the target, (N,) or (N, D); drop num_classes"
                )
        elif num_classes is None:
            what = "classes" if task == "classification" else "labels"
            raise TypeError(f"task={task!r} needs num_classes= (the number of {what})")
        else:
            self.num_classes = check_int(num_classes, "num_classes", minimum=2 if task == "classification" else 1)
        self.loss: Loss = loss if loss is not None else _DEFAULT_LOSS[task]
        self.metric: Metric = metric if metric is not None else _DEFAULT_METRIC[task]
        self.target_shape: tuple[int, ...] | None = None  # regression: the target's shape after N, from batch one

    @property
    def num_outputs(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return math.prod(self.target_shape or ())

    def shape_output(self, out: Tensor) -> Tensor:
        """The head's output shaped like the target (regression) or as it is (logits)."""
        if self.task == "regression" and self.target_shape is not None:
            return out.reshape(out.shape[0], *self.target_shape)
        return out

    def check_target(self, target: Any, where: str, index: int) -> Tensor:
        if not isinstance(target, Tensor):
            target = torch.as_tensor(target)
        at = f"target of batch {index} of {where}"
        shape, dtype = tuple(target.shape), target.dtype
        if self.task == "classification":
            if target.dim() != 1 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise ValueError(
                    f"{at} must be a 1-D tensor of class indices, got dtype {dtype} and shape {shape}; convert "
                    "one-hot targets with .argmax(1), or pass task='multilabel' (0/1 per label) or task='regression'"
                )
            assert self.num_classes is not None
            if target.numel() and bool(((target < 0) | (target >= self.num_classes)).any()):
                raise ValueError(
                    f"{at} holds classes {sorted(set(target.tolist()))[:10]} outside [0, {self.num_classes}); pass "
                    "the right num_classes or remap the labels to 0..num_classes-1"
                )
        elif self.task == "multilabel":
            if target.dim() != 2 or target.shape[1] != self.num_classes or dtype.is_complex:
                raise ValueError(
                    f"{at} must hold 0/1 per label, shape (N, num_classes={self.num_classes}), got dtype {dtype} "
                    f"and shape {shape}; for one class index per sample pass task='classification'"
                )
            if target.numel() and bool(((target < 0) | (target > 1) | target.isnan()).any()):
                raise ValueError(f"{at} must hold values in [0, 1] (1: the label applies), got values outside")
        else:
            if target.dim() not in (1, 2) or dtype.is_complex or dtype == torch.bool:
                raise ValueError(
                    f"{at} must be a real tensor of shape (N,) or (N, D) for task='regression', got dtype {dtype} "
                    f"and shape {shape}"
                )
            if target.numel() and not bool(target.isfinite().all()):
                raise ValueError(f"{at} holds NaN or inf; drop or repair those samples")
            if self.target_shape is None:
                self.target_shape = shape[1:]
            elif shape[1:] != self.target_shape:
                raise ValueError(
                    f"{at} has shape {shape} but the first batch's target had shape (N, *{self.target_shape}); "
                    "every regression target needs the same number of outputs"
                )
        return target


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target)


def _binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


_DEFAULT_LOSS: dict[str, Loss] = {
    "classification": _cross_entropy,
    "regression": _mse,
    "multilabel": _binary_cross_entropy,
}


def _feature_functions(features: Any, names: list[str]) -> dict[str, Features]:
    """modality -> the function the probe applies to its encoder's output (modalities without one: none)."""
    if features is None:
        return {}
    if isinstance(features, Mapping):
        unknown = [name for name in features if name not in names]
        if unknown:
            raise ValueError(f"features names {unknown}, which have no encoder; the encoders are {names}")
        for name, fn in features.items():
            if not callable(fn):
                raise TypeError(f"features[{name!r}] must be callable (output -> tensor), got {type(fn).__name__}")
        return dict(features)
    if callable(features):
        return dict.fromkeys(names, features)
    raise TypeError(
        f"features must be a callable (output -> (batch, features) tensor) or a dict modality -> callable, got "
        f"{type(features).__name__}"
    )


def _cuda_devices(encoders: Mapping[str, nn.Module], device: torch.device | None) -> list[int]:
    """Indices of the CUDA devices the probes will run on."""
    if device is not None:
        devices = [device]
    else:
        devices = [t.device for e in encoders.values() for t in (*e.parameters(), *e.buffers())]
    found = set()
    for d in devices:
        if d.type == "cuda":
            found.add(d.index if d.index is not None else torch.cuda.current_device())
    return sorted(found)


def _seed(seed: int, cuda_devices: list[int]) -> None:
    """Seed the CPU generator and the given CUDA devices' (``torch.manual_seed`` would touch every device)."""
    torch.random.default_generator.manual_seed(seed)
    for index in cuda_devices:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def _paper_sgd(params: list[Tensor]) -> Optimizer:
    """The paper's optimizer: SGD, lr 1e-3, momentum 0.9, weight decay 1e-4."""
    return SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)


def _first_look(
    train_batches: Iterable[Any], eval_batches: Iterable[Any], subset: float, split: _Splitter
) -> tuple[int, int, dict[str, tuple[Tensor, int]]]:
    """Check the data sources; return the number of training batches, how many a run uses, and an input of each
    modality with its number of samples (from the first training batches that have it)."""
    _check_reiterable(train_batches, "train_batches")
    _check_reiterable(eval_batches, "eval_batches")
    n_train = _count(train_batches)
    if n_train == 0:
        raise ValueError("train_batches is empty; pass at least one (inputs, target) batch")
    if _count(eval_batches, at_least_one=True) == 0:
        raise ValueError("eval_batches is empty; pass at least one (inputs, target) batch to score the probes")
    n_used = min(n_train, max(1, round(subset * n_train)))
    examples: dict[str, tuple[Tensor, int]] = {}
    for index, batch in enumerate(train_batches):
        inputs, target, masks = split(batch, "train_batches", index)
        for name, x in inputs.items():
            if name not in examples:
                x, t = _select(x, target, masks.get(name))
                examples[name] = (x, t.shape[0])
        if len(examples) == len(split.names):
            break
    missing = [name for name in split.names if name not in examples]
    if missing:
        raise ValueError(
            f"modality {missing} is missing from every batch of train_batches (no input, None, or no sample "
            "marked present), so its probe has nothing to train on; give it data or drop its encoder"
        )
    return n_train, n_used, examples


def _select(x: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The rows of ``x`` and ``target`` that have the modality (all of them without a mask)."""
    if mask is None:
        return x, target
    return x[mask.to(x.device)], target[mask.to(target.device)]


def _train_run(
    probes: Mapping[str, _Probe],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    chosen: list[int] | None,
    split: _Splitter,
    epochs: int,
    bar: _Progress,
    run: str,
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, int]]:
    """Train one run's probes on the ``chosen`` training batches: each modality's score after every epoch, and the
    training (first epoch) and evaluation samples each rests on."""
    history: dict[str, list[float]] = {name: [] for name in probes}
    trained: dict[str, int] = {}
    evaluated: dict[str, int] = {}
    for epoch in range(epochs):
        bar.describe(f"{run} epoch {epoch + 1}/{epochs}")
        counts = _train_epoch(probes, train_batches, chosen, split, bar)
        if epoch == 0:
            trained = counts
            empty = [name for name, n in counts.items() if n == 0]
            if empty:
                raise ValueError(
                    f"modality {empty} has no sample in the training batches of {run}: the subset it drew holds "
                    "only batches without it; pass a larger subset="
                )
        for probe in probes.values():
            probe.check_finite(run, epoch)
        scores, evaluated = _evaluate(probes, eval_batches, split)
        for name, score in scores.items():
            history[name].append(score)
    return history, trained, evaluated


class _Probe:
    """A deep copy of one encoder with a fresh linear head, and its own optimizer."""

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        example: tuple[Tensor, int],
        spec: _TaskSpec,
        features: Features | None,
        device: torch.device | None,
        make_optimizer: OptimizerFactory,
    ) -> None:
        self.name = name
        self.spec = spec
        self.features = features
        self.flattened: tuple[int, ...] | None = None  # the shape of a multi-dimensional output read flattened
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.grad = None
        if device is None:
            device = next((t.device for t in (*self.encoder.parameters(), *self.encoder.buffers())), None)
            device = device if device is not None else torch.device("cpu")
        self.encoder.to(device)
        self.device = device
        self.encoder.eval()
        with torch.no_grad():
            read = self._features(example[0].to(device), example[1])
        self.dtype = read.dtype
        self.head = nn.Linear(read.shape[1], spec.num_outputs, device=device, dtype=read.dtype)
        params: list[Tensor] = [p for p in (*self.encoder.parameters(), *self.head.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(params)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                f"optimizer factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer; "
                "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=1e-2)"
            )
        self.loss_sum = torch.zeros((), device=device)

    def _features(self, x: Tensor, batch: int) -> Tensor:
        out = self.encoder(x)
        if self.features is not None:
            out = self.features(out)
        if not isinstance(out, Tensor):
            raise TypeError(_not_a_tensor(self.name, out, self.features is not None))
        if out.dim() == 0 or out.shape[0] != batch:
            raise TypeError(_not_the_batch(self.name, tuple(out.shape), batch))
        if out.dim() > 2 and self.flattened is None:
            self.flattened = tuple(out.shape)
        return out.reshape(out.shape[0], -1)

    def output(self, x: Tensor, batch: int) -> Tensor:
        """The head's output for ``x``, an input of ``batch`` samples."""
        return self.spec.shape_output(self.head(self._features(x.to(self.device, non_blocking=True), batch)))

    def target(self, target: Tensor) -> Tensor:
        """The target on the probe's device, as a float of the head's dtype where the loss needs one."""
        target = target.to(self.device, non_blocking=True)
        return target if self.spec.task == "classification" else target.to(self.dtype)

    def train_step(self, x: Tensor, target: Tensor) -> None:
        loss = self.spec.loss(self.output(x, target.shape[0]), self.target(target))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shown = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"loss must return a scalar tensor (reduce it, e.g. .mean()), got {shown}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def check_finite(self, run: str, epoch: int) -> None:
        if not torch.isfinite(self.loss_sum):
            raise ValueError(
                f"training the {self.name!r} probe diverged (loss {self.loss_sum.item()}) in {run}, epoch "
                f"{epoch + 1}; lower the learning rate, e.g. optimizer=lambda p: torch.optim.SGD(p, lr=1e-4)"
            )
        self.loss_sum.zero_()


def _not_a_tensor(name: str, out: Any, through_features: bool) -> str:
    """The message for an output that is not one tensor, with the ``features=`` that picks one."""
    if hasattr(out, "last_hidden_state"):  # a Hugging Face model output
        pick = "lambda out: out.last_hidden_state[:, 0]  (the first token; or out.pooler_output)"
    elif isinstance(out, (tuple, list)):
        pick = "lambda out: out[0]"
    elif isinstance(out, Mapping) and out:
        pick = f"lambda out: out[{next(iter(out))!r}]"
    else:
        pick = "lambda out: <the representation tensor>"
    source = f"features[{name!r}] returned" if through_features else f"encoder {name!r} returned"
    return (
        f"{source} a {type(out).__name__}; the probe reads one tensor (batch, features): pass "
        f"features={{{name!r}: {pick}}}"
    )


def _not_the_batch(name: str, shape: tuple[int, ...], batch: int) -> str:
    """The message for an output whose first dimension is not the batch, with the ``features=`` that fixes it."""
    said = f"encoder {name!r} returned shape {shape} for a batch of {batch}"
    if len(shape) >= 1 and batch > 0 and shape[0] > batch and shape[0] % batch == 0:
        frames = shape[0] // batch
        pooled = (1, *range(3, len(shape) + 1))
        dims = pooled[0] if len(pooled) == 1 else pooled
        return (
            f"{said}: {frames} rows per sample, as when a video encoder folds {frames} frames into the batch "
            f"(batch * frames, ...). Unfold and pool them as your model's forward does, e.g. features={{{name!r}: "
            f"lambda out: out.unflatten(0, (-1, {frames})).mean(dim={dims})}} (frames folded sample by sample, "
            f"row b * {frames} + t, as x.flatten(0, 1) of a (batch, frames, ...) input does)"
        )
    if len(shape) >= 2 and shape[1] == batch:
        return (
            f"{said}: the batch looks like its second dimension (time first, as nn.LSTM or nn.Transformer "
            f"without batch_first); pass e.g. features={{{name!r}: lambda out: out.mean(dim=0)}}"
        )
    return f"{said}; its output's first dimension must be the batch: pass features= that maps it to (batch, features)"


def _warn_flattened(probes: Mapping[str, _Probe]) -> None:
    """One warning per probe that reads a multi-dimensional output flattened (a feature map, a sequence)."""
    for name, probe in probes.items():
        if probe.flattened is None:
            continue
        shape = probe.flattened
        dims = ", ".join(str(d) for d in shape[1:])
        if len(shape) == 4:
            pool = "lambda out: out.mean(dim=(2, 3))  (a (batch, channels, H, W) map)"
        elif len(shape) == 3:
            pool = "lambda out: out.mean(dim=1)  (a (batch, time, features) sequence; out[:, 0] for a first token)"
        else:
            pool = f"lambda out: out.mean(dim={tuple(range(2, len(shape)))})"
        warnings.warn(
            f"the {name!r} probe reads the encoder's output of shape (batch, {dims}) flattened into "
            f"{math.prod(shape[1:]):,} features. If your model pools it before fusion, pool it the same way: "
            f"features={{{name!r}: {pool}}}; to keep the flat map, pass features={{{name!r}: lambda out: "
            "out.flatten(1)}, which also silences this warning",
            UserWarning,
            stacklevel=4,  # the caller of unimodal_histories / analyze_modalities
        )


def _train_epoch(
    probes: Mapping[str, _Probe],
    batches: Iterable[Any],
    chosen: list[int] | None,
    split: _Splitter,
    bar: _Progress,
) -> dict[str, int]:
    """One pass over the chosen batches; the number of samples each probe trained on."""
    for probe in probes.values():
        probe.encoder.train()
        probe.head.train()
    counts = dict.fromkeys(probes, 0)
    for index, batch in _iterate(batches, chosen):
        inputs, target, masks = split(batch, "train_batches", index)
        for name, probe in probes.items():
            if name not in inputs:
                continue
            x, t = _select(inputs[name], target, masks.get(name))
            probe.train_step(x, t)
            counts[name] += t.shape[0]
        bar.advance()
    return counts


@torch.no_grad()
def _evaluate(
    probes: Mapping[str, _Probe], batches: Iterable[Any], split: _Splitter
) -> tuple[dict[str, float], dict[str, int]]:
    """Each probe's score over the evaluation samples that have its modality, and how many those are."""
    for probe in probes.values():
        probe.encoder.eval()
        probe.head.eval()
    outputs: dict[str, list[Tensor]] = {name: [] for name in probes}
    targets: dict[str, list[Tensor]] = {name: [] for name in probes}
    seen = False
    for index, batch in enumerate(batches):
        seen = True
        inputs, target, masks = split(batch, "eval_batches", index)
        for name, probe in probes.items():
            if name in inputs:
                x, t = _select(inputs[name], target, masks.get(name))
                outputs[name].append(probe.output(x, t.shape[0]))
                targets[name].append(t)
    if not seen:
        raise ValueError("eval_batches yielded no batch; pass at least one (inputs, target) batch")
    empty = [name for name in probes if not targets[name]]
    if empty:
        raise ValueError(
            f"modality {empty} is missing from every batch of eval_batches (no input, None, or no sample marked "
            "present), so its probe cannot be scored; give it evaluation data or drop its encoder"
        )
    scores, counts = {}, {}
    for name, probe in probes.items():
        target = torch.cat(targets[name])
        counts[name] = target.shape[0]
        value = probe.spec.metric(torch.cat(outputs[name]), probe.target(target))
        try:
            scores[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric must return a number, got {type(value).__name__} for {name!r}") from None
    return scores, counts


def _iterate(batches: Iterable[Any], chosen: list[int] | None) -> Iterable[tuple[int, Any]]:
    """Yield ``(index, batch)`` for the chosen batch indices (all when ``chosen`` is None), loading no others
    from a sequence and stopping a loader after the last one needed."""
    if chosen is None:
        yield from enumerate(batches)
    elif isinstance(batches, Sequence):
        for index in chosen:
            yield index, batches[index]
    else:
        wanted = set(chosen)
        last = chosen[-1]
        for index, batch in enumerate(batches):
            if index in wanted:
                yield index, batch
            if index >= last:
                break


def _choose(n_total: int, n_used: int, run_seed: int) -> list[int] | None:
    """The sorted batch indices a run trains on, drawn with its own generator (None: all of them)."""
    if n_used >= n_total:
        return None
    generator = torch.Generator().manual_seed(run_seed)
    return sorted(torch.randperm(n_total, generator=generator)[:n_used].tolist())


class _Splitter:
    """Turns a user batch into ``(inputs, target, masks)`` and checks it: ``inputs`` holds the modalities the batch
    has (a modality absent, ``None`` or marked absent for every sample is left out), ``masks`` the per-sample masks
    of the modalities some samples lack."""

    def __init__(self, names: list[str], spec: _TaskSpec, batch_fn: BatchFn | None) -> None:
        self.names = names
        self.spec = spec
        self.batch_fn = batch_fn

    def __call__(self, batch: Any, where: str, index: int) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3) or not isinstance(batch[0], Mapping):
            raise TypeError(
                f"batch {index} of {where} is not (inputs, target) or (inputs, target, present) with inputs a dict "
                f"modality -> tensor (got {type(batch).__name__}); pass batch_fn= to adapt your layout, e.g. "
                "batch_fn=lambda b: ({'audio': b[0], 'visual': b[1]}, b[2])"
            )
        raw, target = batch[0], batch[1]
        extra = [name for name in raw if name not in self.names]
        if extra:
            raise ValueError(
                f"batch {index} of {where} has inputs for {extra} but encoders has no encoder for them; add "
                f"encoders for them or leave them out of the batch (e.g. with batch_fn=)"
            )
        target = self.spec.check_target(target, where, index)
        inputs: dict[str, Tensor] = {}
        for name in self.names:
            x = raw.get(name)
            if x is None:
                continue  # the whole batch lacks this modality
            if not isinstance(x, Tensor):
                raise TypeError(f"input {name!r} of batch {index} of {where} is {type(x).__name__}, not a tensor")
            inputs[name] = x
        masks = self._masks(batch[2] if len(batch) == 3 else None, inputs, target, f"batch {index} of {where}")
        return inputs, target, masks

    def _masks(self, present: Any, inputs: dict[str, Tensor], target: Tensor, at: str) -> dict[str, Tensor]:
        """The per-sample masks of ``present``; drops from ``inputs`` a modality no sample has."""
        if present is None:
            return {}
        if not isinstance(present, Mapping):
            raise TypeError(
                f"the third element of {at} must map modality -> boolean tensor (N,) marking the samples that have "
                f"it, got {type(present).__name__}"
            )
        unknown = [name for name in present if name not in self.names]
        if unknown:
            raise ValueError(f"present of {at} names {unknown}, which have no encoder; the encoders are {self.names}")
        masks = {}
        for name, value in present.items():
            mask = value if isinstance(value, Tensor) else torch.as_tensor(value)
            if mask.dtype != torch.bool or tuple(mask.shape) != (target.shape[0],):
                raise ValueError(
                    f"present[{name!r}] of {at} must be a boolean tensor of shape ({target.shape[0]},), one entry "
                    f"per sample (True: the sample has {name!r}), got dtype {mask.dtype} and shape {tuple(mask.shape)}"
                )
            if name not in inputs:
                continue
            if inputs[name].dim() == 0 or inputs[name].shape[0] != target.shape[0]:
                raise ValueError(
                    f"input {name!r} of {at} has shape {tuple(inputs[name].shape)}, but present[{name!r}] marks "
                    f"{target.shape[0]} samples: keep a row for every sample (any values in the absent ones)"
                )
            if bool(mask.all()):
                continue
            if not bool(mask.any()):
                del inputs[name]
                continue
            masks[name] = mask
        return masks


class _Progress:
    """A one-line progress display on stderr: only for runs over a second, only on a terminal (or if asked)."""

    def __init__(self, enabled: bool | None, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = bool(enabled)
        self.total = max(total, 1)
        self.done = 0
        self.label = ""
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def describe(self, label: str) -> None:
        self.label = label

    def advance(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < 1.0 or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last = now
        frac = self.done / self.total
        filled = int(20 * frac)
        eta = (now - self.start) * (1 - frac) / frac if frac > 0 else math.inf
        self.stream.write(
            f"\ranalyze_modalities {self.label} [{'#' * filled}{'.' * (20 - filled)}] {frac:4.0%} eta {eta:4.0f}s "
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _check_encoders(encoders: Any) -> list[str]:
    if not isinstance(encoders, Mapping):
        raise TypeError(f"encoders must be a dict modality -> nn.Module, got {type(encoders).__name__}")
    if len(encoders) < 2:
        raise ValueError(
            f"analyze_modalities needs at least two modality encoders, got {list(encoders)}; with one modality "
            "there is nothing to rank"
        )
    for name, encoder in encoders.items():
        check_name(name)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder {name!r} must be an nn.Module, got {type(encoder).__name__}")
    return list(encoders)


def _check_reiterable(data: Any, what: str) -> None:
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"{what} must be an iterable of (inputs, target) batches (a list or a DataLoader), "
            f"got {type(data).__name__}"
        ) from None
    if iterator is data:
        raise ValueError(
            f"{what} is a one-shot iterator ({type(data).__name__}), but the analysis iterates it once per epoch "
            f"and run; pass something re-iterable: a DataLoader, or list({what})"
        )


def _count(data: Iterable[Any], at_least_one: bool = False) -> int:
    """Number of batches: ``len()`` when it has one; otherwise iterate (or just peek, with ``at_least_one``)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        pass
    if at_least_one:
        return int(next(iter(data), _EMPTY) is not _EMPTY)
    return sum(1 for _ in data)


_EMPTY = object()
