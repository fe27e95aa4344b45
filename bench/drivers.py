"""How a benchmark client asks and watches, per transport: Socket.IO, SSE, or `direct`
(the same mock model streamed straight to the client, no Redis: the floor)."""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable

import aiohttp
import orjson

from bench.mock import stamp_of
from bench.sio import SocketIOClient
from bench.spec import Load, question_for

TERMINAL = frozenset({"end", "error", "cancelled"})
CONNECT_AT_ONCE = 100


class Viewer:
    """What one viewer of one answer received: each model chunk's receive time (or latency,
    direct), and how many entries carried them."""

    __slots__ = ("done", "entries", "error", "first_ns", "recv_ns", "stored_ms", "terminal")

    def __init__(self) -> None:
        self.recv_ns = array("q")
        self.stored_ms = array("q")  # the ms part of each chunk's entry ID: when Redis stored it
        self.entries = 0
        self.first_ns = 0
        self.terminal = ""
        self.error = ""
        self.done = asyncio.Event()

    def entry(self, now_ns: int, kind: str, entry_id: str, text: str = "") -> None:
        if kind == "chunk":
            # A worker whose writes fall behind coalesces queued chunks into one entry; the
            # mock's chunks are single words, so the words count the model's chunks in it.
            chunks = len(text.split()) or 1
            stored_ms = int(entry_id.partition("-")[0])
            for _ in range(chunks):
                self.recv_ns.append(now_ns)
                self.stored_ms.append(stored_ms)
            self.entries += 1
            self.first_ns = self.first_ns or now_ns
        elif kind in TERMINAL:
            self.terminal = kind
            self.done.set()


class Answer:
    __slots__ = ("asked_ns", "nonce", "qid", "viewers")

    def __init__(self, nonce: str, viewers: int) -> None:
        self.nonce = nonce
        self.qid = ""
        self.asked_ns = 0
        self.viewers = [Viewer() for _ in range(viewers)]


class Driver:
    """How one transport asks and watches. `direct` already knows latencies; the others
    know receive times until the stamps are joined in."""

    stamped_in_band = False

    def __init__(self, session: aiohttp.ClientSession, load: Load) -> None:
        self.session = session
        self.load = load

    async def prepare(self, answers: list[Answer]) -> None:
        return None

    async def ask_and_watch(self, answer: Answer) -> None:
        raise NotImplementedError

    async def cancel(self, answer: Answer) -> None:
        if answer.qid:
            url = f"{self.load.target_url}/api/questions/{answer.qid}/cancel"
            async with self.session.post(url) as resp:
                await resp.read()

    async def close(self) -> None:
        return None

    def question(self, answer: Answer) -> str:
        return question_for(answer.nonce, self.load.tokens, self.load.rate)


class SocketIODriver(Driver):
    """Each viewer is its own Socket.IO connection; the first one asks."""

    def __init__(self, session: aiohttp.ClientSession, load: Load) -> None:
        super().__init__(session, load)
        self.sockets: dict[int, SocketIOClient] = {}

    async def prepare(self, answers: list[Answer]) -> None:
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)

        async def connect(viewer: Viewer) -> None:
            sock = SocketIOClient(self.session, self.load.target_url)

            def on_event(now_ns: int, packet: str) -> None:
                event, data = orjson.loads(packet)
                if event == "answer":
                    viewer.entry(now_ns, data["type"], data["entry_id"], data.get("text", ""))

            sock.on_event = on_event
            async with gate:
                await sock.connect()
            self.sockets[id(viewer)] = sock

        await asyncio.gather(*(connect(v) for a in answers for v in a.viewers))

    async def ask_and_watch(self, answer: Answer) -> None:
        """The first viewer asks and watches in one call (`ask {watch: true}`), as the
        page does; the others watch once they know the id."""
        socks = [self.sockets[id(v)] for v in answer.viewers]
        question = {"topic": "bench", "question": self.question(answer), "watch": True}
        reply = await socks[0].call("ask", question)
        if "id" not in reply:
            raise RuntimeError(f"ask refused: {reply}")
        answer.qid = reply["id"]
        acks = await asyncio.gather(*(s.call("watch", {"id": answer.qid}) for s in socks[1:]))
        for viewer, ack in zip(answer.viewers[1:], acks, strict=True):
            if not isinstance(ack, dict) or "error" in ack:
                viewer.error = f"watch refused: {ack}"[:200]
                viewer.done.set()
        await asyncio.gather(*(v.done.wait() for v in answer.viewers))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sockets.values()), return_exceptions=True)


