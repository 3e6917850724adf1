"""LeakageExplorer: choose dataset, model, cut layer, defense and strength, attack; Run trains a
small split model and attacks it, with a live progress bar, then shows accuracy, dCor, the
reconstruction grid and the attribution map side by side (ipywidgets).

The logic is :class:`~toolkit.widgets.session.ExplorerSession` (cached training per setting,
cached attacks per training; stoppable); this module is only its controls. Runs go on a
background thread, so the Stop button and the progress bar stay live; a stopped run shows what
the partly trained model gives, marked stopped. Bad input (a cut layer the chosen model does not
have, a strength out of the defense's range) shows in words in the status line and changes
nothing else.

Without a widget front end (headless nbclient / nbconvert: ``LEAKLAB_SMOKE=1`` or
``LEAKLAB_STATIC=1``) displaying the explorer runs the current setting once and shows its figures
as PNG outputs instead.

Every control carries a CSS class (``leaklab-dataset``, ``leaklab-cut``, ``leaklab-run``, ...) so
browser tests find it (tests/browser/).

Example:
    >>> from attacks import EXPLORER_ATTACKS                       # doctest: +SKIP
    >>> from defenses import EXPLORER_DEFENSES                     # doctest: +SKIP
    >>> explorer = LeakageExplorer(defenses=EXPLORER_DEFENSES, attacks=EXPLORER_ATTACKS)  # doctest: +SKIP
    >>> explorer                                                   # doctest: +SKIP
"""
from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from toolkit.widgets import figures
from toolkit.widgets.frontend import static_mode
from toolkit.widgets.session import DEFAULT_CUTS, ExplorerSession, Outcome, Setting

__all__ = ["LeakageExplorer", "static_mode"]


