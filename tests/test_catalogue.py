"""Auto mode on every optimizer of torch.optim, pytorch_optimizer and schedulefree: each follows its mode's
reference, or is refused with a message naming the way out.

Each optimizer is built with default arguments (a learning rate, ``num_iterations`` or ``num_data`` where one is
required) over :class:`TwoModal`, wrapped by ``PDMPOptimizer`` in auto mode with ``GAMMAS4``, and

1. after three steps equals its mode's reference: ``grad`` = the bare optimizer on gradients multiplied by gamma,
   ``lr`` = the bare optimizer built with one group per modality and ``lr * gamma`` (weight decay / gamma where
   :func:`~pdmp_optim.modes.compensates_decay` says so), ``update`` = the bare step, then ``p_old + gamma * (p -
   p_old)``; bit for bit, ``update`` to rounding;
2. in ``lr`` and ``update`` modes, one step from a trained state (20 bare steps) moves each modality gamma times
   the bare step (1%) and the shared head as the bare step; in ``update`` mode five steps do, too (5%), which an
   optimizer that rebuilds its parameters from its own state would not. For the optimizers in ``OWN_BUSINESS`` a
   larger ``lr`` does not move the modality gamma times as far (their own response to a larger lr, measured with
   the lr multiplied by hand): they take exactly the step of lr-by-hand instead.

Optimizers in ``REFUSED`` must be refused at construction. Optimizers that cannot be built or stepped with
default arguments on CPU are skipped with the reason. pytorch_optimizer's wrappers (Lookahead, TRAC, OrthoGrad,
the SAM family, ScheduleFreeWrapper, Magma, PCGrad, SafeFP16Optimizer) are tried around SGD and AdamW.
Nothing is sampled: every optimizer runs (about 20 s on 2 cores, with conftest's one intra-op thread).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _helpers import TwoModal, assert_same_params, loss_of
from torch.optim import Optimizer

from pdmp_optim import PDMPOptimizer
from pdmp_optim.modes import compensates_decay

GAMMAS4 = {"audio": 4.0, "visual": 0.25}
INSTALL = "pip install pytorch_optimizer schedulefree (or pip install -e '.[test]')"
Make = Callable[[Any, TwoModal], Optimizer]


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


po, sf = _optional("pytorch_optimizer"), _optional("schedulefree")

# ------------------------------------------------------------------------------------------ expectations
# a larger lr does not move these gamma times as far; PDMP's step is exactly lr-by-hand's (numbers: one step
# from the trained state, audio/visual ratio with gammas 4 and 1/4, measured with pytorch_optimizer 4.1.0,
# schedulefree 1.4.1)
_SCHEDULE_FREE = "its average x weights each step by lr_max^2, so a larger lr also moves the average (11.7/0.57)"
OWN_BUSINESS = {
    "pytorch_optimizer.accsgd": "its momentum buffer mixes lr-scaled gradients with the parameters (4.04/0.279)",
    "pytorch_optimizer.adamod": "it caps each step by a running average of past step sizes (1.02/0.996)",
    "pytorch_optimizer.bsam": "from a trained state its step does not grow with lr (1.0/1.0)",
    "pytorch_optimizer.ftrl": "its parameters are lr times a function of its state, not a sum of steps (3230/551)",
    "pytorch_optimizer.laprop": "its bias correction divides by a running average of past lrs (4.58/0.251)",
    "pytorch_optimizer.asgd": "its own lr schedule is capped by a curvature term, so a larger lr barely moves it",
    "pytorch_optimizer.madgrad": "dual averaging: lr weights the sums it rebuilds the parameters from (1.55/0.913)",
    "pytorch_optimizer.schedulefreeradam": _SCHEDULE_FREE,
    "pytorch_optimizer.ScheduleFreeWrapper(SGD)": _SCHEDULE_FREE,
    "pytorch_optimizer.ScheduleFreeWrapper(AdamW)": _SCHEDULE_FREE,
    **{
        f"schedulefree.{name}": _SCHEDULE_FREE
        for name in (
            "AdamWScheduleFree",
            "AdamWScheduleFreeClosure",
            "AdamWScheduleFreePaper",
            "AdamWScheduleFreeReference",
            "RAdamScheduleFree",
            "RAdamScheduleFreeClosure",
            "SGDScheduleFree",
            "SGDScheduleFreeClosure",
            "SGDScheduleFreeReference",
        )
    },
}
_NO_LR = r"param groups have no 'lr'; pass mode='grad' .* or mode='update'"
_NOT_AN_OPTIMIZER = r"optimizer must be a torch.optim.Optimizer instance, got ScheduleFreeWrapper"
_NO_MODE_KNOWN = r"knows no mode that multiplies .*step by gamma: it estimates one step size d from all groups"
_PER_GROUP_LISTS = ("adabound", "srmm", "schedulefreeadamw", "schedulefreesgd")
_PER_GROUP = r"base_lrs holds one entry per param group; build it with one param group per modality"
_LBFGS = r"no PDMP mode multiplies its update by gamma; use another optimizer"
REFUSED = {
    "torch.LBFGS": (ValueError, _LBFGS),
    "pytorch_optimizer.lbfgs": (ValueError, _LBFGS),
    "pytorch_optimizer.a2grad": (ValueError, _NO_LR),
    "pytorch_optimizer.alig": (ValueError, _NO_LR),
    **{f"pytorch_optimizer.{n}": (ValueError, _NO_MODE_KNOWN) for n in ("prodigy", "dadaptsgd", "dadaptadagrad")},
    # a list with one entry per group (base_lrs): a split would leave it out of step, so a mixed group is refused
    **{
        f"pytorch_optimizer.{n}": (ValueError, _PER_GROUP)
        for n in ("adabound", "srmm", "schedulefreeadamw", "schedulefreesgd")
    },
    "pytorch_optimizer.SafeFP16Optimizer(SGD)": (TypeError, r"SafeFP16Optimizer.*mode"),
    "pytorch_optimizer.SafeFP16Optimizer(AdamW)": (TypeError, r"SafeFP16Optimizer.*mode"),
    **{
        f"schedulefree.{wrapper}({inner})": (TypeError, _NOT_AN_OPTIMIZER)
        for wrapper in ("ScheduleFreeWrapper", "ScheduleFreeWrapperReference")
        for inner in ("SGD", "AdamW")
    },
}
CORE_BUGS: dict[str, str] = {}  # name -> "core bug: ..." (strict xfail): none known
CLOSURE = ("bsam", "SAM(", "LookSAM(", "FriendlySAM(", "WSAM(", "Closure")  # step(closure) only
CREATE_GRAPH = ("adahessian", "sophiah")  # Hessian-vector products: backward(create_graph=True)


# ---------------------------------------------------------------------------------------------- catalogues
def _build(cls: type, params: Any, model: TwoModal) -> torch.optim.Optimizer:
    """``cls`` with default arguments, plus those it requires (a learning rate, ``num_iterations``, ``num_data``)."""
    signature = inspect.signature(cls.__init__)
    names = list(signature.parameters)[1:]
    required = {"num_iterations": 100, "num_data": 8}
    extra = {k: v for k, v in required.items() if k in names and signature.parameters[k].default is inspect._empty}
    if names and names[0] == "model":  # AdamMini, LOMO: built from the model
        return cls(model, **extra)
    try:
        return cls(params, **extra)
    except (TypeError, ValueError) as error:
        if "lr" not in str(error) and "learning" not in str(error).lower():
            raise
        return cls(params, lr=1e-3, **extra)


def _defaults(cls: type) -> Make:
    return lambda params, model: _build(cls, params, model)


def _wrapper(cls: type, inner: type, takes: str) -> Make:
    """``cls(inner(params))``, or for the SAM family ``cls(params, inner)`` (WSAM: ``cls(model, params, inner)``)."""
    if takes == "optimizer":
        return lambda params, model: cls(inner(params))
    if cls.__name__ == "WSAM":
        return lambda params, model: cls(model, params, inner)
    return lambda params, model: cls(params, inner)


def torch_catalogue() -> dict[str, Make]:
    classes = sorted((n, c) for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, Optimizer))
    return {f"torch.{name}": _defaults(cls) for name, cls in classes if cls is not Optimizer}


def pytorch_optimizer_catalogue() -> dict[str, Make]:
    if po is None:
        return {}
    out = {f"pytorch_optimizer.{name}": _defaults(po.load_optimizer(name)) for name in po.get_supported_optimizers()}
    for inner_name, inner in (("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)):
        for name in ("Lookahead", "TRAC", "OrthoGrad", "ScheduleFreeWrapper", "Magma", "PCGrad", "SafeFP16Optimizer"):
            out[f"pytorch_optimizer.{name}({inner_name})"] = _wrapper(getattr(po, name), inner, "optimizer")
        for name in ("SAM", "LookSAM", "FriendlySAM", "WSAM"):  # built from the params and the optimizer class
            out[f"pytorch_optimizer.{name}({inner_name})"] = _wrapper(getattr(po, name), inner, "class")
    return out


def schedulefree_catalogue() -> dict[str, Make]:
    if sf is None:
        return {}
    out: dict[str, Make] = {}
    for name, cls in sorted(vars(sf).items()):
        if not isinstance(cls, type):
            continue
        if name.startswith("ScheduleFreeWrapper"):  # not torch.optim.Optimizer subclasses
            for inner_name, inner in (("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)):
                out[f"schedulefree.{name}({inner_name})"] = _wrapper(cls, inner, "optimizer")
        else:
            out[f"schedulefree.{name}"] = _defaults(cls)
    return out


CATALOGUE = {**torch_catalogue(), **pytorch_optimizer_catalogue(), **schedulefree_catalogue()}


def _params(prefix: str) -> list[Any]:
    names = [n for n in CATALOGUE if n.startswith(prefix + ".")] or [f"{prefix} (not installed)"]
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=CORE_BUGS[n])) if n in CORE_BUGS else n
            for n in names]  # fmt: skip


# -------------------------------------------------------------------------------------------------- loops
def _style(name: str) -> str:
    if any(key in name for key in CLOSURE):
        return "closure"
    return "create_graph" if any(key in name for key in CREATE_GRAPH) else "plain"


def _train(opt: Any) -> None:
    """schedule-free optimizers step in train mode (``train()`` reached through PDMPOptimizer, too)."""
    if callable(getattr(opt, "train", None)):
        opt.train()


def _step(model: TwoModal, opt: Any, index: int, style: str, scale: Callable[[], None] | None = None) -> None:
    """One training step on batch ``index``; ``scale`` (grad mode's reference) runs after every backward."""

    def backward() -> torch.Tensor:
        loss = loss_of(model, index)
        loss.backward(create_graph=style == "create_graph")
        if scale is not None:
            scale()
        return loss

    def closure() -> torch.Tensor:
        model.zero_grad()
        return backward()

    torch.manual_seed(index)  # optimizers that draw random numbers draw the same ones in every run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
        opt.zero_grad()
        backward()
        opt.step(closure) if style == "closure" else opt.step()


def _moved(model: TwoModal, before: list[torch.Tensor]) -> dict[str | None, float]:
    """The length of the step of each modality (``None``: the head)."""
    of = {p: m for m, ps in model.modality_params().items() for p in ps}
    squares: dict[str | None, float] = {}
    for p, old in zip(model.parameters(), before, strict=True):
        squares[of.get(p)] = squares.get(of.get(p), 0.0) + float(((p.detach() - old) ** 2).sum())
    return {m: math.sqrt(v) for m, v in squares.items()}


def _snapshot(model: TwoModal) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _by_modality(model: TwoModal) -> list[list[torch.Tensor]]:
    return [list(model.audio.parameters()), list(model.visual.parameters()), list(model.head.parameters())]


def _gamma(index: int) -> float:
    return [GAMMAS4["audio"], GAMMAS4["visual"], 1.0][index]


def _lr_by_hand(make: Make, model: TwoModal) -> torch.optim.Optimizer:
    """The bare optimizer with each modality's lr multiplied by its gamma (decay divided where compensated)."""
    template = make(TwoModal().trained(), TwoModal())
    base = template.param_groups[0]
    decay = compensates_decay(template, dict(base))
    groups = []
    for index, params in enumerate(_by_modality(model)):
        group: dict[str, Any] = {"params": params}
        if index < 2:
            group["lr"] = base["lr"] * _gamma(index)
            if decay:
                group["weight_decay"] = base["weight_decay"] / _gamma(index)
        groups.append(group)
    opt = make(groups, model)
    if len(opt.param_groups) != 3:  # built from the model (AdamMini): its own groups, one modality each
        opt = make(model.trained(), model)
        owner = {p: i for i, ps in enumerate(_by_modality(model)) for p in ps}
        for group in opt.param_groups:
            (index,) = {owner[p] for p in group["params"]}
            with contextlib.suppress(KeyError):
                group["lr"] = group["lr"] * _gamma(index)
    return opt


# ------------------------------------------------------------------------------------------------- checks
def check(name: str) -> None:
    make, style = CATALOGUE[name], _style(name)
    model = TwoModal()
    try:
        inner = make(model.trained(), model)
    except Exception as error:  # whatever it raises: it needs more than defaults
        pytest.skip(f"cannot be built with default arguments on CPU: {type(error).__name__}: {error}")
    if name in REFUSED:
        kind, match = REFUSED[name]
        with pytest.raises(kind, match=match):
            PDMPOptimizer(inner, model.groups(), gammas=GAMMAS4)
        return
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS4)
    bare_model = TwoModal()
    try:
        bare = make(bare_model.trained(), bare_model)
        _train(bare)
        _step(bare_model, bare, 0, style)
    except Exception as error:
        pytest.skip(f"cannot be stepped with default arguments on CPU: {type(error).__name__}: {error}")
    assert f"mode={opt.mode!r} (auto: " in repr(opt).splitlines()[0]
    follows_its_reference(name, opt, model)
    if opt.mode != "grad":
        moves_each_modality_gamma_times(name, opt.mode)


