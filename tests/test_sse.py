"""The gateway's SSE response over real HTTP (uvicorn, a raw socket): each piece the stream
yields is one HTTP chunk, the events are sse-starlette's bytes, pings, HEAD, a client that
leaves, a server that stops."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import uvicorn
from sse_starlette import ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message

from tests.support.net import free_port
from tests.support.sockets import wait_for
from tests.support.sse import Parser
from tokenrelay.gateway import sse
from tokenrelay.gateway.sse import EventStream

TIMEOUT_S = 10


class Feed:
    """What the test's stream yields, fed by the test; `closed` once the stream is done with."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self.queue.get()) is not None:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk
        finally:
            self.closed.set()


@asynccontextmanager
async def serving(feed: Feed, *, ping_s: float = 15.0) -> AsyncIterator[tuple[str, int]]:
    async with server_of(feed, ping_s=ping_s) as (_, port):
        yield "127.0.0.1", port


@asynccontextmanager
async def server_of(
    feed: Feed, *, ping_s: float = 15.0
) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    async def endpoint(request: Request) -> EventStream:
        return EventStream(feed.chunks(), ping_s=ping_s, headers={"X-Test": "1"})

    app = Starlette(routes=[Route("/events", endpoint, methods=["GET", "HEAD"])])
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.02)
    try:
        yield server, port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT_S)


