"""pdmp_optim._checks: the shared input checks return clean Python values or raise naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pdmp_optim import _checks, coefficients
from pdmp_optim._checks import (
    as_finite,
    as_number,
    check_gamma,
    check_gammas,
    check_int,
    check_modalities,
    check_name,
)

ONE_ELEMENT = [
    2.5,
    np.float32(2.5),
    np.float64(2.5),
    torch.tensor(2.5),
    torch.tensor([2.5]),
    torch.tensor([[2.5]], dtype=torch.float64),
    np.array(2.5),
    np.array([2.5]),
    np.array([[2.5]]),
]


@pytest.mark.parametrize("value", ONE_ELEMENT, ids=lambda v: type(v).__name__ + str(getattr(v, "shape", "")))
def test_one_element_tensors_and_arrays_are_numbers(value: object) -> None:
    number = as_number(value, "gamma_p")
    assert type(number) is float and number == 2.5
    assert type(check_gamma(value, "gamma_p")) is float


@pytest.mark.parametrize(
    "value",
    [torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]), torch.tensor([]), np.array([]), "2.5", b"2", True, None, [1, 2]],
    ids=["tensor2", "array2", "tensor0", "array0", "str", "bytes", "bool", "none", "list2"],
)
def test_anything_else_is_a_type_error_naming_the_argument(value: object) -> None:
    with pytest.raises(TypeError, match=r"^gamma_p must be a number, got "):
        as_number(value, "gamma_p")
    with pytest.raises(TypeError, match=r"^gamma_p must be a number"):
        check_gamma(value, "gamma_p")


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, -math.inf, torch.tensor([0.0]), np.array([math.nan])])
def test_gamma_must_be_finite_and_positive(value: object) -> None:
    with pytest.raises(ValueError, match=r"^gamma_p must be a finite number > 0"):
        check_gamma(value, "gamma_p")


def test_coefficients_keeps_check_gamma_importable_from_the_one_home() -> None:
    assert coefficients.check_gamma is _checks.check_gamma
    assert "check_gamma" not in coefficients.__all__


def test_as_finite_names_the_value_and_the_fix() -> None:
    assert as_finite(torch.tensor([0.25]), "score") == 0.25
    with pytest.raises(ValueError, match=r"^score of 'a' is nan; drop that run$"):
        as_finite(np.array([math.nan]), "score of 'a'", "drop that run")
    with pytest.raises(ValueError, match=r"^agreement is inf; pass a finite number$"):
        as_finite(math.inf, "agreement")


def test_check_int() -> None:
    assert check_int(3, "epochs", minimum=1) == 3
    assert type(check_int(np.int64(-2), "seed")) is int
    with pytest.raises(ValueError, match=r"^epochs must be >= 1, got 0$"):
        check_int(0, "epochs", minimum=1)
    for bad in (True, 1.0, "1", None, torch.tensor(1)):
        with pytest.raises(TypeError, match=r"^epochs must be an int"):
            check_int(bad, "epochs")


def test_check_name_and_check_gammas() -> None:
    assert check_name("audio") == "audio"
    for bad in ("", 0, None, ("a",)):
        with pytest.raises(TypeError, match="modality names must be non-empty strings"):
            check_name(bad)
    assert check_gammas({"audio": torch.tensor([0.5])}, ["audio", "visual"]) == {"audio": 0.5}
    with pytest.raises(ValueError, match=r"names \['text'\], which are not among the modalities"):
        check_gammas({"text": 2.0}, ["audio", "visual"])
    with pytest.raises(ValueError, match=r"gammas\['audio'\] must be a finite number > 0"):
        check_gammas({"audio": -1.0})
    with pytest.raises(TypeError, match="gammas must map modality -> coefficient"):
        check_gammas([("audio", 1.0)])


def test_check_modalities_wants_a_mapping_of_two_or_more_named_modalities() -> None:
    """The one check behind rank_modalities' scores, analyze_modalities' groups and logit_ratio's logits."""
    assert check_modalities({"audio": 1, "visual": 2}, "scores", "a score") == ["audio", "visual"]
    with pytest.raises(TypeError, match=r"^groups must map each modality to an encoder, got list$"):
        check_modalities([1, 2], "groups", "an encoder")
    with pytest.raises(ValueError, match=r"^scores must hold at least two modalities, got \['audio'\]; with one"):
        check_modalities({"audio": 1}, "scores", "a score")
    with pytest.raises(TypeError, match="modality names must be non-empty strings"):
        check_modalities({"audio": 1, 2: 2}, "scores", "a score")
    with pytest.raises(TypeError, match=r"^logits\['visual'\] must be a tensor, got list$"):
        check_modalities({"audio": torch.ones(1), "visual": [1.0]}, "logits", "a tensor", torch.Tensor)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_as_number_is_float_on_floats_and_their_one_element_tensors(x: float) -> None:
    assert as_number(x, "x") == x
    assert as_number(torch.tensor([x], dtype=torch.float64), "x") == x
    assert as_number(np.array([x]), "x") == x
