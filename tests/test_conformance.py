"""Conformance with torch's own optimizer database: every torch optimizer and CPU config, wrapped in PDMP.

``torch.testing._internal.common_optimizers.optim_db`` lists each torch optimizer with the configs torch's own suite
runs. Every config that ``optim_inputs_func(device="cpu", dtype=torch.float32)`` gives is used (it leaves out the 36
CUDA-only ``capturable`` ones), on the shared ``TwoModal`` model, in the mode auto picks and in
the explicit modes that hold for the optimizer without a warning: SGD and ASGD also "lr" and "update", the lr family
also "update", Rprop and Adafactor auto's "update" only. Two optimizers need another model: SparseAdam takes sparse
gradients only (``SparseTwoModal``, embeddings) and Muon 2-D parameters only (``TwoModal``, biases frozen). LBFGS is
refused in every mode (tested). The reference is ``pdmp_optim.reference.PDMPReference``, compared per parameter
(``standard_state``): bit for bit in "grad" and "lr" mode, to the measured ``UPDATE_TOL`` in "update" mode and
``SGD_LR_TOL`` in SGD's "lr" mode (its momentum is kept in ``1/gamma`` units).

Every (config, mode):

* a few steps with real gammas equal the reference's and move each modality off the bare trajectory; with
  pass-through gammas (all 1.0) they equal the bare optimizer's bit for bit; ``state_dict()`` mirrors the groups.

The checkpoint tests run every config in auto mode and share the explicit modes out deterministically, to keep the
file within its time budget: the even-numbered configs of each optimizer (0 is the default) in the first, the
odd-numbered in the second, so each (config, mode) is in one of them:

* with the modalities interleaved in the user's group: the split records the positions, ``state_dict()["param_groups"]``
  mirrors ``opt.param_groups`` (count, order, keys, torch's numbering) and a ``torch.save``/``weights_only=True``
  checkpoint resumes a freshly built wrapper bit for bit, with the gammas set before saving;
* a plain optimizer's checkpoint saved before wrapping (one group, interleaved) loads into the wrapper and the run
  continues as the reference's (contiguous too, on the default configs in auto mode).

Each optimizer's default config (the protocol does not depend on the config), in auto mode: copies (deepcopy and
pickle; deepcopy with a scheduler attached), step hooks (wrapper, inner, global), state-dict hooks; in every mode:
resume through ``torch.distributed.checkpoint.state_dict`` on one process (contiguous and interleaved), named
parameters. LR schedulers (optim_db's ``scheduler_inputs``): the default config and the first tensor-lr config, auto
mode (SGD's "lr" mode too). Tensor-lr groups: every tensor-lr config and mode.

torch's own test helpers need ``expecttest`` (a ``test`` extra).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from itertools import zip_longest
from typing import Any, NamedTuple

import pytest
import torch
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_of, standard_state
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pdmp_optim import PDMPOptimizer
from pdmp_optim.reference import PDMPReference


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

PASS_THROUGH = {"audio": 1.0, "visual": 1.0}
NEW_GAMMAS = {"audio": 0.5, "visual": 3.0}  # set mid-run: a checkpoint must bring these back, not the built ones
AUTO_MODE = {"SGD": "grad", "ASGD": "grad", "Rprop": "update", "Adafactor": "update"}  # every other one: "lr"
# the explicit modes that hold for an optimizer without a warning ("grad" warns off the SGD family, "lr" on Rprop and
# Adafactor, whose update is not proportional to lr)
EXPLICIT = {"SGD": ("lr", "update"), "ASGD": ("lr", "update"), "Rprop": (), "Adafactor": ()}
STEPS = 3


class Tolerance(NamedTuple):
    """How far the parameters and the per-parameter state of two runs may be apart (empty: bit for bit)."""

    params: dict[str, float]
    state: dict[str, float]


EXACT = Tolerance({}, {})
# "update" mode and SGD's "lr" mode compute the reference's steps with other roundings. Measured over every config
# and test here (the worst: RMSprop, centered, with momentum, maximize): in "update" mode the parameters need atol
# 1.7e-6 at rtol 1e-5, the state 1.3e-5 (gradients at parameters that differ by those roundings feed the
# accumulators); in SGD's "lr" mode the parameters were equal and the momentum within rtol 1e-5 (2.4e-7 apart).
UPDATE_TOL = Tolerance({"rtol": 1e-5, "atol": 4e-6}, {"rtol": 1e-5, "atol": 3e-5})
SGD_LR_TOL = Tolerance({"rtol": 1e-5, "atol": 1e-7}, {"rtol": 1e-5, "atol": 1e-7})
MODALITIES = ("audio", "visual")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny; Muon's bfloat16 matmuls still open an OpenMP region, which on a busy 2-core
    machine waits for a descheduled thread (milliseconds per matmul, a minute over the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SparseTwoModal(nn.Module):
    """``TwoModal`` with sparse embeddings, for SparseAdam (which takes sparse gradients only): two audio tables, one
    visual table and a head table, so that a round-robin order interleaves the modalities."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.audio = nn.ModuleList([nn.Embedding(7, 4, sparse=True), nn.Embedding(7, 4, sparse=True)])
            self.visual = nn.Embedding(9, 4, sparse=True)
            self.head = nn.Embedding(5, 8, sparse=True)

    def groups(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}

    def loss(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        ia, iv, ih = (torch.randint(n, (6,), generator=g) for n in (7, 9, 5))
        z = torch.tanh(torch.cat([self.audio[0](ia) + self.audio[1](ia), self.visual(iv)], dim=1))
        return nn.functional.mse_loss((z * self.head(ih)).sum(1), torch.randn(6, generator=g))


# ---------------------------------------------------------------------------------------------------- the cases
class Case(NamedTuple):
    """One optim_db optimizer with one of its configs."""

    info: Any
    kwargs: dict[str, Any]
    desc: str
    number: int  # its place in the optimizer's optim_db list (0: the default)

    @property
    def name(self) -> str:
        return self.info.optim_cls.__name__

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return self.info.optim_cls

    def model(self) -> nn.Module:
        """A fresh model, the same initial weights every time."""
        kind = "sparse" if self.info.only_supports_sparse_grads else "matrices" if self.name == "Muon" else "dense"
        return copy.deepcopy(_prototype(kind))

    def inner(self, model: nn.Module, layout: str = "contiguous", named: bool = False) -> torch.optim.Optimizer:
        """The optimizer as a user builds it: one group over the trainable parameters (its own tensor lr)."""
        params = _ordered(model, layout)
        return self.cls(params if named else [p for _, p in params], **copy.deepcopy(self.kwargs))

    def loss(self, model: nn.Module, t: int) -> Tensor:
        return model.loss(t) if isinstance(model, SparseTwoModal) else loss_of(model, t)

    def step(self, opt: torch.optim.Optimizer, model: nn.Module, t: int) -> Tensor:
        """zero_grad, backward on batch ``t`` and step."""
        opt.zero_grad()
        loss = self.loss(model, t)
        loss.backward()
        opt.step()
        return loss


@functools.cache
def _prototype(kind: str) -> nn.Module:
    """Copied rather than built for each run: seeding (``torch.manual_seed``) records a stack trace per lazy device,
    which under pytest's deep stacks costs ten times what the whole copy does."""
    if kind == "sparse":
        return SparseTwoModal()
    model = TwoModal()
    if kind == "matrices":  # Muon takes 2-D parameters only: the biases stay as they are
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith("bias"))
    return model


