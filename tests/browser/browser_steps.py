"""What a user does in the browser, as Playwright steps: open a notebook in JupyterLab once its kernel is
ready, Run All, move the explorer's cut-layer slider, click Run and read the reconstruction image's
PNG bytes. Selectors are the leaklab-* classes every explorer control carries
(toolkit/widgets/explorer.py)."""
from __future__ import annotations

import base64
import json
import time
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importable without playwright: its tests skip then (conftest), not fail to collect
    from playwright.sync_api import Page

KERNEL_READY_S = 120  # a cold kernel importing torch on 2 shared cores
RUN_S = 180  # one explorer run: train, attack, draw (about 15 s on digits, more under a loaded suite)

IMAGE = "img.leaklab-reconstruction"
# The reconstruction's PNG once the browser decoded it and it is not ``old`` (the previous bytes).
_NEW_IMAGE = """async (old) => {
  const img = document.querySelector('%s');
  if (!img || !img.src || !img.complete || img.naturalWidth === 0) return null;
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let s = ''; for (const b of bytes) s += String.fromCharCode(b);
  const b64 = btoa(s);
  return b64 === old ? null : b64;
}""" % IMAGE


def kernels_idle(server) -> bool:
    """True when every kernel of ``server`` is connected and idle (REST /api/kernels)."""
    with urllib.request.urlopen(server.page("/api/kernels"), timeout=5) as r:
        kernels = json.load(r)
    return bool(kernels) and all(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels)


def open_notebook(page: Page, server, name: str) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel answers (status bar and REST say Idle):
    cells run before that are the "kernel not ready" pitfall."""
    page.goto(server.page(f"/lab/tree/{name}"))
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").wait_for(timeout=KERNEL_READY_S * 1000)
    deadline = time.monotonic() + KERNEL_READY_S
    while not kernels_idle(server):
        assert time.monotonic() < deadline, "the notebook's kernel never became idle"
        time.sleep(0.25)


# Every code cell's prompt shows its execution count: Run All got to the end (it stops at an error).
_ALL_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
TRACEBACK = "Traceback (most recent call last)"  # IPython's header of every error output


def run_all(page: Page) -> None:
    """Run > Run All Cells from the menu bar, as a user would; waits until every code cell ran and
    the explorer shows."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
    page.locator(".leaklab-explorer").first.wait_for(timeout=RUN_S * 1000)
    page.wait_for_function(_ALL_RAN, timeout=RUN_S * 1000, polling=250)


def errors(page: Page) -> list:
    """The error outputs (tracebacks) the page shows, as text."""
    return page.get_by_text(TRACEBACK).all_inner_texts()


def cut_value(page: Page) -> str:
    """The cut-layer slider's readout (the layer name it shows)."""
    return page.locator(".leaklab-cut .widget-readout").inner_text().strip()


def move_cut(page: Page) -> str:
    """Focus the cut-layer slider's handle (ipywidgets 8: noUiSlider) and press ArrowRight, or ArrowLeft
    at the last layer; returns the new readout and checks it moved."""
    before = cut_value(page)
    handle = page.locator(".leaklab-cut .noUi-handle")
    handle.focus()
    page.keyboard.press("ArrowRight")
    if cut_value(page) == before:  # already at the deepest layer
        page.keyboard.press("ArrowLeft")
    after = cut_value(page)
    assert after != before, f"the cut-layer slider did not move from {before!r}"
    return after


def run_and_read_image(page: Page, old: str | None = None) -> bytes:
    """Click Run, wait for a reconstruction image other than ``old`` (base64) and for Run to be enabled
    again (the run is over); returns the image's PNG bytes."""
    from playwright.sync_api import expect

    run = page.locator(".leaklab-run")
    expect(run).to_be_enabled(timeout=RUN_S * 1000)
    run.click()
    deadline = time.monotonic() + RUN_S
    while (shown := page.evaluate(_NEW_IMAGE, old)) is None:  # evaluate awaits the async fetch
        assert time.monotonic() < deadline, f"no new reconstruction image {RUN_S} s after Run"
        page.wait_for_timeout(250)
    png = base64.b64decode(shown)
    expect(run).to_be_enabled(timeout=RUN_S * 1000)  # the run finished: status and scores are final
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "the reconstruction image is not a PNG"
    return png


def shown_image(page: Page) -> str | None:
    """The reconstruction image shown now (base64 PNG), None when there is none yet."""
    return page.evaluate(_NEW_IMAGE, None)


def interact(page: Page) -> tuple:
    """The contract's loop: move the cut, Run, image; move it again, Run, a different image.
    Returns (first PNG, second PNG, the two cut layers)."""
    first_cut = move_cut(page)
    first = run_and_read_image(page, shown_image(page))
    second_cut = move_cut(page)
    second = run_and_read_image(page, base64.b64encode(first).decode())
    return first, second, (first_cut, second_cut)
