"""The web page in a real headless Chromium against a real `tokenrelay serve`.

The scripted model streams SCRIPT: Markdown whose words include numbered markers
(w01, w02, ...), so any chunk lost or shown twice changes the marker list a test reads
off the page.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Route

from tests.support.web import (
    ALL_MARKERS,
    SCRIPT,
    SCRIPT_CHUNKS,
    SCRIPT_RATE,
    assert_healthy,
    mock_env,
    scripted_env,
)
from tests.web_browser import (
    markers,
    open_tab,
)
from tests.web_server import ServerProcess, free_port, mock_model, serve
from tokenrelay.testing import directive

pytestmark = [pytest.mark.browser]

# `make screenshot` sets it to docs/screenshot.png; a test run leaves the work tree alone.
SCREENSHOT_ENV = "TOKENRELAY_SCREENSHOT"


@pytest.fixture(scope="module")
def scripted(
    browser: Browser, bundle: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`serve` with the scripted model streaming SCRIPT."""
    with serve(tmp_path_factory.mktemp("serve-scripted"), scripted_env()) as proc:
        yield proc


@pytest.fixture(scope="module")
def mocked(
    browser: Browser, bundle: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`serve` with the openai provider talking to the mock model (directives pick answers)."""
    workdir = tmp_path_factory.mktemp("serve-mock")
    with (
        mock_model(workdir / "mock") as model,
        serve(
            workdir / "serve",
            mock_env(model.url),
        ) as proc,
    ):
        yield proc


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: its own sessionStorage."""
    ctx = await browser.new_context(viewport={"width": 1200, "height": 860})
    try:
        yield ctx
    finally:
        await ctx.close()


async def stored(server: ServerProcess, qid: str) -> dict[str, object]:
    """What the HTTP API holds for a question: {question, answer, entries}."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{server.url}/api/questions/{qid}")
    response.raise_for_status()
    body = response.json()
    assert isinstance(body, dict)
    return body


# -- streaming ------------------------------------------------------------------------------


async def test_answer_streams_incrementally_as_markdown_with_figures(
    scripted: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, scripted.url)
    assert await tab.page.get_by_label("Topic").input_value() == "Redis"
    # Without TOKENRELAY_API_KEYS nothing of API keys shows.
    assert await tab.page.get_by_label("API key").is_hidden()
    assert await tab.page.get_by_role("button", name="Forget key").is_hidden()
    await tab.ask("Why do answers go through Redis Streams?")

    seen = await tab.watch_growth(until="done")

    partial = [text for text in seen[:-1] if markers(text)]
    assert len(partial) >= 3, f"the text should grow over several observations: {seen}"
    lengths = [len(markers(text)) for text in partial]
    assert lengths == sorted(lengths), "the text only ever grows"
    assert lengths[0] < len(ALL_MARKERS) // 2, "the first observation came too late"
    assert markers(seen[-1]) == ALL_MARKERS

    body = tab.page.locator("#answer-body")
    assert await body.locator("h2").inner_text() == "Why Redis Streams w01"
    assert await body.locator("ul > li").count() == 3
    assert await body.locator("strong").first.inner_text() == "stream"
    assert "redis.xadd" in await body.locator("pre > code").inner_text()

    qid = tab.question_id
    assert qid, "the address carries the question id"
    figures = await tab.figures()
    assert figures["chunks"] == str(SCRIPT_CHUNKS)
    assert figures["model"] == "scripted"
    assert figures["ttft"].endswith(("ms", " s")), figures
    rate = float(figures["rate"])
    assert SCRIPT_RATE * 0.5 < rate < SCRIPT_RATE * 1.5, figures
    assert await tab.page.inner_text("#answer-status") == "Done"
    assert await tab.page.locator("#stop").is_hidden()
    foreign = [url for url in tab.requests if not url.startswith(scripted.url + "/")]
    assert foreign == [], "every asset comes from tokenrelay itself (no CDN)"
    assert_healthy(tab)


async def test_a_page_without_websockets_shows_every_chunk_from_the_start(
    scripted: ServerProcess, context: BrowserContext
) -> None:
    """Over Engine.IO long-polling, the ask's ack and the first events of its watch can
    come in one response: the page keeps those that come before it knows the id. Each
    poll here is held back 300 ms, so the ack and the first entries are queued together."""
    await context.add_init_script("window.WebSocket = undefined;")

    async def held_back(route: Route) -> None:
        if route.request.method == "GET":
            await asyncio.sleep(0.3)
        await route.continue_()

    await context.route("**/socket.io/*", held_back)
    tab = await open_tab(context, scripted.url)
    await tab.ask("Does it work without websockets?")
    seen = await tab.watch_growth(until="done")
    assert markers(seen[-1]) == ALL_MARKERS
    figures = await tab.figures()  # the model is in the start entry, the chunks in the end
    assert figures["model"] == "scripted" and figures["chunks"] == str(SCRIPT_CHUNKS)
    transports = [url for url in tab.requests if "/socket.io/" in url]
    assert transports and all("transport=polling" in url for url in transports)
    assert_healthy(tab)


async def test_without_stream_shows_a_waiting_state_then_the_whole_answer(
    scripted: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, scripted.url)
    await tab.ask("Answer all at once, please", stream=False)

    await tab.wait_status("waiting", timeout_s=5)
    assert await tab.page.locator("#answer-waiting").is_visible()
    await asyncio.sleep(1.5)  # the answer is being generated: still nothing shown
    assert await tab.status() == "waiting"
    assert await tab.answer_text() == ""

    await tab.wait_status("done", timeout_s=30)
    assert markers(await tab.answer_text()) == ALL_MARKERS
    assert await tab.page.locator("#answer-waiting").is_hidden()
    assert tab.question_id, "the finished answer's id is in the address"
    assert (await tab.figures())["chunks"] == str(SCRIPT_CHUNKS)
    assert_healthy(tab)


async def test_stop_ends_the_answer_where_it_was(
    scripted: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, scripted.url)
    await tab.ask("Start, then stop")
    await tab.wait_markers(5)
    stop = tab.page.get_by_role("button", name="Stop")
    assert await stop.is_visible()
    await stop.click()

    await tab.wait_status("cancelled", timeout_s=10)
    stopped_at = markers(await tab.answer_text())
    await asyncio.sleep(1.5)
    assert markers(await tab.answer_text()) == stopped_at, "nothing arrives after the stop"
    assert 5 <= len(stopped_at) < len(ALL_MARKERS)
    assert stopped_at == ALL_MARKERS[: len(stopped_at)]
    assert await tab.page.inner_text("#answer-status") == "Stopped"
    assert await stop.is_hidden()
    assert tab.question_id is not None
    record = (await stored(scripted, tab.question_id))["question"]
    assert isinstance(record, dict)
    assert record["status"] == "cancelled"
    assert_healthy(tab)


# -- resume -----------------------------------------------------------------------------------


async def test_reload_mid_answer_ends_with_exactly_the_full_text(
    scripted: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, scripted.url)
    await tab.ask("Reload me halfway")
    before = await tab.wait_markers(8)
    qid = tab.question_id
    assert qid is not None
    assert len(before) < len(ALL_MARKERS), "the reload must come mid-answer"

    await tab.page.reload()
    await tab.page.wait_for_selector("#answer:not([hidden])", timeout=5000)
    assert tab.question_id == qid
    # This tab's snapshot shows the text at once, before the socket even connects.
    assert len(markers(await tab.answer_text())) >= len(before)

    await tab.wait_status("done", timeout_s=30)
    assert markers(await tab.answer_text()) == ALL_MARKERS

    snap = await tab.snapshot(qid)
    assert snap is not None
    assert snap["text"] == SCRIPT, "text kept for the next reload is exactly the answer"
    answer = (await stored(scripted, qid))["answer"]
    assert answer == SCRIPT

    await tab.page.reload()  # a finished answer reloads as it was
    await tab.wait_status("done", timeout_s=10)
    assert markers(await tab.answer_text()) == ALL_MARKERS
    assert_healthy(tab)


async def test_second_tab_shows_the_same_answer_live(
    scripted: ServerProcess, browser: Browser, context: BrowserContext
) -> None:
    first = await open_tab(context, scripted.url)
    await first.ask("Watch me from two tabs")
    await first.wait_markers(5)
    qid = first.question_id
    assert qid is not None

    other_context = await browser.new_context(viewport={"width": 900, "height": 800})
    try:
        second = await open_tab(other_context, scripted.url, f"/?q={qid}")
        seen = await second.watch_growth(until="done")
        grew = [text for text in seen[:-1] if markers(text)]
        assert len(grew) >= 2, "the second tab follows live, not only at the end"
        assert markers(seen[-1]) == ALL_MARKERS
        await first.wait_status("done")
        assert markers(await first.answer_text()) == ALL_MARKERS
        assert await second.page.inner_text("#answer-question") == "Watch me from two tabs"
        assert_healthy(first, second)
    finally:
        await other_context.close()


async def test_reconnects_with_backoff_and_resumes_after_a_server_restart(
    browser: Browser, bundle: None, tmp_path: Path
) -> None:
    port = free_port()
    env = scripted_env(rate=15.0)
    context = await browser.new_context()
    try:
        with serve(tmp_path, env, port=port) as first_server:
            tab = await open_tab(context, first_server.url)
            assert await tab.page.inner_text("#conn-text") == "Connected"
            await tab.ask("Survive a restart")
            await tab.wait_markers(3)
            qid = tab.question_id
            # SIGTERM: the gateway drops its sockets; its worker finishes or hands the
            # request back, and the data stays in the data directory.
            await asyncio.to_thread(first_server.stop)
        await tab.page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=10_000)
        assert await tab.page.inner_text("#conn-text") == "Reconnecting…"

        with serve(tmp_path, env, port=port):
            await tab.page.wait_for_selector('#conn[data-state="connected"]', timeout=30_000)
            await tab.wait_status("done", timeout_s=60)
            assert tab.question_id == qid
            assert markers(await tab.answer_text()) == ALL_MARKERS
        assert_healthy(tab)
    finally:
        await context.close()


# -- history ----------------------------------------------------------------------------------


async def test_history_shows_a_stored_answer_at_once_and_replays_it_at_its_pace(
    scripted: ServerProcess, browser: Browser, context: BrowserContext
) -> None:
    asker = await open_tab(context, scripted.url)
    question = f"Keep me for later {time.time_ns()}"
    await asker.ask(question)
    await asker.wait_status("done")
    qid = asker.question_id
    assert qid is not None
    entries = (await stored(scripted, qid))["entries"]
    assert isinstance(entries, list)
    first_ms = int(str(entries[0]["entry_id"]).split("-")[0])
    last_ms = int(str(entries[-1]["entry_id"]).split("-")[0])
    original_s = (last_ms - first_ms) / 1000

    other_context = await browser.new_context()
    try:
        tab = await open_tab(other_context, scripted.url)
        item = tab.page.locator(f'#history-list a[data-id="{qid}"]')
        await item.wait_for(timeout=10_000)
        assert question in await item.inner_text()
        await item.click()
        await tab.wait_status("done", timeout_s=3)
        assert tab.question_id == qid
        assert markers(await tab.answer_text()) == ALL_MARKERS
        assert await item.get_attribute("aria-current") == "page"

        started = time.monotonic()
        await tab.page.get_by_role("button", name="Replay at original pace").click()
        await tab.wait_status("replaying", timeout_s=3)
        seen = await tab.watch_growth(until="done", timeout_s=original_s + 20)
        took_s = time.monotonic() - started
        grew = [len(markers(text)) for text in seen[:-1] if markers(text)]
        assert len(grew) >= 3 and grew == sorted(grew), f"replay grows gradually: {grew}"
        assert took_s >= original_s * 0.7, f"replay took {took_s:.1f} s, original {original_s} s"
        assert markers(seen[-1]) == ALL_MARKERS
        assert_healthy(asker, tab)
    finally:
        await other_context.close()


# -- errors -----------------------------------------------------------------------------------


async def test_model_error_is_shown_as_a_readable_message(
    mocked: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    await tab.ask("Please fail " + directive(fail=500))
    await tab.wait_status("failed", timeout_s=30)
    error = tab.page.locator("#answer-error")
    assert await error.is_visible()
    message = await error.inner_text()
    assert message.startswith("The answer failed: ")
    assert len(message) > len("The answer failed: ") + 5
    assert "Traceback" not in message
    assert await tab.page.inner_text("#answer-status") == "Failed"

    await tab.ask("Fail without stream " + directive(fail=500), stream=False)
    await tab.wait_status("failed", timeout_s=30)
    assert await tab.page.locator("#answer-error").is_visible()
    assert_healthy(tab)


async def test_server_errors_are_shown_as_readable_messages(
    mocked: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    notice = tab.page.locator("#notice")
    await tab.ask("x" * 3100)
    await notice.wait_for(timeout=10_000)
    assert "limit is 3000" in await notice.inner_text()

    await tab.goto("/?q=AAAAAAAAAAAAAAAAAAAAAA")
    await notice.wait_for(timeout=10_000)
    text = await notice.inner_text()
    assert "Cannot show question" in text
    assert "404" in text
    assert_healthy(tab)


XSS = (
    "Here <img src=x onerror=\"alert('img');window.__pwned='img'\"> and "
    "<script>alert('script');window.__pwned='script'</script> and "
    "[click me](javascript:alert('link')) and "
    "<a href=\"javascript:window.__pwned='a'\">raw link</a> and "
    "<svg onload=\"window.__pwned='svg'\"></svg> "
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe> "
    "![pic](javascript:window.__pwned='imgmd') "
    "<javascript:window.__pwned='auto'> "
    "<details open ontoggle=\"window.__pwned='toggle'\">x</details> "
    "[ok](https://redis.io) END"
)


async def test_model_output_cannot_run_script_or_inject_markup(
    mocked: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    scripts_before = await tab.page.locator("script").count()
    await tab.ask(
        "Show me tricks " + directive(text=XSS, rate=200),
        topic="<img src=x onerror=\"window.__pwned='topic'\">",
    )
    await tab.wait_status("done", timeout_s=30)
    await asyncio.sleep(0.5)  # time for anything that was going to fire

    page = tab.page
    text = await tab.answer_text()
    assert "<script>" in text and "END" in text, "the markup is shown as text"
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert tab.dialogs == []
    assert tab.csp_violations == [], "nothing even tried to run"
    assert await page.locator("script").count() == scripts_before
    body = page.locator("#answer-body")
    for tag in ("img", "svg", "iframe", "script", "details", "object", "embed"):
        assert await body.locator(tag).count() == 0, tag
    bad = await page.evaluate(
        """() => [...document.querySelectorAll('*')].flatMap(el => [...el.attributes]
            .filter(a => a.name.startsWith('on')
                || /^\\s*(javascript|vbscript|data):/i.test(a.value))
            .map(a => `${el.tagName}[${a.name}=${a.value}]`))"""
    )
    assert bad == []
    links = await body.locator("a").evaluate_all("els => els.map(a => a.href)")
    assert links == ["https://redis.io/"]
    assert_healthy(tab)


# -- usability ----------------------------------------------------------------------------------


async def test_phone_width_labelled_controls_and_keyboard_only(
    scripted: ServerProcess, browser: Browser
) -> None:
    context = await browser.new_context(
        viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    try:
        tab = await open_tab(context, scripted.url)
        page = tab.page
        for label in ("Topic", "Question", "Without stream"):
            assert await page.get_by_label(label).is_visible(), label
        assert await page.get_by_role("button", name="Ask").is_visible()
        overflow = await page.evaluate(
            "document.scrollingElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "no sideways scrolling at phone width"

        # Keyboard only: the question box has focus on load; Enter asks.
        assert await page.evaluate("document.activeElement.id") == "question"
        await page.keyboard.type("Typed without a mouse")
        await page.keyboard.press("Enter")
        await tab.wait_status("done")
        assert markers(await tab.answer_text()) == ALL_MARKERS
        overflow = await page.evaluate(
            "document.scrollingElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "the answer, code block included, fits the phone's width"

        for _ in range(40):  # Tab along until the replay button has focus
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "replay":
                break
        else:
            raise AssertionError("the replay button cannot be reached with Tab")
        await page.keyboard.press("Enter")
        await tab.wait_status("replaying", timeout_s=3)
        assert_healthy(tab)
    finally:
        await context.close()


SHOWCASE = (
    "Redis Streams fit LLM output well, because an answer is an **append-only log** that "
    "several readers need at their own pace.\n\n"
    "1. The worker appends each chunk with `XADD`; Redis assigns an entry id that also "
    "records the time.\n"
    "2. Every viewer reads with `XREAD` from the last id it saw, so a reload or a dropped "
    "connection resumes with nothing lost and nothing twice.\n"
    "3. A consumer group (`XREADGROUP` + `XACK`) hands each question to one worker, and "
    "`XAUTOCLAIM` rescues the questions of a worker that crashed.\n\n"
    "```python\n"
    'entry_id = await redis.xadd(f"answer:{qid}", {"type": "chunk", "data": text})\n'
    "```\n\n"
    "Finished answers stay in the stream until they expire, which is what the history list "
    "on the right replays at the original pace."
)


async def test_screenshot_of_an_answer_mid_stream(
    browser: Browser, bundle: None, tmp_path: Path
) -> None:
    env = scripted_env(rate=40.0) | {"TOKENRELAY_SCRIPTED_TEXT": SHOWCASE}
    context = await browser.new_context(viewport={"width": 1200, "height": 780})
    try:
        with serve(tmp_path, env) as server:
            tab = await open_tab(context, server.url)
            for question in ("What is a consumer group?", "How do I trim a stream?"):
                await tab.ask(question)
                await tab.wait_status("done")
            await tab.ask("Why stream LLM answers through Redis Streams?")
            await tab.wait_status("streaming")
            expected = len(SHOWCASE.split())
            while len((await tab.answer_text()).split()) < expected * 0.6:
                await asyncio.sleep(0.02)
            await tab.page.evaluate("document.activeElement.blur()")
            shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "screenshot.png")
            await tab.page.screenshot(path=str(shot))
            assert await tab.status() == "streaming", "the picture shows an answer mid-stream"
            assert len(await asyncio.to_thread(shot.read_bytes)) > 10_000
            await tab.wait_status("done")
            assert_healthy(tab)
    finally:
        await context.close()
