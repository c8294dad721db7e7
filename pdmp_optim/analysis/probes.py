"""PDMP's modality analysis in one call: train a unimodal model per modality on copies of your encoders.

:func:`analyze_modalities` ranks the modalities (and documents what it trains); :func:`unimodal_histories`
trains the same models and returns their raw score histories.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from time import monotonic
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD, Optimizer

from .._checks import check_int, check_modalities, takes_encoders
from .ranking import ModalityRanking, check_early_epoch, rank_modalities
from .tasks import Loss, Metric, Task, TaskSpec, direction

__all__ = ["analyze_modalities", "unimodal_histories"]

OptimizerFactory = Callable[[list[Tensor]], Optimizer]
Features = Callable[[Any], Tensor]
BatchFn = Callable[[Any], Any]


@takes_encoders
def analyze_modalities(
    groups: Mapping[str, nn.Module], train_batches: Iterable[Any], eval_batches: Iterable[Any], *,
    task: Task = "classification", num_classes: int | None = None, epochs: int = 10, seeds: int = 1,
    subset: float = 1.0, optimizer: OptimizerFactory | None = None, loss: Loss | None = None,
    metric: Metric | None = None, features: Features | Mapping[str, Features] | None = None,
    batch_fn: BatchFn | None = None, progress: bool | None = None, device: torch.device | str | None = None,
    seed: int = 0, higher_is_better: bool | None = None, early_epoch: int = 0, warn: bool = True,
) -> ModalityRanking:  # fmt: skip
    """Rank modalities by unimodal models trained on copies of your encoders (the paper's Algorithm 1).

    >>> import torch
    >>> data = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> groups = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Flatten()}
    >>> ranking = analyze_modalities(groups, data[:3], data[3:], num_classes=3, epochs=2, warn=False)
    >>> sorted(ranking.order), ranking.num_runs, ranking.num_samples["b"]
    (['a', 'b'], 1, {'train': 24, 'eval': 8})

    A regression task (e.g. sentiment intensity) ranks by mean absolute error, lower being better:

    >>> reg = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randn(8)) for _ in range(4)]
    >>> analyze_modalities(groups, reg[:3], reg[3:], task="regression", epochs=2, warn=False).higher_is_better
    False

    **What it trains.** For each of ``seeds`` runs and each modality, a *probe*: a deep copy of your encoder
    ``groups[modality]`` topped with a fresh ``nn.Linear`` head on what ``features`` reads of the encoder's
    output. The probe's optimizer gets the head and every parameter of the copy that requires a gradient, so
    the whole encoder trains, as the paper's unimodal models do. Parameters you froze (``requires_grad=False``)
    stay frozen in the copy: freeze a whole encoder and only its head trains (a linear probe). Your own modules
    are never modified, and your global RNG state is left as it was. All probes train in one pass over the
    data (each batch is loaded once per epoch), in ``train()`` mode, and are scored with ``metric`` in
    ``eval()`` mode after every epoch; each trains and is scored only on the samples that have its modality.

    **With which optimizer.** By default the paper's, not yours: SGD with lr 1e-3, momentum 0.9 and weight
    decay 1e-4, made afresh for every probe. That is slow on small models. Pass your own as a factory, e.g.
    ``optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)``.

    The score histories go to :func:`~pdmp_optim.rank_modalities`, so the result says how sure it is:
    ``agreement`` is the fraction of runs that pick the same ``performance_dominant`` modality, and ``notes``
    (with one ``UserWarning``) flag near ties and disagreeing runs. Use ``seeds >= 3`` to get that readout.
    ``num_samples`` says how many samples each modality's scores rest on (fewer than the data holds when a
    modality is missing for some samples). Pass the result to ``PDMPOptimizer(..., ranking=...)``.

    The task decides the head's output size, the default loss and the default metric:

    | ``task`` | target of a batch | head outputs, default loss (BCE: binary cross-entropy) | default metric |
    | --- | --- | --- | --- |
    | ``"classification"`` | class indices (N,) | ``num_classes``, cross-entropy | :func:`accuracy` |
    | ``"regression"`` | numbers, (N,) or (N, D) | 1 or D, mean squared error | :func:`mean_absolute_error` |
    | ``"multilabel"`` | 0/1 labels (N, L) | L = ``num_classes``, BCE | :func:`mean_average_precision` |

    Missing modalities: an input that is absent from a batch or ``None`` means the whole batch lacks that
    modality; a batch ``(inputs, target, present)`` whose ``present`` maps a modality to a boolean tensor (N,)
    marks, per sample, who has it (the input keeps all N rows; the rows of absent samples are never read).

    Args:
        groups: modality -> your ``nn.Module`` encoder (at least two modalities), as in ``PDMPOptimizer``'s
            ``groups``. What it returns, after ``features``, must be one tensor with a row per sample. The
            keyword ``encoders=`` (0.2's name) still works until 0.4, with a ``DeprecationWarning``.
        train_batches: re-iterable data (a ``DataLoader``, a list) of ``(inputs, target)`` or
            ``(inputs, target, present)`` batches where ``inputs`` maps each modality to a tensor (or ``None``).
        eval_batches: the same, for the validation data the probes are scored on after every epoch.
        task: ``"classification"`` (the default), ``"regression"`` or ``"multilabel"``, as in the table.
        num_classes: number of classes (classification, >= 2) or labels (multilabel, >= 1); not used for
            regression, whose output size follows the target.
        epochs: training epochs per run (default 10). With ``epochs=1`` there is no early score.
        seeds: number of independent runs (default 1; head init, data order and the subset drawn differ).
        subset: fraction in (0, 1] of the training batches each run trains on, drawn per run (default 1.0).
        optimizer: factory ``params -> Optimizer``, called once per modality and run; default (``None``): the
            paper's SGD (lr 1e-3, momentum 0.9, weight decay 1e-4).
        loss: ``loss(output, target) -> scalar tensor`` to train the probes with, instead of the task's. The
            ``output`` is the head's: logits (N, C) for classification, (N, L) for multilabel, shaped like the
            target for regression; the target is the batch's (a float tensor for regression and multilabel).
        metric: ``metric(output, target) -> float`` over the whole eval set (default: the task's).
        features: what the probe reads of the encoder's output: a callable ``output -> (batch, features)``
            for every encoder, or a mapping modality -> callable (the others read their output as it is). Use it
            to pool feature maps as your model's forward does (``lambda out: out.mean(dim=(2, 3))``), to pick a
            tensor from a tuple or a model output (``lambda out: out.last_hidden_state[:, 0]``), or to unfold
            frames folded into the batch (``lambda out: out.unflatten(0, (-1, frames)).mean(dim=1)``). An output
            with more than two dimensions is flattened, with a ``UserWarning``.
        batch_fn: turns one of your batches into ``(inputs, target)`` or ``(inputs, target, present)``.
        progress: a one-line progress display on stderr for runs longer than a second; ``None`` (the default)
            shows it only when stderr is a terminal, ``False`` never, ``True`` always.
        device: where to train the copies (default: where each encoder's parameters are).
        seed: base seed (default 0); run ``r`` uses ``seed + r``.
        higher_is_better: whether a higher ``metric`` is better (passed to :func:`~pdmp_optim.rank_modalities`).
            ``None`` (the default) takes it from the metric's ``higher_is_better`` attribute, which the
            built-in metrics carry (accuracy and mean average precision: higher; mean absolute error: lower). For
            your own metric without that attribute, ``None`` means higher for ``task="classification"`` and
            is an error for the other tasks: pass ``False`` for an error or a loss, ``True`` for a score.
        early_epoch: which epoch's score counts as early, ``0 <= early_epoch < epochs`` (default 0).
        warn: emit one ``UserWarning`` when the ranking has notes (ties, near ties, disagreeing runs).

    Raises:
        ValueError: a modality missing from every training or every evaluation batch, a batch carrying a
            modality with no encoder, targets that do not fit ``task`` (classes outside ``num_classes``, labels
            other than 0/1, regression targets whose shape changes), one-shot iterators, ``subset`` outside
            (0, 1], ``seeds`` or ``epochs`` < 1, ``early_epoch`` outside the epochs, an unknown ``task``, empty
            data, a diverging run, or your own metric without a direction outside classification.
        TypeError: a non-module encoder, a batch that is not ``(inputs, target)``, an encoder output that is not
            one (batch, ...) tensor after ``features`` (the message shows the ``features=`` that fixes it), a
            missing ``num_classes``, a ``loss`` that does not return a scalar tensor, an unknown keyword.
    """
    options = {k: v for k, v in locals().items() if k not in ("higher_is_better", "early_epoch", "warn")}  # probes'
    higher = direction(higher_is_better, task, metric)
    early_epoch = check_early_epoch(early_epoch, check_int(epochs, "epochs", minimum=1))  # before any training
    histories, counts = _train_probes(**options)
    ranking = rank_modalities(histories, higher_is_better=higher, early_epoch=early_epoch, warn=False)
    ranking = dataclasses.replace(ranking, num_samples=counts)
    if ranking.notes and warn:
        warnings.warn(ranking.warning_text(), UserWarning, stacklevel=3)  # 3: the caller, past the decorator
    return ranking


@takes_encoders
def unimodal_histories(
    groups: Mapping[str, nn.Module], train_batches: Iterable[Any], eval_batches: Iterable[Any], *,
    task: Task = "classification", num_classes: int | None = None, epochs: int = 10, seeds: int = 1,
    subset: float = 1.0, optimizer: OptimizerFactory | None = None, loss: Loss | None = None,
    metric: Metric | None = None, features: Features | Mapping[str, Features] | None = None,
    batch_fn: BatchFn | None = None, progress: bool | None = None, device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, list[list[float]]]:  # fmt: skip
    """Train :func:`analyze_modalities`' probes and return ``{modality: [run 0 history, run 1 history, ...]}``.

    >>> import torch
    >>> data = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> groups = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Flatten()}
    >>> h = unimodal_histories(groups, data[:3], data[3:], num_classes=3, epochs=2, seeds=2)
    >>> {m: (len(runs), len(runs[0])) for m, runs in h.items()}
    {'a': (2, 2), 'b': (2, 2)}

    Each history holds ``epochs`` scores and :func:`~pdmp_optim.rank_modalities` takes the result as is; plot
    the curves or rank single runs yourself. The arguments, what is trained and with which optimizer, and the
    errors are those of :func:`analyze_modalities` (the same keywords, with the same defaults, less the three
    that only ranking uses: ``higher_is_better``, ``early_epoch`` and ``warn``).
    """
    return _train_probes(**locals())[0]


# ------------------------------------------------------------------------------------------------ internals
def _train_probes(
    groups: Any, train_batches: Any, eval_batches: Any, *, task: Any, num_classes: Any, epochs: Any, seeds: Any,
    subset: Any, optimizer: Any, loss: Any, metric: Any, features: Any, batch_fn: Any, progress: Any, device: Any,
    seed: Any,
) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, int]]]:  # fmt: skip
    """The histories, and the samples each modality's scores rest on: ``{modality: {"train": n, "eval": n}}``
    (training samples per epoch, the fewest over runs and epochs)."""
    names = check_modalities(groups, "groups", "an nn.Module (its encoder)", nn.Module)
    spec = TaskSpec(task, num_classes, loss, metric)
    epochs, seeds = check_int(epochs, "epochs", minimum=1), check_int(seeds, "seeds", minimum=1)
    seed = check_int(seed, "seed")
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or not 0.0 < float(subset) <= 1.0:
        raise ValueError(f"subset must be a fraction in (0, 1] of the training batches, got {subset!r}")
    for what, fn in (("optimizer", optimizer), ("loss", loss), ("metric", metric), ("batch_fn", batch_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{what} must be callable or None, got {type(fn).__name__}")
    feature_fns = _feature_functions(features, names)
    factory = partial(SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4) if optimizer is None else optimizer  # the paper's
    split = partial(_split, names, spec, batch_fn)
    # The probes draw random numbers (so does iter() on a shuffling DataLoader) from the CPU generator and those of
    # the CUDA devices they use: seeded per run, on a fork that is restored afterwards; no other device is touched.
    homes = {name: _home(groups[name], device) for name in names}  # where each probe trains
    cuda = sorted({d.index for d in homes.values() if d.type == "cuda"})
    generators = [torch.random.default_generator, *(torch.cuda.default_generators[i] for i in cuda)]
    show = bool(getattr(sys.stderr, "isatty", lambda: False)()) if progress is None else bool(progress)
    start = monotonic()
    histories: dict[str, list[list[float]]] = {name: [] for name in names}
    trained: dict[str, int] = {}
    with torch.random.fork_rng(devices=cuda):
        n_train, n_used, examples = _first_look(train_batches, eval_batches, float(subset), split, names)
        for run in range(seeds):
            for generator in generators:
                generator.manual_seed(seed + run)
            draw = torch.Generator().manual_seed(seed + run)  # the run's subset of the training batches
            chosen = sorted(torch.randperm(n_train, generator=draw)[:n_used].tolist())
            probes = {n: _Probe(n, groups[n], examples[n], spec, feature_fns.get(n), homes[n], factory) for n in names}
            if run == 0:
                _warn_flattened(probes)
            for epoch in range(epochs):
                _one_pass(probes, _iterate(train_batches, chosen), split, "train_batches")
                _check_seen(probes, f"has no sample in the training batches of run {run + 1}/{seeds}: the subset it "
                            "drew holds only batches without it; pass a larger subset=")  # fmt: skip
                for name, probe in probes.items():
                    probe.check_finite(f"run {run + 1}/{seeds}, epoch {epoch + 1}")
                    trained[name] = min(trained.get(name, probe.samples), probe.samples)
                _one_pass(probes, enumerate(eval_batches), split, "eval_batches")
                _check_seen(probes, "is missing from every batch of eval_batches (no input, None, or no sample "
                            "marked present), so its probe cannot be scored; give it evaluation data or drop its "
                            "encoder")  # fmt: skip
                for probe in probes.values():
                    probe.history.append(probe.score())
                if show and monotonic() - start >= 1.0:  # one line on stderr, rewritten after every epoch
                    end = "\n" if run + 1 == seeds and epoch + 1 == epochs else ""
                    sys.stderr.write(f"\ranalyze_modalities: run {run + 1}/{seeds}, epoch {epoch + 1}/{epochs}{end}")
                    sys.stderr.flush()
            for name, probe in probes.items():
                histories[name].append(probe.history)
    return histories, {name: {"train": trained[name], "eval": probes[name].samples} for name in names}


def _one_pass(probes: Mapping[str, _Probe], batches: Iterable[tuple[int, Any]], split: Callable, where: str) -> None:
    """Train (on ``train_batches``) or evaluate every probe on the samples of ``batches``, pairs ``(index, batch)``,
    that have its modality."""
    training = where == "train_batches"
    for probe in probes.values():
        probe.start(training)
    with torch.set_grad_enabled(training):
        for index, batch in batches:
            for name, (x, target) in split(batch, f"batch {index} of {where}").items():
                probes[name].feed(x, target)


def _check_seen(probes: Mapping[str, _Probe], problem: str) -> None:
    empty = [name for name, probe in probes.items() if probe.samples == 0]
    if empty:
        raise ValueError(f"modality {empty} {problem}")


def _feature_functions(features: Any, names: list[str]) -> dict[str, Features]:
    """modality -> the function the probe applies to its encoder's output (modalities without one: none)."""
    if features is None or callable(features):
        return {} if features is None else dict.fromkeys(names, features)
    if not isinstance(features, Mapping):
        raise TypeError(
            "features must be a callable (output -> (batch, features) tensor) or a dict modality -> callable, got "
            f"{type(features).__name__}"
        )
    unknown = [name for name in features if name not in names]
    if unknown:
        raise ValueError(f"features names {unknown}, which have no encoder; the encoders are {names}")
    for name, fn in features.items():
        if not callable(fn):
            raise TypeError(f"features[{name!r}] must be callable (output -> tensor), got {type(fn).__name__}")
    return dict(features)


def _home(encoder: nn.Module, device: Any) -> torch.device:
    """Where the probe of ``encoder`` trains: ``device`` (a CUDA one with its index), else where the encoder's first
    parameter or buffer is (the CPU for an encoder without any)."""
    if device is not None:
        return torch.empty(0, device=device).device
    return next((t.device for t in itertools.chain(encoder.parameters(), encoder.buffers())), torch.device("cpu"))


def _first_look(train_batches: Iterable[Any], eval_batches: Iterable[Any], subset: float, split: Callable,
                names: list[str]) -> tuple[int, int, dict[str, tuple[Tensor, Tensor]]]:  # fmt: skip
    """Check the data sources; return the number of training batches, how many a run uses, and an input of each
    modality with its target (from the first training batches that have it)."""
    for data, what in ((train_batches, "train_batches"), (eval_batches, "eval_batches")):
        if not isinstance(data, Iterable):
            raise TypeError(
                f"{what} must be an iterable of (inputs, target) batches (a list or a DataLoader), "
                f"got {type(data).__name__}"
            )
        if isinstance(data, Iterator):
            raise ValueError(
                f"{what} is a one-shot iterator ({type(data).__name__}), but the analysis iterates it once per "
                f"epoch and run; pass something re-iterable: a DataLoader, or list({what})"
            )
    n_train = _count(train_batches)
    if n_train == 0:
        raise ValueError("train_batches is empty; pass at least one (inputs, target) batch")
    if _count(eval_batches, at_most=1) == 0:
        raise ValueError("eval_batches is empty; pass at least one (inputs, target) batch to score the probes")
    examples: dict[str, tuple[Tensor, Tensor]] = {}
    for index, batch in enumerate(train_batches):
        examples = {**split(batch, f"batch {index} of train_batches"), **examples}
        if len(examples) == len(names):
            break
    missing = [name for name in names if name not in examples]
    if missing:
        raise ValueError(
            f"modality {missing} is missing from every batch of train_batches (no input, None, or no sample "
            "marked present), so its probe has nothing to train on; give it data or drop its encoder"
        )
    return n_train, min(n_train, max(1, round(subset * n_train))), examples


def _count(data: Iterable[Any], at_most: int | None = None) -> int:
    """Number of batches: ``len()`` when it has one; otherwise iterate (stopping at ``at_most``)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in itertools.islice(data, at_most))


def _iterate(batches: Iterable[Any], chosen: list[int]) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for the chosen (sorted) batch indices, loading no others from a sequence and stopping a
    loader after the last one needed."""
    if isinstance(batches, Sequence):
        return ((index, batches[index]) for index in chosen)
    wanted = set(chosen)
    return ((index, batch) for index, batch in itertools.islice(enumerate(batches), chosen[-1] + 1) if index in wanted)


def _split(names: list[str], spec: TaskSpec, batch_fn: BatchFn | None, batch: Any, at: str) -> dict[str, Any]:
    """A user batch as ``{modality: (input, target)}`` over the samples that have the modality, checked; a modality
    the batch lacks (absent, ``None``, or marked absent for every sample) is left out."""
    if batch_fn is not None:
        batch = batch_fn(batch)
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3) or not isinstance(batch[0], Mapping):
        raise TypeError(
            f"{at} is not (inputs, target) or (inputs, target, present) with inputs a dict modality -> tensor "
            f"(got {type(batch).__name__}); pass batch_fn= to adapt your layout, e.g. "
            "batch_fn=lambda b: ({'audio': b[0], 'visual': b[1]}, b[2])"
        )
    raw = batch[0]
    present = batch[2] if len(batch) == 3 and batch[2] is not None else {}
    if not isinstance(present, Mapping):
        raise TypeError(
            f"the third element of {at} must map modality -> boolean tensor (N,) marking the samples that have "
            f"it, got {type(present).__name__}"
        )
    for what, given in (("inputs", raw), ("present", present)):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise ValueError(
                f"{what} of {at} names {unknown}, which have no encoder; add encoders for them to groups or "
                "leave them out of the batch (e.g. with batch_fn=)"
            )
    target = spec.check_target(batch[1], at)
    n = target.shape[0]
    parts: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:
        x, mask = raw.get(name), present.get(name)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != (n,):
                raise ValueError(
                    f"present[{name!r}] of {at} must be a boolean tensor of shape ({n},), one entry per sample "
                    f"(True: the sample has {name!r}), got dtype {mask.dtype} and shape {tuple(mask.shape)}"
                )
        if x is None:
            continue  # the whole batch lacks this modality
        if not isinstance(x, Tensor):
            raise TypeError(f"input {name!r} of {at} is {type(x).__name__}, not a tensor")
        if mask is not None and (x.dim() == 0 or x.shape[0] != n):
            raise ValueError(
                f"input {name!r} of {at} has shape {tuple(x.shape)}, but present[{name!r}] marks {n} samples: "
                "keep a row for every sample (any values in the absent ones)"
            )
        if mask is None or bool(mask.all()):
            parts[name] = (x, target)
        elif bool(mask.any()):  # else no sample has it: as if absent
            parts[name] = (x[mask.to(x.device)], target[mask.to(target.device)])
    return parts


class _Probe:
    """A deep copy of one encoder with a fresh linear head, its own optimizer, its score history, and what the
    current pass saw."""

    def __init__(self, name: str, encoder: nn.Module, example: tuple[Tensor, Tensor], spec: TaskSpec,
                 features: Features | None, device: torch.device, factory: OptimizerFactory) -> None:  # fmt: skip
        self.name, self.spec, self.features, self.device = name, spec, features, device
        self.history: list[float] = []
        self.encoder = copy.deepcopy(encoder)
        self.encoder.zero_grad(set_to_none=True)  # the copy's, not the gradients you left behind
        self.encoder.to(device).eval()
        with torch.no_grad():
            out = self._features(example[0].to(self.device), example[1].shape[0])
        self.flattened = tuple(out.shape) if out.dim() > 2 else None  # a feature map or a sequence, read flattened
        self.head = nn.Linear(math.prod(out.shape[1:]), spec.num_outputs, device=self.device, dtype=out.dtype)
        self.optimizer = factory([p for p in (*self.encoder.parameters(), *self.head.parameters()) if p.requires_grad])
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                f"optimizer factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer; "
                "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=1e-2)"
            )
        self.loss_sum = torch.zeros((), device=self.device)

    def start(self, training: bool) -> None:
        """Begin a pass over the data: ``train()`` or ``eval()`` mode, nothing seen yet."""
        self.training, self.samples = training, 0
        self.kept: list[tuple[Tensor, Tensor]] = []  # outputs and targets of an evaluation pass
        self.encoder.train(training)
        self.head.train(training)

    def feed(self, x: Tensor, target: Tensor) -> None:
        """One training step on ``x`` (the inputs of ``target``'s samples), or, evaluating, keep its output."""
        self.samples += target.shape[0]
        features = self._features(x.to(self.device, non_blocking=True), target.shape[0])
        output = self.spec.shape_output(self.head(features.reshape(target.shape[0], -1)))
        if not self.training:
            self.kept.append((output, target))
            return
        loss = self.spec.loss(output, self.target(target))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shown = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"loss must return a scalar tensor (reduce it, e.g. .mean()), got {shown}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def score(self) -> float:
        """The metric over the outputs kept by an evaluation pass."""
        outputs, targets = zip(*self.kept, strict=True)
        value = self.spec.metric(torch.cat(outputs), self.target(torch.cat(targets)))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric must return a number, got {type(value).__name__} for {self.name!r}") from None

    def _features(self, x: Tensor, batch: int) -> Tensor:
        """What the head reads of the encoder's output, checked: one tensor with a row per sample."""
        out = self.encoder(x)
        if self.features is not None:
            out = self.features(out)
        if not isinstance(out, Tensor):
            raise TypeError(_not_a_tensor(self.name, out, self.features is not None))
        if out.dim() == 0 or out.shape[0] != batch:
            raise TypeError(_not_the_batch(self.name, tuple(out.shape), batch))
        return out

    def target(self, target: Tensor) -> Tensor:
        """The target on the probe's device, as a float of the head's dtype where the loss needs one."""
        dtype = None if self.spec.task == "classification" else self.head.weight.dtype
        return target.to(self.device, dtype, non_blocking=True)

    def check_finite(self, at: str) -> None:
        if not torch.isfinite(self.loss_sum):
            raise ValueError(
                f"training the {self.name!r} probe diverged (loss {self.loss_sum.item()}) in {at}; lower the "
                "learning rate, e.g. optimizer=lambda p: torch.optim.SGD(p, lr=1e-4)"
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
        dims = 1 if len(shape) <= 2 else (1, *range(3, len(shape) + 1))
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
    for name, shape in [(name, probe.flattened) for name, probe in probes.items() if probe.flattened]:
        pool = {
            4: "lambda out: out.mean(dim=(2, 3))  (a (batch, channels, H, W) map)",
            3: "lambda out: out.mean(dim=1)  (a (batch, time, features) sequence; out[:, 0] for a first token)",
        }.get(len(shape), f"lambda out: out.mean(dim={tuple(range(2, len(shape)))})")
        warnings.warn(
            f"the {name!r} probe reads the encoder's output of shape (batch, {', '.join(map(str, shape[1:]))}) "
            f"flattened into {math.prod(shape[1:]):,} features. If your model pools it before fusion, pool it the "
            f"same way: features={{{name!r}: {pool}}}; to keep the flat map, pass features={{{name!r}: lambda out: "
            "out.flatten(1)}, which also silences this warning",
            UserWarning,
            stacklevel=5,  # the caller of analyze_modalities / unimodal_histories, past _train_probes and decorator
        )
