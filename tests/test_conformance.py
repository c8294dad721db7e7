"""Conformance with torch's own optimizer database: every torch optimizer and CPU config, wrapped in PDMP.

``torch.testing._internal.common_optimizers.optim_db`` lists each torch optimizer with the configs torch's own
suite runs. Each one is wrapped, on a small two-modality model (encoders ``a`` and ``v`` plus an unscaled
head; sparse embeddings for SparseAdam, no biases for Muon, which takes 2-D parameters only), with pass-through
coefficients (all 1.0) and with real ones (``a``: 1/15, ``v``: 15), and checked for:

* the PDMP promise: pass-through coefficients leave the bare optimizer's trajectory unchanged bit for bit; real
  ones match the reference twin (the bare optimizer driven the obviously right way for the resolved mode: on
  pre-multiplied gradients, with pre-multiplied learning rates, or with its step multiplied afterwards); and,
  with state after many steps, auto mode really multiplies each modality's update by its coefficient (the
  check that catches optimizers whose update is not proportional to ``lr``, such as Rprop and Adafactor);
* the optimizer protocol: ``zero_grad``, closures, ``state_dict`` round trip and bit-identical resume, loading
  plain inner state dicts (through the wrapper and through ``opt.optimizer``), step hooks (local and global,
  each once per step, with the wrapper), state-dict hooks, deepcopy / pickle / ``torch.save`` with and without
  a scheduler attached, the database's schedulers, tensor learning rates and named parameters.

Configs: all 91 that ``optim_inputs_func(device="cpu", dtype=torch.float32)`` gives for the 15 optimizers; it
leaves out the 36 that torch runs on CUDA only (all ``capturable``). The implementation flags are not configs:
``foreach=True`` is added to the default config of the 12 optimizers that have it, for the exactness checks;
``fused`` (a CPU kernel for Adam, AdamW, Adagrad and SGD) and ``differentiable`` are not run. The protocol checks
that do not depend on the config (hooks, copies, checkpoint formats, named parameters) use each optimizer's
default config; schedulers run on the default and on the first tensor-lr config. LBFGS with a line search may
refuse "grad"/"auto" (naming ``mode='update'``); its protocol checks then run in "update" mode.

torch's own test helpers need ``expecttest`` (a ``test`` extra).
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pdmp_optim import PDMPOptimizer


def _import_optim_db() -> Any:
    """Import torch's optimizer database without the process-wide settings its import changes.

    ``common_utils`` (imported by ``common_optimizers``) re-registers and loads hypothesis profiles named
    ``dev``/``pytorch_ci`` (10 examples, which would silently shrink this repository's hypothesis tests),
    freezes ``torch.backends`` flags and adds warning filters. All three are restored here.
    """
    from hypothesis import errors, settings

    profile = settings.get_current_profile_name()
    saved = {}
    for name in ("dev", "debug", "pytorch_ci"):
        with contextlib.suppress(errors.InvalidArgument):
            saved[name] = settings.get_profile(name)
    frozen = torch.backends.flags_frozen()
    with warnings.catch_warnings():
        from torch.testing._internal import common_optimizers
    for name, profile_settings in saved.items():
        settings.register_profile(name, profile_settings)
    settings.load_profile(profile)
    if not frozen:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return common_optimizers


OPTIM_DB = {info.optim_cls.__name__: info for info in _import_optim_db().optim_db}

GAMMAS = {"a": 1 / 15, "v": 15.0}
PASS_THROUGH = {"a": 1.0, "v": 1.0}
MODES = ("auto", "grad", "update")
# the mode auto must pick for each torch optimizer: where "lr" scales the update exactly, else the step itself
AUTO_MODE = {"SGD": "grad", "ASGD": "grad", "LBFGS": "refused", "Rprop": "update", "Adafactor": "update"}
STEPS = 3
WARMUP = 60  # Adafactor's relative step caps lr * 15 from step 45 on (lr 1e-2): the ratio check must see that
RATIO_TOL = 0.03
# "update" mode: the same arithmetic up to a rounding or two per step (the state, from gradients at parameters
# that differ by those roundings, a little more)
UPDATE_TOL = {"rtol": 1e-6, "atol": 1e-7}
UPDATE_STATE_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny; Muon's bfloat16 matmuls still open an OpenMP region, which on a busy 2-core
    machine waits for a descheduled thread (milliseconds per matmul, a minute over the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- the model
class TwoModal(nn.Module):
    """Two encoders and a head: dense layers, sparse embeddings (SparseAdam) or bias-free layers (Muon)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        with torch.random.fork_rng(devices=[]):  # the same initial weights every time, the global RNG untouched
            torch.manual_seed(0)
            if kind == "sparse":
                self.a, self.v, self.head = (nn.Embedding(n, d, sparse=True) for n, d in ((7, 4), (9, 4), (5, 8)))
            else:
                bias = kind == "dense"
                self.a, self.v, self.head = (
                    nn.Linear(3, 4, bias=bias),
                    nn.Linear(5, 4, bias=bias),
                    nn.Linear(8, 2, bias=bias),
                )

    def loss(self, t: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 + t)
        if self.kind == "sparse":
            ia, iv, ih = (torch.randint(n, (6,), generator=g) for n in (7, 9, 5))
            z = torch.tanh(torch.cat([self.a(ia), self.v(iv)], dim=1))
            return nn.functional.mse_loss((z * self.head(ih)).sum(1), torch.randn(6, generator=g))
        xa, xv, y = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)
        return nn.functional.mse_loss(self.head(torch.tanh(torch.cat([self.a(xa), self.v(xv)], dim=1))), y)

    def modality_of(self) -> dict[Tensor, str]:
        return {p: m for m in ("a", "v") for p in getattr(self, m).parameters()}


