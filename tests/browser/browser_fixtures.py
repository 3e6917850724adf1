"""Browser fixtures: Debian's chromium driven by Playwright for Python (no `playwright install`), and
JupyterLab / Voila servers on temporary copies of the notebooks. The browser test modules import
them (a conftest.py here would clash with tests/conftest.py: both are module "conftest" to the
doctest collector). Without /usr/bin/chromium or
playwright every browser test skips and says why (`.ci/run` installs chromium, so CI runs them)."""
import os
import shutil
from pathlib import Path

import pytest

import browser_servers

CHROMIUM = Path(os.environ.get("LEAKLAB_CHROMIUM", "/usr/bin/chromium"))
REPORTS = browser_servers.ROOT / "reports"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The network is closed here: without these chromium floods refused connections (updates, sync, QUIC).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """A headless chromium (fresh user data dir) under Playwright; skips without either."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


@pytest.fixture
def page(chromium):
    """A new tab, closed after the test; browser console errors go to the test's captured output."""
    tab = chromium.new_page()
    tab.on("console", lambda m: m.type == "error" and print(f"[console] {m.text}"))
    yield tab
    tab.close()


@pytest.fixture
def notebooks_copy(tmp_path):
    """The repo's notebooks and the browser fixtures, copied: runs never write outputs into the repo."""
    dest = tmp_path / "notebooks"
    shutil.copytree(browser_servers.ROOT / "notebooks", dest,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy(FIXTURES / "widgets_demo.ipynb", dest / "widgets_demo.ipynb")
    return dest


@pytest.fixture
def lab(notebooks_copy, tmp_path):
    """A JupyterLab on the notebooks' copy, stopped (process group) at teardown."""
    with browser_servers.jupyter_lab(notebooks_copy, tmp_path / "lab-home") as server:
        yield server


@pytest.fixture
def reports() -> Path:
    """reports/ in the repo (gitignored): where screenshots go."""
    REPORTS.mkdir(exist_ok=True)
    return REPORTS
