"""Two published balancing baselines, implemented here for the accuracy benchmark (not part of the library).

OGM-GE (Peng et al., CVPR 2022, "Balanced Multimodal Learning via On-the-fly Gradient Modulation"): after
``loss.backward()``, call :meth:`OGMGE.modulate` with each modality's logit contribution; it damps the
gradients of the modality that currently scores higher and adds Gaussian noise (generalisation enhancement):

>>> import torch
>>> ogm_coefficients({"audio": 30.0, "visual": 10.0}, alpha=0.5)
{'audio': 0.23840584404423515, 'visual': 1.0}

UDI-style sequential training (Wang et al., 2025, "Balanced Multimodal Learning: An Unidirectional Dynamic
Interaction Perspective"): train the anchor modality first, then the others guided by it; see
:func:`udi_train`. The paper's code was not published when this was written; what is implemented is stated in
:func:`udi_train`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["OGMGE", "ogm_coefficients", "ogm_scores", "udi_train"]


def ogm_scores(contributions: Mapping[str, Tensor], target: Tensor) -> dict[str, float]:
    """Sum over the batch of each modality's softmax score of the true class (the paper's ``s^u``).

    ``contributions[m]`` are the logits the fused model would output from modality ``m`` alone (for concat
    fusion: ``features_m @ W[:, cols_m].T + b / M``).

    >>> import torch
    >>> ogm_scores({"a": torch.tensor([[9.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}, torch.tensor([0]))
    {'a': 0.9998766183853149, 'v': 0.5}
    """
    with torch.no_grad():
        return {
            m: float(torch.softmax(c.float(), dim=1).gather(1, target[:, None]).sum()) for m, c in contributions.items()
        }


def ogm_coefficients(scores: Mapping[str, float], alpha: float) -> dict[str, float]:
    """OGM's modulation coefficient per modality: ``1 - tanh(alpha * relu(ratio - 1))``.

    ``ratio`` is the modality's score over the mean score of the other modalities (for two modalities, the
    paper's discrepancy ratio ``rho = s^a / s^v``). The dominant modality (ratio > 1) gets a coefficient below
    1, the others get 1. The paper writes ``1 - tanh(alpha * rho)`` for ``rho > 1`` (a jump at ``rho = 1``);
    we use the continuous ``rho - 1`` form, which agrees in spirit and avoids damping two nearly equal
    modalities by ``1 - tanh(alpha)``.

    >>> ogm_coefficients({"a": 1.0, "v": 1.0}, alpha=0.8)
    {'a': 1.0, 'v': 1.0}
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if len(scores) < 2:
        raise ValueError("OGM needs at least two modalities' scores")
    out = {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        ratio = s / max(sum(others) / len(others), 1e-12)
        out[m] = 1.0 - math.tanh(alpha * max(ratio - 1.0, 0.0))
    return out


class OGMGE:
    """OGM-GE gradient modulation for modality encoders; call :meth:`modulate` between backward and step.

    Args:
        groups: modality -> encoder module whose gradients are modulated.
        alpha: modulation strength (the paper's ``alpha``).
        noise: add the GE Gaussian noise, ``N(0, std(grad)^2)``, to each encoder weight gradient (tensors with
            ``ndim >= 2``, mirroring the official code's conv-weights-only noise); ``False`` gives plain OGM.
        generator: a ``torch.Generator`` for the noise (seeded runs stay reproducible).

    >>> import torch
    >>> enc = {"a": torch.nn.Linear(3, 2), "v": torch.nn.Linear(3, 2)}
    >>> ogm = OGMGE(enc, alpha=0.8, noise=False)
    >>> for e in enc.values():
    ...     e(torch.ones(1, 3)).sum().backward()
    >>> ogm.modulate({"a": torch.tensor([[5.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}, torch.tensor([0]))
    {'a': 0.3419925277284306, 'v': 1.0}
    """

    def __init__(
        self,
        groups: Mapping[str, nn.Module],
        alpha: float = 0.8,
        *,
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.groups = dict(groups)
        self.alpha = float(alpha)
        self.noise = noise
        self.generator = generator
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def modulate(self, contributions: Mapping[str, Tensor], target: Tensor) -> dict[str, float]:
        """Scale each encoder's gradients by its coefficient (plus GE noise); returns the coefficients."""
        coeffs = ogm_coefficients(ogm_scores(contributions, target), self.alpha)
        for m, module in self.groups.items():
            for p in module.parameters():
                if p.grad is None:
                    continue
                std = float(p.grad.std()) if p.grad.numel() > 1 else 0.0
                p.grad.mul_(coeffs[m])
                if self.noise and p.grad.ndim >= 2:
                    p.grad.add_(torch.randn(p.grad.shape, generator=self.generator) * (std + 1e-8))
        self.history.append(coeffs)
        return coeffs


def udi_train(
    encoders: Mapping[str, nn.Module],
    head: nn.Module,
    anchor: str,
    anchor_head: nn.Module,
    projectors: Mapping[str, nn.Module],
    batches: Callable[[], Iterable[tuple[dict[str, Tensor], Tensor]]],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    epochs: int,
    *,
    align_weight: float = 1.0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """Train UDI-style: the anchor modality alone first, then the others guided by the frozen anchor.

    What we implemented, from the paper's description ("UDI first trains the anchor modality to convergence,
    then uses its learned representations to guide the other modality via unsupervised loss", with a dynamic
    adjustment of the interaction):

    1. Phase A (first half of ``epochs``): the anchor encoder with its own linear head, cross-entropy only.
    2. Phase B (the rest): the anchor encoder is frozen; the other encoders and the fusion ``head`` (which
       takes the concatenated features, anchor's included) are trained with cross-entropy on the fused logits
       plus ``lambda_t * MSE(projector_m(features_m), features_anchor.detach())`` for every other modality
       ``m``; ``lambda_t = align_weight * (1 - t)`` decays linearly from ``align_weight`` to 0 over phase B
       (our reading of the dynamic adjustment: guidance first, then the task).

    The same number of passes over the data as joint training; the anchor is the performance-dominant
    modality from the modality analysis.

    Args:
        encoders: modality -> encoder; ``head`` maps the concatenation (in ``encoders`` order) to logits.
        anchor_head: linear head for the anchor's own phase-A training.
        projectors: modality (non-anchor) -> map from its features to the anchor's feature size.
        batches: returns a fresh iterable of ``(inputs, target)`` for one epoch.
        make_optimizer: builds an optimizer over the given parameters (called once per phase).
        on_epoch_end: called with the epoch index after every epoch (for evaluation and logging).
    """
    if anchor not in encoders:
        raise ValueError(f"anchor={anchor!r} is not one of the modalities {list(encoders)}")
    if epochs < 2:
        raise ValueError(f"UDI needs epochs >= 2 (one per phase), got {epochs}")
    phase_a = epochs // 2
    ce = nn.functional.cross_entropy
    opt = make_optimizer([*encoders[anchor].parameters(), *anchor_head.parameters()])
    for epoch in range(phase_a):
        for x, y in batches():
            loss = ce(anchor_head(encoders[anchor](x[anchor])), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    for p in encoders[anchor].parameters():
        p.requires_grad_(False)
    others = [m for m in encoders if m != anchor]
    params = [p for m in others for p in (*encoders[m].parameters(), *projectors[m].parameters())]
    opt = make_optimizer([*params, *head.parameters()])
    phase_b = epochs - phase_a
    for i in range(phase_b):
        lam = align_weight * (1.0 - i / phase_b)
        for x, y in batches():
            feats = {m: enc(x[m]) for m, enc in encoders.items()}
            loss = ce(head(torch.cat([feats[m] for m in encoders], dim=1)), y)
            if lam > 0:
                target = feats[anchor].detach()
                for m in others:
                    loss = loss + lam * nn.functional.mse_loss(projectors[m](feats[m]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch_end is not None:
            on_epoch_end(phase_a + i)
    for p in encoders[anchor].parameters():
        p.requires_grad_(True)
