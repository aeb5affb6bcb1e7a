"""Render `salmonn-pipeline report --html` and screenshot it with headless Chromium (no network).

    python scripts/screenshot_report.py --fixture --png report.png        # synthetic run outputs
    python scripts/screenshot_report.py --out OUT [--run RUN] --png report.png

``--fixture`` writes the test fixtures' run outputs (tests/ops_fixtures.py: a larger run with
varied durations, errors and commit times) to a temporary folder first. Chromium runs with
background networking, sync and component updates off and all traffic sent to a dead proxy, so
the screenshot proves the page renders from the file alone. Needs `chromium` (Debian:
`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("screenshot_report")

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any fetch would fail
)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium found: apt-get install chromium")


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 3000) -> Path:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", html.resolve().as_uri()]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--out", help="an output location with runs")
    src.add_argument("--fixture", action="store_true", help="use synthetic run outputs (tests/ops_fixtures.py)")
    parser.add_argument("--run", help="run id (default: the newest)")
    parser.add_argument("--html", help="where to write the page (default: next to the PNG)")
    parser.add_argument("--png", required=True)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipelines.ops.report import collect, write_html

    png = Path(args.png)
    html = Path(args.html) if args.html else png.with_suffix(".html")
    with tempfile.TemporaryDirectory(prefix="report-fixture-") as tmp:
        out = args.out
        if args.fixture:
            from tests import ops_fixtures

            out = os.path.join(tmp, "out")
            ops_fixtures.build_big_run(out)
        write_html(collect(out, args.run), str(html))
    screenshot(html, png, width=args.width, height=args.height)
    print(f"page: {html}\nscreenshot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
