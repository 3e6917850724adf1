"""Whether a widget front end is there to draw on: the one check every dashboard uses.

Headless runs (``toolkit.report.execute``, which ``make demo`` and the notebook tests use, sets
``LEAKLAB_STATIC=1``; the test suite's smoke mode ``LEAKLAB_SMOKE=1``) and plain Python (no
Jupyter kernel) get a static run and PNG figures instead of live widgets.
"""
from __future__ import annotations

import os
import sys

STATIC_ENV, SMOKE_ENV = "LEAKLAB_STATIC", "LEAKLAB_SMOKE"

__all__ = ["STATIC_ENV", "SMOKE_ENV", "static_mode"]


def static_mode() -> bool:
    """True when widgets should run statically: ``LEAKLAB_STATIC=1``, ``LEAKLAB_SMOKE=1``, or no
    Jupyter kernel (IPython is only looked up, never imported: it comes with ipykernel)."""
    if os.environ.get(STATIC_ENV) == "1" or os.environ.get(SMOKE_ENV) == "1":
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is None or getattr(shell, "kernel", None) is None
