"""A client process of the benchmark: asks its answers, watches them, times every chunk.

The harness starts it with a `Load` as JSON on stdin. It connects what it must (Socket.IO
sockets are opened before the clock starts), prints `ready`, waits for `go <ns>` on stdin,
starts its answers spread over the ramp, and when every viewer has its terminal entry
(or the timeout passed) writes its results next to `load.out` and prints `done`.

Latency of a chunk = receive time here - the mock's send stamp of the same chunk.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tokenrelay.bench.loop import run
from tokenrelay.bench.mock import stamp_of
from tokenrelay.bench.sio import SocketIOClient
from tokenrelay.bench.spec import Load, question_for

TERMINAL = frozenset({"end", "error", "cancelled"})
CONNECT_AT_ONCE = 100
LAG_TICK_S = 0.01


class Viewer:
    """What one viewer of one answer received: chunk receive times (or latencies, direct)."""

    __slots__ = ("done", "error", "first_ns", "recv_ns", "stored_ms", "terminal")

    def __init__(self) -> None:
        self.recv_ns = array("q")
        self.stored_ms = array("q")  # the ms part of each chunk's entry ID: when Redis stored it
        self.first_ns = 0
        self.terminal = ""
        self.error = ""
        self.done = asyncio.Event()

    def entry(self, now_ns: int, kind: str, entry_id: str) -> None:
        if kind == "chunk":
            self.recv_ns.append(now_ns)
            self.stored_ms.append(int(entry_id.partition("-")[0]))
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

    async def ask(self, answer: Answer) -> None:
        body = {"topic": "bench", "question": self.question(answer), "stream": True}
        async with self.session.post(f"{self.load.target_url}/api/questions", json=body) as resp:
            reply = await resp.json(loads=orjson.loads)
        if "id" not in reply:
            raise RuntimeError(f"ask refused: {reply}")
        answer.qid = reply["id"]


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
                    viewer.entry(now_ns, data["type"], data["entry_id"])

            sock.on_event = on_event
            async with gate:
                await sock.connect()
            self.sockets[id(viewer)] = sock

        await asyncio.gather(*(connect(v) for a in answers for v in a.viewers))

    async def ask_and_watch(self, answer: Answer) -> None:
        socks = [self.sockets[id(v)] for v in answer.viewers]
        question = {"topic": "bench", "question": self.question(answer)}
        reply = await socks[0].call("ask", question)
        if "id" not in reply:
            raise RuntimeError(f"ask refused: {reply}")
        answer.qid = reply["id"]
        await asyncio.gather(*(s.call("watch", {"id": answer.qid}) for s in socks))
        await asyncio.gather(*(v.done.wait() for v in answer.viewers))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sockets.values()), return_exceptions=True)


def _sse_blocks(buffer: bytes, sep: bytes) -> tuple[list[bytes], bytes]:
    *blocks, rest = buffer.split(sep)
    return blocks, rest


class SSEDriver(Driver):
    """Ask over the JSON API, then each viewer opens the answer's event stream."""

    async def ask_and_watch(self, answer: Answer) -> None:
        await self.ask(answer)
        url = f"{self.load.target_url}/api/questions/{answer.qid}/events"
        await asyncio.gather(*(self._watch(url, v) for v in answer.viewers))

    async def _watch(self, url: str, viewer: Viewer) -> None:
        async with self.session.get(url) as resp:
            resp.raise_for_status()
            rest = b""
            async for data in resp.content.iter_any():
                now = time.time_ns()
                blocks, rest = _sse_blocks(rest + data, b"\r\n\r\n")
                for block in blocks:
                    fields = dict(f.split(b": ", 1) for f in block.split(b"\r\n") if b": " in f)
                    if b"event" in fields:
                        viewer.entry(now, fields[b"event"].decode(), fields[b"id"].decode())
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


class LagMeter:
    """How late this process's event loop wakes: the load generator's own share of latency."""

    def __init__(self) -> None:
        self.lags_ns = array("q")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter_ns()
            await asyncio.sleep(LAG_TICK_S)
            self.lags_ns.append(time.perf_counter_ns() - before - int(LAG_TICK_S * 1e9))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _drive(driver: Driver, answers: list[Answer], go_ns: int, load: Load) -> None:
    deadline = go_ns + int(load.timeout_s * 1e9)

    async def one(i: int, answer: Answer) -> None:
        index = load.first_index + i
        start = go_ns + int(load.ramp_s * 1e9 * index / max(1, load.total_answers))
        await asyncio.sleep(max(0.0, (start - time.time_ns()) / 1e9))
        answer.asked_ns = time.time_ns()
        try:
            async with asyncio.timeout(max(0.0, (deadline - time.time_ns()) / 1e9)):
                await driver.ask_and_watch(answer)
        except TimeoutError:
            for viewer in answer.viewers:
                viewer.error = viewer.error or "timeout"
            await _quietly(driver.cancel(answer))
        except Exception as e:
            for viewer in answer.viewers:
                viewer.error = viewer.error or f"{type(e).__name__}: {e}"[:200]

    await asyncio.gather(*(one(i, a) for i, a in enumerate(answers)))


