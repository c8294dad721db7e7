"""The one home of the input checks shared by the optimizer, the coefficients, the ranking and the hooks.

Each check returns the cleaned value or raises an exception whose message names the argument and the fix.

>>> check_gamma(15, "gamma_p")
15.0
>>> check_gammas({"audio": 0.5}, ["audio", "visual"])
{'audio': 0.5}
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import wraps
from typing import Any, TypeVar, cast

_F = TypeVar("_F", bound=Callable[..., Any])


def takes_encoders(fn: _F) -> _F:
    """Let ``fn(groups, ...)`` take 0.2's keyword ``encoders=`` for ``groups=``, with a ``DeprecationWarning``, until
    0.4 (the modality -> module mapping has one name across the API, as in ``PDMPOptimizer``)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "encoders" in kwargs:
            if args or "groups" in kwargs:
                raise TypeError(f"{fn.__name__}() got both groups and encoders=; pass groups only")
            warnings.warn(
                f"{fn.__name__}(encoders=...) is deprecated and will be removed in 0.4: pass groups=..., the "
                "modality -> encoder mapping, named as in PDMPOptimizer",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs["groups"] = kwargs.pop("encoders")
        return fn(*args, **kwargs)

    return cast(_F, wrapper)


def as_number(value: Any, what: str) -> float:
    """``value`` as a float: a Python/NumPy number or a one-element tensor/array; else a ``TypeError`` naming ``what``.

    >>> import torch
    >>> as_number(torch.tensor([2.5]), "gamma_p")
    2.5
    """
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # NumPy scalars and arrays, tensors
    while isinstance(value, list) and len(value) == 1:
        value = value[0]  # one-element tensors and arrays
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
    return float(value)


def as_finite(value: Any, what: str, fix: str = "pass a finite number") -> float:
    """``value`` as a float (see :func:`as_number`); a ``ValueError`` naming ``what`` and ``fix`` if NaN or inf.

    >>> as_finite(0.5, "score of 'audio'")
    0.5
    """
    number = as_number(value, what)
    if not math.isfinite(number):
        raise ValueError(f"{what} is {number}; {fix}")
    return number


def check_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integer, not a bool), at least ``minimum`` when given.

    >>> check_int(3, "epochs", minimum=1)
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def check_gamma(value: Any, what: str) -> float:
    """``value`` as a float, or raise if it is not a finite number above zero.

    >>> check_gamma(0.5, "gammas['audio']")
    0.5
    """
    number = as_number(value, what)
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{what} must be a finite number > 0, got {number!r}")
    return number


def check_name(name: Any) -> str:
    """A modality name: a non-empty string.

    >>> check_name("audio")
    'audio'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"modality names must be non-empty strings, got {name!r}")
    return name


def check_gammas(
    gammas: Any, modalities: Iterable[str] | None = None, what: str = "gammas", every: bool = False
) -> dict[str, float]:
    """A ``{modality: coefficient}`` mapping, each coefficient checked, every name among ``modalities`` (and, with
    ``every``, every one of them named).

    >>> check_gammas({"visual": 15}, ["audio", "visual"])
    {'visual': 15.0}
    """
    if not isinstance(gammas, Mapping):
        raise TypeError(f"{what} must map modality -> coefficient, got {type(gammas).__name__}")
    if modalities is not None:
        known = list(modalities)
        unknown = [m for m in gammas if m not in known]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not among the modalities {known}; fix the names")
        missing = [m for m in known if m not in gammas] if every else []
        if missing:
            raise ValueError(f"{what} has no coefficient for {missing}; give one for every modality {known}")
    return {check_name(m): check_gamma(v, f"{what}[{m!r}]") for m, v in gammas.items()}


def check_modalities(value: Any, what: str, noun: str, kind: type | None = None, at_least: int = 2) -> list[str]:
    """The names of ``value``, a mapping of ``at_least`` modalities to ``noun`` (each an instance of ``kind``).

    >>> check_modalities({"audio": 0.6, "visual": 0.7}, "scores", "a score")
    ['audio', 'visual']
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must map each modality to {noun}, got {type(value).__name__}")
    if len(value) < at_least:
        raise ValueError(
            f"{what} is empty; name at least one modality, e.g. {{'visual': model.visual_encoder}}" if at_least == 1
            else f"{what} must hold at least two modalities, got {list(value)}; with one there is nothing to prioritise"
        )  # fmt: skip
    for name, item in value.items():
        check_name(name)
        if kind is not None and not isinstance(item, kind):
            raise TypeError(f"{what}[{name!r}] must be {noun}, got {type(item).__name__}")
    return list(value)
