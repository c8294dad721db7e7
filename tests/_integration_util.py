"""Shared tiny two-modality model, data and reference helpers for the integration tests."""

from __future__ import annotations

import socket

import torch
from torch import Tensor, nn

GAMMAS = {"audio": 1 / 15, "visual": 15.0}


class TwoModality(nn.Module):
    """Late fusion by concatenation: ``head(cat(relu(audio(x_a)), relu(visual(x_v))))``."""

    def __init__(self, d_audio: int = 4, d_visual: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.audio = nn.Linear(d_audio, hidden)
        self.visual = nn.Linear(d_visual, hidden)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x_audio: Tensor, x_visual: Tensor) -> Tensor:
        return self.head(torch.cat([torch.relu(self.audio(x_audio)), torch.relu(self.visual(x_visual))], dim=1))


def make_model(seed: int = 0, **kwargs: int) -> TwoModality:
    torch.manual_seed(seed)
    return TwoModality(**kwargs)


def make_batches(steps: int, batch: int = 8, seed: int = 1) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``steps`` batches of (x_audio, x_visual, y) from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 4, generator=g),
            torch.randn(batch, 6, generator=g),
            torch.randint(3, (batch,), generator=g),
        )
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    x_a, x_v, y = batch
    return nn.functional.cross_entropy(model(x_a, x_v), y)


def groups(model: TwoModality) -> dict[str, nn.Module]:
    return {"audio": model.audio, "visual": model.visual}


def modality_params(model: TwoModality) -> dict[str, list[Tensor]]:
    return {"audio": list(model.audio.parameters()), "visual": list(model.visual.parameters())}


def scale_grads_reference(model: TwoModality, gammas: dict[str, float] = GAMMAS) -> None:
    """Multiply each modality's gradients by its gamma, one tensor at a time (the obviously-right way)."""
    with torch.no_grad():
        for modality, params in modality_params(model).items():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(gammas[modality])


def assert_same_params(a: nn.Module, b: nn.Module, exact: bool = True, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), f"{name} differs: max |diff| = {(p - q).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
