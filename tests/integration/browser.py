"""A real headless browser (Debian's chromium, installed by `make test`) that renders a page, runs its
scripts and gives back the resulting DOM and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=15000"]


@dataclass(frozen=True)
class Rendered:
    dom: str
    """The document after its scripts ran."""
    screenshot: Path


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is missing: `make test` installs it (scripts/browser.sh)"
    return found


def render(page: Path, width: int = 1280, height: int = 1400) -> Rendered:
    url = page.resolve().as_uri()
    profile = page.parent / "chromium-profile"
    common = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    shot = page.with_suffix(".png")
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.is_file(), "chromium wrote no screenshot"
    return Rendered(dom.stdout, shot)
