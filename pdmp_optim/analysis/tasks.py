"""What a task decides for :func:`~pdmp_optim.analyze_modalities`: the head's output size, how targets are checked,
the default loss and the default metric (and which way it points)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int

__all__ = ["accuracy", "mean_absolute_error", "mean_average_precision"]

Task = Literal["classification", "regression", "multilabel"]
Metric = Callable[[Tensor, Tensor], Any]
Loss = Callable[[Tensor, Tensor], Tensor]


def accuracy(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against class indices ``target`` (N,): the classification default.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5

    Higher is better (its ``higher_is_better`` attribute says so to :func:`~pdmp_optim.analyze_modalities`).
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
    separates the unimodal models early in training, when every score is still below 0.5. Average precision is
    the mean of the precision at the rank of every positive sample (no interpolation, as scikit-learn's
    ``average_precision_score`` for untied scores); labels without a positive sample are left out. Higher is
    better.

    Raises:
        ValueError: no label has a positive sample.
    """
    positive = (target > 0.5).to(logits.dtype)
    hits = positive.gather(0, logits.argsort(dim=0, descending=True, stable=True))
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
DEFAULTS: dict[str, tuple[Loss, Metric]] = {  # task -> default loss and metric
    "classification": (F.cross_entropy, accuracy),
    "regression": (F.mse_loss, mean_absolute_error),
    "multilabel": (F.binary_cross_entropy_with_logits, mean_average_precision),
}


def direction(higher_is_better: Any, task: Any, metric: Any) -> bool:
    """Whether a higher metric is better: as given, else the metric's own attribute, else by task."""
    if higher_is_better is not None:
        return bool(higher_is_better)
    found = getattr(metric if metric is not None else DEFAULTS.get(task, (None, None))[1], "higher_is_better", None)
    if isinstance(found, bool):
        return found
    if task not in ("regression", "multilabel"):  # classification, or a bad task that TaskSpec reports
        return True
    raise ValueError(
        f"say which way your metric {getattr(metric, '__name__', type(metric).__name__)!r} points: pass "
        "higher_is_better=False for an error or a loss (MAE, MSE), higher_is_better=True for a score (F1, R2), "
        "or give the metric a higher_is_better attribute"
    )


class TaskSpec:
    """What a task decides: the head's output size, how targets are checked and shaped, the loss and the metric."""

    def __init__(self, task: Any, num_classes: Any, loss: Loss | None, metric: Metric | None) -> None:
        if task not in DEFAULTS:
            raise ValueError(f"task must be one of {list(DEFAULTS)}, got {task!r}")
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
        self.loss: Loss = loss if loss is not None else DEFAULTS[task][0]
        self.metric: Metric = metric if metric is not None else DEFAULTS[task][1]
        self.target_shape: tuple[int, ...] | None = None  # regression: the target's shape after N, from batch one

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.num_classes is not None else math.prod(self.target_shape or ())

    def shape_output(self, out: Tensor) -> Tensor:
        """The head's output shaped like the target (regression) or as it is (logits)."""
        return out.reshape(out.shape[0], *self.target_shape) if self.target_shape is not None else out

    def check_target(self, target: Any, at: str) -> Tensor:
        """``target`` as a tensor that fits the task, or a ``ValueError`` naming ``at`` (the batch) and the fix."""
        target = torch.as_tensor(target)
        at = f"target of {at}"
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
