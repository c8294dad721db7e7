"""``PDMPReference``: a slow, obviously-right ``PDMPOptimizer`` with the same API, which the tests compare against.

It keeps the optimizer's param groups as you built them and each parameter's modality beside them (nothing is
split), and applies each mode by its definition, one tensor at a time:

* ``"grad"``: every modality gradient multiplied by its gamma, then the bare step;
* ``"lr"``: one bare step per modality, with only that modality's gradients present and every group's ``lr``
  multiplied by its gamma (weight decay divided where :func:`~pdmp_optim.modes.compensates_decay` says so); SGD's
  momentum is kept in standard units, divided by gamma before that step and multiplied back after it;
* ``"update"``: the bare step, then ``p = p_old + gamma * (p - p_old)``.

One bare step per modality is the definition for optimizers whose state is per parameter (torch's); an optimizer
that counts steps per group (pytorch_optimizer's ``group["step"]``, Lookahead's counter) counts them per modality
here, so compare those against the bare optimizer with each group's ``lr`` multiplied by hand instead.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
>>> opt = PDMPReference(torch.optim.SGD([w], lr=0.1), {"audio": [w]}, gammas={"audio": 2.0})
>>> opt.step()
>>> w.detach()
tensor([0.8000, 0.8000, 0.8000])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._mark import ScaleMark
from .coefficients import resolve_gammas
from .modes import compensates_decay, resolve_mode

__all__ = ["PDMPReference"]


class PDMPReference(Optimizer):
    """Same arguments, same results as :class:`~pdmp_optim.PDMPOptimizer`; slow, and its state dict its own."""

    def __init__(self, optimizer: Optimizer, groups: Mapping[str, Any] | None = None,
                 dominant: str | None = None, *, gamma_p: float = 15.0, optimization_dominant: str | None = None,
                 gammas: Mapping[str, float] | None = None, ranking: Any = None, mode: str = "auto",
                 ) -> None:  # fmt: skip
        self.optimizer = optimizer
        self.mode = resolve_mode(optimizer, mode)[0]
        self.modality: dict[Tensor, str] = {}
        for name, spec in (groups or {}).items():
            for p in spec.parameters() if isinstance(spec, nn.Module) else spec:
                self.modality[p] = name
        tags = [group["modality"] for group in optimizer.param_groups if group.get("modality")]
        names = list(dict.fromkeys([*self.modality.values(), *tags]))
        self.gammas = resolve_gammas(names, dominant, gamma_p, optimization_dominant, gammas, ranking)
        self.mark = ScaleMark()
        self.__setstate__({})

    param_groups = property(lambda self: self.optimizer.param_groups)  # type: ignore[assignment]
    state = property(lambda self: self.optimizer.state)  # type: ignore[assignment]
    defaults = property(lambda self: self.optimizer.defaults)  # type: ignore[assignment]

    def params(self) -> Iterator[tuple[Tensor, str | None, float]]:
        """Every parameter once, with its modality (its group's ``"modality"`` tag, else ``groups``') and gamma."""
        seen = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p not in seen:
                    seen.add(p)
                    modality = group.get("modality") or self.modality.get(p)
                    yield p, modality, 1.0 if modality is None else self.gammas[modality]

    @torch.no_grad()
    def scale_grads_(self) -> None:
        """Multiply the gradients not scaled yet by their gamma, and remember them until the step."""
        if self.mode != "grad":
            raise RuntimeError("scale_grads_() is for mode='grad'")
        scaled = set()
        for p, _, gamma in self.params():
            if p.grad is not None and gamma != 1.0 and p not in self.mark.params:
                p.grad.mul_(gamma)
                scaled.add(p)
        self.mark.add(scaled)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if self.mode == "update":
            before = {p: p.detach().clone() for p, _, gamma in self.params() if gamma != 1.0}
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
            with torch.no_grad():
                for p, _, gamma in self.params():
                    if gamma != 1.0:
                        p.copy_(before[p] + gamma * (p - before[p]))
            return loss
        with torch.enable_grad():
            loss = None if closure is None else closure()
        if self.mode == "grad":
            self.scale_grads_()  # (what is not scaled yet)
            self.optimizer.step()
        else:
            for modality in [*dict.fromkeys(m for _, m, _ in self.params() if m is not None), None]:
                self._lr_step(modality)
        self.mark.clear()
        return loss

    def _lr_step(self, modality: str | None) -> None:
        """One bare step of ``modality``'s parameters, with every group's lr multiplied by that modality's gamma."""
        gamma = 1.0 if modality is None else self.gammas[modality]
        mine = [p for p, m, _ in self.params() if m == modality]
        hidden = {p: p.grad for p, m, _ in self.params() if m != modality}
        saved = [(group, group["lr"], group.get("weight_decay")) for group in self.param_groups]
        sgd = type(self.optimizer) is torch.optim.SGD
        try:
            for p in hidden:
                p.grad = None
            for group in self.param_groups:
                group["lr"] = group["lr"] * gamma
                if compensates_decay(self.optimizer, group):
                    group["weight_decay"] = group["weight_decay"] / gamma
            _scale_momentum(self.state, mine, 1 / gamma if sgd else 1.0)
            self.optimizer.step()
            _scale_momentum(self.state, mine, gamma if sgd else 1.0)
        finally:
            for p, grad in hidden.items():
                p.grad = grad
            for group, lr, weight_decay in saved:
                group["lr"] = lr
                if weight_decay is not None:
                    group["weight_decay"] = weight_decay

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mark.clear()
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), "reference_gammas": dict(self.gammas)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.gammas = dict(state_dict.pop("reference_gammas", self.gammas))
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k in ("optimizer", "mode", "modality", "gammas")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "mark": ScaleMark()})  # (torch's: empty hook registries, the hooked step)


def _scale_momentum(state: Any, params: list[Tensor], factor: float) -> None:
    """Multiply SGD's momentum buffers of ``params`` by ``factor``."""
    for p in params if factor != 1.0 else ():
        if state.get(p, {}).get("momentum_buffer") is not None:
            state[p]["momentum_buffer"] = state[p]["momentum_buffer"] * factor
