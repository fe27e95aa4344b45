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
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.drivers import DRIVERS, Answer, Driver
from bench.loop import run
from bench.spec import Load

LAG_TICK_S = 0.01


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
        "entries": sum(v.entries for v in viewers),
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
