"""Train a tiny two-modality model on generated data with and without PDMP.

The data are built so that "audio" learns fast but is capped (the optimization-dominant modality) and
"visual" learns slowly but ends higher (the performance-dominant one). Run: python examples/demo.py
"""

from __future__ import annotations

import torch
from torch import nn

from pdmp_optim import PDMPOptimizer, rank_modalities

CLASSES, N_TRAIN, N_TEST = 4, 2048, 2048


def make_data(n: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    y = torch.randint(CLASSES, (n,), generator=generator)
    # audio: a strong, easy cue, but only for 60% of samples (the rest is a random class)
    shown = torch.where(torch.rand(n, generator=generator) < 0.6, y, torch.randint(CLASSES, (n,), generator=generator))
    audio = 3.0 * nn.functional.one_hot(shown, CLASSES).float() + torch.randn(n, CLASSES, generator=generator)
    # visual: a weak cue spread over 32 dimensions, present for every sample: slow to learn, ends higher
    means = torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(0))
    visual = 0.3 * means[y] + torch.randn(n, 32, generator=generator)
    return {"audio": audio, "visual": visual}, y


class Fusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(CLASSES, 32), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.audio(x["audio"]), self.visual(x["visual"])], dim=1))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def train(model: nn.Module, opt: torch.optim.Optimizer, data, y, forward, epochs: int) -> list[float]:
    history = []
    for _ in range(epochs):
        for i in range(0, N_TRAIN, 64):
            batch = {k: v[i : i + 64] for k, v in data.items()}
            loss = nn.functional.cross_entropy(forward(batch), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            history.append(accuracy(forward(test_x), test_y))
    return history


def sgd(params) -> torch.optim.SGD:  # the paper's optimizer settings
    return torch.optim.SGD(params, lr=5e-3, momentum=0.9, weight_decay=1e-4)


torch.manual_seed(0)
train_x, train_y = make_data(N_TRAIN, torch.Generator().manual_seed(1))
test_x, test_y = make_data(N_TEST, torch.Generator().manual_seed(2))

# Stage 1: modality analysis with one unimodal model (encoder + linear head) per modality.
histories = {}
for name in ("audio", "visual"):
    enc, head = getattr(Fusion(), name), nn.Linear(32, CLASSES)
    histories[name] = train(
        enc,
        sgd([*enc.parameters(), *head.parameters()]),
        train_x,
        train_y,
        lambda b, e=enc, h=head, n=name: h(e(b[n])),
        8,
    )
ranking = rank_modalities(histories)
print(ranking)
print("gammas:", ranking.gammas(gamma_p=15))

# Stage 2: joint training, vanilla vs PDMP, same initialisation.
results = {}
for method in ("vanilla", "PDMP"):
    torch.manual_seed(0)
    model = Fusion()
    opt = sgd(model.parameters())
    if method == "PDMP":
        opt = PDMPOptimizer(opt, {"audio": model.audio, "visual": model.visual}, ranking=ranking, gamma_p=15)
    results[method] = train(model, opt, train_x, train_y, model, 8)[-1]
    print(f"{method:8s} test accuracy: {results[method]:.3f}")
