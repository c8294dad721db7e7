"""Count what ``torch.compile`` does with an optimizer step, bare and wrapped in ``PDMPOptimizer``.

Run: python examples/compile_counts.py

Following PyTorch's compiled-optimizer recipe, the forward and backward run eagerly and a function that
calls ``opt.step()`` is compiled. For each optimizer, bare and PDMP-wrapped, this prints what
``torch._dynamo.explain`` sees in one step, and ``torch._dynamo.utils.counters`` over a short run: how many
graphs were compiled after the first two steps (SGD's momentum buffers appear at step 1) and at the end,
and the distinct graph-break reasons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from pdmp_optim import PDMPOptimizer

GAMMAS = {"audio": 1 / 15, "visual": 15.0}
# name -> (optimizer factory, whether an LR scheduler steps every iteration)
OPTIMIZERS: dict[str, tuple[Callable[[list[nn.Parameter]], torch.optim.Optimizer], bool]] = {
    "SGD(momentum)": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), False),
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-2), False),
    # the recipe's advice: a tensor lr, so that a scheduler changing it does not recompile
    "Adam(lr=tensor)+LinearLR": (lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-2)), True),
}


class TwoModality(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio, self.visual, self.head = nn.Linear(4, 8), nn.Linear(6, 8), nn.Linear(16, 3)

    def forward(self, x_audio: torch.Tensor, x_visual: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.audio(x_audio)), torch.relu(self.visual(x_visual))], dim=1))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g), torch.randint(3, (8,), generator=g))
            for _ in range(steps)]  # fmt: skip


def build(optimizer: str, wrap: bool) -> tuple[TwoModality, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = TwoModality()
    factory, use_scheduler = OPTIMIZERS[optimizer]
    opt = factory(list(model.parameters()))
    if wrap:
        opt = PDMPOptimizer(opt, {"audio": model.audio, "visual": model.visual}, gammas=GAMMAS)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=10) if use_scheduler else None
    return model, opt, scheduler


def train(optimizer: str, wrap: bool, steps: int, compiled: bool, backend: str = "inductor") -> dict[str, object]:
    """Train ``steps`` steps; return the final parameters and, when compiled, the dynamo counts."""
    torch._dynamo.reset()
    counters.clear()
    model, opt, scheduler = build(optimizer, wrap)

    def step() -> None:
        opt.step()

    step_fn = torch.compile(step, backend=backend) if compiled else step
    graphs_per_step = []
    for x_audio, x_visual, y in batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_audio, x_visual), y).backward()
        step_fn()
        if scheduler is not None:
            scheduler.step()
        graphs_per_step.append(counters["stats"]["unique_graphs"])
    result: dict[str, object] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}}
    if compiled:
        result["graphs_per_step"] = graphs_per_step
        # with a scheduler, dynamo names the optimizer class whose step it skips; compare reasons without it
        cls = type(opt)
        result["graph_break_reasons"] = sorted(
            {
                r.replace(cls.__module__, "<module>").replace(cls.__name__, "<optimizer>")
                for r in counters["graph_break"]
            }
        )
    return result


def explain(optimizer: str, wrap: bool) -> torch._dynamo.backends.debugging.ExplainOutput:
    """``torch._dynamo.explain`` of one step (after one eager backward)."""
    torch._dynamo.reset()
    model, opt, _ = build(optimizer, wrap)
    x_audio, x_visual, y = batches(1)[0]
    nn.functional.cross_entropy(model(x_audio, x_visual), y).backward()
    return torch._dynamo.explain(opt.step)()


def first_line(reason: str) -> str:
    return next(line.strip() for line in reason.splitlines() if line.strip())


def main(steps: int = 6) -> dict[tuple[str, bool], dict[str, object]]:
    """Print the table; return each (optimizer, wrapped) run with its ``explain`` output."""
    print(f"torch {torch.__version__}, backend inductor, {steps} steps")
    print("optimizer                 wrapped  explain: graphs breaks   compiled graphs after step 2 / at end   breaks")
    runs = {}
    for optimizer in OPTIMIZERS:
        for wrap in (False, True):
            ex = explain(optimizer, wrap)
            run = train(optimizer, wrap, steps, compiled=True)
            run["explain"] = ex
            runs[optimizer, wrap] = run
            graphs = run["graphs_per_step"]
            reasons = "; ".join(first_line(r) for r in run["graph_break_reasons"])
            label = "PDMP" if wrap else "bare"
            print(f"{optimizer:25s} {label:8s} {ex.graph_count:15d} {ex.graph_break_count:6d}   "
                  f"{graphs[1]:28d} / {graphs[-1]:<6d}   {reasons}")  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