def follows_its_reference(name: str, opt: PDMPOptimizer, model: TwoModal) -> None:
    """Three steps equal the reference of the mode auto picked."""
    make, style = CATALOGUE[name], _style(name)
    ref_model = TwoModal()
    scale = None
    ref = _lr_by_hand(make, ref_model) if opt.mode == "lr" else make(ref_model.trained(), ref_model)
    if opt.mode == "grad":

        def scale() -> None:
            with torch.no_grad():
                for index, params in enumerate(_by_modality(ref_model)):
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(_gamma(index))

    _train(opt)
    _train(ref)
    for index in range(3):
        _step(model, opt, index, style)
        before = _snapshot(ref_model)
        _step(ref_model, ref, index, style, scale)
        if opt.mode == "update":
            with torch.no_grad():
                owner = {p: i for i, ps in enumerate(_by_modality(ref_model)) for p in ps}
                for p, old in zip(ref_model.parameters(), before, strict=True):
                    p.copy_(old + _gamma(owner[p]) * (p - old))
    if opt.mode == "update":
        assert_same_params(model, ref_model, rtol=1e-5, atol=1e-7)
    else:
        assert_same_params(model, ref_model)


def trained(name: str) -> tuple[TwoModal, Optimizer]:
    """20 bare steps, the optimizer built with one group per modality (as PDMP would split it)."""
    make, style = CATALOGUE[name], _style(name)
    model = TwoModal()
    groups = [{"params": params} for params in _by_modality(model)]
    try:
        opt = make(groups, model)
    except Exception:  # AdamMini and kin build their own groups from the model
        opt = make(model.trained(), model)
    _train(opt)
    for index in range(20):
        _step(model, opt, index, style)
    return model, opt


