"""The one model, its data and the comparisons that the tests share (real modules, real autograd).

The reference every test compares against is :class:`pdmp_optim.reference.PDMPReference`, the slow twin of
``PDMPOptimizer`` with the same API: build both with :func:`pair` and step them side by side.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import PDMPReference

GAMMAS = {"audio": 1 / 15, "visual": 15.0}  # what dominant="visual" (gamma_p=15) gives two modalities

Batch = tuple[Tensor, Tensor, Tensor]


class TwoModal(nn.Module):
    """Late fusion by concatenation: ``head(cat(audio(x_audio) + sum(extras(x_audio)), visual(x_visual)))``.

    The audio encoder has two layers (4 tensors, 128 parameters), the visual one a single layer (2 tensors, 88
    parameters) and the head 2 tensors (51 parameters), so that per-modality counts and state-dict ids differ.
    ``extras`` are further audio layers, outside ``groups()`` and ``trained()``, for tests that add parameters later
    (``add_param_group({"params": ..., "modality": "audio"})``).
    """

    def __init__(self, seed: int = 0, extras: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed also seeds every lazy device: slow)
            self.audio = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
            self.visual = nn.Sequential(nn.Linear(10, 8), nn.Tanh())
            self.head = nn.Linear(16, 3)
            self.extras = nn.ModuleList(nn.Linear(6, 8) for _ in range(extras))

    def forward(self, audio: Tensor, visual: Tensor) -> Tensor:
        a = self.audio(audio)
        for extra in self.extras:
            a = a + extra(audio)
        return self.head(torch.cat([a, self.visual(visual)], dim=1))

    def groups(self) -> dict[str, nn.Module]:
        """The ``groups=`` argument of ``PDMPOptimizer``."""
        return {"audio": self.audio, "visual": self.visual}

    def trained(self) -> list[Tensor]:
        """The parameters an optimizer is built over: everything but the extras (added later)."""
        return [*self.audio.parameters(), *self.visual.parameters(), *self.head.parameters()]

    def modality_params(self) -> dict[str, list[Tensor]]:
        """Each modality's parameters."""
        return {"audio": [*self.audio.parameters(), *self.extras.parameters()], "visual": [*self.visual.parameters()]}


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


def pair(
    optimizer: type[torch.optim.Optimizer], settings: Mapping[str, Any], *, extras: int = 0, **pdmp: Any
) -> tuple[TwoModal, PDMPOptimizer, TwoModal, PDMPReference]:
    """Two identical models, one wrapped by ``PDMPOptimizer``, one by ``PDMPReference``, built with the same
    arguments (``pdmp`` defaults to ``gammas=GAMMAS``)."""
    pdmp = pdmp or {"gammas": GAMMAS}
    fast_model, ref_model = TwoModal(extras=extras), TwoModal(extras=extras)
    fast = PDMPOptimizer(optimizer(fast_model.trained(), **settings), fast_model.groups(), **pdmp)
    ref = PDMPReference(optimizer(ref_model.trained(), **settings), ref_model.groups(), **pdmp)
    return fast_model, fast, ref_model, ref


def assert_same_params(a: nn.Module, b: nn.Module, **tolerance: float) -> None:
    """Every parameter of ``a`` equals ``b``'s, bit for bit unless a ``rtol``/``atol`` is given (the message names
    the first that does not)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if tolerance:
            torch.testing.assert_close(p, q, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(p, q), f"{name} differs: max |diff| = {(p - q).abs().max().item():.3g}"


def standard_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each parameter's optimizer state by parameter name, SGD's momentum in standard units (as a plain optimizer
    keeps it): what a ``PDMPOptimizer`` and a ``PDMPReference`` of the same run must agree on."""
    scale = {p: g.get("pdmp_momentum_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        entry = dict(opt.state.get(p, {}))
        if entry.get("momentum_buffer") is not None:
            entry["momentum_buffer"] = entry["momentum_buffer"] * scale.get(p, 1.0)
        out[name] = entry
    return out


def reference_scale_grads(model: TwoModal, gammas: Mapping[str, float] = GAMMAS) -> None:
    """Multiply each modality's gradients by its gamma, one tensor at a time (for reference loops that clip or let a
    ``GradScaler`` step between the multiply and the step)."""
    with torch.no_grad():
        for modality, params in model.modality_params().items():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(gammas[modality])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
