"""A demo's ``report.html`` as a person sees it: opened in headless Chromium, checked, and photographed.

    python benchmarks/report_screenshot.py runs/demo/report.html      # -> benchmarks/results/demo-report.png
    python benchmarks/report_screenshot.py REPORT OUT.png --width 1280

It prints what the browser saw (every image decoded, the causal tree drawn and the size of its smallest node
label on screen, console errors) and exits non-zero if something a reader would notice is wrong.
The browser work is :mod:`circuitsae.viz.browser`'s, which ``tests/test_report_browser.py`` also calls.

The browser is Debian's ``chromium`` (``make setup`` installs it when missing), driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``): no Python package beyond the standard library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuitsae.viz.browser import inspect_page, problems

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a report.html (e.g. runs/demo/report.html)")
    ap.add_argument("out", nargs="?", default=str(RESULTS / "demo-report.png"),
                    help="the screenshot (default: benchmarks/results/demo-report.png)")  # fmt: skip
    ap.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    args = ap.parse_args()
    seen = inspect_page(args.report, args.out, width=args.width)
    for i in seen["images"]:
        print(f"image {i['alt']!r}: {i['natural_width']}x{i['natural_height']} shown at {i['width']:.0f} px")
    for s in seen["svgs"]:
        print(f"svg: {s['nodes']} nodes, {s['width']:.0f}x{s['height']:.0f} px in a {s['container_width']} px box, "
              f"smallest node label {s['min_label_px'] or 0:.1f} px")  # fmt: skip
    print(f"console errors: {len(seen['errors'])}; screenshot: {args.out}")
    bad = problems(seen)
    for p in bad:
        print("PROBLEM:", p)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