# ---------------------------------------------------------------------------------------------------- the cases
class Case(NamedTuple):
    """One optim_db optimizer with one of its configs."""

    info: Any
    kwargs: dict[str, Any]
    desc: str

    @property
    def name(self) -> str:
        return self.info.optim_cls.__name__

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return self.info.optim_cls

    def model(self) -> TwoModal:
        return TwoModal("sparse" if self.info.only_supports_sparse_grads else "2d" if self.name == "Muon" else "dense")

    def inner(self, model: nn.Module, *, named: bool = False) -> torch.optim.Optimizer:
        """The optimizer as a user builds it: one group over all parameters (its own copy of a tensor lr)."""
        params = model.named_parameters() if named else model.parameters()
        return self.cls(params, **copy.deepcopy(self.kwargs))

    def step(
        self, opt: torch.optim.Optimizer, model: TwoModal, t: int, after_backward: Callable[[], None] | None = None
    ):
        """zero_grad, backward on batch ``t`` and step (through a closure where the optimizer needs one)."""

        def closure() -> Tensor:
            opt.zero_grad()
            loss = model.loss(t)
            loss.backward()
            if after_backward is not None:
                after_backward()
            return loss

        if self.info.step_requires_closure:
            return opt.step(closure)
        loss = closure()
        opt.step()
        return loss


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _cases() -> list[Any]:
    out = []
    for name, info in OPTIM_DB.items():
        for cfg in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            assert cfg.params is None, f"{name} {cfg.desc}: configs with their own params are not handled"
            out.append(pytest.param(Case(info, cfg.kwargs, cfg.desc), id=f"{name}-{_slug(cfg.desc)}"))
    return out


CASES = _cases()
DEFAULT = {name: Case(info, {}, "default") for name, info in OPTIM_DB.items()}
DEFAULT_CASES = [pytest.param(case, id=name) for name, case in DEFAULT.items()]
FOREACH_CASES = [
    pytest.param(Case(info, {"foreach": True}, "default & foreach"), id=f"{name}-default_foreach")
    for name, info in OPTIM_DB.items()
    if "foreach" in info.supported_impls
]
TENSOR_LR_CASES = [p for p in CASES if isinstance(p.values[0].kwargs.get("lr"), Tensor)]
RATIO_CASES = [p for p in CASES if AUTO_MODE.get(p.values[0].name) not in ("grad", "refused")]


def _build(case: Case, gammas: Mapping[str, float], mode: str = "auto", *, named: bool = False):
    model = case.model()
    inner = case.inner(model, named=named)
    if case.name == "LBFGS" and mode == "auto":  # auto refuses LBFGS (no mode multiplies its update): tested below;
        mode = "grad"  # the protocol and the arithmetic are tested in an explicit mode
    with warnings.catch_warnings():
        if mode == "grad" or case.name == "LBFGS":  # forcing a mode that cannot multiply the update warns by design
            warnings.simplefilter("ignore", UserWarning)
        opt = PDMPOptimizer(inner, {"a": model.a, "v": model.v}, gammas=gammas, mode=mode)
    assert opt.optimizer is inner
    return model, opt


def _build_or_refusal(case: Case, gammas: Mapping[str, float], mode: str):
    """``(model, opt)``; ``None`` where the wrapper refused LBFGS's line search under gradient scaling, loudly.

    The line search compares the loss with the gradient, and a scaled gradient is not that loss's gradient, so
    refusing (and naming ``mode='update'``) is allowed there, and only there.
    """
    if case.kwargs.get("line_search_fn") is not None and mode in ("auto", "grad"):
        try:
            return _build(case, gammas, mode)
        except ValueError as error:
            assert "update" in str(error), f"the refusal must name the mode to use: {error}"
            return None
    return _build(case, gammas, mode)


def _build_usable(case: Case, gammas: Mapping[str, float], mode: str = "auto"):
    """For the protocol checks: ``mode``, or "update" where the wrapper refused ``mode`` (LBFGS's line search)."""
    return _build_or_refusal(case, gammas, mode) or _build(case, gammas, "update")


class Twin:
    """The reference: the bare optimizer, driven the obviously right way for ``mode``.

    Its param groups hold the same parameters as the wrapper's (which "lr" mode may have split), each with the
    user's settings (and its own copy of a tensor lr), never settings read back from the wrapper.
    """

    def __init__(self, case: Case, like: torch.optim.Optimizer, like_model: nn.Module, mode: str, gammas) -> None:
        self.case, self.mode, self.gammas = case, mode, dict(gammas)
        self.model = case.model()
        names, params = _names(like_model), dict(self.model.named_parameters())
        groups = [
            {**copy.deepcopy(case.kwargs), "params": [params[names[p]] for p in group["params"]]}
            for group in like.param_groups
        ]
        self.opt = case.cls(groups, **copy.deepcopy(case.kwargs))
        self.modality = self.model.modality_of()

    def sync(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        """Take the wrapper's parameters and per-parameter state (its settings stay the twin's own)."""
        self.model.load_state_dict(model.state_dict())
        params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            if p in opt.state:
                self.opt.state[params[name]] = copy.deepcopy(opt.state[p])

    def _multiply_grads(self) -> None:
        for p, m in self.modality.items():
            if p.grad is not None:
                p.grad.mul_(self.gammas[m])

    def step(self, t: int):
        if self.mode == "grad":
            return self.case.step(self.opt, self.model, t, after_backward=self._multiply_grads)
        if self.mode == "lr":
            saved = [(group["lr"], group.get("weight_decay")) for group in self.opt.param_groups]
            for group in self.opt.param_groups:
                modalities = {self.modality.get(p) for p in group["params"]}
                assert len(modalities) == 1, "the wrapper left a param group that mixes modalities in 'lr' mode"
                (m,) = modalities
                if m is not None:
                    group["lr"] = group["lr"] * self.gammas[m]
                    if _decoupled_decay(self.opt, group):  # the update is multiplied, the decay stays as set
                        group["weight_decay"] = group["weight_decay"] / self.gammas[m]
            try:
                return self.case.step(self.opt, self.model, t)
            finally:
                for group, (lr, weight_decay) in zip(self.opt.param_groups, saved, strict=True):
                    group["lr"] = lr
                    if weight_decay is not None:
                        group["weight_decay"] = weight_decay
        assert self.mode == "update", self.mode
        before = [(p, p.detach().clone(), self.gammas[m]) for p, m in self.modality.items()]
        loss = self.case.step(self.opt, self.model, t)
        with torch.no_grad():
            for p, old, gamma in before:
                p.copy_(old + gamma * (p - old))
        return loss


def _decoupled_decay(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Weight decay applied as ``p *= 1 - lr * weight_decay``: AdamW, ``decoupled_weight_decay=True``, Muon."""
    return bool(group.get("weight_decay")) and (
        bool(group.get("decoupled_weight_decay")) or type(opt).__name__ == "Muon"
    )


def _step_both(case: Case, opt: torch.optim.Optimizer, model: TwoModal, twin: Twin, t: int) -> tuple[Any, Any]:
    """One step of the wrapper and of its twin; in "update" mode from the same state (the twin takes the wrapper's
    first), since the two compute ``p_old + gamma * (p - p_old)`` with different roundings, which LBFGS's line
    search, for one, amplifies over the steps."""
    if twin.mode == "update":
        twin.sync(opt, model)
    return case.step(opt, model, t), twin.step(t)


# ------------------------------------------------------------------------------------------------ comparisons
def _names(model: nn.Module) -> dict[Tensor, str]:
    return {p: n for n, p in model.named_parameters()}


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


EXACT = {"rtol": 0.0, "atol": 0.0}


def _same(a: Any, b: Any, tol: Mapping[str, float], where: str) -> None:
    """``a`` equals ``b`` (tensors, nested in dicts/lists/tuples) within ``tol``; ``EXACT`` means bit for bit."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], tol, f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=tol["rtol"], abs=tol["atol"], nan_ok=True), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_params(model_a: nn.Module, model_b: nn.Module, exact: bool = True, what: str = "") -> None:
    tol = EXACT if exact else UPDATE_TOL
    _same(dict(model_a.named_parameters()), dict(model_b.named_parameters()), tol, f"params{what}")


def assert_same_state(opt_a, model_a: nn.Module, opt_b, model_b: nn.Module, exact: bool = True) -> None:
    """Per-parameter optimizer state, matched by parameter name."""

    def by_name(opt, model):
        return {n: dict(opt.state[p]) for n, p in model.named_parameters() if p in opt.state}

    _same(by_name(opt_a, model_a), by_name(opt_b, model_b), EXACT if exact else UPDATE_STATE_TOL, "state")


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in opt.param_groups]


def _exact(mode: str) -> bool:
    return mode != "update"


def _hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


# ------------------------------------------------------------------------------------------ the PDMP promise
@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_auto_picks_the_mode_that_multiplies_the_update(case: Case) -> None:
    if AUTO_MODE.get(case.name) == "refused":
        model = case.model()
        with pytest.raises(ValueError, match="no PDMP mode multiplies its update"):
            PDMPOptimizer(case.inner(model), {"a": model.a, "v": model.v}, gammas=GAMMAS)
        return
    _, opt = _build(case, GAMMAS)
    assert opt.mode == AUTO_MODE.get(case.name, "lr")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES + FOREACH_CASES)
