"""The one progress-bar wrapper (tqdm.auto): off in library calls, notebooks turn it on."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, show: bool = False, desc: str | None = None,
             total: int | None = None, leave: bool = True) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm.auto bar when ``show`` is true, else return it unchanged."""
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave)
