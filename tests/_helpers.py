"""The tiny two-modality model, its data and the reference loop that the tests share (real modules, real autograd).

The reference is :mod:`pdmp_optim.reference`, the slow twin of the optimizer: tests step a plain optimizer with
``reference_grad_step`` / ``reference_lr_step`` / ``reference_update_step`` and compare. :func:`reference_scale_grads`
is ``reference_grad_step`` without its step, for loops that clip or let a ``GradScaler`` step in between.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import Tensor, nn

#from pdmp_optim.reference import reference_grad_step

GAMMAS = {"audio": 1 / 15, "visual": 15.0}  # what dominant="visual" (gamma_p=15) gives two modalities

Batch = tuple[Tensor, Tensor, Tensor]


class TwoModal(nn.Module):
    """Late fusion by concatenation: ``head(cat(audio(x_audio), visual(x_visual)))``.

    The audio encoder has two layers (4 tensors, 128 parameters), the visual one a single layer (2 tensors, 88
    parameters) and the head 2 tensors (51 parameters), so that per-modality counts and state-dict ids differ.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.visual = nn.Sequential(nn.Linear(10, 8), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, audio: Tensor, visual: Tensor) -> Tensor:
        return self.head(torch.cat([self.audio(audio), self.visual(visual)], dim=1))

    def groups(self) -> dict[str, nn.Module]:
        """The ``groups=`` argument of ``PDMPOptimizer``."""
        return {"audio": self.audio, "visual": self.visual}

    def modality_params(self) -> dict[str, list[Tensor]]:
        """The ``params`` argument of the ``pdmp_optim.reference`` functions."""
        return {name: list(module.parameters()) for name, module in self.groups().items()}


def batch(step: int, n: int = 8) -> Batch:
    """Batch number ``step``, ``(x_audio, x_visual, y)``: the same for a given ``(step, n)`` in every test."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g), torch.randint(3, (n,), generator=g)


def make_batches(steps: int, n: int = 8) -> list[Batch]:
    """Batches ``0 .. steps - 1``."""
    return [batch(step, n) for step in range(steps)]


def loss_fn(model: nn.Module, data: Batch) -> Tensor:
    x_audio, x_visual, y = data
    return nn.functional.cross_entropy(model(x_audio, x_visual), y)


def loss_of(model: nn.Module, step: int) -> Tensor:
    """The loss on batch number ``step``."""
    return loss_fn(model, batch(step))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    """Every parameter of ``a`` equals ``b``'s bit for bit (the message names the first that does not)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs: max |diff| = {(p - q).abs().max().item():.3g}"


_NO_STEP = SimpleNamespace(step=lambda: None)


def reference_scale_grads(model: TwoModal, gammas: Mapping[str, float] = GAMMAS) -> None:
    """Multiply each encoder's gradients by its gamma, one tensor at a time: ``reference_grad_step`` without the step.

    For reference loops that clip, unscale or let a ``GradScaler`` step between the multiply and the step; where
    the step follows at once, call ``reference_grad_step(opt, model.modality_params(), gammas)`` itself.
    """
    reference_grad_step(_NO_STEP, model.modality_params(), gammas)  # type: ignore[arg-type]  # only .step() is used


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
