"""Stateful test: a PDMPOptimizer and its obviously-right twin trained side by side through every seam of a loop.

Two identical :class:`~_helpers.TwoModal` models (with two extra audio layers, frozen and outside the optimizer
until a rule unfreezes one and adds it with ``add_param_group({..., "modality": "audio"})``) are trained together:
one through :class:`~pdmp_optim.PDMPOptimizer`, one through :class:`~pdmp_optim.reference.PDMPReference`, which
keeps the groups as the user built them and applies each mode by its definition, one tensor at a time. Both get the
same calls. Four machines: SGD (momentum, weight decay) in grad mode and in lr mode, AdamW in lr mode (auto) and in
update mode; each draws the user's layout (one group, one with the modalities interleaved, one group per module).

Hypothesis interleaves backward passes (accumulating or not), steps (plain, and with a closure that may call
``scale_grads_()`` itself), ``zero_grad`` (both ``set_to_none`` values, through the optimizer and through the model),
``scale_grads_()`` with and without clipping and with out-of-place gradient edits after it, whole plain and
``GradScaler`` iterations (micro-batches, maybe an inf, ``scale_grads_()`` before or after the unscale, clipping),
scheduler steps, checkpoints (the wrapper's and the inner optimizer's state dicts, loaded in place or through
``torch.save``/``torch.load(weights_only=True)`` into freshly built models, optimizers and schedulers; each side saves
and loads its own format), deepcopy/pickle/``torch.save`` of the whole training state, ``add_param_group`` on the
wrapper or on the inner optimizer, ``param_groups`` reassigned (copies of the groups, or fresh groups in the user's
layout) and gamma changes. After every rule, per parameter (not by group layout): the values, gradients,
``standard_state``, the settings its group holds (lr, weight decay, ...) and its group's modality and gamma, and the
gammas, scheduler position and loss scale must agree: bit for bit in grad mode and AdamW's lr mode, to a measured
tolerance in SGD's lr mode and in update mode (whose references round differently).

What the machine models on its own, not from either optimizer: which gradients ``scale_grads_()`` marked, so that a
backward adding to marked non-zero gradients must raise, a copy between ``scale_grads_()`` and ``step()`` must raise,
a step ``GradScaler`` skips must change nothing and keep the mark, and ``scale_grads_()`` must raise outside grad mode.
The shortest failing sequences found are replayed as plain tests at the end, with the core bugs found (xfail).
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from _helpers import TwoModal, loss_of, standard_state
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor, nn

from pdmp_optim import PDMPOptimizer
from pdmp_optim._groups import GAMMA, SPLIT_KEY, UNITS
from pdmp_optim.reference import PDMPReference

EXTRAS = 2
MAX_ACCUMULATION = 4  # backward passes into the same gradients
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
}
GAMMA_VALUES = [1 / 15, 0.5, 1.0, 2.0, 15.0]
GAMMAS = st.fixed_dictionaries({"audio": st.sampled_from(GAMMA_VALUES), "visual": st.sampled_from(GAMMA_VALUES)})
CLIP = st.sampled_from([None, 0.05, 1.0])
PDMP_KEYS = ("modality", GAMMA, SPLIT_KEY, UNITS)  # what PDMP keeps in a param group


def modality_of(name: str) -> str | None:
    """What ``groups=`` (audio, visual) and the extras' tag (audio) make of parameter ``name``."""
    return {"audio": "audio", "extras": "audio", "visual": "visual"}.get(name.split(".")[0])


def base_layout(layout: str, lr: float) -> list[dict[str, Any]]:
    """The user's param groups, as parameter names and settings: one group, one in an interleaved order (the split
    must keep positions), or one per module with the head at half the lr."""
    names = {m: [f"{m}.{n}" for n, _ in getattr(TwoModal(), m).named_parameters()] for m in ("audio", "visual", "head")}
    if layout == "split":
        return [{"names": names["audio"]}, {"names": names["visual"]}, {"names": names["head"], "lr": lr / 2}]
    if layout == "interleaved":
        a, v, h = names["audio"], names["visual"], names["head"]
        return [{"names": [a[0], v[0], h[0], a[1], v[1], a[2], h[1], a[3]]}]
    return [{"names": [*names["audio"], *names["visual"], *names["head"]]}]


def built(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """The param group ``spec`` describes, over ``model``'s parameters."""
    params = dict(model.named_parameters())
    return {**{k: v for k, v in spec.items() if k != "names"}, "params": [params[n] for n in spec["names"]]}


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def make_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)  # the scale moves both ways in a run


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages.extend(sorted({f"{w.category.__name__}: {w.message}" for w in caught}))


@dataclass
class Run:
    """One side of the twin: model, optimizer, scheduler and loss scaler."""

    model: TwoModal
    opt: Any  # PDMPOptimizer or PDMPReference
    sched: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler


# ------------------------------------------------------------------------------------------- comparisons
def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def agree(a: Tensor, b: Tensor, tolerance: dict[str, float] | None, what: str) -> None:
    """``a`` (PDMPOptimizer's) equals ``b`` (the reference's): bit for bit, or to ``tolerance`` (``rtol``, ``atol``)."""
    a, b = a.detach(), b.detach()
    if tolerance is None or not a.is_floating_point():
        if not _same_bits(a, b):
            diff = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item() if a.shape == b.shape else "?"
            raise AssertionError(f"{what} differs from the reference (max abs diff {diff}, exact comparison)")
    else:
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what} differs from the reference: {m}",
                                   **tolerance)  # fmt: skip


# ----------------------------------------------------------------------------------------------- machine
class TwinMachine(RuleBasedStateMachine):
    """Drives a PDMPOptimizer run and a PDMPReference run through one training loop and compares after each rule."""

    OPT = "SGD"
    MODE = "grad"  # the mode
    AUTO = True  # whether mode="auto" picks it (then either is drawn)
    TOLERANCE: ClassVar[dict[str, float] | None] = None  # bit for bit

    @initialize(auto=st.booleans(), layout=st.sampled_from(["single", "interleaved", "split"]), gammas=GAMMAS)
    def setup(self, auto: bool, layout: str, gammas: dict[str, float]) -> None:
        self.mode_arg = "auto" if auto and self.AUTO else self.MODE
        self.gammas, self.initial_gammas = dict(gammas), dict(gammas)
        self.layout = base_layout(layout, OPTIMIZERS[self.OPT][1]["lr"])  # the user's groups at build time
        self.added: list[tuple[dict[str, Any], str]] = []  # groups added since, and through which optimizer
        self.n_extras = 0  # extras in training
        self.batches = 0
        self.marked: set[str] = set()  # parameters whose gradients scale_grads_() scaled (the mark)
        self.poisoned = False  # the gradients hold an inf from a step GradScaler skipped
        self.steps_on_grads, self.backwards = 0, 0  # a realistic loop zeroes after a step, accumulates a few
        self.fast = self._build(seed=0, reference=False, gammas=self.gammas)
        self.ref = self._build(seed=0, reference=True, gammas=self.gammas)
        assert self.fast.opt.mode == self.ref.opt.mode == self.MODE, (
            f"mode={self.mode_arg!r} gave {self.fast.opt.mode!r}"
        )

    def _build(self, seed: int, reference: bool, gammas: dict[str, float], model: TwoModal | None = None) -> Run:
        model = model or TwoModal(seed=seed, extras=EXTRAS)
        for i, extra in enumerate(model.extras):
            extra.requires_grad_(i < self.n_extras)
        cls, kwargs = OPTIMIZERS[self.OPT]
        inner = cls([built(model, spec) for spec in self.layout], **kwargs)
        alike = len(set(gammas.values())) == 1 and set(gammas.values()) != {1.0}  # a common multiplier: PDMP says so
        with pytest.warns(UserWarning, match="no modality is prioritised") if alike else contextlib.nullcontext():
            opt = (PDMPReference if reference else PDMPOptimizer)(
                inner, model.groups(), gammas=gammas, mode=self.mode_arg
            )
        for spec, via in self.added:
            (opt if via == "wrapper" else opt.optimizer).add_param_group(built(model, spec))
        return Run(model, opt, make_scheduler(opt), make_scaler())

    @property
    def runs(self) -> tuple[Run, Run]:
        return self.fast, self.ref

    def _next_batch(self) -> int:
        self.batches += 1
        return self.batches

    def _trained(self) -> dict[str, Tensor]:
        """The reference's parameters in its optimizer, by name."""
        owned = {p for group in self.ref.opt.param_groups for p in group["params"]}
        return {name: p for name, p in self.ref.model.named_parameters() if p in owned}

    # --------------------------------------------------------------------------------------------- invariant
    @invariant()
    def runs_agree(self) -> None:
        fast, ref = self.fast.opt, self.ref.opt
        assert fast.param_groups is fast.optimizer.param_groups and fast.state is fast.optimizer.state
        gammas = dict(fast.gammas)
        assert gammas == ref.gammas == self.gammas, f"gammas {gammas}, reference {ref.gammas}, set {self.gammas}"
        group_f = {p: g for g in fast.param_groups for p in g["params"]}
        group_r = {p: g for g in ref.param_groups for p in g["params"]}
        state_f, state_r = standard_state(fast, self.fast.model), standard_state(ref, self.ref.model)
        named = zip(self.fast.model.named_parameters(), self.ref.model.parameters(), strict=True)
        for (name, p), q in named:
            agree(p, q, self.TOLERANCE, f"parameter {name}")
            assert (p.grad is None) == (q.grad is None), f"{name}.grad is None on one side only"
            if p.grad is not None:
                agree(p.grad, q.grad, self.TOLERANCE, f"{name}.grad")
            assert (p in group_f) == (q in group_r), f"{name} is in one optimizer only"
            if q in group_r:
                settings_f = {k: v for k, v in group_f[p].items() if k not in ("params", "param_names", *PDMP_KEYS)}
                settings_r = {k: v for k, v in group_r[q].items() if k not in ("params", "param_names", "modality")}
                assert settings_f == settings_r, f"param group of {name}: {settings_f} != {settings_r}"
                if GAMMA in group_f[p]:  # adopted (groups added or reassigned are at the next entry point)
                    modality = modality_of(name)
                    assert group_f[p]["modality"] == modality, f"{name} in a group of {group_f[p]['modality']!r}"
                    assert group_f[p][GAMMA] == gammas.get(modality, 1.0), f"{name}: gamma {group_f[p][GAMMA]}"
            assert set(state_f[name]) == set(state_r[name]), f"state of {name}: {state_f[name]} != {state_r[name]}"
            for key, value in state_r[name].items():
                if isinstance(value, Tensor):
                    agree(state_f[name][key], value, self.TOLERANCE, f"state[{name}][{key!r}]")
                else:
                    assert state_f[name][key] == value, f"state[{name}][{key!r}]: {state_f[name][key]} != {value}"
        assert self.fast.sched.last_epoch == self.ref.sched.last_epoch
        assert self.fast.scaler.get_scale() == self.ref.scaler.get_scale()

    # ---------------------------------------------------------------------------------------------- backward
    def _backward(self, amp: bool = False) -> bool:
        """Forward and backward a new batch on both sides (``amp``: through the scalers); ``False`` if refused.

        A backward that reaches marked gradients ends the mark; it raises if any of them is non-zero (it would add
        unscaled gradient to scaled), and the way on is to zero the gradients.
        """
        index = self._next_batch()
        params = self._trained()
        refused = any(params[n].grad is not None and bool(params[n].grad.any()) for n in self.marked)
        self.marked = set()
        for run in self.runs:
            loss = loss_of(run.model, index)
            loss = run.scaler.scale(loss) if amp else loss
            if refused:
                with pytest.raises(RuntimeError, match=r"scale_grads_\(\) already scaled"):
                    loss.backward()
                run.opt.zero_grad()
            else:
                loss.backward()
        if refused:
            self.steps_on_grads, self.backwards = 0, 0
        return not refused

    @precondition(lambda self: not self.poisoned and self.steps_on_grads == 0 and self.backwards < MAX_ACCUMULATION)
    @rule(scale_first=st.booleans())
    def backward(self, scale_first: bool) -> None:
        """Forward and backward a new batch, accumulating into the gradients there (a micro-batch). ``scale_first``
        calls ``scale_grads_()`` before it, too early (accumulation not over): refused if scaled gradients are there."""
        if scale_first:
            self._scale_grads()
        if self._backward():
            self.backwards += 1

    # ---------------------------------------------------------------------------------------------- stepping
    @rule(micro_batches=st.integers(1, 2), scale=st.booleans(), clip=CLIP)
    def iteration(self, micro_batches: int, scale: bool, clip: float | None) -> None:
        """A whole plain iteration: ``opt.zero_grad()``, backward(s), maybe ``scale_grads_()`` and clip, step."""
        self._zero_grad("optimizer", set_to_none=True)
        for _ in range(micro_batches):
            assert self._backward()
        if scale:
            self._scale_grads()
        if clip is not None:
            self._clip(clip)
        for run in self.runs:
            run.opt.step()
        self.marked, self.steps_on_grads, self.backwards = set(), 1, micro_batches

    @precondition(lambda self: not self.poisoned and self.steps_on_grads < 2)
    @rule(closure=st.sampled_from([None, "plain", "scaling"]), clip=CLIP)
    def step(self, closure: str | None, clip: float | None) -> None:
        """``opt.step()`` (at most twice on the same gradients: grad mode multiplies them in place each time), or
        ``opt.step(closure)`` whose closure zeroes through the optimizer, runs a backward and (``"scaling"``, grad
        mode) calls ``scale_grads_()`` and maybe clips: the step must not scale again."""
        if closure is None:
            for run in self.runs:
                assert run.opt.step() is None
            self.marked = set()
            self.steps_on_grads += 1
            return
        index, scaling = self._next_batch(), closure == "scaling" and self.MODE == "grad"
        losses = []
        for run in self.runs:

            def evaluate(run: Run = run) -> Tensor:
                run.opt.zero_grad()
                loss = loss_of(run.model, index)
                loss.backward()
                if scaling:
                    run.opt.scale_grads_()
                    if clip is not None:
                        nn.utils.clip_grad_norm_(run.model.parameters(), clip)
                return loss

            losses.append(run.opt.step(evaluate))
        agree(*losses, self.TOLERANCE, "the closure's loss")
        self.marked, self.steps_on_grads, self.backwards = set(), 1, 1

    @rule(via=st.sampled_from(["optimizer", "model"]), set_to_none=st.booleans())
    def zero_grad(self, via: str, set_to_none: bool) -> None:
        self._zero_grad(via, set_to_none)

    def _zero_grad(self, via: str, set_to_none: bool) -> None:
        """Through the optimizer (which forgets the mark) or the model (the next backward tells the optimizer)."""
        for run in self.runs:
            (run.opt if via == "optimizer" else run.model).zero_grad(set_to_none=set_to_none)
        if via == "optimizer":
            self.marked = set()
        self.poisoned, self.steps_on_grads, self.backwards = False, 0, 0

    @precondition(lambda self: not self.poisoned)
    @rule(clip=CLIP, edit=st.sampled_from([None, "halve", "clone", "drop_visual"]))
    def scale_grads(self, clip: float | None, edit: str | None) -> None:
        """``scale_grads_()``, then maybe clip (in place) and an out-of-place edit (``p.grad = p.grad / 2``, a copy,
        ``None``): the mark holds whichever tensor is there, and the step that follows must not multiply again."""
        self._scale_grads()
        if clip is not None:
            self._clip(clip)
        for run in self.runs:
            for name, p in run.model.named_parameters():
                if p.grad is not None and edit is not None:
                    if edit == "halve":
                        p.grad = p.grad / 2
                    elif edit == "clone":
                        p.grad = p.grad.clone()
                    elif name.startswith("visual"):
                        p.grad = None

    def _scale_grads(self) -> None:
        if self.MODE != "grad":
            for run in self.runs:
                with pytest.raises(RuntimeError, match="mode='grad'"):
                    run.opt.scale_grads_()
            return
        for name, p in self._trained().items():
            modality = modality_of(name)
            if p.grad is not None and modality is not None and self.gammas[modality] != 1.0:
                self.marked.add(name)
        for run in self.runs:
            run.opt.scale_grads_()

    def _clip(self, max_norm: float) -> None:
        norms = [nn.utils.clip_grad_norm_(run.model.parameters(), max_norm) for run in self.runs]
        agree(*norms, self.TOLERANCE, "the clipped total norm")

    @rule(
        zero_via=st.sampled_from(["optimizer", "model"]),
        set_to_none=st.booleans(),
        micro_batches=st.integers(1, 2),
        inf_in=st.sampled_from([None, "audio", "head"]),
        pre_scale=st.sampled_from([None, "after_unscale", "before_unscale"]),
        clip=CLIP,
    )
    def amp_iteration(
        self, zero_via: str, set_to_none: bool, micro_batches: int, inf_in: str | None, pre_scale: str | None,
        clip: float | None,
    ) -> None:  # fmt: skip
        """One ``GradScaler`` iteration: zero, backward(s), maybe an inf, unscale, maybe ``scale_grads_()`` and clip,
        step, update. A skipped step neither applies nor forgets anything."""
        self._zero_grad(zero_via, set_to_none)
        for _ in range(micro_batches):
            assert self._backward(amp=True), "a backward after zero_grad must be accepted"
        if inf_in is not None:
            for run in self.runs:
                grad = run.model.audio[0].weight.grad if inf_in == "audio" else run.model.head.bias.grad
                grad.view(-1)[0] = float("inf")
        if pre_scale == "before_unscale":
            self._scale_grads()
        for run in self.runs:
            run.scaler.unscale_(run.opt)
        finite = all(bool(p.grad.isfinite().all()) for p in self._trained().values() if p.grad is not None)
        assert finite == (inf_in is None)
        if pre_scale == "after_unscale":
            self._scale_grads()
        if clip is not None:
            self._clip(clip)
        before = [p.detach().clone() for p in self.fast.model.parameters()]
        for run in self.runs:
            run.scaler.step(run.opt)
            run.scaler.update()
        if finite:
            self.marked = set()
        else:
            assert all(torch.equal(a, p) for a, p in zip(before, self.fast.model.parameters(), strict=True))
        self.poisoned, self.steps_on_grads, self.backwards = not finite, int(finite), micro_batches

    # -------------------------------------------------------------------------------------------- schedulers
    @rule()
    def scheduler_step(self) -> None:
        """Torch warns when a scheduler steps before the optimizer; PDMP must warn exactly where the reference does."""
        with recorded_warnings() as warned_f:
            self.fast.sched.step()
        with recorded_warnings() as warned_r:
            self.ref.sched.step()
        assert warned_f == warned_r, f"PDMPOptimizer warns {warned_f}, the reference {warned_r}"

    # ------------------------------------------------------------------------------------------- checkpoints
    @rule(
        which=st.sampled_from(["wrapper", "inner"]), into=st.sampled_from(["in_place", "fresh"]), initial=st.booleans()
    )
    def checkpoint(self, which: str, into: str, initial: bool) -> None:
        """Save the optimizer state (the wrapper's ``state_dict`` or ``opt.optimizer``'s) and load it in place or, with
        the model and scheduler, through ``torch.save``/``torch.load`` into a fresh run. ``initial``: the fresh
        PDMPOptimizer is built with the run's initial gammas, and the checkpoint must restore the current ones.

        The inner optimizer's state dict is its groups as they are: saved after groups arrived untagged (added or
        reassigned) and before the next entry point tagged them, it holds them unsplit and without gammas, so a fresh
        wrapper (split at construction) gets torch's own "different number of parameter groups" refusal, and its
        groups take the gammas the wrapper was built with.
        """
        untagged = [g for g in self.fast.opt.param_groups if GAMMA not in g]
        unsplit = any(len({modality_of(n) for n in self._names(self.fast, g)}) > 1 for g in untagged)
        saved = []
        for run in self.runs:
            opt = run.opt if which == "wrapper" else run.opt.optimizer
            state = opt.state_dict()
            if run is self.fast and which == "wrapper":
                self._check_mirrors(state)
            if into == "in_place":
                opt.load_state_dict(state)
            else:
                saved.append(roundtrip((run.model.state_dict(), state, run.sched.state_dict())))
        if into == "in_place":
            return
        runs = []
        for (model_state, opt_state, sched_state), reference in zip(saved, (False, True), strict=True):
            model = TwoModal(seed=1, extras=EXTRAS)  # other initial values: the load must restore them all
            model.load_state_dict(model_state)
            # an inner checkpoint holds no gammas where the reference's does not, nor where the groups are untagged
            holds_gammas = which == "wrapper" or not (reference or untagged)
            run = self._build(seed=1, reference=reference, gammas=self.initial_gammas if initial and holds_gammas
                              else self.gammas, model=model)  # fmt: skip
            load = (run.opt if which == "wrapper" else run.opt.optimizer).load_state_dict
            if which == "inner" and unsplit and not reference:
                with pytest.raises(ValueError, match="different number of parameter groups"):
                    load(opt_state)
                return  # refused: both runs go on as they were
            load(opt_state)
            run.sched.load_state_dict(sched_state)
            run.scaler = (self.ref if reference else self.fast).scaler
            runs.append(run)
        self.fast, self.ref = runs
        self.marked, self.poisoned, self.steps_on_grads, self.backwards = set(), False, 0, 0

    @staticmethod
    def _names(run: Run, group: dict[str, Any]) -> list[str]:
        names = {p: n for n, p in run.model.named_parameters()}
        return [names[p] for p in group["params"]]

    def _check_mirrors(self, state: dict[str, Any]) -> None:
        """``state_dict()["param_groups"]`` mirrors ``opt.param_groups``: same count, order, keys and settings, every
        group tagged, SGD lr mode's momentum in standard units (``UNITS`` 1)."""
        assert "pdmp" not in state
        live, saved = self.fast.opt.param_groups, state["param_groups"]
        assert [sorted(g) for g in saved] == [sorted(g) for g in live], "state_dict() groups have other keys"
        assert [len(g["params"]) for g in saved] == [len(g["params"]) for g in live]
        for old, group in zip(saved, live, strict=True):
            assert GAMMA in group, "state_dict() left a group untagged"
            assert old.get(UNITS, 1.0) == 1.0, f"state_dict() saved momentum in units {old[UNITS]}, not standard"
            assert {k: v for k, v in old.items() if k not in ("params", UNITS)} == {
                k: v for k, v in group.items() if k not in ("params", UNITS)
            }

    @rule(how=st.sampled_from(["deepcopy", "pickle", "torch.save"]))
    def copy_and_continue(self, how: str) -> None:
        """Copy the whole training state (model, optimizer, scheduler, loss scaler) together and train the copy on;
        refused between ``scale_grads_()`` and ``step()``."""

        def clone(obj: Any) -> Any:
            if how == "deepcopy":
                return copy.deepcopy(obj)
            if how == "pickle":
                return pickle.loads(pickle.dumps(obj))
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=False)

        if self.marked:
            with pytest.raises(RuntimeError, match=r"between scale_grads_\(\) and step\(\)"):
                clone((self.fast.model, self.fast.opt, self.fast.sched, self.fast.scaler))
            return
        for run in self.runs:
            run.model, run.opt, run.sched, run.scaler = clone((run.model, run.opt, run.sched, run.scaler))
            assert all(p.grad is None for p in run.model.parameters())  # parameters are copied without .grad
        self.poisoned, self.steps_on_grads, self.backwards = False, 0, 0

    # ------------------------------------------------------------------------------------------ param groups
    @precondition(lambda self: self.n_extras < EXTRAS)
    @rule(lr=st.sampled_from([None, 2e-3]), via=st.sampled_from(["wrapper", "inner"]))
    def add_param_group(self, lr: float | None, via: str) -> None:
        """The next extra audio layer is unfrozen and joins training, through the wrapper or the inner optimizer."""
        i = self.n_extras
        spec = {"names": [f"extras.{i}.weight", f"extras.{i}.bias"], "modality": "audio"}
        spec.update({} if lr is None else {"lr": lr})
        for run in self.runs:
            run.model.extras[i].requires_grad_(True)
            (run.opt if via == "wrapper" else run.opt.optimizer).add_param_group(built(run.model, spec))
        self.added.append((spec, via))
        self.n_extras += 1

    @rule(how=st.sampled_from(["copies", "fresh"]), via=st.sampled_from(["wrapper", "inner"]))
    def reassign_param_groups(self, how: str, via: str) -> None:
        """``opt.param_groups = [...]``: copies of the groups there, or fresh groups in the user's layout (the
        reference's groups, without the scheduler's ``initial_lr``), tagged and split again at the next entry point
        (or at once, through the wrapper). In SGD lr mode fresh groups over momentum buffers are refused: they do not
        say in which units the momentum is."""
        layout = [
            {"names": self._names(self.ref, g), **{k: v for k, v in g.items() if k not in ("params", "initial_lr")}}
            for g in self.ref.opt.param_groups
        ]
        fast = self.fast.opt
        momentum = any(state.get("momentum_buffer") is not None for state in fast.state.values())
        if how == "fresh" and self.OPT == "SGD" and self.MODE == "lr" and momentum:
            fresh = [built(self.fast.model, s) for s in layout]
            with pytest.raises(ValueError, match="does not say in which units its momentum is"):
                fast.param_groups = fresh
            return
        for run in self.runs:
            groups = (
                [dict(g) for g in run.opt.param_groups] if how == "copies" else [built(run.model, s) for s in layout]
            )
            owner = run.opt if via == "wrapper" and run is self.fast else run.opt.optimizer
            owner.param_groups = groups
        if how == "fresh":
            self.layout, self.added = layout, []

    # ------------------------------------------------------------------------------------------- coefficients
    @rule(gammas=GAMMAS)
    def set_gammas(self, gammas: dict[str, float]) -> None:
        """Change the coefficients (a modulation window); the mapping ``opt.gammas`` returns refuses item assignment."""
        with pytest.raises(TypeError, match="assign a whole mapping"):
            self.fast.opt.gammas["audio"] = 123.0
        self.fast.opt.gammas = dict(gammas)
        self.ref.opt.gammas = dict(gammas)
        self.gammas = dict(gammas)


class SGDGradMachine(TwinMachine):
    OPT, MODE, AUTO = "SGD", "grad", True


class SGDLrMachine(TwinMachine):
    OPT, MODE, AUTO = "SGD", "lr", False
    # lr x gamma, weight decay / gamma and momentum in 1/gamma units round otherwise than scaled gradients: over 300
    # random runs of 40 rules the worst deviation is 1e-5 relative plus 2.2e-7 absolute (a momentum buffer)
    TOLERANCE: ClassVar[dict[str, float] | None] = {"rtol": 1e-5, "atol": 1e-6}


class AdamWLrMachine(TwinMachine):
    OPT, MODE, AUTO = "AdamW", "lr", True


class AdamWUpdateMachine(TwinMachine):
    OPT, MODE, AUTO = "AdamW", "update", False
    # p_old + gamma * (p - p_old) on foreach lists and one tensor at a time: over 300 random runs of 40 rules the worst
    # deviation is 1e-5 relative plus 3e-8 absolute (a parameter)
    TOLERANCE: ClassVar[dict[str, float] | None] = {"rtol": 1e-5, "atol": 2e-7}


def _settings(examples: int, steps: int) -> settings:
    # at most the profile's examples (the dev profile runs fewer)
    return settings(max_examples=min(examples, settings.default.max_examples), stateful_step_count=steps)


