"""The one progress-bar wrapper (tqdm.auto): off in library calls, notebooks turn it on.

``TQDM_DISABLE=1`` in the environment turns every bar off, notebook bars included (tqdm's notebook
bars ignore that variable themselves); headless notebook runs (``toolkit.report.execute``) set it,
since a saved bar would show the text it had when drawn, frozen at 0%.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, show: bool = False, desc: str | None = None,
             total: int | None = None, leave: bool = True) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm.auto bar when ``show`` is true (and ``TQDM_DISABLE`` is not
    set), else return it unchanged."""
    if not show or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave)
