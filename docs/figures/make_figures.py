"""Draw the figure of docs/concepts.md from a tiny real run of vanilla training vs PDMP on generated data.

Run from the repository root: ``python docs/figures/make_figures.py`` (a few seconds on a CPU)
rewrites ``docs/figures/pdmp_vs_vanilla.png``. ``--fast`` runs a smaller version (used by the tests) and
``--out DIR`` writes somewhere else.

The data are built so that "audio" is learned fast but is capped (the optimization-dominant modality) and
"visual" is learned slowly but ends higher (the performance-dominant modality).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pdmp_optim import PDMPOptimizer, rank_modalities
from pdmp_optim.diagnostics import logit_ratio

CLASSES, HIDDEN, BATCH = 4, 32, 64
FIGURE_NAME = "pdmp_vs_vanilla.png"


def make_data(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two modalities: a strong cue shown for 60% of samples (audio), a weak cue shown for all (visual)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=gen)
    shown = torch.where(torch.rand(n, generator=gen) < 0.6, y, torch.randint(CLASSES, (n,), generator=gen))
    audio = 3.0 * nn.functional.one_hot(shown, CLASSES).float() + torch.randn(n, CLASSES, generator=gen)
    means = torch.randn(CLASSES, HIDDEN, generator=torch.Generator().manual_seed(0))
    visual = 0.3 * means[y] + torch.randn(n, HIDDEN, generator=gen)
    return {"audio": audio, "visual": visual}, y


class Fusion(nn.Module):
    """Late fusion by concatenation: one encoder per modality, one linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(CLASSES, HIDDEN), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(2 * HIDDEN, CLASSES)

    def contributions(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's share ``s_m`` of the fused logits (the head is linear, so they add up)."""
        w_a, w_v = self.head.weight[:, :HIDDEN], self.head.weight[:, HIDDEN:]
        return {"audio": self.audio(x["audio"]) @ w_a.T, "visual": self.visual(x["visual"]) @ w_v.T}

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.contributions(x)
        return s["audio"] + s["visual"] + self.head.bias


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=5e-3, momentum=0.9, weight_decay=1e-4)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def train(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    opt: torch.optim.Optimizer,
    data: tuple[dict[str, torch.Tensor], torch.Tensor],
    test: tuple[dict[str, torch.Tensor], torch.Tensor],
    epochs: int,
    after_epoch: Callable[[], None] | None = None,
) -> list[float]:
    """Plain mini-batch training; returns the test accuracy after each epoch (index 0: before training)."""
    x, y = data
    with torch.no_grad():
        history = [accuracy(forward(test[0]), test[1])]
    if after_epoch is not None:
        after_epoch()
    for _ in range(epochs):
        for i in range(0, len(y), BATCH):
            loss = nn.functional.cross_entropy(forward({k: v[i : i + BATCH] for k, v in x.items()}), y[i : i + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            history.append(accuracy(forward(test[0]), test[1]))
        if after_epoch is not None:
            after_epoch()
    return history


def run(fast: bool = False) -> dict[str, object]:
    """Stage 1 (unimodal ranking) and stage 2 (vanilla vs PDMP); returns every curve the figure draws."""
    n, epochs = (512, 3) if fast else (2048, 10)
    data, test = make_data(n, seed=1), make_data(n, seed=2)

    unimodal: dict[str, list[float]] = {}
    for name in ("audio", "visual"):
        torch.manual_seed(0)
        encoder, head = getattr(Fusion(), name), nn.Linear(HIDDEN, CLASSES)
        unimodal[name] = train(
            lambda b, e=encoder, h=head, m=name: h(e(b[m])),
            sgd([*encoder.parameters(), *head.parameters()]),
            data,
            test,
            epochs,
        )
    # epoch 1 is "early"; index 0 is the untrained model
    ranking = rank_modalities({m: h[1:] for m, h in unimodal.items()}, warn=False)

    fused: dict[str, list[float]] = {}
    ratio: dict[str, list[float]] = {}
    for method in ("vanilla", "PDMP"):
        torch.manual_seed(0)
        model = Fusion()
        opt: torch.optim.Optimizer = sgd(model.parameters())
        if method == "PDMP":
            opt = PDMPOptimizer(opt, {"audio": model.audio, "visual": model.visual}, ranking=ranking, gamma_p=15)
        ratio[method] = []

        def log_ratio(model: Fusion = model, out: list[float] = ratio[method]) -> None:
            with torch.no_grad():
                s = model.contributions(test[0])
            # Eq. 5, w = sum|s_1| / sum|s_2|, with modality 1 = visual (performance-dominant), 2 = audio
            out.append(logit_ratio(s, reference="audio")["visual"].item())

        fused[method] = train(model, opt, data, test, epochs, after_epoch=log_ratio)
    return {"unimodal": unimodal, "ranking": ranking, "fused": fused, "ratio": ratio, "epochs": epochs}


def draw(results: dict[str, object], out_dir: Path) -> Path:
    """One idea, two panels at the docs' column width (1000 px): with PDMP, visual drives the fused logits from the
    first epoch (Eq. 5's ratio w), and the fused model learns faster. The unimodal curves are in the page's text."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(results["epochs"] + 1))
    colors = {"vanilla": "tab:grey", "PDMP": "tab:blue"}
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 12}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
        for method, values in results["ratio"].items():
            left.plot(epochs, values, marker="o", ms=4, color=colors[method])
        left.axhline(1.0, color="black", lw=0.8, ls="--")
        left.text(epochs[-1], 1.04, "visual leads", ha="right", va="bottom", fontsize=11)
        left.text(epochs[-1], 0.96, "audio leads", ha="right", va="top", fontsize=11)
        left.set_yscale("log")
        left.set_ylim(0.35, 3.3)
        left.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.5, 1, 2]))
        left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        left.set(
            title="Who drives the fused logits", xlabel="epoch", ylabel=r"$w = \sum|s_{visual}| / \sum|s_{audio}|$"
        )
        for method, values in results["ratio"].items():  # labels at the lines' ends instead of a legend
            left.annotate(method, (epochs[-1], values[-1]), xytext=(0, 8), textcoords="offset points", ha="right",
                          color=colors[method])  # fmt: skip

        for method, history in results["fused"].items():
            right.plot(epochs, history, marker="o", ms=4, color=colors[method], label=method)
        right.set(title="Fused model", xlabel="epoch", ylabel="test accuracy")
        right.legend(loc="lower right")

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / FIGURE_NAME
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNG")
    parser.add_argument("--fast", action="store_true", help="a smaller run, for tests")
    args = parser.parse_args(argv)
    results = run(fast=args.fast)
    path = draw(results, args.out)
    print(results["ranking"])
    for method in ("vanilla", "PDMP"):
        final_acc, w = results["fused"][method][-1], results["ratio"][method][-1]
        print(f"{method:8s} final test accuracy {final_acc:.3f}, final w {w:.3g}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
