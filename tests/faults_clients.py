"""Light viewers for the fault scenarios: SSE over a raw socket, Socket.IO over a raw WebSocket.

Hundreds of them run in one test process, so they parse only what they need. Each keeps
every entry it receives (ID, type, text, arrival time) and, when its connection breaks,
reconnects, to the next gateway in its list, resuming after the last entry it saw,
as the web page and the Python client do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from tests.support.sse import Parser

TERMINAL = ("end", "error", "cancelled")


@dataclass(frozen=True, slots=True)
class Got:
    entry_id: str
    type: str
    text: str
    at: float  # time.time() on arrival
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def written_ms(self) -> int:
        return int(self.entry_id.split("-")[0])

    @property
    def latency_ms(self) -> float:
        """From the worker's XADD to this viewer (same machine, same clock)."""
        return self.at * 1000 - self.written_ms


@dataclass
class Viewer:
    """One viewer of one answer, over SSE or Socket.IO, failing over between gateways."""

    urls: list[str]
    qid: str
    protocol: str = "sse"  # or "socketio"
    token: str | None = None
    # Seconds to wait after each chunk while `slow` is set (a slow reader).
    delay_s: float = 0.0
    slow: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the gateway accepted the watch (SSE headers, Socket.IO watch acknowledged).
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    attached_at: float | None = None  # time.time() when first attached
    got: list[Got] = field(default_factory=list)
    connects: list[tuple[str, float]] = field(default_factory=list)  # (url, time)
    drops: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retry_for_s: float = 30.0
    # A small kernel receive buffer, so that a slow reader pushes back on the gateway soon.
    rcvbuf: int | None = None

    @property
    def last(self) -> str | None:
        return self.got[-1].entry_id if self.got else None

    @property
    def done(self) -> bool:
        return bool(self.got) and self.got[-1].type in TERMINAL

    def chunks(self) -> list[Got]:
        return [g for g in self.got if g.type == "chunk"]

    async def run(self) -> Viewer:
        """Follow the answer to its terminal entry, reconnecting as long as `retry_for_s`."""
        index, failing_since = 0, None
        while not self.done:
            url = self.urls[index % len(self.urls)]
            try:
                self.connects.append((url, time.time()))
                if self.protocol == "sse":
                    await self._sse(url)
                else:
                    await self._socketio(url)
                failing_since = None
            except (OSError, EOFError, WebSocketException, asyncio.IncompleteReadError) as e:
                self.drops.append(time.time())
                self.errors.append(f"{url}: {type(e).__name__}: {e}"[:200])
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.retry_for_s:
                    raise
                index += 1
                await asyncio.sleep(0.05)
        return self

    async def _socket(self, url: str) -> socket.socket:
        parts = urlsplit(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        except OSError:
            sock.close()
            raise
        return sock

    def _attach(self) -> None:
        if self.attached_at is None:
            self.attached_at = time.time()
        self.attached.set()

    def live_chunks(self) -> list[Got]:
        """The chunks written once this viewer was attached: what it got live, not what it
        read back from before it was there (their latency is its connect time)."""
        since_ms = (self.attached_at or 0.0) * 1000
        return [g for g in self.chunks() if g.written_ms >= since_ms]

    def _take(self, data: dict[str, Any]) -> None:
        meta = {k: v for k, v in data.items() if k not in ("id", "entry_id", "type", "text")}
        self.got.append(Got(data["entry_id"], data["type"], data["text"], time.time(), meta))

    async def _pace(self) -> None:
        if self.delay_s and self.slow.is_set():
            await asyncio.sleep(self.delay_s)

    async def _sse(self, url: str) -> None:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(sock=await self._socket(url))
        try:
            headers = [f"GET /api/questions/{self.qid}/events HTTP/1.1", f"Host: {parts.netloc}"]
            headers.append("Accept: text/event-stream")
            if self.last:
                headers.append(f"Last-Event-ID: {self.last}")
            if self.token:
                headers.append(f"Authorization: Bearer {self.token}")
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
            status = await reader.readline()
            if b" 200 " not in status:
                raise OSError(f"answered {status.decode(errors='replace').strip()}")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # response headers
            self._attach()
            await self._read_sse(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_sse(self, reader: asyncio.StreamReader) -> None:
        # Chunked transfer encoding: a size line, then data (SSE) and CRLF.
        parser = Parser()
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise EOFError("the gateway closed the stream")
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                if self.done:
                    return
                raise EOFError("the stream ended before a terminal entry")
            data = await reader.readexactly(size + 2)
            for event in parser.feed(data[:-2]):
                self._take(orjson.loads(event.data))
                if self.done:
                    return
                await self._pace()

    async def _socketio(self, url: str) -> None:
        ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        # A small receive queue: a slow viewer stops reading, so the server sees backpressure.
        sock = await self._socket(url)
        async with ws_connect(ws_url, max_queue=4, compression=None, proxy=None, sock=sock) as ws:
            opened = await ws.recv()
            if not str(opened).startswith("0"):
                raise OSError(f"not an engine.io open packet: {opened!r:.80}")
            auth = orjson.dumps({"token": self.token}).decode() if self.token else ""
            await ws.send(f"40{auth}")
            watch = {"id": self.qid, **({"after": self.last} if self.last else {})}
            acked = False
            async for raw in ws:
                message = str(raw)
                if message == "2":  # engine.io ping
                    await ws.send("3")
                elif message.startswith("40"):
                    await ws.send("421" + orjson.dumps(["watch", watch]).decode())
                elif message.startswith("44"):
                    raise OSError(f"connection refused: {message[2:200]}")
                elif message.startswith("431"):
                    ack = orjson.loads(message[3:])[0]
                    if not ack.get("ok"):
                        raise OSError(f"watch refused: {ack}")
                    acked = True
                    self._attach()
                elif message.startswith("42"):
                    event, data = orjson.loads(message[2:])[:2]
                    if event == "answer":
                        self._take(data)
                        if self.done:
                            return
                        await self._pace()
                    elif event == "error":
                        self.errors.append(str(data))
            raise EOFError(f"the socket closed (watch acknowledged: {acked})")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The measuring process's cyclic garbage collector off while it times chunks. Its full
    collections paused this process up to ~110 ms at a time (gc.callbacks: 14 in one run of
    test_faults_slow, whose viewers hold thousands of received chunks), and every chunk that
    arrived meanwhile was timed late: a stall that was the test's, not tokenrelay's.
    Reference counting still frees what is not in a cycle."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(frozen=True)
class Tally:
    """What viewers received, against the answer stream as Redis holds it."""

    viewers: int
    chunks_expected: int
    chunks_received: int
    lost: int
    doubled: int
    out_of_order: int
    unfinished: int


def tally(viewers: list[Viewer], truth: dict[str, list[str]]) -> Tally:
    """`truth`: question id -> the entry IDs of its chunks, from XRANGE."""
    expected = received = lost = doubled = disorder = unfinished = 0
    for v in viewers:
        ids = [g.entry_id for g in v.got]
        chunk_ids = [g.entry_id for g in v.chunks()]
        want = truth[v.qid]
        expected += len(want)
        received += len(chunk_ids)
        lost += len(set(want) - set(chunk_ids))
        doubled += len(chunk_ids) - len(set(chunk_ids))
        keys = [tuple(map(int, i.split("-"))) for i in ids]
        disorder += sum(1 for a, b in itertools.pairwise(keys) if b <= a)
        unfinished += 0 if v.done else 1
    return Tally(len(viewers), expected, received, lost, doubled, disorder, unfinished)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
