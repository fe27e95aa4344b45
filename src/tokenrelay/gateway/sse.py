"""Server-Sent Events: events encoded once as bytes, and the response that streams them.

sse-starlette's EventSourceResponse encodes each event through a StringIO and regular
expressions, enters an AnyIO cancel scope and sends it alone: one ASGI send (one socket
write, one pass through every middleware's send wrapper) per event. `EventStream` sends
each piece its stream yields in one `http.response.body` message, so a viewer with
several entries ready gets them in one write; the bytes on the wire are the same events
sse-starlette wrote (`\\r\\n` line ends), so `Last-Event-ID` resumes as before.

Each response is a race (sse-starlette's): the stream, a ping comment every `ping_s`,
the client's disconnect and the server's stop; the first to finish cancels the others.
A live viewer's entries are sent from the relay's read callback instead of the stream's
task when it can (`EventStream.write_now`, relay.Subscription).
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenrelay.gateway.eager import eagerly

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


WriteNow = Callable[[bytes], bool]


class EventStream(Response):
    """`text/event-stream` of the bytes `chunks` yields, each sent in one message.

    `chunks` may also be made with the response's `write_now` (a function of it that gives
    the iterator): bytes given to `write_now` are sent in the caller's own turn of the
    loop, from a callback as well as a task (the relay's direct write, relay.Subscription),
    when no other send is under way; it says False, sending nothing, when one is. A send
    the client's flow control holds goes on in a task, and every later send waits for it.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes] | Callable[[WriteNow], AsyncIterator[bytes]],
        *,
        headers: Mapping[str, str] | None = None,
        ping_s: float = PING_S,
        status_code: int = 200,  # FastAPI's OpenAPI reads the default from the signature
    ) -> None:
        self.chunks = chunks
        self.ping_s = ping_s
        self.status_code = status_code
        self.background = None
        self._send: Send | None = None  # once the headers are sent
        self._writing: asyncio.Future[None] | None = None  # a send under way, while it is
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
        chunks = (
            self.chunks if isinstance(self.chunks, AsyncIterator) else self.chunks(self.write_now)
        )
        self._send = send
        racers: list[Awaitable[Any]] = [
            self._stream(chunks),
            _disconnected(receive),
            server_stopping(),
        ]
        if self.ping_s > 0:
            racers.append(self._ping())
        tasks = [asyncio.ensure_future(racer) for racer in racers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._send = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # a failed stream (or ping) fails the response, as before
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        if self.background is not None:
            await self.background()

    def write_now(self, body: bytes) -> bool:
        """Send `body` now, when no other send is under way and the stream has not ended;
        False, sending nothing, else."""
        send = self._send
        if send is None or self._writing is not None or self._ended:
            return False
        message = {"type": "http.response.body", "body": body, "more_body": True}
        try:
            held = eagerly(send(message))
        except Exception:  # before anything was sent: the stream's task sends it, and fails
            return False
        if held is not None:  # held by the client: what comes next waits for it
            self._writing = held
            held.add_done_callback(self._held_ended)
        return True

    def _held_ended(self, _: asyncio.Future[None]) -> None:
        self._writing = None

    async def _body(self, body: bytes, *, more_body: bool = True) -> None:
        """Send `body` once no other send is under way; nothing after the end."""
        while self._writing is not None:
            await asyncio.shield(self._writing)
        send = self._send
        if send is None or self._ended:
            return
        self._ended = not more_body
        done = self._writing = asyncio.get_running_loop().create_future()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more_body})
        finally:
            self._writing = None
            done.set_result(None)

    async def _stream(self, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            await self._body(chunk)
        await self._body(b"", more_body=False)

    async def _ping(self) -> None:
        while not self._ended:
            await asyncio.sleep(self.ping_s)
            await self._body(comment(f"ping - {datetime.datetime.now(datetime.UTC)}"))
