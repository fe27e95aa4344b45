"""A scripted HTTP/1.1 server on a real socket, for the model client's tests.

Each connection is served by the test's own coroutine, which reads requests and writes
whatever bytes it likes (chunks a few bytes at a time, a body cut off, a connection closed
while idle, no reply at all), so each of those cases is what a real socket carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Peer:
    """One accepted connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer
    number: int  # 1 for the first connection accepted

    async def request(self) -> Request | None:
        """The next request on this connection; None once the client closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = {}
        for text in lines:
            if text:
                name, _, value = text.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(method, target, headers, body)
        self.server.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def respond(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        chunked: bool = True,
        piece: int = 0,
    ) -> None:
        """A whole response: chunked (in chunks of `piece` bytes, else one) or with a
        Content-Length."""
        await self.send(head(status, headers, chunked=chunked, length=len(body)))
        if not chunked:
            await self.send(body)
            return
        size = piece or max(1, len(body))
        for i in range(0, len(body), size):
            await self.send(chunk(body[i : i + size]))
            await asyncio.sleep(0)
        await self.send(b"0\r\n\r\n")

    def close(self) -> None:
        self.writer.close()


def head(
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = True,
    length: int = 0,
) -> bytes:
    lines = [f"HTTP/1.1 {status} Status"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("transfer-encoding: chunked" if chunked else f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class RawServer:
    """`async with RawServer(handler) as server:` then `server.url`; `connections` counts
    the connections accepted, `requests` every request read."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    host: str = "127.0.0.1"
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{self.host}:{port}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:  # handlers still waiting on a connection
            task.cancel()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer, self, self.connections)
        try:
            await self.handler(peer)
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass  # the client left, or the test ended: either way this connection is done
        finally:
            self._tasks.discard(task)
            writer.close()


def self_signed(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made by openssl: (cert, key)."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@contextlib.contextmanager
def hanging_listener() -> Iterator[int]:
    """A port whose connects hang: its accept queue is full and nobody accepts."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()
