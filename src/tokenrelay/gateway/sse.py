"""Server-Sent Events: events encoded once as bytes, and the response that streams them.

sse-starlette's EventSourceResponse encodes each event through a StringIO and regular
expressions, enters an AnyIO cancel scope and sends it alone: one ASGI send (one socket
write, one pass through every middleware's send wrapper) per event. `EventStream` sends
each piece its stream yields in one `http.response.body` message, so a viewer with
several entries ready gets them in one write; the bytes on the wire are the same events
sse-starlette wrote (`\\r\\n` line ends), so `Last-Event-ID` resumes as before.

Each response is a race (sse-starlette's): the stream, a ping comment every `ping_s`,
the client's disconnect and the server's stop; the first to finish cancels the others.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PING_S = 15.0
SEP = b"\r\n"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _one_line(text: str) -> bytes:
    raw = text.encode()
    return _LINE_BREAK.sub(b"", raw) if b"\n" in raw or b"\r" in raw else raw


def event(data: bytes, *, kind: str | None = None, event_id: str | None = None) -> bytes:
    """One event: `id:`, `event:`, then a `data:` line per line of `data`."""
    head = b""
    if event_id is not None:
        head += b"id: " + _one_line(event_id) + SEP
    if kind is not None:
        head += b"event: " + _one_line(kind) + SEP
    if b"\n" in data or b"\r" in data:  # JSON from orjson never has one
        return head + b"".join(b"data: " + line + SEP for line in _LINE_BREAK.split(data)) + SEP
    return head + b"data: " + data + SEP + SEP


def comment(text: str) -> bytes:
    return b"".join(b": " + line + SEP for line in _LINE_BREAK.split(text.encode())) + SEP


async def server_stopping() -> None:
    """Returns once the server has begun to stop, so that open streams end at once instead
    of holding the stop for its whole grace period. sse-starlette's watcher (one per event
    loop, every 0.5 s; uvicorn's exit flag), the one its own responses wait on."""
    await EventSourceResponse._listen_for_exit_signal()


def load_anyio_backend() -> None:
    """Import anyio's asyncio backend now, in the running loop. anyio imports it at its
    first use, and the first use in a gateway is the first event stream's exit watch (an
    `anyio.Event`): 20-45 ms of imports on these VMs, during which that viewer waits for
    its first entry and every other stream of the process stalls. Called at start-up."""
    anyio.Event()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """`text/event-stream` of the bytes `chunks` yields, each sent in one message."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        ping_s: float = PING_S,
        status_code: int = 200,  # FastAPI's OpenAPI reads the default from the signature
    ) -> None:
        self.chunks = chunks
        self.ping_s = ping_s
        self.status_code = status_code
        self.background = None
        self._last = asyncio.Lock()
        self._ended = False
        # What sse-starlette sets: proxies must neither cache nor buffer the stream.
        values = {"Cache-Control": "no-store", **(headers or {})}
        values |= {"Connection": "keep-alive", "X-Accel-Buffering": "no"}
        self.init_headers(values)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":  # headers only: a stream would never end
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        racers: list[Awaitable[Any]] = [
            self._stream(send),
            _disconnected(receive),
            server_stopping(),
        ]
        if self.ping_s > 0:
            racers.append(self._ping(send))
        tasks = [asyncio.ensure_future(racer) for racer in racers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # a failed stream (or ping) fails the response, as before
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Send) -> None:
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        async with self._last:  # not while a ping is being written
            self._ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping(self, send: Send) -> None:
        while True:
            await asyncio.sleep(self.ping_s)
            ping = comment(f"ping - {datetime.datetime.now(datetime.UTC)}")
            async with self._last:
                if self._ended:
                    return
                await send({"type": "http.response.body", "body": ping, "more_body": True})