async def _quietly(work: Awaitable[None]) -> None:
    try:
        async with asyncio.timeout(5):
            await work
    except Exception:  # best effort: the harness waits for the worker to go idle anyway
        return


async def _stamps(session: aiohttp.ClientSession, load: Load) -> dict[str, list[int]]:
    async with session.post(
        f"{load.mock_url}/bench/stamps", data=orjson.dumps({"nonces": load.nonces})
    ) as resp:
        found: dict[str, list[int]] = orjson.loads(await resp.read())
        return found


SERIES = ("lat", "ttfc", "to_redis", "from_redis")


def _latencies(
    answers: list[Answer], stamps: dict[str, list[int]] | None
) -> tuple[dict[str, array[int]], int]:
    """Arrays of ns: `lat` chunk latency, `ttfc` time to first chunk per viewer, and the
    two hops split at the entry ID's time (1 ms resolution): model send -> stored in Redis,
    stored -> received. Also the count of chunks with no stamp to match."""
    out = {name: array("q") for name in SERIES}
    unmatched = 0
    for answer in answers:
        sent = stamps.get(answer.nonce, []) if stamps is not None else []
        for viewer in answer.viewers:
            recv = viewer.recv_ns
            if not recv:
                continue
            out["ttfc"].append(viewer.first_ns - answer.asked_ns)
            if stamps is None:  # direct: already latencies
                out["lat"].extend(recv)
                continue
            stored = viewer.stored_ms
            n = min(len(recv), len(sent))
            unmatched += len(recv) - n
            out["lat"].extend(recv[i] - sent[i] for i in range(n))
            out["to_redis"].extend(stored[i] * 1_000_000 - sent[i] for i in range(n))
            out["from_redis"].extend(recv[i] - stored[i] * 1_000_000 for i in range(n))
    return out, unmatched


async def main_async(load: Load) -> None:
    answers = [Answer(n, load.viewers) for n in load.nonces]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        driver = DRIVERS[load.mode](session, load)
        await driver.prepare(answers)
        print("ready", flush=True)
        command = (await _stdin_line()).split()
        if not command or command[0] != "go":
            return
        go_ns = int(command[1])
        cpu_before = _cpu_s()
        lag = LagMeter()
        lag.start()
        await _drive(driver, answers, go_ns, load)
        ended_ns = time.time_ns()
        cpu_s = _cpu_s() - cpu_before
        await lag.stop()
        stamps = None if driver.stamped_in_band else await _stamps(session, load)
        await driver.close()
    _write(load, answers, stamps, cpu_s, go_ns, ended_ns, lag)
    print("done", flush=True)


def _write(
    load: Load,
    answers: list[Answer],
    stamps: dict[str, list[int]] | None,
    cpu_s: float,
    go_ns: int,
    ended_ns: int,
    lag: LagMeter,
) -> None:
    series, unmatched = _latencies(answers, stamps)
    viewers = [v for a in answers for v in a.viewers]
    errors = sorted({v.error for v in viewers if v.error})
    lags = sorted(lag.lags_ns)
    summary: dict[str, Any] = {
        "deliveries": sum(len(v.recv_ns) for v in viewers),
        "viewers": len(viewers),
        "viewers_done": sum(1 for v in viewers if v.terminal == "end"),
        "errors": errors[:5],
        "error_count": sum(1 for v in viewers if v.error),
        "unmatched_chunks": unmatched,
        "cpu_s": cpu_s,
        "go_ns": go_ns,
        "ended_ns": ended_ns,
        "loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] / 1e6 if lags else 0.0,
        "loop_lag_max_ms": lags[-1] / 1e6 if lags else 0.0,
    }
    out = Path(load.out)
    out.with_suffix(".json").write_bytes(orjson.dumps(summary))
    for name, values in series.items():
        with out.with_suffix(f".{name}").open("wb") as f:
            values.tofile(f)


def main() -> None:
    load = Load.from_json(orjson.loads(sys.stdin.readline()))
    run(main_async(load))


if __name__ == "__main__":
    main()
