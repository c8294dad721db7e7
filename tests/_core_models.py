"""A tiny two-modality model and data for the core tests (real modules, real autograd)."""

from __future__ import annotations

import torch
from torch import nn


class TwoModal(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.visual = nn.Sequential(nn.Linear(10, 8), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.audio(audio), self.visual(visual)], dim=1))

    def groups(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}


def batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g), torch.randint(3, (n,), generator=g)


def loss_of(model: TwoModal, step: int) -> torch.Tensor:
    audio, visual, y = batch(step)
    return nn.functional.cross_entropy(model(audio, visual), y)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