class LeakageExplorer:
    """The leakage explorer dashboard (see the module docstring).

    Args:
        defenses: name -> factory ``(strength, generator)`` or DefenseOption (e.g.
            ``defenses.EXPLORER_DEFENSES``).
        attacks: name -> ``fn(target, generator) -> reconstruction`` (e.g. ``attacks.EXPLORER_ATTACKS``).
        datasets: name -> loader (default: digits, digits 28x28, mnist when present, breast_cancer).
        epochs: training epochs per run.
        seed: seeds every run.
        threads: torch threads during a run (default 1, see :class:`ExplorerSession`).
        setting: keyword overrides of the starting :class:`Setting` (dataset, model, cut, ...).

    ``run(**overrides)`` runs the current setting (with overrides) in the calling thread and
    returns the :class:`Outcome` (None when the input was bad: the status line says why).
    """

    def __init__(self, *, defenses: Mapping[str, Any], attacks: Mapping[str, Callable], datasets: Mapping | None = None,
                 epochs: int = 2, seed: int = 0, threads: int | None = 1, **setting: Any):
        import ipywidgets as w

        self.session = ExplorerSession(defenses=defenses, attacks=attacks, datasets=datasets, threads=threads)
        start = Setting(**{"epochs": epochs, "seed": seed, "attack": next(iter(self.session.attacks)),
                           "defense": next(iter(self.session.defenses)), **setting})
        self.epochs, self.seed = start.epochs, start.seed
        self.outcome: Outcome | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()

        names = self.session.available_datasets()
        dataset = start.dataset if start.dataset in names else names[0]
        self.dataset = w.Dropdown(options=names, value=dataset, description="dataset")
        self.model = w.Dropdown(options=self.session.models_for(dataset), description="model")
        self.cut = w.SelectionSlider(options=["-"], description="cut after", continuous_update=False)
        self.defense = w.Dropdown(options=list(self.session.defenses), value=start.defense, description="defense")
        self.strength = w.FloatSlider(description="strength", step=0.05, continuous_update=False, readout_format=".2f")
        self.attack = w.Dropdown(options=list(self.session.attacks), value=start.attack, description="attack")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = w.HTML("Choose a setting and press Run.")
        self.reconstruction = w.Image(format="png", layout=w.Layout(width="100%", max_width="760px"))
        self.attribution = w.Image(format="png", layout=w.Layout(width="100%", max_width="760px"))
        self.scores = w.HTML("")
        for widget, name in [(self.dataset, "dataset"), (self.model, "model"), (self.cut, "cut"),
                             (self.defense, "defense"), (self.strength, "strength"), (self.attack, "attack"),
                             (self.run_button, "run"), (self.stop_button, "stop"), (self.progress, "progress"),
                             (self.status, "status"), (self.reconstruction, "reconstruction"),
                             (self.attribution, "attribution"), (self.scores, "scores")]:
            widget.add_class(f"leaklab-{name}")

        if start.model in self.model.options:
            self.model.value = start.model
        self._set_cuts(start.cut)
        self._set_strength_range(start.strength if "strength" in setting else None)
        self.dataset.observe(self._on_dataset, names="value")
        self.model.observe(self._on_model, names="value")
        self.defense.observe(lambda change: self._set_strength_range(None), names="value")
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())

        controls = w.VBox([self.dataset, self.model, self.cut, self.defense, self.strength, self.attack,
                           w.HBox([self.run_button, self.stop_button]), self.progress, self.status, self.scores],
                          layout=w.Layout(min_width="330px"))
        shown = w.VBox([self.reconstruction, self.attribution], layout=w.Layout(flex="1 1 auto"))
        self.widget = w.HBox([controls, shown])
        self.widget.add_class("leaklab-explorer")

    # -- controls -> setting ----------------------------------------------------------------
    def setting(self, **overrides: Any) -> Setting:
        """The setting the controls show (with ``overrides``)."""
        values = dict(dataset=self.dataset.value, model=self.model.value, cut=self.cut.value,
                      defense=self.defense.value, strength=float(self.strength.value), attack=self.attack.value,
                      seed=self.seed, epochs=self.epochs)
        unknown = set(overrides) - set(values)
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}; the controls are {sorted(values)}")
        return Setting(**{**values, **overrides})

    def _say(self, text: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "inherit"
        self.status.value = f"<span style='color:{colour}'>{html.escape(text, quote=False)}</span>"

    def _on_dataset(self, change) -> None:
        try:
            models = self.session.models_for(change["new"])
        except (ValueError, FileNotFoundError) as err:
            self._say(str(err), error=True)
            return
        old = self.model.value
        self.model.options = models
        self.model.value = old if old in models else models[0]
        self._set_cuts(self.cut.value)

    def _on_model(self, change) -> None:
        if change["new"] is not None:
            self._set_cuts(self.cut.value)

    def _set_cuts(self, wanted: str | None) -> None:
        """The cut slider offers the chosen model's layers; a cut the new model lacks moves to its default."""
        cuts = self.session.cuts_for(self.dataset.value, self.model.value)
        value = wanted if wanted in cuts else DEFAULT_CUTS.get(self.model.value, cuts[0])
        value = value if value in cuts else cuts[0]
        self.cut.options = cuts
        self.cut.value = value
        if wanted not in (None, "-", value):
            self._say(f"{self.model.value} has no layer {wanted!r} to cut after: the cut moved to {value!r}.")
        else:
            self._say(f"Ready: {self.dataset.value}, {self.model.value} cut after {value}. Press Run.")

    def _set_strength_range(self, value: float | None) -> None:
        option = self.session.defenses[self.defense.value]
        s = self.strength
        if option.high >= s.min:
            s.max, s.min = option.high, option.low
        else:
            s.min, s.max = option.low, option.high
        s.value = option.default if value is None else min(max(value, option.low), option.high)
        s.description = option.parameter if len(option.parameter) <= 10 else "strength"
        s.disabled = option.low == option.high
        s.step = (option.high - option.low) / 40 if option.high > option.low else 0.05

    # -- running ----------------------------------------------------------------------------
    def start(self, **overrides: Any) -> threading.Thread | None:
        """Run the current setting on a background thread (what the Run button does)."""
        if self._thread is not None and self._thread.is_alive():
            self._say("A run is going on: press Stop, or wait for it to finish.")
            return None
        self._thread = threading.Thread(target=self.run, kwargs=overrides, daemon=True, name="leaklab-explorer")
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Ask the running run to stop after its current training step (what the Stop button does)."""
        self._stop.set()
        self._say("Stopping after the current step...")

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a run started with :meth:`start`."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, **overrides: Any) -> Outcome | None:
        """Run the current setting (with ``overrides``) here and show it; None on bad input (shown in the status)."""
        if not self._busy.acquire(blocking=False):
            self._say("A run is going on: press Stop, or wait for it to finish.")
            return None
        self._stop.clear()
        self.run_button.disabled, self.stop_button.disabled = True, False
        began = time.perf_counter()
        try:
            setting = self.session.check(self.setting(**overrides))
            self._say(f"Running {setting.dataset} / {setting.model} cut after {setting.cut} / {setting.defense} / "
                      f"{setting.attack}...")
            outcome = self.session.run(setting, stop=self._stop, on_progress=self._progress)
            self._show(outcome, time.perf_counter() - began)
            return outcome
        except (ValueError, TypeError, FileNotFoundError) as err:
            self._say(f"Cannot run this setting: {err}", error=True)
            return None
        except Exception as err:  # noqa: BLE001 - the dashboard stays usable; the message says what broke
            self._say(f"The run failed ({type(err).__name__}): {err}", error=True)
            return None
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True
            self._busy.release()

    def _progress(self, done: int, total: int, what: str) -> None:
        self.progress.max = total
        self.progress.value = done
        self.progress.description = what.split(" ")[0][:10]

    def _show(self, o: Outcome, seconds: float) -> None:
        self.outcome = o
        self.reconstruction.value = figures.png(figures.reconstruction_figure(o))
        self.attribution.value = figures.png(figures.attribution_figure(o))
        self.scores.value = self.scores_html(o)
        reused = [k for k, v in o.cached.items() if v]
        note = f" (re-used the cached {' and '.join(reused)})" if reused else ""
        if o.stopped:
            self._say(f"Stopped after {o.steps} of {o.total_steps} training steps: these are the partly trained "
                      f"model's results ({seconds:.1f} s).")
        else:
            self._say(f"Done in {seconds:.1f} s{note}.")

    @staticmethod
    def scores_html(o: Outcome) -> str:
        """Accuracy, dCor, PSNR, SSIM (MSE for tabular data) as a small HTML table."""
        rows = [("test accuracy", f"{o.accuracy:.1%}"), ("dCor(inputs, what the server received)", f"{o.dcor:.3f}")]
        if "psnr" in o.scores:
            rows += [("attack PSNR", f"{o.scores['psnr']:.1f} dB"), ("attack SSIM", f"{o.scores['ssim']:.3f}")]
        else:
            rows += [("attack MSE (standardized features)", f"{o.scores['mse']:.3f}")]
        if o.stopped:
            rows.append(("training", f"STOPPED at step {o.steps}/{o.total_steps}"))
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in rows)
        return f"<table>{cells}</table>"

    # -- display ----------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython.display import HTML, Image, display

        if not static_mode():
            display(self.widget)
            return
        outcome = self.run()
        if outcome is None:
            display(HTML(self.status.value))
            return
        display(Image(self.reconstruction.value), Image(self.attribution.value), HTML(self.scores.value))

    def plot(self, which: str = "reconstruction"):
        """The last run's ``"reconstruction"`` or ``"attribution"`` figure as (fig, ax): a pyplot figure
        (a notebook shows it as a PNG), after running the current setting if nothing ran yet."""
        makers = {"reconstruction": figures.reconstruction_figure, "attribution": figures.attribution_figure}
        if which not in makers:
            raise ValueError(f"which must be one of {sorted(makers)}, got {which!r}")
        if self.outcome is None and self.run() is None:
            raise ValueError(f"nothing to plot: the current setting does not run ({self.status.value})")
        fig = makers[which](self.outcome, pyplot=True)
        return fig, fig.axes[0]

    def __repr__(self) -> str:
        return f"LeakageExplorer({self.setting()!r})"
