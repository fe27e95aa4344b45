"""One HTTP/1.1 client connection, parsed by llhttp (httptools), for long token streams.

A model streams one small chunk per token. httpx reads each through httpcore's pure-Python
parser (h11, two events per chunk) and four nested async generators; here the socket's
bytes go straight into llhttp as they arrive, the body's pieces wait in a buffer (the
socket paused only when a reader falls far behind), and a read takes what has arrived; or,
diverted, each piece goes to a callback as it arrives.
The read timeout is one timer per connection, moved only when it fires. The pool, TLS
and proxies are `h1pool`'s.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from tokenrelay.errors import TokenRelayError

_HIGH_WATER = 1 << 20  # bytes buffered before the socket stops reading (until all are read)
DEFAULT_PORTS = {"http": 80, "https": 443}


class HTTPFailure(TokenRelayError, OSError):
    """The request could not be sent or its response not read whole: no connection, a
    connection that broke, or a reply that is not HTTP/1.1."""


class HTTPTimeout(HTTPFailure, TimeoutError):
    """Connecting, or waiting for the next bytes of the response, took too long."""


class StaleConnection(HTTPFailure):
    """A kept-alive connection the server had closed while it was idle: nothing was read,
    so the request can go again on a new connection."""


class HTTPStatusError(TokenRelayError, RuntimeError):
    """A response with an error status, as the SDK reported it (kept as the cause)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """What the Host header says."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


class Connection(asyncio.Protocol):
    """One connection: a request is written whole, then its response read; reused only
    after a response read to its end that lets it stay open."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self._loop = loop
        self.origin = origin  # whom it serves (through a proxy or not)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self._parser = httptools.HttpResponseParser(self)
        self.served = 0  # responses read whole on this connection
        self.timeout_s: float | None = None  # for the response's head and each read
        self.idle_since = 0.0
        self._idle = True
        self._eof = False
        self._lost: BaseException | None = None
        self._error: HTTPFailure | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # The response being read.
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head = False
        self._informational = False
        self._complete = False
        self._keep_alive = False
        self._got_bytes = False
        self._body: deque[bytes] = deque()
        self._size = 0
        # Where the body's pieces go instead (`divert`), and what it raised.
        self._sink: Callable[[bytes], bool] | None = None
        self._sunk: Exception | None = None
        # The read timeout: one timer per connection, moved forward only when it fires.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._idle:  # bytes nobody asked for: this connection cannot be trusted again
            self._fail(HTTPFailure("the server sent data on an idle connection"))
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:  # 101 too
            self._fail(HTTPFailure(f"the server's reply is not valid HTTP/1.1 ({e})"))
            return
        if self._sink is not None and not self._complete:
            # Diverted: the reader waits for the end only, and these bytes were the next ones.
            if self.timeout_s is not None:
                self._deadline = self._loop.time() + self.timeout_s
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # llhttp's side

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # 1xx (100 Continue, 103 Early Hints) come before the real response.
        self._informational = 100 <= self.status < 200
        self._head = not self._informational

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._pass(body)
            return
        self._body.append(body)
        self._size += len(body)
        if self._size > _HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._headers = []
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()

    # the client's side

    def send(self, request: bytes) -> None:
        """Write a request; its response is read with `head` and `read`."""
        if self.transport.is_closing() or self._eof:
            error = StaleConnection if self.served else HTTPFailure
            self._close()
            raise error("the connection was closed before the request was sent")
        self._idle = False
        self._got_bytes = False
        self.transport.write(request)

    async def head(self) -> dict[str, str]:
        """The response's status (`status`) and headers, names in lower case."""
        while not self._head:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise self._ended_before_reply()
            await self._wait()
        headers: dict[str, str] = {}
        for raw_name, raw_value in self._headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    async def read(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at the body's end.
        While diverted, the body's end, or what the sink raised."""
        while not self._body:
            if self._sunk is not None:
                raise self._sunk
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self._eof:
                if self._lost is None and self._head and _until_close(self._headers):
                    self._complete = True  # a body without a length ends with the connection
                    return b""
                raise HTTPFailure(
                    "peer closed connection without sending complete message body"
                    + (f" ({self._lost})" if self._lost else "")
                )
            await self._wait()
        body = self._body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return data

    def divert(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the body's pieces to `sink` as they arrive, from the I/O callback, instead of
        keeping them for `read`: no task wakes up per piece (`bench.sdkcost`, 50 answers at
        20 tokens/s: ~30 -> ~25 us per chunk). The read timeout counts from the last bytes.
        `sink` returns False to have the pieces after it kept for `read` again; what it
        raises ends the diversion too, and `read` raises it."""
        self._sink = sink
        while self._body and self._sink is not None:
            data = self._body.popleft()
            self._size -= len(data)
            self._pass(data)
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    def finish(self) -> bool:
        """Done with the response: True if the connection may serve another request."""
        reusable = self._complete and self._keep_alive and not self._eof and not self._body
        if not reusable:
            self._close()
            return False
        self.served += 1
        self._idle = True
        self._reset()
        return True

    def tunnelled(self) -> None:
        """The proxy's CONNECT answered: what follows is the origin's, read afresh."""
        self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self._idle = True

    def usable(self) -> bool:
        """An idle connection that may take a request: open, nothing unasked arrived."""
        return self._idle and not self._eof and self._error is None

    def close(self) -> None:
        self._close()

    # internals

    def _pass(self, body: bytes) -> None:
        """A piece of the body to the sink; its end (False, or an error) wakes the reader."""
        assert self._sink is not None
        try:
            more = self._sink(body)
        except Exception as e:  # the reader's to raise, in its own task
            more, self._sunk = False, e
        if not more:
            self._sink = None
            self._wake()

    def _reset(self) -> None:
        self._sink = None
        self._sunk = None
        self.status = 0
        self._headers = []
        self._head = self._complete = self._keep_alive = False

    def _ended_before_reply(self) -> HTTPFailure:
        why = f" ({self._lost})" if self._lost else ""
        if self.served and not self._got_bytes:
            return StaleConnection(f"Server disconnected without sending a response.{why}")
        return HTTPFailure(f"Server disconnected without sending a response.{why}")

    def _fail(self, error: HTTPFailure) -> None:
        self._error = error
        self._close()
        self._wake()

    def _close(self) -> None:
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = waiter = self._loop.create_future()
        timeout_s = self.timeout_s
        if timeout_s is not None:
            self._deadline = self._loop.time() + timeout_s
            if self._timer is None or self._deadline < self._timer_at:
                self._arm()
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms it again
        if self._loop.time() >= self._deadline:
            waiter.set_exception(HTTPTimeout("timed out waiting for the server"))
        else:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._check_deadline)


def _until_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body has neither a length nor chunks, so the connection's end ends it."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            return False
    return True


class Decoder:
    """A gzip- or deflate-encoded body, decoded as it arrives (servers rarely compress a
    stream; httpx asked for gzip and deflate, and so does this client)."""

    def __init__(self, encoding: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise HTTPFailure(f"the server encoded the body as {encoding!r}, unknown here")
        self._encoding = encoding
        self._z = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
        self._started = False

    def decode(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data) if data else self._z.flush()
        except zlib.error as e:
            if self._encoding == "deflate" and not self._started:  # deflate sent raw
                self._started = True
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(data)
            raise HTTPFailure(f"the server's {self._encoding} body cannot be decoded ({e})") from e
        self._started = True
        return out