def _ordered(model: nn.Module, layout: str) -> list[tuple[str, Tensor]]:
    """The trainable ``(name, parameter)`` pairs: by module ("contiguous"), or round robin over audio, visual and
    head ("interleaved": a0, v0, h0, a1, ...), so that the user's one group mixes the modalities."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layout == "contiguous":
        return params
    rows = [[(n, p) for n, p in params if n.startswith(prefix)] for prefix in ("audio.", "visual.", "head.")]
    return [pair for row in zip_longest(*rows) for pair in row if pair is not None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _modes(name: str) -> tuple[str, ...]:
    return ("auto", *EXPLICIT.get(name, ("update",)))


CONFIGS = [
    Case(info, cfg.kwargs, cfg.desc, number)
    for info in OPTIM_DB.values()
    for number, cfg in enumerate(info.optim_inputs_func(device="cpu", dtype=torch.float32))
]
USABLE = [case for case in CONFIGS if case.name != "LBFGS"]
REFUSED = [pytest.param(case, id=_slug(case.desc)) for case in CONFIGS if case.name == "LBFGS"]
DEFAULT = [case for case in USABLE if case.desc == "default"]
RUNS = [
    pytest.param(case, mode, id=f"{case.name}-{_slug(case.desc)}-{mode}")
    for case in USABLE
    for mode in _modes(case.name)
]
# the two checkpoint tests share the explicit modes out (the time budget): every config in auto mode in both, the
# explicit modes on the even-numbered configs in the one and the odd-numbered in the other
RESUME_RUNS = [p for p in RUNS if p.values[1] == "auto" or p.values[0].number % 2 == 0]
DEFAULT_AUTO = [pytest.param(case, id=case.name) for case in DEFAULT]
DEFAULT_RUNS = [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in DEFAULT for mode in _modes(case.name)]
DEFAULT_AUTO_RUNS = [p for p in DEFAULT_RUNS if p.values[1] == "auto"]
PLAIN_RUNS = [
    pytest.param(*p.values, "interleaved", id=f"{p.id}-interleaved")
    for p in RUNS
    if p.values[1] == "auto" or p.values[0].number % 2 == 1
] + [pytest.param(*p.values, "contiguous", id=f"{p.id}-contiguous") for p in DEFAULT_AUTO_RUNS]
TENSOR_LR_RUNS = [p for p in RUNS if isinstance(p.values[0].kwargs.get("lr"), Tensor)]


def wrap(case: Case, mode: str, gammas: Mapping[str, float] = GAMMAS, layout: str = "contiguous", named: bool = False):
    """``(model, PDMPOptimizer)`` over a fresh model."""
    model = case.model()
    inner = case.inner(model, layout, named)
    opt = PDMPOptimizer(inner, model.groups(), gammas=gammas, mode=mode)
    assert opt.optimizer is inner and opt.param_groups is inner.param_groups
    if mode == "auto":
        assert opt.mode == AUTO_MODE.get(case.name, "lr")
    else:
        assert opt.mode == mode
    return model, opt


def reference(case: Case, mode: str, gammas: Mapping[str, float] = GAMMAS, layout: str = "contiguous"):
    """``(model, PDMPReference)`` over a fresh model, built with the same arguments as :func:`wrap`'s."""
    model = case.model()
    return model, PDMPReference(case.inner(model, layout), model.groups(), gammas=gammas, mode=mode)


