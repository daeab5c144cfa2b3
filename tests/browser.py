"""Headless Chromium for the tests of the HTML pages: Debian's `chromium`, driven through
playwright's client (no browser download), a fresh profile per launch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Watched:
    """A page opened in Chromium, with what it complained of and every URL it requested."""

    page: Page
    problems: list[str] = field(default_factory=list)  # console errors and warnings, page errors
    requests: list[str] = field(default_factory=list)


@contextmanager
def open_page(path: Path) -> Iterator[Watched]:
    """The file at `path` loaded in a 1400x1000 headless Chromium, watched from before it loads."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (make system-deps installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        try:
            watched = Watched(browser.new_page(viewport={"width": 1400, "height": 1000}))
            watched.page.on(
                "console",
                lambda m: (
                    watched.problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            watched.page.on("pageerror", lambda e: watched.problems.append(f"page error: {e}"))
            watched.page.on("request", lambda r: watched.requests.append(r.url))
            watched.page.goto(path.as_uri(), wait_until="load", timeout=60_000)
            yield watched
        finally:
            browser.close()