def test_pass_through_gammas_leave_the_bare_optimizer_unchanged(case: Case, mode: str) -> None:
    built = _build_or_refusal(case, PASS_THROUGH, mode)
    if built is None:
        return
    model, opt = built
    bare_model = case.model()
    bare = case.inner(bare_model)
    for t in range(STEPS):
        loss, bare_loss = case.step(opt, model, t), case.step(bare, bare_model, t)
        torch.testing.assert_close(loss, bare_loss, rtol=0, atol=0)
        assert_same_params(model, bare_model, what=f" after step {t + 1}")
    assert_same_state(opt, model, bare, bare_model)
    (user_group,) = bare.param_groups
    for group in opt.param_groups:  # "lr" mode may split the group, never change its settings
        _same({k: group[k] for k in _hyperparameters(user_group)}, _hyperparameters(user_group), EXACT, "group")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES + FOREACH_CASES)
def test_real_gammas_match_the_reference_twin(case: Case, mode: str) -> None:
    built = _build_or_refusal(case, GAMMAS, mode)
    if built is None:
        return
    model, opt = built
    if mode != "auto":
        assert opt.mode == mode
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    for t in range(STEPS):
        _step_both(case, opt, model, twin, t)
        assert_same_params(model, twin.model, _exact(opt.mode), f" after step {t + 1}")
    assert_same_state(opt, model, twin.opt, twin.model, _exact(opt.mode))
    if opt.mode != "grad":  # the coefficient really did something: the modalities left the unscaled trajectory
        bare_model = case.model()
        bare = case.inner(bare_model)
        for t in range(STEPS):
            case.step(bare, bare_model, t)
        for m in ("a", "v"):
            moved = [
                not torch.equal(p, q)
                for p, q in zip(getattr(model, m).parameters(), getattr(bare_model, m).parameters(), strict=True)
            ]
            assert any(moved), f"modality {m!r} followed the unscaled trajectory"


