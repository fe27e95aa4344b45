"""Threads on the web page, in a real headless Chromium against a real `tokenrelay serve`
whose model is the mock: a follow-up box under a finished answer asks in its thread, the
thread reads as one conversation, reloads and history open it whole, and the mock's list of
requests shows that the model was given the earlier turns."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Route

from tests.support.web import assert_healthy, mock_env
from tests.web_browser import Tab, open_tab
from tests.web_server import ServerProcess, mock_model, serve
from tokenrelay.providers.base import SYSTEM_PROMPT
from tokenrelay.testing import directive

pytestmark = [pytest.mark.browser]


@dataclass
class Served:
    server: ServerProcess
    model_url: str  # the mock model's origin

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def mocked(
    browser: Browser, bundle: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """`serve` with the openai provider talking to the mock model (directives pick answers)."""
    workdir = tmp_path_factory.mktemp("serve-threads")
    with (
        mock_model(workdir / "mock") as model,
        serve(
            workdir / "serve",
            mock_env(model.url),
        ) as proc,
    ):
        yield Served(proc, model.url)


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: its own sessionStorage."""
    ctx = await browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        yield ctx
    finally:
        await ctx.close()


def reply(tag: str, words: int = 12) -> str:
    """A mock answer whose words are numbered markers: `tag01 tag02 …`."""
    return " ".join(f"{tag}{i:02d}" for i in range(1, words + 1))


def question(text: str, answer: str, rate: float = 60.0) -> str:
    """A question the mock answers with exactly `answer`, at `rate` words a second."""
    return f"{text} {directive(text=answer, rate=rate)}"


_WORD = re.compile(r"\b([a-z]+\d{2})\b")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


async def received(served: Served, marker: str) -> list[tuple[str, str]]:
    """The (role, content) messages the model got for the question containing `marker`."""
    async with httpx.AsyncClient(timeout=10) as client:
        bodies: list[dict[str, Any]] = (
            await client.get(f"{served.model_url}/v1/mock/requests")
        ).json()
    (body,) = [b for b in bodies if marker in b["messages"][-1]["content"]]
    return [(m["role"], m["content"]) for m in body["messages"]]