def tolerance(case: Case, mode: str) -> Tolerance:
    """Bit for bit, except where the reference rounds otherwise by construction (see ``UPDATE_TOL``)."""
    resolved = AUTO_MODE.get(case.name, "lr") if mode == "auto" else mode
    return UPDATE_TOL if resolved == "update" else SGD_LR_TOL if (resolved, case.name) == ("lr", "SGD") else EXACT


# ------------------------------------------------------------------------------------------------ comparisons
def assert_same(a: Any, b: Any, where: str = "", **tol: float) -> None:
    """``a`` equals ``b`` (tensors nested in dicts/lists/tuples), bit for bit unless ``rtol``/``atol`` are given."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{where}: {a!r} != {b!r}"
        a, b = (x.to_dense() if x.is_sparse else x for x in (a, b))
        if tol:
            torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{where}: {m}")
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]", **tol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", **tol)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(
    model_a: nn.Module, opt_a: Any, model_b: nn.Module, opt_b: Any, what: str = "", tol: Tolerance = EXACT
) -> None:
    """The same parameters and the same per-parameter optimizer state (standard units)."""
    assert_same_params(model_a, model_b, **tol.params)
    assert_same(standard_state(opt_a, model_a), standard_state(opt_b, model_b), f"state{what}", **tol.state)


def lr_by_name(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Each parameter's learning rate, by name (comparable across group layouts)."""
    lrs = {p: float(g["lr"]) for g in opt.param_groups for p in g["params"]}
    return {n: lrs[p] for n, p in model.named_parameters() if p in lrs}


