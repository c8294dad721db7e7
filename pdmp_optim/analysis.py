"""Stage 1 of PDMP in one call: train a linear probe on each modality's encoder and rank the modalities.

Hand :func:`analyze_modalities` your encoders and your data; it trains a deep copy of every encoder with a
fresh linear classifier, evaluates after every epoch, and ranks the modalities with
:func:`~pdmp_optim.rank_modalities`. Its result plugs straight into ``PDMPOptimizer(..., ranking=...)``.

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
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, Optimizer

from ._checks import check_int, check_name
from .ranking import ModalityRanking, rank_modalities

__all__ = ["accuracy", "analyze_modalities", "unimodal_histories"]

OptimizerFactory = Callable[[list[Tensor]], Optimizer]
Metric = Callable[[Tensor, Tensor], Any]
BatchFn = Callable[[Any], Any]


def accuracy(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against class indices ``target`` (N,): the default metric.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5
    """
    return (logits.argmax(dim=1) == target).float().mean().item()


def analyze_modalities(
    encoders: Mapping[str, nn.Module],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    *,
    higher_is_better: bool = True,
    early_epoch: int = 0,
    warn: bool = True,
    **probe_options: Any,
) -> ModalityRanking:
    """Rank modalities by unimodal linear probes (the paper's Algorithm 1), ready for ``PDMPOptimizer(ranking=)``.

    >>> import torch
    >>> data = [({"a": torch.randn(8, 3), "b": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> encoders = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Flatten()}
    >>> ranking = analyze_modalities(encoders, data[:3], data[3:], num_classes=3, epochs=2, warn=False)
    >>> sorted(ranking.order), ranking.num_runs
    (['a', 'b'], 1)

    The probes train as :func:`unimodal_histories` says (your encoders are never modified), and their
    histories go to :func:`~pdmp_optim.rank_modalities`, so the result says how sure it is: ``agreement`` is
    the fraction of runs that pick the same ``performance_dominant`` modality, and ``notes`` (with one
    ``UserWarning``) flag near ties and disagreeing runs. Use ``seeds >= 3`` to get that readout.

    Args:
        encoders: as for :func:`unimodal_histories`.
        train_batches: as for :func:`unimodal_histories`.
        eval_batches: as for :func:`unimodal_histories`.
        higher_is_better: ``False`` when ``metric`` is a loss (passed to :func:`~pdmp_optim.rank_modalities`).
        early_epoch: which epoch's score counts as early (passed to :func:`~pdmp_optim.rank_modalities`).
        warn: emit one ``UserWarning`` when the ranking has notes (ties, near ties, disagreeing runs).
        **probe_options: how the probes train, the keywords of :func:`unimodal_histories`: ``num_classes``
            (required), ``epochs=10``, ``seeds=1``, ``subset=1.0``, ``optimizer`` (default: the paper's SGD),
            ``metric`` (default: :func:`accuracy`), ``batch_fn``, ``progress``, ``device`` and ``seed=0``.

    Raises:
        ValueError, TypeError: as :func:`unimodal_histories` and :func:`~pdmp_optim.rank_modalities` do;
            an unknown keyword is a ``TypeError``.
    """
    histories = unimodal_histories(encoders, train_batches, eval_batches, **probe_options)
    ranking = rank_modalities(histories, higher_is_better=higher_is_better, early_epoch=early_epoch, warn=False)
    if ranking.notes and warn:
        warnings.warn(ranking.warning_text(), UserWarning, stacklevel=2)
    return ranking


