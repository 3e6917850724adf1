"""TrainingMonitor: live loss, accuracy and leakage curves while a split or federated run trains.

``TrainingMonitor(protocol, metrics=["loss", "accuracy", "dcor"]).fit(epochs=...)`` (``rounds=``
for a federated protocol) trains exactly as ``protocol.fit`` would and returns the same history;
while it runs, a status line, a progress bar and one panel per history column asked for are
redrawn every ``every`` steps (rounds). The figure is rendered with matplotlib's Agg canvas into
an ``ipywidgets.Image`` (a PNG): no ipympl or front-end extension, so it shows in JupyterLab and
Voila alike (both looked at in chromium). Leakage columns come from the protocol's history: ``dcor`` from a
:class:`toolkit.split.leakage.LeakageProbe` (or NoPeek's batch value), epsilon from a DP
accountant, or any other numeric column.

With no widget front end (not in a Jupyter kernel, or ``LEAKLAB_STATIC=1``, or ``LEAKLAB_SMOKE=1``
as under the test suite's headless runs) nothing is redrawn: the run trains and the final figure
is shown once as a PNG output, so notebooks stay executable by nbclient and nbconvert.
"""
from __future__ import annotations

import io
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd

from toolkit import plots, validate
from toolkit.federated.base import FederatedProtocol
from toolkit.split.multiclient import _MultiClient
from toolkit.split.splitnn import SplitNN
from toolkit.widgets.frontend import static_mode

__all__ = ["TrainingMonitor", "static_mode"]

def _display(obj: Any) -> None:
    """IPython's display of ``obj`` (nothing when IPython was never imported: no one to show it to)."""
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        ipython.display.display(obj)


def _latest(history: pd.DataFrame, column: str) -> str:
    """``"accuracy 0.91 (test 0.88)"``: the last value of ``column`` (and of ``test_<column>``)."""
    if column not in history.columns:
        return ""
    values = [history[c].dropna() for c in (column, f"test_{column}") if c in history.columns]
    if not len(values[0]):
        return ""
    text = f"{column} {values[0].iloc[-1]:.3g}"
    return text + (f" (test {values[1].iloc[-1]:.3g})" if len(values) > 1 and len(values[1]) else "")