# examples x rules per example: about 30 s together on 2 quiet cores (grad mode, the richest in seams, gets the most)
TestSGDGrad = SGDGradMachine.TestCase
TestSGDGrad.settings = _settings(examples=150, steps=30)
TestSGDLr = SGDLrMachine.TestCase
TestSGDLr.settings = _settings(examples=100, steps=30)
TestAdamWLr = AdamWLrMachine.TestCase
TestAdamWLr.settings = _settings(examples=60, steps=30)
TestAdamWUpdate = AdamWUpdateMachine.TestCase
TestAdamWUpdate.settings = _settings(examples=60, steps=30)


# ------------------------------------------------------------------------------ sequences the machines found
# The shortest failing sequences hypothesis found (against 0.1, 0.2 and the 0.3 work), and short ones for paths the
# derandomized draw reaches rarely, replayed on every run: (machine, setup, rules), checked after every rule.
_SINGLE = {"auto": False, "layout": "single", "gammas": {"audio": 15.0, "visual": 1 / 15}}
_BACKWARD = ("backward", {"scale_first": False})
_CLOSURE = ("step", {"closure": "plain", "clip": None})
_ITERATION = ("iteration", {"micro_batches": 1, "scale": False, "clip": None})
_AMP = {"set_to_none": False, "micro_batches": 1, "clip": None}
FOUND: dict[str, tuple[type[TwinMachine], dict[str, Any], list[tuple[str, dict[str, Any]]]]] = {
    "a backward adding to scaled gradients raises": (
        SGDGradMachine,
        _SINGLE,
        [
            _BACKWARD,
            ("scale_grads", {"clip": None, "edit": None}),
            _BACKWARD,
            _ITERATION,
        ],
    ),
    "skipped GradScaler step, then model.zero_grad(set_to_none=False): the next step scales": (
        SGDGradMachine,
        _SINGLE,
        [
            ("amp_iteration", {**_AMP, "zero_via": "optimizer", "inf_in": "audio", "pre_scale": "after_unscale"}),
            ("amp_iteration", {**_AMP, "zero_via": "model", "inf_in": None, "pre_scale": None}),
        ],
    ),
    "a skipped step keeps the mark: a copy is refused until a backward into zeroed gradients": (
        SGDGradMachine,
        _SINGLE,
        [
            ("amp_iteration", {**_AMP, "zero_via": "optimizer", "inf_in": "head", "pre_scale": "before_unscale"}),
            ("copy_and_continue", {"how": "pickle"}),
            ("zero_grad", {"via": "model", "set_to_none": True}),
            _BACKWARD,
            ("copy_and_continue", {"how": "pickle"}),
            ("step", {"closure": None, "clip": None}),
        ],
    ),
    "zero_grad through the optimizer ends the mark: the copy goes ahead": (
        SGDGradMachine,
        _SINGLE,
        [
            _BACKWARD,
            ("scale_grads", {"clip": None, "edit": None}),
            ("zero_grad", {"via": "optimizer", "set_to_none": False}),
            ("copy_and_continue", {"how": "deepcopy"}),
        ],
    ),
    "out-of-place edits between scale_grads_ and step are not scaled again": (
        SGDGradMachine,
        _SINGLE,
        [
            _BACKWARD,
            ("scale_grads", {"clip": 0.05, "edit": "halve"}),
            ("scale_grads", {"clip": None, "edit": "drop_visual"}),
            ("step", {"closure": None, "clip": None}),
        ],
    ),
    "scale_grads_ before any gradient exists, then backward": (
        SGDGradMachine,
        _SINGLE,
        [
            ("scale_grads", {"clip": None, "edit": None}),
            _BACKWARD,
            ("copy_and_continue", {"how": "deepcopy"}),
        ],
    ),
    "a closure that calls scale_grads_ and clips": (
        SGDGradMachine,
        _SINGLE,
        [("step", {"closure": "scaling", "clip": 0.05}), ("step", {"closure": "scaling", "clip": None})],
    ),
    "a group added on the inner optimizer with a modality tag": (
        SGDGradMachine,
        _SINGLE,
        [("add_param_group", {"lr": None, "via": "inner"}), _CLOSURE],
    ),
    "an inner checkpoint saved before untagged groups are split: a fresh wrapper refuses it": (
        SGDGradMachine,
        _SINGLE,
        [
            ("reassign_param_groups", {"how": "fresh", "via": "wrapper"}),
            ("checkpoint", {"which": "inner", "into": "fresh", "initial": False}),
            _ITERATION,
        ],
    ),
    "inner load_state_dict in a fresh run (lr mode)": (
        AdamWLrMachine,
        _SINGLE,
        [("checkpoint", {"which": "inner", "into": "fresh", "initial": False}), _CLOSURE],
    ),
    "copy with a scheduler attached, then step": (
        AdamWLrMachine,
        {**_SINGLE, "layout": "split"},
        [("copy_and_continue", {"how": "deepcopy"}), _CLOSURE, ("copy_and_continue", {"how": "torch.save"}), _CLOSURE],
    ),
    "load_state_dict into a fresh run with an added group": (
        AdamWLrMachine,
        _SINGLE,
        [
            ("add_param_group", {"lr": None, "via": "wrapper"}),
            _CLOSURE,
            ("checkpoint", {"which": "wrapper", "into": "fresh", "initial": False}),
            _CLOSURE,
        ],
    ),
    "gammas changed, then a checkpoint into a run built with the initial ones": (
        SGDLrMachine,
        {**_SINGLE, "layout": "split"},
        [
            _CLOSURE,
            ("set_gammas", {"gammas": {"audio": 1.0, "visual": 15.0}}),
            ("checkpoint", {"which": "wrapper", "into": "fresh", "initial": True}),
            _CLOSURE,
        ],
    ),
    "inner load into a fresh lr-mode SGD run with an added group (momentum units)": (
        SGDLrMachine,
        _SINGLE,
        [
            ("add_param_group", {"lr": None, "via": "wrapper"}),
            _CLOSURE,
            ("checkpoint", {"which": "inner", "into": "fresh", "initial": True}),
            _CLOSURE,
        ],
    ),
    "interleaved modalities, gammas changed, wrapper checkpoint into the initial gammas (momentum units)": (
        SGDLrMachine,
        {**_SINGLE, "layout": "interleaved"},
        [
            _ITERATION,
            ("set_gammas", {"gammas": {"audio": 0.5, "visual": 2.0}}),
            _ITERATION,
            ("checkpoint", {"which": "wrapper", "into": "fresh", "initial": True}),
            _ITERATION,
        ],
    ),
    "groups reassigned, then an update-mode step and a checkpoint": (
        AdamWUpdateMachine,
        _SINGLE,
        [
            _ITERATION,
            ("reassign_param_groups", {"how": "fresh", "via": "inner"}),
            _ITERATION,
            ("checkpoint", {"which": "wrapper", "into": "fresh", "initial": True}),
            _ITERATION,
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_sequence(name: str) -> None:
    """Replay one sequence through its machine, checking the runs agree after every rule."""
    machine_cls, setup, rules = FOUND[name]
    machine = machine_cls()
    machine.setup(**setup)
    machine.runs_agree()
    for rule_name, kwargs in rules:
        getattr(machine, rule_name)(**kwargs)
        machine.runs_agree()
    machine.teardown()


# ------------------------------------------------------------------------------------------ sequences found
# Each was a shortest failing sequence of the machines, written out.
def _sgd(model: TwoModal, **pdmp: Any) -> PDMPOptimizer:
    return PDMPOptimizer(torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9), model.groups(), **pdmp)


def test_scale_grads_tags_the_groups_that_arrived_untagged() -> None:
    """A group added on the inner optimizer is tagged by ``scale_grads_()`` too, and its gradients scaled."""
    model = TwoModal(extras=1)
    opt = _sgd(model, gammas={"audio": 2.0, "visual": 0.5})
    opt.optimizer.add_param_group({"params": list(model.extras.parameters()), "modality": "audio"})
    loss_of(model, 0).backward()
    bare = [p.grad.clone() for p in model.extras.parameters()]
    opt.scale_grads_()
    assert all(torch.equal(p.grad, 2.0 * g) for p, g in zip(model.extras.parameters(), bare, strict=True))


def test_reassigned_groups_keep_the_gammas_a_checkpoint_restored() -> None:
    """``opt.param_groups = [...]`` after ``load_state_dict`` keeps the loaded gammas (not those built with)."""
    saved = _sgd(TwoModal(), gammas={"audio": 2.0, "visual": 0.5}).state_dict()
    model = TwoModal()
    opt = _sgd(model, gammas={"audio": 1 / 15, "visual": 15.0})
    opt.load_state_dict(saved)
    assert dict(opt.gammas) == {"audio": 2.0, "visual": 0.5}
    opt.param_groups = [{**opt.defaults, "params": model.trained()}]
    opt.step()
    assert dict(opt.gammas) == {"audio": 2.0, "visual": 0.5}


def test_fresh_groups_over_sgd_lr_mode_momentum_are_refused_and_copies_keep_it() -> None:
    """SGD in lr mode keeps the buffers in ``1/gamma`` units, recorded in the groups: fresh groups (which do not say
    so) are refused, through the wrapper at once and through the inner optimizer at the next step; copies of the
    groups carry the units and the run goes on as the reference's."""
    fast_model, ref_model = TwoModal(), TwoModal()
    gammas = {"audio": 1 / 15, "visual": 15.0}
    fast = _sgd(fast_model, gammas=gammas, mode="lr")
    ref = PDMPReference(torch.optim.SGD(ref_model.trained(), lr=0.1, momentum=0.9), ref_model.groups(),
                        gammas=gammas, mode="lr")  # fmt: skip
    for step in range(3):
        for model, opt in ((fast_model, fast), (ref_model, ref)):
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()
        if step == 0:
            with pytest.raises(ValueError, match="does not say in which units its momentum is"):
                fast.param_groups = [{**fast.defaults, "params": fast_model.trained()}]
            groups = fast.param_groups
            fast.optimizer.param_groups = [{**fast.defaults, "params": fast_model.trained()}]
            with pytest.raises(ValueError, match="does not say in which units its momentum is"):
                fast.state_dict()
            fast.optimizer.param_groups = groups
        if step == 1:
            fast.param_groups = [dict(g) for g in fast.param_groups]
    for p, q in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=5e-7)
