"""Accuracy benchmark: does prioritising the performance-dominant modality help?

Run ``python benchmarks/accuracy.py --quick`` (about a minute on 2 CPU cores: the modality ranking, the gammas,
and the best unimodal model vs vanilla vs the best-learning-rate control vs PDMP on the CREMA-D-like task and on
the shortcut task built to show the paper's premise) or ``python
benchmarks/accuracy.py`` (every task and table; writes ``benchmarks/results/accuracy.{json,md}`` and PNG plots).

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
from benchmarks.data import TASKS, Task, make_task
from pdmp_optim import ModalityRanking, PDMPOptimizer
from pdmp_optim.analysis import analyze_modalities

__all__ = ["Config", "FusionModel", "main", "quick_config", "run_benchmark"]

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
    )
    methods: tuple[str, ...] = tuple(METHOD_LABELS)
    tables: tuple[str, ...] = ("I", "III", "V", "VII")
    ablation_tasks: tuple[str, ...] = ("crema_d_like", "crema_d_shortcut", "digits")  # Tables III, V, VII
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
        if task not in cfg.ablation_tasks:
            continue
        if "III" in cfg.tables:
            for fusion in cfg.fusions:
                add(task, "vanilla", fusion, 1.0, g)
                add(task, "pdmp", fusion, 1.0, g)
        if "V" in cfg.tables:
            for gamma in cfg.gamma_sweep:
                add(task, "pdmp", "concat", 1.0, gamma)
        if "VII" in cfg.tables:
            for mult in sorted({1.0, g, *cfg.lr_multipliers}):
                add(task, "vanilla", "concat", mult, g)
            add(task, "pdmp", "concat", 1.0, g)
    return jobs


def run_benchmark(cfg: Config) -> dict[str, Any]:
    """Run stage 1 and every planned training run; return the results (what ``accuracy.json`` holds).

    >>> small = {"n_train": 64, "n_val": 32, "n_test": 32}
    >>> cfg = Config(tasks=("ave_like",), methods=("vanilla", "pdmp"), tables=("I",), seeds=2, epochs=1,
    ...              analysis_epochs=1, analysis_seeds=1, task_knobs={"ave_like": small}, progress=False)
    >>> results = run_benchmark(cfg)
    >>> sorted(results["tasks"]["ave_like"]["tables"]["I"]), results["tasks"]["ave_like"]["tables"]["I"]["pdmp"]["n"]
    (['pdmp', 'vanilla'], 2)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other cores alone
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    tasks = {name: make_task(name, **cfg.task_knobs.get(name, {})) for name in cfg.tasks}
    jobs = _plan(cfg, {name: task.modalities for name, task in tasks.items()})
    progress = Progress(len(tasks) + len(jobs) * cfg.seeds, cfg.progress)
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "tasks": {},
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
    for name in cfg.tasks:
        out["tasks"][name]["tables"] = _tables(name, cfg, runs)
        out["tasks"][name]["premise"] = _premise(name, tasks[name].modalities, cfg, runs)
    out["wall_s"] = time.perf_counter() - start
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