def moves_each_modality_gamma_times(name: str, mode: str) -> None:
    """One step from a trained state moves each modality gamma times the bare step (OWN_BUSINESS: lr-by-hand's
    step). In update mode so do five: an optimizer that rebuilds its parameters from its own state (Lookahead,
    schedule-free, dual averaging) would pull a multiplied step back."""
    style = _style(name)
    kinds = ("pdmp", "lr by hand") if name in OWN_BUSINESS else ("bare", "pdmp")
    runs = {}
    for kind in kinds:
        model, opt = trained(name)  # each time: deepcopy drops the attributes of some optimizers
        if kind == "pdmp":
            opt = PDMPOptimizer(opt, model.groups(), gammas=GAMMAS4)
            _train(opt)
        elif kind == "lr by hand":
            owner = {p: i for i, ps in enumerate(_by_modality(model)) for p in ps}
            for group in opt.param_groups:
                (index,) = {owner[p] for p in group["params"]}
                if compensates_decay(opt, group):
                    group["weight_decay"] = group["weight_decay"] / _gamma(index)
                group["lr"] = group["lr"] * _gamma(index)
        before = _snapshot(model)
        runs[kind] = [model]
        for index in range(20, 25 if mode == "update" else 21):
            _step(model, opt, index, style)
            runs[kind].append(_moved(model, before))
    if name in OWN_BUSINESS:
        assert_same_params(runs["pdmp"][0], runs["lr by hand"][0])
        return
    for steps in range(1, len(runs["pdmp"])):
        bare, pdmp = runs["bare"][steps], runs["pdmp"][steps]
        for modality, gamma in (*GAMMAS4.items(), (None, 1.0)) if steps == 1 else GAMMAS4.items():
            assert pdmp[modality] == pytest.approx(
                gamma * bare[modality], rel=0.01 if steps == 1 else 0.05, abs=1e-12
            ), (
                f"{modality}: {steps} steps moved it {pdmp[modality] / max(bare[modality], 1e-30):.4g} x as far as the "
                f"bare ones, not {gamma}"
            )


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", _params("torch"))
def test_every_torch_optimizer_follows_its_reference_or_is_refused(name):
    check(name)