@pytest.mark.parametrize("case", RATIO_CASES)
def test_auto_mode_multiplies_each_modality_update_by_gamma_with_state(case: Case) -> None:
    """After WARMUP steps, one step of the wrapper against the bare step from the same state and gradients."""
    model, opt = _build(case, GAMMAS)
    assert opt.mode in ("lr", "update")
    for t in range(WARMUP):
        case.step(opt, model, t)
    twin = Twin(case, opt, model, "lr", PASS_THROUGH)  # the wrapper's layout, the user's settings
    bare, bare_model = twin.opt, twin.model
    bare_model.load_state_dict(model.state_dict())
    bare.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    names, bare_params = _names(model), dict(bare_model.named_parameters())
    _same(_lrs(bare), [float(case.inner(case.model()).param_groups[0]["lr"])] * len(bare.param_groups), EXACT, "lr")
    for o in (opt, bare):  # decoupled decay is not multiplied, by design: measure the gradient-driven update
        for group in o.param_groups:
            if _decoupled_decay(o.optimizer if isinstance(o, PDMPOptimizer) else o, group):
                group["weight_decay"] = 0.0
    before = _params(model)
    case.step(opt, model, WARMUP)
    case.step(bare, bare_model, WARMUP)
    for m, gamma in GAMMAS.items():
        params = list(getattr(model, m).parameters())
        scaled = torch.cat([(p.detach() - before[names[p]]).flatten() for p in params])
        plain = torch.cat([(bare_params[names[p]].detach() - before[names[p]]).flatten() for p in params])
        ratio = (scaled.norm() / plain.norm()).item()
        assert abs(ratio / gamma - 1) < RATIO_TOL, (
            f"{opt.mode!r} mode multiplied {m!r}'s update by {ratio:.4g} after {WARMUP} steps, not by gamma={gamma:.4g}"
        )
    _same(dict(model.head.named_parameters()), dict(bare_model.head.named_parameters()), EXACT, "head (unscaled)")


