"""Speed of PDMP's gradient modulation, measured side by side against the floor, the bare optimizer and peers.

Run from the repository root::

    python benchmarks/overhead.py            # full run (about 10-20 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # smoke run, a few seconds

Every comparison runs its variants in one process, alternating (the order rotates every round), and reports
the median and interquartile range of *paired* ratios (variant time / reference time within one round), which
cancels most of the drift of a noisy, shared machine. Results: a table on stdout, ``overhead.json`` and
``overhead.png`` in ``--out`` (default ``benchmarks/results/``).

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
        torch._dynamo.reset()
        try:
            cases.append(compile_case(bench, kind, modes, rounds=20))
        except Exception as exc:  # report honestly, do not hide it
            cases.append({"optimizer": kind, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                          "traceback": traceback.format_exc()})  # fmt: skip
    status = "ok" if all(c.get("status") == "ok" for c in cases) else "failed"
    return {"status": status, "n_params": sum(p.numel() for p in bench.params), "cases": cases}


def compile_case(bench: StepBench, kind: str, modes: tuple[str, ...], rounds: int) -> dict[str, Any]:
    """The "lr" variant is compiled first: torch 2.13's dynamo fails (``SpeculationLogDivergence``) compiling SGD with
    momentum for a second optimizer whose param groups hold distinct float hyperparameters, as "lr" mode's do (plain
    torch reproduces it without PDMP; a single optimizer per process, the usual case, is unaffected)."""
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
    for name, fn in sorted(compiled.items(), key=lambda item: item[0] != "lr"):
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


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10), layout="constrained")

    def bars(ax: Any, labels: list[str], entries: list[dict[str, float]], title: str) -> None:
        med = [e["median"] for e in entries]
        err = [[m - e["q25"] for m, e in zip(med, entries, strict=True)],
               [e["q75"] - m for m, e in zip(med, entries, strict=True)]]  # fmt: skip
        ax.errorbar(med, range(len(labels)), xerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("time ratio: median and IQR of paired ratios (1 = same time)")
        ax.grid(axis="x", alpha=0.3)
        ax.invert_yaxis()

    labels, entries = [], []
    short = {"sgd": "SGD", "sgd-foreach": "SGD foreach", "adamw": "AdamW"}
    for case in results["step"]:
        for key in ("pdmp/floor", "pdmp/bare", "pdmp_lr/bare", "research/pdmp"):
            if key in case["ratios"]:
                labels.append(f"{short[case['optimizer']]} ({case['pdmp_mode']}): {key}")
                entries.append(case["ratios"][key])
    bars(axes[0, 0], labels, entries, "1. optimizer step, ResNet-18 pair")

    ax = axes[0, 1]
    xs = [c["n_params"] for c in results["scaling_params"]]
    for key, color in (("pdmp/floor", "tab:blue"), ("pdmp/bare", "tab:orange"), ("floor/bare", "tab:green")):
        rs = [c["ratios"][key] for c in results["scaling_params"]]
        ax.errorbar(xs, [r["median"] for r in rs], yerr=_yerr(rs), marker="o", capsize=3, label=key, color=color)
    ax.axhline(1.0, color="black", lw=1)
    if xs:
        ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("time ratio")
    ax.set_title("2. scaling with parameter count (SGD momentum, foreach)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    xs = [c["modalities"] for c in results["scaling_modalities"]]
    for key, color in (("pdmp/floor", "tab:blue"), ("pdmp/bare", "tab:orange"), ("pdmp_distinct/bare", "tab:red")):
        rs = [c["ratios"][key] for c in results["scaling_modalities"]]
        ax.errorbar(xs, [r["median"] for r in rs], yerr=_yerr(rs), marker="o", capsize=3, label=key, color=color)
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xlabel("modalities (fixed total size)")
    ax.set_ylabel("time ratio")
    ax.set_title("3. scaling with modality count", fontsize=10)
    ax.legend(fontsize=8)

    labels, entries = [], []
    for case in results["train_step"]:
        for key in ("grad/unmodulated", "lr/unmodulated", "hook/unmodulated"):
            labels.append(f"{case['model'].split(',')[0]}: {key}")
            entries.append(case["ratios"][key])
    bars(axes[1, 1], labels, entries, "4. whole training step (SGD momentum) vs unmodulated")

    meta = results["meta"]
    fig.suptitle(
        f"pdmp-optim overhead, torch {meta['torch']}, {meta['cpu_threads']} CPU threads, "
        f"load {meta['loadavg_start']} -> {meta['loadavg_end']} (shared, noisy machine)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _yerr(rs: list[dict[str, float]]) -> list[list[float]]:
    return [[r["median"] - r["q25"] for r in rs], [r["q75"] - r["median"] for r in rs]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few rounds, no compile")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for overhead.json/.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--replot", action="store_true", help="only redraw overhead.png from --out's overhead.json")
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
        plot(results, args.out / "overhead.png")
        print_table(results)
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
    if not args.no_plot:
        plot(results, args.out / "overhead.png")
    print_table(results)
    print(f"\nwrote {args.out / 'overhead.json'}" + ("" if args.no_plot else f" and {args.out / 'overhead.png'}"))
    return results


if __name__ == "__main__":
    main()