def _sse_blocks(buffer: bytes, sep: bytes) -> tuple[list[bytes], bytes]:
    *blocks, rest = buffer.split(sep)
    return blocks, rest


class SSEDriver(Driver):
    """Ask over the JSON API, then each viewer opens the answer's event stream."""

    async def ask_and_watch(self, answer: Answer) -> None:
        """The first viewer asks and reads the events in the same response (`Accept:
        text/event-stream`); the others open the answer's event stream once they know
        the id."""
        first, *others = answer.viewers
        body = {"topic": "bench", "question": self.question(answer), "stream": True}
        url = f"{self.load.target_url}/api/questions"
        accept = {"Accept": "text/event-stream"}
        async with self.session.post(url, json=body, headers=accept) as resp:
            if resp.status != 200:
                raise RuntimeError(f"ask refused: {resp.status} {await resp.text()}"[:300])
            answer.qid = resp.headers["X-Question-Id"]
            events_url = f"{url}/{answer.qid}/events"
            rest = [asyncio.create_task(self._watch(events_url, v)) for v in others]
            try:
                await self._read(resp, first)
            finally:
                await asyncio.gather(*rest)

    async def _watch(self, url: str, viewer: Viewer) -> None:
        async with self.session.get(url) as resp:
            resp.raise_for_status()
            await self._read(resp, viewer)

    @staticmethod
    async def _read(resp: aiohttp.ClientResponse, viewer: Viewer) -> None:
        rest = b""
        async for data in resp.content.iter_any():
            now = time.time_ns()
            blocks, rest = _sse_blocks(rest + data, b"\r\n\r\n")
            for block in blocks:
                fields = dict(f.split(b": ", 1) for f in block.split(b"\r\n") if b": " in f)
                if b"event" in fields:
                    kind = fields[b"event"].decode()
                    data = orjson.loads(fields[b"data"]) if kind == "chunk" else {}
                    viewer.entry(now, kind, fields[b"id"].decode(), data.get("text", ""))
            if viewer.done.is_set():
                return


class DirectDriver(Driver):
    """The floor: each viewer streams the answer straight from the model server."""

    stamped_in_band = True

    async def ask_and_watch(self, answer: Answer) -> None:
        await asyncio.gather(*(self._stream(answer, v) for v in answer.viewers))

    async def _stream(self, answer: Answer, viewer: Viewer) -> None:
        body = {
            "model": "mock-llm",
            "stream": True,
            "messages": [
                {"role": "system", "content": "You are an expert in answering questions."},
                {"role": "user", "content": self.question(answer)},
            ],
        }
        url = f"{self.load.target_url}/chat/completions"
        async with self.session.post(url, json=body) as resp:
            resp.raise_for_status()
            rest = b""
            async for data in resp.content.iter_any():
                now = time.time_ns()
                blocks, rest = _sse_blocks(rest + data, b"\n\n")
                for block in blocks:
                    sent = stamp_of(block)
                    if sent is not None:
                        viewer.recv_ns.append(now - sent)  # already a latency
                        viewer.first_ns = viewer.first_ns or now
                    elif block == b"data: [DONE]":
                        viewer.terminal = "end"
                        viewer.done.set()
                        return

    async def cancel(self, answer: Answer) -> None:
        return None  # closing the stream ends it


DRIVERS: dict[str, Callable[[aiohttp.ClientSession, Load], Driver]] = {
    "socketio": SocketIODriver,
    "sse": SSEDriver,
    "direct": DirectDriver,
}
