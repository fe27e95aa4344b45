"""A TCP proxy that can cut every connection it carries, as a flaky network would."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import urlsplit


class CuttingProxy:
    """Forwards TCP to the gateway (or any server); `cut()` aborts every open connection,
    as a flaky network or a restarting load balancer would; while `frozen`, what either
    side sends is dropped without a close or a reset, as on a network path gone dead;
    `freeze_open()` does that to the connections open now, not to later ones; while
    `mute_replies`, only what the server sends back is dropped (a request that arrives and
    a reply that is lost)."""

    def __init__(self, target_url: str) -> None:
        self._port = urlsplit(target_url).port
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""
        self.port = 0
        self.connections = 0
        self.frozen = False
        self.mute_replies = False
        self._silent: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        for down, up in list(self._pairs):
            down.transport.abort()
            up.transport.abort()

    def freeze_open(self) -> None:
        self._silent |= self._pairs

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, reply: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if self.frozen or pair in self._silent or (reply and self.mute_replies):
                        continue
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        finally:
            self._pairs.discard(pair)
            self._silent.discard(pair)
