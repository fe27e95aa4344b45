"""A minimal Socket.IO 5 / Engine.IO 4 client over one websocket, for load generation.

python-socketio's own client costs more CPU per message than the server it would be
measuring, on the same two cores. This one does only what the benchmark needs: connect
to the default namespace, answer pings, call an event and await its ack, and hand every
received event to a callback as the raw packet text with its receive time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from tokenrelay.errors import TokenRelayError

EventHandler = Callable[[int, str], None]  # (receive time ns, packet text after "42")


class SocketIOError(TokenRelayError, ConnectionError):
    """The server refused or dropped the connection."""


class SocketIOClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/socket.io/?EIO=4&transport=websocket"
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._ack_ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self.on_event: EventHandler = lambda _ns, _packet: None

    async def connect(self) -> None:
        ws = await self._session.ws_connect(self._url, max_msg_size=0, autoping=True)
        self._ws = ws
        opened = await ws.receive_str()  # Engine.IO open: 0{"sid":..., "pingInterval":...}
        if not opened.startswith("0"):
            raise SocketIOError(f"expected an Engine.IO open packet, got {opened[:60]!r}")
        await ws.send_str("40")  # Socket.IO connect to the default namespace
        while True:
            packet = await ws.receive_str()
            if packet.startswith("40"):
                break
            if packet.startswith("44"):
                raise SocketIOError(f"namespace connect refused: {packet[2:200]}")
        self._reader = asyncio.create_task(self._read())

    async def call(self, event: str, data: Any, timeout_s: float = 30.0) -> Any:
        """Emit `event` with an ack id and return the server's ack payload."""
        ws = self._ws
        if ws is None:
            raise SocketIOError("not connected")
        ack_id = next(self._ack_ids)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = done
        try:
            await ws.send_str(f"42{ack_id}" + orjson.dumps([event, data]).decode())
            async with asyncio.timeout(timeout_s):
                return await done
        finally:
            self._acks.pop(ack_id, None)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        on_event = self.on_event
        async for msg in ws:
            now = time.time_ns()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            packet: str = msg.data
            kind = packet[:2]
            if kind == "42":
                on_event(now, packet[2:])
            elif kind == "43":
                self._ack(packet[2:])
            elif packet == "2":  # Engine.IO ping from the server
                await ws.send_str("3")
            elif packet.startswith("41") or packet.startswith("1"):
                break
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(SocketIOError("connection closed"))

    def _ack(self, body: str) -> None:
        digits = 0
        while digits < len(body) and body[digits].isdigit():
            digits += 1
        fut = self._acks.get(int(body[:digits]))
        if fut is not None and not fut.done():
            args = orjson.loads(body[digits:])
            fut.set_result(args[0] if args else None)
