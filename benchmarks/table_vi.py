"""The paper's Table VI analogue: does modality analysis on a subset of the data find the full-data ranking?

For each generated task, ``analyze_modalities``'s machinery (:func:`pdmp_optim.analysis.unimodal_histories`)
trains the unimodal probes on 10%, 20%, 40% and 100% of the training batches, for several seeds. We report:

* how often a single seed's subset ranking matches the full-data ranking (``m_p``, ``m_o``, both), where the
  full-data ranking is the mean over all seeds at 100%;
* the ranking over all seeds at that subset, with its ``agreement``;
* the analysis cost: wall-clock seconds per seed, as a fraction of one joint (late-fusion) training run of
  the same encoders for the same number of epochs on all the data (the fastest of three joint runs). The
  machine may be shared: read the cost column as a rough ratio, not a timing.

Everything runs on CPU in one thread (``torch.set_num_threads(1)``) so timings are comparable side by side.

    python benchmarks/table_vi.py            # full run: writes benchmarks/results/table_vi.{json,md}
    python benchmarks/table_vi.py --quick    # smoke run (seconds)

The tasks are generated here (seeded, with knobs) and nothing is downloaded:

* ``fast_vs_slow`` (CREMA-D-like): "audio" shows a strong one-hot cue for ``coverage`` of the samples and a
  random class for the rest, so it is learned within an epoch and capped near ``coverage + (1 - coverage) / C``;
  "visual" carries a weak class-mean cue over many noisy dimensions at a small input scale, so SGD needs
  several epochs, and it ends higher. Constructed roles: ``m_p`` = visual, ``m_o`` = audio.
* ``close_call``: the same, with the visual cue weakened until both modalities end within a few points:
  a hard case on purpose, where small subsets and single seeds can be expected to flip.
* ``three_views`` (CeFA-like): "rgb" fast but capped, "depth" slow and best, "ir" slow and in between.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdmp_optim import rank_modalities
from pdmp_optim.analysis import unimodal_histories

Split = tuple[dict[str, Tensor], Tensor]
SUBSETS = (0.1, 0.2, 0.4, 1.0)
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Task:
    """Generated train/val splits of ``({modality: features}, labels)`` and the roles built into them."""

    name: str
    train: Split
    val: Split
    num_classes: int
    expected: dict[str, str]
    description: str

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(x.shape[1]) for m, x in self.train[0].items()}


def _easy(y: Tensor, c: int, dim: int, coverage: float, g: torch.Generator) -> Tensor:
    """A strong one-hot cue (strength 3) that shows the true class for ``coverage`` of rows, else a random one."""
    n = y.shape[0]
    shown = torch.where(torch.rand(n, generator=g) < coverage, y, torch.randint(c, (n,), generator=g))
    out = torch.randn(n, dim, generator=g)
    out[:, :c] += 3.0 * F.one_hot(shown, c)
    return out


def _weak(y: Tensor, means: Tensor, strength: float, scale: float, g: torch.Generator) -> Tensor:
    """A weak class-mean cue in noise, all multiplied by ``scale`` (< 1 makes SGD slow on it)."""
    return scale * (strength * means[y] + torch.randn(y.shape[0], means.shape[1], generator=g))


def _means(c: int, dim: int, seed: int) -> Tensor:
    m = torch.randn(c, dim, generator=torch.Generator().manual_seed(seed))
    return m / m.norm(dim=1, keepdim=True) * dim**0.5


def make_task(
    name: str,
    *,
    n_train: int = 2048,
    n_val: int = 1024,
    seed: int = 0,
    coverage: float = 0.55,
    strength: float = 0.5,
    scale: float = 0.1,
) -> Task:
    """Build a generated task: ``fast_vs_slow``, ``close_call`` or ``three_views``.

    Knobs: ``coverage`` (fraction of samples whose fast cue is right: the fast modality's ceiling),
    ``strength`` (the slow cue's strength: higher ends higher), ``scale`` (input scale of the slow
    modalities: lower learns slower). ``close_call`` uses ``0.4 * strength``; ``three_views`` uses
    ``scale / 2`` (four classes are easier).

    >>> make_task("three_views", n_train=8, n_val=4).dims
    {'rgb': 16, 'depth': 64, 'ir': 32}
    """
    if name in ("fast_vs_slow", "close_call"):
        c = 6
        visual_strength = strength if name == "fast_vs_slow" else 0.4 * strength
        means = _means(c, 64, seed + 101)

        def build(y: Tensor, g: torch.Generator) -> dict[str, Tensor]:
            return {"audio": _easy(y, c, 16, coverage, g), "visual": _weak(y, means, visual_strength, scale, g)}

        expected = {"m_p": "visual", "m_o": "audio"}
        description = "audio: strong cue on a fraction of samples (fast, capped); visual: weak spread cue (slow)"
    elif name == "three_views":
        c = 4
        depth_means, ir_means = _means(c, 64, seed + 102), _means(c, 32, seed + 103)

        def build(y: Tensor, g: torch.Generator) -> dict[str, Tensor]:
            return {
                "rgb": _easy(y, c, 16, coverage - 0.05, g),
                "depth": _weak(y, depth_means, strength, scale / 2, g),
                "ir": _weak(y, ir_means, strength, scale / 2, g),
            }

        expected = {"m_p": "depth", "m_o": "rgb"}
        description = "rgb: fast, capped; depth: weak cue over 64 dims (slow, best); ir: same cue over 32 dims"
    else:
        raise ValueError(f"unknown task {name!r}; pick fast_vs_slow, close_call or three_views")
    splits = []
    for offset, n in enumerate((n_train, n_val)):
        g = torch.Generator().manual_seed(seed * 1000 + 7 + offset)
        y = torch.randint(c, (n,), generator=g)
        splits.append((build(y, g), y))
    return Task(name, splits[0], splits[1], c, expected, description)


def batches(split: Split, size: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    x, y = split
    return [({m: v[i : i + size] for m, v in x.items()}, y[i : i + size]) for i in range(0, len(y), size)]


def encoders_for(task: Task, hidden: int, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for m, d in task.dims.items()}


# --------------------------------------------------------------------------------------------- measurements
def joint_training_seconds(task: Task, train: list, *, hidden: int, epochs: int, lr: float) -> float:
    """Wall-clock of one joint run: all encoders, a linear head on the concatenated features, all the data."""
    encoders = nn.ModuleDict(encoders_for(task, hidden))
    head = nn.Linear(hidden * len(encoders), task.num_classes)
    opt = torch.optim.SGD([*encoders.parameters(), *head.parameters()], lr=lr, momentum=0.9)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in train:
            features = torch.cat([encoders[m](x[m]) for m in encoders], dim=1)
            loss = F.cross_entropy(head(features), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():  # evaluate once per epoch, like the analysis does
            val_x, val_y = task.val
            head(torch.cat([encoders[m](val_x[m]) for m in encoders], dim=1)).argmax(1).eq(val_y).float().mean()
    return time.perf_counter() - start


def roles(ranking: Any) -> tuple[str, str | None]:
    return ranking.performance_dominant, ranking.optimization_dominant


def run_task(task: Task, *, seeds: int, epochs: int, hidden: int, lr: float, batch_size: int) -> dict[str, Any]:
    train, val = batches(task.train, batch_size), batches(task.val, 256)

    def sgd(params: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    joint_training_seconds(task, train[:2], hidden=hidden, epochs=1, lr=lr)  # warm-up: lazy imports, allocator
    joint = min(joint_training_seconds(task, train, hidden=hidden, epochs=epochs, lr=lr) for _ in range(3))
    per_subset: dict[str, dict[str, Any]] = {}
    histories_at: dict[float, dict[str, list[list[float]]]] = {}
    seconds_at: dict[float, float] = {}
    for subset in SUBSETS:
        start = time.perf_counter()
        histories_at[subset] = unimodal_histories(
            encoders_for(task, hidden),
            train,
            val,
            num_classes=task.num_classes,
            epochs=epochs,
            seeds=seeds,
            subset=subset,
            optimizer=sgd,
            progress=False,
        )
        seconds_at[subset] = (time.perf_counter() - start) / seeds
    full = rank_modalities(histories_at[1.0], warn=False)
    reference = roles(full)
    for subset in SUBSETS:
        h = histories_at[subset]
        single = [rank_modalities({m: [runs[r]] for m, runs in h.items()}, warn=False) for r in range(seeds)]
        pooled = rank_modalities(h, warn=False)
        per_subset[f"{subset:g}"] = {
            "m_p_match": sum(s.performance_dominant == reference[0] for s in single) / seeds,
            "m_o_match": sum(s.optimization_dominant == reference[1] for s in single) / seeds,
            "both_match": sum(roles(s) == reference for s in single) / seeds,
            "pooled_m_p": pooled.performance_dominant,
            "pooled_m_o": pooled.optimization_dominant,
            "pooled_agreement": pooled.agreement,
            "pooled_notes": list(pooled.notes),
            "final_scores": pooled.final_scores,
            "final_std": pooled.final_std,
            "early_scores": pooled.early_scores,
            "seconds_per_seed": seconds_at[subset],
            "cost_fraction_per_seed": seconds_at[subset] / joint,
        }
    return {
        "description": task.description,
        "constructed": task.expected,
        "full_data_ranking": {"m_p": reference[0], "m_o": reference[1], "agreement": full.agreement},
        "joint_training_seconds": joint,
        "subsets": per_subset,
    }


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Table VI analogue: modality analysis on a subset of the training data",
        "",
        f"Generated tasks, {cfg['seeds']} seeds, {cfg['epochs']} epochs, {cfg['n_train']} training samples in "
        f"batches of {cfg['batch_size']}, probes: Linear({cfg['hidden']}) + ReLU encoders with a linear classifier, "
        f"SGD lr {cfg['lr']} momentum 0.9; CPU, one thread, torch {cfg['torch']}. "
        "Match: fraction of single seeds whose subset ranking equals the full-data ranking (mean over all seeds "
        "at 100%). Pooled: the ranking over all seeds at that subset, with its agreement. Cost: analysis "
        "seconds per seed (all modalities) / one joint training run of the same epochs on all the data.",
        "",
    ]
    for name, task in result["tasks"].items():
        ref = task["full_data_ranking"]
        lines += [
            f"## {name}",
            "",
            f"{task['description']}. Constructed: m_p = {task['constructed']['m_p']}, "
            f"m_o = {task['constructed']['m_o']}; full-data ranking: m_p = {ref['m_p']}, m_o = {ref['m_o']} "
            f"(agreement {ref['agreement']:.2f}); one joint run: {task['joint_training_seconds']:.2f} s.",
            "",
            "| subset | m_p match | m_o match | both | pooled m_p / m_o | pooled agreement | final scores "
            "(mean ± std) | s / seed | cost / joint run |",
            "|---:|---:|---:|---:|---|---:|---|---:|---:|",
        ]
        for subset, row in task["subsets"].items():
            scores = ", ".join(
                f"{m} {row['final_scores'][m]:.3f}±{row['final_std'][m]:.3f}" for m in row["final_scores"]
            )
            lines.append(
                f"| {float(subset):.0%} | {row['m_p_match']:.0%} | {row['m_o_match']:.0%} | {row['both_match']:.0%} "
                f"| {row['pooled_m_p']} / {row['pooled_m_o']} | {row['pooled_agreement']:.2f} | {scores} "
                f"| {row['seconds_per_seed']:.2f} | {row['cost_fraction_per_seed']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one small task, 2 seeds, 2 epochs")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for table_vi.json and table_vi.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = {"seeds": args.seeds, "epochs": args.epochs, "n_train": 2048, "n_val": 1024, "batch_size": 32}
    cfg.update({"hidden": 32, "lr": 0.02, "torch": torch.__version__, "quick": args.quick})
    names = ["fast_vs_slow", "close_call", "three_views"]
    if args.quick:
        cfg.update({"seeds": 2, "epochs": 2, "n_train": 320, "n_val": 128})
        names = ["fast_vs_slow"]
    result: dict[str, Any] = {"config": cfg, "tasks": {}}
    for name in names:
        task = make_task(name, n_train=cfg["n_train"], n_val=cfg["n_val"], seed=0)
        start = time.perf_counter()
        result["tasks"][name] = run_task(
            task, seeds=cfg["seeds"], epochs=cfg["epochs"], hidden=cfg["hidden"], lr=cfg["lr"], batch_size=32
        )
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table_vi.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "table_vi.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
