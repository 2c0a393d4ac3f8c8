"""Look at a rendered report in a real headless browser (Debian's Chromium, installed by `make venv`):
a screenshot of the page, and what the page itself counted once loaded (the figures that really
loaded, data-loaded, against those it shows, data-images; templates/report.html.j2).

    python -m perf.report.browser perf/reports/<stamp>/report.html
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# a fresh profile, and none of the background traffic a closed network refuses
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", "--virtual-time-budget=10000")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise FileNotFoundError("chromium not found: `make venv` installs it (Debian package chromium)")
    return exe


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-browser-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout_s)


def check(html_path: Path, screenshot: Path, width: int = 1280, height: int = 4000, timeout_s: float = 120) -> dict:
    """{"images": shown, "loaded": loaded, "tables": n, "screenshot": path}; raises if the browser fails."""
    url = Path(html_path).resolve().as_uri()
    dom = _run(["--dump-dom", url], timeout_s)
    if dom.returncode != 0 or "<body" not in dom.stdout:
        raise RuntimeError(f"chromium could not render {html_path}: {dom.stderr[-2000:]}")
    tag = re.search(r"<body([^>]*)>", dom.stdout)
    assert tag is not None  # "<body" is in the page
    body = tag.group(1)

    def attr(name: str) -> int | None:
        return int(m.group(1)) if (m := re.search(rf'data-{name}="(\d+)"', body)) else None

    shot = _run([f"--screenshot={Path(screenshot).resolve()}", f"--window-size={width},{height}", url], timeout_s)
    if shot.returncode != 0 or not Path(screenshot).is_file():
        raise RuntimeError(f"chromium took no screenshot of {html_path}: {shot.stderr[-2000:]}")
    return {"images": attr("images"), "loaded": attr("loaded"), "tables": dom.stdout.count("<table"),
            "screenshot": str(screenshot)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Screenshot a report and check its figures loaded, in headless Chromium")
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path, help="default: report.png beside the page")
    a = p.parse_args()
    r = check(a.html, a.screenshot or a.html.with_suffix(".png"))
    print(f"{r['loaded']} of {r['images']} figures loaded, {r['tables']} tables; screenshot {r['screenshot']}")
    raise SystemExit(0 if r["images"] and r["loaded"] == r["images"] else 1)
