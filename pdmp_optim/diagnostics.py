"""Cheap readouts for watching modality imbalance during training.

Both helpers return tensors and never call ``.item()``: nothing waits for the device until *you* read a
value (``float(t)``, ``t.item()``, or a logger that does so). Compute them only on the steps you log.

>>> import torch
>>> from torch import nn
>>> from pdmp_optim import PDMPOptimizer
>>> audio, visual, head = nn.Linear(4, 8), nn.Linear(6, 8), nn.Linear(16, 3)
>>> params = [*audio.parameters(), *visual.parameters(), *head.parameters()]
>>> opt = PDMPOptimizer(torch.optim.SGD(params, lr=0.1), {"audio": audio, "visual": visual}, dominant="visual")
>>> h_a, h_v = audio(torch.randn(5, 4)), visual(torch.randn(5, 6))
>>> s_a, s_v = h_a @ head.weight[:, :8].T, h_v @ head.weight[:, 8:].T  # each modality's share of the logits
>>> w = logit_ratio({"audio": s_a, "visual": s_v})  # the paper's w = sum|s_audio| / sum|s_visual|
>>> bool(torch.allclose(w["audio"], s_a.abs().sum() / s_v.abs().sum()))
True
>>> head(torch.cat([h_a, h_v], dim=1)).sum().backward()
>>> before = modality_grad_norms(opt)
>>> opt.scale_grads_()
>>> after = modality_grad_norms(opt)
>>> bool(torch.allclose(after["visual"], 15 * before["visual"]))
True
>>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._checks import check_modalities
from .optimizer import PDMPOptimizer

__all__ = ["logit_ratio", "modality_grad_norms"]


def logit_ratio(logits_by_modality: Mapping[str, Tensor], reference: str | None = None) -> dict[str, Tensor]:
    """Return each modality's optimization-dependency ratio ``w`` (the paper's Eq. 5), as 0-dim tensors.

    >>> import torch
    >>> s1, s2 = torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    >>> {m: round(float(v), 3) for m, v in logit_ratio({"audio": s1, "visual": s2}).items()}
    {'audio': 2.0, 'visual': 0.5}
    >>> s3 = torch.tensor([[2.0, 0.0]])
    >>> {m: round(float(v), 3) for m, v in logit_ratio({"a": s1, "v": s2, "t": s3}, reference="v").items()}
    {'a': 2.0, 't': 1.0}

    Pass each modality's contribution ``s_m`` to the fused logits (for a linear head over concatenated
    features, ``s_m = h_m @ W[:, cols_m].T``: the head's columns that read modality ``m``). The paper's
    two-modality ratio is ``w = sum|s_1| / sum|s_2|``; ``w > 1`` means the model leans on modality 1.

    For any number of modalities this returns, for every modality ``m``::

        w[m] = sum|s_m| / sum_{k != m} sum|s_k|      (reference=None: m against all the others together)
        w[m] = sum|s_m| / sum|s_reference|            (reference given: m against that one modality)

    With two modalities both forms give the paper's ``w`` for the first (and ``1/w`` for the second when
    ``reference`` is ``None``). ``w[m] > 1`` with ``reference=None`` means modality ``m`` outweighs all the
    others combined. The sums are taken in float32 without gradients; nothing syncs with the device.

    Raises:
        TypeError: ``logits_by_modality`` is not a mapping of tensors, or a name is not a non-empty string.
        ValueError: fewer than two modalities, or ``reference`` is not one of them.
    """
    names = check_modalities(logits_by_modality, "logits_by_modality", "a logits tensor", Tensor)
    if reference is not None and reference not in names:
        raise ValueError(f"reference={reference!r} is not one of the modalities {names}")
    with torch.no_grad():
        device = logits_by_modality[names[0]].device
        sums = torch.stack([logits_by_modality[m].abs().sum(dtype=torch.float32).to(device) for m in names])
        ratios = sums / ((sums.sum() - sums) if reference is None else sums[names.index(reference)])
    return {m: r for m, r in zip(names, ratios.unbind(), strict=True) if m != reference}


def modality_grad_norms(opt: PDMPOptimizer, include_shared: bool = False) -> dict[str | None, Tensor]:
    """Return the L2 norm of each modality's current gradients, as 0-dim tensors (computed now, on demand).

    >>> import torch
    >>> enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    >>> opt = PDMPOptimizer(torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1),
    ...                     {"audio": enc}, gammas={"audio": 2.0})
    >>> head(enc(torch.ones(1, 2))).sum().backward()
    >>> before = modality_grad_norms(opt, include_shared=True)
    >>> sorted(before, key=str)
    [None, 'audio']
    >>> opt.scale_grads_()
    >>> bool(torch.allclose(modality_grad_norms(opt)["audio"], 2 * before["audio"]))
    True

    Call it before and after :meth:`~pdmp_optim.PDMPOptimizer.scale_grads_` to see the gradients the loss
    produced and the ones the inner optimizer will use. Each modality costs one ``torch._foreach_norm`` per
    (device, dtype) of its dense gradients; there is no ``.item()`` inside. A sparse gradient (e.g. from
    ``nn.Embedding(sparse=True)``) counts with the norm of its coalesced values (coalescing an uncoalesced
    one is the only step that may wait for the device). Parameters without a
    gradient are skipped; a modality with none reads 0. With ``include_shared=True`` the parameters PDMP
    leaves untouched (fusion, head) are reported under the key ``None``.

    In ``mode="lr"`` the coefficient lives in the learning rate: the gradients, and so this readout, stay as
    ``backward()`` left them. Under FSDP2 the gradients are DTensor shards and each norm is a
    DTensor: read it with ``.full_tensor()``.

    Raises:
        TypeError: ``opt`` is not a :class:`~pdmp_optim.PDMPOptimizer`.
    """
    if not isinstance(opt, PDMPOptimizer):
        raise TypeError(
            f"modality_grad_norms needs a PDMPOptimizer (it reads the modality groups), got {type(opt).__name__}"
        )
    return {m: _total_norm(params) for m, params in opt.params_by_modality().items() if m is not None or include_shared}


@torch.no_grad()
def _total_norm(params: list[Tensor]) -> Tensor:
    """The L2 norm of the gradients of ``params`` viewed as one vector, on the first gradient's device, without a
    host sync (0 without gradients).

    Dense gradients (DTensor shards included) go through one ``torch._foreach_norm`` per (device, dtype);
    a sparse gradient contributes the norm of its coalesced values (duplicate indices summed first).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        if g.layout != torch.strided:  # a sparse gradient counts with its values
            g = g.coalesce().values() if g.layout == torch.sparse_coo else g.values()
        buckets.setdefault((g.device, g.dtype), []).append(g)
    norms: list[Tensor] = []
    for (device, _), tensors in buckets.items():
        foreach = device.type in ("cpu", "cuda")  # a _foreach_norm kernel in every supported torch; others: one by one
        norms.extend(torch._foreach_norm(tensors) if foreach else [torch.linalg.vector_norm(t) for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
