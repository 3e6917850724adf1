"""The Voila app (what `make dashboard` serves), in a real browser: the widgets render without code,
moving the cut-layer slider and clicking Run brings a reconstruction image, a new setting another."""
import nbformat
import pytest

import browser_servers
import browser_steps
pytest_plugins = ["browser_fixtures"]  # the browser fixtures (chromium, page, lab, notebooks_copy, reports)

EXPLORER = "01_leakage_explorer.ipynb"
FIXTURE = browser_servers.ROOT / "tests" / "browser" / "fixtures" / "widgets_demo.ipynb"


@pytest.fixture
def voila_app(request, notebooks_copy, tmp_path):
    """Voila serving the notebook named by the test's parameter (from the notebooks' copy)."""
    with browser_servers.voila(notebooks_copy / request.param, tmp_path / "voila-home") as server:
        yield server


def _code_lines(path):
    """The notebook's code lines (stripped, non-blank): none of them may show in the app."""
    cells = nbformat.read(path, as_version=4).cells
    return {ln.strip() for c in cells if c.cell_type == "code" for ln in c.source.splitlines() if ln.strip()}


def _round_trip(page, server, notebook):
    page.goto(server.page("/"), wait_until="commit")  # Voila streams the page while the kernel runs it
    page.locator(".leaklab-explorer").first.wait_for(timeout=browser_steps.RUN_S * 1000)
    shown = set(page.locator("body").inner_text().splitlines())
    assert not _code_lines(notebook) & {ln.strip() for ln in shown}, "the Voila app shows code"
    assert browser_steps.errors(page) == [], "a cell failed in the Voila app"
    first, second, cuts = browser_steps.interact(page)
    assert first != second, f"the reconstruction image did not change from cut {cuts[0]} to {cuts[1]}"
    return cuts


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
@pytest.mark.parametrize("voila_app", ["widgets_demo.ipynb"], indirect=True)
def test_widgets_demo_renders_and_answers_in_voila(page, voila_app, reports):
    assert browser_servers.status(f"{voila_app.url}/") in (302, 403), "Voila served the app without its token"
    cuts = _round_trip(page, voila_app, FIXTURE)
    assert page.locator(".leaklab-status").inner_text().strip() == f"run 2 at {cuts[1]}"
    page.screenshot(path=str(reports / "browser-voila-widgets-demo.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
@pytest.mark.parametrize("voila_app", [EXPLORER], indirect=True)
def test_explorer_runs_and_redraws_in_voila(page, voila_app, reports):
    _round_trip(page, voila_app, browser_servers.ROOT / "notebooks" / EXPLORER)
    scores = page.locator(".leaklab-scores").inner_text()
    assert all(name in scores for name in ("PSNR", "SSIM")), f"scores after a run: {scores!r}"
    page.screenshot(path=str(reports / "browser-voila.png"), full_page=True)