# ----------------------------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_zero_grad_and_closure_behave_like_the_bare_optimizer(case: Case) -> None:
    model, opt = _build(case, GAMMAS)
    case.step(opt, model, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model.loss(1).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g and not (g.to_dense() if g.is_sparse else g).any()
    # a closure: the wrapper returns what the inner optimizer returns and scales what the closure computes
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    twin.model.load_state_dict(model.state_dict())
    twin.opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    first: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = model.loss(1)
        loss.backward()
        first.append(loss)
        return loss

    returned = opt.step(closure)
    assert returned is first[0]
    twin.step(1)  # a plain backward and step (LBFGS: a closure without the wrapper)
    assert_same_params(model, twin.model, _exact(opt.mode))


@pytest.mark.parametrize("mode", ["auto", "update"])
@pytest.mark.parametrize("case", CASES)
def test_state_dict_resume_is_bit_identical(case: Case, mode: str) -> None:
    model, opt = _build_usable(case, GAMMAS, mode)
    for t in range(STEPS):
        case.step(opt, model, t)
    saved = opt.state_dict()
    assert "pdmp" in saved
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_model, resumed = _build_usable(case, GAMMAS, mode)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(loaded)
    for t in range(STEPS, 2 * STEPS):
        case.step(opt, model, t)
        case.step(resumed, resumed_model, t)
    assert_same_params(resumed_model, model)
    assert_same_state(resumed, resumed_model, opt, model)
    assert dict(resumed.gammas) == GAMMAS and resumed.mode == opt.mode


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_loading_a_checkpoint_restores_the_coefficients_it_was_saved_with(case: Case) -> None:
    model, opt = _build(case, GAMMAS)
    case.step(opt, model, 0)
    opt.gammas = {"a": 0.5, "v": 3.0}
    case.step(opt, model, 1)
    saved = copy.deepcopy(opt.state_dict())
    resumed_model, resumed = _build(case, PASS_THROUGH)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert dict(resumed.gammas) == {"a": 0.5, "v": 3.0}
    for t in (2, 3):
        case.step(opt, model, t)
        case.step(resumed, resumed_model, t)
    assert_same_params(resumed_model, model)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_a_0_1_checkpoint_loads_and_an_unknown_format_is_refused(case: Case) -> None:
    """0.1.0 wrote ``"pdmp": {"format": 1, "mode": "grad" | "lr", "gammas", "modalities": {name: [ids]}}``."""
    model, opt = _build(case, GAMMAS)
    for t in range(STEPS):
        case.step(opt, model, t)
    saved = copy.deepcopy(opt.state_dict())
    ids = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    old = {
        "format": 1,
        "mode": "grad" if opt.mode == "grad" else "lr",
        "gammas": dict(GAMMAS),
        "modalities": {m: sorted(ids[id(p)] for p in getattr(model, m).parameters()) for m in GAMMAS},
    }
    unknown = {**saved, "pdmp": {**saved["pdmp"], "format": 99}}
    other_model, other = _build(case, PASS_THROUGH)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict(unknown)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict({**saved, "pdmp": old})
    assert dict(other.gammas) == GAMMAS
    for t in range(STEPS, 2 * STEPS):
        case.step(opt, model, t)
        case.step(other, other_model, t)
    assert_same_params(other_model, model)


@pytest.mark.parametrize("case", CASES)
def test_plain_inner_state_dict_loads_through_the_wrapper_and_the_inner_optimizer(case: Case) -> None:
    model, opt = _build_usable(case, GAMMAS)
    for t in range(STEPS):
        case.step(opt, model, t)
    inner_saved = copy.deepcopy(opt.optimizer.state_dict())
    assert "pdmp" not in inner_saved
    resumed = []
    for how in ("wrapper", "inner"):
        other_model, other = _build_usable(case, GAMMAS)
        other_model.load_state_dict(model.state_dict())
        (other if how == "wrapper" else other.optimizer).load_state_dict(copy.deepcopy(inner_saved))
        resumed.append((how, other_model, other))
    for t in range(STEPS, 2 * STEPS):
        case.step(opt, model, t)
        for _, other_model, other in resumed:
            case.step(other, other_model, t)
    for how, other_model, other in resumed:
        assert_same_params(other_model, model, what=f" (loaded through the {how})")
        assert_same_state(other, other_model, opt, model)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_state_dict_of_a_run_without_pdmp(case: Case) -> None:
    """A checkpoint of the bare optimizer (the user's one group) loads, or, where "lr" mode split the group,
    is refused with a message; loaded, the run continues exactly like the reference twin from that state."""
    bare_model = case.model()
    bare = case.inner(bare_model)
    for t in range(STEPS):
        case.step(bare, bare_model, t)
    plain = copy.deepcopy(bare.state_dict())
    model, opt = _build(case, GAMMAS)
    model.load_state_dict(bare_model.state_dict())
    try:
        opt.load_state_dict(copy.deepcopy(plain))
    except ValueError as error:
        assert len(opt.param_groups) != len(plain["param_groups"]), f"refused a checkpoint that lines up: {error}"
        assert "param group" in str(error)
        return
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    twin.model.load_state_dict(bare_model.state_dict())
    order = [n for n, _ in bare_model.named_parameters()]  # the plain checkpoint's parameter indices
    twin_names = _names(twin.model)
    (hyper,) = [_hyperparameters(g) for g in plain["param_groups"]]
    twin.opt.load_state_dict(
        {
            "state": copy.deepcopy(plain["state"]),
            "param_groups": [
                {**copy.deepcopy(hyper), "params": [order.index(twin_names[p]) for p in g["params"]]}
                for g in twin.opt.param_groups
            ],
        }
    )
    for t in range(STEPS, 2 * STEPS):
        _step_both(case, opt, model, twin, t)
    assert_same_params(model, twin.model, _exact(opt.mode))


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_step_hooks_fire_once_per_step_with_the_wrapper(case: Case) -> None:
    model, opt = _build(case, GAMMAS)
    user_lrs = _lrs(opt)
    calls: list[tuple[str, Any, list[float]]] = []

    def hook(kind: str):
        return lambda o, args, kwargs: calls.append((kind, o, _lrs(o)))

    handles = [
        opt.register_step_pre_hook(hook("local pre")),
        opt.register_step_post_hook(hook("local post")),
        register_optimizer_step_pre_hook(hook("global pre")),
        register_optimizer_step_post_hook(hook("global post")),
    ]
    try:
        for t in range(2):
            case.step(opt, model, t)
            kinds = [kind for kind, _, _ in calls]
            assert sorted(kinds) == ["global post", "global pre", "local post", "local pre"], kinds
            assert max(kinds.index("global pre"), kinds.index("local pre")) < min(
                kinds.index("global post"), kinds.index("local post")
            ), kinds
            for kind, o, lrs in calls:
                assert o is opt, f"{kind} hook got {type(o).__name__}, not the wrapper"
                assert lrs == user_lrs, f"{kind} hook saw lrs {lrs}, the user's are {user_lrs}"
            calls.clear()
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_step_hooks_of_the_inner_optimizer_still_fire_once(case: Case) -> None:
    model, opt = _build(case, GAMMAS)
    calls = []
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.optimizer.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    case.step(opt, model, 0)
    assert calls == [("pre", opt.optimizer), ("post", opt.optimizer)]


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_state_dict_hooks_fire_once_with_the_wrapper_and_their_results_are_used(case: Case) -> None:
    model, opt = _build(case, GAMMAS)
    case.step(opt, model, 0)
    calls: list[tuple[str, Any]] = []

    def post_save(o, state_dict):
        calls.append(("save post", o))
        return {**state_dict, "extra": 1}

    def pre_load(o, state_dict):
        calls.append(("load pre", o))
        groups = [{**g, "lr": 0.0123} for g in state_dict["param_groups"]]
        return {k: v for k, v in state_dict.items() if k != "extra"} | {"param_groups": groups}

    opt.register_state_dict_pre_hook(lambda o: calls.append(("save pre", o)))
    opt.register_state_dict_post_hook(post_save)
    opt.register_load_state_dict_pre_hook(pre_load)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o)))
    saved = opt.state_dict()
    assert saved["extra"] == 1 and "pdmp" in saved
    assert calls == [("save pre", opt), ("save post", opt)]
    calls.clear()
    opt.load_state_dict(saved)
    assert calls == [("load pre", opt), ("load post", opt)]
    assert _lrs(opt) == [0.0123] * len(opt.param_groups)


