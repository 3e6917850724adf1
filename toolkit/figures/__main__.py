"""Regenerate every paper figure (``make figures``): PNG and CSV per figure, and an index page.

    python -m toolkit.figures [--smoke] [--only NAME ...] [--out reports/figures] [--threads N]

Each figure's preset runs (``smoke()`` with ``--smoke``), is saved as ``<out>/<name>.png`` and
``<out>/<name>.csv``, and ``<out>/index.html`` shows them all with their sources, the published
anchors, the settings and the seconds each took.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.figures import FIGURES, Figure
from toolkit.progress import progress


def generate(names: list[str] | None = None, *, out: str | Path = "reports/figures", smoke: bool = False,
             show_progress: bool = False) -> list[dict[str, Any]]:
    """Run, plot and save the named figures (all by default); write the index page; return one
    entry per figure (name, paths, seconds, settings)."""
    names = list(FIGURES) if not names else names
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    out = Path(out)
    entries = []
    for name in progress(names, show=show_progress, desc="paper figures"):
        preset: Figure = FIGURES[name].smoke() if smoke else FIGURES[name]()
        start = time.perf_counter()
        frame = preset.run(show_progress=show_progress)
        seconds = time.perf_counter() - start
        png, csv = preset.save(frame, out)
        entries.append({"name": name, "title": preset.title, "source": preset.source, "anchors": list(preset.anchors),
                        "png": png.name, "csv": csv.name, "seconds": round(seconds, 2), "smoke": smoke,
                        "rows": len(frame), "settings": preset.settings()})
    write_index(entries, out)
    return entries


def write_index(entries: list[dict[str, Any]], out: str | Path) -> Path:
    """``<out>/index.html``: every figure with its title, source, published anchors, settings and
    run time; figures generated earlier and listed in ``<out>/index.json`` are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = out / "index.json"
    known: dict[str, dict[str, Any]] = {}
    if ledger.is_file():
        try:
            known = {e["name"]: e for e in json.loads(ledger.read_text()) if (out / e.get("png", "")).is_file()}
        except (ValueError, KeyError, TypeError):
            known = {}  # a damaged ledger is rebuilt from this run
    known.update({e["name"]: e for e in entries})
    ordered = [known[n] for n in sorted(known)]
    ledger.write_text(json.dumps(ordered, indent=1, default=str))
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>LeakLab: paper figures</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%;border:1px solid #ddd}section{margin-bottom:3em}"
             ".anchor{background:#f6f6e8;padding:.4em .8em;border-left:3px solid #bb9}"
             "code{font-size:85%}</style></head><body><h1>LeakLab: paper figures</h1>",
             f"<p>Regenerated with <code>make figures</code> (<code>python -m toolkit.figures</code>); last written "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Each figure: our measurement beside "
             f"the published values, the CSV behind it, and the preset's settings.</p><ul>"]
    parts += [f"<li><a href='#{esc(e['name'])}'>{esc(e['name'])}</a>: {esc(e['title'])}</li>" for e in ordered]
    parts.append("</ul>")
    for e in ordered:
        mode = "smoke settings (seconds; not the paper's scale)" if e.get("smoke") else "full settings"
        parts.append(f"<section id='{esc(e['name'])}'><h2>{esc(e['name'])}: {esc(e['title'])}</h2>"
                     f"<p><b>Source:</b> {esc(e['source'])}</p><div class='anchor'><b>Published anchors:</b><ul>"
                     + "".join(f"<li>{esc(a)}</li>" for a in e["anchors"]) + "</ul></div>"
                     f"<p><img src='{esc(e['png'])}' alt='{esc(e['title'])}'></p>"
                     f"<p>{esc(mode)}; ran in {e['seconds']:.1f} s; data: <a href='{esc(e['csv'])}'>{esc(e['csv'])}</a> "
                     f"({e['rows']} rows); notebook: <code>notebooks/figures/{esc(e['name'])}.ipynb</code></p><details><summary>settings</summary><pre>"
                     f"{esc(json.dumps(e['settings'], indent=1, default=str))}</pre></details></section>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("".join(parts), encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="each preset's smoke() settings (seconds)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"figures to make, of {list(FIGURES)}")
    parser.add_argument("--out", default="reports/figures", help="output folder (default reports/figures)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        from toolkit.validate import positive_int

        torch.set_num_threads(positive_int("threads", args.threads))
    import matplotlib

    matplotlib.use("Agg")
    entries = generate(args.only, out=args.out, smoke=args.smoke, show_progress=not args.no_progress)
    for e in entries:
        print(f"{e['name']}: {e['seconds']:.1f} s -> {Path(args.out) / e['png']}, {Path(args.out) / e['csv']}")
    print(f"index: {Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
