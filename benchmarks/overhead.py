"""Speed of PDMP's gradient modulation, measured side by side against the floor, the bare optimizer and peers.

Run from the repository root::

    python benchmarks/overhead.py            # full run (about 10-20 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # smoke run, a few seconds

Every comparison runs its variants in one process, alternating (the order rotates every round), and reports
the median and interquartile range of *paired* ratios (variant time / reference time within one round), which
cancels most of the drift of a noisy, shared machine. Results: a table on stdout, ``overhead.json``,
``overhead.md`` (every table) and ``overhead_*.png`` in ``--out`` (default ``benchmarks/results/``); ``--replot``
redraws the last two from the JSON.

Cases:

1. ``step``: one optimizer step on a two-encoder ResNet-18 parameter set (audio and visual trunks, concat head;
   the encoders of the PDMP paper), for SGD with momentum (default and foreach kernels) and AdamW. Variants:
   ``bare`` (the inner step, no modulation), ``floor`` (one hand-written ``torch._foreach_mul_`` per modality
   on pre-collected gradient lists, then the inner step), ``pdmp`` (``PDMPOptimizer.step()``; for AdamW its
   default ``"lr"`` mode and, as ``pdmp_grad``, ``mode="grad"``) and ``research`` (the loop over
   ``named_parameters`` with ``p.grad = p.grad * coeff`` that research code uses); for SGD also ``pdmp_lr``
   (``mode="lr"``: ``lr * gamma`` and ``weight_decay / gamma`` for the step, no pass over the gradients).
2. ``scaling_params``: ``pdmp`` / ``floor`` / ``bare`` from 1M to 100M parameters (ResNet-18 trunks of growing
   width, so the tensor count stays fixed and tensors grow).
3. ``scaling_modalities``: 2 to 8 modalities at a fixed total size; PDMP's bucket count is reported.
4. ``train_step``: a whole training step (forward, backward, step, zero_grad) unmodulated, with
   ``PDMPOptimizer`` in ``"grad"`` and ``"lr"`` mode, and with the backward-hook mode of :mod:`pdmp_optim.backward`.
5. ``compile``: ``torch.compile`` around the function that calls ``opt.step()``, for the bare optimizer and PDMP
   in each mode, per optimizer, with the graph and graph-break counts and a check for steady-state recompiles.

``--device cuda`` runs the same tables on a GPU (timings synchronise the device); without one it says so and exits.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim.backward import scale_encoder_grads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")  # --device sets it
GAMMA_P = 15.0
CAVEAT = (
    "Measured on a shared, noisy machine (other processes were running; see load averages). Absolute times "
    "are indicative only; the paired ratios (median and IQR over alternating rounds) are the result."
)


# ------------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """The ResNet basic block (two 3x3 convs with batch norm, projection shortcut when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNet18Trunk(nn.Module):
    """ResNet-18 without its classifier (width 64 = the standard network); returns pooled features."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_features = c_in

    def forward(self, x: Tensor) -> Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class MultiModalNet(nn.Module):
    """One encoder per modality, concat fusion, a linear head: the PDMP paper's setting."""

    def __init__(self, encoders: dict[str, nn.Module], feature_dims: list[int], n_classes: int = 6) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = nn.Linear(sum(feature_dims), n_classes)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat([enc(inputs[m]) for m, enc in self.encoders.items()], dim=1))


def resnet_pair(width: int = 64) -> MultiModalNet:
    """Audio (1-channel spectrogram) and visual (RGB) ResNet-18 trunks, as in the PDMP/OGM-GE CREMA-D setup."""
    audio, visual = ResNet18Trunk(1, width), ResNet18Trunk(3, width)
    return MultiModalNet({"audio": audio, "visual": visual}, [audio.out_features, visual.out_features])


def resnet_multi(n_modalities: int, width: int) -> MultiModalNet:
    encoders = {f"m{i}": ResNet18Trunk(3, width) for i in range(n_modalities)}
    return MultiModalNet(encoders, [e.out_features for e in encoders.values()])  # type: ignore[misc]


def small_cnn(in_channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in (32, 64, 128, 256):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def mlp_encoder(d_in: int) -> nn.Module:
    """A parameter-heavy, compute-light encoder (about 8.6M parameters): where the optimizer step is dear."""
    return nn.Sequential(nn.Linear(d_in, 2048), nn.ReLU(), nn.Linear(2048, 2560), nn.ReLU(), nn.Linear(2560, 512))


def width_for(n_params_per_encoder: float) -> int:
    """ResNet-18 trunk width with about this many parameters (the count grows with width squared)."""
    return max(4, round(64 * math.sqrt(n_params_per_encoder / 11.17e6)))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ timing
def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": _quantile(ordered, 0.5),
        "q25": _quantile(ordered, 0.25),
        "q75": _quantile(ordered, 0.75),
        "n": len(ordered),
    }


