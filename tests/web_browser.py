"""Headless Chromium driven by Playwright, and what the browser tests read off the page."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    async_playwright,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATIC_INDEX = ROOT / "src" / "tokenrelay" / "gateway" / "static" / "index.html"


def require_browser() -> None:
    """Skip when Chromium is missing; fail instead under TOKENRELAY_REQUIRE_BROWSER=1 (CI)."""
    if CHROMIUM.exists():
        return
    why = f"{CHROMIUM} is missing (`make browser` installs it)"
    if os.environ.get("TOKENRELAY_REQUIRE_BROWSER") == "1":
        pytest.fail(
            f"{why}; TOKENRELAY_REQUIRE_BROWSER=1 demands the browser tests run", pytrace=False
        )
    pytest.skip(why)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium for a test module (skipped or failed as `require_browser` says)."""
    require_browser()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


def build_bundle() -> None:
    """The page is served from the built bundle: build it (quick when it is up to date)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-web.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0 or not STATIC_INDEX.exists():
        pytest.fail(
            f"scripts/build-web.sh failed:\n{result.stdout}\n{result.stderr}", pytrace=False
        )


@dataclass
class Tab:
    """One page, with what it did that a test must see: dialogs, uncaught errors, CSP blocks."""

    page: Page
    base_url: str
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    _pending: set[asyncio.Future[None]] = field(default_factory=set)

    async def goto(self, path: str = "/", *, connected: bool = True) -> None:
        """Open `path`; wait until the socket is connected unless `connected` is False."""
        await self.page.goto(self.base_url + path)
        if connected:
            await self.page.wait_for_selector('#conn[data-state="connected"]', timeout=15_000)

    @property
    def question_id(self) -> str | None:
        values = parse_qs(urlparse(self.page.url).query).get("q")
        return values[0] if values else None

    async def ask(self, question: str, *, topic: str | None = None, stream: bool = True) -> None:
        """Type like a person: topic, question, the checkbox, then Enter in the question box."""
        page = self.page
        if topic is not None:
            await page.get_by_label("Topic", exact=True).fill(topic)
        await page.get_by_label("Without stream").set_checked(not stream)
        box = page.get_by_label("Question", exact=True)
        await box.fill(question)
        await box.press("Enter")

    async def answer_text(self) -> str:
        return await self.page.inner_text("#answer-body")

    async def status(self) -> str | None:
        return await self.page.get_attribute("#answer", "data-status")

    async def wait_status(self, *statuses: str, timeout_s: float = 30.0) -> str:
        selector = ", ".join(f'#answer[data-status="{s}"]' for s in statuses)
        await self.page.wait_for_selector(selector, state="attached", timeout=timeout_s * 1000)
        status = await self.status()
        assert status is not None
        return status

    async def wait_markers(self, at_least: int, timeout_s: float = 30.0) -> list[str]:
        """Poll until the answer shows `at_least` numbered markers; return them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = markers(await self.answer_text())
            if len(found) >= at_least:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(found)} markers after {timeout_s} s: {found}")
            await asyncio.sleep(0.05)

    async def watch_growth(self, until: str = "done", timeout_s: float = 30.0) -> list[str]:
        """Observe the answer text every 50 ms until the status is `until`; the distinct texts."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.status()
            text = await self.answer_text()
            if not seen or seen[-1] != text:
                seen.append(text)
            if status == until:
                return seen
            await asyncio.sleep(0.05)
        raise AssertionError(f"status never became {until!r}; texts seen: {len(seen)}")

    async def snapshot(self, question_id: str) -> dict[str, Any] | None:
        raw = await self.page.evaluate(
            "id => sessionStorage.getItem('tokenrelay:answer:' + id)", question_id
        )
        if not isinstance(raw, str):
            return None
        value = json.loads(raw)
        return value if isinstance(value, dict) else None

    async def figures(self) -> dict[str, str]:
        names = {
            "ttft": "#fig-ttft",
            "rate": "#fig-rate",
            "chunks": "#fig-chunks",
            "model": "#fig-model",
        }
        return {k: (await self.page.inner_text(sel)).strip() for k, sel in names.items()}


async def open_tab(
    context: BrowserContext, base_url: str, path: str = "/", *, connected: bool = True
) -> Tab:
    page = await context.new_page()
    tab = Tab(page, base_url)

    def on_dialog(dialog: Dialog) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        task = asyncio.ensure_future(dialog.dismiss())
        tab._pending.add(task)
        task.add_done_callback(tab._pending.discard)

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            tab.csp_violations.append(message.text)

    def on_page_error(error: Error) -> None:
        tab.page_errors.append(f"{error.name}: {error.message}")

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("request", lambda request: tab.requests.append(request.url))
    await tab.goto(path, connected=connected)
    return tab


_MARKER = re.compile(r"\bw(\d{2})\b")


def markers(text: str) -> list[str]:
    """The numbered markers (w01, w02, ...) in a text, in order: any loss or doubling shows."""
    return [f"w{m}" for m in _MARKER.findall(text)]