def _premise(
    task: str, modalities: Sequence[str], cfg: Config, runs: Mapping[tuple, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """The paper's premise on this task: does vanilla joint training end below the best unimodal model (test)?

    Returns the unimodal test accuracies, the best modality (chosen on val), vanilla's and PDMP's test accuracy,
    the paired differences to the best unimodal model, and on how many seeds vanilla ends below it; ``None``
    when the unimodal or vanilla runs were not planned.
    """
    g = cfg.gamma_p
    best, summaries = _best_unimodal(task, runs)
    base = (task, "vanilla", "concat", 1.0, g)
    if best is None or base not in runs:
        return None
    uni = (task, f"unimodal:{best}", "concat", 1.0, g)
    vanilla_minus = _paired_delta(runs, base, uni)
    below = sum(v["acc"] < u["acc"] for v, u in zip(runs[base], runs[uni], strict=True))
    out: dict[str, Any] = {
        "unimodal_acc": {m: summaries[m]["acc"] for m in modalities if m in summaries},
        "best_unimodal": best,
        "best_unimodal_acc": summaries[best]["acc"],
        "vanilla_acc": _summary(runs[base])["acc"],
        "vanilla_minus_best_unimodal": vanilla_minus,
        "seeds_vanilla_below": below,
        "holds": vanilla_minus is not None and vanilla_minus["mean"] < 0,
    }
    pdmp = (task, "pdmp", "concat", 1.0, g)
    if pdmp in runs:
        out["pdmp_acc"] = _summary(runs[pdmp])["acc"]
        out["pdmp_minus_best_unimodal"] = _paired_delta(runs, pdmp, uni)
    return out


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
        if "VII" in cfg.tables:
            mults = sorted({1.0, g, *cfg.lr_multipliers})
            tables["VII"] = {
                "vanilla": {f"{m:g}": summ("vanilla", mult=m) for m in mults},
                "pdmp": summ("pdmp"),
            }
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
        lines += ["| Method | " + " | ".join(f"{n} acc | {n} F1" for n in names) + " |"]
        lines += ["|---|" + "---|---|" * len(names)]
        for method in cfg["methods"]:
            row = [METHOD_LABELS[method]]
            for n in names:
                s = tables[n]["I"].get(method)
                row += [_pm(s), _pm(s, "f1")]
                if s is not None and "lr_mult" in s:
                    row[-2] += f" (lr x{s['lr_mult']:g})"
                if s is not None and "modality" in s:
                    row[-2] += f" ({s['modality']})"
            lines.append("| " + " | ".join(row) + " |")
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


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float] | None:
    if not curves or any(v is None for c in curves for v in c):
        return None
    return [statistics.fmean(vals) for vals in zip(*curves, strict=True)]  # type: ignore[arg-type]


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: the ratio ``w`` over training (paper Fig. 4), and Tables V and VII when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(results["tasks"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    g = results["config"]["gamma_p"]
    for ax, name in zip(axes.flat, names, strict=False):
        data = results["tasks"][name]
        dom = ModalityRanking.from_dict(data["ranking"]).performance_dominant
        for key, label in (
            (f"vanilla|concat|lr_x1|gamma{g:g}", "vanilla"),
            (f"pdmp|concat|lr_x1|gamma{g:g}", "PDMP"),
            (f"ogm_ge|concat|lr_x1|gamma{g:g}", "OGM-GE"),
            (f"vanilla|concat|lr_x{g:g}|gamma{g:g}", "vanilla lr x gamma_p"),
            (f"adamw|concat|lr_x1|gamma{g:g}", "AdamW"),
            (f"pdmp_adamw|concat|lr_x1|gamma{g:g}", "PDMP AdamW"),
        ):
            run = data["runs"].get(key)
            curve = None if run is None else _mean_curve([s["w"] for s in run["seeds"]])
            if curve is not None:
                ax.plot(range(1, len(curve) + 1), curve, label=label)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{name}: w = sum|s_{dom}| / sum|s_rest|", fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("w (val set, mean over seeds)")
    fig.tight_layout()
    path = out_dir / "w_ratio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    for name, data in results["tasks"].items():
        t = data["tables"]
        if "V" in t:
            fig, ax = plt.subplots(figsize=(4.5, 3.4))
            xs = [float(k) for k in t["V"]]
            ys = [100 * s["acc"] for s in t["V"].values()]
            es = [100 * s["acc_std"] for s in t["V"].values()]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
            ax.set_xlabel("gamma_p")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Table V: gamma_p sweep ({name})", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"gamma_sweep_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        if "VII" in t:
            fig, ax = plt.subplots(figsize=(4.5, 3.4))
            xs = [float(k) for k in t["VII"]["vanilla"]]
            ys = [100 * s["acc"] for s in t["VII"]["vanilla"].values()]
            es = [100 * s["acc_std"] for s in t["VII"]["vanilla"].values()]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="vanilla, lr x multiplier")
            p = t["VII"]["pdmp"]
            ax.axhline(100 * p["acc"], color="C1", label=f"PDMP (lr x1, gamma_p {g:g})")
            ax.axhspan(100 * (p["acc"] - p["acc_std"]), 100 * (p["acc"] + p["acc_std"]), color="C1", alpha=0.15)
            top = max([*ys, 100 * p["acc"]])
            shown = [y for y in [*ys, 100 * p["acc"]] if y > top - 15]  # diverged runs would squash the axis
            ax.set_ylim(min(shown) - 2, top + 1.5)
            for x, y in zip(xs, ys, strict=True):
                if y <= top - 15:
                    ax.annotate(
                        f"{y:.1f}% (off scale)",
                        (x, min(shown) - 2),
                        xytext=(0, 8),
                        textcoords="offset points",
                        ha="center",
                        fontsize=7,
                        arrowprops={"arrowstyle": "->"},
                    )
            ax.set_xscale("log")
            ax.set_xlabel("learning-rate multiplier (whole model)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Table VII: learning-rate control ({name})", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"lr_control_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def print_summary(results: Mapping[str, Any]) -> None:
    """Print the rankings, gammas and Table I to stdout."""
    for name, data in results["tasks"].items():
        print("\n".join(ranking_lines(name, data)))
        t = data["tables"].get("I", {})
        for method, s in t.items():
            extra = f"  lr x{s['lr_mult']:g} (chosen on val)" if s and "lr_mult" in s else ""
            if s and "modality" in s:
                extra = f"  modality {s['modality']} (chosen on val)"
            d = s.get("delta_vs_vanilla") if s else None
            if d is not None and method != "vanilla":
                extra = f"  {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} vs vanilla (paired by seed)" + extra
            print(f"  {METHOD_LABELS[method]:<38} acc {_pm(s)}  macro-F1 {_pm(s, 'f1')}{extra}")
        p = data.get("premise")
        if p:
            d = p["vanilla_minus_best_unimodal"]
            verdict = "HOLDS" if p["holds"] else "does not hold"
            print(
                f"  premise (vanilla below the best unimodal model) {verdict}: vanilla - best unimodal "
                f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points, "
                f"below on {p['seeds_vanilla_below']}/{d['n']} seeds"
            )
            dp = p.get("pdmp_minus_best_unimodal")
            if dp is not None:
                print(f"  PDMP - best unimodal {100 * dp['mean']:+.2f} ± {100 * dp['std']:.2f} points (paired by seed)")
    print(f"wall time: {results['wall_s']:.1f} s")


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
    args = parser.parse_args(argv)
    if cfg is None:
        cfg = quick_config() if args.quick else Config()
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
    results = run_benchmark(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "accuracy.json").write_text(json.dumps(_rounded(results), default=_json_default))
    (out_dir / "accuracy.md").write_text(to_markdown(results) + "\n")
    if cfg.plots:
        write_plots(results, out_dir)
    print_summary(results)
    print(f"results: {out_dir / 'accuracy.md'}, {out_dir / 'accuracy.json'}")
    return results


def _rounded(obj: Any) -> Any:
    """Floats rounded to 6 decimals (accuracies are multiples of 1/n anyway); keeps the JSON small."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, Mapping):
        return {k: _rounded(v) for k, v in obj.items()}
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