def _clone(opt: torch.optim.Optimizer, how: str) -> Any:
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _model_over(model: TwoModal, opt: torch.optim.Optimizer, clone: torch.optim.Optimizer) -> TwoModal:
    """A copy of ``model`` whose parameters are ``clone``'s (matched by position in the param groups)."""
    out = copy.deepcopy(model)
    names = _names(model)
    for group, cloned in zip(opt.param_groups, clone.param_groups, strict=True):
        for p, q in zip(group["params"], cloned["params"], strict=True):
            module_name, _, attr = names[p].rpartition(".")
            out.get_submodule(module_name)._parameters[attr] = q
    return out


def _error_of_a_bare_copy(case: Case, how: str) -> type[Exception] | None:
    """The exception a copy of the bare optimizer raises at its first step, if any (what torch itself gets right)."""
    model = case.model()
    bare = case.inner(model)
    case.step(bare, model, 0)
    clone = _clone(bare, how)
    try:
        case.step(clone, _model_over(model, bare, clone), 1)
    except Exception as error:
        return type(error)
    return None


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["plain", "scheduler"])
@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_copies_step_their_own_parameters_with_the_coefficients(case: Case, scheduled: bool, how: str) -> None:
    model, opt = _build(case, GAMMAS)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduled else None
    for t in range(2):
        case.step(opt, model, t)
        if scheduler is not None:
            scheduler.step()
    clone = _clone(opt, how)
    assert isinstance(clone, PDMPOptimizer) and dict(clone.gammas) == GAMMAS and clone.mode == opt.mode
    clone_model = _model_over(model, opt, clone)
    before = _params(model)
    torch_error = _error_of_a_bare_copy(case, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.step(clone, clone_model, 2)
        except Exception as error:
            if torch_error is None or not isinstance(error, torch_error):
                raise
            stepped = False  # torch's own copy of this optimizer cannot step either (LBFGS drops _params)
        else:
            stepped = True
    assert not caught, [str(w.message) for w in caught]
    _same(dict(model.named_parameters()), before, EXACT, "the original's params after the copy's step")
    if not stepped:
        return
    case.step(opt, model, 2)  # the same step on the original: the copy took exactly that step
    assert_same_params(clone_model, model)
    assert_same_state(clone, clone_model, opt, model)


def _scheduler_cases() -> list[Any]:
    out = []
    for name, info in OPTIM_DB.items():
        configs = [DEFAULT[name], *[p.values[0] for p in TENSOR_LR_CASES if p.values[0].name == name][:1]]
        for case in configs:
            for i in range(len(info.scheduler_inputs)):
                out.append(pytest.param(case, i, id=f"{name}-{_slug(case.desc)}-{i}"))
    return out


@pytest.mark.parametrize(("case", "index"), _scheduler_cases())
def test_schedulers_see_their_own_lrs_and_drive_the_reference(case: Case, index: int) -> None:
    model, opt = _build(case, GAMMAS)
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    schedulers = [[make(o) for make in case.info.scheduler_inputs[index]] for o in (opt, twin.opt)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(12):
            losses = _step_both(case, opt, model, twin, t)
            for loss, scheds in zip(losses, schedulers, strict=True):
                for s in scheds:
                    s.step(float(loss)) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
            assert _lrs(opt) == _lrs(twin.opt), f"step {t + 1}: lrs {_lrs(opt)}, reference {_lrs(twin.opt)}"
            assert schedulers[0][-1].get_last_lr() == _lrs(opt)
            assert_same_params(model, twin.model, _exact(opt.mode), f" after step {t + 1}")
    lr_warnings = [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    assert not lr_warnings, lr_warnings


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TENSOR_LR_CASES)
def test_tensor_lr_groups_stay_independent_and_are_read_at_every_step(case: Case, mode: str) -> None:
    model, opt = _build(case, GAMMAS, mode)
    groups = opt.param_groups
    assert all(isinstance(g["lr"], Tensor) for g in groups)
    assert len({g["lr"].data_ptr() for g in groups}) == len(groups), "param groups share one lr tensor"
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    _step_both(case, opt, model, twin, 0)
    assert all(isinstance(g["lr"], Tensor) for g in groups) and _lrs(opt) == _lrs(twin.opt)
    # an in-place change of one group's lr (as a scheduler makes it) changes that group only, and the next step
    names = _names(model)
    first = next(i for i, g in enumerate(groups) if any(names[p].startswith("v.") for p in g["params"]))
    others = [float(g["lr"]) for i, g in enumerate(groups) if i != first]
    for o in (opt, twin.opt):
        o.param_groups[first]["lr"].fill_(0.005)
    assert [float(g["lr"]) for i, g in enumerate(groups) if i != first] == others
    for t in (1, 2):
        _step_both(case, opt, model, twin, t)
    assert_same_params(model, twin.model, _exact(opt.mode))
    assert _lrs(opt) == _lrs(twin.opt)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_named_parameters_keep_their_names_through_split_step_and_resume(case: Case) -> None:
    model, opt = _build(case, GAMMAS, named=True)
    names = _names(model)
    for group in opt.param_groups:
        assert group["param_names"] == [names[p] for p in group["params"]]
    twin = Twin(case, opt, model, opt.mode, GAMMAS)
    for t in range(STEPS):
        _step_both(case, opt, model, twin, t)
    assert_same_params(model, twin.model, _exact(opt.mode))
    saved = copy.deepcopy(opt.state_dict())
    # the state dict has the layout of the optimizer the user built ("lr" mode's split groups merged back)
    built = case.inner(case.model(), named=True) if "named" in case.inner.__code__.co_varnames else None
    expected = [n for n, _ in model.named_parameters()]
    assert [n for g in saved["param_groups"] for n in g["param_names"]] == expected
    if built is not None:
        assert [g["param_names"] for g in saved["param_groups"]] == [g["param_names"] for g in built.param_groups]
    resumed_model, resumed = _build(case, GAMMAS, named=True)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    for t in range(STEPS, 2 * STEPS):
        case.step(opt, model, t)
        case.step(resumed, resumed_model, t)
    assert_same_params(resumed_model, model)
    assert_same_state(resumed, resumed_model, opt, model)