def unimodal_histories(
    encoders: Mapping[str, nn.Module],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    *,
    num_classes: int,
    epochs: int = 10,
    seeds: int = 1,
    subset: float = 1.0,
    optimizer: OptimizerFactory | None = None,
    metric: Metric | None = None,
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
    with a fresh ``nn.Linear`` classifier on its flattened output and trained with cross-entropy; all
    modalities train in one pass over the data (a batch is loaded once per epoch) and are scored with
    ``metric`` after every epoch. Your encoders are never modified; parameters you froze
    (``requires_grad=False``) stay frozen in the copies, so a frozen backbone gives a linear probe. Copies
    train in ``train()`` mode and are evaluated in ``eval()`` mode.

    Args:
        encoders: modality -> your ``nn.Module`` encoder (at least two modalities). Each must return one
            tensor whose first dimension is the batch.
        train_batches: re-iterable data (a ``DataLoader``, a list) of ``(inputs, target)`` batches where
            ``inputs`` maps each modality to a tensor and ``target`` holds class indices.
        eval_batches: the same, for the validation data the probes are scored on after every epoch.
        num_classes: number of classes; targets must lie in ``[0, num_classes)``.
        epochs: training epochs per run. With ``epochs=1`` there is no early score.
        seeds: number of independent runs (classifier init, data order and the subset drawn differ).
        subset: fraction in (0, 1] of the training batches each run trains on, drawn per run.
        optimizer: factory ``params -> Optimizer``; default: the paper's SGD (lr 1e-3, momentum 0.9,
            weight decay 1e-4). Called once per modality and run.
        metric: ``metric(logits, target) -> float`` over the whole eval set (default: :func:`accuracy`).
        batch_fn: turns one of your batches into ``(inputs, target)``, for other layouts.
        progress: a one-line progress display on stderr for runs longer than a second; ``None`` shows it
            only when stderr is a terminal, ``False`` never, ``True`` always.
        device: where to train the copies (default: where each encoder's parameters are).
        seed: base seed; run ``r`` uses ``seed + r``. Your global RNG state is left as it was.

    Raises:
        ValueError: a batch missing a modality or carrying one with no encoder, targets outside
            ``num_classes``, one-shot iterators, ``subset`` outside (0, 1], ``seeds`` or ``epochs`` < 1,
            empty data, or a diverging run.
        TypeError: a non-module encoder, a batch that is not ``(inputs, target)``, a non-tensor output.
    """
    names = _check_encoders(encoders)
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    epochs, seeds = check_int(epochs, "epochs", minimum=1), check_int(seeds, "seeds", minimum=1)
    seed = check_int(seed, "seed")
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or not 0.0 < float(subset) <= 1.0:
        raise ValueError(f"subset must be a fraction in (0, 1] of the training batches, got {subset!r}")
    for value, what in ((optimizer, "optimizer"), (metric, "metric"), (batch_fn, "batch_fn")):
        if value is not None and not callable(value):
            raise TypeError(f"{what} must be callable or None, got {type(value).__name__}")
    target_device = None if device is None else torch.device(device)
    make_optimizer = optimizer if optimizer is not None else _paper_sgd
    score = metric if metric is not None else accuracy
    split = _Splitter(names, num_classes, batch_fn)
    cuda_devices = _cuda_devices(encoders, target_device)
    runs: list[dict[str, list[float]]] = []
    # Everything that may draw random numbers (even iter() on a DataLoader does) runs on a forked, seeded RNG:
    # the CPU generator and those of the CUDA devices the probes use, and no other device's.
    with torch.random.fork_rng(devices=cuda_devices):
        _seed(seed, cuda_devices)
        n_train, n_used, example = _first_look(train_batches, eval_batches, float(subset), split)
        bar = _Progress(progress, total=seeds * epochs * n_used)
        try:
            for run in range(seeds):
                _seed(seed + run, cuda_devices)
                chosen = _choose(n_train, n_used, seed + run)
                probes = {
                    n: _Probe(n, encoders[n], example[n], num_classes, target_device, make_optimizer) for n in names
                }
                label = f"run {run + 1}/{seeds}"
                runs.append(_train_run(probes, train_batches, eval_batches, chosen, split, score, epochs, bar, label))
        finally:
            bar.close()
    return {name: [run[name] for run in runs] for name in names}


# ------------------------------------------------------------------------------------------------ internals
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
) -> tuple[int, int, Mapping[str, Tensor]]:
    """Check the data sources; return the number of training batches, how many a run uses, and a first input."""
    _check_reiterable(train_batches, "train_batches")
    _check_reiterable(eval_batches, "eval_batches")
    n_train = _count(train_batches)
    if n_train == 0:
        raise ValueError("train_batches is empty; pass at least one (inputs, target) batch")
    if _count(eval_batches, at_least_one=True) == 0:
        raise ValueError("eval_batches is empty; pass at least one (inputs, target) batch to score the probes")
    n_used = min(n_train, max(1, round(subset * n_train)))
    return n_train, n_used, split(next(iter(train_batches)), "train_batches", 0)[0]


def _train_run(
    probes: Mapping[str, _Probe],
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    chosen: list[int] | None,
    split: _Splitter,
    metric: Metric,
    epochs: int,
    bar: _Progress,
    run: str,
) -> dict[str, list[float]]:
    """Train one run's probes on the ``chosen`` training batches; each modality's score after every epoch."""
    history: dict[str, list[float]] = {name: [] for name in probes}
    for epoch in range(epochs):
        bar.describe(f"{run} epoch {epoch + 1}/{epochs}")
        _train_epoch(probes, train_batches, chosen, split, bar)
        for probe in probes.values():
            probe.check_finite(run, epoch)
        for name, score in _evaluate(probes, eval_batches, split, metric).items():
            history[name].append(score)
    return history


class _Probe:
    """A deep copy of one encoder with a fresh linear classifier, and its own optimizer."""

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        example: Tensor,
        num_classes: int,
        device: torch.device | None,
        make_optimizer: OptimizerFactory,
    ) -> None:
        self.name = name
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
            features = self._features(example.to(device))
        self.head = nn.Linear(features.shape[1], num_classes, device=device, dtype=features.dtype)
        params: list[Tensor] = [p for p in (*self.encoder.parameters(), *self.head.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(params)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                f"optimizer factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer; "
                "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=1e-2)"
            )
        self.loss_sum = torch.zeros((), device=device)

    def _features(self, x: Tensor) -> Tensor:
        out = self.encoder(x)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"encoder {self.name!r} returned {type(out).__name__}; it must return one tensor "
                "(batch, ...): wrap it in a module that picks the features"
            )
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise TypeError(
                f"encoder {self.name!r} returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                "its output's first dimension must be the batch"
            )
        return out.reshape(out.shape[0], -1)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self._features(x.to(self.device, non_blocking=True)))

    def train_step(self, x: Tensor, target: Tensor) -> None:
        loss = F.cross_entropy(self.logits(x), target.to(self.device, non_blocking=True))
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


def _train_epoch(
    probes: Mapping[str, _Probe],
    batches: Iterable[Any],
    chosen: list[int] | None,
    split: _Splitter,
    bar: _Progress,
) -> None:
    for probe in probes.values():
        probe.encoder.train()
        probe.head.train()
    for index, batch in _iterate(batches, chosen):
        inputs, target = split(batch, "train_batches", index)
        for name, probe in probes.items():
            probe.train_step(inputs[name], target)
        bar.advance()


@torch.no_grad()
def _evaluate(
    probes: Mapping[str, _Probe], batches: Iterable[Any], split: _Splitter, metric: Metric
) -> dict[str, float]:
    for probe in probes.values():
        probe.encoder.eval()
        probe.head.eval()
    logits: dict[str, list[Tensor]] = {name: [] for name in probes}
    targets: list[Tensor] = []
    for index, batch in enumerate(batches):
        inputs, target = split(batch, "eval_batches", index)
        targets.append(target)
        for name, probe in probes.items():
            logits[name].append(probe.logits(inputs[name]))
    if not targets:
        raise ValueError("eval_batches yielded no batch; pass at least one (inputs, target) batch")
    scores = {}
    for name, probe in probes.items():
        value = metric(torch.cat(logits[name]), torch.cat(targets).to(probe.device))
        try:
            scores[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric must return a number, got {type(value).__name__} for {name!r}") from None
    return scores


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
    """Turns a user batch into ``(inputs, target)`` and checks it."""

    def __init__(self, names: list[str], num_classes: int, batch_fn: BatchFn | None) -> None:
        self.names = names
        self.num_classes = num_classes
        self.batch_fn = batch_fn

    def __call__(self, batch: Any, where: str, index: int) -> tuple[Mapping[str, Tensor], Tensor]:
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        hint = "pass batch_fn= to adapt your layout, e.g. batch_fn=lambda b: ({'audio': b[0], 'visual': b[1]}, b[2])"
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], Mapping):
            raise TypeError(
                f"batch {index} of {where} is not (inputs, target) with inputs a dict modality -> tensor "
                f"(got {type(batch).__name__}); {hint}"
            )
        inputs, target = batch
        missing = [name for name in self.names if name not in inputs]
        if missing:
            raise ValueError(
                f"batch {index} of {where} has no input for modality {missing}; every batch must map each "
                f"modality in encoders ({self.names}) to a tensor, or drop that encoder"
            )
        extra = [name for name in inputs if name not in self.names]
        if extra:
            raise ValueError(
                f"batch {index} of {where} has inputs for {extra} but encoders has no encoder for them; add "
                f"encoders for them or leave them out of the batch (e.g. with batch_fn=)"
            )
        for name in self.names:
            if not isinstance(inputs[name], Tensor):
                raise TypeError(
                    f"input {name!r} of batch {index} of {where} is {type(inputs[name]).__name__}, not a tensor"
                )
        if not isinstance(target, Tensor):
            target = torch.as_tensor(target)
        if target.dim() != 1 or target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(
                f"target of batch {index} of {where} must be a 1-D tensor of class indices, got dtype "
                f"{target.dtype} and shape {tuple(target.shape)}; convert one-hot targets with .argmax(1)"
            )
        if target.numel() and bool(((target < 0) | (target >= self.num_classes)).any()):
            raise ValueError(
                f"target of batch {index} of {where} holds classes {sorted(set(target.tolist()))[:10]} outside "
                f"[0, {self.num_classes}); pass the right num_classes or remap the labels to 0..num_classes-1"
            )
        return inputs, target


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