async def record(served: Served, qid: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{served.url}/api/questions/{qid}")
    response.raise_for_status()
    rec: dict[str, Any] = response.json()["question"]
    return rec


async def turns(tab: Tab) -> list[tuple[str, str]]:
    """The earlier turns shown above the current answer: (question, answer text)."""
    items = tab.page.locator("#thread-turns > li")
    out = []
    for i in range(await items.count()):
        item = items.nth(i)
        out.append(
            (
                (await item.locator(".turn-question").inner_text()).strip(),
                (await item.locator(".turn-answer").inner_text()).strip(),
            )
        )
    return out


async def follow_up(tab: Tab, text: str) -> None:
    """Type in the follow-up box under the answer and press Enter, like a person."""
    box = tab.page.get_by_label("Follow-up", exact=True)
    await box.fill(text)
    await box.press("Enter")


async def wait_answer(tab: Tab, previous: str | None, status: str = "done") -> str:
    """Wait for an answer other than `previous` to reach `status`; its id."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        qid = tab.question_id
        shown = await tab.page.get_attribute("#answer", "data-id")
        if qid and qid != previous and shown == qid and await tab.status() == status:
            return qid
        await asyncio.sleep(0.05)
    raise AssertionError(f"no new answer reached {status!r}; at {tab.page.url}")


async def test_a_follow_up_under_the_answer_continues_the_conversation(
    mocked: Served, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    page = tab.page
    follow_box = page.get_by_label("Follow-up", exact=True)
    assert await follow_box.is_hidden(), "no follow-up before there is an answer"

    q1 = question("What is a stream?", reply("one"), rate=25)
    await tab.ask(q1, topic="Valkey")
    await tab.wait_status("streaming")
    assert await follow_box.is_hidden(), "an answer still streaming cannot be followed up"
    first = await wait_answer(tab, None)
    assert await follow_box.is_visible()
    assert await page.locator("#thread-turns").is_hidden(), "a lone question has no turns above"

    q2 = question("And a consumer group?", reply("two"))
    await follow_up(tab, q2)
    second = await wait_answer(tab, first)
    assert await follow_box.input_value() == "", "the box is emptied once the server took it"
    assert await turns(tab) == [(q1, reply("one"))]
    assert (await page.inner_text("#answer-question")).strip() == q2
    assert words(await tab.answer_text()) == words(reply("two"))
    assert (await page.inner_text("#answer-topic")).strip() == "Topic: Valkey"

    # Keyboard only: the box has the focus back once the answer is done.
    assert await page.evaluate("document.activeElement.id") == "follow-question"
    q3 = question("Why both?", reply("three"))
    await page.keyboard.type(q3)
    await page.keyboard.press("Enter")
    third = await wait_answer(tab, second)

    # One conversation, in order: each question, then its answer.
    read = await page.locator("#answer h2, #answer .markdown").all_inner_texts()
    assert [text.strip() for text in read] == [
        q1,
        reply("one"),
        q2,
        reply("two"),
        q3,
        reply("three"),
    ]
    assert await turns(tab) == [(q1, reply("one")), (q2, reply("two"))]

    # The model was given the thread so far, under the thread's topic.
    assert await received(mocked, "Why both?") == [
        ("system", SYSTEM_PROMPT.format(topic="Valkey")),
        ("user", q1),
        ("assistant", reply("one")),
        ("user", q2),
        ("assistant", reply("two")),
        ("user", q3),
    ]
    rec = await record(mocked, third)
    assert (rec["follows"], rec["thread"], rec["topic"]) == (second, first, "Valkey")

    # The history lists the thread once, opening its newest question.
    item = page.locator(f'#history-list a[data-thread="{first}"]')
    await item.wait_for(timeout=10_000)
    await page.wait_for_function(
        f"""() => document.querySelector('#history-list a[data-thread="{first}"]')
            ?.dataset.id === "{third}" """,
        timeout=15_000,
    )
    assert await page.locator(f'#history-list a[data-id="{first}"]').count() == 0
    text = await item.inner_text()
    assert "What is a stream?" in text and "3 questions" in text and "Latest: Why both?" in text
    assert await item.get_attribute("aria-current") == "page"

    # A follow-up the server refuses leaves the thread as it was, and the text typed.
    await follow_up(tab, "x" * 3100)
    notice = page.locator("#notice")
    await notice.wait_for(timeout=10_000)
    assert "limit is 3000" in await notice.inner_text()
    assert tab.question_id == third and await tab.status() == "done"
    assert len(await turns(tab)) == 2 and await follow_box.input_value() == "x" * 3100

    # The main form starts a new thread, one turn as ever.
    q4 = question("Something else", reply("four"))
    await tab.ask(q4)
    fourth = await wait_answer(tab, third)
    assert await turns(tab) == []
    assert (await record(mocked, fourth))["thread"] is None
    assert [role for role, _ in await received(mocked, "Something else")] == ["system", "user"]
    assert_healthy(tab)


async def test_a_thread_reloads_whole_and_opens_whole_from_history(
    mocked: Served, browser: Browser, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    stamp = time.time_ns()
    q1 = question(f"Thread {stamp}: what is XADD?", reply("alpha"))
    await tab.ask(q1)
    first = await wait_answer(tab, None)
    q2 = question("And XREAD?", reply("beta", 40), rate=12)
    await follow_up(tab, q2)
    await tab.wait_status("streaming")
    second = tab.question_id
    assert second and second != first
    deadline = time.monotonic() + 20
    while len(words(await tab.answer_text())) < 8:
        assert time.monotonic() < deadline, "the follow-up never streamed"
        await asyncio.sleep(0.05)
    assert len(words(await tab.answer_text())) < 40, "the reload must come mid-answer"

    # Reload mid-answer: the turn above is there at once, the answer resumes exactly.
    await tab.page.reload()
    await tab.page.wait_for_selector("#thread-turns > li", timeout=5000)
    assert tab.question_id == second
    assert await turns(tab) == [(q1, reply("alpha"))]
    await tab.wait_status("done", timeout_s=30)
    assert words(await tab.answer_text()) == words(reply("beta", 40))

    # Replay works per answer: the latest replays under the turns, which stay.
    await tab.page.get_by_role("button", name="Replay at original pace").click()
    await tab.wait_status("replaying", timeout_s=3)
    assert await tab.page.get_by_label("Follow-up", exact=True).is_hidden()
    assert await turns(tab) == [(q1, reply("alpha"))]
    await tab.wait_status("done", timeout_s=30)
    assert words(await tab.answer_text()) == words(reply("beta", 40))

    # Another browser, nothing kept: the history opens the thread whole, from the server.
    other_context = await browser.new_context(viewport={"width": 1000, "height": 800})
    try:
        other = await open_tab(other_context, mocked.url)
        item = other.page.locator(f'#history-list a[data-thread="{first}"]')
        await item.wait_for(timeout=10_000)
        assert await item.get_attribute("data-id") == second
        await item.click()
        await other.wait_status("done", timeout_s=10)
        assert other.question_id == second
        await other.page.wait_for_selector("#thread-turns > li", timeout=10_000)
        assert await turns(other) == [(q1, reply("alpha"))]
        assert words(await other.answer_text()) == words(reply("beta", 40))
        assert await item.get_attribute("aria-current") == "page"

        # An earlier turn opens on its own (to replay it, or branch from it).
        await (
            other.page.locator("#thread-turns").get_by_role("link", name="Open this answer").click()
        )
        await other.page.wait_for_function(
            f"""() => document.querySelector('#answer')?.dataset.id === "{first}" """
        )
        await other.wait_status("done", timeout_s=10)
        assert await other.page.locator("#thread-turns").is_hidden()
        assert words(await other.answer_text()) == words(reply("alpha"))
        assert await other.page.get_by_role("button", name="Replay at original pace").is_visible()
        assert_healthy(tab, other)
    finally:
        await other_context.close()


async def test_a_thread_at_phone_width(mocked: Served, browser: Browser) -> None:
    context = await browser.new_context(
        viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    try:
        tab = await open_tab(context, mocked.url)
        await tab.ask(question("Small screen?", reply("small")))
        first = await wait_answer(tab, None)
        await follow_up(tab, question("Still readable?", reply("still")))
        await wait_answer(tab, first)
        assert await tab.page.get_by_role("button", name="Send follow-up").is_visible()
        overflow = await tab.page.evaluate(
            "document.scrollingElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "no sideways scrolling at phone width"
        assert_healthy(tab)
    finally:
        await context.close()


async def test_a_second_tab_follows_a_thread_live_and_follows_it_up_while_it_loads(
    mocked: Served, browser: Browser, context: BrowserContext
) -> None:
    tab = await open_tab(context, mocked.url)
    q1 = question("Live thread: what is a stream?", reply("first"))
    await tab.ask(q1)
    first = await wait_answer(tab, None)
    # 4.5 s of answer: a second tab opened on a loaded machine still finds it streaming.
    q2 = question("And live?", reply("second", 45), rate=10)
    await follow_up(tab, q2)
    await tab.wait_status("streaming")
    second = tab.question_id
    assert second and second != first

    other_context = await browser.new_context(viewport={"width": 1000, "height": 800})

    async def slowly(route: Route) -> None:
        await asyncio.sleep(9)  # the first turn arrives long after the answer below it ends
        await route.continue_()

    await other_context.route(f"**/api/questions/{first}", slowly)
    try:
        other = await open_tab(other_context, mocked.url, f"/?q={second}")
        seen = await other.watch_growth(until="done")
        grew = [len(words(text)) for text in seen[:-1] if words(text)]
        assert len(grew) >= 2 and grew == sorted(grew), "the second tab follows it live"
        assert words(seen[-1]) == words(reply("second", 45))
        assert await turns(other) == [], "the first turn is still on its way"

        # Followed up at once: the thread comes whole once the first turn has arrived.
        q3 = question("Still there?", reply("third"))
        await follow_up(other, q3)
        await wait_answer(other, second)
        await other.page.wait_for_function(
            "() => document.querySelectorAll('#thread-turns > li').length === 2",
            timeout=15_000,
        )
        assert await turns(other) == [(q1, reply("first")), (q2, reply("second", 45))]
        assert [role for role, _ in await received(mocked, "Still there?")] == [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
        assert_healthy(tab, other)
    finally:
        await other_context.close()