def assert_one_modality_per_group(opt: PDMPOptimizer, model: nn.Module, gammas: Mapping[str, float]) -> None:
    """Every group holds one modality, says which and carries its gamma (1.0 for the shared parameters)."""
    of = {p: m for m, module in model.groups().items() for p in module.parameters()}
    for group in opt.param_groups:
        assert {of.get(p) for p in group["params"]} == {group["modality"]}, group["modality"]
        assert group["pdmp_gamma"] == (1.0 if group["modality"] is None else gammas[group["modality"]])


def assert_mirrors_param_groups(opt: PDMPOptimizer, state_dict: Mapping[str, Any]) -> None:
    """``state_dict["param_groups"]`` has ``opt.param_groups``' count, order and keys, every non-"params" value
    equal, and parameters numbered as torch numbers them (in order of first appearance across the groups); SGD's
    lr-mode momentum is saved in standard units (``pdmp_momentum_scale`` 1.0, the buffer times the live scale in
    float64)."""
    saved = state_dict["param_groups"]
    assert len(saved) == len(opt.param_groups), (len(saved), len(opt.param_groups))
    index: dict[int, int] = {}
    scale: dict[int, float] = {}
    for i, (packed, group) in enumerate(zip(saved, opt.param_groups, strict=True)):
        assert set(packed) == set(group), f"group {i}: keys {sorted(packed)} != {sorted(group)}"
        for key in group.keys() - {"params", "pdmp_momentum_scale"}:
            assert_same(packed[key], group[key], f"group {i}[{key!r}]")
        assert packed.get("pdmp_momentum_scale", 1.0) == 1.0
        for p in group["params"]:
            scale[index.setdefault(id(p), len(index))] = group.get("pdmp_momentum_scale", 1.0)
        assert packed["params"] == [index[id(p)] for p in group["params"]], f"group {i}: {packed['params']}"
    params = {index[id(p)]: p for group in opt.param_groups for p in group["params"]}
    assert set(state_dict["state"]) == {i for i, p in params.items() if opt.state.get(p)}
    for i, entry in state_dict["state"].items():
        live = dict(opt.state[params[i]])
        if scale[i] != 1.0 and live.get("momentum_buffer") is not None:
            live["momentum_buffer"] = live["momentum_buffer"].double() * scale[i]
        assert_same(entry, live, f"state[{i}]")


def assert_split_from(opt: PDMPOptimizer, user_group: list[Tensor]) -> None:
    """Each group's ``"pdmp_split"`` points at its parameters' places in the group the user built."""
    seen = []
    for group in opt.param_groups:
        size, positions = group["pdmp_split"]
        assert size == len(user_group) and [user_group[i] for i in positions] == group["params"]
        seen += positions
    assert sorted(seen) == list(range(len(user_group)))


def roundtrip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------ the PDMP promise
@pytest.mark.parametrize("mode", ["auto", "grad", "lr", "update"])
@pytest.mark.parametrize("case", REFUSED)
def test_lbfgs_is_refused_in_every_mode_with_the_reason(case: Case, mode: str) -> None:
    model = case.model()
    inner = case.inner(model)
    before = copy.deepcopy(inner.param_groups)
    with pytest.raises(ValueError, match=r"LBFGS .*no PDMP mode multiplies its update by gamma; use another optimizer"):
        PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode=mode)
    assert_same(inner.param_groups, before, "the refused optimizer's groups")


