"""`tokenrelay.Client` against a real gateway, through a TCP proxy that can cut connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.conftest import running_gateway
from tests.support.net import free_port
from tests.support.proxy import CuttingProxy
from tokenrelay import Client
from tokenrelay.client import AnswerEvent, AnswerFailed, RequestRejected, ServerUnreachable
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, directive

TEXT = " ".join(f"word{i}" for i in range(40))


@pytest.fixture
async def gateway_url(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    async with running_gateway(make_settings(scripted_text=TEXT, scripted_rate=100.0)) as url:
        yield url


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def chunk_text(events: list[AnswerEvent]) -> str:
    return "".join(e.text for e in events if e.type == "chunk")


async def test_ask_streams_events_then_whole(gateway_url: str) -> None:
    async with Client(gateway_url) as client:
        stream = await client.ask("What is a stream?", topic="Redis")
        events = [e async for e in stream]
        whole = await client.ask("And a group?", stream=False)
    assert [events[0].type, events[-1].type] == ["start", "end"]
    assert events[0].data["topic"] == "Redis" and events[0].data["question"] == "What is a stream?"
    assert chunk_text(events) == TEXT and stream.last_entry_id == events[-1].entry_id
    assert whole.text == TEXT and whole.end.type == "end" and whole.end.data["chunks"] == 40


async def test_an_answer_read_to_the_end_is_one_request(gateway_url: str) -> None:
    """The ask's own response carries the events: no GET of the events route unless the
    connection drops. A stream left unread is closed by `aclose()`."""
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    http = httpx.AsyncClient(base_url=gateway_url, event_hooks={"request": [record]})
    async with http, Client(gateway_url, http=http) as client:
        stream = await client.ask("Just one?")
        events = [e async for e in stream]
        assert chunk_text(events) == TEXT and events[-1].type == "end"
        assert sent == ["POST /api/questions"]
        unread = await client.ask("Never read")
        await unread.aclose()
        assert sent == ["POST /api/questions"] * 2
        # The connection the unread stream held is free again: a third ask goes through.
        third = await client.ask("Third", stream=False)
        assert third.text == TEXT


async def test_resumes_after_connections_are_cut(gateway_url: str) -> None:
    async with CuttingProxy(gateway_url) as proxy, Client(proxy.url) as client:
        stream = await client.ask("Cut me off, twice")
        events: list[AnswerEvent] = []
        async for event in stream:
            events.append(event)
            if len(events) in (5, 15):
                proxy.cut()
    ids = [e.entry_id for e in events]
    assert stream.reconnects >= 2 and proxy.connections >= 3
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=entry_order)
    assert chunk_text(events) == TEXT and events[-1].type == "end"


async def test_gives_up_with_a_resume_hint_when_the_server_stays_gone(gateway_url: str) -> None:
    async with CuttingProxy(gateway_url) as proxy:
        client = Client(proxy.url, reconnect_attempts=2, max_backoff_s=0.05)
        stream = await client.ask("Anyone?")
        seen: list[AnswerEvent] = []

        async def read_until_the_server_goes() -> None:
            async for event in stream:
                seen.append(event)
                if len(seen) == 3:
                    await proxy.close()

        with pytest.raises(ServerUnreachable) as caught:
            await read_until_the_server_goes()
        await client.aclose()
    message = str(caught.value)
    assert "2 tries" in message and seen[-1].entry_id in message and stream.id in message


async def test_watch_after_a_cursor_delivers_the_rest_once(gateway_url: str) -> None:
    async with Client(gateway_url) as client:
        answer = await client.ask("Replay me", stream=False)
        everything = [e async for e in client.watch(answer.id)]
        rest = [e async for e in client.watch(answer.id, after=everything[10].entry_id)]
    assert rest == everything[11:]
    assert chunk_text(everything) == answer.text == TEXT


async def test_cancel_ends_the_answer_cancelled(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(scripted_text=TEXT, scripted_rate=5.0)
    async with running_gateway(settings) as url, Client(url) as client:
        stream = await client.ask("Too slow")
        chunks = stream.chunks()
        assert await anext(chunks)
        assert await client.cancel(stream.id) is True
        with pytest.raises(AnswerFailed) as caught:
            async for _ in chunks:
                pass
        record, text = await client.question(stream.id)
        assert await client.cancel(stream.id) is False  # already finished
    assert caught.value.kind == "cancelled" and caught.value.question_id == stream.id
    assert record.status == "cancelled" and 0 < len(text) < len(TEXT)


async def test_history_lists_typed_records_newest_first(gateway_url: str) -> None:
    async with Client(gateway_url) as client:
        first = await client.ask("First?", stream=False)
        second = await client.ask("Second?", topic="Valkey", stream=False)
        history = await client.history(limit=2)
    assert [q.id for q in history] == [second.id, first.id]
    newest = history[0]
    assert newest.status == "done" and newest.topic == "Valkey" and newest.question == "Second?"
    assert newest.chunks == 40 and newest.ttft_ms is not None and newest.provider == "scripted"


async def test_an_ask_whose_reply_is_lost_is_asked_again_and_made_once(
    gateway_url: str,
) -> None:
    """The ask reaches the gateway, which makes the question; its reply is lost and the
    connection cut. The client asks again with the same Idempotency-Key and streams the
    question the first try made: one question, the answer whole."""
    async with CuttingProxy(gateway_url) as proxy, Client(gateway_url) as direct:
        client = Client(proxy.url, max_backoff_s=0.05)
        proxy.mute_replies = True
        asking = asyncio.create_task(client.ask("Lost reply?"))
        try:
            async with asyncio.timeout(10):
                while not [q for q in await direct.history() if q.question == "Lost reply?"]:
                    await asyncio.sleep(0.02)
            assert not asking.done()
            proxy.mute_replies = False
            proxy.cut()
            async with asyncio.timeout(20):
                stream = await asking
                events = [e async for e in stream]
        finally:
            asking.cancel()
            await client.aclose()
        made = [q for q in await direct.history() if q.question == "Lost reply?"]
    assert [q.id for q in made] == [stream.id], "asked twice, or not the question made"
    assert chunk_text(events) == TEXT and events[-1].type == "end"
    assert proxy.connections >= 2


async def test_a_full_queue_is_asked_again_after_its_retry_after(
    make_settings: Callable[..., Settings],
) -> None:
    """503 with Retry-After (the queue full) is tried again, at most `max_backoff_s` apart,
    until the queue has room; with no tries left the 503 is raised."""
    posts: list[int] = []

    async def record(response: httpx.Response) -> None:
        if response.request.method == "POST":
            posts.append(response.status_code)

    settings = make_settings(scripted_text=TEXT, scripted_rate=40.0, max_queued=1)
    async with running_gateway(settings) as url:
        http = httpx.AsyncClient(base_url=url, event_hooks={"response": [record]})
        async with (
            http,
            Client(url, http=http, max_backoff_s=0.1, reconnect_attempts=100) as client,
        ):
            first = await client.ask("Takes the only place")
            impatient = Client(url, max_backoff_s=0.05, reconnect_attempts=1)
            with pytest.raises(RequestRejected) as full:
                await impatient.ask("No room?")
            await impatient.aclose()
            second = await client.ask("Waits for room", stream=False)
            rest = [e async for e in first]
    assert full.value.status == 503
    assert second.text == TEXT and rest[-1].type == "end"
    assert posts[0] == 200 and posts[-1] == 200 and 503 in posts[1:-1], posts


async def test_errors_are_typed_and_readable(make_settings: Callable[..., Settings]) -> None:
    async with Client(f"http://127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(ServerUnreachable, match="cannot reach tokenrelay at http://127"):
            await nobody.history()
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, provider_max_retries=0
        )
        async with running_gateway(settings) as url, Client(url) as client:
            with pytest.raises(RequestRejected, match="'question' must not be empty") as empty:
                await client.ask("   ")
            with pytest.raises(RequestRejected, match="no question with id") as unknown:
                async for _ in client.watch("A" * 22):
                    pass
            with pytest.raises(AnswerFailed) as failed:
                await client.ask(f"Key? {directive(fail=401)}", stream=False)
    assert empty.value.status == 422 and unknown.value.status == 404
    assert failed.value.kind == "auth" and "OPENAI_API_KEY" in str(failed.value)


async def test_api_key_goes_as_a_bearer_token(make_settings: Callable[..., Settings]) -> None:
    key = "client-key-0123456789abcdef"
    async with running_gateway(make_settings(scripted_text=TEXT, api_keys=key)) as url:
        async with Client(url) as anonymous:
            with pytest.raises(RequestRejected, match="API key is required") as refused:
                await anonymous.ask("Hi?")
        async with Client(url, api_key=key) as client:
            answer = await client.ask("Hi?", stream=False)
    assert refused.value.status == 401 and answer.text == TEXT


async def test_follows_asks_in_a_thread_the_model_sees(
    make_settings: Callable[..., Settings],
) -> None:
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, openai_model="mock-llm"
        )
        async with running_gateway(settings) as url, Client(url) as client:
            first = await client.ask(f"Streams? {directive(tokens=6)}", stream=False)
            stream = await client.ask(f"And groups? {directive(tokens=6)}", follows=first.id)
            second = await stream.collect()
            third = await client.ask(f"Why? {directive(tokens=6)}", follows=second.id, stream=False)
            history = {q.id: q for q in await client.history(limit=3)}
            slow = await client.ask(f"Slow {directive(tokens=50, rate=5)}")
            with pytest.raises(RequestRejected, match="follow up an answer that is done") as early:
                await client.ask("Too soon?", follows=slow.id)
            with pytest.raises(RequestRejected) as unknown:
                await client.ask("Who?", follows="Z" * 22)
            await client.cancel(slow.id)
        async with httpx.AsyncClient(timeout=10) as http:
            bodies = (await http.get(f"{mock.base_url}/mock/requests")).json()
    (body,) = [b for b in bodies if "Why?" in b["messages"][-1]["content"]]
    assert [(m["role"], m["content"]) for m in body["messages"][1:]] == [
        ("user", f"Streams? {directive(tokens=6)}"),
        ("assistant", first.text),
        ("user", f"And groups? {directive(tokens=6)}"),
        ("assistant", second.text),
        ("user", f"Why? {directive(tokens=6)}"),
    ]
    assert (history[first.id].follows, history[first.id].thread) == (None, None)
    assert (history[second.id].follows, history[second.id].thread) == (first.id, first.id)
    assert (history[third.id].follows, history[third.id].thread) == (second.id, first.id)
    assert early.value.status == 422 and unknown.value.status == 404
