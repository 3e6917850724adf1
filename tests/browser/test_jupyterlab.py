"""In JupyterLab, in a real browser: Run All, the widgets render, moving the cut-layer slider and
clicking Run brings a reconstruction image, and a new setting brings a different one.

The widgets demo (tests/browser/fixtures) carries the explorer's classes on plain ipywidgets: when it
fails the widget front end is broken, when only the explorer fails the explorer is."""
import pytest

import browser_servers
import browser_steps
pytest_plugins = ["browser_fixtures"]  # the browser fixtures (chromium, page, lab, notebooks_copy, reports)

EXPLORER = "01_leakage_explorer.ipynb"


def _round_trip(page, lab, name):
    browser_steps.open_notebook(page, lab, name)
    browser_steps.run_all(page)
    assert browser_steps.errors(page) == [], "a cell failed under Run All"
    first, second, cuts = browser_steps.interact(page)
    assert first != second, f"the reconstruction image did not change from cut {cuts[0]} to {cuts[1]}"
    return cuts


@pytest.mark.slow
@pytest.mark.xdist_group("browser")  # one JupyterLab or Voila at a time on the worker that has chromium
def test_widgets_demo_renders_and_answers_in_jupyterlab(page, lab, reports):
    assert browser_servers.status(f"{lab.url}/api/kernels") == 403, "JupyterLab answered without its token"
    cuts = _round_trip(page, lab, "widgets_demo.ipynb")
    # the kernel saw the slider's second position: the front end synced it before the click
    assert page.locator(".leaklab-status").inner_text().strip() == f"run 2 at {cuts[1]}"
    page.locator(".leaklab-explorer").scroll_into_view_if_needed()
    page.screenshot(path=str(reports / "browser-jupyterlab-widgets-demo.png"))


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
def test_explorer_runs_and_redraws_in_jupyterlab(page, lab, reports):
    _round_trip(page, lab, EXPLORER)
    scores = page.locator(".leaklab-scores").inner_text()
    assert all(name in scores for name in ("PSNR", "SSIM")), f"scores after a run: {scores!r}"
    page.locator(".leaklab-explorer").scroll_into_view_if_needed()
    page.screenshot(path=str(reports / "browser-jupyterlab.png"))