@pytest.mark.parametrize(("case", "mode"), RUNS)
def test_real_gammas_take_the_reference_steps_and_pass_through_gammas_the_bare_ones(case: Case, mode: str) -> None:
    """Four runs side by side: real gammas against ``PDMPReference``, pass-through gammas (all 1.0) against the bare
    optimizer, bit for bit; the real gammas move each modality off the bare trajectory."""
    model, opt = wrap(case, mode)
    ref_model, ref = reference(case, mode)
    assert ref.mode == opt.mode
    assert repr(opt).startswith(f"PDMPOptimizer(mode={opt.mode!r} ({'auto:' if mode == 'auto' else 'explicit'}")
    assert_one_modality_per_group(opt, model, GAMMAS)
    through_model, through = wrap(case, mode, PASS_THROUGH)
    bare_model = case.model()
    bare = case.inner(bare_model)
    (user_group,) = copy.deepcopy(bare.param_groups)
    tol = tolerance(case, mode)
    for t in range(STEPS):
        assert_same(case.step(opt, model, t), case.step(ref, ref_model, t), f"loss {t}", **tol.params)
        assert_same_run(model, opt, ref_model, ref, f" after step {t + 1}", tol)
        assert_same(case.step(through, through_model, t), case.step(bare, bare_model, t), f"pass-through loss {t}")
        assert_same_run(through_model, through, bare_model, bare, f" after pass-through step {t + 1}")
    for modality in MODALITIES:
        pairs = zip(model.groups()[modality].parameters(), bare_model.groups()[modality].parameters(), strict=True)
        assert any(not torch.equal(p, q) for p, q in pairs), f"{modality} took the bare optimizer's steps"
    settings = {k: v for k, v in user_group.items() if k != "params"}
    for group in through.param_groups:  # split into one group per modality, the user's settings unchanged
        assert_same({k: group[k] for k in settings}, settings, f"the {group['modality']} group's settings")
    assert_mirrors_param_groups(opt, opt.state_dict())


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(("case", "mode"), RESUME_RUNS)
def test_state_dict_mirrors_the_groups_and_resumes_bit_for_bit_with_the_saved_gammas(case: Case, mode: str) -> None:
    """With the modalities interleaved in the user's group: the split keeps first-appearance order and records the
    positions; ``state_dict()`` mirrors the groups and, through ``torch.save``/``weights_only=True``, resumes a freshly
    built wrapper bit for bit, with the gammas set before saving."""
    model, opt = wrap(case, mode, layout="interleaved")
    assert [g["modality"] for g in opt.param_groups] == ["audio", "visual", None]  # order of first appearance
    assert_split_from(opt, [p for _, p in _ordered(model, "interleaved")])
    for t in range(2):
        case.step(opt, model, t)
    opt.gammas = NEW_GAMMAS
    case.step(opt, model, 2)
    saved = opt.state_dict()
    assert "pdmp" not in saved
    assert_mirrors_param_groups(opt, saved)
    if opt.mode == "lr" and case.name == "SGD":  # momentum in standard units, in the groups and the checkpoint alike
        assert [g.get("pdmp_momentum_scale", 1.0) for g in saved["param_groups"]] == [1.0] * len(saved["param_groups"])
        assert all("pdmp_momentum_scale" in g for g in saved["param_groups"] if g["pdmp_gamma"] != 1.0)
    loaded = roundtrip(saved)
    resumed_model, resumed = wrap(case, mode, layout="interleaved")  # built with GAMMAS: NEW_GAMMAS must win
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(loaded)
    assert dict(resumed.gammas) == NEW_GAMMAS
    assert_one_modality_per_group(resumed, resumed_model, NEW_GAMMAS)
    for t in (3, 4):
        assert_same(case.step(resumed, resumed_model, t), case.step(opt, model, t), f"loss {t}")
    assert_same_run(resumed_model, resumed, model, opt)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize(("case", "mode"), DEFAULT_RUNS)
