"""The one validator module: checks for what enters the toolkit, each raising an error that names
the bad value (and, for tensors, the first bad index).

Data is checked once where it enters (``Dataset``, ``ClientData``, ``SplitNN``, an attack's
constructor or ``run``); code past that point trusts it. Hyperparameters are checked in the
constructor or ``__post_init__`` that receives them.

Example:
    >>> positive_int("batch_size", 32)
    32
    >>> positive_int("batch_size", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive int, got 2.5
    >>> finite(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), "x_train")
    Traceback (most recent call last):
    ...
    ValueError: x_train holds NaN at index (1, 0): clean or drop that sample before training
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

import torch
from torch import Tensor

__all__ = ["tensor", "finite", "labels", "positive_int", "non_negative_int", "positive", "non_negative",
           "number", "fraction", "boolean", "generator"]


# -- tensors -------------------------------------------------------------------------------------
def tensor(value: Any, name: str, *, min_dim: int = 0) -> Tensor:
    """``value`` if it is a torch.Tensor with at least ``min_dim`` dimensions; a TypeError that says
    how to convert a NumPy array or a list otherwise."""
    if not isinstance(value, Tensor):
        kind = type(value).__module__.split(".")[0] + "." + type(value).__name__
        hint = " (convert it with torch.as_tensor)" if hasattr(value, "__array__") or isinstance(value, (list, tuple)) else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {kind}{hint}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension{'s' if min_dim != 1 else ''}, "
                         f"got shape {tuple(value.shape)}")
    return value


def _first_index(mask: Tensor) -> tuple[int, ...]:
    flat = int(mask.reshape(-1).nonzero()[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape)) if mask.dim() else ()


def finite(value: Tensor, name: str, *, hint: str = "clean or drop that sample before training") -> Tensor:
    """``value`` if it holds no NaN or Inf (integer tensors always pass); else a ValueError naming
    ``name``, the first bad index, and ``hint`` (what to do about it)."""
    value = tensor(value, name)
    if not value.is_floating_point() and not value.is_complex():
        return value
    if value.numel() == 0 or bool(torch.isfinite(value.sum())):
        return value  # one fast pass; a non-finite sum (a bad value, or an overflow) is looked at closely
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        where = _first_index(bad)
        what = "NaN" if bool(torch.isnan(value[where])) else "Inf"
        at = "" if not where else f" at index {where[0] if len(where) == 1 else where}"
        raise ValueError(f"{name} holds {what}{at}: {hint}")
    return value


def labels(value: Any, name: str, *, n_classes: int | None = None, length: int | None = None) -> Tensor:
    """``value`` as class labels: a 1-D integer tensor of values in [0, n_classes).

    Float labels are refused rather than truncated (they would train on wrong classes); negative
    labels and labels >= ``n_classes`` are named with their first index.
    """
    value = tensor(value, name)
    if value.dim() != 1:
        raise ValueError(f"{name} must be one label per sample, shape (N,), got {tuple(value.shape)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} holds {len(value)} labels for {length} samples")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices (torch.long), got {value.dtype}"
                         f"{'' if value.dtype == torch.bool else ': convert with .long() if they are whole numbers'}")
    if len(value):
        low = value < 0
        if bool(low.any()):
            i = int(low.nonzero()[0])
            raise ValueError(f"{name} holds a negative label {int(value[i])} at index {i}: labels are class "
                             f"indices 0..n_classes-1")
        if n_classes is not None:
            high = value >= n_classes
            if bool(high.any()):
                i = int(high.nonzero()[0])
                raise ValueError(f"{name} holds label {int(value[i])} at index {i}, but there are only "
                                 f"{n_classes} classes")
    return value


# -- numbers -------------------------------------------------------------------------------------
# Python and NumPy numbers count (numbers.Integral / numbers.Real); bools never do.
def _integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is an integer >= 1 (a Python or NumPy int; not a bool, not 2.0)."""
    if not _integral(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    if not _integral(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0."""
    if not _real(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    if not _real(value) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the interval (``*_open`` excludes an end)."""
    ok = _real(value) and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def fraction(name: str, value: Any, *, zero: bool = True, one: bool = False) -> float:
    """A probability-like number in [0, 1) by default (``zero``/``one`` say whether the ends are allowed)."""
    return number(name, value, low=0.0, high=1.0, low_open=not zero, high_open=not one)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def generator(value: Any, name: str = "generator") -> torch.Generator | None:
    """``value`` if it is a torch.Generator or None."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value