def _quantile(ordered: list[float], q: float) -> float:
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def alternate(
    variants: dict[str, Callable[[], Any]],
    reset: Callable[[], None],
    rounds: int,
    steps: int,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Time every variant once per round, in an order that rotates each round; seconds per step."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            reset()
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            reset()
            fn = variants[name]
            _sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def paired_ratios(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Median and IQR of per-round ratios, plus ``min_ratio``: the ratio of the two fastest (least disturbed)
    samples, a second estimate that is robust to bursts of load from other processes."""
    out = {}
    for a, b in pairs:
        summary = summarize([x / y for x, y in zip(times[a], times[b], strict=True)])
        summary["min_ratio"] = min(times[a]) / min(times[b])
        out[f"{a}/{b}"] = summary
    return out


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: 1e3 * summarize(values)["median"] for name, values in times.items()}


def steps_for(seconds_per_step: float, target: float = 0.02, cap: int = 8) -> int:
    """Steps per timed sample so that a sample lasts about ``target`` seconds (few steps: gradients are
    rescaled by gamma at every step and are only restored between samples)."""
    return max(1, min(cap, round(target / max(seconds_per_step, 1e-6))))


# ------------------------------------------------------------------------------------- optimizer steps
class StepBench:
    """Shared parameters and gradients, one optimizer per variant, gradients restored before each sample."""

    def __init__(self, model: MultiModalNet, seed: int = 0) -> None:
        self.model = model.to(DEVICE)
        self.params = [p for p in model.parameters()]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.params:
                p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(DEVICE)
        self.grads = [p.grad for p in self.params]
        self.saved = [g.clone() for g in self.grads]
        self.modalities = list(model.encoders)

    def reset(self) -> None:
        # the research variant replaces .grad; put the original tensors back, then their values
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        torch._foreach_copy_(self.grads, self.saved)

    def groups(self) -> dict[str, nn.Module]:
        return dict(self.model.encoders.items())

    def floor(self, inner: torch.optim.Optimizer, gammas: dict[str, float]) -> Callable[[], None]:
        """The least any modulation can cost: one _foreach_mul_ per modality on lists built once."""
        lists = [(gammas[m], [p.grad for p in enc.parameters()]) for m, enc in self.model.encoders.items()]

        def step() -> None:
            for gamma, grads in lists:
                torch._foreach_mul_(grads, gamma)  # type: ignore[arg-type]
            inner.step()

        return step

    def research(self, inner: torch.optim.Optimizer, gammas: dict[str, float]) -> Callable[[], None]:
        """The modulation loop of research code (OGM-GE style): match names, replace each .grad."""
        model = self.model

        def step() -> None:
            for name, parms in model.named_parameters():
                if parms.grad is None:
                    continue
                layer = name.split(".")[1]
                if layer in gammas:
                    parms.grad = parms.grad * gammas[layer]
            inner.step()

        return step


def make_optimizer(kind: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    if kind == "sgd-foreach":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    raise ValueError(kind)


OPTIMIZER_LABELS = {
    "sgd": "SGD momentum (torch default: for-loop kernels on CPU)",
    "sgd-foreach": "SGD momentum (foreach=True, the CUDA default)",
    "adamw": "AdamW (torch default)",
}


def step_case(bench: StepBench, kind: str, rounds: int, with_research: bool = True) -> dict[str, Any]:
    dominant = bench.modalities[-1]
    opt_pdmp = PDMPOptimizer(make_optimizer(kind, bench.params), bench.groups(), dominant=dominant, gamma_p=GAMMA_P)
    gammas = dict(opt_pdmp.gammas)
    variants: dict[str, Callable[[], Any]] = {
        "bare": make_optimizer(kind, bench.params).step,
        "floor": bench.floor(make_optimizer(kind, bench.params), gammas),
        "pdmp": opt_pdmp.step,
    }
    pairs = [("pdmp", "floor"), ("pdmp", "bare"), ("floor", "bare")]
    if opt_pdmp.mode == "grad":  # SGD: the hyperparameter twin, no pass over the gradients
        lr_mode = PDMPOptimizer(make_optimizer(kind, bench.params), bench.groups(), dominant=dominant, mode="lr")
        variants["pdmp_lr"] = lr_mode.step
        pairs += [("pdmp_lr", "bare"), ("pdmp_lr", "pdmp")]
    if opt_pdmp.mode == "lr":
        with warnings.catch_warnings():  # it warns that grad mode barely changes AdamW: that is what this row shows
            warnings.simplefilter("ignore", UserWarning)
            grad_mode = PDMPOptimizer(
                make_optimizer(kind, bench.params), bench.groups(), dominant=dominant, mode="grad"
            )
        variants["pdmp_grad"] = grad_mode.step
        pairs += [("pdmp_grad", "floor"), ("pdmp_grad", "bare")]
    if with_research:
        variants["research"] = bench.research(make_optimizer(kind, bench.params), gammas)
        pairs += [("research", "pdmp"), ("research", "bare")]
    probe = alternate({"bare": variants["bare"]}, bench.reset, rounds=3, steps=1, warmup=1)
    steps = steps_for(min(probe["bare"]))
    times = alternate(variants, bench.reset, rounds=rounds, steps=steps)
    return {
        "optimizer": kind,
        "label": OPTIMIZER_LABELS[kind],
        "pdmp_mode": opt_pdmp.mode,
        "gammas": gammas,
        "n_params": sum(p.numel() for p in bench.params),
        "n_tensors": len(bench.params),
        "rounds": rounds,
        "steps_per_sample": steps,
        "median_ms": median_ms(times),
        "ratios": paired_ratios(times, pairs),
    }


def run_step_cases(quick: bool) -> list[dict[str, Any]]:
    bench = StepBench(resnet_pair(8 if quick else 64))
    rounds = 3 if quick else 80
    return [step_case(bench, kind, rounds) for kind in ("sgd", "sgd-foreach", "adamw")]


def run_scaling_params(quick: bool) -> list[dict[str, Any]]:
    sizes = [0.3e6, 1e6] if quick else [1e6, 3e6, 10e6, 30e6, 100e6]
    out = []
    for size in sizes:
        bench = StepBench(resnet_pair(width_for(size / 2)))
        case = step_case(bench, "sgd-foreach", rounds=3 if quick else 30, with_research=False)
        case["target_params"] = size
        out.append(case)
        del bench
        gc.collect()
    return out


def run_scaling_modalities(quick: bool) -> list[dict[str, Any]]:
    counts = [2, 3] if quick else [2, 3, 4, 6, 8]
    total = 0.5e6 if quick else 22e6
    out = []
    for count in counts:
        bench = StepBench(resnet_multi(count, width_for(total / count)))
        opt = make_optimizer("sgd-foreach", bench.params)
        pdmp = PDMPOptimizer(opt, bench.groups(), dominant="m0", gamma_p=GAMMA_P)
        distinct_gammas = {m: GAMMA_P if i == 0 else 1.0 / (i + 1) for i, m in enumerate(bench.modalities)}
        pdmp_distinct = PDMPOptimizer(
            make_optimizer("sgd-foreach", bench.params), bench.groups(), gammas=distinct_gammas
        )
        variants: dict[str, Callable[[], Any]] = {
            "bare": make_optimizer("sgd-foreach", bench.params).step,
            "floor": bench.floor(make_optimizer("sgd-foreach", bench.params), pdmp.gammas),
            "pdmp": pdmp.step,
            "pdmp_distinct": pdmp_distinct.step,
        }
        probe = alternate({"bare": variants["bare"]}, bench.reset, rounds=3, steps=1, warmup=1)
        steps = steps_for(min(probe["bare"]))
        times = alternate(variants, bench.reset, rounds=3 if quick else 40, steps=steps)
        out.append(
            {
                "modalities": count,
                "n_params": sum(p.numel() for p in bench.params),
                "n_tensors": len(bench.params),
                "pdmp_buckets": len({g for g in pdmp.gammas.values() if g != 1.0}),  # one dtype, one device
                "pdmp_distinct_buckets": len({g for g in pdmp_distinct.gammas.values() if g != 1.0}),
                "steps_per_sample": steps,
                "median_ms": median_ms(times),
                "ratios": paired_ratios(
                    times,
                    [("pdmp", "floor"), ("pdmp", "bare"), ("pdmp_distinct", "bare"), ("floor", "bare")],
                ),
            }
        )
        del bench, pdmp, pdmp_distinct, variants
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------- training step
def train_case(
    name: str, model: MultiModalNet, inputs: dict[str, Tensor], rounds: int, target_s: float = 0.05
) -> dict[str, Any]:
    """Whole training step: unmodulated vs PDMPOptimizer "grad" and "lr" mode vs backward hooks, on identical copies."""
    target = torch.randint(0, 6, (next(iter(inputs.values())).shape[0],), generator=torch.Generator().manual_seed(0))
    dominant = list(model.encoders)[-1]
    model = model.to(DEVICE)
    inputs = {m: x.to(DEVICE) for m, x in inputs.items()}
    target = target.to(DEVICE)
    models = {key: copy.deepcopy(model) for key in ("unmodulated", "grad", "lr", "hook")}
    opts: dict[str, torch.optim.Optimizer] = {
        key: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4) for key, m in models.items()
    }
    opts["grad"] = PDMPOptimizer(opts["grad"], dict(models["grad"].encoders.items()), dominant=dominant, mode="grad")
    opts["lr"] = PDMPOptimizer(opts["lr"], dict(models["lr"].encoders.items()), dominant=dominant, mode="lr")
    hooks = scale_encoder_grads(dict(models["hook"].encoders.items()), opts["grad"].gammas)
    loss_fn = nn.CrossEntropyLoss()

    def make_step(key: str) -> Callable[[], None]:
        m, opt = models[key], opts[key]

        def step() -> None:
            loss = loss_fn(m(inputs), target)
            loss.backward()
            opt.step()
            opt.zero_grad()

        return step

    variants = {key: make_step(key) for key in models}
    probe = alternate({"unmodulated": variants["unmodulated"]}, lambda: None, rounds=2, steps=1, warmup=1)
    steps = max(1, min(500, round(target_s / min(probe["unmodulated"]))))
    times = alternate(variants, lambda: None, rounds=rounds, steps=steps)
    hooks.remove()
    batch = next(iter(inputs.values())).shape[0]
    return {
        "model": name,
        "n_params": n_params(model),
        "batch": batch,
        "input_shapes": {m: list(x.shape) for m, x in inputs.items()},
        "rounds": rounds,
        "steps_per_sample": steps,
        "median_ms": median_ms(times),
        "ratios": paired_ratios(
            times, [("grad", "unmodulated"), ("lr", "unmodulated"), ("hook", "unmodulated"), ("hook", "grad")]
        ),
        "added_us": {
            f"{key}-unmodulated": {
                k: (v * 1e6 if k != "n" else v)
                for k, v in summarize([a - b for a, b in zip(times[key], times["unmodulated"], strict=True)]).items()
            }
            for key in ("grad", "lr", "hook")
        },
    }


def run_train_steps(quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    cnn = MultiModalNet({"audio": small_cnn(1), "visual": small_cnn(3)}, [256, 256])
    batch, side = (4, 16) if quick else (32, 64)
    inputs = {
        "audio": torch.randn(batch, 1, side, side, generator=gen),
        "visual": torch.randn(batch, 3, side, side, generator=gen),
    }
    out.append(train_case("small CNN pair (4 conv layers each)", cnn, inputs, rounds=3 if quick else 100))
    if not quick:
        mlp = MultiModalNet({"audio": mlp_encoder(1024), "visual": mlp_encoder(1024)}, [512, 512])
        inputs = {"audio": torch.randn(16, 1024, generator=gen), "visual": torch.randn(16, 1024, generator=gen)}
        out.append(train_case("MLP pair (8.6M params each), batch 16", mlp, inputs, rounds=60))
        inputs = {"audio": torch.randn(8, 1, 64, 64, generator=gen), "visual": torch.randn(8, 3, 64, 64, generator=gen)}
        out.append(train_case("ResNet-18 pair, 64x64 inputs, batch 8", resnet_pair(64), inputs, rounds=40))
    return out


def run_hook_cost(quick: bool) -> dict[str, Any]:
    """Absolute time the modulation adds to a training step, on a tiny model where fixed costs dominate.

    The whole-step ratios above cannot resolve differences under about 1-3% on a noisy machine; this measures
    the added microseconds directly (paired differences over many steps), to set against a real step time.
    """
    torch.manual_seed(0)
    model = MultiModalNet({"audio": nn.Linear(32, 64), "visual": nn.Linear(32, 64)}, [64, 64])
    inputs = {"audio": torch.randn(16, 32), "visual": torch.randn(16, 32)}
    case = train_case("tiny linear pair (fixed costs)", model, inputs, rounds=3 if quick else 60, target_s=0.02)
    return case


# ---------------------------------------------------------------------------------------------- compile
COMPILE_MODES = {"sgd": ("grad", "lr"), "sgd-foreach": ("grad", "lr"), "adamw": ("lr",)}


def run_compile(quick: bool) -> dict[str, Any]:
    """``torch.compile`` around the function that calls ``opt.step()``, bare and PDMP in each mode, per optimizer."""
    if quick:
        return {"status": "skipped", "reason": "--quick"}
    bench = StepBench(resnet_pair(64))
    cases = []
    for kind, modes in COMPILE_MODES.items():
        for mode in modes:  # one PDMP optimizer per compile cache (see compile_case)
            torch._dynamo.reset()
            try:
                cases.append(compile_case(bench, kind, (mode,), rounds=20))
            except Exception as exc:  # report honestly, do not hide it
                cases.append({"optimizer": kind, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                              "traceback": traceback.format_exc()})  # fmt: skip
    status = "ok" if all(c.get("status") == "ok" for c in cases) else "failed"
    return {"status": status, "n_params": sum(p.numel() for p in bench.params), "cases": cases}


def compile_case(bench: StepBench, kind: str, modes: tuple[str, ...], rounds: int) -> dict[str, Any]:
    """The PDMP variant is compiled first, then the bare optimizer: torch 2.13's dynamo fails
    (``SpeculationLogDivergence``) compiling SGD with momentum for a second optimizer whose param groups hold distinct
    float hyperparameters, as PDMP's split groups do (plain torch reproduces it without PDMP; a single optimizer per
    process, the usual case, is unaffected)."""
    dominant = bench.modalities[-1]
    eager = {"bare": make_optimizer(kind, bench.params)}
    compiled_opts = {"bare": make_optimizer(kind, bench.params)}
    for mode in modes:
        for opts in (eager, compiled_opts):
            opts[mode] = PDMPOptimizer(make_optimizer(kind, bench.params), bench.groups(), dominant=dominant, mode=mode)

    def caller(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.step()

        return step

    compiled = {name: torch.compile(caller(opt)) for name, opt in compiled_opts.items()}
    compile_s, graphs_after_warmup = {}, {}
    for name, fn in sorted(compiled.items(), key=lambda item: item[0] == "bare"):
        bench.reset()
        start = time.perf_counter()
        fn()
        fn()  # a second call: recompiles for changed guards (new optimizer state) show up here
        compile_s[name] = round(time.perf_counter() - start, 1)
    graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    variants: dict[str, Callable[[], Any]] = {f"eager_{n}": opt.step for n, opt in eager.items()}
    variants.update({f"compiled_{n}": fn for n, fn in compiled.items()})
    times = alternate(variants, bench.reset, rounds=rounds, steps=1)
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_after_warmup
    pairs = [("compiled_bare", "eager_bare")]
    for mode in modes:
        pairs += [(f"compiled_{mode}", "compiled_bare"), (f"eager_{mode}", "eager_bare")]
    counts = {}
    for name, opt in compiled_opts.items():
        explanation = torch._dynamo.explain(caller(opt))()
        counts[name] = {
            "graphs": explanation.graph_count,
            "graph_breaks": explanation.graph_break_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0][:160] for b in explanation.break_reasons}),
        }
    return {
        "optimizer": kind,
        "status": "ok",
        "label": OPTIMIZER_LABELS[kind],
        "compile_s": compile_s,
        "recompiles_after_warmup": recompiles,
        "counts": counts,
        "median_ms": median_ms(times),
        "ratios": paired_ratios(times, pairs),
    }


# ------------------------------------------------------------------------------------------------ report
def fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}] min {r['min_ratio']:.3f}"


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    print(f"\npdmp-optim overhead benchmark ({'quick' if meta['quick'] else 'full'}), torch {meta['torch']}")
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; {CAVEAT}")
    print(
        "ratios: median [q25, q75] of paired per-round ratios, then min = ratio of the fastest samples; "
        "< 1 means the first is faster\n"
    )
    print("1. optimizer step, two ResNet-18 encoders + head")
    for case in results["step"]:
        print(f"  {case['label']}: {case['n_params'] / 1e6:.1f}M params, {case['n_tensors']} tensors, "
              f"PDMP mode {case['pdmp_mode']!r}; median ms {_ms(case['median_ms'])}")  # fmt: skip
        for key, r in case["ratios"].items():
            print(f"    {key:<20} {fmt(r)}")
    print("\n2. scaling with parameter count (SGD momentum, foreach)")
    print(f"  {'params':>8} {'pdmp/floor':>36} {'pdmp/bare':>36} {'bare ms':>9}")
    for case in results["scaling_params"]:
        r = case["ratios"]
        print(f"  {case['n_params'] / 1e6:>7.1f}M {fmt(r['pdmp/floor']):>36} {fmt(r['pdmp/bare']):>36} "
              f"{case['median_ms']['bare']:>9.2f}")  # fmt: skip
    print("\n3. scaling with modality count (SGD momentum, foreach, fixed total size)")
    print(f"  {'M':>3} {'buckets':>7} {'pdmp/floor':>36} {'pdmp/bare':>36} {'pdmp_distinct/bare':>36}")
    for case in results["scaling_modalities"]:
        r = case["ratios"]
        print(f"  {case['modalities']:>3} {case['pdmp_buckets']:>7} {fmt(r['pdmp/floor']):>36} "
              f"{fmt(r['pdmp/bare']):>36} {fmt(r['pdmp_distinct/bare']):>36}")  # fmt: skip
    print("\n4. whole training step (forward + backward + SGD step), SGD momentum")
    for case in results["train_step"]:
        print(f"  {case['model']}: {case['n_params'] / 1e6:.2f}M params, batch {case['batch']}; "
              f"median ms {_ms(case['median_ms'])}")  # fmt: skip
        for key, r in case["ratios"].items():
            print(f"    {key:<20} {fmt(r)}")
    cost = results["hook_cost"]
    if cost:
        print(f"\n4b. added time per training step, {cost['model']}: median ms {_ms(cost['median_ms'])}")
        for key, r in cost["added_us"].items():
            print(f"    {key:<20} {r['median']:+.1f} us [{r['q25']:+.1f}, {r['q75']:+.1f}]")
    comp = results["compile"]
    print(f"\n5. torch.compile around the function that calls opt.step(): {comp['status']}")
    for case in comp.get("cases", []):
        if case.get("status") != "ok":
            print(f"  {case['optimizer']}: {case.get('error')}")
            continue
        print(f"  {case['label']}: compile s {case['compile_s']}; recompiles after warm-up "
              f"{case['recompiles_after_warmup']}; median ms {_ms(case['median_ms'])}")  # fmt: skip
        for name, c in case["counts"].items():
            print(f"    {name:<6} graphs {c['graphs']}, graph breaks {c['graph_breaks']}")
        for key, r in case["ratios"].items():
            print(f"    {key:<30} {fmt(r)}")
    if "cases" not in comp:
        print(f"  {comp.get('reason') or comp.get('error')}")


def _ms(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items())


# Figures: one idea each, drawn at the docs column width (10 in at 100 dpi = 1000 px) with fonts of 11 pt or more.
FIG_STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 11,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
}
SHORT = {"sgd": "SGD", "sgd-foreach": "SGD foreach", "adamw": "AdamW"}
# what the ratios against the bare step are called in the figures and tables
STEP_VARIANTS = {
    "pdmp_lr/bare": "PDMP, lr mode",
    "pdmp_grad/bare": "PDMP, grad mode",
    "floor/bare": "floor: one hand-written multiply per modality",
    "research/bare": "research-code loop over the parameters",
}


def _step_ratios(case: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A step case's ratios against the bare step, keyed by the mode they measure (AdamW's PDMP runs lr mode)."""
    r = dict(case["ratios"])
    r.setdefault(f"pdmp_{case['pdmp_mode']}/bare", r["pdmp/bare"])
    return {key: r[key] for key in STEP_VARIANTS if key in r}


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """The figures of the overhead page, one idea each; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context(FIG_STYLE):
        if results["step"]:
            written.append(_plot_step(plt, results, out / "overhead_step.png"))
        if results["train_step"]:
            written.append(_plot_train_step(plt, results, out / "overhead_train_step.png"))
        if results["scaling_params"]:
            written.append(_plot_scaling(plt, results, out / "overhead_size.png"))
        if results["scaling_modalities"]:
            written.append(_plot_modalities(plt, results, out / "overhead_modalities.png"))
    return written


def _dots(ax: Any, rows: list[tuple[str, str, dict[str, float]]], colors: dict[str, str]) -> None:
    """Dots with IQR bars, one row per (group, variant), grouped, a legend for the variants and a line at 1."""
    groups = list(dict.fromkeys(group for group, _, _ in rows))
    y, centers, seen = 0.0, [], set()
    for group in groups:
        ys = []
        for g, variant, r in rows:
            if g != group:
                continue
            err = [[r["median"] - r["q25"]], [r["q75"] - r["median"]]]
            label = None if variant in seen else variant
            seen.add(variant)
            ax.errorbar([r["median"]], [y], xerr=err, fmt="o", ms=8, capsize=4, color=colors[variant], label=label)
            ys.append(y)
            y += 1
        centers.append(statistics.fmean(ys))
        y += 0.8
    ax.set_yticks(centers, groups)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=1)
    ax.grid(axis="x", alpha=0.3)
    ncol = 3 if max(len(v) for v in seen) < 20 else 2
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def _plot_step(plt: Any, results: dict[str, Any], path: Path) -> Path:
    rows = [(SHORT[c["optimizer"]], STEP_VARIANTS[k], r) for c in results["step"] for k, r in _step_ratios(c).items()]
    colors = dict(zip(STEP_VARIANTS.values(), ("tab:green", "tab:blue", "tab:grey", "tab:red"), strict=True))
    fig, ax = plt.subplots(figsize=(10, 6))
    _dots(ax, rows, colors)
    ax.set_xlabel("time of the step / time of the bare optimizer's step")
    n = results["step"][0]["n_params"] / 1e6
    ax.set_title(f"One optimizer step, two ResNet-18 encoders ({n:.1f}M parameters)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_train_step(plt: Any, results: dict[str, Any], path: Path) -> Path:
    names = {"lr/unmodulated": "lr mode", "grad/unmodulated": "grad mode", "hook/unmodulated": "backward hooks"}
    rows = [(c["model"].split(",")[0], names[k], c["ratios"][k]) for c in results["train_step"] for k in names]
    colors = dict(zip(names.values(), ("tab:green", "tab:blue", "tab:purple"), strict=True))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    _dots(ax, rows, colors)
    ax.set_xlabel("time of the training step / time of the unmodulated one")
    ax.set_title("A whole training step: forward, backward, SGD momentum step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _lines(ax: Any, xs: list[float], cases: list[dict[str, Any]], keys: dict[str, tuple[str, str]]) -> None:
    for key, (label, color) in keys.items():
        if all(key in c["ratios"] for c in cases):
            rs = [c["ratios"][key] for c in cases]
            ax.errorbar(xs, [r["median"] for r in rs], yerr=_yerr(rs), marker="o", capsize=3, lw=2, label=label,
                        color=color)  # fmt: skip
    ax.axhline(1.0, color="black", lw=1)
    ax.set_ylabel("time / bare optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_scaling(plt: Any, results: dict[str, Any], path: Path) -> Path:
    cases = results["scaling_params"]
    fig, ax = plt.subplots(figsize=(10, 5))
    keys = {
        "pdmp/bare": ("PDMP, grad mode", "tab:blue"),
        "floor/bare": ("floor: one hand-written multiply per modality", "tab:grey"),
        "pdmp_lr/bare": ("PDMP, lr mode", "tab:green"),
    }
    _lines(ax, [c["n_params"] / 1e6 for c in cases], cases, keys)
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 10, 30, 100], ["1", "3", "10", "30", "100"])
    ax.set_xlabel("parameters (millions; two ResNet-18 trunks of growing width)")
    ax.set_title("One SGD momentum step at growing model size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_modalities(plt: Any, results: dict[str, Any], path: Path) -> Path:
    cases = results["scaling_modalities"]
    fig, ax = plt.subplots(figsize=(10, 5))
    keys = {
        "pdmp/bare": ("PDMP, grad mode (the paper's rule: 2 coefficients)", "tab:blue"),
        "pdmp_distinct/bare": ("PDMP, grad mode, one coefficient per modality", "tab:orange"),
    }
    _lines(ax, [c["modalities"] for c in cases], cases, keys)
    ax.set_xlabel("modalities (fixed total size)")
    ax.set_title("One SGD momentum step, the same total size split over M modalities")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _yerr(rs: list[dict[str, float]]) -> list[list[float]]:
    return [[r["median"] - r["q25"] for r in rs], [r["q75"] - r["median"] for r in rs]]


# ------------------------------------------------------------------------------------------ markdown tables
def _cell(r: dict[str, float] | None, iqr: bool = False) -> str:
    if r is None:
        return ""
    return f"{r['median']:.2f}" + (f" [{r['q25']:.2f}, {r['q75']:.2f}]" if iqr else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def summary_tables(results: dict[str, Any]) -> dict[str, list[str]]:
    """The page's tables (narrow: short headers, medians of the paired ratios), by section name."""
    out: dict[str, list[str]] = {}
    if results["step"]:
        rows = []
        for c in results["step"]:
            r = _step_ratios(c)
            rows.append([SHORT[c["optimizer"]], f"{c['median_ms']['bare']:.0f}",
                         *(_cell(r.get(k)) for k in STEP_VARIANTS)])  # fmt: skip
        out["step"] = _table(["optimizer", "bare ms", "lr mode", "grad mode", "floor", "research loop"], rows)
    if results["train_step"]:
        rows = [
            [c["model"].split(",")[0], f"{c['median_ms']['unmodulated']:.0f}",
             *(_cell(c["ratios"][k]) for k in ("lr/unmodulated", "grad/unmodulated", "hook/unmodulated"))]
            for c in results["train_step"]
        ]  # fmt: skip
        out["train_step"] = _table(["model", "plain ms", "lr mode", "grad mode", "hooks"], rows)
    cost = results.get("hook_cost")
    if cost:
        a = cost["added_us"]
        rows = [[f"{a[k]['median']:+.0f} [{a[k]['q25']:+.0f}, {a[k]['q75']:+.0f}]" for k in
                 ("lr-unmodulated", "grad-unmodulated", "hook-unmodulated")]]  # fmt: skip
        out["fixed_cost"] = _table(["lr mode, us", "grad mode, us", "hooks, us"], rows)
    comp = results.get("compile", {})
    if comp.get("cases"):
        rows = []
        for c in comp["cases"]:
            if c.get("status") != "ok":
                continue
            for mode in ("lr", "grad"):
                if f"compiled_{mode}/compiled_bare" in c["ratios"]:
                    g, b = c["counts"][mode], c["counts"]["bare"]
                    rows.append([SHORT[c["optimizer"]], mode, f"{g['graphs']}, {g['graph_breaks']}",
                                 f"{b['graphs']}, {b['graph_breaks']}",
                                 _cell(c["ratios"][f"compiled_{mode}/compiled_bare"])])  # fmt: skip
        out["compile"] = _table(["optimizer", "mode", "PDMP graphs, breaks", "bare graphs, breaks", "compiled"], rows)
    return out


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    """Every table of a run as markdown: the page's tables first, then the full ones (what ``overhead.md`` holds)."""
    meta = results["meta"]
    lines = [
        "# Overhead benchmark results",
        "",
        f"`{meta['command']}`, {meta['date']}: torch {meta['torch']}, Python {meta['python']}, {meta['device']}"
        f" ({meta['cpu_count']} cores, {meta['cpu_threads']} thread(s) used), load average {meta['loadavg_start']}"
        f" at the start and {meta.get('loadavg_end')} at the end, {meta.get('duration_s')} s. {meta['caveat']}",
        "",
        "A ratio is the median of the per-round ratios (variant time / reference time, variants alternating in one"
        " process); in brackets, their interquartile range; `min`: the ratio of the two fastest samples.",
        "",
    ]
    titles = {
        "step": "One optimizer step / the bare step (two ResNet-18 encoders)",
        "train_step": "A whole training step / the unmodulated one (SGD momentum)",
        "fixed_cost": f"Time added per training step, {(results.get('hook_cost') or {}).get('model', '')}",
        "compile": "torch.compile: PDMP / bare, both compiled",
    }
    for key, table in summary_tables(results).items():
        lines += [f"## {titles[key]}", "", *table, ""]
    lines += ["## Every ratio, per section", ""]
    for case in results["step"]:
        lines += [f"### Optimizer step: {case['label']}", "", f"PDMP mode {case['pdmp_mode']!r}, "
                  f"{case['n_params'] / 1e6:.1f}M parameters in {case['n_tensors']} tensors; median ms: "
                  f"{_ms(case['median_ms'])}.", ""]  # fmt: skip
        lines += _table(["ratio", "median [q25, q75] min"], [[f"`{k}`", fmt(r)] for k, r in case["ratios"].items()])
        lines.append("")
    if results["scaling_params"]:
        lines += ["### Model size (SGD momentum, foreach)", ""]
        keys = [k for k in ("pdmp/floor", "pdmp/bare", "floor/bare", "pdmp_lr/bare")
                if all(k in c["ratios"] for c in results["scaling_params"])]  # fmt: skip
        rows = [[f"{c['n_params'] / 1e6:.1f}M", f"{c['median_ms']['bare']:.1f}",
                 *(_cell(c["ratios"][k], True) for k in keys)] for c in results["scaling_params"]]  # fmt: skip
        lines += [*_table(["parameters", "bare ms", *(f"`{k}`" for k in keys)], rows), ""]
    if results["scaling_modalities"]:
        lines += ["### Number of modalities (SGD momentum, foreach, fixed total size)", ""]
        keys = ["pdmp/floor", "pdmp/bare", "pdmp_distinct/bare", "floor/bare"]
        rows = [[str(c["modalities"]), str(c["pdmp_buckets"]), *(_cell(c["ratios"].get(k), True) for k in keys)]
                for c in results["scaling_modalities"]]  # fmt: skip
        lines += [*_table(["M", "PDMP buckets", *(f"`{k}`" for k in keys)], rows), ""]
    for case in results["train_step"]:
        lines += [f"### Training step: {case['model']}", "", f"{case['n_params'] / 1e6:.2f}M parameters, batch "
                  f"{case['batch']}; median ms: {_ms(case['median_ms'])}.", ""]  # fmt: skip
        lines += _table(["ratio", "median [q25, q75] min"], [[f"`{k}`", fmt(r)] for k, r in case["ratios"].items()])
        lines.append("")
    for case in results.get("compile", {}).get("cases", []):
        if case.get("status") != "ok":
            continue
        lines += [f"### torch.compile: {case['label']}", "", f"Recompiles after warm-up: "
                  f"{case['recompiles_after_warmup']}; median ms: {_ms(case['median_ms'])}.", ""]  # fmt: skip
        lines += _table(["ratio", "median [q25, q75] min"], [[f"`{k}`", fmt(r)] for k, r in case["ratios"].items()])
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few rounds, no compile")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for overhead.json, .md and PNGs")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.add_argument(
        "--replot", action="store_true", help="measure nothing: redraw the PNGs and overhead.md from --out's JSON"
    )
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile comparison")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same tables on a GPU")
    parser.add_argument(
        "--sections",
        default="step,scaling_params,scaling_modalities,train_step,hook_cost,compile",
        help="comma-separated subset of the sections to run (default: all)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; nothing measured (the CPU tables are the default run)")
        return {"meta": {"device": args.device, "skipped": "no CUDA device"}}
    if args.replot:
        results = json.loads((args.out / "overhead.json").read_text())
        files = [*plot(results, args.out), write_markdown(results, args.out / "overhead.md")]
        print_table(results)
        print("\nwrote " + ", ".join(str(f) for f in files))
        return results

    torch.manual_seed(0)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "command": "python benchmarks/overhead.py"
            + (" --quick" if args.quick else "")
            + ("" if args.device == "cpu" else f" --device {args.device}"),
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else platform.processor() or "cpu",
            "quick": args.quick,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "gamma_p": GAMMA_P,
            "caveat": CAVEAT,
        }
    }
    sections: list[tuple[str, Callable[[bool], Any]]] = [
        ("step", run_step_cases),
        ("scaling_params", run_scaling_params),
        ("scaling_modalities", run_scaling_modalities),
        ("train_step", run_train_steps),
        ("hook_cost", run_hook_cost),
    ]
    wanted = set(args.sections.split(","))
    for key, fn in sections:
        if key not in wanted:
            results[key] = [] if key != "hook_cost" else {}
            continue
        t0 = time.perf_counter()
        results[key] = fn(args.quick)
        print(f"[{key}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    if args.skip_compile or "compile" not in wanted:
        results["compile"] = {"status": "skipped", "reason": "--skip-compile"}
    else:
        t0 = time.perf_counter()
        results["compile"] = run_compile(args.quick)
        print(f"[compile: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["duration_s"] = round(time.perf_counter() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    files = [args.out / "overhead.json", write_markdown(results, args.out / "overhead.md")]
    if not args.no_plot:
        files += plot(results, args.out)
    print_table(results)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return results


if __name__ == "__main__":
    main()