def test_resume_through_distributed_checkpoint_on_one_process(case: Case, mode: str, layout: str) -> None:
    """``get_optimizer_state_dict``/``set_optimizer_state_dict`` without a process group (parameters by name)."""
    model, opt = wrap(case, mode, layout=layout)
    for t in range(2):
        case.step(opt, model, t)
    opt.gammas = NEW_GAMMAS
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    names = {p: n for n, p in model.named_parameters()}
    assert [(g["modality"], g["params"]) for g in saved["param_groups"]] == [
        (g["modality"], [names[p] for p in g["params"]]) for g in opt.param_groups
    ]
    resumed_model, resumed = wrap(case, mode, layout=layout)
    resumed_model.load_state_dict(model.state_dict())
    refusal = _dcp_refusal(case)  # DCP first steps an optimizer without state on zero (dense) gradients
    if refusal is not None:  # SparseAdam refuses dense gradients, bare or wrapped
        with pytest.raises(RuntimeError, match=re.escape(refusal)):
            set_optimizer_state_dict(resumed_model, resumed, saved)
        return
    set_optimizer_state_dict(resumed_model, resumed, saved)
    assert dict(resumed.gammas) == NEW_GAMMAS
    for t in (2, 3):
        assert_same(case.step(resumed, resumed_model, t), case.step(opt, model, t), f"loss {t}")
    assert_same_run(resumed_model, resumed, model, opt)


_DCP_REFUSALS: dict[str, str | None] = {}


def _dcp_refusal(case: Case) -> str | None:
    """What DCP's state initialisation of the bare optimizer raises, if anything (probed once per optimizer)."""
    if case.name not in _DCP_REFUSALS:
        model = case.model()
        try:
            get_optimizer_state_dict(model, case.inner(model))
        except RuntimeError as error:
            _DCP_REFUSALS[case.name] = str(error)
        else:
            _DCP_REFUSALS[case.name] = None
    return _DCP_REFUSALS[case.name]


@pytest.mark.parametrize(("case", "mode", "layout"), PLAIN_RUNS)
def test_plain_state_dict_saved_before_wrapping_continues_like_the_reference(
    case: Case, mode: str, layout: str
) -> None:
    """A checkpoint of the bare optimizer (the user's one group) loads into the wrapper, which keeps its gammas."""
    bare_model = case.model()
    bare = case.inner(bare_model, layout)
    for t in range(2):
        case.step(bare, bare_model, t)
    plain = bare.state_dict()
    model, opt = wrap(case, mode, layout=layout)
    ref_model, ref = reference(case, mode, layout=layout)
    for m, o in ((model, opt), (ref_model, ref.optimizer)):
        m.load_state_dict(bare_model.state_dict())
        o.load_state_dict(copy.deepcopy(plain))
    assert dict(opt.gammas) == GAMMAS
    assert_one_modality_per_group(opt, model, GAMMAS)
    tol = tolerance(case, mode)
    for t in (2, 3):
        assert_same(case.step(opt, model, t), case.step(ref, ref_model, t), f"loss {t}", **tol.params)
    assert_same_run(model, opt, ref_model, ref, tol=tol)


# ------------------------------------------------------------------------------------------------ the protocol
def _clone(objects: Any, how: str) -> Any:
    return copy.deepcopy(objects) if how == "deepcopy" else pickle.loads(pickle.dumps(objects))