async def open_stream(
    host: str, port: int, method: str = "GET"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"{method} /events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status, *lines = head.strip().split("\r\n")
    assert status == "HTTP/1.1 200 OK"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    return reader, writer, headers


async def next_chunk(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 chunk, as one ASGI send writes it."""
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


def test_events_are_the_bytes_sse_starlette_wrote() -> None:
    for data, kind, event_id in [
        ('{"a":"b\\nc"}', "chunk", "1700000000000-3"),
        ("[DONE]", None, None),
        ('{"x":1}', None, "5-0"),
        ("two\nlines\r\nthree\rfour", "error", "7-1"),
    ]:
        theirs = ServerSentEvent(data=data, event=kind, id=event_id).encode()
        assert sse.event(data.encode(), kind=kind, event_id=event_id) == theirs
    assert sse.comment("ping - now") == ServerSentEvent(comment="ping - now").encode()


async def test_each_piece_is_one_chunk_with_the_stream_headers() -> None:
    feed = Feed()
    async with serving(feed) as (host, port):
        reader, writer, headers = await open_stream(host, port)
        try:
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert headers["cache-control"] == "no-store"
            assert headers["x-accel-buffering"] == "no"
            assert headers["x-test"] == "1"
            assert headers["transfer-encoding"] == "chunked"
            batch = b"".join(
                sse.event(b'{"n":%d}' % n, kind="chunk", event_id=f"1-{n}") for n in range(3)
            )
            await feed.queue.put(batch)
            async with asyncio.timeout(TIMEOUT_S):
                chunk = await next_chunk(reader)
            assert chunk == batch  # three events, one write
            assert [e.id for e in Parser().feed(chunk)] == ["1-0", "1-1", "1-2"]
            await feed.queue.put(None)
            async with asyncio.timeout(TIMEOUT_S):
                assert await next_chunk(reader) == b""  # the last chunk: the response ended
                await feed.closed.wait()
        finally:
            writer.close()


async def test_pings_while_nothing_comes() -> None:
    feed = Feed()
    async with serving(feed, ping_s=0.05) as (host, port):
        reader, writer, _ = await open_stream(host, port)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                first, second = await next_chunk(reader), await next_chunk(reader)
            for ping in (first, second):
                assert ping.startswith(b": ping - ") and ping.endswith(b"\r\n\r\n")
            assert Parser().feed(first + second) == []  # comments: no events
        finally:
            writer.close()
            await feed.queue.put(None)


async def test_head_answers_headers_without_a_stream() -> None:
    feed = Feed()
    async with serving(feed) as (host, port):
        async with httpx.AsyncClient() as client:
            r = await client.head(f"http://{host}:{port}/events", timeout=TIMEOUT_S)
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert not feed.closed.is_set()  # the stream was never started


async def test_a_client_that_leaves_ends_the_stream() -> None:
    feed = Feed()
    async with serving(feed) as (host, port):
        reader, writer, _ = await open_stream(host, port)
        await feed.queue.put(sse.event(b"{}", event_id="1-0"))
        async with asyncio.timeout(TIMEOUT_S):
            await next_chunk(reader)
        writer.close()
        async with asyncio.timeout(TIMEOUT_S):
            await feed.closed.wait()  # the generator was closed (its finally ran)


async def test_an_error_in_the_stream_cuts_the_response() -> None:
    feed = Feed()
    async with serving(feed) as (host, port):
        reader, writer, _ = await open_stream(host, port)
        try:
            await feed.queue.put(sse.event(b"{}", event_id="1-0"))
            await feed.queue.put(RuntimeError("the stream broke"))
            async with asyncio.timeout(TIMEOUT_S):
                assert await next_chunk(reader) == sse.event(b"{}", event_id="1-0")
                # No last chunk: the client sees a cut response, as from sse-starlette.
                with pytest.raises(asyncio.IncompleteReadError):
                    await next_chunk(reader)
        finally:
            writer.close()


async def test_a_server_that_stops_ends_its_open_streams() -> None:
    """A stop does not wait for streams that never end (no grace period is set here: uvicorn
    would wait for ever): sse-starlette's shutdown watcher ends them, as it ended its own."""
    feed = Feed()
    async with server_of(feed) as (server, port):
        _, writer, _ = await open_stream("127.0.0.1", port)
        try:
            server.should_exit = True
            async with asyncio.timeout(TIMEOUT_S):
                await feed.closed.wait()
        finally:
            writer.close()


def test_a_gateway_s_first_answer_imports_nothing(redis_url: str) -> None:
    """In a fresh process, the gateway's first answer over SSE, then over Socket.IO, imports
    no module: one imported there stalls every stream of the process, and the first viewer
    waits for it (anyio's asyncio backend, 20-45 ms, before the gateway loaded it at start)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.first_stream", redis_url],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    imported = orjson.loads(out.strip().splitlines()[-1])
    assert imported == {"sse": [], "socketio": []}


async def test_a_write_from_a_callback_is_sent_there_and_a_held_one_holds_what_follows() -> None:
    """`EventStream.write_now` called outside any task (the relay's read callback) sends in
    that callback; while a send the client holds goes on, another write_now sends nothing
    (False) and the stream's own next piece waits for it; after the end, nothing is sent.
    The ASGI `send` here waits while `gate` is clear, as a paused transport's drain does."""
    sent: list[bytes] = []
    gate = asyncio.Event()
    gate.set()
    disconnected = asyncio.Event()
    sending: list[bytes] = []  # the sends under way: ASGI allows one at a time

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            sending.append(message["body"])
            assert len(sending) == 1, f"sends overlap: {sending}"
            await gate.wait()
            sent.append(message["body"])
            await asyncio.sleep(0)
            sending.remove(message["body"])

    async def receive() -> Message:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    feed = Feed()
    writers: list[sse.WriteNow] = []

    def chunks(write_now: sse.WriteNow) -> AsyncIterator[bytes]:
        writers.append(write_now)
        return feed.chunks()

    stream = EventStream(chunks, ping_s=0)
    task = asyncio.create_task(stream({"type": "http", "method": "GET"}, receive, send))
    loop = asyncio.get_running_loop()
    results: list[tuple[bool, list[bytes]]] = []

    def from_callback(body: bytes) -> None:
        assert asyncio.current_task() is None
        results.append((writers[0](body), list(sent)))

    try:
        await wait_for(lambda: bool(writers))
        loop.call_soon(from_callback, b"a")
        await wait_for(lambda: len(results) == 1)
        assert results[0] == (True, [b"a"]), "not sent in the callback itself"
        gate.clear()  # the client stops reading
        loop.call_soon(from_callback, b"b")
        await wait_for(lambda: len(results) == 2)
        assert results[1] == (True, [b"a"])
        loop.call_soon(from_callback, b"c")  # one send at a time
        await wait_for(lambda: len(results) == 3)
        assert results[2][0] is False
        await feed.queue.put(b"q")  # the stream's own piece, behind the held one
        await asyncio.sleep(0.05)
        assert sent == [b"a"]
        gate.set()
        await wait_for(lambda: len(sent) == 3)
        assert sent == [b"a", b"b", b"q"]
        await feed.queue.put(None)  # the end
        async with asyncio.timeout(TIMEOUT_S):
            await task
        assert sent == [b"a", b"b", b"q", b""]
        assert writers[0](b"after the end") is False
    finally:
        disconnected.set()
        await asyncio.gather(task, return_exceptions=True)
