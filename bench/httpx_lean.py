"""The `openai` provider's HTTP layer before `h1pool`, kept as the benchmark's baseline.

`HttpxClient` serves `OpenAIProvider` as `H1Client` does, over httpx on the transport
below (what the provider used until #13's own HTTP/1.1 client): the same provider code
per chunk, only the HTTP layer differs. Below, from `providers/transport.py` as it was:

httpx's own HTTP/1.1 transport on a lean asyncio socket layer, for long token streams.

httpx reads through httpcore's AnyIO backend, which per read enters a cancel scope for
the timeout, maps exceptions in two context managers and switches the socket's reader on
and off in epoll: with one read per streamed token that was about half of what reading a
token cost the worker. This backend keeps the socket reading into a buffer (paused only
when a reader falls far behind), hands a read what has arrived, and keeps one timer per
connection for the read timeout, moved only when it fires. Connection pooling, HTTP/1.1
parsing, TLS settings and proxies stay httpx's and httpcore's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import httpcore
import httpx

from tokenrelay.providers.h1 import HTTPFailure, HTTPTimeout

_HIGH_WATER = 1 << 20  # bytes buffered before the socket stops reading
_LOW_WATER = 1 << 18
_HAPPY_EYEBALLS_S = 0.25  # what AnyIO's connect uses


class LeanTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` whose direct connections use `AsyncioBackend`."""

    def __init__(self, limits: httpx.Limits) -> None:
        ssl_context = httpx.create_ssl_context()
        super().__init__(verify=ssl_context, limits=limits)
        # The pool httpx builds, on another socket layer. (httpx's attribute: were it renamed,
        # httpx's own pool would serve, only slower. Behind a proxy the provider keeps
        # httpx's transport: a client given a transport reads no proxy variable.)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        # asyncio's loop races IPv6 and IPv4 as AnyIO did; uvloop's has no such option.
        racing = isinstance(loop, asyncio.BaseEventLoop)
        eyeballs: dict[str, Any] = {"happy_eyeballs_delay": _HAPPY_EYEBALLS_S} if racing else {}
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(loop),
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    **eyeballs,
                )
        except TimeoutError as e:
            raise httpcore.ConnectTimeout(str(e) or "connect timed out") from e
        except OSError as e:
            raise httpcore.ConnectError(str(e)) from e
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    # httpcore's interface names the arguments: noqa ASYNC109.
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._protocol.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._protocol.write(buffer, timeout)

    async def aclose(self) -> None:
        self._protocol.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(
                    protocol.transport, protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as e:
            protocol.close()
            raise httpcore.ConnectTimeout(str(e) or "TLS handshake timed out") from e
        except (OSError, ssl.SSLError) as e:
            protocol.close()
            raise httpcore.ConnectError(str(e)) from e
        if tls is None:  # the connection closed during the handshake
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        protocol.transport = tls
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle kept-alive connection the server closed
            return self._protocol.readable()
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self._protocol.transport.get_extra_info(name)


class _Protocol(asyncio.Protocol):
    """Buffers what arrives; one reader and one writer at a time (httpcore's contract)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._lost: Exception | None = None
        self._paused = False
        self._reader: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        # The read timeout: one timer per connection, moved forward only when it fires.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def readable(self) -> bool:
        return bool(self._chunks) or self._eof

    async def read(self, max_bytes: int, timeout_s: float | None) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._lost is not None:
                    raise httpcore.ReadError(str(self._lost) or type(self._lost).__name__)
                return b""
            self._reader = waiter = self._loop.create_future()
            if timeout_s is not None:
                self._deadline = self._loop.time() + timeout_s
                if self._timer is None or self._deadline < self._timer_at:
                    self._arm()
            try:
                await waiter
            finally:
                self._reader = None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        if len(data) > max_bytes:
            self._chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self._size -= len(data)
        if self._paused and self._size < _LOW_WATER:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes, timeout_s: float | None) -> None:
        if self.transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self.transport.write(data)
        if self._writable is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._writable)
            except TimeoutError as e:
                raise httpcore.WriteTimeout("write timed out") from e

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _check_deadline(self) -> None:
        self._timer = None
        reader = self._reader
        if reader is None or reader.done():
            return  # not waiting: the next wait arms it again
        if self._loop.time() >= self._deadline:
            reader.set_exception(httpcore.ReadTimeout("read timed out"))
        else:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._check_deadline)


_closing: set[asyncio.Task[None]] = set()


class HttpxResponse:
    """`h1pool.Response`'s face on a streamed httpx response (raw bytes, as the provider
    read them)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self._response = response
        self._body: AsyncIterator[bytes] = response.aiter_raw()

    async def read(self) -> bytes:
        try:
            return await anext(self._body, b"")
        except httpx.TimeoutException as e:
            raise HTTPTimeout(str(e)) from e
        except httpx.RequestError as e:
            raise HTTPFailure(str(e)) from e

    async def drain(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while await self.read():
                    pass
        except (TimeoutError, HTTPFailure):
            pass

    async def read_some(self, limit: int) -> bytes:
        raw = b""
        try:
            while len(raw) < limit and (data := await self.read()):
                raw += data
        except HTTPFailure:
            pass
        finally:
            self.close()
        return raw[:limit]

    def close(self) -> None:
        # The provider's close is synchronous; httpx's is not (and never waits here).
        task = asyncio.get_running_loop().create_task(self._response.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


class HttpxClient:
    """`h1pool.H1Client`'s face on the kept-alive httpx client the provider had."""

    def __init__(self, headers: Mapping[str, str], *, read_timeout_s: float, max_idle: int) -> None:
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=max_idle, keepalive_expiry=5.0
        )
        self._http = httpx.AsyncClient(
            headers=dict(headers),
            timeout=httpx.Timeout(read_timeout_s, connect=10.0),
            limits=limits,
            transport=LeanTransport(limits),
            follow_redirects=True,
        )

    async def post(self, url: str, body: bytes) -> HttpxResponse:
        request = self._http.build_request("POST", url, content=body)
        try:
            return HttpxResponse(await self._http.send(request, stream=True))
        except httpx.TimeoutException as e:
            raise HTTPTimeout(str(e)) from e
        except httpx.RequestError as e:
            raise HTTPFailure(str(e)) from e

    async def aclose(self) -> None:
        await self._http.aclose()