class TrainingMonitor:
    """Train a protocol while its loss, accuracy and leakage curves update live.

    Args:
        protocol: a :class:`toolkit.split.SplitNN` (redrawn every ``every`` steps), a
            :class:`toolkit.split.Relay` / :class:`toolkit.split.SplitFed` (every ``every``
            epochs) or a federated protocol such as FederatedAveraging (every ``every`` rounds).
        metrics: the history columns to plot, one panel each (``"loss"``, ``"accuracy"``,
            ``"dcor"``, an epsilon column, ...); a ``test_<name>`` column is overlaid.
        every: redraw after this many steps (rounds, epochs for several clients), and only when
            the last redraw took at most a fifth of the time since (drawing stays under ~20% of
            the run); the live x axis spans the whole run from the start.
        static: force the static run (True) or the live widget (False); None: :func:`static_mode`.

    Example:
        >>> from toolkit import data, models
        >>> ds = data.load("digits").subset(range(256))
        >>> client, server = models.cut(models.mlp([64, 32, 10]), at=2)
        >>> monitor = TrainingMonitor(SplitNN.vanilla(client, server, ds), metrics=["loss"], static=True)
        >>> len(monitor.fit(epochs=1))  # one row per step, as SplitNN.fit
        4
    """

    def __init__(self, protocol: Any, metrics: Sequence[str] = ("loss", "accuracy", "dcor"), *,
                 every: int = 10, static: bool | None = None):
        if isinstance(protocol, SplitNN):
            self.kind, self.x = "split", "step"
        elif isinstance(protocol, _MultiClient):
            self.kind, self.x = "multi-client", "step"
        elif isinstance(protocol, FederatedProtocol):
            self.kind, self.x = "federated", "round"
        else:
            raise ValueError(f"TrainingMonitor trains a SplitNN, a Relay or SplitFed, or a federated protocol "
                             f"(FederatedAveraging, FedAsync, FedBuff); got {type(protocol).__name__}")
        if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
            raise ValueError(f"metrics must be a non-empty list of history column names, got {metrics!r}")
        if not all(isinstance(m, str) and m for m in metrics) or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be distinct non-empty column names, got {list(metrics)}")
        self.protocol, self.metrics = protocol, list(metrics)
        self.every = validate.positive_int("every", every)
        self.static = static_mode() if static is None else validate.boolean("static", static)
        self.history = pd.DataFrame()  # what this monitor's fit calls trained, as protocol.fit returns it
        self.redraws = 0
        self._widget = None
        self._displayed = False  # the live view was displayed since the last fit (fit shows it otherwise)
        self._figure = None
        self._xmax: float | None = None  # the x range of the live figure (set by fit)

    # -- training ----------------------------------------------------------------------------
    def fit(self, epochs: int | None = None, *, rounds: int | None = None,
            eval_each_epoch: bool = False) -> pd.DataFrame:
        """Train like ``protocol.fit(epochs, eval_each_epoch=...)`` (``protocol.fit(rounds)`` for a
        federated one) and return the same history, updating the curves as it goes."""
        if self.kind == "federated":
            if epochs is not None or eval_each_epoch:
                raise ValueError("a federated protocol trains in rounds: pass rounds=, not epochs or eval_each_epoch")
            total, unit = validate.positive_int("rounds", rounds), "round"
        else:
            if rounds is not None:
                raise ValueError(f"a {self.kind} split protocol trains in epochs: pass epochs=, not rounds")
            total, unit = validate.positive_int("epochs", epochs), "epoch"
            validate.boolean("eval_each_epoch", eval_each_epoch)
        self._start, self._count = time.perf_counter(), 0
        self._drawn_at, self._draw_seconds = self._start, 0.0
        self._before = self.history  # earlier fit calls' rows stay on the figure
        steps = total * math.ceil(self.protocol.n_train / self.protocol.config.batch_size) \
            if self.kind == "split" else total
        self._xmax = (self.protocol.wire.step + steps if self.kind == "split"
                      else self.protocol.round + total if self.kind == "federated" else None)
        if not self.static:
            self._show(steps)
            self._draw(pd.DataFrame(), force=True)  # the empty frame at once (and imports, fonts: warm)
            self._draw_seconds = 0.0
        if self.kind == "split":
            history = self._fit_split(total, eval_each_epoch)
        else:
            history = self._fit_rounds(total, unit, eval_each_epoch)
        self._draw(history, final=True)
        self.history = pd.concat([self.history, history], ignore_index=True) if len(self.history) else history
        missing = [m for m in self.metrics if m not in history.columns and f"test_{m}" not in history.columns]
        if missing:
            warnings.warn(f"the history has no column {missing} to plot; it has {list(history.columns)}",
                          UserWarning, stacklevel=2)
        return history

    def _fit_split(self, epochs: int, eval_each_epoch: bool) -> pd.DataFrame:
        """SplitNN.fit(epochs, eval_each_epoch=...), redrawn from its per-step callback."""
        return self.protocol.fit(epochs, eval_each_epoch=eval_each_epoch, every=self.every,
                                 on_step=None if self.static else self._step)

    def _step(self, history: pd.DataFrame) -> None:
        self._count = len(history)  # steps of this call so far: the progress bar's value
        self._draw(history)

    def _fit_rounds(self, total: int, unit: str, eval_each_epoch: bool) -> pd.DataFrame:
        """protocol.fit(1) ``total`` times (epochs of several clients, or federated rounds)."""
        frames = []
        for k in range(1, total + 1):
            frames.append(self.protocol.fit(1, eval_each_epoch=eval_each_epoch) if unit == "epoch"
                          else self.protocol.fit(1))
            self._count = k
            if k % self.every == 0 and k < total:
                self._draw(pd.concat(frames, ignore_index=True))
        history = pd.concat(frames, ignore_index=True)
        history.attrs = dict(frames[-1].attrs)  # the manifest of the run so far, as fit(total) gives
        return history

    # -- display -----------------------------------------------------------------------------
    def figure(self, history: pd.DataFrame | None = None) -> tuple[Any, list]:
        """The monitor's figure of ``history`` (default: what it trained so far): ``(fig, axes)``."""
        history = self.history if history is None else history
        from matplotlib.figure import Figure  # not pyplot: nothing stays registered

        return plots.plot_training(history, self.metrics, x=self.x, kind=self.kind, title=self._title(history),
                                   fig=Figure())

    def _title(self, history: pd.DataFrame) -> str:
        if not len(history):
            return "not trained yet"
        last = history.iloc[-1]
        where = (f"round {int(last['round'])}" if self.kind == "federated"
                 else f"epoch {int(last['epoch']) + 1}, step {int(last['step'])}")
        return f"{type(self.protocol).__name__}: {where}"

    @property
    def widget(self):
        """The live view (an ``ipywidgets.VBox``: status line, progress bar, figure as an Image)."""
        if self._widget is None:
            import ipywidgets as widgets

            self._status = widgets.HTML("not trained yet")
            self._progress = widgets.IntProgress(min=0, max=1, description="training")
            self._image = widgets.Image(format="png")
            for w, name in ((self._status, "status"), (self._progress, "progress"), (self._image, "figure")):
                w.add_class(f"leaklab-monitor-{name}")
            self._widget = widgets.VBox([self._status, self._progress, self._image])
            self._widget.add_class("leaklab-monitor")
        return self._widget

    def _show(self, steps: int) -> None:
        widget = self.widget
        self._progress.max, self._progress.value = steps, 0
        self._status.value = "starting..."
        if not self._displayed:
            _display(widget)  # under the cell that trains
        self._displayed = False

    def _draw(self, history: pd.DataFrame, *, final: bool = False, force: bool = False) -> None:
        """Redraw the curves of ``history`` (the current call's rows): into the widget when live;
        once, at the end, as a PNG output when static."""
        if not (final or force) and (self.static or time.perf_counter() - self._drawn_at < 4 * self._draw_seconds):
            return  # static: only the final figure; live: drawing takes at most ~1/5 of the time
        begin = time.perf_counter()
        if len(self._before):
            history = pd.concat([self._before, history], ignore_index=True)
        from matplotlib.figure import Figure

        fig, _ = plots.plot_training(history, self.metrics, x=self.x, kind=self.kind, title=self._title(history),
                                     fig=self._figure if self._figure is not None else Figure(), xmax=self._xmax)
        self._figure = fig
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        png = buf.getvalue()
        self.redraws += 1
        self._drawn_at = time.perf_counter()
        took = self._drawn_at - begin  # the first draw also pays for imports and fonts: keep the least
        self._draw_seconds = min(self._draw_seconds, took) if self._draw_seconds else took
        if not self.static:
            self._progress.value = self._count
            seconds = time.perf_counter() - self._start
            shown = ", ".join(_latest(history, m) for m in self.metrics if _latest(history, m))
            self._status.value = ("starting..." if not len(history) else
                                  f"{'done' if final else 'training'}: {self._title(history)}"
                                  f"{'; ' + shown if shown else ''} ({seconds:.1f} s)")
            self._image.value = png
            return
        self._display_png(png)

    @staticmethod
    def _display_png(png: bytes) -> None:
        ipython = sys.modules.get("IPython")
        if ipython is not None and ipython.get_ipython() is not None:  # a notebook or IPython: one PNG output
            _display(ipython.display.Image(data=png, format="png"))

    def close(self) -> None:
        """Close the live view's widgets (ipywidgets keeps every widget, and so its last PNG, in
        the kernel until it is closed); a later live fit builds new ones."""
        if self._widget is not None:
            for w in (*self._widget.children, self._widget):
                w.close()
            self._widget = None

    def _ipython_display_(self) -> None:
        if not self.static:
            _display(self.widget)
            self._displayed = True
        else:
            fig, _ = self.figure()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
            self._display_png(buf.getvalue())

    def __repr__(self) -> str:
        return (f"TrainingMonitor({type(self.protocol).__name__}, metrics={self.metrics}, every={self.every}, "
                f"{'static' if self.static else 'live'}; {len(self.history)} rows trained)")