@pytest.mark.parametrize(("how", "scheduled"), [("deepcopy", False), ("pickle", False), ("deepcopy", True)])
@pytest.mark.parametrize("case", DEFAULT_AUTO)
def test_copies_step_only_themselves_and_continue_identically(case: Case, how: str, scheduled: bool) -> None:
    model, opt = wrap(case, "auto")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduled else None
    for t in range(2):
        case.step(opt, model, t)
        if scheduler is not None:
            scheduler.step()
    clone_model, clone, clone_scheduler = _clone((model, opt, scheduler), how)  # the model and its optimizer together
    assert isinstance(clone, PDMPOptimizer) and clone.mode == opt.mode and dict(clone.gammas) == GAMMAS
    before = copy.deepcopy((model.state_dict(), standard_state(opt, model)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler warning from the copy either
        case.step(clone, clone_model, 2)
        if clone_scheduler is not None:
            clone_scheduler.step()
    assert_same((model.state_dict(), standard_state(opt, model)), before, "the original after the copy's step")
    case.step(opt, model, 2)
    if scheduler is not None:
        scheduler.step()
        assert lr_by_name(clone, clone_model) == lr_by_name(opt, model)
    case.step(clone, clone_model, 3)
    case.step(opt, model, 3)
    assert_same_run(clone_model, clone, model, opt)


@pytest.mark.parametrize("kind", ["wrapper", "inner", "global"])
@pytest.mark.parametrize("case", DEFAULT_AUTO)
def test_step_hooks_fire_once_per_step_and_their_results_are_used(case: Case, kind: str) -> None:
    """A pre hook that replaces the closure (its result) runs once per step, before the post hook."""
    model, opt = wrap(case, "auto")
    ref_model, ref = reference(case, "auto")
    calls: list[tuple[str, Any]] = []

    def pre(o: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        calls.append(("pre", o))
        closure = args[1] if len(args) > 1 else kwargs["closure"]  # args[0] is the optimizer stepped

        def replaced() -> Tensor:
            calls.append(("closure", None))
            return closure()

        return (args[0], replaced), {}

    def post(o: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(("post", o))

    if kind == "global":
        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    else:
        target = opt if kind == "wrapper" else opt.optimizer
        handles = [target.register_step_pre_hook(pre), target.register_step_post_hook(post)]
    expected = opt.optimizer if kind == "inner" else opt
    try:
        for t in range(2):
            returned: list[Tensor] = []

            def closure(t: int = t, returned: list[Tensor] = returned) -> Tensor:
                opt.zero_grad()
                loss = case.loss(model, t)
                loss.backward()
                returned.append(loss)
                return loss

            loss = opt.step(closure)
            assert calls == [("pre", expected), ("closure", None), ("post", expected)], calls
            assert loss is returned[0]
            calls.clear()
    finally:
        for handle in handles:
            handle.remove()
    for t in range(2):
        case.step(ref, ref_model, t)
    assert_same_run(model, opt, ref_model, ref, tol=tolerance(case, "auto"))


@pytest.mark.parametrize("case", DEFAULT_AUTO)
def test_state_dict_hooks_fire_once_and_their_results_are_used(case: Case) -> None:
    model, opt = wrap(case, "auto")
    case.step(opt, model, 0)
    calls: list[tuple[str, Any]] = []

    def post_save(o: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append(("save post", o))
        return {**state_dict, "extra": 1}

    def pre_load(o: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append(("load pre", o))
        assert state_dict["extra"] == 1
        groups = [{**g, "lr": 0.0123} for g in state_dict["param_groups"]]
        return {k: v for k, v in state_dict.items() if k != "extra"} | {"param_groups": groups}

    opt.register_state_dict_pre_hook(lambda o: calls.append(("save pre", o)))
    opt.register_state_dict_post_hook(post_save)
    opt.register_load_state_dict_pre_hook(pre_load)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o)))
    inner = opt.optimizer
    inner.register_state_dict_pre_hook(lambda o: calls.append(("inner save pre", o)))
    inner.register_load_state_dict_post_hook(lambda o: calls.append(("inner load post", o)))
    saved = opt.state_dict()
    assert saved["extra"] == 1 and "pdmp" not in saved
    assert calls == [("save pre", opt), ("inner save pre", inner), ("save post", opt)], calls
    calls.clear()
    opt.load_state_dict(saved)
    assert calls == [("load pre", opt), ("inner load post", inner), ("load post", opt)], calls
    assert [g["lr"] for g in opt.param_groups] == [0.0123] * len(opt.param_groups)
    assert_one_modality_per_group(opt, model, GAMMAS)


def _scheduler_runs() -> list[Any]:
    out = []
    for case in USABLE:
        tensor_lr = [c for c in USABLE if c.name == case.name and isinstance(c.kwargs.get("lr"), Tensor)][:1]
        if case.desc != "default" and case not in tensor_lr:
            continue
        for mode in ("auto", "lr") if case.name == "SGD" else ("auto",):
            for i in range(len(case.info.scheduler_inputs)):
                out.append(pytest.param(case, mode, i, id=f"{case.name}-{_slug(case.desc)}-{mode}-{i}"))
    return out


@pytest.mark.parametrize(("case", "mode", "index"), _scheduler_runs())
def test_schedulers_drive_the_wrapper_like_the_reference_without_warnings(case: Case, mode: str, index: int) -> None:
    model, opt = wrap(case, mode)
    ref_model, ref = reference(case, mode)
    makers = case.info.scheduler_inputs[index]
    tol = tolerance(case, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedulers = [make(opt) for make in makers]
        ref_schedulers = [make(ref) for make in makers]
        for t in range(6):
            loss, ref_loss = case.step(opt, model, t), case.step(ref, ref_model, t)
            for scheduler in schedulers + ref_schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(float((loss if scheduler in schedulers else ref_loss).detach()))
                else:
                    scheduler.step()
            assert lr_by_name(opt, model) == lr_by_name(ref, ref_model), f"step {t + 1}"
            assert schedulers[-1].get_last_lr() == [float(g["lr"]) for g in opt.param_groups]
            assert_same_run(model, opt, ref_model, ref, f" after step {t + 1}", tol)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]


@pytest.mark.parametrize(("case", "mode"), TENSOR_LR_RUNS)
def test_tensor_lr_groups_stay_independent_after_the_split(case: Case, mode: str) -> None:
    """Each group got its own lr tensor; one changed in place (as a scheduler does) changes that group only."""
    model, opt = wrap(case, mode)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, Tensor) for lr in lrs) and len({lr.data_ptr() for lr in lrs}) == len(lrs)
    # the reference's optimizer is built with the same groups, each with its own lr tensor
    ref_model = case.model()
    names = {p: n for n, p in model.named_parameters()}
    params = dict(ref_model.named_parameters())
    groups = [
        {**copy.deepcopy(case.kwargs), "params": [params[names[p]] for p in g["params"]]} for g in opt.param_groups
    ]
    ref = PDMPReference(case.cls(groups, **copy.deepcopy(case.kwargs)), ref_model.groups(), gammas=GAMMAS, mode=mode)
    tol = tolerance(case, mode)
    case.step(opt, model, 0)
    case.step(ref, ref_model, 0)
    assert [g["lr"] for g in opt.param_groups] == lrs and all(
        g["lr"] is lr for g, lr in zip(opt.param_groups, lrs, strict=True)
    ), "the step did not put the groups' own lr tensors back"
    visual = next(i for i, g in enumerate(opt.param_groups) if g["modality"] == "visual")
    for o in (opt, ref):
        o.param_groups[visual]["lr"].fill_(0.005)
    assert [float(lr) for i, lr in enumerate(lrs) if i != visual] == [float(case.kwargs["lr"])] * (len(lrs) - 1)
    for t in (1, 2):
        case.step(opt, model, t)
        case.step(ref, ref_model, t)
    assert lr_by_name(opt, model) == lr_by_name(ref, ref_model)
    assert_same_run(model, opt, ref_model, ref, tol=tol)


@pytest.mark.parametrize(("case", "mode"), DEFAULT_RUNS)
def test_named_parameters_keep_their_names_through_split_step_and_resume(case: Case, mode: str) -> None:
    model, opt = wrap(case, mode, layout="interleaved", named=True)
    names = {p: n for n, p in model.named_parameters()}

    def assert_names(o: torch.optim.Optimizer, m: nn.Module, where: str) -> None:
        of = {p: n for n, p in m.named_parameters()}
        for group in o.param_groups:
            assert group["param_names"] == [of[p] for p in group["params"]], where

    assert_names(opt, model, "after the split")
    for t in range(2):
        case.step(opt, model, t)
    assert_names(opt, model, "after the steps")
    saved = copy.deepcopy(opt.state_dict())
    assert [g["param_names"] for g in saved["param_groups"]] == [
        [names[p] for p in g["params"]] for g in opt.param_groups
    ]
    resumed_model, resumed = wrap(case, mode, layout="interleaved", named=True)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert_names(resumed, resumed_model, "after the resume")
    for t in (2, 3):
        case.step(resumed, resumed_model, t)
        case.step(opt, model, t)
    assert_same_run(resumed_model, resumed, model, opt)
