"""Open a traindyn HTML report in headless Chromium, offline, and save a screenshot.

::

    python scripts/report_screenshot.py runs/geometry.html --out report.png

Needs a Chromium binary (Debian: ``apt-get install chromium``); none is downloaded.  The
browser runs with its network features off (no background networking, no component update,
no sync) and a throw-away profile, so the screenshot shows what a reader without a connection
sees.  With ``--build RUN`` the report of a ``.nc``/``.zarr`` run is written first.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit``, else the first of :data:`CANDIDATES` on PATH."""
    for name in ([explicit] if explicit else CANDIDATES):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no Chromium found (tried " + ", ".join(
        [explicit] if explicit else CANDIDATES) + "); on Debian: apt-get install chromium")


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2400,
               chromium: str | None = None, timeout: float = 120.0) -> Path:
    """Render ``html`` (a local file) in headless Chromium and write ``png``."""
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"no report at {html}")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="traindyn-chromium-") as profile:
        cmd = [find_chromium(chromium), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={width},{height}",
               "--hide-scrollbars", html.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", help="the report (.html), or with --build the run to report")
    parser.add_argument("--out", help="screenshot path (default: HTML with .png)")
    parser.add_argument("--build", action="store_true",
                        help="HTML is a .nc/.zarr run: write its report first")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--chromium", help="the browser executable (default: found on PATH)")
    args = parser.parse_args(argv)
    page = Path(args.html)
    if args.build:
        from traindyn.dynamics.report import write_report

        page = write_report(page)
        print(f"wrote {page}")
    out = Path(args.out) if args.out else page.with_suffix(".png")
    print(f"wrote {screenshot(page, out, args.width, args.height, args.chromium)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
