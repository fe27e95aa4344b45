"""The web page against a real `tokenrelay serve` that wants API keys (TOKENRELAY_API_KEYS).

The page learns that a key is needed only from the server's refusal (Socket.IO
`connect_error`, HTTP 401), asks for one, keeps the accepted key in localStorage and sends
it on the socket's auth and as the bearer header of every HTTP call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Request

from tests.support.web import ALL_MARKERS, assert_healthy, scripted_env
from tests.web_browser import Tab, markers, open_tab
from tests.web_server import ServerProcess, serve

pytestmark = [pytest.mark.browser]

KEY_A = "alpha-key-7Yq2Lr9Xw4Nc"
KEY_B = "bravo-key-3Hs8Kd1Vp6Zt"
WRONG_KEY = "wrong-key-0000000000000"
KEPT_KEY_JS = "localStorage.getItem('tokenrelay:api-key')"
REFUSED = '#conn[data-state="refused"]'
CONNECTED = '#conn[data-state="connected"]'


def keyed_env(**extra: str) -> dict[str, str]:
    # Quicker than test_web's pace where no test needs to act mid-answer.
    return scripted_env(rate=60.0) | {"TOKENRELAY_API_KEYS": f"{KEY_A},{KEY_B}"} | extra


@pytest.fixture(scope="module")
def keyed(
    browser: Browser, bundle: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`serve` with the scripted model that answers only KEY_A and KEY_B."""
    with serve(tmp_path_factory.mktemp("serve-keyed"), keyed_env()) as proc:
        yield proc


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: its own localStorage, so no key carried over."""
    ctx = await browser.new_context(viewport={"width": 1200, "height": 860})
    try:
        yield ctx
    finally:
        await ctx.close()


async def open_refused(context: BrowserContext, url: str, path: str = "/") -> Tab:
    """A tab on a page that has no key yet: the server has refused it, the field is shown."""
    tab = await open_tab(context, url, path, connected=False)
    await tab.page.wait_for_selector(REFUSED, timeout=15_000)
    await tab.page.get_by_label("API key").wait_for(timeout=5_000)
    return tab


async def enter_key(tab: Tab, key: str) -> None:
    field = tab.page.get_by_label("API key")
    await field.fill(key)
    await field.press("Enter")


async def use_key(context: BrowserContext, url: str, key: str) -> Tab:
    """A tab whose key has been typed in and accepted."""
    tab = await open_refused(context, url)
    await enter_key(tab, key)
    await tab.page.wait_for_selector(CONNECTED, timeout=15_000)
    return tab


async def kept_key(tab: Tab) -> str | None:
    value = await tab.page.evaluate(KEPT_KEY_JS)
    assert value is None or isinstance(value, str)
    return value


async def history_questions(tab: Tab) -> list[str]:
    texts = await tab.page.locator("#history-list .history-question").all_inner_texts()
    return [t.strip() for t in texts]


async def test_the_page_asks_for_a_key_when_the_server_refuses_it(
    keyed: ServerProcess, browser: Browser
) -> None:
    context = await browser.new_context(
        viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    try:
        tab = await open_refused(context, keyed.url)
        page = tab.page
        field = page.get_by_label("API key")
        assert await field.is_visible()
        assert await field.get_attribute("type") == "password"
        assert await page.inner_text("#conn-text") == "API key needed"
        intro = await page.inner_text("#key-form")
        assert "needs an API key" in intro and "Forget key" in intro
        assert await page.locator("#key-error").is_hidden(), "no key sent: nothing was wrong"
        assert await page.get_by_role("button", name="Forget key").is_hidden()
        assert await page.evaluate("document.activeElement.id") == "api-key"
        overflow = await page.evaluate(
            "document.scrollingElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "no sideways scrolling at phone width"

        # Asking first says what to do, and puts the cursor where it is needed.
        box = page.get_by_label("Question", exact=True)
        await box.fill("Before any key")
        await box.press("Enter")
        notice = page.locator("#notice")
        await notice.wait_for(timeout=5_000)
        assert "Enter the API key" in await notice.inner_text()
        assert await page.evaluate("document.activeElement.id") == "api-key"
        assert await page.locator("#answer").is_hidden()

        # Show reveals what was typed, to check a pasted key; it hides again.
        reveal = page.get_by_role("button", name="Show")
        await reveal.click()
        assert await field.get_attribute("type") == "text"
        assert await reveal.get_attribute("aria-pressed") == "true"
        await reveal.click()
        assert await field.get_attribute("type") == "password"

        # Keyboard only: the field has the focus; type the key, Enter, then ask.
        await field.focus()
        await page.keyboard.type(KEY_A)
        await page.keyboard.press("Enter")
        await page.wait_for_selector(CONNECTED, timeout=15_000)
        assert await page.locator("#key-form").is_hidden()
        assert await page.evaluate("document.activeElement.id") == "question"
        assert await kept_key(tab) == KEY_A
        assert await page.get_by_role("button", name="Forget key").is_visible()
        await box.fill("Typed after the key")
        await box.press("Enter")
        await tab.wait_status("done")
        assert markers(await tab.answer_text()) == ALL_MARKERS
        assert_healthy(tab)
    finally:
        await context.close()


async def test_a_wrong_key_is_refused_readably_and_can_be_fixed(
    keyed: ServerProcess, context: BrowserContext
) -> None:
    tab = await open_refused(context, keyed.url)
    page = tab.page
    field = page.get_by_label("API key")
    error = page.locator("#key-error")

    await enter_key(tab, "has a space in it 0123")
    await error.wait_for(timeout=5_000)
    assert "no spaces" in await error.inner_text()

    await enter_key(tab, WRONG_KEY)
    await page.locator("#key-error", has_text="refused").wait_for(timeout=10_000)
    message = await error.inner_text()
    assert message.startswith("That key was refused")
    assert "not valid for this server" in message
    assert WRONG_KEY not in message
    assert await field.get_attribute("aria-invalid") == "true"
    assert await page.evaluate("document.activeElement.id") == "api-key"
    assert await kept_key(tab) is None, "a refused key is never remembered"
    assert await page.locator(REFUSED).count() == 1

    await enter_key(tab, KEY_B)
    await page.wait_for_selector(CONNECTED, timeout=15_000)
    assert await page.locator("#key-form").is_hidden()
    assert await kept_key(tab) == KEY_B

    # A kept key the server no longer takes (keys rotated) is reported the same way.
    await page.evaluate(f"localStorage.setItem('tokenrelay:api-key', '{WRONG_KEY}')")
    await page.reload()
    await page.wait_for_selector(REFUSED, timeout=15_000)
    await error.wait_for(timeout=5_000)
    assert "The saved key was refused" in await error.inner_text()
    forget = page.get_by_role("button", name="Forget key")
    await forget.click()
    await error.wait_for(state="hidden", timeout=10_000)
    assert await forget.is_hidden()
    assert await kept_key(tab) is None
    assert await field.is_visible()
    await enter_key(tab, KEY_A)
    await page.wait_for_selector(CONNECTED, timeout=15_000)
    assert await kept_key(tab) == KEY_A
    assert_healthy(tab)


async def test_the_right_key_streams_and_reloads_and_new_tabs_need_no_retyping(
    keyed: ServerProcess, context: BrowserContext
) -> None:
    sent: list[tuple[str, str | None]] = []

    def on_request(request: Request) -> None:
        if "/api/" in request.url:
            sent.append((request.url, request.headers.get("authorization")))

    context.on("request", on_request)
    tab = await use_key(context, keyed.url, KEY_A)
    question = f"Stream with a key {time.time_ns()}"
    await tab.ask(question)
    await tab.wait_markers(5)
    qid = tab.question_id
    assert qid is not None

    await tab.page.reload()
    await tab.page.wait_for_selector(CONNECTED, timeout=15_000)
    assert await tab.page.locator("#key-form").is_hidden(), "no retyping after a reload"
    await tab.wait_status("done")
    assert tab.question_id == qid
    assert markers(await tab.answer_text()) == ALL_MARKERS

    second = await open_tab(context, keyed.url, f"/?q={qid}")
    assert await second.page.locator("#key-form").is_hidden(), "a new tab has the key too"
    await second.wait_status("done", timeout_s=10)
    assert markers(await second.answer_text()) == ALL_MARKERS
    await second.page.locator(f'#history-list a[data-id="{qid}"]').wait_for(timeout=10_000)

    assert sent, "the page called the HTTP API"
    unkeyed = [url for url, auth in sent if auth != f"Bearer {KEY_A}"]
    assert unkeyed == [], "every HTTP call carries the key"
    assert_healthy(tab, second)


async def test_a_shared_link_opens_its_answer_once_the_key_is_entered(
    keyed: ServerProcess, browser: Browser, context: BrowserContext
) -> None:
    asker = await use_key(context, keyed.url, KEY_A)
    await asker.ask("Send me to a colleague")
    await asker.wait_status("done")
    qid = asker.question_id

    other = await browser.new_context()
    try:
        tab = await open_refused(other, keyed.url, f"/?q={qid}")
        assert await tab.page.locator("#answer").is_hidden()
        assert await tab.page.locator("#notice").is_hidden(), "the key field says it all"
        await enter_key(tab, KEY_A)
        await tab.wait_status("done", timeout_s=10)
        assert tab.question_id == qid
        assert markers(await tab.answer_text()) == ALL_MARKERS
        assert_healthy(asker, tab)
    finally:
        await other.close()


async def test_history_lists_only_the_answers_of_that_key(
    keyed: ServerProcess, browser: Browser, context: BrowserContext
) -> None:
    alpha = await use_key(context, keyed.url, KEY_A)
    alpha_question = f"Asked with alpha {time.time_ns()}"
    await alpha.ask(alpha_question)
    await alpha.wait_status("done")
    alpha_id = alpha.question_id

    other = await browser.new_context()
    try:
        bravo = await use_key(other, keyed.url, KEY_B)
        bravo_question = f"Asked with bravo {time.time_ns()}"
        await bravo.ask(bravo_question)
        await bravo.wait_status("done")
        await bravo.page.locator(f'#history-list a[data-id="{bravo.question_id}"]').wait_for()
        assert bravo_question in await history_questions(bravo)
        assert alpha_question not in await history_questions(bravo)

        # Another key's answer does not exist for this one.
        await bravo.goto(f"/?q={alpha_id}")
        notice = bravo.page.locator("#notice")
        await notice.wait_for(timeout=10_000)
        assert "Cannot show question" in await notice.inner_text()
        assert "404" in await notice.inner_text()
        assert await bravo.page.locator("#answer").is_hidden()

        await alpha.page.reload()
        await alpha.page.locator(f'#history-list a[data-id="{alpha_id}"]').wait_for()
        assert alpha_question in await history_questions(alpha)
        assert bravo_question not in await history_questions(alpha)
        assert_healthy(alpha, bravo)
    finally:
        await other.close()


async def test_forget_key_clears_it_here_and_in_other_tabs(
    keyed: ServerProcess, context: BrowserContext
) -> None:
    tab = await use_key(context, keyed.url, KEY_A)
    question = f"Then forget the key {time.time_ns()}"
    await tab.ask(question)
    await tab.wait_status("done")
    qid = tab.question_id
    assert qid is not None
    other = await open_tab(context, keyed.url)
    await other.page.locator(f'#history-list a[data-id="{qid}"]').wait_for(timeout=10_000)

    await tab.page.get_by_role("button", name="Forget key").click()
    await tab.page.wait_for_selector(REFUSED, timeout=15_000)
    assert await tab.page.get_by_label("API key").is_visible()
    assert await tab.page.locator("#key-error").is_hidden()
    assert await kept_key(tab) is None
    assert await tab.page.get_by_role("button", name="Forget key").is_hidden()
    # What the key could see is gone from the page, and from this tab's storage.
    assert await tab.page.locator("#answer").is_hidden()
    assert await history_questions(tab) == []
    assert tab.question_id is None
    assert await tab.snapshot(qid) is None

    # The other tab forgets it too, and a key typed there serves both again.
    await other.page.wait_for_selector(REFUSED, timeout=15_000)
    assert await history_questions(other) == []
    await enter_key(other, KEY_A)
    await other.page.wait_for_selector(CONNECTED, timeout=15_000)
    await tab.page.wait_for_selector(CONNECTED, timeout=15_000)
    assert await tab.page.locator("#key-form").is_hidden()
    await tab.page.locator(f'#history-list a[data-id="{qid}"]').wait_for(timeout=10_000)
    assert_healthy(tab, other)


async def test_over_the_rate_limit_the_second_ask_reads_clearly(
    browser: Browser, bundle: None, tmp_path: Path
) -> None:
    context = await browser.new_context()
    try:
        with serve(tmp_path, keyed_env(TOKENRELAY_RATE_LIMIT_PER_MIN="1")) as server:
            tab = await use_key(context, server.url, KEY_A)
            await tab.ask("The one question this minute")
            await tab.wait_status("done")
            assert markers(await tab.answer_text()) == ALL_MARKERS

            await tab.ask("One too many")
            notice = tab.page.locator("#notice")
            await notice.wait_for(timeout=10_000)
            text = await notice.inner_text()
            assert text.startswith(
                "Too many questions: this server takes at most 1 question a minute from you."
            ), text
            assert "Try again in" in text
            assert await tab.page.get_by_label("API key").is_hidden(), "the key was fine"
            assert await tab.page.locator(CONNECTED).count() == 1
            assert_healthy(tab)
    finally:
        await context.close()
