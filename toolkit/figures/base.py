"""What every paper-figure preset shares: a name, its source, the published anchors, and saving.

A preset is a dataclass (one comment per default) subclassing :class:`Figure`: ``smoke()`` gives
settings that run in seconds, ``run()`` measures and returns a tidy DataFrame (one row per
measurement, with a ``source`` column: ``"measured"`` for ours, ``"published"`` / ``"formula"`` for
the paper's), and ``plot(frame)`` draws it with the published values marked and returns
``(fig, axes)``. :meth:`Figure.save` writes the PNG and the CSV behind it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd


@dataclass
class Figure(ABC):
    """Base of the paper-figure presets: subclasses set the class attributes and implement
    :meth:`run`, :meth:`plot` and :meth:`smoke`."""

    name: ClassVar[str] = ""          # file stem in reports/figures/, e.g. "05_singh_communication"
    title: ClassVar[str] = ""         # one line for the index page
    source: ClassVar[str] = ""        # the paper (authors, title, year, arXiv id)
    anchors: ClassVar[tuple[str, ...]] = ()  # the published numbers the figure is checked against, quoted

    @classmethod
    @abstractmethod
    def smoke(cls) -> Figure:
        """Settings that run in seconds (tests and ``--smoke``)."""

    @abstractmethod
    def run(self, *, show_progress: bool = False) -> pd.DataFrame:
        """Measure; one tidy row per measurement."""

    @abstractmethod
    def plot(self, frame: pd.DataFrame) -> tuple[Any, Any]:
        """Draw ``frame`` (what :meth:`run` returned) beside the published values; (fig, axes)."""

    def settings(self) -> dict[str, Any]:
        """The preset's fields, for the index page and the CSV's provenance."""
        return asdict(self)

    def save(self, frame: pd.DataFrame, out: str | Path, *, dpi: int = 120) -> tuple[Path, Path]:
        """Plot ``frame`` and write ``<out>/<name>.png`` and ``<out>/<name>.csv``; returns both paths."""
        import matplotlib.pyplot as plt

        if not isinstance(frame, pd.DataFrame) or frame.empty:
            raise ValueError(f"{self.name}: save needs the non-empty DataFrame run() returned, got {type(frame).__name__}")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fig, _ = self.plot(frame)
        png, csv = out / f"{self.name}.png", out / f"{self.name}.csv"
        fig.savefig(png, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        frame.to_csv(csv, index=False)
        return png, csv


def crossover(x: Sequence[float], a: Sequence[float], b: Sequence[float], *, log: bool = True) -> float:
    """The first x where curve ``a`` crosses curve ``b`` (``a - b`` changes sign), interpolated
    linearly between the two bracketing points (in log x and log y when ``log``); NaN when the
    curves do not cross over ``x``. An x where they are equal is returned as is.

    Example:
        >>> crossover([1, 2, 3], [1, 2, 3], [3, 2, 1], log=False)
        2.0
        >>> crossover([1, 10], [1, 10], [10, 100])
        nan
    """
    x, a, b = (np.asarray(v, dtype=float) for v in (x, a, b))
    if not (x.ndim == a.ndim == b.ndim == 1 and len(x) == len(a) == len(b) >= 2):
        raise ValueError(f"crossover needs three 1-d sequences of one length >= 2, got lengths {len(x)}, {len(a)}, {len(b)}")
    if np.any(np.diff(x) <= 0):
        raise ValueError("crossover needs x strictly increasing")
    if log and (np.any(x <= 0) or np.any(a <= 0) or np.any(b <= 0)):
        raise ValueError("a log-scale crossover needs positive x and curves (pass log=False)")
    u, d = (np.log(x), np.log(a) - np.log(b)) if log else (x, a - b)
    for i in range(len(x)):
        if d[i] == 0:
            return float(x[i])
        if i and d[i - 1] * d[i] < 0:
            t = u[i - 1] + (u[i] - u[i - 1]) * d[i - 1] / (d[i - 1] - d[i])
            return float(math.exp(t) if log else t)
    return math.nan


def bytes_label(values: Sequence[float]) -> tuple[float, str]:
    """The decimal unit (divisor, name) that prints the largest of ``values`` bytes shortly."""
    from toolkit.plots._base import byte_unit

    finite = [float(v) for v in values if np.isfinite(v)]
    return byte_unit(max(finite) if finite else 1.0)


def plain_log_ticks(ax: Any) -> None:
    """Label log-scale axes with plain numbers (2, 5, 20, 1,000) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    def fmt(value: float, _pos: int) -> str:
        return f"{value:,.0f}" if value >= 1 else f"{value:g}"

    for axis, scale, limits in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
        if scale == "log":
            axis.set_major_formatter(FuncFormatter(fmt))
            few = max(limits) / max(min(limits), 1e-300) < 300  # label 2 and 5 between powers of ten only on short axes
            axis.set_minor_formatter(FuncFormatter(lambda v, p: fmt(v, p) if few and f"{v:.0e}"[0] in "25" else ""))