@pytest.mark.parametrize("name", _params("pytorch_optimizer"))
def test_every_pytorch_optimizer_follows_its_reference_or_is_refused(name):
    pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    check(name)


@pytest.mark.parametrize("name", _params("schedulefree"))
def test_every_schedulefree_optimizer_follows_its_reference_or_is_refused(name):
    pytest.importorskip("schedulefree", reason=INSTALL)
    check(name)


def test_an_optimizer_setting_named_gamma_stays_the_optimizers_and_each_modality_gets_its_coefficient():
    """AdaBound's own ``gamma`` (how fast its bounds converge) stays 0.001; its first step is Adam's, so the
    audio encoder moves 4 times as far as without PDMP (built with one group per modality: it keeps a list per
    group)."""
    po = pytest.importorskip("pytorch_optimizer", reason=INSTALL)
    moved = []
    for wrap in (False, True):
        model = TwoModal()
        opt = po.AdaBound([{"params": list(m.parameters())} for m in (model.audio, model.visual, model.head)])
        if wrap:
            opt = PDMPOptimizer(opt, model.groups(), gammas=GAMMAS4)
        before = _snapshot(model)
        _step(model, opt, 0, "plain")
        moved.append(_moved(model, before))
    assert all(group["gamma"] == 0.001 for group in opt.param_groups)
    assert moved[1]["audio"] == pytest.approx(4 * moved[0]["audio"], rel=1e-3)
