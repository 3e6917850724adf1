"""The one validator module: numbers from Python or NumPy, never bools; tensors named with the first bad index."""
import numpy as np
import pytest
import torch

from toolkit import validate


def test_numpy_numbers_count_and_come_back_as_python_numbers():
    assert validate.positive_int("n", np.int64(3)) == 3 and type(validate.positive_int("n", np.int64(3))) is int
    assert validate.non_negative_int("seed", np.uint8(0)) == 0
    assert validate.positive("lr", np.float32(0.5)) == 0.5
    assert validate.fraction("p", np.float64(0.25)) == 0.25


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, np.float64(2.0), "2", None])
def test_bools_floats_and_strings_are_not_ints(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        validate.positive_int("n", bad)


@pytest.mark.parametrize("bad", [True, np.bool_(False), float("nan"), float("inf"), np.float32("nan")])
def test_bools_and_non_finite_values_are_not_numbers(bad):
    with pytest.raises(ValueError, match="must be a non-negative number"):
        validate.non_negative("x", bad)


def test_finite_names_the_first_bad_index_and_passes_overflowing_sums():
    big = torch.full((4,), 3e38)  # the sum overflows, the values are finite
    assert validate.finite(big, "x") is big
    with pytest.raises(ValueError, match=r"x holds Inf at index 2: hint"):
        validate.finite(torch.tensor([0.0, 1.0, float("inf")]), "x", hint="hint")
