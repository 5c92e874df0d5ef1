"""Render a report page in headless Chromium with the network cut off and save a PNG screenshot.

    python benchmarks/tools/screenshot_report.py runs/report/report.html [--out shot.png] [--width 1400 --height 3000]

Exits 2 when no Chromium is installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """Path of an installed Chromium-family browser, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(browser: str, page: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        return subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--no-first-run",
             "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: the page must need no network
             *extra, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(page: Path, out: Path, *, width: int = 1400, height: int = 3000, browser: str | None = None) -> Path:
    """PNG of `page` as Chromium draws it at `width` x `height` CSS pixels."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found; install it (Debian: apt-get install chromium)")
    proc = _run(browser, page, f"--screenshot={Path(out).resolve()}", f"--window-size={width},{height}")
    if proc.returncode != 0 or not Path(out).exists():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Path(out)


def rendered_dom(page: Path, *, browser: str | None = None) -> str:
    """The page's DOM after Chromium loaded and laid it out (`--dump-dom`)."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found; install it (Debian: apt-get install chromium)")
    proc = _run(browser, page, "--dump-dom")
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the page)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    if find_browser() is None:
        print("error: no Chromium found; install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = args.out or args.page.with_suffix(".png")
    print(f"wrote {screenshot(args.page, out, width=args.width, height=args.height)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
