"""Headless Chromium for the browser tests, through Playwright driving the system's chromium (Debian's package:
Playwright's own browser download needs the internet). Tests skip when no chromium binary is installed."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def find_chromium() -> str | None:
    """$VISREC_CHROMIUM, else the first chromium-like binary on PATH."""
    given = os.environ.get("VISREC_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def launch(width: int = 1280, height: int = 2000) -> Iterator:
    """A Playwright Browser on the system chromium, offline-safe (no download, no sandbox for root in CI)."""
    from playwright.sync_api import sync_playwright

    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium binary: apt-get install chromium, or set VISREC_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"])
        try:
            yield browser
        finally:
            browser.close()


def watch_errors(page) -> list[str]:
    """The page's console errors and uncaught exceptions, collected as they happen (the list fills while the test
    drives the page)."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors
